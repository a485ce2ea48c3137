#!/usr/bin/env python
"""Write a diffusers-format Stable Diffusion folder with RANDOM weights (no download).

    python tools/make_random_sd.py --arch tiny --out checkpoints/sd-tiny
    python tools/make_random_sd.py --arch sd15 --out checkpoints/sd15-random --dtype fp16

The folder (unet/, vae/, model_index.json; weights as diffusion_pytorch_model.safetensors) has the
layout of a real SD checkpoint folder, so ``model.sd_path=DIR`` exercises the real, strict loading
path of fsmis.models.weights. The weights are useless for segmentation: this is for tests, smoke runs
and timing only. Architectures: sd15 (UNet 859.5 M parameters, cross-attention 768), sd21 (865.9 M,
cross-attention 1024), tiny (tests).

There is no --single-file option: diffusers (0.42) ships only the LDM -> diffusers conversion
(diffusers.loaders.single_file_utils), not the reverse one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fsmis.models.presets import PRESETS, preset  # noqa: E402  (after the sys.path insertion)


def write_random_sd(arch: str, out: str | Path, dtype: str = "fp32", seed: int = 0, force: bool = False) -> dict:
    """Write the folder; return {path: size in bytes} of the files written plus a summary."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if arch not in PRESETS:
        raise SystemExit(f"--arch must be one of {', '.join(PRESETS)}")
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    out = Path(out)
    if not force and any((out / p).exists() for p in ("unet", "vae", "model_index.json")):
        raise SystemExit(f"{out} already holds a model (unet/, vae/ or model_index.json); use --force to overwrite")
    out.mkdir(parents=True, exist_ok=True)
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()  # no "modules to keep in float32" warning on .to(fp16)
    torch.manual_seed(seed)
    summary = {}
    for name, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        # initialise directly in the target dtype (faster than .half() afterwards: docs/measurements/demo_vae.md)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch_dtype)
        try:
            model = cls(**preset(arch, name))
        finally:
            torch.set_default_dtype(default)
        model = model.to(torch_dtype)  # no-op unless a module ignored the default dtype
        model.save_pretrained(out / name, safe_serialization=True)
        summary[name] = {"params": sum(p.numel() for p in model.parameters()), "tensors": len(model.state_dict())}
        del model
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "_fsmis_random_weights": {"arch": arch, "seed": seed, "dtype": dtype,
                                  "note": "random weights from tools/make_random_sd.py; no text encoder, "
                                          "tokenizer or scheduler (SD-FSMIS uses none)"},
    }, indent=2) + "\n")
    files = {str(p): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    return {"files": files, **summary}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Then: model.sd_path=OUT (and model.vtct_encoder=none without DINOv2 weights).")
    ap.add_argument("--arch", required=True, choices=list(PRESETS), help="architecture preset")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="dtype of the saved weights")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the random initialisation")
    ap.add_argument("--force", action="store_true", help="overwrite an existing unet/ vae/ model_index.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = write_random_sd(args.arch, args.out, args.dtype, args.seed, args.force)
    for path, size in res["files"].items():
        print(f"wrote {path} ({size / 2**20:.1f} MiB)")
    for name in ("unet", "vae"):
        print(f"{name}: {res[name]['params'] / 1e6:.2f} M parameters, {res[name]['tensors']} tensors, "
              f"{args.dtype}, random (seed {args.seed})")
    print(f"done in {time.perf_counter() - t0:.1f} s: {args.arch} with RANDOM weights at {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
