"""Overlap and surface metrics. Surface distances come from MONAI, in millimetres.

The one Dice of the project. It is computed from confusion counts (TP, FP, FN) so that the
per-volume and the pooled variants share one definition: ``2 TP / (2 TP + FP + FN)``.

Two empty masks (``2 TP + FP + FN = 0``) have no overlap to measure; their Dice is ``empty``:
1.0 by default (an empty prediction of an empty structure is correct; MONAI's ``compute_dice``
with ``ignore_empty=False``), or e.g. ``None`` where such a pair is to be left out of a mean.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class Counts:
    tp: int
    fp: int
    fn: int

    @property
    def dice(self) -> float:
        return self.dice_or(1.0)

    def dice_or(self, empty):
        """``2 TP / (2 TP + FP + FN)``, or ``empty`` when both masks are empty."""
        denom = 2 * self.tp + self.fp + self.fn
        return float(2 * self.tp / denom) if denom > 0 else empty

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)


def confusion(pred: np.ndarray, gt: np.ndarray) -> Counts:
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    tp = int(np.count_nonzero(pred & gt))
    return Counts(tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(gt)) - tp)


def dice(pred: np.ndarray, gt: np.ndarray, empty=1.0):
    """Dice of two boolean masks of one shape; ``empty`` when both are empty."""
    return confusion(pred, gt).dice_or(empty)


def pooled_dice(counts, empty=1.0):
    """Dice of the summed counts (one Dice over several volumes); ``empty`` when the sum has
    no foreground at all, including when ``counts`` is empty."""
    total = Counts(0, 0, 0)
    for c in counts:
        total = total + c
    return total.dice_or(empty)


def surface_distances(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[float | None, float | None]:
    """(HD95, symmetric average surface distance) in mm, via MONAI, on the union's bounding box.

    ``spacing`` follows the array's axis order. Returns (None, None) when either mask is empty
    (the distance is undefined; such volumes are counted, not averaged)."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if not pred.any() or not gt.any():
        return None, None
    union = pred | gt
    idx = np.nonzero(union)
    sl = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in idx)
    p = torch.from_numpy(np.ascontiguousarray(pred[sl]))[None, None]
    g = torch.from_numpy(np.ascontiguousarray(gt[sl]))[None, None]
    spacing = [float(s) for s in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=spacing)
        asd = compute_average_surface_distance(p, g, include_background=True, symmetric=True, spacing=spacing)
    hd, asd = float(hd.reshape(-1)[0]), float(asd.reshape(-1)[0])
    return (hd if np.isfinite(hd) else None), (asd if np.isfinite(asd) else None)


def released_slice_distances(pred: np.ndarray, gt: np.ndarray) -> tuple[float | None, float | None]:
    """The released SD-FSMIS script's per-slice distances of one 2D slice, in PIXELS (spacing [1, 1]).

    HD95 as released: not a surface distance: the 95th percentile (numpy, linear) of the distance
    to the ground truth of every predicted pixel together with the distance to the prediction of
    every ground-truth pixel (overlapping pixels add zeros). ASSD as medpy's ``assd``: the mean of
    the two directed mean distances between the borders (mask XOR its 4-connected erosion).
    (None, None) when either mask is empty (the released script records inf and drops it)."""
    from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if not p.any() or not g.any():
        return None, None
    d_to_g = distance_transform_edt(~g)
    d_to_p = distance_transform_edt(~p)
    hd95 = float(np.percentile(np.concatenate([d_to_g[p], d_to_p[g]]), 95))
    st = generate_binary_structure(2, 1)
    pb = p ^ binary_erosion(p, structure=st, iterations=1)
    gb = g ^ binary_erosion(g, structure=st, iterations=1)
    asd_pg = float(distance_transform_edt(~gb)[pb].mean())
    asd_gp = float(distance_transform_edt(~pb)[gb].mean())
    return hd95, (asd_pg + asd_gp) / 2.0
