#!/usr/bin/env python
"""Prepare a benchmark (Abd-CT, Abd-MRI, Card-MRI) from its raw download (protocol sections 1-4).

--dataset sabs   Synapse multi-atlas abdomen CT, RawData (img/imgNNNN.nii.gz, label/labelNNNN.nii.gz):
                 HU [-125, 275] -> [0, 255], 32 px border crop, in-plane 256 x 256, z kept;
                 cases 0..N-1 in file order; ids 1 spleen, 2 RK, 3 LK, 4 gallbladder, 6 liver, ...
--dataset chaos  CHAOS MR T2-SPIR (Train_Sets/MR/<patient>/T2SPIR/DICOM_anon + Ground): DICOM read
                 with SimpleITK, PNG grey 63/126/189/252 -> 1 liver, 2 RK, 3 LK, 4 spleen, clip at
                 the 99.5th percentile, 1.25 x 1.25 x 7.70 mm, 256 x 256, stored LAS; id = patient
--dataset cmr    MS-CMRSeg (patient<k>_C0.nii.gz + patient<k>_C0_manual.nii.gz; --sequence DE for
                 LGE, T2): clip at the 99.5th percentile, 1.25 x 1.25 x 7.99 mm, 256 x 256, oblique
                 stacks used as stored, labels kept as 200 / 500 / 600; id = patient number

--out is the benchmark folder the training configs point at (e.g. datasets/SABS). It receives
<folder>/image_<id>.nii.gz, label_<id>.nii.gz, dataset.json, classmap_1.json (the class-slice
index), supervoxels_<n>/superpix-MIDDLE_<id>.nii.gz, preparation_report.json/.md (per case:
shape, spacing, orientation, label voxel counts) and checksums.sha256, with <folder> one of
sabs_CT_normalized, chaos_MR_T2_normalized, cmr_MR_normalized.

Every case is checked: image/label geometry, label values, labels inside the body mask,
slice axis shared by all cases; a failure names the case and exits with status 2. A re-run
skips finished cases; an interrupted run leaves no half-written case (run again to finish).

examples:
  python tools/prepare_dataset.py --dataset sabs  --raw downloads/Abdomen/RawData --out datasets/SABS
  python tools/prepare_dataset.py --dataset chaos --raw downloads/CHAOS_Train_Sets --out datasets/CHAOST2
  python tools/prepare_dataset.py --dataset cmr   --raw downloads/MS-CMRSeg2019 --out datasets/CMR
  python tools/prepare_dataset.py --dataset cmr   --raw downloads/MS-CMRSeg2019 --sequence DE --out datasets/CMR_LGE
  python tools/prepare_dataset.py --verify datasets/SABS     # check the files against checksums.sha256
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import fsmis  # noqa: F401
except ImportError:  # run from a checkout: python tools/prepare_dataset.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsmis.cli import positive_int, unit_fraction  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prepare_dataset.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("sabs", "chaos", "cmr"), help="which benchmark the raw folder holds")
    p.add_argument("--raw", type=Path, metavar="DIR", help="the raw download (searched recursively)")
    p.add_argument("--out", type=Path, metavar="DIR", help="benchmark output folder, e.g. datasets/SABS")
    p.add_argument("--sequence", default="C0", choices=("C0", "DE", "T2"),
                   help="cmr only: C0 = bSSFP (the benchmark, default), DE = LGE, T2")
    p.add_argument("--cases", nargs="+", metavar="ID", help="prepare only these case ids")
    p.add_argument("--no-supervoxels", action="store_true",
                   help="skip the 3D supervoxels (a later run without this flag adds them)")
    p.add_argument("--min-inside", type=unit_fraction, default=0.9, metavar="F",
                   help="alignment check: fraction of each class's voxels that must lie inside the "
                        "body mask (default 0.9)")
    p.add_argument("--workers", type=positive_int, default=1, metavar="N",
                   help="cases prepared in parallel threads (default 1; supervoxels need about 0.35 kB "
                        "per voxel per worker)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace everything in --out that this tool writes, even if prepared with other "
                        "settings or by something else")
    p.add_argument("--verify", type=Path, metavar="DIR",
                   help="only check the files of a prepared benchmark folder against its checksums.sha256")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fsmis.data import prepare as prep
    from fsmis.data.nifti import DataError

    if args.verify is not None:
        if not args.verify.is_dir():
            print(f"error: --verify {args.verify}: not a folder", file=sys.stderr)
            return 2
        if not (args.verify / "checksums.sha256").is_file():
            print(f"error: --verify {args.verify}: no checksums.sha256 (not a folder this tool prepared)",
                  file=sys.stderr)
            return 2
        problems = prep.verify_checksums(args.verify)
        if problems:
            for line in problems:
                print(f"FAILED {line}")
            print(f"{args.verify}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        n = len((args.verify / "checksums.sha256").read_text().splitlines())
        print(f"{args.verify}: OK, {n} files match checksums.sha256")
        return 0
    missing = [f"--{k}" for k in ("dataset", "raw", "out") if getattr(args, k) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or --verify DIR)")
    if args.sequence != "C0" and args.dataset != "cmr":
        parser.error("--sequence applies to --dataset cmr only")
    t0 = time.perf_counter()
    try:
        plan = prep.plan_preparation(args.dataset, args.raw, args.out, args.sequence, args.cases,
                                     supervoxels=not args.no_supervoxels, overwrite=args.overwrite)
        print(plan.describe(), flush=True)
        n_todo = len(plan.todo())
        prep.prepare_dataset(plan, overwrite=args.overwrite, progress=not args.quiet,
                             min_inside=args.min_inside, workers=args.workers)
    except (DataError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    ids = [rc.case_id for rc in plan.cases]
    print(f"prepared {n_todo} case(s) in {dt:.1f} s" + (f" ({dt / n_todo:.1f} s per case)" if n_todo else ""))
    print(f"  images:      {plan.image_dir}/image_{ids[0]}.nii.gz .. image_{ids[-1]}.nii.gz")
    print(f"  labels:      {plan.image_dir}/label_<id>.nii.gz  {plan.recipe.labels}")
    print(f"  metadata:    {plan.image_dir}/dataset.json, classmap_1.json (class-slice index)")
    if plan.supervoxels:
        print(f"  supervoxels: {plan.supervoxel_dir}/superpix-MIDDLE_<id>.nii.gz")
    else:
        print("  supervoxels: not written (--no-supervoxels)")
    print(f"  report:      {plan.out}/preparation_report.md, preparation_report.json")
    print(f"  checksums:   {plan.out}/checksums.sha256 (check: tools/prepare_dataset.py --verify {plan.out})")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
