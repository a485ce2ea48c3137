"""preset: released: it sets every switch it names (each stays a switch; the command line wins), a
saved run config reloads exactly, and a run with it trains on CHAOS-like phantom data (four
abdominal organs with the CHAOS ids) and is scored by test.py --preset released."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fsmis.config import PRESETS, ConfigError, load_config

from _tiny_sd import TINY

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sdfsmis_abd_mri_setting1.yaml"


def _get(cfg, key):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def test_the_preset_sets_every_switch_it_names():
    cfg = load_config(CONFIG, ["preset=released"])
    for key, value in PRESETS["released"].items():
        assert _get(cfg, key) == value, key
    assert cfg.preset is None and cfg.preset_applied == "released"
    plain = load_config(CONFIG)
    assert plain.preset_applied is None and plain.data.labels == "supervoxel" and plain.model.vtct_crop == "aligned"
    # the command line wins over the preset; the resolved config reloads as it is (no second expansion)
    cfg = load_config(CONFIG, ["preset=released", "data.n_val=1", "data.size_rule=every"])
    assert cfg.data.n_val == 1 and cfg.data.size_rule == "every" and cfg.data.labels == "label"


def test_a_saved_config_reloads_exactly(tmp_path):
    cfg = load_config(CONFIG, ["preset=released", "data.n_val=1"])
    saved = tmp_path / "config.yaml"
    saved.write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_config(saved)
    assert again.to_dict() == cfg.to_dict()


def test_the_preset_is_refused_where_it_does_not_apply():
    with pytest.raises(ConfigError, match="preset 'released' is for method sdfsmis"):
        load_config(ROOT / "configs" / "adnet_demo.yaml", ["preset=released"])
    with pytest.raises(ConfigError, match="unknown"):
        load_config(CONFIG, ["preset=paper"])


@pytest.fixture(scope="module")
def chaos_like(tmp_path_factory):
    """The tiny phantom relabelled with the CHAOS ids (liver 1, RK 2, LK 3, spleen 4; nothing else)."""
    import nibabel as nib

    from fsmis.data.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("chaos")
    src = root / "ct"
    make_phantom_dataset(src, modality="ct", n_cases=10, seed=3, shape=(10, 48, 48), supervoxels=True, progress=False)
    out = root / "chaos_like"
    shutil.copytree(src, out)
    meta = json.loads((src / "dataset.json").read_text())
    old = meta["labels"]
    new = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
    for lab in sorted(out.glob("label_*.nii.gz")):
        img = nib.load(str(lab))
        a = np.asarray(img.dataobj)
        b = np.zeros_like(a)
        for name, i in new.items():
            b[a == old[name]] = i
        nib.save(nib.Nifti1Image(b, img.affine, img.header), str(lab))
    meta.update(name="chaos_like", labels=new, test_labels=list(new))
    (out / "dataset.json").write_text(json.dumps(meta))
    return out


def test_a_released_run_trains_on_chaos_like_data_and_is_scored_as_released(chaos_like, tmp_path):
    raw = yaml.safe_load(CONFIG.read_text())
    raw["data"].update(root=str(chaos_like), image_size=64, min_fg_pixels=10)  # no support mask lost to a resize
    raw["model"] = {"unet": TINY["unet"], "vae": TINY["vae"], "vtct_encoder": "none", "vtct_hidden": 16,
                    "vtct_depth": 1, "vtct_feat_dim": 16}
    raw["train"].update(max_steps=3, batch_size=2, grad_accum=1, ckpt_every=3, val_every=0, image_every=0)
    raw["preset"] = "released"
    cfg_path = tmp_path / "released.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg_path), "--out", str(run), "--quiet",
                        "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = load_config(run / "config.yaml")
    assert saved.preset_applied == "released" and saved.data.labels == "label" and saved.data.n_val == 0
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, str(ROOT / "test.py"), "--checkpoint", str(run), "--data", str(chaos_like),
                        "--out", str(out), "--preset", "released", "--quiet", "--no-figures", "--no-nifti",
                        "--no-surface", "--folds", "0"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    proto = res["protocol"]
    assert (proto["preset"], proto["folds"], proto["supp_idx"], proto["support"], proto["dice"]) == (
        "released", "legacy", 2, "3shot", "pooled")
    assert proto["released_slice_metrics"] and "hd95_px_2d_released" in res
    assert set(proto["test_classes"]) == {"liver", "right_kidney", "left_kidney", "spleen"}
    assert res["training"]["preset"] == "released"
    assert set(res["training"]["leak"]) == {"left_kidney", "right_kidney"}  # group 1 trained on the kidneys
