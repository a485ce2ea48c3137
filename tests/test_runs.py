"""A trained run is evaluated as it was trained: test.py and tools/predict.py rebuild the model from
the run's own config, refuse a config or a protocol switch that contradicts it, never leave a frozen
part randomly initialised, and write per-class predictions that reproduce the scored Dice."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from fsmis.config import ConfigError, load_config
from fsmis.data.datasets import open_dataset
from fsmis.data.phantom import make_phantom_dataset
from fsmis.engine import checkpoints as ck
from fsmis.engine.runs import load_run
from fsmis.engine.trainer import Trainer
from _tiny_sd import TINY

ROOT = Path(__file__).resolve().parents[1]



def _run(args, **kw):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=ROOT, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step SD-FSMIS run on a tiny phantom, with a randomly initialised (frozen) VAE."""
    base = tmp_path_factory.mktemp("runs")
    data = base / "ct"
    make_phantom_dataset(data, modality="ct", n_cases=5, seed=3, shape=(10, 48, 48), supervoxels=True,
                         progress=False)
    raw = {"name": "tiny", "data": {"root": str(data), "image_size": 32, "min_fg_pixels": 10, "n_val": 1},
           "model": {"unet": TINY["unet"], "vae": TINY["vae"], "vtct_encoder": "none", "vtct_hidden": 16,
                     "vtct_depth": 1, "vtct_feat_dim": 16, "threshold_ratio": 0.5},
           "train": {"max_steps": 3, "batch_size": 2, "grad_accum": 1, "lr": 1e-3, "ckpt_every": 3, "val_every": 0,
                     "image_every": 0, "seed": 5}}
    cfg_path = base / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run = base / "run"
    tr = Trainer(load_config(cfg_path), run, "cpu", progress=False).setup()
    tr.fit()
    return {"data": data, "cfg": cfg_path, "run": run, "raw": raw, "trainer": tr, "base": base}


def test_the_run_reloads_with_its_trained_and_frozen_weights(trained):
    loaded = load_run(trained["run"], device="cpu")
    live = trained["trainer"].method.module.state_dict()
    for k, v in loaded.method.module.state_dict().items():
        assert torch.equal(v, live[k]), k  # the random VAE too: from RUN/frozen.safetensors
    assert (trained["run"] / ck.FROZEN_NAME).is_file() and loaded.weights == "model" and loaded.step == 3


def test_a_frozen_part_left_random_is_an_error(trained, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained["run"], run)
    (run / ck.FROZEN_NAME).unlink()
    with pytest.raises(ck.CheckpointError, match="vae would be randomly initialised"):
        load_run(run, device="cpu")
    out = _run([ROOT / "test.py", "--checkpoint", run, "--data", trained["data"], "--out", tmp_path / "e", "--quiet"])
    assert out.returncode == 2 and "randomly initialised" in out.stderr and "Traceback" not in out.stderr


def test_a_config_with_other_model_keys_is_refused_by_name(trained, tmp_path):
    other = dict(trained["raw"], model={**trained["raw"]["model"], "vae_path": str(tmp_path), "threshold_ratio": 0.3})
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(other))
    with pytest.raises(ConfigError, match="model.threshold_ratio.*model.vae_path"):
        load_run(trained["run"], config=path, device="cpu")
    out = _run([ROOT / "test.py", "--checkpoint", trained["run"], "--config", path, "--data", trained["data"],
                "--out", tmp_path / "e", "--quiet"])
    assert out.returncode == 2 and "model.vae_path" in out.stderr and "Traceback" not in out.stderr
    # the shipped demo config (model.vae_path null) cannot silently stand in for a run's config
    with pytest.raises(ConfigError, match="model.unet"):
        load_run(trained["run"], config=ROOT / "configs" / "demo.yaml", device="cpu")
    # an eval-only difference is taken
    ev = dict(trained["raw"], eval={"chunk_batch": 3})
    path.write_text(yaml.safe_dump(ev))
    assert load_run(trained["run"], config=path, device="cpu").cfg.eval.chunk_batch == 3


def test_protocol_switches_come_from_the_run(trained, tmp_path):
    common = [ROOT / "test.py", "--checkpoint", trained["run"], "--data", trained["data"], "--quiet", "--no-surface",
              "--no-figures", "--no-nifti"]
    bad = _run([*common, "--out", tmp_path / "a", "--setting", "2"])
    assert bad.returncode == 2 and "--setting 2 (the run has 1)" in bad.stderr
    bad = _run([*common, "--out", tmp_path / "b", "--folds", "1"])
    assert bad.returncode == 2 and "fold 0" in bad.stderr
    bad = _run([*common, "--out", tmp_path / "c", "--method", "support-copy"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    ok = _run([*common, "--out", tmp_path / "d"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    res = json.loads((tmp_path / "d" / "results.json").read_text())
    assert res["protocol"]["setting"] == 1 and res["protocol"]["exclusion"] == "any"
    assert [f["fold"] for f in res["folds"]] == [0]
    t = res["training"]
    assert (t["labels"], t["fold"], t["folds_protocol"], t["step"]) == ("supervoxel", 0, "canonical", 3)


def test_the_training_dataset_is_recognised_wherever_it_lies(trained, tmp_path):
    """RUN/data.json names the training data: a copy of the dataset in another folder (or a relative
    data.root seen from another working directory) still binds the run's fold."""
    import shutil

    ident = json.loads((trained["run"] / "data.json").read_text())
    assert ident["name"] == open_dataset(trained["data"]).name and ident["fold"] == 0 and ident["validation"]
    copy = tmp_path / "elsewhere"
    shutil.copytree(trained["data"], copy)
    bad = _run([ROOT / "test.py", "--checkpoint", trained["run"], "--data", copy, "--out", tmp_path / "o", "--quiet",
                "--folds", "2", "--no-surface", "--no-nifti", "--no-figures"])
    assert bad.returncode == 2 and "fold 0" in bad.stderr


def test_per_class_predictions_reproduce_the_scored_dice(trained, tmp_path):
    from fsmis.data.nifti import load_volume
    from fsmis.evaluation.metrics import dice

    out = tmp_path / "eval"
    proc = _run([ROOT / "test.py", "--checkpoint", trained["run"], "--data", trained["data"], "--out", out,
                 "--quiet", "--no-surface", "--no-figures"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    ds = open_dataset(trained["data"])
    fold = res["folds"][0]
    checked = 0
    for cls, per_case in fold["per_volume"].items():
        cid = ds.class_id(cls)
        for case, scored in per_case.items():
            f = out / "predictions" / "fold0" / f"pred_{case}_{cls}.nii.gz"
            case_data = ds.load_case(case)
            pred = load_volume(f, role="label", reference_affine=case_data.image_volume.stored_affine).array
            gt = case_data.label == cid
            zs = ds.class_slices(case, cls)
            kept = np.zeros(gt.shape[0], bool)
            kept[zs] = True  # EP1 scores the class's slice range
            assert dice(pred > 0, gt & kept[:, None, None]) == pytest.approx(scored, abs=1e-12), (case, cls)
            checked += 1
    assert checked >= 2
    assert (out / "predictions" / "fold0" / f"pred_{next(iter(fold['per_volume']['liver']))}.nii.gz").is_file()


def test_predict_py_gives_the_evaluators_mask(trained, tmp_path):
    out = tmp_path / "eval"
    proc = _run([ROOT / "test.py", "--checkpoint", trained["run"], "--data", trained["data"], "--out", out,
                 "--quiet", "--no-surface", "--no-figures", "--classes", "liver"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    fold = res["folds"][0]
    ds = open_dataset(trained["data"])
    case = next(iter(fold["per_volume"]["liver"]))
    zs = ds.class_slices(case, "liver")
    pred = tmp_path / "pred.nii.gz"
    proc = _run([ROOT / "tools" / "predict.py", "--checkpoint", trained["run"],
                 "--support-image", ds.image_path(fold["support"]), "--support-label", ds.label_path(fold["support"]),
                 "--label", ds.class_id("liver"), "--query-image", ds.image_path(case),
                 "--query-slices", f"{zs[0]}:{zs[-1] + 1}", "--as-stored", "--out", pred])
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = np.asarray(nib.load(str(pred)).dataobj) > 0
    b = np.asarray(nib.load(str(out / "predictions" / "fold0" / f"pred_{case}_liver.nii.gz")).dataobj) > 0
    assert a.shape == b.shape and np.array_equal(a, b)


def test_dry_run_reports_missing_data_after_the_weights(trained, tmp_path):
    proc = _run([ROOT / "train.py", "--config", trained["cfg"], "--dry-run", f"data.root={tmp_path / 'absent'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "status: OK" in proc.stdout and "NOT FOUND" in proc.stdout
    proc = _run([ROOT / "train.py", "--config", trained["cfg"], "--dry-run"])
    assert proc.returncode == 0 and "found" in proc.stdout and "validation cases" in proc.stdout


def test_weight_and_checkpoint_errors_exit_2_with_one_message(trained, tmp_path):
    proc = _run([ROOT / "train.py", "--config", trained["cfg"], "--dry-run", f"model.vae_path={tmp_path / 'novae'}"])
    assert proc.returncode == 2 and "model.vae_path" in proc.stderr and "Traceback" not in proc.stderr
    import shutil

    run = tmp_path / "broken"
    shutil.copytree(trained["run"], run)
    step = ck.resolve_checkpoint(run, "last")
    (step / "model.safetensors").write_bytes(b"not a safetensors file")
    for tool in (["test.py", "--data", trained["data"], "--out", tmp_path / "o"],
                 ["tools/predict.py", "--support-image", trained["data"] / "image_0.nii.gz",
                  "--support-label", trained["data"] / "label_0.nii.gz", "--label", "6",
                  "--query-image", trained["data"] / "image_1.nii.gz", "--out", tmp_path / "p.nii.gz"]):
        proc = _run([ROOT / tool[0], "--checkpoint", run, *tool[1:]])
        assert proc.returncode == 2, (tool[0], proc.stderr[-1500:])
        assert "error:" in proc.stderr and "model.safetensors" in proc.stderr and "Traceback" not in proc.stderr
