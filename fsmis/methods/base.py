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
    from ..engine.method import known_methods

    return sorted(set(_REGISTRY) | {m for m in known_methods() if m != "autoencoder"})


def build_predictor(name: str | None, config: str | None = None, checkpoint: str | None = None,
                    device: str | None = None, **kwargs) -> Predictor:
    """A predictor by name (methods without training, e.g. ``support-copy``), or the predictor of a
    trained run (``checkpoint``: its folder; the method and its settings come from the run)."""
    _load_builtin()
    if checkpoint is not None:
        if name in _REGISTRY:
            raise ValueError(f"{name} takes no checkpoint")
        from ..engine.runs import load_run

        run = load_run(checkpoint, config=config, device=device, **kwargs)
        if name is not None and name != run.cfg.method:
            raise ValueError(f"--method {name} but {run.run_dir} is a {run.cfg.method!r} run")
        return run.predictor()
    if name not in _REGISTRY:
        from ..engine.method import known_methods

        if name in known_methods():
            raise ValueError(f"method {name!r} is trained: give --checkpoint RUN_DIR (a train.py run folder)")
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name](config=config, checkpoint=checkpoint, **kwargs)


def _load_builtin() -> None:
    from . import support_copy  # noqa: F401  (registers itself)
