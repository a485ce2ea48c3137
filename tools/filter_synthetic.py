#!/usr/bin/env python
"""Filter a synthetic folder (tools/synthesize.py's output) into a new folder in the same layout.

Each filter is a switch (at least one is needed):
  --min-dice T     agreement: a trained SD-FSMIS run (--checkpoint RUN), given the real source
                   slice and its class mask as 1-shot support, segments the synthetic slice; a
                   slice whose mean Dice over its classes is below T is removed (slices with no
                   class in both labels are kept, counted as not judged)
  --no-memorised   memorisation: a slice whose nearest real slice has an SSIM above the
                   real-vs-real 99th percentile (tools/synth_quality.py's flag) is removed
  --erode N        every label and supervoxel region loses N pixels in-plane
  --default-filters  the default set: --no-memorised, and agreement only when --min-dice is
                   given too (measured: the agreement filter lowered Dice at T = 0.2 and 0.5;
                   docs/measurements/genaug_utility.md)

Removed slices are listed in the output's dataset.json (synthetic.excluded_slices): training
never draws them. A case left without slices is dropped. The output holds the kept cases'
files, dataset.json (whose synthetic.filter block carries the settings and the counts of what
each filter removed; a training that uses the folder copies them into train_summary.json) and
filter.json (the same, plus per slice the agreement Dice and nearest-real SSIM). Written
atomically: an interrupted run leaves --out as it was.

examples:
  python tools/filter_synthetic.py --data synth/ct --real datasets/phantom/ct --out synth/ct_f --no-memorised
  python tools/filter_synthetic.py --data synth/ct --real datasets/phantom/ct --out synth/ct_f \\
      --min-dice 0.5 --checkpoint checkpoints/demo/run --erode 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import fsmis  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsmis.cli import non_negative_int, unit_fraction  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="filter_synthetic.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="SYNTH", help="the synthetic folder to filter")
    p.add_argument("--real", required=True, metavar="DIR", help="the real dataset folder its cases were made from")
    p.add_argument("--out", required=True, metavar="DIR", help="the filtered folder to write")
    p.add_argument("--min-dice", type=unit_fraction, default=None, metavar="T",
                   help="agreement filter: remove slices whose segmenter Dice is below T (needs --checkpoint)")
    p.add_argument("--checkpoint", default=None, metavar="RUN", help="the trained SD-FSMIS run of the agreement filter")
    p.add_argument("--no-memorised", action="store_true", help="memorisation filter: remove flagged slices")
    p.add_argument("--erode", type=non_negative_int, default=0, metavar="N",
                   help="erode every label and supervoxel region by N pixels (default 0: off)")
    p.add_argument("--default-filters", action="store_true",
                   help="the default filters: --no-memorised (agreement only with --min-dice T; measured worse "
                        "than none at T = 0.2 and 0.5)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fsmis.genaug.filters import default_filter_settings, filter_synthetic

    min_dice, no_mem = args.min_dice, args.no_memorised
    if args.default_filters:
        d = default_filter_settings(min_dice)
        min_dice, no_mem = d["min_dice"], d["no_memorised"]
    rec = filter_synthetic(args.data, args.real, args.out, min_dice=min_dice, checkpoint=args.checkpoint,
                           no_memorised=no_mem, erode=args.erode, device=args.device, progress=not args.quiet,
                           overwrite=args.overwrite)
    c = rec["counts"]
    print(f"kept {c['cases_out']} of {c['cases_in']} cases, {c['slices_out']} of {c['slices_in']} slices "
          f"(removed: agreement {c['removed_by_agreement']}, memorisation {c['removed_by_memorisation']}, "
          f"both {c['removed_by_both']}; excluded before {c['excluded_before']}; eroded label pixels "
          f"{c['eroded_label_pixels']}) in {rec['seconds']:.1f} s")
    print(f"  folder: {rec['out']}")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
