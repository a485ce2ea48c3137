#!/usr/bin/env python
"""Do two synthetic folders give a training the same episodes?

Builds the training of RUN's config (RUN/config.yaml, a run trained with synthetic episodes) once
with genaug.data=[A] and once with genaug.data=[B], draws the episodes of its first --steps
optimiser steps (all of them by default) from each, as the trainer draws them (same seed, same
random stream), and counts the episodes that are equal: the same case, class, slices and
synthetic flag, and equal support images, support masks, query image and query mask. Nothing is
trained and nothing is written.

A filter that removed nothing gives a copy of the folder whose episodes are the original's, one
for one (then a training on it is the training on the original); a filter that removed slices
changes the episodes that would have used them and, through the random stream, the rest.

  python tools/same_episodes.py --run runs/x/runs/seed0 --a synth/ct --b synth/ct_filtered
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import fsmis  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsmis.cli import positive_int  # noqa: E402


def episode_stream(run: Path, folder: Path, overrides=()):
    """RUN's config on the synthetic folder ``folder`` and its training method with the data set up and
    no model built (drawing episodes needs no weights; nothing is written)."""
    from fsmis.config import load_config
    from fsmis.engine.method import method_with_data

    cfg = load_config(run / "config.yaml", [f"genaug.data=[{folder}]", *overrides])
    if cfg.genaug.ratio <= 0:
        raise ValueError(f"{run / 'config.yaml'}: genaug.ratio is 0: this run draws no synthetic episode")
    return cfg, method_with_data(cfg)


def same_episodes(run, a, b, steps: int | None = None, overrides=(), progress: bool = False) -> dict:
    """Counts of equal episodes over the first ``steps`` steps (default: the run's max_steps)."""
    import numpy as np
    from tqdm import tqdm

    run = Path(run)
    cfg, ma = episode_stream(run, Path(a), overrides)
    _, mb = episode_stream(run, Path(b), overrides)
    steps = int(steps or cfg.train.max_steps)
    n = same = synthetic = 0
    first_diff = None
    for s in tqdm(range(steps), desc="episodes", unit="step", disable=not progress):
        for micro in range(cfg.train.grad_accum):
            for x, y in zip(ma.episodes(s, micro)[0], mb.episodes(s, micro)[0]):
                n += 1
                synthetic += bool(x.synthetic)
                eq = (x.describe() == y.describe()
                      and all(np.array_equal(getattr(x, f), getattr(y, f))
                              for f in ("support_images", "support_masks", "query_images", "query_masks")))
                same += eq
                if not eq and first_diff is None:
                    first_diff = {"step": s, "micro": micro, "a": x.describe(), "b": y.describe()}
    return {"run": str(run), "a": str(a), "b": str(b), "steps": steps, "episodes": n,
            "synthetic_in_a": synthetic, "identical": same, "first_difference": first_diff}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder trained with synthetic episodes (its config.yaml)")
    p.add_argument("--a", required=True, metavar="SYNTH", help="first synthetic folder")
    p.add_argument("--b", required=True, metavar="SYNTH", help="second synthetic folder")
    p.add_argument("--steps", type=positive_int, default=None, help="optimiser steps to draw (default: the run's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run's config")
    args = p.parse_args(argv)
    r = same_episodes(args.run, args.a, args.b, args.steps, args.overrides, progress=not args.quiet)
    print(f"{r['identical']} of {r['episodes']} episodes identical over {r['steps']} steps "
          f"({r['synthetic_in_a']} synthetic in --a)")
    if r["first_difference"]:
        d = r["first_difference"]
        print(f"first difference: step {d['step']}, micro-batch {d['micro']}")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
