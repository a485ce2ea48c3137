#!/usr/bin/env python
"""Train a method (the config's ``method:``; SD-FSMIS by default) with the one training engine.

  python train.py --config configs/demo.yaml --out runs/demo data.root=datasets/phantom/ct
  python train.py --config configs/demo_vae.yaml --out runs/demo_vae data.root=datasets/phantom/ct
  python train.py --config configs/sdfsmis_abd_ct_setting1.yaml --out runs/ct_s1 --folds 0 1 2 3 4
  python train.py --resume runs/demo                 # continue after a crash or Ctrl-C
  python train.py --config C --dry-run [key=value ...] # build, print the load report, exit
  torchrun --nproc_per_node 4 train.py --config C --out RUN   # multi-GPU (DDP)

Overrides are key=value pairs on the config (see README: data.root, train.max_steps,
train.seed, train.ckpt_every, model.sd_path, model.vtct_encoder, ...). The resolved config is
saved as RUN_DIR/config.yaml; checkpoints go to RUN_DIR/checkpoints/step_<N>/ with best and
last named in RUN_DIR/checkpoints/index.json; TensorBoard logs to RUN_DIR/tensorboard/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="experiment YAML")
    p.add_argument("--out", help="run folder (with --folds: one sub-folder fold<k> per fold)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    p.add_argument("--folds", type=int, nargs="+", help="train these folds one after another (default: data.fold)")
    p.add_argument("--dry-run", action="store_true", help="build data and model, print the load report, exit")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args(argv)

    from fsmis.config import ConfigError, load_config
    from fsmis.data.nifti import DataError
    from fsmis.engine.checkpoints import CheckpointError
    from fsmis.engine.trainer import Trainer, train_folds
    from fsmis.models.weights import WeightLoadError

    try:
        if args.resume:
            run = Path(args.resume)
            if not (run / "config.yaml").is_file():
                raise ConfigError(f"{run}: not a run folder (config.yaml missing)")
            cfg = load_config(run / "config.yaml", args.overrides)
            tr = Trainer(cfg, run, args.device, not args.quiet).setup()
            step = tr.resume()
            print(f"resuming {run} at step {step} of {cfg.train.max_steps}")
            summary = tr.fit()
            _done(summary, run)
            return 0
        if not args.config:
            p.error("--config is required (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(cfg, args.device)
        if not args.out:
            p.error("--out RUN_DIR is required")
        out = Path(args.out)
        if args.folds:
            summaries = train_folds(cfg, out, args.folds, args.device, not args.quiet)
            for k, s in summaries.items():
                _done(s, out / f"fold{k}", f"fold {k}: ")
            return 0
        if (out / "config.yaml").is_file():
            from fsmis.config import config_diff

            diff = config_diff(load_config(out / "config.yaml"), cfg)
            if diff:
                raise ConfigError(f"{out} already holds a run with another config ({'; '.join(diff)}; saved vs "
                                  f"given): continue it with --resume {out}, or train into a new --out")
        tr = Trainer(cfg, out, args.device, not args.quiet).setup()
        if tr.resume():
            print(f"{out} already holds checkpoints; continuing from step {tr.step}")
        summary = tr.fit()
        _done(summary, out)
        return 0
    except (ConfigError, DataError, CheckpointError, WeightLoadError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _done(summary: dict, run: Path, prefix: str = "done: ") -> None:
    val = summary["best_val_dice"]
    line = f"{prefix}{summary['steps']} steps in {summary['seconds']:.0f} s"
    if val is not None and val >= 0:
        line += f", best validation Dice {val:.4f}"
    line += f"; checkpoints in {run / 'checkpoints'}"
    if summary.get("exported"):
        line += "; exported " + ", ".join(summary["exported"])
    print(line)


def dry_run(cfg, device=None) -> int:
    """Build the model (printing where every weight came from) and check the data, train nothing.
    The data are one row of the table: weights can be checked before the data arrive."""
    from fsmis.data.nifti import DataError
    from fsmis.engine.method import method_class

    method = method_class(cfg.method)(cfg, device or "cpu")
    method.build()
    if method.load_report is not None:
        print(method.load_report.format())
    counts = method.parameter_counts()
    print(f"method {cfg.method}; parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in counts.items()))
    root = getattr(cfg.data, "root", None)
    try:
        method.setup_data()
        rows = [("data", "found")] + method.describe_data()
    except (DataError, FileNotFoundError, ValueError) as exc:
        rows = [("data", f"NOT FOUND or unusable: {exc}")] if root else [("data", "not set (data.root)")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    print("dry run: nothing trained")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
