"""Experiment configuration: typed dataclasses, YAML files and ``key=value`` overrides.

A config file holds any subset of the sections below; everything else takes the documented
default. ``train.py --config C data.root=DIR train.max_steps=100`` overrides single keys
(values parsed as YAML: numbers, booleans, lists, null). Unknown keys are errors, so a typo
never silently falls back to a default. The resolved config is saved in every run folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    root: str | None = None  # dataset root (benchmark folder, *_normalized folder, or dataset.json folder)
    fold: int = 0
    protocol: str = "canonical"  # canonical | legacy
    supp_idx: int = 2
    setting: int = 1  # 1 | 2
    exclusion: str = "any"  # any | all | released (Setting 2; released: all on the abdomen, none on Card-MRI)
    size_rule: str = "every"  # every: each slice of an episode >= min_fg_pixels | max: the larger of support and query (released)
    labels: str = "supervoxel"  # supervoxel (self-supervised) | label (GT organs: the test classes, or data.test_group, removed)
    test_group: int | None = None  # labels=label: remove only this held-out group (1: liver + spleen / LV-MYO; 2: kidneys / LV-BP + RV)
    test_group_ids: str = "names"  # names (the group's classes) | released (the released loader's stored ids: no effect on Card-MRI)
    n_val: int = 1  # training cases held out for checkpoint selection
    min_fg_pixels: int = 200
    image_size: int = 256
    augment: bool = True
    augment_mode: str = "protocol"  # protocol (docs/protocol.md §5: one side, fresh fields) | released (independent sides, fixed field, fill 0)
    shift_px: int = 0  # random shift (pixels) of support and query, against position copying
    sampler: str = "consecutive"  # consecutive (ADNet family, SD-FSMIS) | same_slice (SSL-ALPNet: two augmentations of one slice)
    n_shot: int = 1  # support slices per training episode
    pseudolabels: str | None = None  # pseudo-label folder (e.g. superpixels_400: SSL-ALPNet's 2D superpixels); default: the supervoxels


@dataclass
class TrainConfig:
    max_steps: int = 15000  # optimiser steps
    batch_size: int = 1  # episodes per micro-batch
    grad_accum: int = 4
    lr: float = 1e-5  # UNet
    vtct_lr_mult: float = 5.0  # VTCT MLP at 5x
    weight_decay: float = 1e-2
    clip_grad: float = 1.0  # gradient-norm clipping; 0 = none
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    grad_checkpointing: bool = False
    fused_optimizer: bool = True  # fused AdamW kernel on CUDA (no effect on CPU)
    cache_latents: bool = False  # encode each training slice / mask once (needs augment off, no shifts)
    ema: float = 0.0  # EMA decay of the trained weights; 0 = off
    seed: int = 42
    ckpt_every: int = 1000
    val_every: int = 1000
    log_every: int = 10
    image_every: int = 500
    keep_last: int = 3  # step checkpoints kept besides best and last
    schedule: str = "linear"  # linear (decay to 0, released) | warmup_cosine | constant | step
    warmup_steps: int = 0  # warmup_cosine: linear warm-up over this many steps
    final_lr_ratio: float = 0.05  # warmup_cosine: the learning rate ends at this fraction of its peak
    fg_weight: float = 1.0  # SD-FSMIS latent MSE: weight of latent cells under the query mask (1: plain MSE, released)
    optimizer: str = "adamw"  # adamw | sgd (SGD with momentum: the released recipes of the prototype baselines)
    momentum: float = 0.9  # sgd only
    lr_step_every: int = 1000  # schedule=step: the learning rate is multiplied by lr_gamma every this many steps
    lr_gamma: float = 0.95  # schedule=step (the prototype baselines' MultiStepLR)
    tf32: bool = False  # CUDA: TF32 matmuls (torch.backends.cuda.matmul.allow_tf32), as the released code sets


@dataclass
class EvalConfig:
    support: str = "1shot"  # 1shot | 3shot
    chunk_batch: int = 64  # query slices per forward


@dataclass
class GenaugConfig:
    """Synthetic episodes in training (docs/generative-augmentation.md, use (a)); episodic methods only."""

    data: list = field(default_factory=list)  # synthetic folders written by tools/synthesize.py (or filter_synthetic.py)
    ratio: float = 0.0  # fraction of the training episodes drawn from them (0: none, the released recipe)
    # synthetic: two slices of one synthetic case (the default: it measured best, docs/measurements/genaug_utility.md)
    # | source: a real source slice + the synthetic slice made from it
    pairing: str = "synthetic"


@dataclass
class Config:
    name: str = "experiment"
    method: str = "sdfsmis"  # a registered method (fsmis.engine.method) or package.module:Class
    data: Any = None  # the method's data section (DataConfig for episodic methods)
    model: Any = None  # the method's model section (its own dataclass)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    genaug: GenaugConfig = field(default_factory=GenaugConfig)
    preset: str | None = None  # a named set of switches expanded at load time (PRESETS; "released": the authors' code)
    preset_applied: str | None = None  # the preset this config was expanded from (recorded; never re-expanded)

    def __post_init__(self):
        if self.data is None or self.model is None:
            spec = method_spec(self.method)
            self.data = spec.data_config() if self.data is None else self.data
            self.model = spec.model_config() if self.model is None else self.model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def method_spec(name: str):
    """The Method class behind ``method:`` (it names the dataclasses of its sections)."""
    from .engine.method import method_class

    return method_class(name)


def __getattr__(name):
    if name == "ModelConfig":  # the default method's model section
        from .models.sd_fsmis import SDFSMISConfig

        return SDFSMISConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConfigError(ValueError):
    pass


def _build(cls, values: dict, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    sub = {}
    if cls is Config:
        method = values.get("method", "sdfsmis")
        if not isinstance(method, str):
            raise ConfigError(f"method: expected a name, got {method!r}")
        spec = method_spec(method)
        sub = {"data": spec.data_config, "model": spec.model_config, "train": TrainConfig, "eval": EvalConfig,
               "genaug": GenaugConfig}
        for key in ("data", "model"):
            values = values if key in values else {**values, key: {}}
    for key, val in values.items():
        if key not in fields:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(fields)})")
        ftype = fields[key].type
        if cls is Config and key in sub:
            kwargs[key] = _build(sub[key], val, key)
        else:
            kwargs[key] = _coerce(val, ftype, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _coerce(val, ftype, where):
    t = str(ftype)
    if val is None:
        return None
    if t.startswith("int") and not t.startswith("int |"):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or int(val) != val:
            raise ConfigError(f"{where}: expected an integer, got {val!r}")
        return int(val)
    if t.startswith("float"):
        if isinstance(val, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                val = float(val)
            except ValueError:
                pass
        if isinstance(val, bool) or not isinstance(val, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {val!r}")
        return float(val)
    if t == "bool":
        if not isinstance(val, bool):
            raise ConfigError(f"{where}: expected true/false, got {val!r}")
        return val
    if t.startswith("list[int]"):
        if not isinstance(val, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in val):
            raise ConfigError(f"{where}: expected a list of integers, got {val!r}")
        return [int(v) for v in val]
    if t == "list":
        if isinstance(val, str):
            return [val]
        if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
            raise ConfigError(f"{where}: expected a list of paths, got {val!r}")
        return list(val)
    if t.startswith("str"):
        if isinstance(val, list) and "list" in t:
            return [str(v) for v in val]
        return str(val)
    return val


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML") from None
    return key.strip().split("."), value


# Presets: every switch a preset sets, in one place. ``preset: released`` reproduces the released
# SD-FSMIS code (docs/sd-fsmis.md, "Decisions"; README, the released-code table); each key stays a
# separate switch. A preset is applied over the config file's values and under the command line's
# key=value overrides; the resolved config records it as ``preset_applied`` (and ``preset: null``),
# so that a saved run config reloads exactly.
PRESETS = {
    "released": {
        "data.labels": "label", "data.test_group": 1, "data.test_group_ids": "released",
        "data.size_rule": "max", "data.exclusion": "released", "data.augment": True,
        "data.augment_mode": "released", "data.n_val": 0, "data.protocol": "legacy", "data.supp_idx": 2,
        "model.vtct_crop": "released", "model.qe_align_corners": True, "model.qe_eps": 1.0e-6,
        "train.tf32": True, "eval.support": "3shot",
    },
}
PRESET_METHODS = {"released": ("sdfsmis",)}


def _set(raw: dict, keys: list[str], value, what: str) -> None:
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{what}: {k} is not a section")
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            detail = str(exc).replace("\n", " ")
            raise ConfigError(f"{path}: not a readable YAML file ({detail})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a YAML mapping")
    parsed = [(text, *parse_override(text)) for text in overrides or []]
    preset = next((v for _, k, v in parsed if k == ["preset"]), raw.get("preset"))
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"{path or 'config'}: preset {preset!r} unknown (known: {', '.join(PRESETS)})")
        method = next((v for _, k, v in parsed if k == ["method"]), raw.get("method", "sdfsmis"))
        if method not in PRESET_METHODS[preset]:
            raise ConfigError(f"{path or 'config'}: preset {preset!r} is for method {', '.join(PRESET_METHODS[preset])}, "
                              f"not {method!r}")
        for key, value in PRESETS[preset].items():
            _set(raw, key.split("."), value, f"preset {preset}")
        raw["preset"], raw["preset_applied"] = None, preset
    for text, keys, value in parsed:
        if keys == ["preset"]:
            continue
        _set(raw, keys, value, f"override {text!r}")
    try:
        cfg = _build(Config, raw, "")
        check_ranges(cfg)
        return cfg
    except ConfigError as exc:
        raise ConfigError(f"{path or 'config'}: {exc}") from None


_RANGES = {  # key: (test, what it must be)
    "train.max_steps": (lambda v: v >= 1, ">= 1"), "train.batch_size": (lambda v: v >= 1, ">= 1"),
    "train.grad_accum": (lambda v: v >= 1, ">= 1"), "train.lr": (lambda v: v > 0, "> 0"),
    "train.vtct_lr_mult": (lambda v: v >= 0, ">= 0"), "train.weight_decay": (lambda v: v >= 0, ">= 0"),
    "train.clip_grad": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "train.ema": (lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    "train.ckpt_every": (lambda v: v >= 1, ">= 1"), "train.val_every": (lambda v: v >= 0, ">= 0 (0: off)"),
    "train.log_every": (lambda v: v >= 1, ">= 1"), "train.image_every": (lambda v: v >= 0, ">= 0 (0: off)"),
    "train.keep_last": (lambda v: v >= 0, ">= 0"), "train.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "train.final_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "train.fg_weight": (lambda v: v > 0, "> 0 (1: plain MSE)"),
    "model.threshold_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.threshold_floor": (lambda v: 0 <= v < 1, "in [0, 1) (0: none)"),
    "model.vtct_crop": (lambda v: v in ("aligned", "released", "resize"), "aligned, released or resize"),
    "train.precision": (lambda v: v in ("fp32", "bf16", "fp16"), "fp32, bf16 or fp16"),
    "train.schedule": (lambda v: v in ("linear", "constant", "warmup_cosine", "step"),
                       "linear, constant, warmup_cosine or step"),
    "train.optimizer": (lambda v: v in ("adamw", "sgd"), "adamw or sgd"),
    "train.momentum": (lambda v: 0 <= v < 1, "in [0, 1)"), "train.lr_step_every": (lambda v: v >= 1, ">= 1"),
    "train.lr_gamma": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "eval.chunk_batch": (lambda v: v >= 1, ">= 1"), "eval.support": (lambda v: v in ("1shot", "3shot"), "1shot or 3shot"),
    "data.image_size": (lambda v: v >= 8, ">= 8"), "data.n_val": (lambda v: v >= 0, ">= 0"),
    "data.min_fg_pixels": (lambda v: v >= 0, ">= 0"), "data.fold": (lambda v: v >= 0, ">= 0"),
    "data.setting": (lambda v: v in (1, 2), "1 or 2"), "data.exclusion": (lambda v: v in ("any", "all", "released"), "any, all or released"),
    "data.size_rule": (lambda v: v in ("every", "max"), "every or max"),
    "data.augment_mode": (lambda v: v in ("protocol", "released"), "protocol or released"),
    "data.protocol": (lambda v: v in ("canonical", "legacy"), "canonical or legacy"),
    "data.labels": (lambda v: v in ("supervoxel", "label"), "supervoxel or label"),
    "data.test_group": (lambda v: v in (1, 2), "1 or 2 (null: remove every test class)"),
    "data.test_group_ids": (lambda v: v in ("names", "released"), "names or released"),
    "data.shift_px": (lambda v: v >= 0, ">= 0"),
    "data.sampler": (lambda v: v in ("consecutive", "same_slice"), "consecutive or same_slice"),
    "data.n_shot": (lambda v: v >= 1, ">= 1"), "data.crop": (lambda v: v >= 1, ">= 1"),
    "genaug.ratio": (lambda v: 0 <= v <= 1, "in [0, 1] (0: no synthetic episodes)"),
    "genaug.pairing": (lambda v: v in ("source", "synthetic"), "source or synthetic"),
}


def check_ranges(cfg: Config) -> None:
    """Refuse values outside their range (a typo such as train.ema=2 would otherwise train silently wrong)."""
    for key, (ok, what) in _RANGES.items():
        section, name = key.split(".")
        node = getattr(cfg, section, None)
        if node is None or not hasattr(node, name) or getattr(node, name) is None:
            continue
        value = getattr(node, name)
        if not ok(value):
            raise ConfigError(f"{key}={value!r}: must be {what}")


def differing_keys(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) for every dotted key whose value differs, sorted by key."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and k in ("data", "model", "train", "eval", "genaug") and not prefix:
                out.update(flat(v, f"{k}."))
            else:
                out[prefix + k] = v
        return out
    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def config_diff(a: Config, b: Config) -> list[str]:
    """Keys whose values differ between two configs: ["train.lr: 0.0001 vs 0.05", ...]."""
    return [f"{k}: {va!r} vs {vb!r}" for k, va, vb in differing_keys(a, b)]


def save_config(cfg: Config, path: str | Path) -> Path:
    from .atomic import atomic_write_text

    return atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
