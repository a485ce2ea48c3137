#!/usr/bin/env python
"""Aggregate several runs' results.json (e.g. seeds, or folds evaluated separately) into
mean ± std per class.

  python tools/aggregate.py results/seed*/results.json --out results/summary.json

Refuses to mix runs whose protocol or dataset differs (tools/report.py's protocol fingerprint,
the folds evaluated aside: every protocol switch must match, and so must the dataset's name,
modality, number of cases and test classes), so a table never averages numbers produced under
different protocols or on different data.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IGNORED = {"fold_ids", "folds_evaluated"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results.json files (or folders holding one)")
    p.add_argument("--out", help="write the aggregate as JSON here")
    args = p.parse_args(argv)

    from fsmis.atomic import atomic_write_json
    from fsmis.evaluation.protocol import mean_std_over_runs
    from fsmis.evaluation.report import differing_keys, protocol_identity

    runs = []
    for r in args.results:
        path = Path(r) / "results.json" if Path(r).is_dir() else Path(r)
        if not path.is_file():
            print(f"error: {path}: not found", file=sys.stderr)
            return 2
        runs.append((path, json.loads(path.read_text())))
    ref_path, ref = runs[0]
    if args.out and any(Path(args.out).resolve() == p.resolve() for p, _ in runs):
        print(f"error: --out {args.out} is one of the results files: choose another path", file=sys.stderr)
        return 2
    # what a number means is the report's protocol identity (fsmis.evaluation.report), the folds aside
    for path, res in runs[1:]:
        diff = [k for k in differing_keys(ref, res) if k.split(".", 1)[1] not in IGNORED]
        if diff:
            print(f"error: {path} was produced under another protocol or on other data than {ref_path} "
                  f"({', '.join(diff)})", file=sys.stderr)
            return 2
    agg = mean_std_over_runs([r for _, r in runs])
    identity = protocol_identity(ref)
    agg["protocol"] = {k: v for k, v in identity["protocol"].items() if k not in IGNORED}
    agg["dataset"] = identity["dataset"]
    agg["runs"] = [str(p) for p, _ in runs]
    classes = list(agg["per_class"])
    print("| | " + " | ".join(classes) + " | mean |")
    print("|---|" + "---|" * (len(classes) + 1))
    cells = [f"{100 * agg['per_class'][c]['mean']:.2f} ± {100 * agg['per_class'][c]['std']:.2f}"
             if agg["per_class"][c] else "–" for c in classes]
    m = agg["mean_dice"]
    print(f"| Dice (%), {len(runs)} runs | " + " | ".join(cells) + f" | {100 * m['mean']:.2f} ± {100 * m['std']:.2f} |")
    if args.out:
        atomic_write_json(args.out, agg)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
