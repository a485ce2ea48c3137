"""Supervoxels / superpixels without a compile step (fsmis.data.supervoxels, tools/make_supervoxels.py)."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import fsmis.data.supervoxels as svmod
from fsmis.data.nifti import DataError, load_volume
from fsmis.data.supervoxels import (
    body_mask,
    felzenszwalb_3d,
    make_dataset_supervoxels,
    superpixels_2d,
    supervoxels_3d,
)

REPO = Path(__file__).resolve().parents[1]
CMR_DIR = REPO.parent / "shared/data/cmr"


def _phantom(shape=(6, 40, 48), seed=0):
    """Zero background, a bright elliptic 'body' with two 'organs' and a little noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    cy, cx = shape[1] / 2, shape[2] / 2
    body = ((y - cy) / (0.4 * shape[1])) ** 2 + ((x - cx) / (0.4 * shape[2])) ** 2 <= 1
    vol = np.where(body, 100.0, 0.0)
    vol[body & (x < cx)] = 160.0
    vol[body & (y < cy) & (x >= cx)] = 220.0
    vol += np.where(body, rng.normal(0, 3, shape), 0.0)
    return vol, body


# --- felzenszwalb_3d -------------------------------------------------------------------------

def test_deterministic():
    vol = np.random.default_rng(3).normal(100, 20, (8, 24, 24))
    a = felzenszwalb_3d(vol, (3.0, 1.0, 1.0), min_size=30)
    b = felzenszwalb_3d(vol.copy(), (3.0, 1.0, 1.0), min_size=30)
    assert a.dtype == np.int32 and a.shape == vol.shape
    assert np.array_equal(a, b)
    # consecutive labels in raster order of first voxel
    _, first = np.unique(a.ravel(), return_index=True)
    assert np.array_equal(np.unique(a), np.arange(a.max() + 1))
    assert np.all(np.diff(first) > 0)
    ph, _ = _phantom()
    assert np.array_equal(supervoxels_3d(ph, (4, 1, 1), min_size=50), supervoxels_3d(ph, (4, 1, 1), min_size=50))
    assert np.array_equal(superpixels_2d(ph, min_size=20), superpixels_2d(ph, min_size=20))


@pytest.mark.parametrize("connectivity", [6, 26])
def test_two_blocks_strong_edge(connectivity):
    vol = np.zeros((5, 12, 16))
    vol[:, :, 7:] = 200.0
    lab = felzenszwalb_3d(vol, (2.0, 1.0, 1.0), min_size=3, connectivity=connectivity)
    assert lab.max() == 1
    assert np.all(lab[:, :, :7] == 0) and np.all(lab[:, :, 7:] == 1)


def test_min_size_respected():
    vol = np.random.default_rng(5).normal(0, 50, (6, 20, 20))
    for min_size in (1, 40, 300):
        lab = felzenszwalb_3d(vol, min_size=min_size)
        counts = np.bincount(lab.ravel())
        assert counts.min() >= min_size, (min_size, counts.min())
    # a component smaller than min_size stays one (too small) segment
    lab = felzenszwalb_3d(vol, min_size=vol.size + 1)
    assert lab.max() == 0
    # without min_size merging, noise gives many tiny segments
    assert felzenszwalb_3d(vol, min_size=1).max() > 100


@pytest.mark.parametrize("connectivity", [6, 26])
def test_spacing_direction(connectivity):
    """Four flat blocks: z-neighbours differ by 10, x-neighbours by 22. With isotropic voxels
    the cheap z edges merge first (segments span both slices); with 4 mm slices the z edges
    cost 40 (diagonal ones at least 10 * sqrt(18 / 3) = 24.5) > 22, so segments grow in-plane
    first (one segment per slice)."""
    vol = np.zeros((2, 4, 8))
    vol[1] += 10.0
    vol[:, :, 4:] += 22.0
    block = 16  # 1 x 4 x 4 voxels
    iso = felzenszwalb_3d(vol, (1.0, 1.0, 1.0), min_size=block + 1, connectivity=connectivity)
    assert iso.max() == 1
    assert np.all(iso[:, :, :4] == iso[0, 0, 0]) and np.all(iso[:, :, 4:] == iso[0, 0, 7])
    thick = felzenszwalb_3d(vol, (4.0, 1.0, 1.0), min_size=block + 1, connectivity=connectivity)
    assert thick.max() == 1
    assert np.all(thick[0] == thick[0, 0, 0]) and np.all(thick[1] == thick[1, 0, 0])
    assert thick[0, 0, 0] != thick[1, 0, 0]


def test_sigma_smoothing_runs():
    vol, _ = _phantom()
    lab = felzenszwalb_3d(vol, (4.0, 1.0, 1.0), sigma=2.0, min_size=20)
    assert lab.shape == vol.shape and lab.min() == 0


def test_bad_input():
    with pytest.raises(ValueError):
        felzenszwalb_3d(np.zeros((4, 4)))
    with pytest.raises(ValueError):
        felzenszwalb_3d(np.zeros((2, 4, 4)), (0, 1, 1))
    with pytest.raises(ValueError):
        felzenszwalb_3d(np.zeros((2, 4, 4)), connectivity=18)


# --- felzenszwalb_3d against a plain reference implementation ------------------------------

def _reference_felzenszwalb(vol, spacing, scale, min_size, connectivity):
    """The algorithm written out plainly (numpy edges, np.argsort(kind="stable"), Python
    union-find, both passes over every edge): what the numba path must reproduce exactly."""
    vol = np.asarray(vol, dtype=np.float64)
    shape, n = vol.shape, vol.size
    if connectivity == 6:
        offsets = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    else:
        offsets = [o for o in itertools.product((0, 1), (-1, 0, 1), (-1, 0, 1)) if o > (0, 0, 0)]
    sp = np.asarray(spacing, float)
    d_ref = float(np.sqrt(sp[1] * sp[2]))
    idx = np.arange(n).reshape(shape)
    ends_a, ends_b, weights = [], [], []
    for off in offsets:
        sl_a = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(off, shape))
        sl_b = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(off, shape))
        o = np.asarray(off, float)
        factor = float(np.linalg.norm(o * sp) / (np.linalg.norm(o) * d_ref))
        w = np.abs(vol[sl_b] - vol[sl_a])
        w *= factor
        weights.append(w.ravel())
        ends_a.append(idx[sl_a].ravel())
        ends_b.append(idx[sl_b].ravel())
    w = np.concatenate(weights)
    a = np.concatenate(ends_a).tolist()
    b = np.concatenate(ends_b).tolist()
    order = np.argsort(w, kind="stable").tolist()
    w = w.tolist()
    parent, size, cint = list(range(n)), [1] * n, [0.0] * n

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(r0, r1):
        lo, hi = min(r0, r1), max(r0, r1)
        parent[hi] = lo
        size[lo] += size[hi]
        return lo

    k = scale / 255.0
    for e in order:
        r0, r1 = find(a[e]), find(b[e])
        if r0 != r1 and w[e] < min(cint[r0] + k / size[r0], cint[r1] + k / size[r1]):
            cint[union(r0, r1)] = w[e]
    if min_size > 1:
        for e in order:
            r0, r1 = find(a[e]), find(b[e])
            if r0 != r1 and (size[r0] < min_size or size[r1] < min_size):
                union(r0, r1)
    roots = np.array([find(v) for v in range(n)])
    _, first, inverse = np.unique(roots, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.ravel()].reshape(shape).astype(np.int32)


def _reference_cases():
    rng = np.random.default_rng(11)
    blocks = np.zeros((4, 9, 10))
    blocks[:, :, 5:] = 80.0
    blocks[2:] += 30.0
    yield "noise", rng.normal(100, 30, (4, 9, 10))
    yield "ties", rng.integers(0, 4, (4, 8, 9)).astype(float) * 10.0  # many equal weights
    yield "blocks", blocks + rng.normal(0, 2, blocks.shape)
    yield "flat_z", rng.normal(50, 20, (1, 7, 8))
    yield "flat_y", rng.normal(50, 20, (5, 1, 6))
    yield "flat_x", rng.normal(50, 20, (3, 4, 1))


@pytest.mark.parametrize("connectivity", [6, 26])
def test_matches_reference_implementation(connectivity):
    n_checked = 0
    for name, vol in _reference_cases():
        for spacing in ((2.5, 1.5, 1.5), (1.0, 1.0, 1.0), (3.0, 0.9, 1.2)):
            for scale, min_size in ((1.0, 1), (1.0, 12), (800.0, 5), (5000.0, 40)):
                got = felzenszwalb_3d(vol, spacing, scale=scale, min_size=min_size,
                                      connectivity=connectivity)
                ref = _reference_felzenszwalb(vol, spacing, scale, min_size, connectivity)
                assert np.array_equal(got, ref), (name, spacing, scale, min_size)
                n_checked += 1
    assert n_checked == 6 * 3 * 4


def test_int64_edge_payload_path(monkeypatch):
    """Volumes over 2**27 voxels carry int64 edge payloads; force that path on a small one."""
    vol = np.random.default_rng(2).normal(100, 30, (4, 9, 10))
    for connectivity in (6, 26):
        expected = felzenszwalb_3d(vol, (2.5, 1.5, 1.5), scale=800, min_size=5, connectivity=connectivity)
        monkeypatch.setattr(svmod, "_INT32_PAYLOAD_BITS", 0)
        got = felzenszwalb_3d(vol, (2.5, 1.5, 1.5), scale=800, min_size=5, connectivity=connectivity)
        monkeypatch.undo()
        assert np.array_equal(got, expected)


def test_radix_sort_is_a_stable_argsort():
    rng = np.random.default_rng(4)
    cases = [
        np.zeros(0), np.zeros(1), np.zeros(17), np.array([3.0]), np.array([0.0, 5.0, 0.0, 5.0]),
        np.round(np.abs(rng.normal(0, 3, 5000)), 1),  # ties and zeros
        np.abs(rng.normal(0, 3, 5000)),
        10.0 ** rng.uniform(-300, 300, 5000),  # every bit of the exponent in use
        np.concatenate([np.zeros(100), 10.0 ** rng.uniform(-5, 3, 3000), np.full(50, np.pi)]),
    ]
    for w in cases:
        w = rng.permutation(w)
        keys, order = svmod._radix_sort_pairs(w.view(np.int64).copy(), np.arange(w.size, dtype=np.int32))
        expected = np.argsort(w, kind="stable")
        assert np.array_equal(order, expected)
        assert np.array_equal(keys.view(np.float64), w[expected])


# --- body mask, supervoxels_3d, superpixels_2d ----------------------------------------------

def test_body_mask_and_background_zero():
    vol, body = _phantom()
    # a dark hole inside the body of every slice, and a separate small bright blob outside
    vol[:, 18:22, 22:26] = 0.0
    vol[:, 0:2, 0:2] = 200.0
    m = body_mask(vol, threshold=10)
    assert m.dtype == bool
    assert np.array_equal(m, body)  # largest component only, holes filled
    sv = supervoxels_3d(vol, (4.0, 1.0, 1.0), min_size=50)
    assert sv.dtype == np.int32
    assert np.all(sv[~body] == 0)
    assert np.all(sv[body] > 0)
    assert np.array_equal(np.unique(sv), np.arange(sv.max() + 1))  # 0 + consecutive 1..n
    assert sv.max() >= 3  # the three intensity regions at least
    # constant volume: nothing above threshold, no supervoxel
    assert supervoxels_3d(np.full((3, 8, 8), 7.0), min_size=5).max() == 0


def test_defaults_are_the_published_settings():
    vol, body = _phantom(shape=(5, 24, 28))
    # slice 0: the body is disconnected from the rest in 3D (a gap slice), and smaller
    vol[1] = 0.0
    vol[0] = np.where(np.roll(body[0], 8, axis=1) & (np.arange(28) < 18), 150.0, 0.0)
    per_slice, in_3d = body_mask(vol), body_mask(vol, per_slice=False)
    assert per_slice[0].any() and not in_3d[0].any()  # 3D: only the largest 3D component
    assert np.array_equal(per_slice[2:], in_3d[2:])
    sv = supervoxels_3d(vol, (4.0, 1.0, 1.0), min_size=30)
    assert np.array_equal(sv, supervoxels_3d(vol, (4.0, 1.0, 1.0), min_size=30,
                                             connectivity=26, body_per_slice=True))
    assert np.array_equal(sv > 0, per_slice)
    assert np.array_equal(felzenszwalb_3d(vol, min_size=30),
                          felzenszwalb_3d(vol, min_size=30, connectivity=26))
    fast = supervoxels_3d(vol, (4.0, 1.0, 1.0), min_size=30, connectivity=6, body_per_slice=False)
    assert np.array_equal(fast > 0, in_3d)


def test_superpixels_2d_global_ids():
    vol, body = _phantom()
    sp = superpixels_2d(vol, min_size=20, sigma=1.0)
    assert sp.dtype == np.int32 and sp.shape == vol.shape
    assert np.all(sp[~body] == 0) and np.all(sp[body] > 0)
    ids_per_slice = [set(np.unique(s[s > 0])) for s in sp]
    for i in range(len(ids_per_slice)):
        for j in range(i + 1, len(ids_per_slice)):
            assert not ids_per_slice[i] & ids_per_slice[j]
    assert np.array_equal(np.unique(sp), np.arange(sp.max() + 1))


# --- dataset writer and CLI ------------------------------------------------------------------

def _tiny_dataset(root: Path, n_cases=2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(
        {"name": "tiny", "modality": "CT", "labels": {"background": 0, "liver": 6}}))
    for i in range(1, n_cases + 1):
        vol_zyx, body = _phantom(shape=(5, 32, 36), seed=i)
        data_ijk = np.transpose(vol_zyx, (2, 1, 0)).astype(np.float64)
        affine = np.diag([-1.5, 1.5, 4.0, 1.0])
        affine[:3, 3] = [10.0 * i, -20.0, 5.0]
        nib.save(nib.Nifti1Image(data_ijk, affine), str(root / f"image_{i}.nii.gz"))
        lab = np.transpose(np.where(body, 6, 0), (2, 1, 0)).astype(np.uint8)
        nib.save(nib.Nifti1Image(lab, affine), str(root / f"label_{i}.nii.gz"))
    return root


def test_make_dataset_supervoxels(tmp_path):
    root = _tiny_dataset(tmp_path / "tiny")
    out = make_dataset_supervoxels(root, min_size=40, progress=False)
    assert out == root / "supervoxels_40"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["superpix-MIDDLE_1.nii.gz", "superpix-MIDDLE_2.nii.gz"]
    for cid in ("1", "2"):
        img = nib.load(str(root / f"image_{cid}.nii.gz"))
        sv = nib.load(str(out / f"superpix-MIDDLE_{cid}.nii.gz"))
        assert sv.shape == img.shape
        assert np.allclose(sv.affine, img.affine)
        assert sv.get_data_dtype() == np.int32
        vol = load_volume(root / f"image_{cid}.nii.gz")
        expected = supervoxels_3d(vol.array, vol.spacing, min_size=40)
        got = np.transpose(np.asarray(sv.dataobj), (2, 1, 0))
        assert np.array_equal(got, expected)
    # existing files are skipped unless overwrite
    target = out / "superpix-MIDDLE_1.nii.gz"
    target.write_bytes(b"placeholder")
    make_dataset_supervoxels(root, min_size=40, progress=False)
    assert target.read_bytes() == b"placeholder"
    make_dataset_supervoxels(root, min_size=40, progress=False, overwrite=True)
    assert nib.load(str(target)).shape == (36, 32, 5)
    # 2D mode: its own folder
    out2 = make_dataset_supervoxels(root, mode="2d", min_size=30, progress=False)
    assert out2 == root / "superpixels_30"
    assert len(list(out2.glob("superpix-MIDDLE_*.nii.gz"))) == 2


def test_published_layout_output_folder(tmp_path):
    bench = tmp_path / "CMR"
    inner = _tiny_dataset(bench / "cmr_MR_normalized", n_cases=1)
    (inner / "dataset.json").unlink()
    for p in inner.glob("label_*.nii.gz"):  # CMR label ids
        img = nib.load(str(p))
        data = np.asarray(img.dataobj).astype(np.int16)
        nib.save(nib.Nifti1Image(np.where(data > 0, 500, 0).astype(np.int16), img.affine), str(p))
    out = make_dataset_supervoxels(bench, min_size=40, progress=False)
    assert out == bench / "supervoxels_40"
    assert (out / "superpix-MIDDLE_1.nii.gz").is_file()


def _run_cli(*args):
    """The script as a subprocess (a fresh interpreter: JIT compile included, a few seconds)."""
    return subprocess.run([sys.executable, str(REPO / "tools/make_supervoxels.py"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _cli_main():
    """The script's main() in this process (kernels already compiled)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_supervoxels_cli", REPO / "tools/make_supervoxels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_workers_do_not_change_the_output(tmp_path):
    root = _tiny_dataset(tmp_path / "tiny", n_cases=3)
    results = {}
    for workers in (1, 2, None):
        out = make_dataset_supervoxels(root, min_size=40, progress=False, overwrite=True, workers=workers)
        results[workers] = {p.name: np.asarray(nib.load(str(p)).dataobj)
                            for p in sorted(out.glob("*.nii.gz"))}
        assert not list(out.glob(".tmp-*"))
    assert len(results[1]) == 3
    for workers in (2, None):
        assert results[workers].keys() == results[1].keys()
        for name, arr in results[1].items():
            assert np.array_equal(results[workers][name], arr), (workers, name)
    with pytest.raises(ValueError, match="workers"):
        make_dataset_supervoxels(root, min_size=40, progress=False, workers=0)


def test_progress_counts_skipped_and_computed_cases(tmp_path, capsys):
    root = _tiny_dataset(tmp_path / "tiny", n_cases=3)
    make_dataset_supervoxels(root, min_size=40, progress=False, workers=1)
    (root / "supervoxels_40" / "superpix-MIDDLE_2.nii.gz").unlink()
    (root / "supervoxels_40" / "superpix-MIDDLE_3.nii.gz").unlink()
    capsys.readouterr()
    make_dataset_supervoxels(root, min_size=40, progress=True, workers=2)
    err = capsys.readouterr().err
    assert "1/3" in err and "3/3" in err, err


def test_errors_name_the_file(tmp_path):
    root = _tiny_dataset(tmp_path / "tiny", n_cases=3)
    bad = root / "image_2.nii.gz"
    img = nib.load(str(bad))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(bad))
    for workers in (1, 2):
        with pytest.raises(DataError, match="image_2.nii.gz"):
            make_dataset_supervoxels(root, min_size=40, progress=False, overwrite=True, workers=workers)
        assert not list((root / "supervoxels_40").glob(".tmp-*"))
        assert not (root / "supervoxels_40" / "superpix-MIDDLE_2.nii.gz").exists()


def test_cli(tmp_path, capsys):
    root = _tiny_dataset(tmp_path / "tiny", n_cases=2)
    res = _run_cli("--data", str(root), "--min-size", "40", "--no-progress", "--workers", "2")
    assert res.returncode == 0, res.stderr
    out = root / "supervoxels_40"
    assert (out / "superpix-MIDDLE_1.nii.gz").is_file()
    assert str(out) in res.stdout.strip().splitlines()[-1]
    assert "connectivity=26" in res.stdout and "published behaviour" in res.stdout
    vol = load_volume(root / "image_1.nii.gz")
    got = np.transpose(np.asarray(nib.load(str(out / "superpix-MIDDLE_1.nii.gz")).dataobj), (2, 1, 0))
    assert np.array_equal(got, supervoxels_3d(vol.array, vol.spacing, min_size=40))
    # the rest in this process: --fast is 6-connectivity and the 3D body mask
    main = _cli_main()
    capsys.readouterr()
    assert main(["--data", str(root), "--min-size", "40", "--no-progress", "--fast", "--overwrite",
                 "--workers", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "connectivity=6" in stdout and "3D component" in stdout and "deviation" in stdout
    got = np.transpose(np.asarray(nib.load(str(out / "superpix-MIDDLE_1.nii.gz")).dataobj), (2, 1, 0))
    assert np.array_equal(got, supervoxels_3d(vol.array, vol.spacing, min_size=40, connectivity=6,
                                              body_per_slice=False))
    assert main(["--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--min-size", "--fast", "--workers", "--connectivity"):
        assert option in help_text
    assert "--adnet-compatible" not in help_text
    for bad in (["--workers", "0"], ["--adnet-compatible"]):
        with pytest.raises(SystemExit) as exc:
            main(["--data", str(root), *bad])
        assert exc.value.code == 2


# --- real Card-MRI data ----------------------------------------------------------------------

@pytest.mark.skipif(not (CMR_DIR / "supervoxels_1000").is_dir(), reason="Card-MRI data absent")
def test_cmr_supervoxels_match_published():
    cid = "35"  # the smallest case (11 slices)
    vol = load_volume(CMR_DIR / "cmr_MR_normalized" / f"image_{cid}.nii.gz")
    pub = load_volume(CMR_DIR / "supervoxels_1000" / f"superpix-MIDDLE_{cid}.nii.gz", role="label").array
    n_pub = len(np.unique(pub[pub > 0]))
    # the defaults reproduce the published file: same body mask, (nearly) the same supervoxels
    sv = supervoxels_3d(vol.array, vol.spacing, min_size=1000)
    assert np.array_equal(sv > 0, pub > 0)
    assert abs(int(sv.max()) - n_pub) <= 3, (sv.max(), n_pub)  # seen: 30 and 30
