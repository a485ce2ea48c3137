"""The CPU demo's small VAE (fsmis.models.demo_vae, tools/train_vae.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fsmis.data.phantom import make_phantom_dataset
from fsmis.models import demo_vae as dv

REPO = Path(__file__).resolve().parents[1]
# tiny: 32 px slices, 16 px crops (the demo: 128 / 64)
TINY = dict(image_size=32, crop=16, steps=3, batch_size=4, lr=1e-3, seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: under ``pytest -n 2`` two workers with two OpenMP threads each on two
    cores spend most of their time waiting on each other (measured 3x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("vae") / "ct", "ct", n_cases=2, seed=0, shape=(8, 64, 64),
                                progress=False, supervoxels=False)


def _train(data, out=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the label-mask fallback warning (no supervoxels here)
        return dv.train_demo_vae(data, out, progress=False, return_model=True, **{**TINY, **kw})


def test_config_is_factor_4_with_sd_scaling():
    vae = dv.build_demo_vae(0)
    assert dv.DOWNSAMPLING_FACTOR == 4
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert vae.config.latent_channels == 4
    z = vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mean
    assert tuple(z.shape) == (1, 4, 32, 32)
    n = sum(p.numel() for p in vae.parameters())
    assert 0.8e6 < n < 1.1e6


def test_train_save_load_report(tiny_dir, tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "vae"
    with pytest.warns(UserWarning, match="label masks"):
        rep = dv.train_demo_vae(tiny_dir, out, progress=False, return_model=True, **TINY)
    assert rep["train"]["steps_done"] == 3 and rep["train"]["mask_source"] == "labels"
    ev = rep["eval"]
    for key in ("dice", "dice_slice", "dice_pooled", "dice_per_case", "psnr_db", "mean_dice"):
        assert key in ev
    assert set(ev["dice"]) == {"liver", "spleen", "left_kidney", "right_kidney"}
    assert all(0.0 <= v <= 1.0 for v in ev["dice"].values())
    assert np.isfinite(ev["psnr_db"])
    # saved folder: loadable offline, same weights, report on disk
    assert dv.is_demo_vae_folder(out)
    assert not list(tmp_path.glob(".vae.tmp-*"))  # no temporary leftovers
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    on_disk = json.loads((out / dv.REPORT_NAME).read_text())
    assert on_disk["eval"]["dice"] == pytest.approx(ev["dice"])
    assert "_model" not in on_disk and "eval_by_dataset" not in on_disk
    assert on_disk["data"]["sha256"] == dv.data_fingerprint(tiny_dir)["sha256"]
    loaded = AutoencoderKL.from_pretrained(out, local_files_only=True)
    # the saved scaling factor gives the training images' latents unit variance
    assert loaded.config.scaling_factor == pytest.approx(rep["scaling_factor"])
    assert rep["scaling_factor"] == pytest.approx(1.0 / rep["latent_std"])
    from fsmis.data.datasets import open_dataset

    ds = open_dataset(tiny_dir)
    frames = np.concatenate([dv._prep_image(ds.load_case(c).image, TINY["image_size"])[::dv.LATENT_STD_STRIDE]
                             for c in ds.case_ids])
    with torch.no_grad():
        z = loaded.encode(torch.from_numpy(frames)[:, None].expand(-1, 3, -1, -1)).latent_dist.mean
    assert float((z * loaded.config.scaling_factor).std()) == pytest.approx(1.0, rel=1e-3)
    sd0, sd1 = rep["_model"].state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    # saving again over an existing folder replaces it atomically
    _train(tiny_dir, out, evaluate=False, seed=1)
    assert json.loads((out / dv.REPORT_NAME).read_text())["train"]["seed"] == 1


def test_deterministic_for_a_seed(tiny_dir):
    a = _train(tiny_dir, evaluate=False)["_model"].state_dict()
    b = _train(tiny_dir, evaluate=False)["_model"].state_dict()
    c = _train(tiny_dir, evaluate=False, seed=1)["_model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_global_rng_untouched(tiny_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _train(tiny_dir, evaluate=False, steps=1)
    assert torch.equal(torch.rand(3), expected)


def test_cache_reused_and_keyed(tiny_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    kw = {**TINY, "steps": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        first = dv.ensure_demo_vae(tiny_dir, cache, progress=False, **kw)
    assert first.parent == cache and first.name == dv.demo_vae_key(tiny_dir, **kw)
    weights = first / "diffusion_pytorch_model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert json.loads((first / dv.REPORT_NAME).read_text())["cache_key"] == first.name

    def no_training(*a, **k):
        raise AssertionError("retrained although the cache was current")

    monkeypatch.setattr(dv, "train_demo_vae", no_training)
    again = dv.ensure_demo_vae(tiny_dir, cache, progress=False, **kw)
    assert again == first and weights.stat().st_mtime_ns == mtime
    # progress does not change the key; every training argument does
    assert dv.demo_vae_key(tiny_dir, progress=True, **kw) == first.name
    for change in ({"steps": 3}, {"seed": 1}, {"lr": 2e-3}, {"crop": 8}, {"image_size": 64}, {"batch_size": 6},
                   {"masks": "labels"}):
        assert dv.demo_vae_key(tiny_dir, **{**kw, **change}) != first.name, change
    with pytest.raises(TypeError):
        dv.demo_vae_key(tiny_dir, stepz=3)
    # an incomplete entry (no report) is not reused
    (first / dv.REPORT_NAME).unlink()
    assert not dv.is_demo_vae_folder(first, first.name)
    with pytest.raises(AssertionError, match="retrained"):
        dv.ensure_demo_vae(tiny_dir, cache, progress=False, **kw)


def test_key_follows_the_data(tiny_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    assert dv.demo_vae_key(copy, **TINY) == dv.demo_vae_key(tiny_dir, **TINY)  # content, not location
    meta = json.loads((copy / "dataset.json").read_text())
    meta["test_labels"] = ["liver"]
    (copy / "dataset.json").write_text(json.dumps(meta))
    assert dv.demo_vae_key(copy, **TINY) != dv.demo_vae_key(tiny_dir, **TINY)


def test_supervoxel_masks_are_used_when_present(tiny_dir, tmp_path):
    """With a supervoxel folder, training masks come from it (no organ labels)."""
    import shutil

    from fsmis.data.datasets import open_dataset
    from fsmis.data.nifti import atomic_save_nifti
    from fsmis.data.phantom import affine_for

    copy = tmp_path / "sv"
    shutil.copytree(tiny_dir, copy)
    ds = open_dataset(copy)
    (copy / "supervoxels_1").mkdir()
    for cid in ds.case_ids:
        case = ds.load_case(cid)
        sv = np.zeros(case.image.shape, np.int16)
        sv[:, 8:40, 8:40], sv[:, 30:60, 20:50] = 1, 2  # nothing to do with the organs
        atomic_save_nifti(np.transpose(sv, (2, 1, 0)), affine_for(case.spacing),
                          copy / "supervoxels_1" / f"superpix-MIDDLE_{cid}.nii.gz", dtype=np.int16)
    ds = open_dataset(copy)
    data = dv._TrainData([ds], 32, [dv._mask_source(ds, "auto")])
    assert dv._mask_source(ds, "auto") == "supervoxels"
    assert set(np.unique(np.concatenate([m.ravel() for m in data.maps]))) <= {0, 1, 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no label-fallback warning
        rep = dv.train_demo_vae(ds, None, progress=False, evaluate=False, **{**TINY, "steps": 1})
    assert rep["train"]["mask_source"] == "supervoxels"


def test_training_beats_a_random_vae(tiny_dir):
    """100 small steps (about 7 s) already reconstruct the organ masks far better than random weights.

    Measured: random 0.03 mean 3D Dice, trained 0.42 (liver 0.88, spleen 0.35, kidneys ~0.2) at 64 px.
    """
    random_dice = dv.evaluate_vae(dv.build_demo_vae(0), tiny_dir, image_size=64)["mean_dice"]
    rep = _train(tiny_dir, image_size=64, crop=32, steps=100, batch_size=4, lr=3e-3)
    trained = rep["eval"]["mean_dice"]
    assert random_dice < 0.1, random_dice
    assert trained > random_dice + 0.25, (random_dice, trained)
    assert rep["eval"]["dice"]["liver"] > 0.7, rep["eval"]["dice"]


def test_cli_help_and_run(tiny_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "tools/train_vae.py", "--help"], cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "--steps" in r.stdout and "--image-size" in r.stdout
    out = tmp_path / "cache"
    cmd = [sys.executable, "tools/train_vae.py", "--data", str(tiny_dir), "--out", str(out), "--cache",
           "--image-size", "32", "--crop", "16", "--steps", "2", "--batch-size", "4", "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "3D Dice" in r.stdout and "liver" in r.stdout and "wrote" in r.stdout
    r2 = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert r2.returncode == 0 and "reusing" in r2.stdout


@pytest.fixture(scope="module")
def tiny_mr_dir(tmp_path_factory):
    return make_phantom_dataset(tmp_path_factory.mktemp("vae_mr") / "mr", "mr", n_cases=2, seed=1, shape=(8, 64, 64),
                                progress=False, supervoxels=False)


def test_several_datasets(tiny_dir, tiny_mr_dir, tmp_path):
    """CT + MR together: one model, evaluated on each; the key covers every dataset."""
    both = [tiny_dir, tiny_mr_dir]
    assert dv.demo_vae_key(both, **TINY) != dv.demo_vae_key(tiny_dir, **TINY)
    assert dv.demo_vae_key([tiny_dir], **TINY) == dv.demo_vae_key(tiny_dir, **TINY)
    assert dv.demo_vae_key(both, **TINY) != dv.demo_vae_key(both[::-1], **TINY)
    rep = _train(both)
    assert set(rep["eval_by_dataset"]) == {"phantom_ct", "phantom_mr"}
    assert rep["eval"] == rep["eval_by_dataset"]["phantom_ct"]
    assert rep["train"]["mask_sources"] == {"phantom_ct": "labels", "phantom_mr": "labels"}
    assert len(rep["data"]["datasets"]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        folder = dv.ensure_demo_vae(both, tmp_path / "cache", progress=False, **{**TINY, "steps": 1})
    assert folder.name == dv.demo_vae_key(both, **{**TINY, "steps": 1})
