"""Canonical evaluator: protocol arithmetic and Dice on hand-made volumes with known answers."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fsmis.data.datasets import open_dataset
from fsmis.data.nifti import DataError
from fsmis.evaluation.metrics import Counts, confusion, dice, pooled_dice, surface_distances
from fsmis.evaluation.protocol import (ProtocolConfig, alpnet_chunks, ep1_chunks, evaluate,
                                       part_percentages, support_slice_indices)
from fsmis.methods.base import Predictor, build_predictor

ROOT = Path(__file__).resolve().parents[1]
Z, H, W = 10, 8, 8


def _write(folder: Path, cid: str, image_zyx, label_zyx, spacing=(1.0, 1.0, 3.0)):
    aff = np.diag([*spacing, 1.0])
    for kind, arr, dt in (("image", image_zyx, np.float32), ("label", label_zyx, np.int16)):
        nib.save(nib.Nifti1Image(np.transpose(arr, (2, 1, 0)).astype(dt), aff), str(folder / f"{kind}_{cid}.nii.gz"))


def _dataset(tmp_path: Path, labels: dict) -> Path:
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"name": "handmade", "modality": "CT", "labels": {"organ": 1}, "test_labels": ["organ"]}))
    rng = np.random.default_rng(0)
    for cid, lab in labels.items():
        _write(tmp_path, cid, rng.normal(size=lab.shape).astype(np.float32), lab)
    return tmp_path


def _support_label():
    """Class in slices 2..7; slice z is the block x < z - 1 (slice 3: x<2, 5: x<4, 7: x<6)."""
    lab = np.zeros((Z, H, W), np.int16)
    for z in range(2, 8):
        lab[z, :, : z - 1] = 1
    return lab


def _query_label(slices=range(1, 7), width=4):
    lab = np.zeros((Z, H, W), np.int16)
    for z in slices:
        lab[z, :, :width] = 1
    return lab


# -- arithmetic --------------------------------------------------------------------------------

def test_part_percentages_published_form():
    assert part_percentages(1) == [0.5]
    p = part_percentages(3)
    assert p[0] == 1 / 6 and p[1] == 0.5
    assert p[2] == 1 / (2 * 3) + 2 * (1 - 1 / 3) / (3 - 1)


@pytest.mark.parametrize("c_s,expected", [(1, [0, 0, 0]), (2, [0, 1, 1]), (3, [0, 1, 2]),
                                          (6, [1, 3, 5]), (7, [1, 3, 5]), (12, [2, 6, 10]),
                                          (13, [2, 6, 10])])
def test_support_slice_positions(c_s, expected):
    slices = np.arange(100, 100 + c_s)
    assert support_slice_indices(slices, 3) == [100 + e for e in expected]


def test_support_slices_follow_stored_order_with_gaps():
    assert support_slice_indices([4, 9, 11, 20, 21, 30], 3) == [9, 20, 30]
    with pytest.raises(ValueError):
        support_slice_indices([], 3)


def test_ep1_chunks_floor_linspace():
    chunks = ep1_chunks(np.arange(10, 17), 3)  # C_q = 7: floor(linspace(0,7,4)) = 0,2,4,7
    assert [c.tolist() for c in chunks] == [[10, 11], [12, 13], [14, 15, 16]]
    assert [c.tolist() for c in ep1_chunks([5, 6], 3)] == [[], [5], [6]]


def test_alpnet_chunks_equal_extent_cover_gaps():
    chunks = alpnet_chunks([1, 2, 5, 6], 3)
    assert [c.tolist() for c in chunks] == [[1, 2], [3, 4], [5, 6]]
    assert [c.tolist() for c in alpnet_chunks([4], 3)] == [[4], [], []]


# -- metrics ------------------------------------------------------------------------------------

def test_dice_known_answers_and_pooling():
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2] = True  # 8 voxels
    b[0, :1] = True  # 4 voxels, inside a
    assert confusion(a, b) == Counts(4, 4, 0)
    assert dice(a, b) == pytest.approx(8 / 12)
    assert pooled_dice([Counts(4, 4, 0), Counts(0, 0, 4)]) == pytest.approx(8 / 16)
    assert dice(np.zeros(3), np.zeros(3)) == 1.0


def test_dice_matches_monai():
    import torch
    from monai.metrics import compute_dice

    rng = np.random.default_rng(1)
    p = rng.random((6, 12, 12)) > 0.5
    g = rng.random((6, 12, 12)) > 0.4
    ref = compute_dice(torch.from_numpy(p)[None, None].float(), torch.from_numpy(g)[None, None].float())
    assert dice(p, g) == pytest.approx(float(ref), abs=1e-6)


def test_surface_distance_in_millimetres():
    gt = np.zeros((5, 20, 20), bool)
    gt[1:4, 5:10, 5:10] = True
    pred = np.roll(gt, 2, axis=2)  # shifted 2 voxels along x
    hd1, asd1 = surface_distances(pred, gt, (3.0, 1.0, 1.0))
    hd2, asd2 = surface_distances(pred, gt, (3.0, 1.0, 2.5))
    assert hd1 == pytest.approx(2.0, abs=1e-6)
    assert hd2 == pytest.approx(5.0, abs=1e-6)  # same voxels, 2.5 mm pixels along x
    assert asd2 > asd1 > 0
    assert surface_distances(np.zeros_like(gt), gt, (1, 1, 1)) == (None, None)


# -- the evaluator on hand-made volumes -----------------------------------------------------------

def _explicit(**kw):
    return ProtocolConfig(support_case="0", query_cases=["1"], surface_metrics=False, **kw)


def test_support_copy_known_dice(tmp_path):
    ds = open_dataset(_dataset(tmp_path, {"0": _support_label(), "1": _query_label()}))
    res = evaluate(ds, build_predictor("support-copy"), _explicit(), progress=False)
    # chunks {1,2},{3,4},{5,6} get support slices 3 (x<2), 5 (x<4), 7 (x<6); query is x<4:
    # TP = 2*16 + 2*32 + 2*32 = 160, FP = 2*16, FN = 2*16
    assert res["folds"][0]["support_slices"]["organ"] == [3, 5, 7]
    assert res["folds"][0]["counts"]["organ"]["1"] == {"tp": 160, "fp": 32, "fn": 32}
    assert res["mean_dice"] == pytest.approx(320 / 384)
    assert res["per_class"]["organ"] == pytest.approx(320 / 384)
    assert res["protocol"]["chunking"] == "ep1" and res["protocol"]["support"] == "1shot"


def test_three_shot_support_majority(tmp_path):
    ds = open_dataset(_dataset(tmp_path, {"0": _support_label(), "1": _query_label()}))
    res = evaluate(ds, build_predictor("support-copy"), _explicit(support="3shot"), progress=False)
    assert res["mean_dice"] == pytest.approx(1.0)  # majority of x<2, x<4, x<6 is x<4


def test_alpnet_chunking_counts_false_positives_in_gaps(tmp_path):
    q = _query_label(slices=[1, 2, 5, 6])
    ds = open_dataset(_dataset(tmp_path, {"0": _support_label(), "1": q}))
    ep1 = evaluate(ds, build_predictor("support-copy"), _explicit(), progress=False)
    alp = evaluate(ds, build_predictor("support-copy"), _explicit(chunking="alpnet"), progress=False)
    # EP1: chunks {1},{2},{5,6} -> x<2, x<4, x<6: TP 16+32+64, FP 32, FN 16
    assert ep1["folds"][0]["counts"]["organ"]["1"] == {"tp": 112, "fp": 32, "fn": 16}
    # ALPNet: slices 1..6 all predicted; chunks {1,2},{3,4},{5,6}: slices 3,4 are pure FP (32 each)
    assert alp["folds"][0]["counts"]["organ"]["1"] == {"tp": 16 * 2 + 32 * 2, "fp": 32 * 2 + 16 * 2, "fn": 32}


def test_pooled_and_per_volume_dice_differ(tmp_path):
    small = np.zeros((Z, H, W), np.int16)
    small[3:6, :1, :1] = 1  # a tiny structure, badly segmented
    ds = open_dataset(_dataset(tmp_path, {"0": _support_label(), "1": _query_label(), "2": small}))
    cfg = dict(support_case="0", query_cases=["1", "2"], surface_metrics=False)
    pv = evaluate(ds, build_predictor("support-copy"), ProtocolConfig(**cfg), progress=False)
    po = evaluate(ds, build_predictor("support-copy"), ProtocolConfig(dice="pooled", **cfg), progress=False)
    d1 = 320 / 384
    c2 = pv["folds"][0]["counts"]["organ"]["2"]
    d2 = 2 * c2["tp"] / (2 * c2["tp"] + c2["fp"] + c2["fn"])
    assert pv["mean_dice"] == pytest.approx((d1 + d2) / 2)
    pooled = 2 * (160 + c2["tp"]) / (2 * (160 + c2["tp"]) + 32 + c2["fp"] + 32 + c2["fn"])
    assert po["mean_dice"] == pytest.approx(pooled)
    assert pv["mean_dice_pooled"] == pytest.approx(pooled)
    assert abs(pv["mean_dice"] - po["mean_dice"]) > 0.05


def test_class_absent_from_support_case_is_an_error(tmp_path):
    empty = np.zeros((Z, H, W), np.int16)
    ds = open_dataset(_dataset(tmp_path, {"0": empty, "1": _query_label()}))
    with pytest.raises(DataError, match="absent from support case 0"):
        evaluate(ds, build_predictor("support-copy"), _explicit(), progress=False)


class _Oracle(Predictor):
    """Returns the true query masks: checks the evaluator hands over the right slices."""
    name = "oracle"
    normalization = "none"

    def __init__(self, truth):
        self.truth = truth  # {image slice bytes: mask}

    def predict(self, support_images, support_masks, query_images):
        return np.stack([self.truth[q.tobytes()] for q in query_images]).astype(np.float32)


def test_folds_every_case_queried_once_and_oracle_is_perfect(tmp_path):
    labels = {str(i): _query_label(slices=range(1 + i % 3, 7), width=2 + i % 4) for i in range(10)}
    root = _dataset(tmp_path, labels)
    ds = open_dataset(root)
    truth = {}
    for cid in ds.case_ids:
        c = ds.load_case(cid)
        for z in range(Z):
            truth[c.image[z].tobytes()] = (c.label[z] == 1)
    res = evaluate(ds, _Oracle(truth), ProtocolConfig(surface_metrics=False), progress=False)
    queried = [q for f in res["folds"] for q in f["queries"]]
    assert sorted(queried, key=int) == [str(i) for i in range(10)]
    assert res["mean_dice"] == pytest.approx(1.0)
    assert [f["support"] for f in res["folds"]] == ["2", "4", "6", "8", "0"]


def test_test_py_cli_writes_documented_schema(tmp_path):
    (tmp_path / "data").mkdir()
    data = _dataset(tmp_path / "data", {"0": _support_label(), "1": _query_label(), "2": _query_label(width=3)})
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "test.py"), "--method", "support-copy", "--data", str(data),
           "--out", str(out), "--support-case", "0", "--query-cases", "1", "2", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    for key in ("mean_dice", "per_class", "folds", "protocol"):
        assert key in res
    f = res["folds"][0]
    assert set(f) >= {"fold", "support", "queries", "per_volume"}
    assert f["support"] == "0" and f["queries"] == ["1", "2"]
    assert set(f["per_volume"]["organ"]) == {"1", "2"}
    assert 0.0 <= res["mean_dice"] <= 1.0
    assert res["protocol"]["support_case"] == "0"
    assert (out / "results.csv").read_text().count("\n") == 3
    assert "organ" in (out / "results.md").read_text()
    pred = nib.load(str(out / "predictions" / "explicit" / "pred_1.nii.gz"))
    assert pred.shape == (W, H, Z)
    assert (out / "figures" / "explicit.png").stat().st_size > 1000
    # a bad case id exits non-zero with a message naming the case
    bad = subprocess.run(cmd[:-4] + ["--support-case", "9", "--query-cases", "1"], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == 2 and "'9'" in bad.stderr
