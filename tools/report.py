#!/usr/bin/env python
"""Merge results files into one comparison table: markdown, CSV, JSON and a bar chart.

  python tools/report.py results/panet/results.json results/alpnet results/sdfsmis --out results/table
  python tools/report.py A/results.json B/results.json --labels "ADNet" "SD-FSMIS" --out results/table

Each row is one results.json written by test.py (or a demo tool; a folder holding one may be given).
Per class: mean Dice over the evaluated folds ± std over folds. Every row carries its protocol
fingerprint (a hash of the protocol block and the dataset; fsmis/evaluation/report.py says exactly
which keys); rows are ranked only against rows of the same fingerprint, rows under another protocol
are marked, and the keys in which they differ are listed.

Writes OUT/report.md, OUT/report.csv, OUT/report.json and OUT/report.png, as one folder (complete or
not at all); --out must be a new or empty folder or an earlier report, never an input's folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results.json files (or folders holding one), one row each")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--labels", nargs="+", default=None, help="row labels, in the order of the results (default: "
                                                             "the method and config names)")
    p.add_argument("--title", default="Comparison", help="report title")
    args = p.parse_args(argv)

    from fsmis.evaluation.report import ReportError, build_report, check_out_folder, markdown, write_report

    if args.labels is not None and len(args.labels) != len(args.results):
        p.error(f"--labels: {len(args.labels)} labels for {len(args.results)} results files")
    try:
        check_out_folder(args.out, args.results, "report.json")
        report = build_report(args.results, args.labels)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = write_report(report, Path(args.out), args.title)
    print(markdown(report))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
