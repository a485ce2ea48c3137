"""The generator on several dataset roots at once (one generator for the CT and MR phantoms, each
with its own modality token) and under 2-process DDP."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from fsmis.config import load_config
from fsmis.data.phantom import make_phantom_dataset
from fsmis.engine import checkpoints as ck
from fsmis.engine.trainer import Trainer
from fsmis.models.presets import TINY_UNET, TINY_VAE

from _cli import ROOT, tool_env


@pytest.fixture(scope="module")
def two_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("phantoms")
    ct, mr = base / "ct", base / "mr"
    make_phantom_dataset(ct, modality="ct", n_cases=5, seed=3, shape=(8, 48, 48), supervoxels=True, progress=False)
    make_phantom_dataset(mr, modality="mr", n_cases=5, seed=4, shape=(8, 48, 48), supervoxels=True, progress=False)
    return ct, mr


def _config(tmp_path, roots, **train):
    raw = {"name": "gen", "method": "generator",
           "data": {"root": [str(r) for r in roots], "image_size": 32, "min_fg_pixels": 10, "fold": 0},
           "model": {"vae": dict(TINY_VAE), "unet": dict(TINY_UNET), "sample_steps": 2, "preview_steps": 2},
           "train": {"max_steps": 2, "batch_size": 4, "grad_accum": 1, "lr": 1e-3, "ckpt_every": 2, "val_every": 0,
                     "image_every": 0, "log_every": 1, "seed": 5, **train}}
    path = tmp_path / "gen.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_one_generator_for_ct_and_mr_with_their_modality_tokens(tmp_path, two_roots):
    ct, mr = two_roots
    cfg = load_config(_config(tmp_path, [ct, mr]))
    method = Trainer(cfg, tmp_path / "r", "cpu", progress=False).setup().method
    data = method.data
    mods = cfg.model.modalities
    # each root's training cases (fold 0: 5 cases -> queries 0, support and training cases, 1 validation)
    assert {di for di, _ in data.cases} == {0, 1}
    assert data.modality_idx == [mods.index("CT") + 1, mods.index("MR") + 1]
    # sampled items come from both datasets, and a batch's modality tokens follow the item's dataset
    rng = np.random.default_rng(0)
    seen = {data.sample(rng).dataset for _ in range(200)}
    assert seen == {0, 1}
    b = method.batch(0, 0)
    _, modality, _ = method.conditions(b, torch.Generator().manual_seed(0))
    for it, m, dropped in zip(b.items, modality.tolist(), b.drop_modality):
        assert m == (0 if dropped else data.modality_idx[it.dataset])


def test_generator_on_two_roots_trains_through_train_py(tmp_path, two_roots):
    cfg = _config(tmp_path, list(two_roots))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg), "--out", str(tmp_path / "run"),
                           "--quiet", "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, env=tool_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "run" / "data.json").read_text())
    assert [d["name"] for d in meta["datasets"]] == ["phantom_ct", "phantom_mr"]
    assert {int(d) for d, _ in meta["cases"]} == {0, 1}
    assert (tmp_path / "run" / "unet" / "generator.json").is_file()


def test_generator_trains_with_two_process_ddp(tmp_path, two_roots):
    ct, _ = two_roots
    cfg = _config(tmp_path, [ct])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
           str(ROOT / "train.py"), "--config", str(cfg), "--out", str(tmp_path / "ddp"), "--quiet", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=tool_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ck.read_index(tmp_path / "ddp")["last"] == "step_2"
    got = load_file(str(ck.resolve_checkpoint(tmp_path / "ddp", "last") / "model.safetensors"))
    init = Trainer(load_config(cfg), tmp_path / "init", "cpu", progress=False).setup().method.trained_state()
    assert got.keys() == init.keys()
    assert all(torch.isfinite(v).all() for v in got.values())
    assert any(not torch.equal(got[k], init[k]) for k in got)
    assert (tmp_path / "ddp" / "unet" / "generator.json").is_file()
