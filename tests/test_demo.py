"""tools/demo.py (behind `make demo`) end to end on a tiny phantom: the files it promises, the
results schema, and reuse of data, VAE and trained run on a second call."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--cases", "5", "--shape", "10,48,48", "--vae-steps", "2", "--quiet", "--gen-steps", "2",
        "--gen-set", "data.min_fg_pixels=10", "--gen-set", "train.batch_size=2",
        "data.image_size=32", "data.min_fg_pixels=10", "train.max_steps=2", "train.val_every=2",
        "train.ckpt_every=2", "train.image_every=0", "eval.chunk_batch=8"]


def _run(tmp_path, *extra):
    cmd = [sys.executable, str(ROOT / "tools" / "demo.py"), "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *extra, *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_demo_end_to_end_and_reuse(tmp_path):
    first = _run(tmp_path)
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"sdfsmis", "support-copy"}
    for method, by_split in results.items():
        assert set(by_split) == {"in_domain", "cross_domain"}, method
        for split, res in by_split.items():
            assert 0.0 <= res["mean_dice"] <= 1.0, (method, split)
            assert set(res["per_class"]) == {"liver", "spleen", "left_kidney", "right_kidney"}
            assert res["protocol"]["support"] == "1shot"
    # in-domain is one fold of the CT, cross-domain all 5 folds of the MR
    for method in results:
        ind, cross = results[method]["in_domain"], results[method]["cross_domain"]
        assert ind["dataset"]["modality"] == "CT" and cross["dataset"]["modality"] != "CT"
        assert ind["protocol"]["folds_evaluated"] == [0] and cross["protocol"]["folds_evaluated"] == [0, 1, 2, 3, 4]
    report = (out / "report.md").read_text()
    verdict = "beats" if (results["sdfsmis"]["in_domain"]["mean_dice"]
                          > results["support-copy"]["in_domain"]["mean_dice"]) else "does NOT beat"
    assert f"SD-FSMIS {verdict} support-copy in-domain" in report
    assert "oracle" in report and "latent scaling factor" in report
    for name in ("sdfsmis_in_domain.png", "sdfsmis_cross_domain.png", "support-copy_in_domain.png"):
        assert (out / "figures" / name).stat().st_size > 0, name
    # the MR phantom is evaluated only: no supervoxels written for it
    assert not list((tmp_path / "data" / "mr").glob("supervoxels_*"))
    assert list((tmp_path / "data" / "ct").glob("supervoxels_*"))
    # SD-FSMIS started from the demo generator's UNet (the default --init generator)
    import yaml

    work = tmp_path / "work"
    cfg = yaml.safe_load((work / "run" / "config.yaml").read_text())
    assert Path(cfg["model"]["unet_init"]) == work / "generator"
    assert json.loads((work / "generator" / "train_summary.json").read_text())["steps"] == 2
    assert "UNet initialised from the demo generator trained 2 steps" in report
    # a second call reuses the data, the VAE, the generator and the trained run
    second = _run(tmp_path)
    assert "reusing phantom CT" in second and "reusing the trained demo model" in second
    assert "reusing the trained demo generator" in second
    assert "train demo VAE" not in second
    again = json.loads((out / "results.json").read_text())
    assert again["sdfsmis"]["in_domain"]["mean_dice"] == pytest.approx(results["sdfsmis"]["in_domain"]["mean_dice"])
    assert "generating" in first
    # --init random: a run of its own from a random UNet, beside the generator-initialised one
    third = _run(tmp_path, "--init", "random")
    assert "training the demo SD-FSMIS" in third and "demo generator" not in third
    cfg = yaml.safe_load((work / "run_random" / "config.yaml").read_text())
    assert cfg["model"]["unet_init"] is None
    assert "UNet initialised at random" in (out / "report.md").read_text()
    assert (work / "run" / "train_summary.json").is_file()


def test_demo_rejects_a_bad_shape(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--shape", "10,48"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Z,Y,X" in proc.stderr
