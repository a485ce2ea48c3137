#!/usr/bin/env python
"""Train the CPU demo's small VAE (the stand-in for SD's frozen VAE) on a dataset folder.

A tiny AutoencoderKL (blocks 32/64/64, 4 latent channels, spatial factor 4: a 32 x 32 latent
grid at --image-size 128) is trained on random 64 x 64 crops of the dataset's images
(per-volume min-max to [-1, 1]) and of its unsupervised supervoxel masks ({0,1} -> {-1,+1});
no ground-truth organ label is used for training (without a supervoxels_* folder it falls
back to the label masks, with a warning). The organ labels of the test classes are used to
evaluate the mask reconstruction (posterior mean -> decode -> probability > 0.5): its 3D
Dice is the ceiling ("oracle") of the demo segmenter. See fsmis/models/demo_vae.py.

Writes OUT/config.json, OUT/diffusion_pytorch_model.safetensors (load with
AutoencoderKL.from_pretrained(OUT, local_files_only=True)) and OUT/vae_report.json,
atomically. With --cache, OUT is a cache folder: the model goes to OUT/<key>/ and is reused
when the data and the training arguments are unchanged.

Examples
  python tools/train_vae.py --data datasets/phantom/ct --out runs/demo_vae
  python tools/train_vae.py --data datasets/phantom/ct --out checkpoints/vae_cache --cache --steps 300
  python tools/train_vae.py --data datasets/phantom/ct datasets/phantom/mr --out runs/demo_vae_ct_mr
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    import fsmis  # noqa: F401
except ImportError:  # run from a checkout: python tools/train_vae.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsmis.models.demo_vae import DEFAULT_TRAIN_KWARGS  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULT_TRAIN_KWARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, nargs="+",
                   help="dataset folder(s) (dataset.json folder or benchmark folder); several are pooled "
                        "(e.g. the CT and MR phantoms for a cross-domain demo); the table shows the first")
    p.add_argument("--out", required=True, type=Path, help="output folder (replaced), or the cache folder with --cache")
    p.add_argument("--image-size", type=int, default=d["image_size"], help="in-plane size of the slices (default %(default)s)")
    p.add_argument("--crop", type=int, default=d["crop"], help="training crop size (default %(default)s)")
    p.add_argument("--steps", type=int, default=d["steps"], help="optimiser steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="crops per step, half images half masks (default %(default)s)")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed (default %(default)s)")
    p.add_argument("--masks", choices=("auto", "supervoxels", "labels"), default=d["masks"],
                   help="training masks: supervoxels (label-free), labels (sees test labels), "
                        "auto = supervoxels if the dataset has them (default %(default)s)")
    p.add_argument("--minutes", type=float, default=None,
                   help="also stop after this many minutes of training (the result then depends on the machine)")
    p.add_argument("--cache", action="store_true", help="treat --out as a cache folder: OUT/<key>/, reused when current")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def report_table(report: dict) -> str:
    ev = report.get("eval", {})
    tr = report["train"]
    lines = [
        f"demo VAE: {report['parameters'] / 1e6:.2f} M parameters, factor {report['downsampling_factor']} "
        f"(latent grid {report['latent_grid']} x {report['latent_grid']}), masks from {tr['mask_source']}",
        f"trained {tr['steps_done']} steps x {tr['batch_size']} crops of {tr['crop']} px in {tr['seconds']:.0f} s "
        f"({tr['seconds_per_step']:.2f} s/step, {tr['threads']} threads)",
    ]
    if "scaling_factor" in report:
        lines.append(f"latent scaling factor {report['scaling_factor']:.4f} (1 / latent std {report['latent_std']:.4f}; "
                     "stored in config.json)")
    if ev:
        lines += ["", "| class | 3D Dice (per volume) | slice Dice | pooled Dice |", "|---|---|---|---|"]
        for name, v in ev["dice"].items():
            lines.append(f"| {name} | {100 * v:.2f} | {100 * ev['dice_slice'][name]:.2f} | {100 * ev['dice_pooled'][name]:.2f} |")
        lines.append(f"| **mean** | **{100 * ev['mean_dice']:.2f}** | | |")
        lines.append("")
        lines.append(f"image reconstruction PSNR {ev['psnr_db']:.2f} dB ([-1, 1] scale); evaluation {ev['seconds']:.0f} s "
                     f"on {len(ev['cases'])} cases at {ev['image_size']} px")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fsmis.data.nifti import DataError
    from fsmis.models.demo_vae import REPORT_NAME, demo_vae_key, ensure_demo_vae, is_demo_vae_folder, train_demo_vae

    data = args.data[0] if len(args.data) == 1 else list(args.data)
    kw = dict(image_size=args.image_size, crop=args.crop, steps=args.steps, batch_size=args.batch_size,
              lr=args.lr, seed=args.seed, masks=args.masks, minutes=args.minutes)
    t0 = time.time()
    try:
        if args.cache:
            key = demo_vae_key(data, **kw)
            reused = is_demo_vae_folder(args.out / key, key)
            folder = ensure_demo_vae(data, args.out, progress=not args.no_progress, **kw)
            report = json.loads((folder / REPORT_NAME).read_text())
            if reused:
                print(f"reusing the cached demo VAE in {folder}")
        else:
            folder = args.out
            report = train_demo_vae(data, folder, progress=not args.no_progress, **kw)
    except (DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report_table(report))
    for name, ev in (report.get("eval_by_dataset") or {}).items():
        print(f"{name}: mean 3D Dice {100 * ev['mean_dice']:.2f} ("
              + ", ".join(f"{c} {100 * v:.2f}" for c, v in ev["dice"].items()) + f"), PSNR {ev['psnr_db']:.2f} dB")
    print(f"\nwrote {folder} (config.json, diffusion_pytorch_model.safetensors, {REPORT_NAME}) "
          f"in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
