"""Strict, reported loading of pretrained components: the one place where weight files are read.

Where each part comes from (docs/sd-fsmis.md, "Weights"):

UNet
    ``model.sd_path`` a local diffusers folder -> ``UNet2DConditionModel.from_pretrained(sd_path,
    subfolder="unet")``; ``model.sd_path`` one LDM/CompVis checkpoint file (``.safetensors``, or
    ``.ckpt``/``.pt``/``.pth`` read with ``torch.load(weights_only=True)``) -> the model is built from
    ``model.sd_config/unet/config.json`` (or ``model.unet``) and the ``model.diffusion_model.*`` keys are
    converted with diffusers' own ``convert_ldm_unet_checkpoint``; no ``sd_path`` -> random
    initialisation from ``model.unet`` (a dict of ``UNet2DConditionModel`` arguments or a preset name
    of :mod:`fsmis.models.presets`).
VAE
    ``model.vae_path`` (an ``AutoencoderKL`` folder, or a folder holding ``vae/``) overrides every other
    source; else as the UNet: ``vae/`` of the folder, the ``first_stage_model.*`` keys of the file
    (``convert_ldm_vae_checkpoint``), or random initialisation from ``model.vae``.
VTCT encoder
    :func:`fsmis.models.vtct.build_encoder`; DINOv2 is checked with transformers' loading info and an
    independent second load (tensors that were randomly initialised differ between two loads).

Strictness: a pretrained component must fill every tensor its model expects from the file, with the
right shape, and the file must hold nothing else (for an LDM file: nothing else under the component's
prefix). Anything else raises :class:`WeightLoadError` naming the file and the keys. Loading is
checked three times: before loading (the file header against a model built on the meta device, so
every missing / unexpected / mismatched key is listed, not just the first), by diffusers' own
``output_loading_info``, and after loading (no tensor left on the meta device, and every tensor equal
to the file's, counted one by one: ``from_pretrained`` with ``low_cpu_mem_usage`` leaves a missing key
as a meta tensor and only logs a warning). ``verify="sample"`` (default) compares tensors above
65,536 elements on 8 dim-0 slices, ``"full"`` every element, ``"keys"`` only names, shapes and meta
tensors.
"""
from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..config import ConfigError
from .presets import PRESETS, preset

RANDOM_INIT = "random init (config)"
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIXES = ("first_stage_model.", "vae.")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")

# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


class WeightLoadError(RuntimeError):
    """A pretrained weight file loaded partially, not at all, or with wrong shapes."""

    def __init__(self, message: str, component: "ComponentLoad | None" = None):
        super().__init__(message)
        self.component = component


@dataclass
class ComponentLoad:
    """One row of the load report."""

    name: str
    source: str = RANDOM_INIT
    pretrained: bool = False
    loaded: int | None = 0  # tensors filled from the file (and checked equal to it); None: not counted
    expected: int = 0  # tensors in the model's state_dict
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: file (a, b) vs model (c, d)"
    file_dtype: str = ""
    params: int = 0  # parameters of the component as loaded (the UNet before the conv_in surgery)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        if self.missing or self.unexpected or self.mismatched:
            return False
        return not self.pretrained or self.loaded is None or self.loaded == self.expected

    def problems(self) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape-mismatched", self.mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} key(s): {_head(keys)}")
        if not parts and self.pretrained and self.loaded is not None and self.loaded != self.expected:
            parts.append(f"only {self.loaded} of {self.expected} tensors loaded")
        return "; ".join(parts)


@dataclass
class LoadReport:
    unet: ComponentLoad | None = None
    vae: ComponentLoad | None = None
    vtct_encoder: ComponentLoad | None = None
    others: list[ComponentLoad] = field(default_factory=list)  # components of other methods (a baseline's backbone)
    warnings: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)  # sqi_layers, cross_attention_dim, parameter counts, ...

    def rows(self) -> list[ComponentLoad]:
        return [r for r in (self.unet, self.vae, self.vtct_encoder, *self.others) if r is not None]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows())

    def format(self) -> str:
        head = ("component", "tensors", "missing", "unexpected", "mismatch", "params", "dtype", "source")
        lines = []
        for r in self.rows():
            tensors = f"{r.loaded}/{r.expected}" if r.pretrained and r.loaded is not None else (
                "n/a" if r.pretrained else f"0/{r.expected}")
            lines.append((r.name, tensors, str(len(r.missing)), str(len(r.unexpected)), str(len(r.mismatched)),
                          _fmt_count(r.params), r.file_dtype or "-", r.source))
        widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head) - 1)]
        out = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in [head, *lines]]
        out.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
        for r in self.rows():
            if not r.ok:
                out.append(f"! {r.name}: {r.problems()}")
            out.extend(f"  {r.name}: {n}" for n in r.notes)
        if self.summary:
            out.append("  model: " + ", ".join(f"{k}={_fmt_count(v) if k.startswith('params') else v}"
                                               for k, v in self.summary.items()))
        out.extend(f"WARNING: {w}" for w in self.warnings)
        if not self.ok:
            out.append("status: FAILED")
        elif any(r.pretrained for r in self.rows()):
            out.append("status: OK (every pretrained tensor loaded and checked)")
        else:
            out.append("status: OK (no pretrained weights: random initialisation)")
        return "\n".join(out)


def _head(keys, n: int = 10) -> str:
    keys = list(keys)
    more = f", ... ({len(keys) - n} more, {len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _fmt_count(n) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return str(n)
    return f"{n / 1e6:.2f} M" if n >= 1e5 else str(n)


def _raise_if_bad(row: ComponentLoad, what: str) -> None:
    if not row.ok:
        raise WeightLoadError(f"{row.name}: {what} loads only partially "
                              f"({row.loaded if row.loaded is not None else '?'}/{row.expected} tensors): "
                              f"{row.problems()}", row)


# ------------------------------------------------------------------------------------------------
# Weight files
# ------------------------------------------------------------------------------------------------


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _torch_load(path: Path) -> dict:
    """``torch.load(weights_only=True)`` (memory-mapped where the format allows) -> flat tensor dict."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as exc:  # truncated zip, pickle with objects weights_only refuses, ...
        raise WeightLoadError(f"{path}: cannot read the checkpoint with torch.load(weights_only=True) "
                              f"(truncated, corrupt, or it pickles more than tensors): {type(exc).__name__}: {exc}"
                              ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightLoadError(f"{path}: expected a dict of tensors (or {{'state_dict': ...}}), got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _safetensors_index(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) from the header, without reading tensor data. Validates that the header
    covers the whole file (a truncated file fails here)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            return out
    except Exception as exc:
        raise WeightLoadError(f"{path}: unreadable safetensors file (truncated or corrupt?): "
                              f"{type(exc).__name__}: {exc}") from exc


def _file_index(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """key -> (shape, dtype, file) over the weight files of one component."""
    out: dict = {}
    for f in files:
        if f.suffix == ".safetensors":
            items = {k: (s, d, f) for k, (s, d) in _safetensors_index(f).items()}
        else:
            items = {k: (tuple(t.shape), str(t.dtype).replace("torch.", ""), f) for k, t in _torch_load(f).items()}
        dup = set(items) & set(out)
        if dup:
            raise WeightLoadError(f"{f}: keys also present in another shard: {_head(sorted(dup))}")
        out.update(items)
    return out


def _variant_name(name: str, variant: str | None) -> str:
    if not variant:
        return name
    parts = name.split(".")
    return ".".join(parts[:-1] + [variant] + parts[-1:])


def _resolve_weights(comp_dir: Path) -> tuple[list[Path], str | None, bool, Path]:
    """Weight files of a diffusers component folder -> (files, variant, use_safetensors, shown path)."""
    variants = [None]
    found = sorted({p.name.split(".")[1] for p in comp_dir.glob("diffusion_pytorch_model.*.*")
                    if len(p.name.split(".")) >= 3 and p.name.split(".")[1] not in ("safetensors", "bin")})
    variants += sorted(found, key=lambda v: (v != "fp16", v))
    for variant in variants:
        for base in WEIGHT_NAMES:
            p = comp_dir / _variant_name(base, variant)
            if p.is_file():
                st = ".safetensors" in base
                if p.name.endswith(".json"):
                    try:
                        weight_map = json.loads(p.read_text())["weight_map"]
                    except Exception as exc:
                        raise WeightLoadError(f"{p}: unreadable shard index: {exc}") from exc
                    files = [comp_dir / n for n in sorted(set(weight_map.values()))]
                    absent = [str(f) for f in files if not f.is_file()]
                    if absent:
                        raise WeightLoadError(f"{p}: shard file(s) missing: {_head(absent)}")
                    return files, variant, st, p
                return [p], variant, st, p
    raise WeightLoadError(f"{comp_dir}: no weight file (looked for {', '.join(WEIGHT_NAMES)} and variants such "
                          "as diffusion_pytorch_model.fp16.safetensors)")


def _expected_from_meta(cls, config: dict) -> tuple[nn.Module, dict[str, tuple[int, ...]]]:
    with torch.device("meta"):
        model = cls.from_config(config)
    return model, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _compare_keys(row: ComponentLoad, expected: dict[str, tuple], found: dict[str, tuple], ignore=None) -> None:
    """Fill missing / unexpected / mismatched of ``row`` (found: model key -> shape in the file)."""
    import re

    row.missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    for pat in ignore or []:
        unexpected = [k for k in unexpected if re.search(pat, k) is None]
    row.unexpected = unexpected
    row.mismatched = [f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
                      for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])]


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _dtype_summary(dtypes) -> str:
    ds = sorted({_ST_DTYPES.get(d, d) for d in dtypes})
    return "/".join(ds) if len(ds) <= 2 else f"{len(ds)} dtypes"


VERIFY_MODES = ("full", "sample", "keys")
SAMPLE_FULL_NUMEL = 1 << 16  # tensors up to this size are compared whole in "sample" mode
SAMPLE_ROWS = 8  # else this many evenly spaced slices along dim 0


def _sample_rows(shape, mode: str):
    """None: compare the whole tensor; else the dim-0 indices to compare."""
    numel = math.prod(shape) if shape else 1
    if mode == "full" or not shape or numel <= SAMPLE_FULL_NUMEL or shape[0] <= SAMPLE_ROWS:
        return None
    return sorted({round(i * (shape[0] - 1) / (SAMPLE_ROWS - 1)) for i in range(SAMPLE_ROWS)})


def _check_loaded(row: ComponentLoad, model: nn.Module, reference, mode: str) -> None:
    """After loading: no meta tensor left and (modes "full" / "sample") every tensor equal to the
    file's, cast to the model dtype; "sample" compares tensors above 65,536 elements on 8 evenly
    spaced dim-0 slices (enough to tell a loaded tensor from a randomly initialised one, without
    re-reading and casting the whole file).

    ``reference(items)`` gets [(model key, rows)] and yields (model key, file tensor or its rows)."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {mode!r}")
    sd = model.state_dict()
    meta = sorted(k for k, v in sd.items() if v.is_meta)
    if meta:
        row.missing = sorted(set(row.missing) | set(meta))
    if mode == "keys":
        row.loaded = len(sd) - len(meta)
        row.notes.append("values not compared with the file (verify='keys')")
        return
    items = [(k, _sample_rows(tuple(v.shape), mode)) for k, v in sd.items() if k not in meta]
    rows_of = dict(items)
    differ, n = [], 0
    for key, ref in reference(items):
        t, rows = sd[key], rows_of[key]
        if rows is not None:
            t = t[rows]
        if t.shape == ref.shape and torch.equal(ref.to(device=t.device, dtype=t.dtype), t):
            n += 1
        else:
            differ.append(key)
    if differ:
        row.notes.append(f"{len(differ)} tensor(s) differ from the file after loading: {_head(differ)}")
        row.missing = sorted(set(row.missing) | set(differ))
    row.loaded = n
    if mode == "sample":
        row.notes.append("loaded tensors compared with the file (large ones on 8 slices each)")


# ------------------------------------------------------------------------------------------------
# diffusers folders
# ------------------------------------------------------------------------------------------------


def _load_diffusers_component(cls, name: str, root: Path, subfolder: str | None, dtype, verify: str):
    comp_dir = root / subfolder if subfolder else root
    if not (comp_dir / "config.json").is_file():
        raise WeightLoadError(f"{name}: {comp_dir / 'config.json'} not found (expected a diffusers "
                              f"{cls.__name__} folder)")
    files, variant, use_st, shown = _resolve_weights(comp_dir)
    row = ComponentLoad(name, source=str(shown), pretrained=True)
    if variant:
        row.notes.append(f"variant {variant!r} (no plain diffusion_pytorch_model file)")

    # 1. the file header against a model built on the meta device: every problem, not just the first
    index = _file_index(files)
    config = cls.load_config(str(comp_dir))
    meta_model, expected = _expected_from_meta(cls, config)
    key_map = {k: k for k in index}  # model key -> file key (deprecated attention names renamed)
    if len(files) == 1 and hasattr(meta_model, "_fix_state_dict_keys_on_load"):
        meta_model._fix_state_dict_keys_on_load(key_map)  # the renaming diffusers applies on load: new -> old
        if any(new != old for new, old in key_map.items()):
            row.notes.append("deprecated attention key names renamed by diffusers")
    del meta_model
    row.expected = len(expected)
    row.file_dtype = _dtype_summary(d for _, d, _ in index.values())
    _compare_keys(row, expected, {new: index[old][0] for new, old in key_map.items()},
                  getattr(cls, "_keys_to_ignore_on_load_unexpected", None))
    row.loaded = len(expected) - len(row.missing) - len(row.mismatched)
    _raise_if_bad(row, f"{shown}")

    # 2. diffusers' own loading, with its loading info
    try:
        from diffusers.utils import is_accelerate_available

        # low_cpu_mem_usage needs accelerate (an optional extra); asking for it without prints a warning
        model, info = cls.from_pretrained(str(root), subfolder=subfolder, local_files_only=True,
                                          output_loading_info=True, torch_dtype=dtype or torch.float32,
                                          variant=variant, use_safetensors=use_st,
                                          low_cpu_mem_usage=is_accelerate_available())
    except Exception as exc:
        raise WeightLoadError(f"{name}: diffusers could not load {shown}: {type(exc).__name__}: {exc}") from exc
    row.missing += [k for k in sorted(set(info.get("missing_keys") or ())) if k not in row.missing]
    row.unexpected += [k for k in sorted(set(info.get("unexpected_keys") or ())) if k not in row.unexpected]
    for item in info.get("mismatched_keys") or ():
        row.mismatched.append(f"{item[0]}: file {tuple(item[1])} vs model {tuple(item[2])}"
                              if isinstance(item, (tuple, list)) and len(item) == 3 else str(item))
    for msg in info.get("error_msgs") or ():
        row.mismatched.append(f"diffusers error: {str(msg).splitlines()[0]}")
    _raise_if_bad(row, f"{shown}")

    # 3. count it ourselves: no meta tensor left, every tensor equal to the file's
    _check_loaded(row, model, lambda items: _read_file_tensors(index, key_map, items), verify)
    _raise_if_bad(row, f"{shown}")
    row.params = sum(p.numel() for p in model.parameters())
    return model, row


def _read_file_tensors(index, key_map, items):
    """Yield (model key, file tensor, or its dim-0 rows) for [(model key, rows)], file by file."""
    by_file: dict[Path, list] = {}
    for k, rows in items:
        if k in key_map:
            by_file.setdefault(index[key_map[k]][2], []).append((k, rows))
    for f, entries in by_file.items():
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as h:
                for k, rows in entries:
                    if rows is None:
                        yield k, h.get_tensor(key_map[k])
                    else:
                        sl = h.get_slice(key_map[k])
                        yield k, torch.cat([sl[i:i + 1] for i in rows])
        else:
            tensors = _torch_load(f)
            for k, rows in entries:
                t = tensors[key_map[k]]
                yield k, t if rows is None else t[rows]


# ------------------------------------------------------------------------------------------------
# single LDM / CompVis files
# ------------------------------------------------------------------------------------------------


def _read_ldm_subset(path: Path, prefixes: tuple[str, ...]) -> tuple[dict, list[str]]:
    """Tensors of ``path`` whose key starts with one of ``prefixes`` (only those are read from a
    safetensors file) and the list of all keys."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        _safetensors_index(path)  # validates the header and the file size
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                return {k: f.get_tensor(k) for k in keys if k.startswith(prefixes)}, keys
        except Exception as exc:
            raise WeightLoadError(f"{path}: unreadable safetensors file: {type(exc).__name__}: {exc}") from exc
    sd = _torch_load(path)
    return {k: v for k, v in sd.items() if k.startswith(prefixes)}, list(sd)


def _load_ldm_component(cls, name: str, path: Path, config: dict, dtype, verify: str,
                        config_source: str):
    from diffusers.loaders import single_file_utils as sfu

    if cls.__name__ == "UNet2DConditionModel":
        prefixes, convert = (LDM_UNET_PREFIX,), sfu.convert_ldm_unet_checkpoint
    else:
        prefixes, convert = LDM_VAE_PREFIXES, sfu.convert_ldm_vae_checkpoint
    subset, all_keys = _read_ldm_subset(path, prefixes)
    # the VAE converter picks one prefix; keep only the one it will use
    if name == "vae":
        used = [p for p in prefixes if any(k.startswith(p) for k in subset)]
        if len(used) > 1:
            subset = {k: v for k, v in subset.items() if k.startswith(used[-1])}
    row = ComponentLoad(name, source=f"{path} [{'/'.join(prefixes)}*]", pretrained=True)
    row.notes.append(f"LDM keys converted with diffusers {convert.__name__}; architecture from {config_source}")
    others = len(all_keys) - len(subset)
    if others:
        row.notes.append(f"{others} other tensors in the file not used here (other components, EMA, schedule)")
    meta_model, expected = _expected_from_meta(cls, config)
    del meta_model
    row.expected = len(expected)
    if not subset:
        row.missing = sorted(expected)
        row.loaded = 0
        hint = " (give model.vae_path for a separate VAE)" if name == "vae" else ""
        raise WeightLoadError(f"{name}: {path} holds no key starting with {' or '.join(prefixes)}: is it an "
                              f"LDM/CompVis checkpoint?{hint}", row)
    try:
        converted = convert(subset, dict(config))
    except Exception as exc:
        raise WeightLoadError(f"{name}: diffusers {convert.__name__} failed on {path}: "
                              f"{type(exc).__name__}: {exc}") from exc
    absent = sorted(k for k, v in converted.items() if v is None)
    converted = {k: v for k, v in converted.items() if v is not None}
    # LDM tensors the conversion did not use: the converted tensors are the file's, or views of them
    # (the VAE attention weights, [:, :, 0, 0]), so they share the first element's address
    used = {id(v) for v in converted.values()} | {v.data_ptr() for v in converted.values() if v.numel()}
    unused = sorted(k for k, v in subset.items() if id(v) not in used and not (v.numel() and v.data_ptr() in used))
    row.file_dtype = _dtype_summary(str(v.dtype).replace("torch.", "") for v in subset.values())
    _compare_keys(row, expected, {k: tuple(v.shape) for k, v in converted.items()})
    row.missing = sorted(set(row.missing) | set(absent))
    row.unexpected = row.unexpected + [f"{k} (LDM key not converted)" for k in unused]
    row.loaded = len(expected) - len(row.missing) - len(row.mismatched)
    _raise_if_bad(row, f"{path}")

    from diffusers.models.modeling_utils import no_init_weights

    with no_init_weights():
        model = cls.from_config(config)
    result = model.load_state_dict(converted, strict=False)  # strictness checked above and below
    if result.missing_keys or result.unexpected_keys:
        row.missing = sorted(set(row.missing) | set(result.missing_keys))
        row.unexpected = sorted(set(row.unexpected) | set(result.unexpected_keys))
        _raise_if_bad(row, f"{path}")
    model = _to_dtype(model, dtype).eval()
    _check_loaded(row, model, lambda items: ((k, converted[k] if r is None else converted[k][r])
                                             for k, r in items if k in converted), verify)
    _raise_if_bad(row, f"{path}")
    row.params = sum(p.numel() for p in model.parameters())
    return model, row


# ------------------------------------------------------------------------------------------------
# random initialisation
# ------------------------------------------------------------------------------------------------


def _config_dict(value, part: str, key: str) -> dict:
    if isinstance(value, str):
        return preset(value, part)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of {part} arguments or a preset name "
                          f"({' | '.join(PRESETS)}), got {type(value).__name__}")
    return {k: v for k, v in value.items() if not str(k).startswith("_")}


def _to_dtype(model, dtype):
    """Cast only when needed (diffusers warns on every ``.to(dtype)``)."""
    dtype = dtype or torch.float32
    if any(p.dtype != dtype for p in model.parameters()):
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()
        try:
            model = model.to(dtype)
        finally:
            dlog.set_verbosity(level)
    return model


def _random_component(cls, name: str, config: dict, key: str, dtype):
    try:
        model = cls(**config)
    except TypeError as exc:
        raise ConfigError(f"{key}: not a valid {cls.__name__} configuration: {exc}") from None
    model = _to_dtype(model, dtype)
    row = ComponentLoad(name, source=RANDOM_INIT, pretrained=False, loaded=0,
                        expected=len(model.state_dict()), params=sum(p.numel() for p in model.parameters()))
    row.notes.append(f"randomly initialised from {key} (no pretrained weights)")
    return model, row


# ------------------------------------------------------------------------------------------------
# public loaders
# ------------------------------------------------------------------------------------------------


def _sd_source(cfg) -> tuple[str, Path | None]:
    """('folder' | 'file' | 'none', path)."""
    if not cfg.sd_path:
        return "none", None
    p = Path(cfg.sd_path).expanduser()
    if p.is_dir():
        return "folder", p
    if p.is_file():
        if p.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ConfigError(f"model.sd_path {p}: unsupported checkpoint type {p.suffix!r} "
                              f"({', '.join(SINGLE_FILE_SUFFIXES)}, or a diffusers folder)")
        return "file", p
    raise ConfigError(f"model.sd_path {p}: no such file or folder")


def _single_file_config(cfg, part: str) -> tuple[dict, str]:
    """Architecture of one component of a single-file checkpoint: model.sd_config/<part>/config.json,
    else model.<part>."""
    if cfg.sd_config:
        folder = Path(cfg.sd_config).expanduser()
        cpath = folder / part / "config.json"
        if not cpath.is_file() and (folder / "config.json").is_file() and part == "unet":
            cpath = folder / "config.json"
        if not cpath.is_file():
            raise ConfigError(f"model.sd_config {folder}: {part}/config.json not found")
        try:
            config = json.loads(cpath.read_text())
        except Exception as exc:
            raise ConfigError(f"{cpath}: unreadable JSON: {exc}") from None
        return config, str(cpath)
    value = getattr(cfg, part)
    if value is not None:
        return _config_dict(value, part, f"model.{part}"), f"model.{part}"
    raise ConfigError(f"model.sd_path {cfg.sd_path} is a single checkpoint file: model.sd_config must name a local "
                      f"folder with unet/config.json and vae/config.json (the diffusers configs of the same "
                      f"architecture), or model.{part} must give the {part} architecture")


def _load_sd_part(cls, part: str, cfg, dtype, verify: str, no_source: str):
    """One Stable Diffusion component from ``model.sd_path`` (diffusers folder or LDM file) or,
    without one, randomly initialised from ``model.<part>``."""
    kind, path = _sd_source(cfg)
    arch = getattr(cfg, part)
    if kind == "folder":
        model, row = _load_diffusers_component(cls, part, path, part, dtype, verify)
        if arch is not None:
            row.notes.append(f"model.{part} ignored (the architecture comes from the folder's {part}/config.json)")
        return model, row
    if kind == "file":
        config, src = _single_file_config(cfg, part)
        return _load_ldm_component(cls, part, path, config, dtype, verify, src)
    if arch is None:
        name = {"unet": "UNet", "vae": "VAE"}[part]
        raise ConfigError(f"no {name} source: set {no_source} or model.{part} ({cls.__name__} arguments, "
                          f"or a preset name: {' | '.join(PRESETS)}) for random initialisation")
    return _random_component(cls, part, _config_dict(arch, part, f"model.{part}"), f"model.{part}", dtype)


def load_unet(cfg, dtype: torch.dtype | None = None, verify: str = "sample"):
    """-> (UNet2DConditionModel, ComponentLoad). Raises WeightLoadError on a partial load,
    ConfigError when no source is given. ``model.unet_init`` (SD-FSMIS) takes precedence:
    :func:`load_unet_init`."""
    from diffusers import UNet2DConditionModel

    if getattr(cfg, "unet_init", None):
        return load_unet_init(cfg, dtype, verify)
    return _load_sd_part(UNet2DConditionModel, "unet", cfg, dtype, verify,
                         "model.sd_path (a local diffusers folder or an LDM checkpoint file)")


def unet_init_folder(path) -> Path:
    """A generator run folder (its exported ``unet/``) or the exported folder itself."""
    from ..genaug.generator import EXPORT_DIR, META_NAME

    p = Path(path).expanduser()
    for cand in (p / EXPORT_DIR, p):
        if (cand / "config.json").is_file() and (cand / META_NAME).is_file():
            return cand
    if (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():
        raise ConfigError(f"model.unet_init {p}: the run has no exported {EXPORT_DIR}/ (it is written when the "
                          "generator's training reaches train.max_steps; finish it with train.py --resume)")
    raise ConfigError(f"model.unet_init {p}: not a generator run nor its {EXPORT_DIR}/ folder "
                      f"(expected config.json and {META_NAME})")


def load_unet_init(cfg, dtype: torch.dtype | None = None, verify: str = "sample"):
    """SD-FSMIS's UNet from a trained generator (fsmis.genaug.generator): strict loading of every
    tensor of its exported UNet (a missing, unexpected or mis-shaped tensor stops with its name),
    then its [noisy latent | mask latent] conv_in becomes the C-channel conv_in that SD-FSMIS's
    weight surgery expands (``model.unet_init_conv_in``):

    - ``surgery`` (default): the image-latent columns W[:, :C] and the bias, so that both input
      convolutions start at [W_img, W_img] / 2, exactly as from SD's conv_in;
    - ``direct``: the generator's 8-channel conv as it is ([image | mask], the support branch's layout),
      copied into both input convolutions.

    ``model.unet``, when also given, must describe the same architecture (but in_channels)."""
    from diffusers import UNet2DConditionModel

    from ..genaug.generator import META_NAME

    if cfg.sd_path:
        raise ConfigError("model.unet_init and model.sd_path both give the UNet: set one of them "
                          "(model.vae_path still gives the VAE)")
    mode = getattr(cfg, "unet_init_conv_in", "surgery")
    if mode not in ("surgery", "direct"):
        raise ConfigError(f"model.unet_init_conv_in must be surgery or direct, not {mode!r}")
    folder = unet_init_folder(cfg.unet_init)
    meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
    model, row = _load_diffusers_component(UNet2DConditionModel, "unet", folder, None, dtype, verify)
    lat = int(meta["latent_channels"])
    if cfg.unet is not None:
        want = {k: v for k, v in _config_dict(cfg.unet, "unet", "model.unet").items() if k != "in_channels"}
        have = dict(model.config)
        diff = [f"{k}: model.unet {v!r}, generator {have.get(k)!r}" for k, v in sorted(want.items())
                if k in have and _norm(have.get(k)) != _norm(v)]
        unknown = [k for k in want if k not in have]
        if diff or unknown:
            raise ConfigError(f"model.unet does not describe the generator's UNet in {folder}: "
                              + "; ".join(diff + [f"{k}: not a UNet2DConditionModel key" for k in unknown])
                              + " (leave model.unet out: the architecture comes from the generator)")
    conv = model.conv_in
    if conv.in_channels != 2 * lat:
        raise WeightLoadError(f"unet: {folder}: conv_in takes {conv.in_channels} channels, a generator over "
                              f"{lat}-channel latents has {2 * lat}", row)
    if mode == "surgery":
        new = nn.Conv2d(lat, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        dtype=conv.weight.dtype, device=conv.weight.device)
        with torch.no_grad():
            new.weight.copy_(conv.weight[:, :lat])
            new.bias.copy_(conv.bias)
        model.conv_in = new
        row.notes.append(f"conv_in: the generator's image-latent columns ({lat} of {2 * lat}); the input "
                         "convolutions then come by the SD weight surgery ([W, W] / 2)")
    else:
        row.notes.append(f"conv_in: the generator's {2 * lat}-channel conv copied into both input convolutions")
    model.register_to_config(in_channels=lat)
    row.notes.append(f"from model.unet_init (a generator trained {meta.get('steps')} steps on "
                     f"{meta.get('conditioning')} masks)")
    return model, row


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def unet_init_scaling_factor(cfg) -> float:
    from ..genaug.generator import META_NAME

    meta = json.loads((unet_init_folder(cfg.unet_init) / META_NAME).read_text(encoding="utf-8"))
    return float(meta["scaling_factor"])


def check_unet_init_vae(cfg, vae, report) -> None:
    """The generator behind ``model.unet_init`` was trained in one VAE's latent space: refuse
    another VAE (a prior in a different latent space is no prior) and a different scaling factor."""
    from ..genaug.generator import META_NAME, vae_identity

    folder = unet_init_folder(cfg.unet_init)
    meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
    ident = vae_identity(vae)
    if meta.get("vae_identity") != ident:
        raise ConfigError(f"model.unet_init {folder}: the generator was trained with the VAE "
                          f"{meta.get('vae_source')} (identity {meta.get('vae_identity')}); this model's VAE "
                          f"({report.vae.source}) is {ident}: give the same VAE (model.vae_path)")
    report.unet.notes.append(f"same VAE as the generator (identity {ident})")


def load_vae(cfg, dtype: torch.dtype | None = None, verify: str = "sample"):
    """-> (AutoencoderKL, ComponentLoad). model.vae_path overrides every other source."""
    from diffusers import AutoencoderKL

    if cfg.vae_path:
        p = Path(cfg.vae_path).expanduser()
        if (p / "config.json").is_file():
            model, row = _load_diffusers_component(AutoencoderKL, "vae", p, None, dtype, verify)
        elif (p / "vae" / "config.json").is_file():
            model, row = _load_diffusers_component(AutoencoderKL, "vae", p, "vae", dtype, verify)
        else:
            raise ConfigError(f"model.vae_path {p}: not a local AutoencoderKL folder (no config.json, "
                              "nor vae/config.json)")
        row.notes.append("from model.vae_path (overrides model.sd_path / model.vae)")
        return model, row
    return _load_sd_part(AutoencoderKL, "vae", cfg, dtype, verify,
                         "model.vae_path (a local AutoencoderKL folder), model.sd_path,")


def _dinov2_weight_file(path: Path) -> str:
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            return str(path / name)
    return str(path)


def load_vtct_encoder(cfg):
    """-> (encoder, ComponentLoad) via fsmis.models.vtct.build_encoder; DINOv2 loaded strictly."""
    from .vtct import build_encoder

    kind = cfg.vtct_encoder
    if kind == "none":
        enc = build_encoder(kind, cfg.vtct_encoder_path, cfg.vtct_feat_dim)
        row = ComponentLoad("vtct_encoder", source=f"{RANDOM_INIT}: trainable ConvEncoder", pretrained=False,
                            expected=len(enc.state_dict()), params=sum(p.numel() for p in enc.parameters()))
        return enc, row
    if kind == "clip":
        enc = build_encoder(kind, cfg.vtct_encoder_path, cfg.vtct_feat_dim)
        row = ComponentLoad("vtct_encoder", source=str(cfg.vtct_encoder_path), pretrained=True, loaded=None,
                            expected=len(enc.state_dict()), params=sum(p.numel() for p in enc.parameters()))
        row.notes.append("loaded by open_clip (strict load_state_dict); tensors not counted here")
        return enc, row
    if kind != "dinov2" or not cfg.vtct_encoder_path:
        build_encoder(kind, cfg.vtct_encoder_path, cfg.vtct_feat_dim)  # raises: unknown kind / no path
        raise ConfigError(f"model.vtct_encoder={kind!r}: cannot build the encoder")
    path = Path(cfg.vtct_encoder_path).expanduser()
    shown = _dinov2_weight_file(path)
    row = ComponentLoad("vtct_encoder", source=shown, pretrained=True)
    info, reference = None, None
    try:
        enc = build_encoder(kind, str(path), cfg.vtct_feat_dim)
        info = getattr(enc, "loading_info", None)
        if info is None:
            # DinoV2Encoder does not keep transformers' loading info: a second, independent load gives it, and
            # tensors randomly initialised for missing keys differ between the two loads.
            from transformers import Dinov2Model

            reference, info = Dinov2Model.from_pretrained(str(path), local_files_only=True,
                                                          output_loading_info=True)
    except (FileNotFoundError, ImportError):
        raise
    except Exception as exc:  # truncated file (SafetensorError), size mismatch (RuntimeError), ...
        raise WeightLoadError(f"vtct_encoder: transformers could not load DINOv2 from {shown}: "
                              f"{type(exc).__name__}: {exc}", row) from exc
    sd = enc.model.state_dict()
    row.expected = len(sd)
    row.missing = sorted(map(str, info.get("missing_keys") or ()))
    row.unexpected = sorted(map(str, info.get("unexpected_keys") or ()))
    row.mismatched = sorted(map(str, info.get("mismatched_keys") or ()))
    row.missing += [k for k, v in sd.items() if v.is_meta and k not in row.missing]
    if reference is not None:
        ref = reference.state_dict()
        differ = [k for k, v in sd.items() if k not in row.missing and not (k in ref and torch.equal(v, ref[k]))]
        if differ:
            row.notes.append(f"{len(differ)} tensor(s) differ between two loads (randomly initialised?)")
            row.missing += differ
        del reference, ref
    row.loaded = row.expected - len(row.missing) - len(row.mismatched)
    row.file_dtype = _dtype_summary(str(v.dtype).replace("torch.", "") for v in sd.values())
    row.params = sum(p.numel() for p in enc.parameters())
    row.notes.append("DINOv2 via transformers (loading info + an independent second load compared)")
    _raise_if_bad(row, shown)
    return enc, row


# ------------------------------------------------------------------------------------------------
# CNN backbones of the baselines (fsmis.models.baselines.backbones)
# ------------------------------------------------------------------------------------------------

CHECKPOINT_NESTS = ("state_dict", "model")  # where released training checkpoints keep the tensors


def _read_backbone_file(path: Path) -> tuple[dict, list[str]]:
    """All tensors of one checkpoint file (safetensors, or ``torch.load(weights_only=True)``) and notes
    on how they were found: tensors nested under ``state_dict`` / ``model`` are taken from there."""
    if path.suffix.lower() == ".safetensors":
        return _read_ldm_subset(path, ("",))[0], []
    # not _torch_load: it unwraps "state_dict" silently and cannot see a "model" nest
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as exc:
        raise WeightLoadError(f"{path}: cannot read the checkpoint with torch.load(weights_only=True) "
                              f"(truncated, corrupt, or it pickles more than tensors): {type(exc).__name__}: {exc}"
                              ) from exc
    notes = []
    for key in CHECKPOINT_NESTS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            others = sorted(str(k) for k in obj if k != key)
            notes.append(f"tensors nested under {key!r} in the checkpoint"
                         + (f" (other entries not used: {_head(others, 5)})" if others else ""))
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise WeightLoadError(f"{path}: expected a dict of tensors (or one nested under "
                              f"{' / '.join(map(repr, CHECKPOINT_NESTS))}), got {type(obj).__name__}")
    skipped = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if skipped:
        notes.append(f"{len(skipped)} non-tensor entries not used: {_head(skipped, 5)}")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}, notes


def load_backbone_weights(module: nn.Module, path, prefix: str = "backbone.",
                          ignore_prefixes=("classifier.", "aux_classifier."), name: str = "backbone") -> ComponentLoad:
    """Strictly load a CNN backbone (e.g. the ResNet trunk of fsmis.models.baselines.backbones) from one
    local file and return its report row.

    The trunk tensors are the file's keys under ``prefix`` (stripped): by default the layout of
    torchvision's MS-COCO DeepLabV3 checkpoint (``backbone.conv1.weight``, ...), whose head keys under
    ``ignore_prefixes`` (``classifier.*``, ``aux_classifier.*``) are counted in the notes and not used.
    Any other key is unexpected. Every tensor of ``module.state_dict()`` must be in the file with its
    shape, BatchNorm ``num_batches_tracked`` included (torchvision saves them; a file without them is
    refused rather than silently completed). A missing, unexpected or mis-shaped key raises
    :class:`WeightLoadError` naming the file and the keys; the row lists all of them (missing and
    mismatched by module key, unexpected by file key). After loading, every tensor is compared with
    the file's, whole (``row.loaded == row.expected``). ``module`` must be materialised (not on meta).
    """
    path = Path(path).expanduser()
    row = ComponentLoad(name, source=str(path), pretrained=True)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    row.expected = len(expected)
    if not path.is_file():
        raise WeightLoadError(f"{name}: {path}: no such file", row)
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise WeightLoadError(f"{name}: {path}: unsupported weight file type {path.suffix!r} "
                              f"({', '.join(SINGLE_FILE_SUFFIXES)})", row)
    tensors, notes = _read_backbone_file(path)
    row.notes += notes
    ignore = tuple(ignore_prefixes or ())
    ignored = {k for k in tensors if ignore and k.startswith(ignore)}
    trunk = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix) and k not in ignored}
    other = sorted(k for k in tensors if not k.startswith(prefix) and k not in ignored)
    if ignored:
        heads = sorted({p for p in ignore for k in ignored if k.startswith(p)})
        row.notes.append(f"{len(ignored)} head tensors ignored ({', '.join(h + '*' for h in heads)})")
    row.file_dtype = _dtype_summary(str(v.dtype).replace("torch.", "") for v in trunk.values())
    _compare_keys(row, expected, {k: tuple(v.shape) for k, v in trunk.items()})
    row.unexpected = [prefix + k for k in row.unexpected] + other
    row.loaded = len(expected) - len(row.missing) - len(row.mismatched)
    if not trunk:
        raise WeightLoadError(f"{name}: {path} holds no tensor under {prefix!r} (first keys: "
                              f"{_head(sorted(tensors), 5)}); give the prefix of the backbone keys "
                              "(\"\" for a plain ResNet state dict)", row)
    _raise_if_bad(row, str(path))
    module.load_state_dict(trunk, strict=True)
    _check_loaded(row, module, lambda items: ((k, trunk[k]) for k, _ in items if k in trunk), "full")
    _raise_if_bad(row, str(path))
    row.params = sum(p.numel() for p in module.parameters())
    return row
