"""The interface between the training engine and a method, and the method registry.

The trainer (:mod:`fsmis.engine.trainer`) calls only what is defined here; it names no method.
A method is a class with:

- ``model_config`` / ``data_config``: the dataclasses of its ``model:`` and ``data:`` config
  sections (unknown keys are errors);
- :meth:`Method.setup_data` and :meth:`Method.build` (the data it trains on; the model, with a
  load report of where each part came from);
- :meth:`Method.param_groups` (parameters with their learning rates), :meth:`Method.batch`
  (the micro-batch of an optimiser step) and :meth:`Method.loss`;
- :meth:`Method.trained_state` / :meth:`Method.load_trained_state` (what a checkpoint holds),
  :meth:`Method.frozen_state` (frozen tensors no file provides, saved once per run), and
  :meth:`Method.rng_state` for methods that draw from stateful random streams;
- optionally :meth:`Method.predictor` (a :class:`~fsmis.methods.base.Predictor` over the
  trained model) and :meth:`Method.validate`, :meth:`Method.preview` and :meth:`Method.finalize`.

``method:`` in a config is a registered name (``sdfsmis``, ``autoencoder``, ``generator``, the baselines
``panet``, ``alpnet``, ``adnet``, ``universeg``) or an import path
``package.module:Class``, so a new method needs no engine change.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig


class Method:
    """Base class of a trainable method. ``cfg`` is the whole :class:`~fsmis.config.Config`."""

    name: str = "method"
    supports_genaug: bool = False  # whether genaug.ratio > 0 (synthetic training episodes) is accepted
    model_config: type = dict  # dataclass of the ``model:`` section
    data_config: type = DataConfig  # dataclass of the ``data:`` section

    def __init__(self, cfg, device: torch.device | str = "cpu", rank: int = 0, world: int = 1):
        self.cfg = cfg
        self.device = torch.device(device)
        self.rank = rank
        self.world = world
        self.module: torch.nn.Module | None = None
        self.load_report = None

    # -- building ----------------------------------------------------------------------------
    def setup_data(self) -> None:
        """Open the training data (raises DataError / ConfigError naming the problem)."""

    def describe_data(self) -> list[tuple[str, str]]:
        """(what, value) rows describing the training data, for ``train.py --dry-run``."""
        return []

    def data_identity(self) -> dict | None:
        """What identifies the training data (saved as RUN/data.json), e.g. for test.py to tell
        whether it evaluates on the training dataset itself."""
        return None

    def build(self) -> None:
        """Build ``self.module`` (every parameter that trains lives in it) and ``self.load_report``."""
        raise NotImplementedError

    def parameter_counts(self) -> dict:
        m = self.module
        return {"total": sum(p.numel() for p in m.parameters()),
                "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad)}

    # -- optimisation --------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """AdamW parameter groups, each with its ``lr``."""
        return [{"params": [p for p in self.module.parameters() if p.requires_grad], "lr": self.cfg.train.lr}]

    def batch(self, step: int, micro: int) -> Any:
        """The inputs of micro-batch ``micro`` of optimiser step ``step``, on the device."""
        raise NotImplementedError

    def loss(self, batch, generator: torch.Generator) -> torch.Tensor:
        """Scalar training loss of one micro-batch. ``generator`` is seeded by (seed, step, micro, rank)."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint saves (live tensors: EMA averages them)."""
        return {k: v for k, v in self.module.state_dict().items()}

    def load_trained_state(self, tensors: dict[str, torch.Tensor], source: str) -> int:
        from .checkpoints import load_state_strict

        return load_state_strict(self.trained_state(), tensors, source)

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Frozen tensors that no weight file provides (randomly initialised); saved once in the run
        so that the trained run reloads with exactly them."""
        return {}

    def load_frozen_state(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        from .checkpoints import load_state_strict

        load_state_strict(self.frozen_state(), tensors, source)

    def rng_state(self) -> dict:
        """JSON-able state of stateful random streams (default: none; the engine's are counter-based)."""
        return {}

    def load_rng_state(self, state: dict) -> None:
        pass

    # -- evaluation and output -----------------------------------------------------------------
    def predictor(self):
        """A Predictor over the current model, or None for a method that does not segment."""
        return None

    def validate(self) -> float | None:
        """Validation score (higher is better) or None."""
        return None

    def preview(self, step: int) -> torch.Tensor | None:
        """An image [C, H, W] in [0, 1] for TensorBoard, or None."""
        return None

    def scalars(self, step: int) -> dict:
        """Extra TensorBoard scalars after optimiser step ``step`` (e.g. episode counts)."""
        return {}

    def summary_facts(self, step: int) -> dict:
        """Facts merged into train_summary.json after ``step`` steps (e.g. ``{"episodes": {...}}``)."""
        return {}

    def finalize(self, run_dir: Path, summary: dict) -> list[Path]:
        """Called once training reached ``max_steps``: write exported files, return their paths."""
        return []


_BUILTIN = {
    "sdfsmis": "fsmis.methods.sdfsmis:SDFSMISMethod",
    "autoencoder": "fsmis.methods.autoencoder:AutoencoderMethod",
    "generator": "fsmis.genaug.generator:GeneratorMethod",
    "panet": "fsmis.methods.baselines:PANetMethod",
    "alpnet": "fsmis.methods.baselines:ALPNetMethod",
    "adnet": "fsmis.methods.baselines:ADNetMethod",
    "universeg": "fsmis.methods.baselines:UniverSegMethod",
}
_REGISTRY: dict[str, type] = {}


def register_method(cls):
    """Class decorator: make ``cls`` available as ``method: <cls.name>``."""
    _REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type:
    """The Method class for a config's ``method:`` (a registered name or ``module:Class``)."""
    from ..config import ConfigError

    if name in _REGISTRY:
        return _REGISTRY[name]
    target = _BUILTIN.get(name, name if ":" in str(name) else None)
    if target is None:
        raise ConfigError(f"method: unknown method {name!r} (known: {', '.join(sorted(set(_BUILTIN) | set(_REGISTRY)))}, "
                          "or an import path package.module:Class)")
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"method: cannot import {target!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method: {target!r} is not a fsmis.engine.method.Method subclass")
    _REGISTRY[name] = cls
    return cls


def method_with_data(cfg, device: torch.device | str = "cpu", rank: int = 0, world: int = 1) -> Method:
    """``cfg``'s method with its training data opened and no model built: what the trainer starts
    from, and all that drawing episodes or the data's identity (RUN/data.json) needs."""
    method = method_class(cfg.method)(cfg, device, rank, world)
    if cfg.genaug.ratio > 0 and not method.supports_genaug:
        from ..config import ConfigError

        raise ConfigError(f"genaug.ratio={cfg.genaug.ratio:g}: method {cfg.method!r} does not train on episodes; "
                          "synthetic episodes are for the episodic methods (genaug.ratio=0)")
    method.setup_data()
    return method


def known_methods() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTRY))


__all__ = ["Method", "register_method", "method_class", "method_with_data", "known_methods"]
