"""The one training engine: a method defined outside the package (tests/_tiny_method.py) trains
through train.py with the same checkpoints, exact kill -9 resume and 2-process DDP; the method
config sections; the learning-rate schedules; a slice reaches the model identically in training
and evaluation."""
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
from safetensors.torch import load_file

from fsmis.config import ConfigError, TrainConfig, load_config
from fsmis.data.phantom import make_phantom_dataset
from fsmis.engine import checkpoints as ck
from fsmis.engine.trainer import Trainer, learning_rate

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "ct"
    make_phantom_dataset(out, modality="ct", n_cases=5, seed=3, shape=(10, 48, 48), supervoxels=True, progress=False)
    return out


def _tiny_config(tmp_path, data, **train):
    raw = {"name": "tiny", "method": "_tiny_method:TinySegmenter",
           "data": {"root": str(data), "image_size": 32, "min_fg_pixels": 10, "n_val": 1, "augment": False},
           "model": {"width": 4},
           "train": {"max_steps": 6, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "ckpt_every": 1,
                     "val_every": 3, "image_every": 0, "log_every": 1, "seed": 5, **train}}
    path = tmp_path / "tiny_method.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _weights(run):
    return load_file(str(ck.resolve_checkpoint(run, "last") / "model.safetensors"))


def _train_cmd(cfg_path, *extra):
    return [sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path), "--quiet", "--device", "cpu", *extra]


def test_a_new_method_trains_through_train_py_and_resumes_after_kill_9(tmp_path, tiny_data):
    cfg_path = _tiny_config(tmp_path, tiny_data, max_steps=8)
    ref = subprocess.run(_train_cmd(cfg_path, "--out", str(tmp_path / "ref")), capture_output=True, text=True,
                         cwd=ROOT, env=ENV)
    assert ref.returncode == 0, ref.stderr[-2000:]
    summary = json.loads((tmp_path / "ref" / "train_summary.json").read_text())
    assert summary["method"] == "_tiny_method:TinySegmenter" and summary["steps"] == 8
    assert [h["step"] for h in summary["history"]] == [3, 6, 8]  # validated with the canonical evaluator
    assert all(0.0 <= h["val_dice"] <= 1.0 for h in summary["history"])
    # the time inside validation and checkpoint writing is counted apart, within the run's seconds
    assert summary["seconds_validation"] > 0 and summary["seconds_checkpoints"] > 0
    assert summary["seconds_validation"] + summary["seconds_checkpoints"] <= summary["seconds"] + 0.1
    # what a CPU number depends on besides config and data: the thread count and the versions
    env = summary["environment"]
    assert env["threads"] == 1 and env["device"] == "cpu"  # ENV runs train.py with OMP_NUM_THREADS=1
    assert env["torch"] == torch.__version__ and env["python"] and env["diffusers"]
    assert 0 < summary["seconds_per_step"] * summary["steps"] / 2 <= summary["seconds"]
    assert list((tmp_path / "ref" / "tensorboard").iterdir())
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(cfg_path, "--out", str(run)), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        idx = ck.read_index(run) if (run / "checkpoints" / "index.json").is_file() else {}
        if idx.get("last") in ("step_2", "step_3", "step_4", "step_5"):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = ck.read_index(run).get("last")
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(run), "--quiet", "--device", "cpu"],
                         capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    wa, wb = _weights(tmp_path / "ref"), _weights(run)
    assert wa.keys() == wb.keys() and killed_at != "step_8"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # the trained weights moved away from the initialisation
    init = Trainer(load_config(cfg_path), tmp_path / "init", "cpu", progress=False).setup().method.trained_state()
    assert any(not torch.equal(init[k], wa[k]) for k in wa)


def test_a_new_method_trains_with_two_process_ddp(tmp_path, tiny_data):
    cfg_path = _tiny_config(tmp_path, tiny_data, max_steps=2, grad_accum=1, val_every=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "train.py"), "--config", str(cfg_path), "--out", str(tmp_path / "ddp"), "--quiet",
           "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ck.read_index(tmp_path / "ddp")["last"] == "step_2"
    w = _weights(tmp_path / "ddp")
    assert all(torch.isfinite(v).all() for v in w.values())


def test_the_trained_new_method_is_evaluated_by_test_py(tmp_path, tiny_data):
    cfg_path = _tiny_config(tmp_path, tiny_data, max_steps=2, grad_accum=1, val_every=0)
    tr = subprocess.run(_train_cmd(cfg_path, "--out", str(tmp_path / "run")), capture_output=True, text=True,
                        cwd=ROOT, env=ENV)
    assert tr.returncode == 0, tr.stderr[-2000:]
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, str(ROOT / "test.py"), "--checkpoint", str(tmp_path / "run"),
                           "--data", str(tiny_data), "--out", str(out), "--quiet", "--no-surface", "--no-figures"],
                          capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["method"]["method"] == "tiny" and res["training"]["fold"] == 0
    assert [f["fold"] for f in res["folds"]] == [0]  # the run's own fold on its own dataset


def test_method_sections_keep_unknown_keys_errors(tmp_path, tiny_data):
    cfg = load_config(_tiny_config(tmp_path, tiny_data))
    assert type(cfg.model).__name__ == "TinyConfig" and cfg.model.width == 4
    with pytest.raises(ConfigError, match="model.depth"):
        load_config(_tiny_config(tmp_path, tiny_data), ["model.depth=3"])
    with pytest.raises(ConfigError, match="unknown method"):
        load_config(None, ["method=no_such_method"])
    vae = load_config(ROOT / "configs" / "demo_vae.yaml")
    assert vae.method == "autoencoder" and vae.model.architecture["block_out_channels"] == [32, 64, 64]
    with pytest.raises(ConfigError, match="data.fold"):  # the autoencoder's data section has no folds
        load_config(ROOT / "configs" / "demo_vae.yaml", ["data.fold=1"])
    assert load_config(ROOT / "configs" / "demo.yaml").method == "sdfsmis"  # the default


def test_learning_rate_schedules():
    lin = TrainConfig(max_steps=10)
    assert [learning_rate(lin, s, 1.0) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    cos = TrainConfig(max_steps=100, schedule="warmup_cosine", warmup_steps=10, final_lr_ratio=0.05)
    lrs = [learning_rate(cos, s, 2.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.2) and lrs[9] == pytest.approx(2.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after the warm-up
    assert lrs[-1] == pytest.approx(2.0 * 0.05, rel=0.01)
    assert learning_rate(TrainConfig(schedule="constant"), 7, 3.0) == 3.0
    with pytest.raises(ValueError, match="schedule"):
        learning_rate(TrainConfig(schedule="poly"), 0, 1.0)


def test_step_schedule_and_sgd_follow_multisteplr():
    """schedule=step gives torch's MultiStepLR with the baselines' milestones ((i + 1)·every for
    i < max_steps // every − 1), and optimizer=sgd is torch's SGD with momentum."""
    from fsmis.engine.trainer import make_optimizer

    cfg = TrainConfig(max_steps=5000, schedule="step", lr_step_every=1000, lr_gamma=0.5, optimizer="sgd",
                      momentum=0.9, weight_decay=5e-4, lr=1e-3)
    w = torch.nn.Parameter(torch.zeros(1))
    opt = make_optimizer([{"params": [w], "lr": cfg.lr}], cfg, torch.device("cpu"))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(ref_opt, [(i + 1) * 1000 for i in range(5000 // 1000 - 1)], 0.5)
    for step in range(5000):
        assert learning_rate(cfg, step, 1e-3) == pytest.approx(ref_opt.param_groups[0]["lr"]), step
        ref_opt.step()
        sched.step()
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer([{"params": [w], "lr": 1.0}], TrainConfig(optimizer="lion"), torch.device("cpu"))


def test_a_slice_reaches_the_model_identically_in_training_and_evaluation(tmp_path, tiny_data):
    """The training batch of an episode equals what the SD-FSMIS predictor feeds the model for the
    same slices, normalised per volume as the evaluator does (one resize function for both)."""
    from fsmis.data.batch import collate
    from fsmis.data.normalize import normalize_volume

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.root={tiny_data}", "data.image_size=32", "model.vae=tiny",
                                                       "data.min_fg_pixels=10", "train.cache_latents=false"])
    tr = Trainer(cfg, tmp_path / "r", "cpu", progress=False).setup()
    ep = tr.method.sampler.sample(np.random.default_rng(0))
    batch = collate([ep], cfg.data.image_size)
    pred = tr.method.predictor()
    assert pred.normalization == tr.method.sampler.normalization == "minmax"
    vol = normalize_volume(tr.method.dataset.load_case(ep.case).image, pred.normalization)
    k = ep.n_shot
    s_z, q_z = list(ep.slices[:k]), list(ep.slices[k:])
    s_img, s_msk, q_img = pred.model_inputs(vol[s_z], ep.support_masks, vol[q_z])
    assert torch.equal(s_img, batch.support_images) and torch.equal(q_img, batch.query_images)
    assert torch.equal(s_msk, batch.support_masks)
    assert tuple(s_img.shape[-2:]) == (32, 32) and vol.shape[-1] == 48  # a real resize happened


def test_stateful_random_streams_are_saved_per_process_under_ddp(tmp_path, tiny_data):
    """The autoencoder draws crops from per-process streams: a 2-process run saves both, and a resume
    with another process count is refused instead of silently repeating one rank's stream."""
    run = tmp_path / "ddp_vae"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29535",
           str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo_vae.yaml"), "--out", str(run), "--quiet",
           "--device", "cpu", f"data.root={tiny_data}", "data.image_size=32", "data.crop=16", "train.max_steps=2",
           "train.batch_size=4", "train.ckpt_every=1", "train.warmup_steps=1", "model.eval_image_stride=8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((ck.resolve_checkpoint(run, "last") / "state.json").read_text())
    ranks = state["rng_ranks"]
    assert len(ranks) == 2 and ranks[0] != ranks[1] and state["rng"] == ranks[0]
    (run / "train_summary.json").unlink()
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(run), "--quiet", "--device", "cpu",
                          "train.max_steps=3"], capture_output=True, text=True, cwd=ROOT, env=ENV)
    assert res.returncode == 2 and "resume with the same count" in res.stderr


def test_validation_scores_the_ema_weights_and_restores_the_live_ones(tmp_path, tiny_data, monkeypatch):
    """With train.ema on, a loaded run predicts with the EMA weights, so validation (and the best
    checkpoint) must score those; training then continues from the untouched live weights."""
    import sys as _sys

    _sys.path.insert(0, str(TESTS))
    cfg = load_config(_tiny_config(tmp_path, tiny_data, ema=0.5, max_steps=3, val_every=3))
    tr = Trainer(cfg, tmp_path / "run", "cpu", progress=False).setup()
    for _ in range(2):
        tr.train_step()
    seen = {}

    def fake_validate():
        seen.update({k: v.detach().clone() for k, v in tr.method.trained_state().items()})
        return 0.5

    monkeypatch.setattr(tr.method, "validate", fake_validate)
    live = {k: v.detach().clone() for k, v in tr.method.trained_state().items()}
    assert any(not torch.equal(live[k], tr.ema.shadow[k]) for k in live)
    assert tr.validate() == 0.5
    for k in live:
        assert torch.equal(seen[k], tr.ema.shadow[k].to(live[k].dtype)), k
        assert torch.equal(tr.method.trained_state()[k], live[k]), k


def test_tf32_switch_sets_the_matmul_flag(tmp_path, tiny_data):
    """train.tf32 decides torch.backends.cuda.matmul.allow_tf32 for the run (released: on)."""
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        for value in (True, False):
            cfg = load_config(_tiny_config(tmp_path, tiny_data), [f"train.tf32={str(value).lower()}"])
            Trainer(cfg, tmp_path / f"run_{value}", "cpu", progress=False).setup()
            assert torch.backends.cuda.matmul.allow_tf32 is value
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
