#!/usr/bin/env python
"""Train SD-FSMIS episodically.

  python train.py --config configs/demo.yaml --out runs/demo data.root=datasets/phantom/ct
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
            print(f"done: {summary['steps']} steps, best validation Dice {summary['best_val_dice']:.4f}; "
                  f"checkpoints in {run / 'checkpoints'}")
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
                print(f"fold {k}: {s['steps']} steps, best validation Dice {s['best_val_dice']:.4f}")
            return 0
        tr = Trainer(cfg, out, args.device, not args.quiet).setup()
        if tr.resume():
            print(f"{out} already holds checkpoints; continuing from step {tr.step}")
        summary = tr.fit()
        print(f"done: {summary['steps']} steps in {summary['seconds']:.0f} s, best validation Dice "
              f"{summary['best_val_dice']:.4f}; checkpoints in {out / 'checkpoints'}")
        return 0
    except (ConfigError, DataError, CheckpointError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def dry_run(cfg, device=None) -> int:
    from fsmis.engine.trainer import fold_split
    from fsmis.models.build import build_model, parameter_counts

    model, report = build_model(cfg.model)
    print(report.format())
    counts = parameter_counts(model)
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in counts.items()))
    if cfg.data.root:
        from fsmis.data.datasets import open_dataset

        ds = open_dataset(cfg.data.root)
        fold, train, val = fold_split(cfg, ds)
        print(f"data: {ds.name}, fold {fold.fold}: support {fold.support}, queries {list(fold.queries)}, "
              f"{len(train)} training cases, validation {val}")
    print("dry run: nothing trained")
    return 0


if __name__ == "__main__":
    sys.exit(main())
