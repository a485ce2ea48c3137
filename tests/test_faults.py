"""Faults: kill -9 and Ctrl-C during evaluation and training, and two runs into one folder.

test.py killed at any moment leaves at --out either nothing or a complete output folder (the
previous one or the new one), never a results.json beside missing files; Ctrl-C exits 130, leaves
the previous output and releases the lock. train.py killed at any moment resumes with --resume to
exactly the weights of an uninterrupted run; Ctrl-C exits 130 and the run resumes. A second
train.py or test.py into a folder in use is refused naming the folder while the first finishes.
"""
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from _cli import ROOT, clean_error, popen, run, snapshot
from fsmis.atomic import exclusive_lock
from fsmis.data.phantom import make_phantom_dataset
from fsmis.engine import checkpoints as ck

MAX_STEPS = 40


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "D"
    make_phantom_dataset(out, modality="ct", n_cases=5, seed=3, shape=(10, 48, 48), supervoxels=True, progress=False)
    return out


def _cfg(folder: Path, data: Path, delay: float = 0.02, **train) -> Path:
    """A tiny training (a few convolutions, 32 px) of MAX_STEPS steps with a checkpoint after every
    step; ``delay`` seconds of sleep per step keep it running long enough to be stopped midway."""
    raw = {"name": "tiny", "method": "_tiny_method:TinySegmenter",
           "data": {"root": str(data), "image_size": 32, "min_fg_pixels": 10, "n_val": 1, "augment": False},
           "model": {"width": 4, "delay": delay},
           "train": {"max_steps": MAX_STEPS, "batch_size": 2, "grad_accum": 1, "lr": 1e-2, "ckpt_every": 1,
                     "val_every": 0, "image_every": 0, "seed": 5, **train}}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tiny_{delay}_{'_'.join(f'{k}{v}' for k, v in train.items())}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(cfg, out):
    return [ROOT / "train.py", "--config", cfg, "--out", out, "--quiet", "--device", "cpu"]


def _resume(out):
    return [ROOT / "train.py", "--resume", out, "--quiet", "--device", "cpu"]


def _weights(run_dir):
    return load_file(str(ck.resolve_checkpoint(run_dir, "last") / "model.safetensors"))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The weights after an uninterrupted training (the sleep does not change them)."""
    folder = tmp_path_factory.mktemp("ref")
    proc = run(_train(_cfg(folder, data, delay=0.0), folder / "run"))
    assert proc.returncode == 0, proc.stderr[-1500:]
    return _weights(folder / "run")


def _last_step(run_dir: Path) -> int:
    name = ck.read_index(run_dir).get("last") if (run_dir / "checkpoints" / "index.json").is_file() else None
    return int(name[5:]) if name else 0


def _wait_for(cond, proc, timeout: float = 120.0) -> bool:
    """Poll ``cond`` until true (True) or until ``proc`` ends (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


def _kill(proc, sig=signal.SIGKILL) -> bool:
    """Send ``sig`` if the process still runs; True if it was sent."""
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, sig)
    return True


# -- train.py -------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_last", [1, 3])
def test_train_killed_at_staggered_moments_resumes_to_the_same_weights(data, tmp_path, reference, keep_last):
    cfg = _cfg(tmp_path, data, keep_last=keep_last)
    run_dir = tmp_path / "run"
    # (condition to wait for, then a pause before kill -9): before the first checkpoint, right
    # after one, and at odd moments (mid-step, mid-save, mid-prune)
    moments = [(lambda: (run_dir / "config.yaml").is_file(), 0.0), (lambda: _last_step(run_dir) >= 1, 0.0),
               (lambda: _last_step(run_dir) >= 9, 0.013), (lambda: _last_step(run_dir) >= 18, 0.031),
               (lambda: _last_step(run_dir) >= 27, 0.047)]
    kills = 0
    for i, (cond, pause) in enumerate(moments):
        proc = popen(_train(cfg, run_dir) if i == 0 else _resume(run_dir))
        if _wait_for(cond, proc):
            time.sleep(pause)
        kills += _kill(proc)
        proc.communicate()
        assert not (run_dir / "train_summary.json").exists()
        step_dir = ck.last_complete(run_dir)  # what a resume starts from: complete and readable
        if step_dir is not None:
            ck.load_checkpoint(step_dir)
            assert int(step_dir.name[5:]) <= MAX_STEPS
    assert kills == len(moments)
    res = run(_resume(run_dir))
    assert res.returncode == 0, res.stderr[-1500:]
    _assert_same_weights(_weights(run_dir), reference)
    index = ck.read_index(run_dir)
    assert index["last"] == f"step_{MAX_STEPS}"
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert len(kept) <= keep_last + 1 and f"step_{MAX_STEPS}" in kept  # the newest ones (and best)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_train_ctrl_c_exits_130_and_the_run_resumes(data, tmp_path, reference):
    cfg = _cfg(tmp_path, data, keep_last=2)
    run_dir = tmp_path / "run"
    proc = popen(_train(cfg, run_dir))
    assert _wait_for(lambda: _last_step(run_dir) >= 5, proc)
    time.sleep(0.021)
    assert _kill(proc, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    proc.stderr = err
    clean_error(proc, "interrupted", code=130)
    with exclusive_lock(run_dir, "run folder"):  # released
        pass
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert not (run_dir / "train_summary.json").exists()
    res = run(_resume(run_dir))
    assert res.returncode == 0, res.stderr[-1500:]
    _assert_same_weights(_weights(run_dir), reference)


def test_a_second_training_into_a_run_in_progress_is_refused(data, tmp_path, reference):
    cfg = _cfg(tmp_path, data)
    run_dir = tmp_path / "run"
    first = popen(_train(cfg, run_dir))
    try:
        assert _wait_for(lambda: _last_step(run_dir) >= 2, first)
        os.kill(first.pid, signal.SIGSTOP)  # holds the folder
        writing = run_dir / "checkpoints" / ".tmp-step_3-inprogress"  # a checkpoint it is writing
        writing.mkdir(exist_ok=True)
        before = snapshot(run_dir)
        for cmd in (_train(cfg, run_dir), _resume(run_dir)):
            second = run(cmd)
            clean_error(second, str(run_dir), "in use by process")
            assert snapshot(run_dir) == before  # the second touched nothing, not even temporary folders
        writing.rmdir()
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-1500:]
    assert ck.read_index(run_dir)["last"] == f"step_{MAX_STEPS}"
    _assert_same_weights(_weights(run_dir), reference)


# -- test.py --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_run(data, tmp_path_factory):
    """A trained tiny run whose predictions sleep 0.2 s each: an evaluation lasting a few seconds."""
    folder = tmp_path_factory.mktemp("slow")
    proc = run(_train(_cfg(folder, data, delay=0.2), folder / "run") + ["train.max_steps=2"])
    assert proc.returncode == 0, proc.stderr[-1500:]
    return folder / "run"


def _evaluate(run_dir, data, out):
    return [ROOT / "test.py", "--checkpoint", run_dir, "--data", data, "--out", out, "--quiet", "--no-surface"]


def _lock_held(out: Path):
    lock = out.parent / f".{out.name}.lock"
    return lambda: lock.is_file() and "process" in lock.read_text()


def _files(out: Path) -> set:
    return set(snapshot(out))


def _debris(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_test_py_killed_at_any_moment_leaves_a_complete_output_or_none(data, tmp_path, slow_run):
    out = tmp_path / "res"
    first = popen(_evaluate(slow_run, data, out))
    assert _wait_for(_lock_held(out), first)
    t0 = time.time()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-1500:]
    duration = time.time() - t0  # evaluation and writing, after the lock is taken
    complete = _files(out)
    assert {"results.json", "results.csv", "results.md"} <= complete and any("predictions/" in f for f in complete)
    kills = 0
    for frac in (0.0, 0.3, 0.6, 0.9, 0.97):
        proc = popen(_evaluate(slow_run, data, out))
        if _wait_for(_lock_held(out), proc):
            time.sleep(frac * duration)
        kills += _kill(proc)
        proc.communicate()
        assert not out.exists() or _files(out) == complete  # nothing, or a whole output folder
        if out.exists():
            json.loads((out / "results.json").read_text())
    assert kills >= 4
    again = run(_evaluate(slow_run, data, out))
    assert again.returncode == 0, again.stderr[-1500:]
    assert _files(out) == complete
    assert _debris(tmp_path) == []  # the temporary folders of the killed runs are gone, and the lock file


def test_test_py_ctrl_c_exits_130_keeping_the_previous_output(data, tmp_path, slow_run):
    out = tmp_path / "res"
    first = run(_evaluate(slow_run, data, out))
    assert first.returncode == 0, first.stderr[-1500:]
    before = snapshot(out)
    results = (out / "results.json").read_bytes()
    for pause in (0.0, 0.8):
        proc = popen(_evaluate(slow_run, data, out))
        assert _wait_for(_lock_held(out), proc)
        time.sleep(pause)
        assert _kill(proc, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        proc.stderr = err
        clean_error(proc, "interrupted", code=130)
        assert snapshot(out) == before and (out / "results.json").read_bytes() == results
        assert _debris(tmp_path) == []  # lock released and removed, no temporary folder
        with exclusive_lock(out, "output folder", tmp_path / f".{out.name}.lock"):
            pass


def test_a_second_test_py_into_an_out_in_use_is_refused(data, tmp_path, slow_run):
    out = tmp_path / "res"
    first = popen(_evaluate(slow_run, data, out))
    try:
        assert _wait_for(_lock_held(out), first)
        os.kill(first.pid, signal.SIGSTOP)
        before = snapshot(tmp_path)
        second = run(_evaluate(slow_run, data, out))
        clean_error(second, str(out), "in use by process")
        assert snapshot(tmp_path) == before
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-1500:]
    assert json.loads((out / "results.json").read_text())["folds"]
    assert _debris(tmp_path) == []
