"""tools/seeds.py on a tiny phantom: one trained run per seed, the tables, reuse of finished
seeds, and the post-processing threshold sweep scored on the same trained models."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--cases", "5", "--shape", "10,48,48", "--vae-steps", "2", "--quiet", "--gen-steps", "2",
        "--gen-set", "data.min_fg_pixels=10", "--gen-set", "train.batch_size=2",
        "data.image_size=32", "data.min_fg_pixels=10", "train.max_steps=2", "train.val_every=2",
        "train.ckpt_every=2", "train.image_every=0", "eval.chunk_batch=8"]


def _run(tmp_path, *extra):
    cmd = [sys.executable, str(ROOT / "tools" / "seeds.py"), "--data", str(tmp_path / "data"),
           "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *extra, *TINY]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})


def test_seeds_tables_reuse_and_threshold_sweep(tmp_path):
    proc = _run(tmp_path, "--seeds", "0", "1", "--threshold-ratios", "0.5", "0.6")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "seeds.json").read_text())
    assert set(res["seeds"]) == {"0", "1"}
    for seed, r in res["seeds"].items():
        assert {"in_domain", "cross_domain", "history", "by_threshold_ratio"} <= set(r)
        assert set(r["by_threshold_ratio"]) == {"0.5", "0.6"}
        # the config's own ratio (0.5 in configs/demo.yaml) scored again gives the same numbers as the main row
        assert r["by_threshold_ratio"]["0.5"]["in_domain"]["mean"] == r["in_domain"]["mean"]
    text = (tmp_path / "out" / "seeds.md").read_text()
    assert "SD-FSMIS over 2 seeds" in text and "| model.threshold_ratio |" in text and "| 0.6 |" in text
    # the runs differ only in their seed, and start from the one demo generator trained for all
    import yaml

    cfgs = [yaml.safe_load((tmp_path / "out" / "runs" / f"seed{s}" / "config.yaml").read_text()) for s in (0, 1)]
    assert [c["train"]["seed"] for c in cfgs] == [0, 1]
    gen = tmp_path / "work" / "generator"
    assert all(Path(c["model"]["unet_init"]) == gen for c in cfgs)
    assert res["init"] == "generator" and res["generator"]["steps"] == 2 and Path(res["generator"]["run"]) == gen
    assert "initialised from the demo generator" in text
    again = _run(tmp_path, "--seeds", "0")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reusing the trained demo model" in again.stdout


def test_seeds_rejects_a_bad_shape(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "seeds.py"), "--shape", "1,2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Z,Y,X" in proc.stderr


def test_seeds_test_time_variants(tmp_path):
    """--synthetic-support and --mask-support score the same trained seeds with generated supports;
    the MR generator is trained once, label-free, on the MR phantom's supervoxels."""
    extra = [a.replace("10,48,48", "10,64,64").replace("data.image_size=32", "data.image_size=64") for a in TINY]
    cmd = [sys.executable, str(ROOT / "tools" / "seeds.py"), "--data", str(tmp_path / "data"), "--out",
           str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--seeds", "0", "--synthetic-support", "1",
           "--mask-support", "--gen-set", "model.sample_steps=2", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "seeds.json").read_text())
    v = res["seeds"]["0"]["variants"]
    assert {"in_domain", "cross_domain"} <= set(v["synthetic_support"])
    assert set(v["mask_support"]["cross_domain"]) == {"mean", "per_class"}
    assert v["mask_support"]["protocol"]["support_from_mask"]
    assert "mask_support" in res["support_copy"]["variants"]
    assert res["test_time"]["synthetic_support"] == 1 and Path(res["test_time"]["generator_mr"]).name == "generator_mr"
    assert (tmp_path / "work" / "generator_mr" / "unet").is_dir()
    mr_cfg = json.loads((tmp_path / "work" / "generator_mr" / "data.json").read_text())
    assert "mr" in json.dumps(mr_cfg).lower()
    text = (tmp_path / "out" / "seeds.md").read_text()
    assert "synthetic support (M = 1)" in text and "supports generated from CT masks" in text


def test_seeds_on_a_card_mri_folder(tmp_path):
    """--cmr DATA: make demo-cmr's recipe (configs/demo_cmr.yaml, random UNet, self-supervised on
    supervoxels), in-domain fold 0 only; its synthetic supports come from the label-free generator
    trained on DATA itself. An MR phantom with supervoxels stands in for the Card-MRI folder."""
    from fsmis.data.phantom import make_phantom_dataset

    data = tmp_path / "cmr"
    make_phantom_dataset(data, modality="mr", n_cases=5, seed=3, shape=(10, 64, 64), supervoxels=True, progress=False)
    extra = [a for a in TINY if a not in ("--cases", "5", "--shape", "10,48,48")]
    extra = [a.replace("data.image_size=32", "data.image_size=64") for a in extra]
    cmd = [sys.executable, str(ROOT / "tools" / "seeds.py"), "--cmr", str(data), "--out", str(tmp_path / "out"),
           "--work", str(tmp_path / "work"), "--seeds", "0", "--synthetic-support", "1",
           "--gen-set", "model.sample_steps=2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "seeds.json").read_text())
    assert res["dataset"] == "cmr" and res["splits"] == {"in_domain": "Card-MRI fold 0"}
    assert Path(res["config"]).name == "demo_cmr.yaml" and res["init"] == "random"
    r = res["seeds"]["0"]
    assert "in_domain" in r and "cross_domain" not in r and "cross_domain" not in res["support_copy"]
    assert set(r["variants"]["synthetic_support"]) == {"in_domain", "label"}
    assert Path(res["test_time"]["generator_ct"]) == tmp_path / "work" / "generator"
    import yaml

    cfg = yaml.safe_load((tmp_path / "out" / "runs" / "seed0" / "config.yaml").read_text())
    assert cfg["data"]["labels"] == "supervoxel" and cfg["model"].get("unet_init") in (None, "")
    assert Path(cfg["data"]["root"]) == data and (tmp_path / "work" / "vae") in Path(cfg["model"]["vae_path"]).parents
    text = (tmp_path / "out" / "seeds.md").read_text()
    assert "SD-FSMIS over 1 seeds" in text and "synthetic support (M = 1)" in text
    # supports generated from the CT phantom's masks have no meaning on Card-MRI
    proc = subprocess.run([*cmd[:2], "--cmr", str(data), "--mask-support", "--out", str(tmp_path / "o2")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "--mask-support" in proc.stderr and not (tmp_path / "o2").exists()
