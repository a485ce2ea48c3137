#!/usr/bin/env python
"""The demo over several training seeds: median and range of SD-FSMIS against support-copy.

For each seed, the demo SD-FSMIS (configs/demo.yaml, or --config) is trained on phantom CT fold 0
with ``train.seed=<seed>`` (the phantom data, the demo VAE and, with ``--init generator`` as in
``make demo``, the demo generator whose UNet initialises SD-FSMIS are those of ``make demo``, trained
once and shared by every seed) and evaluated in-domain (CT fold 0) and cross-domain (CT -> MR, 5 folds) with the
canonical protocol; support-copy is evaluated once. A finished seed's run is reused.

  python tools/seeds.py --seeds 0 1 2 3 4 --out results/seeds
  python tools/seeds.py --seeds 0 1 2 --out results/seeds_ema train.ema=0.999

Writes OUT/seeds.json (per seed: Dice per class in-domain and cross-domain, validation curve,
training seconds) and OUT/seeds.md (a table per seed, then median and range over the seeds).

``--threshold-ratios 0.25 0.5 0.6`` also scores every trained seed with each post-processing
threshold ratio (``model.threshold_ratio``; no retraining) and adds a table of them; give the
key=value overrides before it:

  python tools/seeds.py train.fg_weight=5 --seeds 0 1 2 --out results/seeds_fg5 --threshold-ratios 0.5 0.6
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]


def _stats(values):
    import numpy as np

    v = sorted(values)
    return {"median": float(np.median(v)), "min": v[0], "max": v[-1], "n": len(v)}


def table(results: dict, baseline: dict) -> str:
    seeds = sorted(results, key=int)
    classes = list(baseline["in_domain"]["per_class"])
    head = ("| seed | " + " | ".join(f"in-domain {c}" for c in classes)
            + " | in-domain mean | cross-domain mean | best val Dice (step) | beats support-copy in-domain |")
    lines = [head, "|---|" + "---|" * (len(classes) + 4)]
    for s in seeds:
        r = results[s]
        best = max(r["history"], key=lambda h: h["val_dice"]) if r["history"] else None
        lines.append(f"| {s} | " + " | ".join(f"{100 * r['in_domain']['per_class'][c]:.2f}" for c in classes)
                     + f" | {100 * r['in_domain']['mean']:.2f} | {100 * r['cross_domain']['mean']:.2f} | "
                     + (f"{best['val_dice']:.3f} ({best['step']})" if best else "–") + " | "
                     + ("yes" if r["in_domain"]["mean"] > baseline["in_domain"]["mean"] else "**no**") + " |")
    b = baseline
    lines.append("| support-copy | " + " | ".join(f"{100 * b['in_domain']['per_class'][c]:.2f}" for c in classes)
                 + f" | {100 * b['in_domain']['mean']:.2f} | {100 * b['cross_domain']['mean']:.2f} | | |")
    ins = _stats([100 * results[s]["in_domain"]["mean"] for s in seeds])
    cross = _stats([100 * results[s]["cross_domain"]["mean"] for s in seeds])
    wins = sum(results[s]["in_domain"]["mean"] > b["in_domain"]["mean"] for s in seeds)
    lines += ["", f"SD-FSMIS over {len(seeds)} seeds: in-domain median {ins['median']:.2f} (range "
              f"{ins['min']:.2f}-{ins['max']:.2f}), cross-domain median {cross['median']:.2f} (range "
              f"{cross['min']:.2f}-{cross['max']:.2f}); beats support-copy in-domain for {wins} of {len(seeds)} seeds "
              f"(support-copy {100 * b['in_domain']['mean']:.2f} in-domain, {100 * b['cross_domain']['mean']:.2f} "
              "cross-domain). Mean Dice (%), canonical protocol, EP1, 1-shot, per-volume 3D Dice."]
    return "\n".join(lines)


def threshold_table(results: dict, baseline: dict) -> str:
    """In-domain and cross-domain mean Dice per seed for every scored threshold ratio."""
    seeds = sorted(results, key=int)
    ratios = sorted({float(r) for s in seeds for r in results[s].get("by_threshold_ratio", {})})
    if not ratios:
        return ""
    lines = ["| model.threshold_ratio | " + " | ".join(f"seed {s}" for s in seeds)
             + " | in-domain median (range) | cross-domain median (range) | beats support-copy in-domain |",
             "|---|" + "---|" * (len(seeds) + 3)]
    for ratio in ratios:
        got = [results[s]["by_threshold_ratio"].get(f"{ratio:g}") for s in seeds]
        if any(g is None for g in got):
            continue
        ins = _stats([100 * g["in_domain"]["mean"] for g in got])
        cross = _stats([100 * g["cross_domain"]["mean"] for g in got])
        wins = sum(g["in_domain"]["mean"] > baseline["in_domain"]["mean"] for g in got)
        lines.append(f"| {ratio:g} | " + " | ".join(f"{100 * g['in_domain']['mean']:.2f} / {100 * g['cross_domain']['mean']:.2f}"
                                                 for g in got)
                     + f" | {ins['median']:.2f} ({ins['min']:.2f}-{ins['max']:.2f}) | {cross['median']:.2f} "
                       f"({cross['min']:.2f}-{cross['max']:.2f}) | {wins} of {len(got)} |")
    lines += ["", "Per seed: in-domain / cross-domain mean Dice (%) of the same trained model with each "
              "post-processing threshold ratio (× the chunk maximum)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    import demo as D

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds (default 0-4)")
    p.add_argument("--out", default="results/seeds", help="output folder (runs in OUT/runs/seed<k>)")
    p.add_argument("--data", default="datasets/phantom", help="phantom data folder (ct/ and mr/ inside)")
    p.add_argument("--work", default="checkpoints/demo", help="where the demo VAE is cached")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="SD-FSMIS config")
    p.add_argument("--vae-config", default=str(ROOT / "configs" / "demo_vae.yaml"))
    p.add_argument("--cases", type=int, default=10, help="phantom cases per modality")
    p.add_argument("--shape", type=D._shape, default=None, metavar="Z,Y,X",
                   help="phantom volume shape (default: the demo's)")
    p.add_argument("--vae-steps", type=int, default=None, help="demo VAE steps (default: the demo's)")
    p.add_argument("--threshold-ratios", type=float, nargs="+", default=[], metavar="R",
                   help="also score each trained seed with these model.threshold_ratio values (no retraining)")
    D.add_init_arguments(p)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the SD-FSMIS config (the recipe under test)")
    args = p.parse_args(argv)
    shape = args.shape

    from fsmis.atomic import atomic_write_json, atomic_write_text
    from fsmis.config import ConfigError, load_config
    from fsmis.data.datasets import open_dataset
    from fsmis.data.nifti import DataError
    from fsmis.evaluation.protocol import ProtocolConfig, evaluate
    from fsmis.methods.autoencoder import ensure_autoencoder
    from fsmis.methods.base import build_predictor

    out, data, work = Path(args.out), Path(args.data), Path(args.work)
    vae_steps = args.vae_steps or D.DEMO_VAE_STEPS
    try:
        ct_dir = D.ensure_phantom(data / "ct", "ct", args.cases, 0, shape=shape)
        mr_dir = D.ensure_phantom(data / "mr", "mr", args.cases, 1000, supervoxels=False, shape=shape)
        size = load_config(Path(args.config), args.overrides).data.image_size
        vae_cfg = D.demo_vae_config(args.vae_config, ct_dir, vae_steps, size)
        vae_dir, _ = ensure_autoencoder(vae_cfg, work / "vae", progress=not args.quiet)
        init, generator = [], None
        if args.init == "generator":
            _, gen_summary = D.ensure_generator(args.generator_config, ct_dir, vae_dir, size, args.gen_steps,
                                                work / "generator", not args.quiet, args.gen_set)
            init = [f"model.unet_init={work / 'generator'}"]
            generator = {"run": str(work / "generator"), "steps": gen_summary["steps"],
                         "seconds": gen_summary["seconds"], "overrides": args.gen_set}
        ct, mr = open_dataset(ct_dir), open_dataset(mr_dir)
        splits = {"in_domain": (ct, ProtocolConfig(fold_ids=[0], surface_metrics=False)),
                  "cross_domain": (mr, ProtocolConfig(surface_metrics=False))}

        def score(predictor):
            res = {}
            for split, (ds, proto) in splits.items():
                r = evaluate(ds, predictor, proto, progress=False)
                res[split] = {"mean": r["mean_dice"], "per_class": r["per_class"]}
            return res

        baseline = score(build_predictor("support-copy"))
        results = {}
        for seed in args.seeds:
            t0 = time.time()
            overrides = [f"data.root={ct_dir}", f"model.vae_path={vae_dir}", *init, *args.overrides,
                         f"train.seed={seed}"]
            cfg, summary = D.train_demo_model(Path(args.config), out / "runs" / f"seed{seed}", overrides,
                                              not args.quiet)
            predictor = D.trained_predictor(out / "runs" / f"seed{seed}", cfg)
            res = score(predictor)
            for ratio in args.threshold_ratios:
                predictor.cfg.model.threshold_ratio = ratio
                res.setdefault("by_threshold_ratio", {})[f"{ratio:g}"] = score(predictor)
            predictor.cfg.model.threshold_ratio = cfg.model.threshold_ratio
            res.update({"history": summary.get("history", []), "train_seconds": summary.get("seconds"),
                        "wall_seconds": round(time.time() - t0, 1)})
            results[str(seed)] = res
            print(f"seed {seed}: in-domain {100 * res['in_domain']['mean']:.2f}, cross-domain "
                  f"{100 * res['cross_domain']['mean']:.2f} (support-copy {100 * baseline['in_domain']['mean']:.2f} / "
                  f"{100 * baseline['cross_domain']['mean']:.2f})", flush=True)
            atomic_write_json(out / "seeds.json", {"config": str(args.config), "overrides": args.overrides,
                                                   "init": args.init, "generator": generator,
                                                   "support_copy": baseline, "seeds": results})
    except (ConfigError, DataError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = table(results, baseline)
    extra = threshold_table(results, baseline)
    if extra:
        text += "\n\n" + extra
    init_line = (f"SD-FSMIS's UNet initialised from the demo generator ({generator['run']}, {generator['steps']} steps, "
                 f"{generator['seconds']:.0f} s, trained once for all seeds)" if generator
                 else "SD-FSMIS's UNet initialised at random")
    atomic_write_text(out / "seeds.md", f"# {Path(args.config).name} {' '.join(args.overrides)}\n\n{init_line}.\n\n"
                                        f"{text}\n")
    print(text)
    print(f"wrote {out / 'seeds.json'} and {out / 'seeds.md'}")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
