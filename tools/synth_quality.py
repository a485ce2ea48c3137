#!/usr/bin/env python
"""Measure a synthetic dataset against the real one it was made from.

--synthetic is a dataset folder whose dataset.json has a "synthetic" block
({"checkpoint": generator run or null, "sources": {synthetic case id: source case id of --real}});
each synthetic case has its source case's shape (slice z of one corresponds to slice z of the other).

Writes one JSON file (atomically) with:
  fid_vae / kid_vae      FID and KID on VAE-encoder features (--vae DIR, else the VAE of the
                         generator run named by the synthetic block); never a plain "fid"/"kid":
                         the Inception weights are not used
  fid_dinov2 / kid_dinov2  the same on DINOv2 CLS features (with --dinov2 DIR)
  ssim, psnr, per_case   each synthetic slice against its source slice (volumes in [0, 1];
                         PSNR capped at 100 dB)
  mask_dice              Dice of a segmenter (support-copy, or --checkpoint RUN) given the real
                         source slice as its 1-shot support and the synthetic slice as query,
                         against the synthetic label
  memorisation           nearest-real-slice SSIM per synthetic slice, the real-vs-real (other
                         case) 99th-percentile threshold, the flagged slices
  definitions            one line per metric: how it was computed

examples:
  python tools/synth_quality.py --real datasets/phantom/ct --synthetic synth/ct --out synth/ct/quality.json
  python tools/synth_quality.py --real D --synthetic S --out q.json --vae checkpoints/demo/vae/vae \\
      --dinov2 weights/dinov2-small --checkpoint runs/sdfsmis_ct
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import fsmis  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synth_quality.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real", required=True, metavar="DIR", help="the real dataset folder (the source cases)")
    p.add_argument("--synthetic", required=True, metavar="DIR",
                   help="the synthetic dataset folder (dataset.json with a 'synthetic' block)")
    p.add_argument("--out", required=True, metavar="JSON", help="the report to write (e.g. quality.json)")
    p.add_argument("--checkpoint", default=None, metavar="RUN",
                   help="a trained SD-FSMIS run folder as the segmenter of mask_dice (default: support-copy)")
    p.add_argument("--vae", default=None, metavar="DIR",
                   help="a local diffusers AutoencoderKL folder for fid_vae/kid_vae (default: the VAE of the "
                        "generator run named by the synthetic block)")
    p.add_argument("--dinov2", default=None, metavar="DIR",
                   help="a local transformers DINOv2 folder for fid_dinov2/kid_dinov2")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p


def _fmt(v, spec=".4f"):
    return "–" if v is None else format(v, spec)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fsmis.genaug.quality import write_quality

    report = write_quality(args.real, args.synthetic, args.out, checkpoint=args.checkpoint, vae=args.vae,
                           dinov2=args.dinov2, device=args.device, progress=not args.quiet)
    if not args.quiet:
        feats = ", ".join(f"{k} {_fmt(report[k], '.4g')}" for k in report if k.startswith(("fid_", "kid_")))
        mem = report["memorisation"]
        md = report["mask_dice"]
        print(f"{report['n_synthetic_slices']} synthetic / {report['n_real_slices']} real slices: {feats}; "
              f"SSIM {_fmt(report['ssim'])}, PSNR {_fmt(report['psnr'], '.2f')} dB; "
              f"mask Dice {_fmt(md['mean'])} ({md['segmenter']}, {md['slices']} slices); "
              f"memorisation {len(mem['flagged'])}/{mem['n_slices']} flagged (threshold {_fmt(mem['threshold'])})")
        print(f"wrote {args.out} ({report['seconds']:.1f} s)")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
