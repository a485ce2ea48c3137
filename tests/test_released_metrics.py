"""The released script's per-slice distances in pixels (extra columns): known answers, and the
evaluator's extra columns."""
from __future__ import annotations

import numpy as np
import pytest

from fsmis.evaluation.metrics import released_slice_distances


def test_known_answers():
    gt = np.zeros((8, 8), bool)
    gt[2:5, 2:5] = True
    pred = np.zeros((8, 8), bool)
    pred[2:5, 3:6] = True  # shifted one column
    hd, assd = released_slice_distances(pred, gt)
    assert hd == pytest.approx(1.0) and assd == pytest.approx(0.5)
    # identical masks: zero; an empty prediction: undefined (dropped by the released mean)
    assert released_slice_distances(gt, gt) == (0.0, 0.0)
    assert released_slice_distances(np.zeros_like(gt), gt) == (None, None)
    # region-based HD95, not surface: a prediction inside the ground truth adds zeros
    big = np.zeros((20, 20), bool)
    big[2:18, 2:18] = True
    small = np.zeros((20, 20), bool)
    small[9:11, 9:11] = True
    d = released_slice_distances(small, big)[0]
    from scipy.ndimage import distance_transform_edt

    ref = np.percentile(np.concatenate([distance_transform_edt(~big)[small], distance_transform_edt(~small)[big]]), 95)
    assert d == pytest.approx(ref) and d > 0


def test_evaluator_adds_the_released_columns(tmp_path):
    from fsmis.data.datasets import open_dataset
    from fsmis.data.phantom import make_phantom_dataset
    from fsmis.evaluation.protocol import ProtocolConfig, evaluate
    from fsmis.evaluation.results import results_markdown
    from fsmis.methods.support_copy import SupportCopy

    data = tmp_path / "ct"
    make_phantom_dataset(data, modality="ct", n_cases=5, seed=3, shape=(10, 48, 48), supervoxels=False, progress=False)
    ds = open_dataset(data)
    plain = evaluate(ds, SupportCopy(), ProtocolConfig(fold_ids=[0], surface_metrics=False), progress=False)
    assert "hd95_px_2d_released" not in plain
    res = evaluate(ds, SupportCopy(), ProtocolConfig(fold_ids=[0], surface_metrics=False, released_slice_metrics=True),
                   progress=False)
    assert res["mean_dice"] == plain["mean_dice"]
    cls = res["protocol"]["test_classes"][0]
    assert res["hd95_px_2d_released"][cls] == res["folds"][0]["hd95_px_2d_released"][cls] >= 0
    assert res["protocol"]["released_slice_metrics"] is True
    assert "HD95 (px, 2D, released)" in results_markdown(res)


def test_pooled_dice_known_answer():
    """Released Dice: TP / FP / FN summed over the fold's query volumes, one Dice per class."""
    from fsmis.evaluation.metrics import Counts, pooled_dice

    a, b = Counts(tp=90, fp=10, fn=10), Counts(tp=10, fp=30, fn=30)
    assert pooled_dice([a, b]) == pytest.approx(200 / 280)
    assert (a.dice + b.dice) / 2 == pytest.approx(0.575)  # the per-volume mean, for contrast
