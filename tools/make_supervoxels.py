#!/usr/bin/env python
"""Write the unsupervised supervoxels / superpixels used for self-supervised training.

No compile step: the 3D Felzenszwalb segmentation runs in numba (pure Python install).
See fsmis/data/supervoxels.py and docs/protocol.md §4.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import fsmis  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsmis.cli import non_negative_float, positive_int  # noqa: E402
from fsmis.data.nifti import DataError  # noqa: E402

EPILOG = """\
output:
  3d: superpix-MIDDLE_<id>.nii.gz in supervoxels_<min_size>/ (int32; 0 = outside the body,
      1..n = supervoxels), the layout the ADNet-family loaders read;
  2d: the same file names in superpixels_<min_size>/ (SSL-ALPNet superpixels; ids unique over
      the whole volume, never shared between slices).
  The folder is placed beside the *_normalized folder for the published benchmark folders
  (SABS/, CHAOST2/, CMR/ or their inner *_normalized folder) and inside a dataset.json folder.
  Files are written on each image's own grid and affine. Existing files are kept unless
  --overwrite.

defaults: 3d: min_size 5000 (abdomen), 1000 (CMR), sigma 0, scale 1, 26-connectivity and a
              per-slice body mask: the published ADNet-family supervoxels (on the published
              Card-MRI supervoxels_1000: identical body masks, ARI 0.946-1.000 per case);
          2d: min_size 400, sigma 1, scale 1.
  --fast (3d) deviates from the published files for speed: 6-connectivity and a 3D body mask.
  Cases run in parallel threads (--workers, default: one per CPU); the output does not depend
  on the number of workers. Memory: about 0.9 GB per worker for a 40x256x256 volume.

examples:
  python tools/make_supervoxels.py --data data/CMR
  python tools/make_supervoxels.py --data data/SABS/sabs_CT_normalized --mode 2d
  python tools/make_supervoxels.py --data data/SABS --fast --workers 2 --overwrite
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_supervoxels.py",
        description="Compute Felzenszwalb supervoxels (3D, ADNet family) or superpixels (2D, "
                    "SSL-ALPNet) for every image of a dataset folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="DIR",
                   help="dataset folder: a published benchmark folder (SABS/, CHAOST2/, CMR/ or the "
                        "inner *_normalized folder) or a folder with dataset.json")
    p.add_argument("--mode", choices=("3d", "2d"), default="3d",
                   help="3d: spacing-weighted 3D supervoxels (default); 2d: per-slice superpixels")
    p.add_argument("--min-size", type=positive_int, default=None, metavar="N",
                   help="minimum segment size in voxels (3d) / pixels (2d); "
                        "default 5000 (abdomen) / 1000 (CMR) in 3d, 400 in 2d")
    p.add_argument("--sigma", type=non_negative_float, default=None, metavar="S",
                   help="Gaussian pre-smoothing; 3d: in mm (divided by the voxel spacing), default 0; "
                        "2d: in pixels, default 1")
    p.add_argument("--scale", type=non_negative_float, default=1.0, metavar="S",
                   help="Felzenszwalb scale (k = scale/255 on the 0-255 rescaled image), default 1")
    p.add_argument("--body-threshold", type=non_negative_float, default=10.0, metavar="T",
                   help="body mask threshold on the 0-255 rescaled volume, default 10")
    p.add_argument("--fast", action="store_true",
                   help="3d only: 6-connectivity and a 3D body mask: about 3-4x faster, does not "
                        "reproduce the published supervoxels (default: 26-connectivity and a "
                        "per-slice body mask, as the published ADNet script)")
    p.add_argument("--connectivity", type=int, choices=(6, 26), default=None,
                   help="3d only: voxel neighbourhood of the graph; default 26, or 6 with --fast "
                        "(this option wins over --fast); only 26 reproduces the published supervoxels")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="cases computed in parallel (threads); default: one per available CPU, "
                        "at most the number of cases to compute")
    p.add_argument("--overwrite", action="store_true", help="recompute files that already exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fsmis.data.supervoxels import make_dataset_supervoxels, plan_dataset_supervoxels
    from fsmis.parallel import worker_count

    connectivity = args.connectivity or (6 if args.fast else 26)
    per_slice = not args.fast
    if args.mode == "2d" and (args.connectivity or args.fast):
        print("note: --connectivity / --fast apply to --mode 3d only; ignored", file=sys.stderr)
    try:
        plan = plan_dataset_supervoxels(args.data, args.mode, args.min_size, args.sigma, args.scale)
        print(plan.describe())
        if args.mode == "3d":
            published = connectivity == 26 and per_slice
            print(f"  connectivity={connectivity} body mask: threshold {args.body_threshold:g}, "
                  f"largest {'2D component per slice' if per_slice else '3D component'}"
                  + (" (the published behaviour)" if published
                     else " (deviation: does not reproduce the published supervoxels)"))
        todo = len(plan.case_ids) if args.overwrite else len(plan.case_ids) - len(plan.existing)
        workers = worker_count(args.workers, todo)
        print(f"  {todo} case(s) to compute" + (" (--overwrite)" if args.overwrite else "")
              + (f", {workers} worker(s)" if todo else ""), flush=True)
        t0 = time.perf_counter()
        out = make_dataset_supervoxels(
            args.data, mode=args.mode, min_size=plan.min_size, scale=args.scale, sigma=plan.sigma,
            overwrite=args.overwrite, progress=not args.no_progress,
            body_threshold=args.body_threshold, connectivity=connectivity, body_per_slice=per_slice,
            workers=workers,
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = len(list(out.glob("superpix-MIDDLE_*.nii.gz")))
    print(f"done in {time.perf_counter() - t0:.1f} s: {n} file(s) in {out}")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
