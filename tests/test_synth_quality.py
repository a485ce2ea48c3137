"""The synthetic-data quality report (fsmis/genaug/quality.py, tools/synth_quality.py) on a tiny
phantom (5 cases of 8x48x48) with hand-made synthetic folders and a random tiny VAE."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fsmis.data.datasets import open_dataset
from fsmis.data.nifti import DataError
from fsmis.data.normalize import normalize_volume
from fsmis.data.phantom import make_phantom_dataset
from fsmis.genaug import quality as Q

from _cli import clean_error, run

SHAPE = (8, 48, 48)


def _write_synthetic(out: Path, real: Path, image_fn, checkpoint=None, label_fn=None, sources=None) -> Path:
    """A synthetic folder made by hand: case 100+i from real case i, image image_fn(i, real image);
    the functions see the arrays as nibabel stores them ([X, Y, Z])."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    meta = json.loads((real / "dataset.json").read_text())
    meta.pop("supervoxels", None)
    srcs = {}
    for i in range(5):
        im = nib.load(real / f"image_{i}.nii.gz")
        lab = nib.load(real / f"label_{i}.nii.gz")
        img = image_fn(i, np.asarray(im.dataobj, np.float32))
        lbl = np.asarray(lab.dataobj).astype(np.int16)
        if label_fn is not None:
            lbl = label_fn(i, lbl)
        nib.save(nib.Nifti1Image(np.asarray(img, np.float32), im.affine), out / f"image_{100 + i}.nii.gz")
        nib.save(nib.Nifti1Image(lbl, lab.affine), out / f"label_{100 + i}.nii.gz")
        srcs[str(100 + i)] = str(i)
    meta["synthetic"] = {"checkpoint": checkpoint, "sources": sources if sources is not None else srcs}
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


def _noise(i, shape, sigma=2.0):
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.random.default_rng(1000 + i).normal(size=shape), sigma)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import diffusers

    from fsmis.models.presets import TINY_VAE

    root = tmp_path_factory.mktemp("quality")
    real = root / "real"
    other = root / "other"
    make_phantom_dataset(real, modality="ct", n_cases=5, seed=3, shape=SHAPE, supervoxels=False, progress=False)
    make_phantom_dataset(other, modality="ct", n_cases=5, seed=4, shape=SHAPE, supervoxels=False, progress=False)
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae")
    copy = _write_synthetic(root / "copy", real, lambda i, a: a)
    report = Q.quality_report(real, copy, vae=root / "vae", device="cpu")
    return {"root": root, "real": real, "other": other, "vae": root / "vae", "copy": copy, "copy_report": report}


# -- the building blocks ------------------------------------------------------------------------------
def test_vectorised_ssim_matches_skimage(env):
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    ds = [open_dataset(env["real"]).load_case(str(i)).image.astype(np.float64) for i in (0, 1)]
    vols = [(v - v.min()) / (v.max() - v.min()) for v in ds]
    x = np.stack([vols[0][2], vols[0][5], vols[1][3], np.clip(_noise(0, (48, 48), 1.5) + 0.5, 0, 1)])
    y = np.stack([vols[1][2], vols[0][5], rng.random((48, 48)), vols[1][6], vols[0][0]])
    ref = np.array([[structural_similarity(a, b, data_range=1.0) for b in y] for a in x])
    got = Q.ssim_matrix(x, y)
    assert np.abs(got - ref).max() < 1e-6
    assert np.abs(Q.ssim_pairs(x, y[:4]) - np.diag(ref[:, :4])).max() < 1e-6
    # a small budget (many blocks) gives the same matrix
    assert np.abs(Q.ssim_matrix(x, y, budget=2000) - ref).max() < 1e-6
    assert got[1, 1] == 1.0  # identical slices


def test_kid_matches_direct_computation():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.3, 1.0, size=(9, 5))
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    def direct(a, b):
        m, n = len(a), len(b)
        sxx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        syy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        sxy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
        return sxx + syy - 2 * sxy

    assert Q.mmd2_unbiased(x, y) == pytest.approx(direct(x, y), rel=1e-10, abs=1e-12)
    # subsets: the mean of the direct estimate over the same seeded subsets
    res = Q.kid(x, y, n_subsets=7, subset_size=6, seed=5)
    r = np.random.default_rng(5)
    vals = []
    for _ in range(7):
        ix, iy = r.choice(12, 6, replace=False), r.choice(9, 6, replace=False)
        vals.append(direct(x[ix], y[iy]))
    assert res["mean"] == pytest.approx(np.mean(vals), rel=1e-10, abs=1e-12)
    assert res["std"] == pytest.approx(np.std(vals), rel=1e-8, abs=1e-12)
    assert res["subset_size"] == 6
    # equal sizes and a full subset: every subset is a permutation, the value is the full estimate
    assert Q.kid(x[:9], y, n_subsets=3, subset_size=100)["mean"] == pytest.approx(direct(x[:9], y), rel=1e-10)
    with pytest.raises(ValueError):
        Q.kid(x[:1], y)


def test_fid_and_kid_grow_with_noise(env):
    from fsmis.genaug.quality import VAEFeatures, load_vae_folder

    ex = VAEFeatures(load_vae_folder(env["vae"]), "tiny", 64, device="cpu")
    imgs = [open_dataset(env["real"]).load_case(str(i)).image for i in range(5)]
    real = np.concatenate([ex(normalize_volume(v, "minmax")) for v in imgs])
    assert real.shape == (40, 64)
    fids, kids = [], []
    for level in (0.0, 0.05, 0.15, 0.4):
        fake = np.concatenate([ex(normalize_volume(v + level * 255 * np.random.default_rng(i).normal(size=v.shape),
                                                   "minmax")) for i, v in enumerate(imgs)])
        fids.append(Q.fid(real, fake))
        kids.append(Q.kid(real, fake)["mean"])
    assert abs(fids[0]) < 1e-6 and abs(kids[0]) < 0.2 * kids[1], (fids, kids)
    assert fids[1] < fids[2] < fids[3], fids
    assert kids[1] < kids[2] < kids[3], kids


# -- the report -----------------------------------------------------------------------------------
def test_exact_copy(env):
    r = env["copy_report"]
    assert "fid" not in r and "kid" not in r
    assert abs(r["fid_vae"]) < 1e-4 and abs(r["kid_vae"]) < 1e-3, (r["fid_vae"], r["kid_vae"])
    assert r["n_real_slices"] == r["n_synthetic_slices"] == 40
    assert "AutoencoderKL" in r["extractors"]["vae"]["description"]
    assert r["ssim"] == pytest.approx(1.0) and r["psnr"] == Q.PSNR_CAP
    assert set(r["per_case"]) == {"100", "101", "102", "103", "104"}
    assert r["per_case"]["102"]["source"] == "2" and r["per_case"]["102"]["psnr"] == Q.PSNR_CAP
    md = r["mask_dice"]
    assert md["segmenter"].startswith("support-copy") and md["mean"] == pytest.approx(1.0) and md["slices"] > 0
    assert set(md["per_class"]) == {"liver", "spleen", "left_kidney", "right_kidney"}
    m = r["memorisation"]
    assert m["n_slices"] == 40 and len(m["nearest_ssim"]) == 40 and m["flagged_fraction"] == 1.0
    assert m["threshold"] < 1.0 and "100:0" in m["flagged"]
    assert "100 dB" in r["definitions"]["psnr"] and set(r["definitions"]) >= {"fid_vae", "kid_vae", "ssim", "psnr",
                                                                              "mask_dice", "memorisation"}
    assert r["checkpoint"] is None and r["generator"] is None and r["seconds"] > 0
    json.dumps(r, allow_nan=False)  # plain JSON


def test_unrelated_images_are_not_flagged(env):
    root, real = env["root"], env["real"]
    other = _write_synthetic(root / "seed4", real, lambda i, a: np.asarray(
        nib.load(env["other"] / f"image_{i}.nii.gz").dataobj, np.float32))
    r = Q.quality_report(real, other, vae=env["vae"], device="cpu")
    assert r["memorisation"]["flagged_fraction"] <= 0.1, r["memorisation"]
    assert r["ssim"] < 0.9 and r["psnr"] < 40
    assert r["fid_vae"] > abs(env["copy_report"]["fid_vae"])
    noise = _write_synthetic(root / "noise", real, lambda i, a: _noise(i, a.shape))
    r = Q.quality_report(real, noise, vae=env["vae"], device="cpu")
    assert r["memorisation"]["flagged_fraction"] <= 0.1, r["memorisation"]


def test_generator_run_vae_and_dinov2(env):
    from transformers import Dinov2Config, Dinov2Model

    root = env["root"]
    run_dir = root / "gen_run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "config.yaml").write_text(f"method: generator\nmodel:\n  vae_path: {env['vae']}\n  unet: tiny\n"
                                         "data:\n  image_size: 32\n")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(root / "dino")
    syn = _write_synthetic(root / "from_run", env["real"], lambda i, a: a[::-1].copy(), checkpoint=str(run_dir))
    r = Q.quality_report(env["real"], syn, dinov2=root / "dino", device="cpu")
    assert {"fid_vae", "kid_vae", "fid_dinov2", "kid_dinov2"} <= set(r)
    assert "32 px" in r["extractors"]["vae"]["description"] and "generator run" in r["extractors"]["vae"]["description"]
    assert r["extractors"]["dinov2"]["features"] == 32 and r["generator"] == str(run_dir)
    assert np.isfinite(r["fid_dinov2"]) and np.isfinite(r["kid_dinov2"])


def test_refusals(env):
    root, real = env["root"], env["real"]
    # no extractor at all
    with pytest.raises(DataError, match="no feature extractor"):
        Q.quality_report(real, env["copy"], device="cpu")
    # no synthetic block
    plain = _write_synthetic(root / "plain", real, lambda i, a: a)
    meta = json.loads((plain / "dataset.json").read_text())
    del meta["synthetic"]
    (plain / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="synthetic") as e:
        Q.quality_report(real, plain, vae=env["vae"])
    assert str(plain / "dataset.json") in str(e.value)
    # a source id that is not a case of the real folder
    bad = _write_synthetic(root / "badsrc", real, lambda i, a: a,
                           sources={"100": "0", "101": "1", "102": "2", "103": "3", "104": "77"})
    with pytest.raises(DataError, match="77") as e:
        Q.quality_report(real, bad, vae=env["vae"])
    assert "dataset.json" in str(e.value)
    # a shape mismatch with the source
    short = _write_synthetic(root / "short", real, lambda i, a: a[..., :6],
                             label_fn=lambda i, lab: lab[..., :6])  # stored [X, Y, Z]: 6 of the 8 slices
    with pytest.raises(DataError, match="differs from its source") as e:
        Q.quality_report(real, short, vae=env["vae"])
    assert "image_100" in str(e.value)


# -- the command line -----------------------------------------------------------------------------
def test_cli_writes_and_refuses(env, tmp_path):
    out = tmp_path / "q" / "quality.json"
    proc = run(["tools/synth_quality.py", "--real", env["real"], "--synthetic", env["copy"], "--out", out,
                "--vae", env["vae"], "--device", "cpu", "--quiet"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["memorisation"]["flagged_fraction"] == 1.0 and "fid_vae" in r and "fid" not in r
    assert [p.name for p in out.parent.iterdir()] == ["quality.json"]  # no temporary file left

    plain = env["root"] / "plain_cli"
    _write_synthetic(plain, env["real"], lambda i, a: a)
    meta = json.loads((plain / "dataset.json").read_text())
    del meta["synthetic"]
    (plain / "dataset.json").write_text(json.dumps(meta))
    out2 = tmp_path / "r" / "quality.json"
    proc = run(["tools/synth_quality.py", "--real", env["real"], "--synthetic", plain, "--out", out2,
                "--vae", env["vae"], "--quiet"], timeout=600)
    clean_error(proc, plain / "dataset.json", "synthetic")
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not out2.exists() and not (out2.parent.exists() and any(out2.parent.iterdir()))
    proc = run(["tools/synth_quality.py", "--help"])
    assert proc.returncode == 0 and "--synthetic" in proc.stdout and "memorisation" in proc.stdout
