"""Training engine: config overrides, checkpoints, exact resume, crash safety, DDP on CPU, the
SD-FSMIS predictor through test.py."""
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
from safetensors.torch import load_file

from fsmis.config import ConfigError, load_config, save_config
from fsmis.data.phantom import make_phantom_dataset
from fsmis.engine import checkpoints as ck
from fsmis.engine.trainer import Trainer
from _tiny_sd import TINY

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "ct"
    make_phantom_dataset(out, modality="ct", n_cases=5, seed=3, shape=(10, 48, 48), supervoxels=True,
                         progress=False)
    return out


def _config(tmp_path, data, **over):
    cfg_path = tmp_path / "tiny.yaml"
    import yaml

    raw = {"name": "tiny",
           "data": {"root": str(data), "image_size": 32, "min_fg_pixels": 10, "n_val": 1},
           "model": {"unet": TINY["unet"], "vae": TINY["vae"], "vtct_encoder": "none", "vtct_hidden": 16,
                     "vtct_depth": 1, "vtct_feat_dim": 16},
           "train": {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "ckpt_every": 2,
                     "val_every": 0, "image_every": 0, "log_every": 1, "seed": 5}}
    cfg_path.write_text(yaml.safe_dump(raw))
    return cfg_path


def _weights(run):
    return load_file(str(ck.resolve_checkpoint(run, "last") / "model.safetensors"))


def test_config_overrides_and_saved_copy(tmp_path, tiny_data):
    cfg = load_config(_config(tmp_path, tiny_data), ["train.max_steps=7", "train.seed=3", "model.vtct_encoder=none"])
    assert cfg.train.max_steps == 7 and cfg.train.seed == 3
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match="max_stepz"):
        load_config(_config(tmp_path, tiny_data), ["train.max_stepz=1"])


def test_resume_continues_to_identical_weights(tmp_path, tiny_data):
    cfg = load_config(_config(tmp_path, tiny_data))
    a = Trainer(cfg, tmp_path / "a", "cpu", progress=False).setup()
    a.fit()
    # interrupted run: two steps, a checkpoint, then a fresh process-like restart
    b = Trainer(cfg, tmp_path / "b", "cpu", progress=False).setup()
    b.train_step()
    b.train_step()
    b.save()
    (tmp_path / "b" / "checkpoints" / ".tmp-step_3-crash").mkdir()  # debris of a crash mid-write
    c = Trainer(cfg, tmp_path / "b", "cpu", progress=False).setup()
    assert c.resume() == 2
    c.fit()
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert not list((tmp_path / "b" / "checkpoints").glob(".tmp-*"))
    idx = ck.read_index(tmp_path / "b")
    assert idx["last"] == "step_4"
    # and the weights did change from the initialisation
    fresh = Trainer(cfg, tmp_path / "c", "cpu", progress=False).setup().model.trainable_state_dict()
    assert any(not torch.equal(fresh[k], wa[k]) for k in wa)


def test_grad_checkpointing_switch_trains_to_the_same_weights(tmp_path, tiny_data):
    """train.grad_checkpointing=true (a memory switch) follows the plain run: same losses and,
    after 4 steps of AdamW, the same weights within float32 re-computation noise."""
    runs = {}
    for name, flag in (("plain", "false"), ("ckpt", "true")):
        cfg = load_config(_config(tmp_path, tiny_data), [f"train.grad_checkpointing={flag}"])
        tr = Trainer(cfg, tmp_path / name, "cpu", progress=False).setup()
        assert tr.model.unet.is_gradient_checkpointing == (flag == "true")
        losses = [tr.train_step()["loss"] for _ in range(4)]
        runs[name] = (losses, tr.model.trainable_state_dict())
    (la, wa), (lb, wb) = runs["plain"], runs["ckpt"]
    np.testing.assert_allclose(la, lb, rtol=1e-4)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5, msg=lambda m: f"{k}: {m}")
    fresh = Trainer(load_config(_config(tmp_path, tiny_data)), tmp_path / "init", "cpu",
                    progress=False).setup().model.trainable_state_dict()
    assert any(not torch.equal(fresh[k], wa[k]) for k in wa)  # training moved the weights


def test_kill_9_then_resume_matches_uninterrupted(tmp_path, tiny_data):
    cfg_path = _config(tmp_path, tiny_data)
    common = [sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path), "--quiet", "--device", "cpu",
              "train.max_steps=6", "train.ckpt_every=1"]
    ref = subprocess.run(common + ["--out", str(tmp_path / "ref")], capture_output=True, text=True, cwd=ROOT)
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "run"
    proc = subprocess.Popen(common + ["--out", str(run)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        idx = ck.read_index(run) if (run / "checkpoints" / "index.json").is_file() else {}
        if idx.get("last") in ("step_2", "step_3", "step_4"):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "train_summary.json").exists() or ck.read_index(run)["last"] == "step_6"
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(run), "--quiet", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    wa, wb = _weights(tmp_path / "ref"), _weights(run)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_checkpoint_layout_and_strict_reload(tmp_path, tiny_data):
    cfg = load_config(_config(tmp_path, tiny_data), ["train.max_steps=2", "train.ckpt_every=1", "train.ema=0.9"])
    tr = Trainer(cfg, tmp_path / "r", "cpu", progress=False).setup()
    tr.fit()
    step = tmp_path / "r" / "checkpoints" / "step_2"
    for name in ("model.safetensors", "optimizer.safetensors", "ema.safetensors", "state.json"):
        assert (step / name).is_file(), name
    state = json.loads((step / "state.json").read_text())
    assert state["step"] == 2
    assert (tmp_path / "r" / "config.yaml").is_file()
    assert list((tmp_path / "r" / "tensorboard").iterdir())
    # a checkpoint with a missing tensor is refused by name
    tensors = load_file(str(step / "model.safetensors"))
    key = sorted(tensors)[0]
    del tensors[key]
    with pytest.raises(ck.CheckpointError, match="missing"):
        tr.method.load_trained_state(tensors, "x")


def test_sdfsmis_predictor_through_test_py(tmp_path, tiny_data):
    cfg_path = _config(tmp_path, tiny_data)
    tr = Trainer(load_config(cfg_path, ["train.max_steps=1"]), tmp_path / "run", "cpu", progress=False).setup()
    tr.fit()
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, str(ROOT / "test.py"), "--method", "sdfsmis", "--config", str(cfg_path),
                           "--checkpoint", str(tmp_path / "run"), "--data", str(tiny_data), "--out", str(out),
                           "--folds", "0", "--quiet", "--no-surface"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["method"]["method"] == "sdfsmis"
    assert 0.0 <= res["mean_dice"] <= 1.0
    assert res["protocol"]["normalization"] == "minmax"
    # the scan-level tool with the same predictor: output on the query's own grid
    pred = tmp_path / "pred.nii.gz"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "predict.py"), "--method", "sdfsmis",
                           "--config", str(cfg_path), "--checkpoint", str(tmp_path / "run"),
                           "--support-image", str(tiny_data / "image_0.nii.gz"),
                           "--support-label", str(tiny_data / "label_0.nii.gz"), "--label", "6",
                           "--query-image", str(tiny_data / "image_1.nii.gz"), "--out", str(pred)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import nibabel as nib

    out_img, ref = nib.load(str(pred)), nib.load(str(tiny_data / "image_1.nii.gz"))
    assert out_img.shape == ref.shape and np.allclose(out_img.affine, ref.affine)
    assert set(np.unique(np.asarray(out_img.dataobj)).tolist()) <= {0, 6}


def test_ddp_two_processes_on_cpu(tmp_path, tiny_data):
    cfg_path = _config(tmp_path, tiny_data)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           str(ROOT / "train.py"), "--config", str(cfg_path), "--out", str(tmp_path / "ddp"), "--quiet",
           "--device", "cpu", "train.max_steps=2", "train.grad_accum=1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w = _weights(tmp_path / "ddp")
    assert all(torch.isfinite(v).all() for v in w.values() if v.dtype.is_floating_point)
    assert ck.read_index(tmp_path / "ddp")["last"] == "step_2"


def test_resume_and_reuse_refuse_a_run_whose_training_data_changed(tmp_path):
    """RUN/data.json records what the run trained on; once the dataset at the same path holds other
    cases, resuming is refused (CheckpointError naming what changed) and so is reusing the finished run,
    and the run is left as it was; the unchanged data resumes, and the comparison ignores where the data
    lie (a moved folder is the same data)."""
    from fsmis.engine.runs import data_changes, data_conflicts, read_data_identity

    data = tmp_path / "ct"
    make_phantom_dataset(data, modality="ct", n_cases=5, seed=3, shape=(10, 48, 48), supervoxels=True,
                         progress=False)
    cfg = load_config(_config(tmp_path, data), ["train.max_steps=2"])
    run = tmp_path / "run"
    Trainer(cfg, run, "cpu", progress=False).setup().fit()
    saved = read_data_identity(run)
    assert Trainer(cfg, run, "cpu", progress=False).setup().resume() == 2 and data_conflicts(cfg, run) == []
    assert data_changes(saved, {**saved, "image_dir": "/elsewhere"}) == []  # where the data lie: not compared

    make_phantom_dataset(data, modality="ct", n_cases=6, seed=3, shape=(10, 48, 48), supervoxels=True,
                         progress=False, overwrite=True)
    changed = data_conflicts(cfg, run)
    assert any(c.startswith("cases:") for c in changed), changed
    with pytest.raises(ck.CheckpointError, match="trained on other data.*cases"):
        Trainer(cfg, run, "cpu", progress=False).setup().resume()
    sys.path.insert(0, str(ROOT / "tools"))
    import demo as D

    with pytest.raises(ValueError, match="trained on other data"):
        D.ensure_trained(cfg, run, progress=False)
    assert read_data_identity(run) == saved and (run / "train_summary.json").is_file()
