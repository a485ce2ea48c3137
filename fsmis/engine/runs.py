"""A trained run folder, and the one way to load it (``test.py``, ``tools/predict.py``, the demo).

Layout written by :class:`~fsmis.engine.trainer.Trainer`::

    RUN/config.yaml            the resolved config (method, data, model, train, eval)
    RUN/checkpoints/index.json names ``last`` and ``best``
    RUN/checkpoints/step_<N>/  model.safetensors, optimizer.safetensors, [ema.safetensors], state.json
    RUN/frozen.safetensors     frozen tensors no weight file provides (e.g. a randomly initialised VAE)
    RUN/data.json              what the method trained on (dataset name, image folder, cases)
    RUN/train_summary.json     written when training reached max_steps
    RUN/tensorboard/

Loading rebuilds the method from the run's own config, so a model is evaluated exactly as it was
trained. A config given beside the run may change only evaluation settings: a model key (or
``data.image_size``) that differs from the run's is refused, naming the keys. A frozen part that
would be randomly initialised (no weight file and no ``frozen.safetensors``) is an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError, differing_keys, load_config
from . import checkpoints as ck
from .method import method_class


DATA_NAME = "data.json"
# keys of a data identity that say where the data lie, not what they are: not compared on resume or reuse
PLACE_KEYS = frozenset({"image_dir", "datasets", "synthetic"})


def read_data_identity(run) -> dict | None:
    """RUN/data.json (what the run trained on, from ``Method.data_identity``), or None without one."""
    import json

    p = Path(run) / DATA_NAME
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def data_changes(saved: dict | None, current: dict | None) -> list[str]:
    """What differs between the data a run recorded (``saved``, RUN/data.json) and the data its config
    gives now (``current``): one line per differing key (cases, fold, training and validation cases,
    ...) and per synthetic folder whose contents changed (fsmis.genaug.episodes.folder_fingerprint).
    Where the data lie (:data:`PLACE_KEYS`) is not compared, so a moved folder is the same data; a key
    either side lacks (a run recorded by an earlier version) is skipped. [] when either is None."""
    import json

    if not saved or not current:
        return []
    current = json.loads(json.dumps(current))  # as data.json holds it (tuples as lists)
    out = []
    for key in sorted((saved.keys() & current.keys()) - PLACE_KEYS):
        then, now = saved[key], current[key]
        if key == "synthetic_fingerprints":
            out += [f"synthetic folder {folder}: other contents (synthesized or filtered again)"
                    for folder, fp in now.items() if fp not in set(then.values())]
        elif then != now:
            out.append(f"{key}: {json.dumps(then)[:80]} then, {json.dumps(now)[:80]} now")
    return out


def data_conflicts(cfg: Config, run) -> list[str]:
    """:func:`data_changes` between RUN/data.json and the data ``cfg`` gives now (the data are opened,
    no model is built); [] when the run recorded none."""
    from .method import method_with_data

    saved = read_data_identity(run)
    return data_changes(saved, method_with_data(cfg).data_identity()) if saved else []


def environment(device=None) -> dict:
    """What a run's numbers depend on besides its config and data: the software versions and the
    CPU thread count (floating-point sums are split by thread, so a CPU run is reproduced to the
    digit only at the same ``threads``; docs/measurements/genaug_utility.md)."""
    import platform

    import diffusers

    env = {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
           "threads": torch.get_num_threads()}
    if device is not None:
        env["device"] = str(device)
    return env


def run_folder(path: str | Path) -> Path:
    """A run folder, its checkpoints folder or one of its step folders -> the run folder."""
    p = Path(path)
    for cand in (p, p.parent, p.parent.parent):
        if (cand / "config.yaml").is_file() and (cand / "checkpoints").is_dir():
            return cand
    raise ck.CheckpointError(f"{p}: not a trained run (expected a folder with config.yaml and checkpoints/, "
                             "as train.py --out writes)")


def _short(v, n: int = 60) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def config_conflicts(run_cfg: Config, other: Config) -> list[str]:
    """Model-defining settings where ``other`` differs from the run: ["model.vae_path: run 'a', config None", ...]."""
    if run_cfg.method != other.method:
        return [f"method: run {run_cfg.method!r}, config {other.method!r}"]
    return [f"{k}: run {_short(va)}, config {_short(vb)}" for k, va, vb in differing_keys(run_cfg, other)
            if k.startswith("model.") or k == "data.image_size"]


@dataclass
class LoadedRun:
    run_dir: Path
    step_dir: Path
    cfg: Config
    method: object  # fsmis.engine.method.Method, built and loaded
    weights: str  # "ema" | "model"

    @property
    def data_identity(self) -> dict | None:
        """RUN/data.json: the training dataset's name, resolved image folder and cases (or None)."""
        return read_data_identity(self.run_dir)

    @property
    def step(self) -> int:
        return int(self.step_dir.name.split("_")[-1])

    def predictor(self):
        p = self.method.predictor(checkpoint=str(self.step_dir))
        if p is None:
            raise ValueError(f"{self.run_dir}: method {self.cfg.method!r} does not segment (no predictor)")
        return p


def load_run(path: str | Path, which: str = "best", device: str | None = None, config: str | Path | None = None,
             use_ema: bool | None = None) -> LoadedRun:
    """Rebuild the method of a trained run and load its checkpoint (``which``: best, falling back to last).

    ``config``: an optional config file; its ``eval`` section is used, and any model key that
    differs from the run's is refused (ConfigError naming the keys)."""
    run = run_folder(path)
    cfg = load_config(run / "config.yaml")
    if config is not None:
        other = load_config(config)
        conflicts = config_conflicts(cfg, other)
        if conflicts:
            raise ConfigError(f"{config} does not describe the model trained in {run}: " + "; ".join(conflicts)
                              + f" (leave --config out to use the run's own {run / 'config.yaml'})")
        cfg.eval = other.eval
    step_dir = ck.resolve_checkpoint(path, which)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.train.seed)
    method = method_class(cfg.method)(cfg, device)
    method.build()
    needed = method.frozen_state()
    if needed:
        frozen = ck.load_frozen(run)
        if frozen is None:
            parts = sorted({k.split(".")[0] for k in needed})
            raise ck.CheckpointError(
                f"{run}: the run's frozen {', '.join(parts)} would be randomly initialised: the config gives no "
                f"weight file for it and {run / ck.FROZEN_NAME} is missing")
        method.load_frozen_state(frozen, str(run / ck.FROZEN_NAME))
    state = ck.load_checkpoint(step_dir)
    want_ema = use_ema if use_ema is not None else cfg.train.ema > 0
    if want_ema and "ema" not in state:
        raise ck.CheckpointError(f"{step_dir}: EMA weights requested but ema.safetensors is missing")
    weights = "ema" if want_ema else "model"
    method.load_trained_state(state[weights], str(step_dir))
    method.module.to(device).eval()
    return LoadedRun(run, step_dir, cfg, method, weights)


__all__ = ["LoadedRun", "load_run", "run_folder", "config_conflicts", "read_data_identity", "data_changes",
           "data_conflicts", "DATA_NAME"]
