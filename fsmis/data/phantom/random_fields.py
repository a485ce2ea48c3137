"""Random draws and smooth random fields of the phantom generator.

Every random number of a case comes from the one ``numpy.random.Generator`` passed down, in a
fixed order: changing the order of draws changes every case after it.
"""
from __future__ import annotations

import numpy as np


def _u(rng: np.random.Generator, lo, hi) -> float:
    """One uniform draw in [lo, hi)."""
    return float(rng.uniform(lo, hi))


def _jit(rng: np.random.Generator, j) -> float:
    """One uniform jitter in [-j, j)."""
    return _u(rng, -j, j)


def _interp_matrix(n_out: int, n_grid: int) -> np.ndarray:
    g = np.linspace(0.0, n_grid - 1.0, n_out)
    w = np.exp(-0.5 * ((g[:, None] - np.arange(n_grid)[None, :]) / 0.6) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape, grid) -> np.ndarray:
    """A smooth random field of ``shape`` (about unit std) interpolated from a random grid.

    Separable Gaussian-weighted interpolation done with three small matrix products (timing:
    docs/measurements/data_and_evaluation.md).
    """
    grid = tuple(max(2, int(g)) for g in grid)
    g = rng.standard_normal(grid).astype(np.float32)
    wz, wy, wx = (_interp_matrix(int(n), m) for n, m in zip(shape, grid))
    a = np.tensordot(g, wx, axes=([2], [1]))      # (gz, gy, X)
    a = np.tensordot(a, wy, axes=([1], [1]))      # (gz, X, Y)
    a = np.tensordot(a, wz, axes=([0], [1]))      # (X, Y, Z)
    out = np.ascontiguousarray(np.transpose(a, (2, 1, 0)))
    # the interpolation averages neighbouring nodes: restore about unit variance
    scale = float(np.sqrt((wz ** 2).sum(1).mean() * (wy ** 2).sum(1).mean() * (wx ** 2).sum(1).mean()))
    out /= max(scale, 1e-6)
    return out
