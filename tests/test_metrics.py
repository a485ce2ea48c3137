"""One Dice for the whole project: the evaluator's pooled Dice and the dataset comparison's
Dice are :mod:`fsmis.evaluation.metrics`, with their conventions for empty masks."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fsmis.data.datasets import open_dataset
from fsmis.evaluation.metrics import Counts, confusion, dice, pooled_dice
from fsmis.evaluation.protocol import ProtocolConfig, evaluate

Z, H, W = 9, 10, 10


class _ImageIsPrediction:
    """A predictor whose prediction is its query image thresholded at 0.5: the test writes the
    prediction it wants into the query case's image."""

    name = "image-is-prediction"
    normalization = "none"

    def predict(self, support_images, support_masks, query_images):
        return np.asarray(query_images) > 0.5

    def describe(self) -> dict:
        return {"method": self.name}


def _write(folder: Path, cid: str, image_zyx, label_zyx):
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    for kind, arr, dt in (("image", image_zyx, np.float32), ("label", label_zyx, np.int16)):
        nib.save(nib.Nifti1Image(np.transpose(arr, (2, 1, 0)).astype(dt), aff), str(folder / f"{kind}_{cid}.nii.gz"))


def _crafted(tmp_path: Path) -> tuple[Path, dict]:
    """Support case 0 and queries 1, 2 with two classes; returns the root and, per query, the
    (prediction, label) arrays written."""
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"name": "crafted", "modality": "CT", "labels": {"a": 1, "b": 2}, "test_labels": ["a", "b"]}))
    sup = np.zeros((Z, H, W), np.int16)
    sup[1:8, 2:6, 2:6] = 1
    sup[2:7, 6:9, 6:9] = 2
    _write(tmp_path, "0", np.zeros((Z, H, W)), sup)
    rng = np.random.default_rng(7)
    written = {}
    for cid in ("1", "2"):
        lab = np.zeros((Z, H, W), np.int16)
        lab[1:7, 1:6, 1:6] = 1
        lab[3:8, 6:10, 5:9] = 2
        pred = rng.random((Z, H, W)) < np.where(lab > 0, 0.8, 0.1)  # pred of either class
        _write(tmp_path, cid, pred.astype(np.float32), lab)
        written[cid] = (pred, lab)
    return tmp_path, written


def test_evaluator_pooled_dice_is_metrics_pooled_dice(tmp_path):
    root, written = _crafted(tmp_path)
    cfg = ProtocolConfig(support_case="0", query_cases=["1", "2"], surface_metrics=False)
    res = evaluate(open_dataset(root), _ImageIsPrediction(), cfg, progress=False)
    fold = res["folds"][0]
    for cls, cid in (("a", 1), ("b", 2)):
        counts = []
        for q, (pred, lab) in written.items():
            kept = (lab == cid).any(axis=(1, 2))  # EP1 predicts exactly the class's slices
            c = confusion(pred & kept[:, None, None], (lab == cid) & kept[:, None, None])
            assert fold["counts"][cls][q] == {"tp": c.tp, "fp": c.fp, "fn": c.fn}
            assert fold["per_volume"][cls][q] == dice(pred & kept[:, None, None], (lab == cid) & kept[:, None, None])
            counts.append(c)
        expected = pooled_dice(counts)
        total = Counts(sum(c.tp for c in counts), sum(c.fp for c in counts), sum(c.fn for c in counts))
        assert expected == 2 * total.tp / (2 * total.tp + total.fp + total.fn)
        assert fold["per_class_pooled"][cls] == expected
        assert res["per_class_pooled"][cls] == expected
    assert res["mean_dice_pooled"] == pytest.approx(np.mean([fold["per_class_pooled"][c] for c in "ab"]))


def test_empty_conventions():
    none = np.zeros((2, 3, 3), bool)
    some = none.copy()
    some[0, 0, 0] = True
    # MONAI-compatible default: two empty masks agree perfectly
    assert dice(none, none) == 1.0 and pooled_dice([]) == 1.0 and pooled_dice([Counts(0, 0, 0)]) == 1.0
    # the "nothing to measure" convention of the evaluator's pooled Dice and the dataset comparison
    assert dice(none, none, empty=None) is None and pooled_dice([Counts(0, 0, 0)], empty=None) is None
    assert dice(some, none, empty=None) == 0.0 and dice(some, some, empty=None) == 1.0


def test_dataset_comparison_dice_is_metrics_dice():
    from fsmis.data.prepare.compare import dice as compare_dice

    rng = np.random.default_rng(3)
    a, b = rng.random((4, 8, 8)) > 0.5, rng.random((4, 8, 8)) > 0.3
    assert compare_dice(a, b) == dice(a, b)
    assert compare_dice(a, b) == 2.0 * int((a & b).sum()) / (int(a.sum()) + int(b.sum()))
    empty = np.zeros((4, 8, 8), bool)
    assert compare_dice(empty, empty) is None  # absent from both folders
    assert compare_dice(a, empty) == 0.0


def test_evaluator_pooled_dice_of_a_class_never_queried_is_none(tmp_path):
    root, _ = _crafted(tmp_path)
    lab = np.zeros((Z, H, W), np.int16)
    lab[2:5, 1:6, 1:6] = 1  # class b absent: skipped, no counts
    _write(root, "3", (lab == 1).astype(np.float32), lab)
    cfg = ProtocolConfig(support_case="0", query_cases=["3"], surface_metrics=False)
    res = evaluate(open_dataset(root), _ImageIsPrediction(), cfg, progress=False)
    assert res["folds"][0]["per_class_pooled"] == {"a": 1.0, "b": None}
    assert res["folds"][0]["skipped"] == [{"case": "3", "class": "b", "reason": "class absent from the query case"}]
