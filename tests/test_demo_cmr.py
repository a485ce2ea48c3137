"""tools/demo_cmr.py (behind `make demo-cmr DATA=...`) end to end on a tiny stand-in dataset (a
phantom with supervoxels; the real Card-MRI folder is not part of the tests): the results schema
(``in_domain`` only), the report, the figures, reuse of VAE and run, and the errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--vae-steps", "2", "--quiet", "data.image_size=32", "data.min_fg_pixels=10", "train.max_steps=2",
        "train.val_every=2", "train.ckpt_every=2", "train.image_every=0", "eval.chunk_batch=8"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _phantom(tmp_path):
    from fsmis.data.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path / "data", modality="ct", n_cases=5, seed=3, shape=(10, 48, 48))


def _run(tmp_path, data, *extra):
    cmd = [sys.executable, str(ROOT / "tools" / "demo_cmr.py"), "--data", str(data), "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), *TINY, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())


def test_demo_cmr_end_to_end_and_reuse(tmp_path):
    data = _phantom(tmp_path)
    proc = _run(tmp_path, data)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"sdfsmis", "support-copy"}
    for method, by_split in results.items():
        assert set(by_split) == {"in_domain"}, method
        res = by_split["in_domain"]
        assert 0.0 <= res["mean_dice"] <= 1.0
        assert res["protocol"]["folds_evaluated"] == [0] and res["protocol"]["support"] == "1shot"
    report = (out / "report.md").read_text()
    sd, sc = (results[m]["in_domain"]["mean_dice"] for m in ("sdfsmis", "support-copy"))
    assert f"SD-FSMIS {'beats' if sd > sc else 'does NOT beat'} support-copy on Card-MRI fold 0" in report
    assert "Validation Dice by step: 2:" in report and "oracle" in report
    for name in ("validation_curve.png", "sdfsmis_in_domain.png", "support-copy_in_domain.png"):
        assert (out / "figures" / name).stat().st_size > 0, name
    assert results["sdfsmis"]["in_domain"]["method"]["threshold_floor"] == 0.0
    # a post-processing key changes no weights: the trained run is reused and the new value applied
    again = _run(tmp_path, data, "model.threshold_floor=0.3")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reusing the demo VAE" in again.stdout and "reusing the trained demo model" in again.stdout
    again_results = json.loads((out / "results.json").read_text())
    assert again_results["sdfsmis"]["in_domain"]["method"]["threshold_floor"] == 0.3
    # a training key does not reuse it, and the trained run is not deleted: an error names the key
    from _cli import snapshot

    before = snapshot(tmp_path / "work" / "run")
    third = _run(tmp_path, data, "train.fg_weight=3")
    assert third.returncode == 2, third.stderr[-2000:]
    assert "train.fg_weight: 5.0 -> 3.0" in third.stderr and "Traceback" not in third.stderr
    assert snapshot(tmp_path / "work" / "run") == before


def test_demo_cmr_refuses_a_folder_that_is_no_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = _run(tmp_path, tmp_path / "empty")
    assert proc.returncode == 2 and "empty" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_make_demo_cmr_needs_data():
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), "demo-cmr", "DATA="],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DATA=" in proc.stderr


def test_demo_cmr_refuses_outputs_inside_the_dataset(tmp_path):
    data = _phantom(tmp_path)
    before = sorted(p.name for p in data.iterdir())
    for flag in ("--out", "--work"):
        cmd = [sys.executable, str(ROOT / "tools" / "demo_cmr.py"), "--data", str(data), "--out", str(tmp_path / "o"),
               "--work", str(tmp_path / "w"), flag, str(data / "results"), *TINY]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
        assert proc.returncode == 2 and flag in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert sorted(p.name for p in data.iterdir()) == before


GEN = ["--gen-steps", "2", "--gen-set", "data.min_fg_pixels=10", "--gen-set", "train.batch_size=2"]


def _prior(tmp_path, data):
    """The prior arm at an equal budget: TINY without its train.max_steps (the budget sets it)."""
    cmd = [sys.executable, str(ROOT / "tools" / "demo_cmr.py"), "--data", str(data), "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), "--init", "generator", "--equal-budget", *GEN,
           *(a for a in TINY if not a.startswith("train.max_steps="))]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())


def test_demo_cmr_from_the_generator_at_an_equal_budget(tmp_path):
    """--init generator trains the generator on DATA and SD-FSMIS from its UNet (WORK/run_prior);
    --equal-budget needs the random run and takes the generator's seconds off its steps."""
    data = _phantom(tmp_path)
    early = _prior(tmp_path, data)
    assert early.returncode == 2 and "train_summary.json" in early.stderr and "without --init" in early.stderr
    assert "Traceback" not in early.stderr and not (tmp_path / "work" / "generator").exists()
    assert _run(tmp_path, data, "--equal-budget").returncode == 2  # only with --init generator
    first = _run(tmp_path, data, "train.max_steps=4", "train.val_every=2")
    assert first.returncode == 0, first.stderr[-3000:]
    both = _run(tmp_path, data, "--init", "generator", "--equal-budget", *GEN, "train.max_steps=4")
    assert both.returncode == 2 and "train.max_steps" in both.stderr  # the budget sets the steps
    proc = _prior(tmp_path, data)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    work = tmp_path / "work"
    import yaml

    cfg = yaml.safe_load((work / "run_prior" / "config.yaml").read_text())
    assert cfg["model"]["unet_init"] == str(work / "generator")
    random_summary = json.loads((work / "run" / "train_summary.json").read_text())
    gen_summary = json.loads((work / "generator" / "train_summary.json").read_text())
    per_step = random_summary["seconds"] / random_summary["steps"]
    assert cfg["train"]["max_steps"] == max(1, 4 - int(round(gen_summary["seconds"] / per_step)))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "UNet initialised from the demo generator trained 2 steps" in report and "Equal budget" in report
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == {"sdfsmis", "support-copy"}
