"""tools/demo_genaug.py (behind `make demo-genaug`) end to end on a tiny phantom: every variant
evaluated under the protocol it claims, the genaug training's episode counts and filter counts,
the report and bar chart, and reuse of the cached trainings on a second call."""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--cases", "5", "--shape", "10,64,64", "--vae-steps", "2", "--gen-steps", "3", "--sample-steps", "2",
        "--quiet", "--gen-set", "data.min_fg_pixels=10", "--gen-set", "train.batch_size=2", "--ratio", "0.5",
        "data.image_size=64", "data.min_fg_pixels=10", "train.max_steps=4", "train.val_every=2",
        "train.ckpt_every=2", "train.image_every=0", "eval.chunk_batch=8"]


def _run(tmp_path, *extra):
    cmd = [sys.executable, str(ROOT / "tools" / "demo_genaug.py"), "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *extra, *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc


def test_demo_genaug_end_to_end_and_reuse(tmp_path):
    proc = _run(tmp_path, "--no-filter")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out, work = tmp_path / "out", tmp_path / "work"
    res = json.loads((out / "results.json").read_text())
    both = ("sdfsmis", "sdfsmis+genaug", "sdfsmis+synthetic-support", "support-copy")
    for name in both:
        assert res[name]["in_domain"]["protocol"]["folds_evaluated"] == [0]
        assert res[name]["cross_domain"]["protocol"]["folds_evaluated"] == [0, 1, 2, 3, 4]
    for name in ("sdfsmis+mask-support", "support-copy+mask-support"):
        assert set(res[name]) == {"cross_domain"}
        proto = res[name]["cross_domain"]["protocol"]
        assert proto["support_from_mask"] and proto["synthetic_support"] == 0
        assert res[name]["cross_domain"]["support_source"]["modality_token"] == "MR"
    assert res["sdfsmis+synthetic-support"]["in_domain"]["protocol"]["synthetic_support"] == 2
    assert res["sdfsmis"]["in_domain"]["protocol"]["synthetic_support"] == 0
    assert res["sdfsmis"]["in_domain"]["protocol"]["support_from_mask"] is None
    # the genaug training: same config as the demo run but the genaug section, same steps, counted episodes
    a = yaml.safe_load((work / "run" / "config.yaml").read_text())
    b = yaml.safe_load((work / "run_genaug_nofilter" / "config.yaml").read_text())
    assert b["genaug"]["ratio"] == 0.5 and Path(b["genaug"]["data"][0]) == (out / "synthetic").resolve()
    assert {k: v for k, v in a.items() if k != "genaug"} == {k: v for k, v in b.items() if k != "genaug"}
    summary = json.loads((work / "run_genaug_nofilter" / "train_summary.json").read_text())
    assert summary["episodes"] == {"real": 8, "synthetic": 8}  # 4 steps x 4 episodes, half synthetic
    report = (out / "report.md").read_text()
    assert "sdfsmis+genaug" in report and "mask-support" in report and "One seed" in report
    assert (out / "figures" / "genaug_utility.png").stat().st_size > 0
    # a second call retrains nothing
    again = _run(tmp_path, "--no-filter")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "training the demo" not in again.stdout and "reusing the trained demo model" in again.stdout
    # the default filters (memorisation; agreement off by default): a second genaug run beside the first,
    # on the filtered folder, the demo run reused
    filtered = _run(tmp_path)
    assert filtered.returncode == 0, filtered.stdout[-2000:] + filtered.stderr[-3000:]
    assert filtered.stdout.count("training the demo SD-FSMIS") == 1 and "reusing the trained demo model" in filtered.stdout
    res = json.loads((out / "results.json").read_text())
    counts = res["genaug"]["filter"]
    assert counts["removed_by_agreement"] == 0 and counts["slices_out"] == counts["slices_in"] - counts["removed_by_memorisation"]
    c = yaml.safe_load((work / "run_genaug" / "config.yaml").read_text())
    assert Path(c["genaug"]["data"][0]) == (out / "synthetic_filtered").resolve()
    assert json.loads((out / "synthetic_filtered" / "filter.json").read_text())["settings"]["min_dice"] is None
    assert "Default filters (memorisation)" in (out / "report.md").read_text()
    assert (work / "run_genaug_nofilter" / "train_summary.json").is_file()  # the unfiltered run is kept
