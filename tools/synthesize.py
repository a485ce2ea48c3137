#!/usr/bin/env python
"""Write synthetic image + mask cases made by a trained generator (method: generator).

For each source case (by default the generator run's own training cases of --data, as its
RUN/data.json lists them; never a case outside that list unless --cases names it), --per-case
synthetic cases: the source label volume with ONE random in-plane edit applied to every slice
(elastic warp, scale 0.85-1.15, translate up to +-8 %, rotate +-10 deg; nearest neighbour, so
ids are kept), only the dataset's test classes kept, and every slice's image generated for the
union of those classes in the edited slice (modality token of the dataset, class token dropped:
a union of organs is no single class). The edited mask is the label.

Output (written into a temporary folder beside --out, moved into place at the end):
  image_<id>.nii.gz, label_<id>.nii.gz   the source's grid, affine and header; intensities mapped
                                         to the source's [min, max], float32
  <supervoxels_N>/superpix-MIDDLE_<id>.nii.gz   the source's supervoxels, edited alike (if any)
  dataset.json   "<source>_synthetic", with a "synthetic" block: generator run, source of each
                 case, each case's edit, seed, steps, guidance, per_case
  samples.png    rows of [real source slice | edited mask | generated slice]
  quality.json   fsmis.genaug.quality (FID/KID on local features, SSIM/PSNR, mask Dice,
                 memorisation); --no-quality skips it (tools/synth_quality.py computes it later)

Synthetic ids are M*(k+1) + i (source ordinal i, k = 0..per_case-1; M = 1000 or the next power
of ten above the source ids). The same --seed gives the same arrays in every file.

examples:
  python tools/synthesize.py --checkpoint runs/gen_ct --data datasets/phantom/ct --out synth/ct --per-case 2
  python tools/synthesize.py --checkpoint runs/gen_ct --data datasets/SABS --out synth/sabs --per-case 4 \\
      --steps 50 --guidance 2 --device cuda
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import fsmis  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fsmis.cli import non_negative_float, non_negative_int, positive_int  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synthesize.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="a trained generator run folder (train.py --out)")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="the dataset of the source cases (the generator's training dataset unless --cases)")
    p.add_argument("--out", required=True, metavar="DIR", help="the synthetic dataset folder to write")
    p.add_argument("--per-case", required=True, type=positive_int, metavar="N", help="synthetic cases per source case")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0); same seed -> same files")
    p.add_argument("--steps", type=positive_int, default=None, metavar="K",
                   help="DDIM steps (default: the run's model.sample_steps)")
    p.add_argument("--guidance", type=non_negative_float, default=None, metavar="G",
                   help="classifier-free guidance scale (default: the run's model.guidance; 1: none)")
    p.add_argument("--cases", nargs="+", default=None, metavar="ID",
                   help="source cases, explicitly (default: the generator's training cases of --data); "
                        "a case the generator did not train on is allowed here and listed in the block")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-quality", action="store_true", help="skip quality.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fsmis.genaug.synthesize import synthesize

    s = synthesize(args.checkpoint, args.data, args.out, args.per_case, seed=args.seed, steps=args.steps,
                   guidance=args.guidance, cases=args.cases, device=args.device, progress=not args.quiet,
                   quality=not args.no_quality, overwrite=args.overwrite)
    print(f"wrote {s['cases']} synthetic cases ({s['per_case']} per source case, {s['sources']} sources), "
          f"{s['slices']} slices generated ({s['steps']} DDIM steps, guidance {s['guidance']:g}, seed {s['seed']}) "
          f"in {s['seconds_synthesis']:.1f} s")
    print(f"  folder:    {s['out']}")
    print(f"  generator: {s['checkpoint']}")
    if s["quality"]:
        print(f"  quality:   {s['quality']} ({s['seconds'] - s['seconds_synthesis']:.1f} s)")
    else:
        print("  quality:   not computed (--no-quality); tools/synth_quality.py computes it")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
