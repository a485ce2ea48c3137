"""GT-label training with one held-out group (data.test_group): the class pool per dataset (known
answers from the released loader's id sets and from our class-name groups), the empty-pool error,
and test.py scoring the held-out group by default and recording a leak otherwise."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fsmis.data.episodes import EpisodeError, ConsecutiveSliceSampler, label_pool

ROOT = Path(__file__).resolve().parents[1]
CHAOS = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
SABS = {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4, "esophagus": 5, "liver": 6, "stomach": 7,
        "aorta": 8, "ivc": 9, "portal_splenic_vein": 10, "pancreas": 11, "right_adrenal": 12, "left_adrenal": 13}
CMR = {"LV-MYO": 200, "LV-BP": 500, "RV": 600}
ABD_TEST = ["liver", "spleen", "left_kidney", "right_kidney"]


def test_label_pools_known_answers():
    # the released loader: {1, 4} / {2, 3} by stored id ({1, 6} on SABS); nothing matches on Card-MRI
    assert label_pool("CHAOST2", CHAOS, ABD_TEST, 1, "released") == [2, 3]
    assert label_pool("CHAOST2", CHAOS, ABD_TEST, 2, "released") == [1, 4]
    assert label_pool("SABS", SABS, ABD_TEST, 1, "released") == [2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13]
    assert label_pool("SABS", SABS, ABD_TEST, 2, "released") == [1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert label_pool("CMR", CMR, list(CMR), 1, "released") == [200, 500, 600]
    # by class name: the same on the abdomen, meaningful on Card-MRI
    assert label_pool("CHAOST2", CHAOS, ABD_TEST, 1) == [2, 3]
    assert label_pool("SABS", SABS, ABD_TEST, 1) == [2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13]
    assert label_pool("CMR", CMR, list(CMR), 1) == [500, 600]
    assert label_pool("CMR", CMR, list(CMR), 2) == [200]
    # no group: every test class removed (empty on CHAOS)
    assert label_pool("CHAOST2", CHAOS, ABD_TEST) == []
    assert label_pool("SABS", SABS, ABD_TEST) == [4, 5, 7, 8, 9, 10, 11, 12, 13]
    with pytest.raises(ValueError, match="1 or 2"):
        label_pool("CHAOST2", CHAOS, ABD_TEST, 3)


class _Stub:
    name = "CHAOST2"
    classes = CHAOS
    test_classes = ABD_TEST
    case_ids = ["1"]

    def class_id(self, name):
        return CHAOS[name]


def test_an_empty_class_pool_names_the_switch():
    with pytest.raises(EpisodeError, match="data.test_group=1 or 2"):
        ConsecutiveSliceSampler(_Stub(), ["1"], labels="label", augment=None)
    s = ConsecutiveSliceSampler(_Stub(), ["1"], labels="label", augment=None, test_group=1)
    assert s.label_pool() == [2, 3] and s.config()["test_group"] == 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fsmis.data.phantom import make_phantom_dataset

    out = tmp_path_factory.mktemp("tg") / "ct"
    make_phantom_dataset(out, modality="ct", n_cases=5, seed=3, shape=(10, 48, 48), supervoxels=True, progress=False)
    return out


def test_test_py_scores_the_held_out_group_and_records_a_leak(tiny, tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "adnet_demo.yaml"),
                        "--out", str(run), "--quiet", "--device", "cpu", f"data.root={tiny}", "data.labels=label",
                        "data.test_group=1", "data.image_size=32", "data.min_fg_pixels=10", "train.max_steps=2",
                        "train.batch_size=2", "train.val_every=0", "train.ckpt_every=2", "train.warmup_steps=1",
                        "model.backbone_widths=[4, 4, 8, 8]", "model.feat_dim=8"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    base = [sys.executable, str(ROOT / "test.py"), "--checkpoint", str(run), "--data", str(tiny), "--quiet",
            "--no-figures", "--no-nifti", "--no-surface"]
    r = subprocess.run([*base, "--out", str(tmp_path / "held")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "held" / "results.json").read_text())
    assert set(res["protocol"]["test_classes"]) == {"liver", "spleen"}
    assert res["training"]["test_group"] == 1 and res["training"]["leak"] == []
    assert set(res["training"]["trained_on_test_classes"]) == {"left_kidney", "right_kidney"}
    r = subprocess.run([*base, "--out", str(tmp_path / "all"), "--classes", "liver", "spleen", "left_kidney",
                        "right_kidney"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "leaks" in r.stderr
    res = json.loads((tmp_path / "all" / "results.json").read_text())
    assert set(res["training"]["leak"]) == {"left_kidney", "right_kidney"}


def _crafted(root: Path, classes: dict, per_slice: list[int], test_labels=()):
    """One case: slice z holds ``per_slice[z]`` pixels of the first class (a block in the corner)."""
    import nibabel as nib
    import numpy as np

    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"name": "crafted", "labels": classes, "test_labels": list(test_labels)}))
    z = len(per_slice)
    lab = np.zeros((32, 32, z), np.int16)  # stored x, y, z
    first = next(iter(classes.values()))
    for k, n in enumerate(per_slice):
        flat = lab[:, :, k].reshape(-1)
        flat[:n] = first
        lab[:, :, k] = flat.reshape(32, 32)
    img = np.random.default_rng(0).normal(size=(32, 32, z)).astype(np.float32)
    nib.save(nib.Nifti1Image(img, np.eye(4)), root / "image_1.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), root / "label_1.nii.gz")
    return root


def test_size_rule_every_slice_or_the_larger_of_support_and_query(tmp_path):
    from fsmis.data.datasets import open_dataset

    ds = open_dataset(_crafted(tmp_path / "d", {"organ": 1, "other": 2}, [150, 250, 150, 199]))
    s = ConsecutiveSliceSampler(ds, ["1"], labels="label", augment=None, min_fg_pixels=200, size_rule="max")
    t = s._build_table("1")
    col = list(t.ids).index(1)
    assert t.run_valid[:, col].tolist() == [True, True, False]  # max(150, 250), max(250, 150), max(150, 199)
    every = ConsecutiveSliceSampler(ds, ["1"], labels="label", augment=None, min_fg_pixels=200)
    assert every._build_table("1").run_valid[:, col].tolist() == [False, False, False]
    with pytest.raises(EpisodeError, match="in every slice"):
        every.sample(0)
    ep = s.sample(0)
    assert {int(ep.support_masks.sum()), int(ep.query_masks.sum())} & {250}


def test_released_exclusion_is_all_on_the_abdomen_and_none_on_card_mri(tiny, tmp_path):
    from fsmis.data.datasets import open_dataset
    from fsmis.data.episodes import excluded_slices

    ds = open_dataset(tiny)
    for cid in ds.case_ids[:3]:
        assert excluded_slices(ds, cid, mode="released") == excluded_slices(ds, cid, mode="all")
    cmr = open_dataset(_crafted(tmp_path / "cmr", {"LV-MYO": 200, "LV-BP": 500, "RV": 600}, [300, 300, 300],
                                test_labels=["LV-MYO", "LV-BP", "RV"]))
    assert excluded_slices(cmr, "1", mode="released") == set()
    assert excluded_slices(cmr, "1", mode="any") == {0, 1, 2}
