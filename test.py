#!/usr/bin/env python
"""Evaluate a few-shot segmentation method with the canonical FSMIS protocol.

Examples
  python test.py --method support-copy --data datasets/phantom/ct --out results/sc_ct
  python test.py --method support-copy --data CMR/ --out results/cmr --protocol legacy --supp-idx 2
  python test.py --method support-copy --data CMR/ --out results/one --support-case 7 --query-cases 1 2 3

Writes OUT/results.json (schema fsmis-results/1, see README), results.csv, results.md and
OUT/predictions/fold<k>/pred_<case>.nii.gz (the query's own grid; class ids as in its labels).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fsmis.data.nifti import DataError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from fsmis.methods.base import available_methods

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help=f"method name: {', '.join(available_methods())}")
    p.add_argument("--config", help="method config (YAML), for trained methods")
    p.add_argument("--checkpoint", help="checkpoint folder or file, for trained methods")
    p.add_argument("--data", required=True, help="dataset root: benchmark folder, its *_normalized folder, "
                                                 "or a folder with dataset.json")
    p.add_argument("--out", required=True, help="output folder for results and predictions")
    g = p.add_argument_group("protocol (every switch is written into results.json)")
    g.add_argument("--protocol", choices=["canonical", "legacy"], default="canonical",
                   help="fold protocol (default canonical: support = first case of the next fold)")
    g.add_argument("--supp-idx", type=int, default=2,
                   help="legacy folds: index of the support case in the sorted fold "
                        "(2 Q-Net/RPT/PAMI/GMRD/FAMNet, 3 CAT-Net, -1 ADNet; default 2)")
    g.add_argument("--folds", type=int, nargs="+", help="evaluate only these folds (default: all 5)")
    g.add_argument("--n-folds", type=int, default=5)
    g.add_argument("--setting", type=int, choices=[1, 2], default=1,
                   help="training setting of the evaluated model (recorded; default 1)")
    g.add_argument("--exclusion", choices=["any", "all"], default="any",
                   help="Setting-2 exclusion used in training (recorded; default any)")
    g.add_argument("--chunking", choices=["ep1", "alpnet"], default="ep1",
                   help="ep1: chunks of the class slices (default); alpnet: equal-extent chunks over z_min..z_max")
    g.add_argument("--support-mode", choices=["1shot", "3shot"], default="1shot",
                   help="1shot: chunk i uses support slice i (default); 3shot: all support slices for every chunk")
    g.add_argument("--dice", choices=["per_volume", "pooled"], default="per_volume",
                   help="headline Dice: per-volume 3D Dice averaged (default) or pooled over a fold's volumes")
    g.add_argument("--n-part", type=int, default=3, help="EP1 parts (default 3)")
    g.add_argument("--classes", nargs="+", help="test classes by name (default: the dataset's test classes)")
    g.add_argument("--support-case", help="evaluate this one support case against --query-cases (no folds)")
    g.add_argument("--query-cases", nargs="+", help="query case ids for --support-case")
    p.add_argument("--no-surface", action="store_true", help="skip HD95/ASD (faster)")
    p.add_argument("--no-nifti", action="store_true", help="do not write NIfTI predictions")
    p.add_argument("--no-figures", action="store_true",
                   help="do not write overlay PNGs (support, query, prediction, ground truth; one per fold)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fsmis.data.datasets import open_dataset
    from fsmis.evaluation.protocol import Evaluator, ProtocolConfig
    from fsmis.evaluation.results import results_markdown, write_results
    from fsmis.methods.base import build_predictor

    if (args.support_case is None) != (args.query_cases is None):
        print("error: --support-case and --query-cases go together", file=sys.stderr)
        return 2
    try:
        ds = open_dataset(args.data)
        predictor = build_predictor(args.method, config=args.config, checkpoint=args.checkpoint)
        cfg = ProtocolConfig(
            folds=args.protocol, supp_idx=args.supp_idx, n_folds=args.n_folds, fold_ids=args.folds,
            n_part=args.n_part, chunking=args.chunking, support=args.support_mode, dice=args.dice,
            setting=args.setting, exclusion=args.exclusion, test_classes=args.classes,
            surface_metrics=not args.no_surface, support_case=args.support_case,
            query_cases=args.query_cases)
        out = Path(args.out)
        sink = None if args.no_nifti else PredictionWriter(ds, out / "predictions")
        ev = Evaluator(ds, predictor, cfg, progress=not args.quiet, prediction_sink=sink)
        folds = ev.folds()
        print(f"{predictor.name} on {ds.name} ({len(ds.case_ids)} cases, classes {', '.join(ev.classes)}); "
              f"{len(folds)} fold(s): " + "; ".join(f"support {f.support} -> {len(f.queries)} queries" for f in folds))
        results = ev.run()
        written = write_results(results, out)
        if sink is not None:
            written += sink.flush()
        if not args.no_figures:
            written += write_figures(ds, predictor, results, out / "figures")
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(results_markdown(results))
    print(f"wrote {len(written)} files under {out}: results.json, results.csv, results.md"
          + ("" if args.no_nifti else f", predictions in {out / 'predictions'}")
          + ("" if args.no_figures else f", overlays in {out / 'figures'}"))
    return 0


def write_figures(ds, predictor, results, folder: Path) -> list:
    """One overlay panel per fold: for each class, the middle slice of the first query case."""
    from fsmis.data.normalize import normalize_volume
    from fsmis.evaluation.figures import example_rows, overlay_panel

    written = []
    for f in results["folds"]:
        rows = example_rows(ds, predictor, f, results["protocol"]["test_classes"], normalize_volume)
        if rows:
            name = "explicit" if f["fold"] is None else f"fold{f['fold']}"
            written.append(overlay_panel(rows, folder / f"{name}.png",
                                         f"{predictor.name} on {ds.name}, {name}, support {f['support']}"))
    return written


class PredictionWriter:
    """Collects per-class predictions and writes one label map per (fold, query case) on the
    query file's own grid, with the dataset's class ids."""

    def __init__(self, dataset, folder: Path):
        self.ds = dataset
        self.folder = Path(folder)
        self.maps = {}

    def __call__(self, fold, case, cls, mask):
        import numpy as np

        key = (fold, case)
        if key not in self.maps:
            self.maps[key] = np.zeros(mask.shape, dtype=np.int16)
        self.maps[key][mask] = self.ds.class_id(cls)

    def flush(self) -> list[Path]:
        import numpy as np

        from fsmis.data.nifti import save_like

        written = []
        for (fold, case), arr in self.maps.items():
            sub = self.folder / ("explicit" if fold is None else f"fold{fold}")
            vol = self.ds.load_case(case).image_volume
            written.append(save_like(arr, vol, sub / f"pred_{case}.nii.gz", dtype=np.int16))
        return written


if __name__ == "__main__":
    sys.exit(main())
