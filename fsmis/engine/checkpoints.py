"""Run-folder checkpoints: ``RUN_DIR/checkpoints/step_<N>/`` with ``model.safetensors``,
``optimizer.safetensors``, optional ``ema.safetensors`` and ``state.json``.

Each checkpoint is written into a hidden temporary folder and renamed into place, and
``checkpoints/index.json`` (which names ``last`` and ``best``) is replaced atomically, so a
crash or kill -9 at any moment leaves the previous checkpoint intact. Nothing is unpickled:
tensors go through safetensors, everything else through JSON.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_directory, atomic_write_json


class CheckpointError(RuntimeError):
    pass


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{name}"] = val.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = val
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, val in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    for key, val in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: str | Path, step: int, model_state: dict, optimizer=None, scheduler=None,
                    ema_state: dict | None = None, extra: dict | None = None, best: bool = False,
                    keep_last: int = 3) -> Path:
    ckdir = Path(run_dir) / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)
    final = ckdir / f"step_{step}"
    with atomic_directory(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        state = {"step": step, **(extra or {})}
        if optimizer is not None:
            tensors, meta = _flatten_optimizer(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state["optimizer"] = meta
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        if ema_state is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=_json_default), encoding="utf-8")
    index = read_index(run_dir)
    index["last"] = final.name
    index.setdefault("steps", [])
    if final.name not in index["steps"]:
        index["steps"].append(final.name)
    if best:
        index["best"] = final.name
        index["best_metric"] = (extra or {}).get("val_dice")
    # the new checkpoint and the index naming it are on disk before anything old is removed
    atomic_write_json(ckdir / "index.json", index)
    _prune(ckdir, index, keep_last)
    atomic_write_json(ckdir / "index.json", index)
    return final


def is_complete(step_dir: Path) -> bool:
    return (step_dir / "state.json").is_file() and (step_dir / "model.safetensors").is_file()


def last_complete(run_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: the index's ``last`` when complete, else the newest complete
    ``step_<N>`` folder (whatever the index says: a crash between two writes leaves it stale)."""
    ckdir = Path(run_dir) / "checkpoints"
    name = read_index(run_dir).get("last")
    if name and is_complete(ckdir / name):
        return ckdir / name
    steps = sorted((p for p in ckdir.glob("step_*") if p.is_dir() and p.name[5:].isdigit() and is_complete(p)),
                   key=lambda p: int(p.name[5:]))
    return steps[-1] if steps else None


def _json_default(obj):
    if torch.is_tensor(obj):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _prune(ckdir: Path, index: dict, keep_last: int) -> None:
    keep = {index.get("best"), index.get("last")}
    steps = sorted(index.get("steps", []), key=lambda s: int(s.split("_")[1]))
    recent = set(steps[-keep_last:]) if keep_last > 0 else set()
    for name in steps:
        if name not in keep and name not in recent and (ckdir / name).exists():
            doomed = ckdir / f".old-{name}"  # renamed first: a kill mid-delete leaves no half folder under step_*
            os.replace(ckdir / name, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    index["steps"] = [s for s in steps if (ckdir / s).exists() or s in keep or s in recent]


def read_index(run_dir: str | Path) -> dict:
    p = Path(run_dir) / "checkpoints" / "index.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{p}: unreadable checkpoint index ({exc})") from exc


def clean_partial(run_dir: str | Path) -> list[Path]:
    """Remove temporary folders a crash left behind."""
    ckdir = Path(run_dir) / "checkpoints"
    removed = []
    if ckdir.is_dir():
        for p in [*ckdir.glob(".tmp-*"), *ckdir.glob(".old-*")]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
            removed.append(p)
    return removed


def resolve_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A run folder (uses index.json's ``which``, falling back to ``last``), a checkpoints folder,
    or a step folder -> the step folder."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    for run in (p, p.parent):
        idx = read_index(run)
        if idx:
            name = idx.get(which) or idx.get("last")
            if name and (run / "checkpoints" / name / "model.safetensors").is_file():
                return run / "checkpoints" / name
    raise CheckpointError(f"{p}: no checkpoint found (expected a run folder with checkpoints/index.json, "
                          "or a step_<N> folder with model.safetensors)")


def load_checkpoint(step_dir: str | Path) -> dict:
    step_dir = Path(step_dir)
    state_file = step_dir / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file}: missing")
    try:
        out = {"state": json.loads(state_file.read_text(encoding="utf-8"))}
    except Exception as exc:
        raise CheckpointError(f"{state_file}: cannot read ({exc})") from exc
    for key, name, required in (("model", "model.safetensors", True), ("optimizer", "optimizer.safetensors", False),
                                ("ema", "ema.safetensors", False)):
        f = step_dir / name
        if not f.is_file():
            if required:
                raise CheckpointError(f"{f}: missing")
            continue
        try:
            out[key] = load_file(str(f))
        except Exception as exc:
            raise CheckpointError(f"{f}: cannot read the checkpoint file (truncated or corrupt?): {exc}") from exc
    return out


def restore_optimizer(optimizer, ckpt: dict) -> None:
    optimizer.load_state_dict(_unflatten_optimizer(ckpt["optimizer"], ckpt["state"]["optimizer"]))


def load_state_strict(own: dict, tensors: dict, source: str) -> int:
    """Copy ``tensors`` into the live tensors ``own`` (same keys, same shapes, or CheckpointError
    naming the keys); returns the number of tensors loaded."""
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or mismatched:
        def head(keys):
            return ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")
        raise CheckpointError(
            f"{source}: checkpoint does not match the model: "
            + "; ".join(f"{n}: {head(k)}" for n, k in (("missing", missing), ("unexpected", unexpected),
                                                      ("shape mismatch", mismatched)) if k))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k].to(v.dtype))
    return len(own)


FROZEN_NAME = "frozen.safetensors"


def save_frozen(run_dir: str | Path, tensors: dict) -> Path | None:
    """``RUN_DIR/frozen.safetensors``: frozen, randomly initialised tensors of the run (written once,
    atomically)."""
    if not tensors:
        return None
    path = Path(run_dir) / FROZEN_NAME
    from ..atomic import atomic_target

    with atomic_target(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
    return path


def load_frozen(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / FROZEN_NAME
    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
