"""tools/demo_generator.py (behind `make demo-generator`) end to end on a tiny phantom: the
generator section of the report, the synthetic folder with its quality.json, the equal-budget
prior arm, and reuse of every cached part on a second call."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

TINY = ["--cases", "5", "--shape", "10,48,48", "--vae-steps", "2", "--gen-steps", "3", "--sample-steps", "2",
        "--quiet", "--gen-set", "data.min_fg_pixels=10", "--gen-set", "train.batch_size=2",
        "data.image_size=32", "data.min_fg_pixels=10", "train.max_steps=4", "train.val_every=2",
        "train.ckpt_every=2", "train.image_every=0", "eval.chunk_batch=8"]


def _run(tmp_path, *extra):
    cmd = [sys.executable, str(ROOT / "tools" / "demo_generator.py"), "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *extra, *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_equal_budget_steps():
    from demo_generator import equal_budget_steps

    # 1600 steps in 800 s (0.5 s/step); a 300 s generator costs 600 steps
    assert equal_budget_steps(1600, 800.0, 300.0) == 1000
    assert equal_budget_steps(1600, 800.0, 0.0) == 1600
    # a generator longer than the whole budget still leaves one step (and the table shows the overrun)
    assert equal_budget_steps(1600, 800.0, 5000.0) == 1
    with pytest.raises(ValueError):
        equal_budget_steps(0, 800.0, 1.0)


def test_demo_generator_end_to_end_and_reuse(tmp_path):
    _run(tmp_path)
    out, work = tmp_path / "out", tmp_path / "work"
    res = json.loads((out / "results.json").read_text())
    assert {"sdfsmis_random_init", "sdfsmis_generator_init", "support-copy"} <= set(res)
    for name in ("sdfsmis_random_init", "sdfsmis_generator_init", "support-copy"):
        assert res[name]["in_domain"]["protocol"]["folds_evaluated"] == [0]
        assert res[name]["cross_domain"]["protocol"]["folds_evaluated"] == [0, 1, 2, 3, 4]
    # the prior arm was initialised from the generator and trained for the equal-budget steps
    import yaml

    prior_cfg = yaml.safe_load((work / "run_prior" / "config.yaml").read_text())
    assert Path(prior_cfg["model"]["unet_init"]) == work / "generator"
    steps = res["prior"]["equal_budget_steps"]
    assert prior_cfg["train"]["max_steps"] == steps
    b = res["prior"]["budget"]
    assert b["sdfsmis_generator_init"]["steps"] == steps and b["sdfsmis_random_init"]["steps"] == 4
    assert b["sdfsmis_generator_init"]["generator_seconds"] == res["generator"]["seconds"] > 0
    # the synthetic folder: the standard layout, its block, and quality.json with named extractors
    syn = out / "synthetic"
    meta = json.loads((syn / "dataset.json").read_text())
    assert len(meta["synthetic"]["sources"]) == 2
    q = json.loads((syn / "quality.json").read_text())
    assert "fid_vae" in q and "kid_vae" in q and "fid" not in q
    assert "SD-FSMIS" in q["mask_dice"]["segmenter"] or "sdfsmis" in q["mask_dice"]["segmenter"].lower()
    report = (out / "report.md").read_text()
    assert "## The generator" in report and "fid_vae" in report and "memorisation" in report
    assert "## The diffusion prior at an equal CPU budget" in report and "generator (model.unet_init)" in report
    assert (out / "figures" / "generator_samples.png").stat().st_size > 0
    assert (out / "figures" / "sdfsmis_generator_init_in_domain.png").stat().st_size > 0
    # a second call retrains nothing
    again = _run(tmp_path)
    assert "reusing the trained demo generator" in again and "reusing the trained demo model" in again
    assert "training the demo" not in again


@pytest.mark.parametrize("option", ["--out", "--work"])
def test_outputs_inside_the_data_folder_are_refused(tmp_path, option):
    data = tmp_path / "data"
    data.mkdir()
    args = {"--out": str(tmp_path / "out"), "--work": str(tmp_path / "work")}
    args[option] = str(data / "ct" / "x")
    cmd = [sys.executable, str(ROOT / "tools" / "demo_generator.py"), "--data", str(data),
           *[a for kv in args.items() for a in kv], "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and option in proc.stderr and "inside" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (data / "ct").exists()
