"""Intensity normalisation of a volume at load time (docs/protocol.md §3, "Network input").

Modes:
- ``"zscore"``: per-volume mean / std (most recent baselines; the project default);
- ``"minmax"``: per-volume min-max to [-1, 1] (SD-FSMIS);
- ``"global"``: mean / std of the training cases (SSL-ALPNet option), from :func:`global_stats`;
- ``"none"``: the stored values (already clipped by preprocessing), as float32.

Statistics are computed in float64 over the whole volume, once per volume.
"""
from __future__ import annotations

import numpy as np

MODES = ("zscore", "minmax", "global", "none")
_EPS = 1e-8


def normalize_volume(array: np.ndarray, mode: str = "zscore", stats: tuple[float, float] | None = None) -> np.ndarray:
    """Return a normalised float32 copy of ``array``.

    ``stats`` = (mean, std) is required for mode ``"global"`` and ignored otherwise.
    A constant volume maps to zeros under ``"zscore"`` and ``"minmax"`` (no division by 0).
    """
    a = np.asarray(array, dtype=np.float64)
    if mode == "zscore":
        mean, std = float(a.mean()), float(a.std())
        out = (a - mean) / std if std > _EPS else a - mean
    elif mode == "minmax":
        lo, hi = float(a.min()), float(a.max())
        out = 2.0 * (a - lo) / (hi - lo) - 1.0 if hi - lo > _EPS else np.zeros_like(a)
    elif mode == "global":
        if stats is None:
            raise ValueError("normalisation mode 'global' needs stats=(mean, std); compute them with global_stats(dataset, train_cases)")
        mean, std = float(stats[0]), float(stats[1])
        out = (a - mean) / std if std > _EPS else a - mean
    elif mode == "none":
        out = a
    else:
        raise ValueError(f"unknown normalisation mode {mode!r} ({' | '.join(MODES)})")
    return np.ascontiguousarray(out, dtype=np.float32)


def global_stats(dataset, case_ids) -> tuple[float, float]:
    """Mean and std over every voxel of ``case_ids`` (the training cases), in float64.

    Accumulated case by case (sum and sum of squares), so no concatenated copy is made.
    """
    n, s, ss = 0, 0.0, 0.0
    for cid in case_ids:
        img = np.asarray(dataset.load_case(cid).image, dtype=np.float64)
        n += img.size
        s += float(img.sum())
        ss += float(np.square(img).sum())
    if n == 0:
        raise ValueError("global_stats: no cases given")
    mean = s / n
    var = max(ss / n - mean * mean, 0.0)
    return mean, float(np.sqrt(var))
