#!/usr/bin/env python
"""Compare two prepared dataset folders case by case: shape, spacing, orientation, intensity
correlation and per-class label Dice (classes matched by name).

Use it to check a preparation against a preprocessed archive you downloaded, or two users'
preparations against each other. A and B are any dataset roots the tools accept (benchmark
folder such as datasets/SABS, its inner *_normalized folder, or a dataset.json folder).
Cases are matched by id. Where B is stored on another voxel grid (size, flips, origin), it is
resampled onto A's grid through the affines before comparing (column "grid").

exit status: 0 compared (and every threshold given is met); 1 a threshold is not met, or a
case is missing from one folder with --require-same-cases; 2 a folder cannot be read.

examples:
  python tools/compare_datasets.py datasets/SABS downloads/SABS_published
  python tools/compare_datasets.py datasets/CHAOST2 other/CHAOST2 --min-dice 0.99 --min-corr 0.999 --json cmp.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import fsmis  # noqa: F401
except ImportError:  # run from a checkout: python tools/compare_datasets.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="compare_datasets.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, metavar="A", help="first dataset folder (the reference grid)")
    p.add_argument("b", type=Path, metavar="B", help="second dataset folder")
    p.add_argument("--cases", nargs="+", metavar="ID", help="compare only these case ids")
    p.add_argument("--min-dice", type=float, default=None, metavar="D",
                   help="fail (exit 1) if any class Dice of any case is below D")
    p.add_argument("--min-corr", type=float, default=None, metavar="R",
                   help="fail (exit 1) if any case's intensity correlation is below R")
    p.add_argument("--require-same-cases", action="store_true",
                   help="fail (exit 1) if a case id is in one folder only")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the full comparison as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fsmis.atomic import atomic_write_json
    from fsmis.data.nifti import DataError
    from fsmis.data.prepare.compare import compare_datasets, format_comparison

    print(f"comparing A = {args.a} with B = {args.b}", flush=True)
    try:
        result = compare_datasets(args.a, args.b, args.cases, progress=not args.quiet)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not result["cases"]:
        print(f"error: no case id is in both folders (A: {len(result['only_in_a'])} only there, "
              f"B: {len(result['only_in_b'])})", file=sys.stderr)
        return 2
    print(format_comparison(result))
    failures = []
    for r in result["cases"]:
        if args.min_corr is not None and (r["correlation"] is None or r["correlation"] < args.min_corr):
            failures.append(f"case {r['case']}: intensity correlation {r['correlation']} < {args.min_corr}")
        if args.min_dice is not None:
            for name, d in r["dice"].items():
                if d is not None and d < args.min_dice:
                    failures.append(f"case {r['case']}: {name} Dice {d:.4f} < {args.min_dice}")
    if args.require_same_cases and (result["only_in_a"] or result["only_in_b"]):
        failures.append(f"cases only in A: {result['only_in_a']}, only in B: {result['only_in_b']}")
    if args.json:
        atomic_write_json(args.json, {**result, "failures": failures})
        print(f"wrote {args.json}")
    if failures:
        print(f"{len(failures)} difference(s) beyond the thresholds:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
