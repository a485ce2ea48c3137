#!/usr/bin/env python
"""Train the CPU demo's small VAE (the stand-in for SD's frozen VAE) on dataset folder(s).

A thin wrapper of ``train.py --config configs/demo_vae.yaml`` (the architecture and recipe live
in that file; fsmis/methods/autoencoder.py): it trains through the same engine (progress bar,
TensorBoard, atomic checkpoints, resume), then prints the mask reconstruction table. The trained
VAE is RUN/vae/ (config.json with its latent scaling factor, diffusion_pytorch_model.safetensors,
vae_report.json), usable as SD-FSMIS's model.vae_path. With --cache, OUT is a cache folder: the
run goes to OUT/<key>/ and is reused when the data and the config are unchanged.

Examples
  python tools/train_vae.py --data datasets/phantom/ct --out runs/demo_vae
  python tools/train_vae.py --data datasets/phantom/ct --out checkpoints/vae_cache --cache train.max_steps=300
  python tools/train_vae.py --data datasets/phantom/ct datasets/phantom/mr --out runs/demo_vae_ct_mr
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, nargs="+",
                   help="dataset folder(s); several are pooled (e.g. the CT and MR phantoms); the table shows the first")
    p.add_argument("--out", required=True, type=Path, help="run folder, or the cache folder with --cache")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo_vae.yaml",
                   help="autoencoder config (default configs/demo_vae.yaml)")
    p.add_argument("--cache", action="store_true", help="treat --out as a cache folder: OUT/<key>/, reused when current")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (train.max_steps=720, data.crop=64, ...)")
    return p


def report_table(report: dict) -> str:
    ev = report.get("eval", {})
    tr = report["train"]
    lines = [
        f"demo VAE: {report['parameters'] / 1e6:.2f} M parameters, factor {report['downsampling_factor']} "
        f"(latent grid {report['latent_grid']} x {report['latent_grid']}), masks from {tr['mask_source']}",
        f"trained {tr['steps_done']} steps x {tr['batch_size']} crops of {tr['crop']} px in {tr['seconds']:.0f} s "
        f"({tr['seconds_per_step']:.2f} s/step, {tr['threads']} threads)",
        f"latent scaling factor {report['scaling_factor']:.4f} (1 / latent std {report['latent_std']:.4f}; "
        "stored in config.json)",
    ]
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
    from fsmis.config import ConfigError, load_config
    from fsmis.data.nifti import DataError
    from fsmis.engine.checkpoints import CheckpointError
    from fsmis.engine.trainer import Trainer
    from fsmis.methods.autoencoder import REPORT_NAME, ensure_autoencoder

    data = [str(d) for d in args.data]
    root = data[0] if len(data) == 1 else "[" + ", ".join(json.dumps(d) for d in data) + "]"
    t0 = time.time()
    try:
        cfg = load_config(args.config, [*args.overrides, f"data.root={root}"])
        if cfg.method != "autoencoder":
            raise ConfigError(f"{args.config}: method is {cfg.method!r}, expected autoencoder")
        if args.cache:
            folder, reused = ensure_autoencoder(cfg, args.out, progress=not args.no_progress)
            if reused:
                print(f"reusing the cached demo VAE in {folder}")
        else:
            tr = Trainer(cfg, args.out, progress=not args.no_progress).setup()
            if tr.resume():
                print(f"{args.out} already holds checkpoints; continuing from step {tr.step}")
            folder = Path(tr.fit()["exported"][0])
        report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
    except (ConfigError, DataError, CheckpointError, ValueError, FileNotFoundError) as exc:
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
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
