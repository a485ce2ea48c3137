"""Synthetic image + mask cases from a trained generator (fsmis/genaug/synthesize.py,
tools/synthesize.py), on a tiny phantom with a generator trained 4 steps."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from fsmis.data.datasets import open_dataset
from fsmis.data.phantom import make_phantom_dataset
from fsmis.genaug import synthesize as S
from fsmis.models.presets import TINY_UNET, TINY_VAE

from _cli import ROOT, clean_error, run, tool_env

TOOL = ROOT / "tools" / "synthesize.py"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "ct"
    make_phantom_dataset(out, modality="ct", n_cases=5, seed=3, shape=(8, 48, 48), supervoxels=True, progress=False)
    return out


def _gen_config(tmp_path, data, vae, name="gen.yaml", **train):
    raw = {"name": "gen", "method": "generator",
           "data": {"root": str(data), "image_size": 32, "min_fg_pixels": 10, "fold": 0},
           "model": {"vae_path": str(vae), "unet": dict(TINY_UNET), "sample_steps": 2, "preview_steps": 2},
           "train": {"max_steps": 4, "batch_size": 3, "grad_accum": 1, "lr": 1e-3, "ckpt_every": 2, "val_every": 0,
                     "image_every": 0, "log_every": 1, "seed": 5, **train}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A generator trained 4 steps through train.py, in the latent space of a random tiny VAE saved
    as a diffusers folder (model.vae_path: the quality report finds it there)."""
    import torch
    from diffusers import AutoencoderKL

    tmp = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(str(tmp / "vae"), safe_serialization=True)
    cfg_path = _gen_config(tmp, tiny_data, tmp / "vae")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path), "--out",
                           str(tmp / "run"), "--quiet", "--device", "cpu"], capture_output=True, text=True,
                          cwd=ROOT, env=tool_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run"


@pytest.fixture(scope="module")
def synth(tmp_path_factory, trained, tiny_data):
    out = tmp_path_factory.mktemp("syn") / "a"
    summary = S.synthesize(trained, tiny_data, out, per_case=2, seed=1, steps=2, device="cpu", quality=False)
    return out, summary


def _arrays(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): np.asarray(nib.load(str(p)).dataobj)
            for p in sorted(folder.rglob("*.nii.gz"))}


def _training_cases(run_dir: Path) -> list[str]:
    ident = json.loads((run_dir / "data.json").read_text())
    return [str(c) for d, c in ident["cases"] if d == 0]


# -- (a) layout, block, sources, geometry ---------------------------------------------------------
def test_layout_block_sources_and_geometry(synth, trained, tiny_data):
    out, summary = synth
    src_ds = open_dataset(tiny_data)
    meta = json.loads((out / "dataset.json").read_text())
    block = meta["synthetic"]
    assert meta["name"] == f"{src_ds.name}_synthetic" and meta["modality"] == src_ds.modality
    assert meta["test_labels"] == list(src_ds.test_classes)
    assert meta["supervoxels"] == src_ds.supervoxel_dir.name
    assert block["checkpoint"] == str(Path(trained).resolve())
    assert (block["seed"], block["steps"], block["per_case"]) == (1, 2, 2)
    assert block["guidance"] == 2.0  # the run's model.guidance
    trained_cases = _training_cases(trained)
    ids = meta["case_ids"]
    assert len(ids) == 2 * len(trained_cases) == summary["cases"]
    assert summary["slices"] == 8 * len(ids)
    # sources are exactly the generator's training cases (never a fold query / validation case)
    assert sorted(set(block["sources"].values())) == sorted(trained_cases)
    assert all(list(block["sources"].values()).count(c) == 2 for c in trained_cases)
    assert not set(ids) & set(src_ds.case_ids) and all(i.isdigit() for i in ids)
    assert ids == sorted(ids, key=int) and set(block["edits"]) == set(ids)
    test_ids = {src_ds.class_id(c) for c in src_ds.test_classes}
    for cid in ids:
        src = block["sources"][cid]
        for kind, f_src, f_syn in (
                ("image", src_ds.image_path(src), out / f"image_{cid}.nii.gz"),
                ("label", src_ds.label_path(src), out / f"label_{cid}.nii.gz"),
                ("sv", src_ds.supervoxel_path(src), out / meta["supervoxels"] / f"superpix-MIDDLE_{cid}.nii.gz")):
            a, b = nib.load(str(f_src)), nib.load(str(f_syn))
            assert b.shape == a.shape and np.allclose(b.affine, a.affine), (kind, cid)
            if kind == "image":
                assert b.get_data_dtype() == np.float32
                src_img, syn_img = np.asarray(a.dataobj, np.float64), np.asarray(b.dataobj, np.float64)
                assert src_img.min() - 1e-3 <= syn_img.min() and syn_img.max() <= src_img.max() + 1e-3
            else:
                assert b.get_data_dtype() == a.get_data_dtype()
        lab = np.asarray(nib.load(str(out / f"label_{cid}.nii.gz")).dataobj)
        assert set(np.unique(lab).tolist()) - {0} <= test_ids and (lab > 0).any()
        edit = block["edits"][cid]
        assert edit["kind"] in S.EDIT_KINDS
    png = out / "samples.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "quality.json").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


# -- (b) seeds --------------------------------------------------------------------------------------
def test_same_seed_same_files_other_seed_other_images(synth, trained, tiny_data, tmp_path):
    out, _ = synth
    S.synthesize(trained, tiny_data, tmp_path / "b", per_case=2, seed=1, steps=2, device="cpu", quality=False)
    a, b = _arrays(out), _arrays(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert json.loads((out / "dataset.json").read_text()) == json.loads((tmp_path / "b" / "dataset.json").read_text())
    S.synthesize(trained, tiny_data, tmp_path / "c", per_case=1, seed=2, steps=2, device="cpu", quality=False)
    c = _arrays(tmp_path / "c")
    shared = [k for k in c if k.startswith("image_")]
    assert shared and all(k in a for k in shared)  # k = 0 ids are the same
    assert all(not np.array_equal(a[k], c[k]) for k in shared)


# -- (c) the edits ----------------------------------------------------------------------------------
def _disc(shape=(96, 96), center=(47.3, 48.4), radii=(26.0, 26.0), value=1):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    m = ((yy - center[0]) / radii[0]) ** 2 + ((xx - center[1]) / radii[1]) ** 2 <= 1
    return (m * value).astype(np.int16)


def _centroid(m):
    return np.argwhere(m > 0).mean(0)


def _draw(kind, shape=(96, 96), center=None, start=0):
    for s in range(start, start + 500):
        e = S.draw_edit(np.random.default_rng(s), shape, center)
        if e["kind"] == kind:
            return e
    raise AssertionError(kind)


def test_draw_edit_kinds_and_ranges():
    kinds = [S.draw_edit(np.random.default_rng([0, i, 0]), (48, 64))["kind"] for i in range(200)]
    assert set(kinds) == set(S.EDIT_KINDS) and min(kinds.count(k) for k in S.EDIT_KINDS) > 25
    for s in range(100):
        e = S.draw_edit(np.random.default_rng(s), (48, 64), (20.0, 30.0))
        json.dumps(e)
        if e["kind"] == "scale":
            assert 0.85 <= e["factor"] <= 1.15 and e["center"] == [20.0, 30.0]
        elif e["kind"] == "rotate":
            assert abs(e["degrees"]) <= 10
        elif e["kind"] == "translate":
            assert abs(e["dy"]) <= 0.08 * 48 and abs(e["dx"]) <= 0.08 * 64
        else:
            assert 2 <= e["amplitude"] <= 4 and e["sigma"] == pytest.approx(0.08 * 48)
    assert S.draw_edit(np.random.default_rng(7), (48, 64)) == S.draw_edit(np.random.default_rng(7), (48, 64))


def test_translate_shifts_the_centroid_by_the_drawn_amount():
    m = _disc()
    for start in (0, 100, 200):
        e = _draw("translate", start=start)
        out = S.apply_edit(m, e)
        shift = _centroid(out) - _centroid(m)
        assert np.abs(shift - [e["dy"], e["dx"]]).max() < 1.0, (shift, e)
        assert out.sum() == m.sum()  # a shift inside the frame keeps every pixel


def test_scale_changes_the_area_by_the_square_and_keeps_the_centre():
    m = _disc()
    c = S.foreground_center(m[None])
    for start in (0, 100, 200):
        e = _draw("scale", center=c, start=start)
        out = S.apply_edit(m, e)
        assert out.sum() / m.sum() == pytest.approx(e["factor"] ** 2, rel=0.05)
        assert np.abs(_centroid(out) - _centroid(m)).max() < 0.75
    # an explicit factor
    big = S.apply_edit(m, {"kind": "scale", "factor": 1.15, "center": list(c)})
    assert big.sum() / m.sum() == pytest.approx(1.15 ** 2, rel=0.05)


def _orientation(m):
    """Principal-axis angle (degrees, counter-clockwise as displayed: rows down)."""
    yx = np.argwhere(m > 0).astype(float)
    y, x = -(yx[:, 0] - yx[:, 0].mean()), yx[:, 1] - yx[:, 1].mean()
    return np.degrees(0.5 * np.arctan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean()))


def test_rotate_keeps_the_area_and_turns_by_the_drawn_angle():
    m = _disc(radii=(10.0, 26.0))  # an ellipse along x
    c = S.foreground_center(m[None])
    for start in (0, 100, 200):
        e = _draw("rotate", center=c, start=start)
        out = S.apply_edit(m, e)
        assert out.sum() / m.sum() == pytest.approx(1.0, rel=0.03)
        assert np.abs(_centroid(out) - _centroid(m)).max() < 0.75
        assert _orientation(out) - _orientation(m) == pytest.approx(e["degrees"], abs=1.5)


def test_elastic_moves_pixels_by_at_most_its_amplitude():
    from scipy.ndimage import distance_transform_edt

    m = _disc(radii=(20.0, 26.0))
    for start in (0, 100):
        e = _draw("elastic", start=start)
        field = S.elastic_field(e, m.shape)
        assert np.sqrt((field ** 2).sum(0)).max() == pytest.approx(e["amplitude"])
        out = S.apply_edit(m, e)
        assert not np.array_equal(out, m)
        # every output foreground pixel came from an input foreground pixel within the amplitude
        # (+ the nearest-neighbour rounding), and the same for background
        d_fg = distance_transform_edt(m == 0)
        d_bg = distance_transform_edt(m > 0)
        assert d_fg[out > 0].max() <= e["amplitude"] + 0.75
        assert d_bg[out == 0].max() <= e["amplitude"] + 0.75
    assert np.array_equal(S.elastic_field(e, m.shape), S.elastic_field(dict(e), m.shape))  # from its record


def test_apply_edit_keeps_ids_dtype_and_is_per_slice_identical():
    vol = np.stack([_disc(value=6), _disc(center=(30, 60), radii=(8, 8), value=1) + _disc(radii=(6, 6), value=3)])
    vol = vol.astype(np.int16)
    for kind in S.EDIT_KINDS:
        e = _draw(kind, center=S.foreground_center(vol))
        out = S.apply_edit(vol, e)
        assert out.dtype == vol.dtype and out.shape == vol.shape
        assert set(np.unique(out).tolist()) <= set(np.unique(vol).tolist())
        for z in range(2):  # the same in-plane map on every slice
            assert np.array_equal(out[z], S.apply_edit(vol[z], e))


def test_case_ids_never_collide_with_the_sources():
    assert S.id_base([str(i) for i in range(30)]) == 1000
    assert S.id_base(["1", "2", "1500"]) == 10000
    assert S.id_base([f"c{i}" for i in range(1200)]) == 10000
    ids = {S.synthetic_case_id(i, k, 1000) for i in range(30) for k in range(5)}
    assert len(ids) == 150 and min(map(int, ids)) >= 1000


# -- (d) an ordinary dataset ------------------------------------------------------------------------
def test_opens_as_a_dataset_and_is_evaluated_by_the_canonical_evaluator(synth):
    from fsmis.evaluation.protocol import ProtocolConfig, evaluate
    from fsmis.methods.base import build_predictor

    out, _ = synth
    ds = open_dataset(out)
    meta = json.loads((out / "dataset.json").read_text())
    assert ds.case_ids == meta["case_ids"] and ds.supervoxel_dir.name == meta["supervoxels"]
    full = []
    for cid in ds.case_ids:
        case = ds.load_case(cid, supervoxels=True)
        assert case.supervoxels.shape == case.label.shape == case.image.shape
        if all(len(ds.class_slices(cid, c)) for c in ds.test_classes):
            full.append(cid)
    assert full, "no synthetic case holds every test class"
    support = full[0]
    queries = [c for c in ds.case_ids if c != support]
    res = evaluate(ds, build_predictor("support-copy"),
                   ProtocolConfig(support_case=support, query_cases=queries, surface_metrics=False), progress=False)
    assert res["folds"][0]["support"] == support and 0.0 <= res["mean_dice"] <= 1.0


# -- (e) refusals -----------------------------------------------------------------------------------
def test_library_refuses_a_dataset_the_generator_did_not_train_on(trained, tmp_path):
    other = tmp_path / "other"
    make_phantom_dataset(other, modality="ct", n_cases=2, seed=4, shape=(4, 32, 32), supervoxels=False,
                         progress=False)
    with pytest.raises(S.SynthesisError, match="not the generator's training dataset"):
        S.synthesize(trained, other, tmp_path / "o", per_case=1, steps=1, device="cpu", quality=False)
    assert not (tmp_path / "o").exists()
    # explicitly named cases are allowed, and recorded as outside the generator's training cases
    S.synthesize(trained, other, tmp_path / "o", per_case=1, steps=1, device="cpu", quality=False, cases=["1"])
    block = json.loads((tmp_path / "o" / "dataset.json").read_text())["synthetic"]
    assert block["sources"] == {"1001": "1"} and block["selection"] == "explicit (--cases)"
    assert "supervoxels" not in json.loads((tmp_path / "o" / "dataset.json").read_text())
    with pytest.raises(S.SynthesisError, match="not empty"):
        S.synthesize(trained, other, tmp_path / "o", per_case=1, steps=1, device="cpu", quality=False, cases=["1"])


def test_cli_refusals(trained, tiny_data, tmp_path):
    inside = tiny_data / "synth"
    p = run([TOOL, "--checkpoint", trained, "--data", tiny_data, "--out", inside, "--per-case", "1", "--quiet",
             "--no-quality"])
    clean_error(p, str(inside), "inside the data folder")
    assert not inside.exists()
    p = run([TOOL, "--checkpoint", trained, "--data", tiny_data, "--out", tiny_data, "--per-case", "1", "--quiet"])
    clean_error(p, "the data folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    p = run([TOOL, "--checkpoint", empty, "--data", tiny_data, "--out", out, "--per-case", "1", "--quiet",
             "--no-quality", "--device", "cpu"])
    clean_error(p, str(empty), "not a trained run")
    assert not out.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["empty"]
    p = run([TOOL, "--checkpoint", trained, "--data", tiny_data, "--out", out, "--per-case", "0"])
    clean_error(p, "--per-case")


# -- (f) the CLI with quality ------------------------------------------------------------------------
def test_cli_writes_the_folder_and_its_quality(trained, tiny_data, tmp_path):
    out = tmp_path / "q"
    p = run([TOOL, "--checkpoint", trained, "--data", tiny_data, "--out", out, "--per-case", "1", "--steps", "2",
             "--seed", "3", "--device", "cpu", "--quiet"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "synthetic cases" in p.stdout and "slices generated" in p.stdout and "quality.json" in p.stdout
    q = json.loads((out / "quality.json").read_text())
    assert any(k.startswith("fid_") for k in q) and isinstance(q["memorisation"], dict)
    ds = open_dataset(out)
    assert len(ds.case_ids) == len(_training_cases(trained))


def test_an_interrupted_run_leaves_the_output_folder_as_it_was(trained, tiny_data, tmp_path, monkeypatch):
    import fsmis.data.nifti as nifti

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    real_save, calls = nifti.save_like, []

    def save_then_stop(*a, **kw):
        calls.append(a[2])
        if len(calls) == 4:  # the second synthetic case's image
            raise KeyboardInterrupt
        return real_save(*a, **kw)

    monkeypatch.setattr(nifti, "save_like", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        S.synthesize(trained, tiny_data, out, per_case=2, steps=1, device="cpu", quality=False, overwrite=True)
    assert len(calls) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
