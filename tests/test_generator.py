"""The mask-conditioned latent diffusion generator (fsmis/genaug/generator.py) and its UNet as
SD-FSMIS's initialisation (model.unet_init), on a small phantom with a random tiny VAE."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from fsmis.config import ConfigError, load_config
from fsmis.data.phantom import make_phantom_dataset
from fsmis.engine import checkpoints as ck
from fsmis.engine.trainer import Trainer
from fsmis.models.presets import TINY_UNET, TINY_VAE
from fsmis.models.weights import WeightLoadError

from _cli import ROOT, tool_env


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "ct"
    make_phantom_dataset(out, modality="ct", n_cases=5, seed=3, shape=(8, 48, 48), supervoxels=True, progress=False)
    return out


def _gen_config(tmp_path, data, name="gen.yaml", **train):
    raw = {"name": "gen", "method": "generator",
           "data": {"root": str(data), "image_size": 32, "min_fg_pixels": 10, "fold": 0},
           "model": {"vae": dict(TINY_VAE), "unet": dict(TINY_UNET), "sample_steps": 4, "preview_steps": 2},
           "train": {"max_steps": 6, "batch_size": 3, "grad_accum": 1, "lr": 1e-3, "ckpt_every": 2, "val_every": 0,
                     "image_every": 3, "log_every": 1, "seed": 5, **train}}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_data):
    """A generator trained 6 steps through train.py (exported RUN/unet) and its random VAE saved as
    a diffusers folder, so that SD-FSMIS can be given the same VAE."""
    tmp = tmp_path_factory.mktemp("gen")
    cfg_path = _gen_config(tmp, tiny_data)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path), "--out",
                           str(tmp / "run"), "--quiet", "--device", "cpu"], capture_output=True, text=True,
                          cwd=ROOT, env=tool_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    from fsmis.engine.runs import load_run

    loaded = load_run(tmp / "run", "last", device="cpu")
    loaded.method.module.vae.save_pretrained(str(tmp / "vae"), safe_serialization=True)
    return {"dir": tmp, "run": tmp / "run", "vae": tmp / "vae", "cfg": cfg_path, "loaded": loaded}


def _method(tmp_path, data, **train):
    cfg = load_config(_gen_config(tmp_path, data, **train))
    return Trainer(cfg, tmp_path / "r", "cpu", progress=False).setup().method


# -- conditioning --------------------------------------------------------------------------------
def test_conditioning_shapes_and_each_drop(tmp_path, tiny_data):
    m = _method(tmp_path, tiny_data)
    b = m.batch(0, 0)
    n = m.cfg.train.batch_size
    b.drop_mask = np.array([True, False, False])
    b.drop_modality = np.array([False, True, False])
    b.drop_class = np.array([False, False, True])
    mask_lat, modality, klass = m.conditions(b, torch.Generator().manual_seed(0))
    assert mask_lat.shape == (n, 4, 16, 16)  # 32 px / VAE factor 2
    assert torch.all(mask_lat[0] == 0) and torch.any(mask_lat[1] != 0) and torch.any(mask_lat[2] != 0)
    ct = m.cfg.model.modalities.index("CT") + 1
    sv = m.cfg.model.classes.index("supervoxel") + 1
    assert modality.tolist() == [ct, 0, ct] and klass.tolist() == [sv, sv, 0]
    tokens = m.module.tokens(modality, klass)
    assert tokens.shape == (n, 2, TINY_UNET["cross_attention_dim"])
    assert torch.equal(tokens[1, 0], m.module.modality_embedding.weight[0])  # the dropped-token row
    assert torch.equal(tokens[2, 1], m.module.class_embedding.weight[0])
    # the UNet sees [noisy latent | mask latent] and predicts a latent-shaped noise
    eps = m.module.eps(torch.randn(n, 4, 16, 16), torch.tensor([1, 10, 500]), mask_lat, modality, klass)
    assert eps.shape == (n, 4, 16, 16) and m.module.unet.config.in_channels == 8
    # an item's mask is one region of the slice, of at least min_fg_pixels pixels
    it = b.items[0]
    region = m.data.regions[(it.dataset, it.case)][it.z] == it.region
    assert region.sum() >= 10 and it.case in {str(c) for c in m.data.datasets[0].case_ids}


def test_training_cases_leave_out_the_fold_queries_and_validation(tmp_path, tiny_data):
    from fsmis.methods.episodic import fold_split

    m = _method(tmp_path, tiny_data)
    fold, train, val = fold_split(load_config(_gen_config(tmp_path, tiny_data)), m.data.datasets[0])
    used = {c for _, c in m.data.cases}
    # the same training cases as SD-FSMIS's episodes (the support case is one of them): never a query
    # nor a validation case
    assert used == {str(c) for c in train} and not used & {str(c) for c in [*fold.queries, *val]}
    with pytest.raises(ConfigError, match="modality 'CT' is not in model.modalities"):
        Trainer(load_config(_gen_config(tmp_path, tiny_data), ["model.modalities=[MR]"]), tmp_path / "x", "cpu",
                progress=False).setup()


def test_label_conditioning_uses_the_class_tokens(tmp_path, tiny_data):
    cfg = load_config(_gen_config(tmp_path, tiny_data), ["data.labels=label"])
    m = Trainer(cfg, tmp_path / "r", "cpu", progress=False).setup().method
    ds = m.data.datasets[0]
    names = {m.cfg.model.classes.index(c) + 1: ds.class_id(c) for c in ds.test_classes}
    for items in m.data.items.values():
        for it in items:
            assert names[it.klass] == it.region  # the class token names the label id it masks


# -- sampling --------------------------------------------------------------------------------------
def test_seeded_sampling_is_deterministic(tmp_path, tiny_data):
    m = _method(tmp_path, tiny_data)
    items = [m.data.sample(np.random.default_rng(1)) for _ in range(2)]
    a = m.sample_items(items, torch.Generator().manual_seed(7), steps=3)
    b = m.sample_items(items, torch.Generator().manual_seed(7), steps=3)
    c = m.sample_items(items, torch.Generator().manual_seed(8), steps=3)
    assert a.shape == (2, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= -1 and float(a.max()) <= 1


def test_guidance_scale_mixes_conditional_and_unconditional_noise(tmp_path, tiny_data):
    """g = 1 is the conditional model alone; g = 0 the unconditional one (mask and tokens dropped)."""
    from fsmis.genaug.generator import ddim_sample

    m = _method(tmp_path, tiny_data)
    with torch.no_grad():  # make the conditioning matter for a random model
        m.module.unet.conv_in.weight[:, 4:] += 0.5
    items = [m.data.sample(np.random.default_rng(2)) for _ in range(2)]
    from fsmis.genaug.generator import _Batch

    z = np.zeros(2, bool)
    mask_lat, mod, cls = m.conditions(_Batch(items, z, z, z), sample=False)
    cfg = m.cfg.model
    g1 = ddim_sample(m.module, cfg, mask_lat, mod, cls, torch.Generator().manual_seed(0), 3, 1.0)
    g0 = ddim_sample(m.module, cfg, mask_lat, mod, cls, torch.Generator().manual_seed(0), 3, 0.0)
    unc = ddim_sample(m.module, cfg, torch.zeros_like(mask_lat), torch.zeros_like(mod), torch.zeros_like(cls),
                      torch.Generator().manual_seed(0), 3, 1.0)
    assert torch.allclose(g0, unc, atol=1e-5) and not torch.allclose(g1, unc, atol=1e-3)


def test_scheduler_round_trip_with_the_true_noise_gives_back_the_latent():
    """Noise a latent to the first DDIM timestep, then denoise it with an oracle that returns the
    true noise: DDIM (eta 0) lands on the clean latent."""
    from fsmis.genaug.generator import GeneratorConfig, ddim_loop, ddim_scheduler, ddpm_scheduler

    cfg = GeneratorConfig()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=gen)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    sched = ddim_scheduler(cfg, 20)
    t0 = sched.timesteps[0]
    xt = ddpm_scheduler(cfg).add_noise(x0, noise, torch.full((3,), int(t0)))
    out = ddim_loop(lambda x, t: noise, xt, sched)
    assert torch.allclose(out, x0, atol=1e-4), float((out - x0).abs().max())
    wrong = ddim_loop(lambda x, t: torch.zeros_like(x), xt, ddim_scheduler(cfg, 20))
    assert not torch.allclose(wrong, x0, atol=1e-2)


# -- training through train.py -----------------------------------------------------------------------
def test_generator_trains_through_train_py_and_exports_its_unet(trained):
    run = trained["run"]
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["method"] == "generator" and summary["steps"] == 6
    meta = json.loads((run / "unet" / "generator.json").read_text())
    assert meta["unet_in_channels"] == 8 and meta["latent_channels"] == 4 and meta["conditioning"] == "supervoxel"
    assert list((run / "tensorboard").iterdir())
    exported = load_file(str(run / "unet" / "diffusion_pytorch_model.safetensors"))
    last = load_file(str(ck.resolve_checkpoint(run, "last") / "model.safetensors"))
    for k, v in exported.items():
        assert torch.equal(v, last["unet." + k]), k


def test_generator_resumes_exactly_after_kill_9(tmp_path, tiny_data, trained):
    cfg_path = _gen_config(tmp_path, tiny_data, ckpt_every=1, image_every=0)
    run = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path), "--quiet", "--device", "cpu"]
    proc = subprocess.Popen([*cmd, "--out", str(run)], cwd=ROOT, env=tool_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        idx = ck.read_index(run) if (run / "checkpoints" / "index.json").is_file() else {}
        if idx.get("last") in ("step_2", "step_3", "step_4"):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = ck.read_index(run).get("last")
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(run), "--quiet", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, env=tool_env())
    assert res.returncode == 0, res.stderr[-2000:]
    ref = load_file(str(ck.resolve_checkpoint(trained["run"], "last") / "model.safetensors"))
    got = load_file(str(ck.resolve_checkpoint(run, "last") / "model.safetensors"))
    assert killed_at not in (None, "step_6") and ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


# -- the prior: SD-FSMIS from the generator's UNet ------------------------------------------------------
def _sd_cfg(trained, tiny_data, *extra):
    return load_config(None, [f"data.root={tiny_data}", "data.image_size=32", "data.min_fg_pixels=10",
                              f"model.vae_path={trained['vae']}", "model.vtct_encoder=none", "model.vtct_feat_dim=16",
                              "model.vtct_hidden=32", f"model.unet_init={trained['run']}", *extra])


@pytest.mark.parametrize("mode", ["surgery", "direct"])
def test_unet_init_loads_every_tensor_and_builds_the_input_convs(trained, tiny_data, mode):
    from fsmis.models.sd_fsmis import SDFSMIS

    cfg = _sd_cfg(trained, tiny_data, f"model.unet_init_conv_in={mode}")
    model, report = SDFSMIS.from_config(cfg.model)
    gen = load_file(str(trained["run"] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert report.unet.pretrained and report.unet.loaded == report.unet.expected == len(gen)
    assert report.ok and "unet_init" in " ".join(report.unet.notes)
    sd = model.unet.state_dict()
    for k, v in gen.items():
        if not k.startswith("conv_in."):
            assert torch.equal(sd[k], v), k
    w, b = gen["conv_in.weight"], gen["conv_in.bias"]
    want = torch.cat([w[:, :4], w[:, :4]], 1) / 2 if mode == "surgery" else w
    for conv in (model.conv_in_support, model.conv_in_query):
        assert torch.equal(conv.weight, want) and torch.equal(conv.bias, b)


def test_unet_init_fails_naming_a_removed_tensor(trained, tiny_data, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trained["run"] / "unet", bad)
    f = bad / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(f))
    gone = sorted(k for k in tensors if "attn1.to_k" in k)[0]
    del tensors[gone]
    save_file(tensors, str(f))
    from fsmis.models.sd_fsmis import SDFSMIS

    with pytest.raises(WeightLoadError, match=gone.replace(".", r"\.")):
        SDFSMIS.from_config(_sd_cfg(trained, tiny_data, f"model.unet_init={bad}").model)


def test_unet_init_refuses_another_vae_or_another_architecture(trained, tiny_data, tmp_path):
    from diffusers import AutoencoderKL

    from fsmis.models.sd_fsmis import SDFSMIS

    other = tmp_path / "other_vae"
    torch.manual_seed(123)
    AutoencoderKL(**TINY_VAE).save_pretrained(str(other), safe_serialization=True)
    with pytest.raises(ConfigError, match="give the same VAE"):
        SDFSMIS.from_config(_sd_cfg(trained, tiny_data, f"model.vae_path={other}").model)
    arch = dict(TINY_UNET, attention_head_dim=4)
    with pytest.raises(ConfigError, match="attention_head_dim"):
        SDFSMIS.from_config(_sd_cfg(trained, tiny_data, f"model.unet={json.dumps(arch)}").model)
    with pytest.raises(ConfigError, match="not a generator run"):
        SDFSMIS.from_config(_sd_cfg(trained, tiny_data, f"model.unet_init={tmp_path}").model)


def test_generate_from_arbitrary_masks_is_seeded_and_keeps_the_mask_size(trained):
    method = trained["loaded"].method
    masks = np.zeros((3, 40, 40), np.uint8)
    masks[0, 5:20, 5:20] = 1
    masks[1, 10:30, 12:25] = 1
    a = method.generate(masks, "CT", "supervoxel", torch.Generator().manual_seed(3), steps=3, chunk=2)
    b = method.generate(masks, "CT", "supervoxel", torch.Generator().manual_seed(3), steps=3, chunk=2)
    assert a.shape == (3, 40, 40) and a.dtype == np.float32 and np.array_equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    with pytest.raises(ValueError, match="'PET'"):
        method.generate(masks, "PET", None, torch.Generator().manual_seed(0), steps=2)


def test_widened_conv_in_computes_what_the_pretrained_one_did():
    from fsmis.genaug.generator import widen_conv_in

    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    wide = widen_conv_in(conv, 8)
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(wide(torch.cat([x, torch.randn(2, 4, 5, 5)], 1)), conv(x), atol=1e-6)


@pytest.mark.parametrize("name", ["generator_abd_ct", "generator_abd_mri", "generator_cmr"])
def test_benchmark_generator_configs_build_from_an_sd_folder(name, tiny_data, tmp_path):
    """The SD-1.5 benchmark configs, pointed at a random SD folder of the tiny preset (no weights
    can be downloaded here): SD's VAE and UNet load strictly, conv_in widened to 8 channels."""
    from _cli import run

    sd = tmp_path / "sd"
    proc = run([ROOT / "tools" / "make_random_sd.py", "--arch", "tiny", "--out", sd])
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run([ROOT / "train.py", "--config", ROOT / "configs" / f"{name}.yaml", "--dry-run", f"model.sd_path={sd}",
                f"data.root={tiny_data}", "data.image_size=32", "data.min_fg_pixels=10"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "conv_in widened 4 -> 8" in proc.stdout and "status: OK" in proc.stdout
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.method == "generator" and cfg.data.image_size == 256 and cfg.data.fold == 0
