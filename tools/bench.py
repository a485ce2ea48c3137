#!/usr/bin/env python
"""Speed and memory of SD-FSMIS (the released form against this project's fast path) and of the
baselines.

  python tools/bench.py                         # demo architecture on this machine
  python tools/bench.py --arch sd15 --device cuda --size 256 --json bench.json
  python tools/bench.py --baselines panet alpnet adnet universeg --no-sdfsmis      # demo baselines
  python tools/bench.py --baselines panet alpnet adnet --backbone resnet101 --size 256 --device cuda --no-sdfsmis

Rows, measured in one run on the same random-weight model:
  train released : fp32, one episode per step (batch 1)
  train fast     : --precision (bf16 on GPU) autocast, --batch episodes per step, fused AdamW
                   on CUDA (--grad-ckpt adds the same with gradient checkpointing)
  eval released  : one query slice per forward (support pass repeated for every slice)
  eval fast      : every query slice of a chunk in one forward sharing one support pass

Baseline rows (--baselines): "<method> train" (a full optimiser step of the method's own loss,
--batch episodes of one 1-shot support and one query each; the optimiser and schedule of its demo
config) and "<method> eval" (its predictor's forward on one support and --chunk query slices), with
the demo configs' models (the small backbone; --backbone resnet50 | resnet101 for the DeepLabV3
trunks; UniverSeg at its demo width, --universeg-width 64 for the published one), random weights.

Throughput is episodes/s (training) and query slices/s (evaluation); peak memory is the
GPU's max allocated memory, or on CPU the process's peak resident memory of a fresh worker
process per row. Each row runs in its own process so that peaks do not mix.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _model_cfg(arch: str):
    from fsmis.config import ModelConfig, load_config

    if arch == "demo":
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").model
        cfg.vae_path = None
        if cfg.vae is None:
            cfg.vae = dict(load_config(Path(__file__).resolve().parents[1] / "configs" / "demo_vae.yaml").model.architecture)
        return cfg
    return ModelConfig(unet=arch, vae=arch, vtct_encoder="none", vtct_feat_dim=768, vtct_hidden=1536)


def _timed(fn, steps: int, sync) -> float:
    """Seconds for ``steps`` calls of ``fn`` after one warm-up call, device work included."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return time.perf_counter() - t0


def _start_measuring(dev):
    """Reset the GPU's peak-memory counter; returns the device's synchronisation call."""
    import torch

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.synchronize
    return lambda: None


def _train_rate(loss_fn, opt, steps: int, batch: int, sync) -> tuple[float, float]:
    """(episodes/s, seconds) of ``steps`` optimiser steps of ``loss_fn()`` after one warm-up step."""
    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = _timed(step, steps, sync)
    return steps * batch / dt, dt


def _row(kind: str, arch: str, device: str, precision: str, batch: int, size: int, steps: int, chunk: int,
         grad_ckpt: bool, fast: bool, channels_last: bool, queue):
    import torch

    from fsmis.config import TrainConfig
    from fsmis.engine.trainer import autocast, make_optimizer
    from fsmis.data.batch import Batch
    from fsmis.models.sd_fsmis import SDFSMIS

    torch.manual_seed(0)
    dev = torch.device(device)
    t_build = time.perf_counter()
    with dev:  # random weights are initialised where they will run
        model, _ = SDFSMIS.from_config(_model_cfg(arch))
    model.to(dev)
    t_build = time.perf_counter() - t_build
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if grad_ckpt:
        model.unet.enable_gradient_checkpointing()
    sync = _start_measuring(dev)

    def episode_batch(b, q=1):
        return Batch(torch.rand(b, 1, size, size, device=dev) * 2 - 1,
                     (torch.rand(b, 1, size, size, device=dev) > 0.7).float(),
                     torch.rand(b * q, 1, size, size, device=dev) * 2 - 1, 1, q,
                     (torch.rand(b * q, 1, size, size, device=dev) > 0.7).float())

    if kind == "train":
        # the trainer's optimiser (two groups); the fast path adds the fused kernel on CUDA
        tc = TrainConfig(lr=1e-5, fused_optimizer=fast)
        opt = make_optimizer([{"params": model.unet_parameters(), "lr": tc.lr},
                              {"params": model.vtct_parameters(), "lr": tc.lr * tc.vtct_lr_mult}], tc, dev)
        model.train()

        def loss():
            with autocast(precision, dev):
                return model.loss(episode_batch(batch))

        rate, dt = _train_rate(loss, opt, steps, batch, sync)
    else:
        model.eval()
        b = episode_batch(1, chunk)
        per = 1 if batch == 1 else chunk

        def run():
            with torch.no_grad(), autocast(precision, dev):
                for i in range(0, chunk, per):
                    model.predict_probability(Batch(b.support_images, b.support_masks,
                                                    b.query_images[i:i + per], 1, min(per, chunk - i)))

        dt = _timed(run, steps, sync)
        rate = steps * chunk / dt
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB
    queue.put({"rate": rate, "seconds": dt, "peak_gib": peak, "build_seconds": t_build})


def _baseline_row(kind: str, name: str, backbone: str, width: int, device: str, batch: int, size: int, steps: int,
                  chunk: int, queue):
    import torch

    from fsmis.config import load_config
    from fsmis.data.batch import Batch
    from fsmis.engine.method import method_class
    from fsmis.engine.trainer import make_optimizer

    torch.manual_seed(0)
    dev = torch.device(device)
    over = [f"data.image_size={size}"]
    over += [f"model.encoder_blocks=[{width}, {width}, {width}, {width}]"] if name == "universeg" else (
        [f"model.backbone={backbone}"] + (["model.feat_dim=256"] if backbone != "small" else []))
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}_demo.yaml", over)
    t_build = time.perf_counter()
    method = method_class(name)(cfg, dev)
    method.build()
    t_build = time.perf_counter() - t_build
    sync = _start_measuring(dev)

    def rand(n, mask=False):
        x = torch.rand(n, 1, size, size, device=dev)
        return (x > 0.7).float() if mask else x * 2 - 1

    if kind == "train":
        opt = make_optimizer(method.param_groups(), cfg.train, dev)
        method.module.train()
        rate, dt = _train_rate(
            lambda: method.loss(Batch(rand(batch), rand(batch, True), rand(batch), 1, 1, rand(batch, True)), None),
            opt, steps, batch, sync)
    else:
        method.module.eval()
        s_img, s_msk, q = rand(1), rand(1, True), rand(chunk)

        def run():
            method.fg_probability(s_img, s_msk, q)

        dt = _timed(run, steps, sync)
        rate = steps * chunk / dt
    peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    queue.put({"rate": rate, "seconds": dt, "peak_gib": peak, "build_seconds": t_build})


def measure_baseline(kind, name, backbone, width, device, batch, size, steps, chunk):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_baseline_row, args=(kind, name, backbone, width, device, batch, size, steps, chunk, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"error": f"worker exited with {p.exitcode}"}
    return q.get()


def measure(kind, arch, device, precision, batch, size, steps, chunk, grad_ckpt=False, fast=False,
            channels_last=False):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_row, args=(kind, arch, device, precision, batch, size, steps, chunk, grad_ckpt, fast, channels_last, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"error": f"worker exited with {p.exitcode}"}
    return q.get()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="demo", choices=["demo", "tiny", "sd15", "sd21"])
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--size", type=int, default=None, help="image size (default: 128 demo, 256 SD)")
    ap.add_argument("--batch", default="8", help="episodes per step on the fast path (a comma list "
                                                 "gives one row each, e.g. 8,16,32)")
    ap.add_argument("--precision", default=None, help="fast-path autocast: bf16 | fp16 | fp32 "
                                                       "(default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--chunk", default="16", help="query slices per evaluation chunk (comma list: one "
                                                 "fast row each; the released row uses the first)")
    ap.add_argument("--steps", type=int, default=None, help="timed iterations per row")
    ap.add_argument("--grad-ckpt", action="store_true",
                    help="add 'train fast + ckpt' rows: the fast path with gradient checkpointing")
    ap.add_argument("--channels-last", action="store_true", help="fast rows with channels-last tensors")
    ap.add_argument("--no-released", action="store_true", help="skip the released-form rows")
    ap.add_argument("--baselines", nargs="+", default=[], choices=["panet", "alpnet", "adnet", "universeg"],
                    help="add a train and an eval row for each of these baselines")
    ap.add_argument("--backbone", default="small", choices=["small", "resnet50", "resnet101"],
                    help="the prototype baselines' backbone (default: the demo's small one)")
    ap.add_argument("--universeg-width", type=int, default=16, help="UniverSeg features per level (64: published)")
    ap.add_argument("--no-sdfsmis", action="store_true", help="no SD-FSMIS rows (baselines only)")
    ap.add_argument("--json", help="also write the table as JSON here")
    args = ap.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or (128 if args.arch == "demo" else 256)
    precision = args.precision or ("bf16" if device.startswith("cuda") else "fp32")
    steps = args.steps or (20 if device.startswith("cuda") else 3)
    batches = [int(b) for b in str(args.batch).split(",")]
    chunks = [int(c) for c in str(args.chunk).split(",")]
    rows = [] if args.no_released or args.no_sdfsmis else [("train released", "train", "fp32", 1, False, chunks[0])]
    for b in ([] if args.no_sdfsmis else batches):
        rows.append(("train fast", "train", precision, b, False, chunks[0]))
        if args.grad_ckpt:
            rows.append(("train fast + ckpt", "train", precision, b, True, chunks[0]))
    if not args.no_released and not args.no_sdfsmis:
        rows.append(("eval released", "eval", "fp32", 1, False, chunks[0]))
    if not args.no_sdfsmis:
        rows += [("eval fast", "eval", precision, c, False, c) for c in chunks]
    for m in args.baselines:
        rows += [(f"{m} train", "train", "fp32", batches[0], False, chunks[0]),
                 (f"{m} eval", "eval", "fp32", chunks[0], False, chunks[0])]
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    print(f"bench: arch {args.arch}, {size} px, device {gpu or 'cpu'}, baselines {args.baselines or '-'} "
          f"(backbone {args.backbone}) "
          f"({torch.get_num_threads()} threads), {steps} timed iterations per row")
    results = []
    for name, kind, prec, batch, ckpt, chunk in rows:
        fast = "fast" in name
        cl = fast and args.channels_last
        method = name.split()[0]
        if method in args.baselines:
            r = measure_baseline(kind, method, args.backbone, args.universeg_width, device, batch, size, steps, chunk)
        else:
            r = measure(kind, args.arch, device, prec, batch, size, steps, chunk, ckpt, fast, cl)
        if cl:
            name += " + NHWC"
        r.update(row=name, precision=prec, batch=batch, grad_ckpt=ckpt, channels_last=cl)
        results.append(r)
        print(f"  {name} ({batch}): " + (r.get("error") or f"{r['rate']:.2f}/s, "
                                          f"model built in {r['build_seconds']:.1f} s"), flush=True)
    unit = {"train": "episodes/s", "eval": "slices/s"}
    lines = ["| row | precision | batch | throughput | peak memory (GiB) | speed-up |", "|---|---|---|---|---|---|"]
    for r in results:
        kind = r["row"].split()[-1] if r["row"].split()[0] in args.baselines else r["row"].split()[0]
        base = next((x for x in results if x["row"] == f"{kind} released"), {})
        sp = f"{r['rate'] / base['rate']:.1f}x" if "rate" in r and "rate" in base else "–"
        thr = f"{r['rate']:.2f} {unit[kind]}" if "rate" in r else r.get("error")
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "–"
        lines.append(f"| {r['row']} | {r['precision']} | {r['batch']} | {thr} | {peak} | {sp} |")
    print("\n".join(lines))
    if args.json:
        from fsmis.atomic import atomic_write_json

        atomic_write_json(args.json, {"arch": args.arch, "size": size, "device": gpu or "cpu",
                                      "steps": steps, "backbone": args.backbone, "rows": results})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
