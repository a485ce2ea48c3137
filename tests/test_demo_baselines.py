"""tools/demo_baselines.py end to end on a tiny phantom: calibration, the trainings side by side,
evaluation of every baseline and support-copy, both reports, reuse of the finished runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cmd(tmp_path, *options, overrides=()):
    # key=value overrides first: --methods takes every word after it
    return [sys.executable, str(ROOT / "tools" / "demo_baselines.py"), "data.image_size=32", "data.min_fg_pixels=10",
            *overrides, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--work",
            str(tmp_path / "work"), "--cases", "5", "--shape", "10,48,48", "--budget", "0.01", "--probe-steps", "2",
            "--min-steps", "3", "--quiet", *options]


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_baselines_tool", ROOT / "tools" / "demo_baselines.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_step_count_leaves_room_for_the_validations_and_checkpoints():
    tool = _tool()
    assert tool._checks(2700) == 4 and tool._checks(3250) == 5  # every quarter (812 steps), and the last step
    # 1 s per step, no checks: the budget's steps, rounded down to 50
    assert tool.steps_for_budget(1000.0, 1.0, 0.0) == 1000 and tool.steps_for_budget(1049.0, 1.0, 0.0) == 1000
    # 25 s per validation and checkpoint: 4 checks of 900 steps take 100 s, 900 + 100 = 1000 fits; 950 does not
    assert tool.steps_for_budget(1000.0, 1.0, 25.0) == 900
    n = tool.steps_for_budget(903.0, 0.2, 12.0)
    assert n * 0.2 + tool._checks(n) * 12.0 <= 903.0 < (n + 50) * 0.2 + tool._checks(n + 50) * 12.0
    assert tool.steps_for_budget(10.0, 1.0, 100.0, min_steps=3) == 3  # nothing fits: the minimum


def test_demo_baselines_end_to_end_and_reuse(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(_cmd(tmp_path), capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    names = ["panet", "alpnet", "adnet", "universeg", "support-copy"]
    assert all(set(res[n]) == {"in_domain", "cross_domain"} for n in names)
    assert "sdfsmis" not in res  # no make demo run in this --work
    steps = res["baselines"]["steps"]
    assert set(steps) == set(names[:4]) and all(v == 3 for v in steps.values())  # a 0.01 s budget: the minimum
    for split in ("in_domain", "cross_domain"):
        rep = json.loads((tmp_path / "out" / split / "report.json").read_text())
        assert [x["label"] for x in rep["rows"]] == names and len(rep["protocols"]) == 1
        assert (tmp_path / "out" / split / "report.png").is_file()
    assert "make demo first" in (tmp_path / "out" / "report.md").read_text()
    for m in names[:4]:
        assert json.loads((tmp_path / "work" / "baselines" / m / "train_summary.json").read_text())["steps"] == 3
    # a second run reuses the trained baselines (no calibration, no training)
    r = subprocess.run(_cmd(tmp_path, "--methods", "adnet"), capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing the trained adnet" in r.stdout and "s per step" not in r.stdout
    # ... but refuses a finished run trained with another config
    r = subprocess.run(_cmd(tmp_path, "--methods", "adnet", overrides=["train.lr=0.5"]), capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=1200)
    assert r.returncode == 2 and "train.lr" in r.stderr


def test_demo_baselines_on_one_dataset(tmp_path):
    """--dataset: one dataset (here a phantom CT folder), fold 0 in-domain only, no cross-domain split."""
    from fsmis.data.phantom import make_phantom_dataset

    data = tmp_path / "one"
    make_phantom_dataset(data, modality="ct", n_cases=5, seed=3, shape=(10, 48, 48), supervoxels=True, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tools" / "demo_baselines.py"), "data.image_size=32", "data.min_fg_pixels=10",
           "--dataset", str(data), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--budget", "0.01",
           "--probe-steps", "2", "--min-steps", "2", "--quiet", "--methods", "adnet"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(res["adnet"]) == {"in_domain"} and set(res["support-copy"]) == {"in_domain"}
    assert not (tmp_path / "out" / "cross_domain").exists()
    assert "phantom_ct, fold 0" in (tmp_path / "out" / "report.md").read_text()
