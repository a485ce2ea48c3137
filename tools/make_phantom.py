#!/usr/bin/env python
"""Write a synthetic abdominal dataset (procedural 3D phantoms) that every fsmis tool accepts.

Each case is a 3D abdomen with body wall, spine, vessels, bowel/stomach distractors and the
four benchmark organs (liver, spleen, left and right kidney), varied per subject. CT cases use
the Abd-CT (SABS) label ids and preprocessing (HU clipped to [-125, 275], rescaled to
[0, 255]); MR cases use the Abd-MRI (CHAOS) ids and a T2-like contrast with bias field and
Rician noise, clipped at the 99.5th percentile.

Output (in --out): image_<id>.nii.gz, label_<id>.nii.gz (ids 0..N-1 for CT, 1..N for MR),
dataset.json, and supervoxels_<min_size>/superpix-MIDDLE_<id>.nii.gz (min_size 5000 at
256 x 256, scaled with the in-plane area for smaller sizes). Files are stored LPS
(affine diag(-sx, -sy, sz)); arrays are [Z, Y, X] with slices from inferior to superior.

The same --seed always gives identical files. An existing folder is only written to if it
is empty or holds a previous phantom (a phantom with identical settings is reused as is);
--overwrite forces regeneration and allows replacing the image_*/label_*/supervoxels_*
files of any folder.

Examples
  python tools/make_phantom.py --out datasets/phantom/ct --modality ct
  python tools/make_phantom.py --out datasets/phantom/mr --modality mr --cases 10 --seed 1
  python tools/make_phantom.py --out datasets/tiny --cases 2 --slices 12 --size 64 --no-supervoxels
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import fsmis  # noqa: F401
except ImportError:  # run from a checkout: python tools/make_phantom.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--modality", choices=("ct", "mr"), default="ct",
                   help="ct: SABS label ids, HU window [-125, 275] -> [0, 255]; "
                        "mr: CHAOS label ids, T2-like (default: ct)")
    p.add_argument("--cases", type=int, default=8, help="number of cases (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed -> identical files (default: 0)")
    p.add_argument("--slices", type=int, default=40, help="slices per case, Z (default: 40)")
    p.add_argument("--size", type=int, default=256,
                   help="in-plane size in pixels, Y = X (default: 256, as the benchmarks)")
    p.add_argument("--no-supervoxels", action="store_true",
                   help="skip the 3D supervoxels (supervoxels_<min_size>/) needed for self-supervised training")
    p.add_argument("--supervoxel-min-size", type=int, default=None,
                   help="supervoxel min_size (default: 5000 at 256 x 256, scaled with the in-plane area)")
    p.add_argument("--overwrite", action="store_true",
                   help="regenerate even if an identical phantom is there, and allow writing into a "
                        "non-empty folder that is not a phantom (its image_*, label_*, dataset.json and "
                        "supervoxels_* are deleted first)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.cases < 1:
        print("error: --cases must be >= 1", file=sys.stderr)
        return 2
    if args.slices < 2 or args.size < 16:
        print("error: --slices must be >= 2 and --size >= 16", file=sys.stderr)
        return 2
    from fsmis.data.phantom import case_ids, make_phantom_dataset, phantom_is_current

    shape = (args.slices, args.size, args.size)
    supervoxels = not args.no_supervoxels
    reused = (not args.overwrite) and phantom_is_current(
        args.out, args.modality, args.cases, args.seed, shape, supervoxels, args.supervoxel_min_size)
    t0 = time.time()
    try:
        out = make_phantom_dataset(args.out, modality=args.modality, n_cases=args.cases, seed=args.seed,
                                   shape=shape, progress=not args.quiet, supervoxels=supervoxels,
                                   overwrite=args.overwrite, supervoxel_min_size=args.supervoxel_min_size)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import json

    info = json.loads((out / "dataset.json").read_text())
    ids = case_ids(args.modality, args.cases)
    if reused:
        print(f"{out}: already holds this phantom (seed {args.seed}, {args.cases} {args.modality.upper()} cases, "
              f"shape {shape}); reused as is (--overwrite regenerates it)")
    else:
        print(f"wrote {args.cases} {args.modality.upper()} phantom cases, shape (Z, Y, X) = {shape}, "
              f"in {time.time() - t0:.1f} s")
    print(f"  folder:      {out.resolve()}")
    print(f"  images:      image_{ids[0]}.nii.gz .. image_{ids[-1]}.nii.gz")
    print(f"  labels:      label_{ids[0]}.nii.gz .. label_{ids[-1]}.nii.gz  {info['labels']}")
    print(f"  metadata:    dataset.json (test classes: {', '.join(info['test_labels'])})")
    if supervoxels:
        print(f"  supervoxels: {info['supervoxels']}/superpix-MIDDLE_<id>.nii.gz")
    else:
        print("  supervoxels: not written (--no-supervoxels); make them later with tools/make_supervoxels.py")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
