"""The one predictor interface every method implements, and the method registry.

A predictor is given, for one evaluation chunk, K support slices with their binary masks and
Q query slices (all already normalised per volume as the predictor asks through
``normalization``), and returns Q masks or foreground probabilities. The evaluator,
``tools/predict.py`` and every baseline go through this one call.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


class Predictor:
    """Base class. Subclasses set ``name``/``normalization`` and implement :meth:`predict`."""

    name: str = "base"
    # per-volume intensity normalisation applied before slices reach the predictor:
    # "zscore" | "minmax" (to [-1, 1]) | "none"
    normalization: str = "zscore"

    def predict(self, support_images: np.ndarray, support_masks: np.ndarray,
                query_images: np.ndarray) -> np.ndarray:
        """support_images [K, H, W] float32, support_masks [K, H, W] {0,1},
        query_images [Q, H, W] float32 -> [Q, H, W] masks ({0,1}) or probabilities in [0, 1]."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"method": self.name, "normalization": self.normalization}


_REGISTRY: dict[str, Callable[..., Predictor]] = {}


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory
    return deco


def available_methods() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def build_predictor(name: str, config: str | None = None, checkpoint: str | None = None,
                    **kwargs) -> Predictor:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](config=config, checkpoint=checkpoint, **kwargs)


def _load_builtin() -> None:
    from . import sdfsmis, support_copy  # noqa: F401  (register themselves)
