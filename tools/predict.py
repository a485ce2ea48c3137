#!/usr/bin/env python
"""Segment a new scan from one annotated scan.

  python tools/predict.py --method support-copy \\
      --support-image A.nii.gz --support-label A_seg.nii.gz --label 6 \\
      --query-image B.nii.gz [--query-slices 10:40] --out pred.nii.gz
  python tools/predict.py --checkpoint RUN_DIR --support-image A.nii.gz ...   # a trained run
  python tools/predict.py --checkpoint RUN_DIR --support-image A.nii.gz --support-label A_seg.nii.gz \
      --label 6 --query-image B.nii.gz --out pred.nii.gz --synthetic-support 2 --generator GEN --modality CT
  python tools/predict.py --checkpoint RUN_DIR --support-mask ATLAS_seg.nii.gz --generator GEN_MR \
      --modality MR --label 6 --query-image B.nii.gz --out pred.nii.gz     # zero-shot: a mask, no image

--synthetic-support M adds M generated variants (edited mask, generated image) of each support
slice: a K = 1 + M support. --support-mask takes the support from a mask alone: its images are
generated in the query's modality by a generator trained on that modality.

A trained method is loaded from its run folder (train.py --out): model and settings come from
RUN_DIR/config.yaml, exactly as test.py evaluates it.

Support and query may differ in orientation, spacing and in-plane size: the query is brought
to the support's layout, predicted, and mapped back. The output lies on the query's own grid
and affine (opens in ITK-SNAP / 3D Slicer over B.nii.gz), with value --label (or --out-value).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsmis.data.nifti import DataError  # noqa: E402


def main(argv=None) -> int:
    from fsmis.methods.base import available_methods

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", help=f"one of: {', '.join(available_methods())} (with --checkpoint: from the run)")
    p.add_argument("--checkpoint", help="trained run folder (train.py --out), or one of its step folders")
    p.add_argument("--config", help="optional, with --checkpoint: a config whose eval section is used; its model "
                                    "keys must equal the run's")
    p.add_argument("--support-image", help="annotated scan (NIfTI)")
    p.add_argument("--support-label", help="its label map (NIfTI, same grid)")
    p.add_argument("--support-mask", help="zero-shot support: a label map alone (another patient, modality or an "
                                          "atlas); its images are generated in --modality by --generator")
    p.add_argument("--label", type=int, required=True, help="label id of the structure to segment")
    p.add_argument("--query-image", required=True, help="scan to segment (NIfTI)")
    p.add_argument("--query-slices", help="Z0:Z1, stored slice range of the query to segment (default: all)")
    p.add_argument("--n-part", type=int, default=3, help="EP1 parts: query slices split into this many chunks (default 3)")
    p.add_argument("--as-stored", action="store_true",
                   help="keep the query's in-plane pixel spacing (no resampling to the support's), as the "
                        "benchmark evaluator does; default: resample to the support's spacing")
    p.add_argument("--out-value", type=int, help="value written for the structure (default: --label)")
    p.add_argument("--out", required=True, help="output mask (NIfTI)")
    g = p.add_argument_group("synthetic support (docs/generative-augmentation.md)")
    g.add_argument("--synthetic-support", type=int, default=0, metavar="M",
                   help="add M generated variants of each support slice to the support: K = 1 + M (needs "
                        "--generator and --modality; default 0)")
    g.add_argument("--generator", metavar="RUN", help="a trained generator run (method: generator)")
    g.add_argument("--modality", help="the generator's modality token of the generated images (e.g. CT, MR, CMR): "
                                      "the support's for --synthetic-support, the query's for --support-mask")
    g.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic variants (default 0)")
    args = p.parse_args(argv)

    from fsmis.config import ConfigError
    from fsmis.engine.checkpoints import CheckpointError
    from fsmis.inference import predict_scan
    from fsmis.methods.base import build_predictor
    from fsmis.models.weights import WeightLoadError

    if args.method is None and args.checkpoint is None:
        p.error("give --method (e.g. support-copy) or --checkpoint RUN_DIR")
    out = Path(args.out)
    if not (out.name.endswith(".nii.gz") or out.name.endswith(".nii")):
        p.error(f"--out {out}: the mask is written as NIfTI; the name must end in .nii.gz or .nii")
    for flag, given in (("--support-image", args.support_image), ("--support-label", args.support_label),
                        ("--support-mask", args.support_mask), ("--query-image", args.query_image)):
        if given is not None and out.resolve() == Path(given).resolve():
            p.error(f"--out {out} is the {flag} file: it would be overwritten; choose another output name")
    if out.is_dir():
        p.error(f"--out {out} is a folder; give a file name ending in .nii.gz")
    if args.n_part < 1:
        p.error(f"--n-part {args.n_part}: must be >= 1")
    if args.support_mask is not None:
        if args.support_image is not None or args.support_label is not None:
            p.error("--support-mask replaces --support-image/--support-label: give one kind of support")
        if args.generator is None or args.modality is None:
            p.error("--support-mask needs --generator RUN and --modality TOKEN (the query's modality)")
        if args.synthetic_support:
            p.error("--support-mask and --synthetic-support are two different supports: give one")
    elif args.support_image is None or args.support_label is None:
        p.error("give --support-image and --support-label (or --support-mask with --generator)")
    if args.synthetic_support < 0:
        p.error(f"--synthetic-support must be >= 0, got {args.synthetic_support}")
    if args.synthetic_support and (args.generator is None or args.modality is None):
        p.error("--synthetic-support M needs --generator RUN and --modality TOKEN")
    value = args.label if args.out_value is None else args.out_value
    if not -32768 <= value <= 32767:
        p.error(f"--out-value {value}: must fit in int16 (-32768..32767)")
    try:
        predictor = build_predictor(args.method, config=args.config, checkpoint=args.checkpoint)
        if args.synthetic_support:
            from fsmis.genaug.support import SyntheticSupport

            predictor = SyntheticSupport(predictor, args.generator, args.synthetic_support, args.modality,
                                         seed=args.synthetic_seed)
            print(f"support enlarged by {args.synthetic_support} generated variant(s) per slice ({args.generator})")
        generator = None
        if args.support_mask is not None:
            from fsmis.genaug.zeroshot import MaskSupportGenerator

            generator = MaskSupportGenerator(args.generator, args.modality, seed=args.synthetic_seed)
            print(f"zero-shot support: images generated from {args.support_mask} in {args.modality} ({args.generator})")
        support = args.support_image or args.support_mask
        print(f"{predictor.name}: label {args.label} of {support} -> {args.query_image}")
        res = predict_scan(predictor, args.support_image, args.support_label or args.support_mask, args.label,
                           args.query_image, args.out, args.query_slices, args.n_part, args.out_value,
                           match_spacing=not args.as_stored, support_generator=generator)
    except (DataError, ValueError, ConfigError, CheckpointError, WeightLoadError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"support slices {res.support_slices}; query slices {res.query_slices[0]}..{res.query_slices[-1]}; "
          f"{int((res.mask_zyx > 0).sum())} voxels segmented")
    print(f"wrote {res.out_path}")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
