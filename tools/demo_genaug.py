#!/usr/bin/env python
"""The generative-augmentation demo behind `make demo-genaug`: what synthetic data do for the demo
SD-FSMIS on the phantom, each use against the same model without it, one seed. Everything is
cached under --work, like `make demo` (whose data, VAE, generator and trained run it reuses).

1. the phantom data, the demo VAE, the demo generator (CT) and the demo SD-FSMIS run, exactly as
   `make demo` (reused when present), and a demo generator trained label-free on the MR phantom's
   supervoxels (--work/generator_mr), for MR supports;
2. synthetic CT cases (tools/synthesize.py): --per-case edited mask volumes of each of the CT
   generator's training cases (the SD-FSMIS fold-0 training cases), in OUT/synthetic;
3. the default filters (tools/filter_synthetic.py --default-filters: memorisation; the agreement
   filter is off by default, measured) into OUT/synthetic_filtered (--no-filter: train on
   OUT/synthetic as is);
4. SD-FSMIS + synthetic episodes: the demo run's config and seed with genaug.data=<that folder> and
   genaug.ratio=--ratio, the same number of steps (an equal training budget), in --work/run_genaug
   (with --no-filter --work/run_genaug_nofilter: each cached beside the other);
5. evaluation (canonical protocol, EP1, 1-shot, per-volume 3D Dice; in-domain CT fold 0,
   cross-domain all 5 folds of the MR phantom) of:
     sdfsmis                      the demo run
     sdfsmis+genaug               trained with synthetic episodes
     sdfsmis+synthetic-support    the demo run, each support slice enlarged by --synthetic-support
                                  generated variants (CT generator in-domain, MR generator cross-domain)
     support-copy
     sdfsmis+mask-support         MR queries, supports generated from the CT label masks by the MR
                                  generator (no MR annotation used anywhere; cross-domain only)
     support-copy+mask-support    support-copy of those CT masks (cross-domain only)
6. writes OUT/report.md (the table and a bar chart), OUT/results.json ({variant: {split: results}},
   the schema of `make demo`) and OUT/figures/.

key=value overrides apply to the SD-FSMIS config of both trainings (e.g. train.seed=1).

  python tools/demo_genaug.py --out results/demo-genaug
  python tools/demo_genaug.py --out results/demo-genaug --ratio 0.5 --synthetic-support 2 train.seed=1
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


def bar_chart(results: dict, path: Path, support_copy: dict) -> Path:
    """Grouped bars: in-domain and cross-domain mean Dice of every variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    splits = [("in_domain", "in-domain (CT fold 0)"), ("cross_domain", "cross-domain (MR, 5 folds)")]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(names)), 4))
    for k, (split, label) in enumerate(splits):
        vals = [100 * results[n][split]["mean_dice"] if split in results[n] else np.nan for n in names]
        ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, label=label)
        if split in support_copy:
            ax.axhline(100 * support_copy[split]["mean_dice"], ls="--", lw=0.8, color=f"C{k}")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("mean Dice (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title("synthetic data on the demo SD-FSMIS (dashed: support-copy)", fontsize=9)
    fig.tight_layout()
    from fsmis.evaluation.figures import save_figure

    return save_figure(fig, path)


def main(argv=None) -> int:
    import demo as D
    from fsmis.cli import non_negative_int, positive_int, unit_fraction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="datasets/phantom", help="phantom data folder (ct/ and mr/ inside)")
    p.add_argument("--out", default="results/demo-genaug", help="report folder")
    p.add_argument("--work", default="checkpoints/demo", help="cache of the VAE, the generators and the runs")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="SD-FSMIS demo config")
    p.add_argument("--vae-config", default=str(ROOT / "configs" / "demo_vae.yaml"))
    p.add_argument("--cases", type=positive_int, default=10, help="phantom cases per modality")
    p.add_argument("--shape", type=D._shape, default=None, metavar="Z,Y,X", help="phantom volume shape")
    p.add_argument("--vae-steps", type=positive_int, default=D.DEMO_VAE_STEPS)
    p.add_argument("--per-case", type=positive_int, default=1, help="synthetic cases per source case (default 1)")
    p.add_argument("--sample-steps", type=positive_int, default=None, help="DDIM steps (default: the generator's)")
    p.add_argument("--synth-seed", type=non_negative_int, default=0, help="seed of synthesis and variants")
    p.add_argument("--ratio", type=unit_fraction, default=0.25, help="genaug.ratio of the genaug training (0.25)")
    p.add_argument("--pairing", choices=["source", "synthetic"], default=None,
                   help="genaug.pairing (default: the config's, synthetic)")
    p.add_argument("--no-filter", action="store_true", help="train on the unfiltered synthetic folder")
    p.add_argument("--synthetic-support", type=positive_int, default=2, metavar="M",
                   help="generated variants per support slice (default 2)")
    D.add_generator_arguments(p)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the SD-FSMIS config")
    args = p.parse_args(argv)

    from fsmis.data.datasets import open_dataset
    from fsmis.evaluation.protocol import Evaluator, ProtocolConfig
    from fsmis.evaluation.results import atomic_write_json, atomic_write_text, write_results
    from fsmis.genaug.filters import default_filter_settings, describe_settings, filter_synthetic
    from fsmis.genaug.support import SyntheticSupport
    from fsmis.genaug.synthesize import synthesize
    from fsmis.genaug.zeroshot import MaskSupportGenerator, MaskSupportSource
    from fsmis.methods.base import build_predictor

    progress = not args.quiet
    out, data, work = Path(args.out), Path(args.data), Path(args.work)
    D.refuse_inside(data, **{"--out": out, "--work": work})
    timings = {}
    t0 = time.time()

    # 1. make demo's data, VAE, generator and run; the MR generator (label-free, MR phantom supervoxels)
    parts = D.ensure_demo_parts(args, mr_generator=True)
    ct_dir, mr_dir, vae_dir, gen_ct, gen_mr = parts.ct_dir, parts.mr_dir, parts.vae_dir, parts.gen_ct, parts.gen_mr
    base = [f"data.root={ct_dir}", f"model.vae_path={vae_dir}", f"model.unet_init={gen_ct}", *args.overrides]
    cfg, summary = D.train_demo_model(Path(args.config), work / "run", base, progress)
    timings.update(parts.timings)
    timings["make_demo_parts_s"] = round(time.time() - t0, 1)

    # 2-3. synthetic CT cases, filtered
    t1 = time.time()
    synth_dir = out / "synthetic"
    syn = synthesize(gen_ct, ct_dir, synth_dir, args.per_case, seed=args.synth_seed, steps=args.sample_steps,
                     device="cpu", progress=progress, quality=False, overwrite=True)
    timings["synthesis_s"] = round(time.time() - t1, 1)
    filt = None
    train_dir = synth_dir
    if not args.no_filter:
        t1 = time.time()
        train_dir = out / "synthetic_filtered"
        settings = default_filter_settings()
        filt = filter_synthetic(synth_dir, ct_dir, train_dir, **settings, device="cpu", progress=progress,
                                checkpoint=work / "run" if settings["min_dice"] is not None else None, overwrite=True)
        timings["filter_s"] = round(time.time() - t1, 1)

    # 4. SD-FSMIS with synthetic episodes, at the same number of steps
    t1 = time.time()
    ga = [*base, f"genaug.data=[{train_dir.resolve()}]", f"genaug.ratio={args.ratio}",
          *([f"genaug.pairing={args.pairing}"] if args.pairing else [])]
    run_genaug = work / ("run_genaug_nofilter" if args.no_filter else "run_genaug")
    cfg_g, summary_g = D.train_demo_model(Path(args.config), run_genaug, ga, progress)
    pairing = cfg_g.genaug.pairing
    timings["train_genaug_s"] = round(time.time() - t1, 1)

    # 5. evaluation
    t1 = time.time()
    ct, mr = open_dataset(ct_dir), open_dataset(mr_dir)
    sd = D.trained_predictor(work / "run", cfg)
    m = args.synthetic_support
    variants = {
        "sdfsmis": {"in_domain": sd, "cross_domain": sd},
        "sdfsmis+genaug": {s: D.trained_predictor(run_genaug, cfg_g) for s in ("in_domain", "cross_domain")},
        "sdfsmis+synthetic-support": {
            "in_domain": SyntheticSupport(sd, gen_ct, m, "CT", seed=args.synth_seed, steps=args.sample_steps),
            "cross_domain": SyntheticSupport(sd, gen_mr, m, "MR", seed=args.synth_seed, steps=args.sample_steps)},
        "support-copy": {s: build_predictor("support-copy") for s in ("in_domain", "cross_domain")},
        "sdfsmis+mask-support": {"cross_domain": sd},
        "support-copy+mask-support": {"cross_domain": build_predictor("support-copy")},
    }
    mask_gen = MaskSupportGenerator(gen_mr, "MR", seed=args.synth_seed, steps=args.sample_steps)
    splits = {"in_domain": (ct, [cfg.data.fold]), "cross_domain": (mr, None)}
    results = {}
    for name, per_split in variants.items():
        results[name] = {}
        for split, predictor in per_split.items():
            ds, folds = splits[split]
            source = MaskSupportSource(ct_dir, mask_gen) if name.endswith("+mask-support") else None
            res = Evaluator(ds, predictor, ProtocolConfig(fold_ids=folds), progress=progress,
                            support_source=source).run()
            write_results(res, out / name / split)
            results[name][split] = res
    timings["evaluation_s"] = round(time.time() - t1, 1)
    timings["total_s"] = round(time.time() - t0, 1)

    # 6. report
    png = bar_chart(results, out / "figures" / "genaug_utility.png", results["support-copy"])
    classes = results["support-copy"]["in_domain"]["protocol"]["test_classes"]

    def cell(r, split):
        return f"{100 * r[split]['mean_dice']:.2f}" if split in r else "–"

    rows = ["| variant | " + " | ".join(f"in-domain {c}" for c in classes) + " | in-domain mean | cross-domain mean |",
            "|---|" + "---|" * (len(classes) + 2)]
    for name, r in results.items():
        organs = (" | ".join(f"{100 * r['in_domain']['per_class'][c]:.2f}" for c in classes) if "in_domain" in r
                  else " | ".join("–" for _ in classes))
        rows.append(f"| {name} | {organs} | {cell(r, 'in_domain')} | {cell(r, 'cross_domain')} |")
    base_in = 100 * results["sdfsmis"]["in_domain"]["mean_dice"]
    base_x = 100 * results["sdfsmis"]["cross_domain"]["mean_dice"]
    lines = []
    for name in ("sdfsmis+genaug", "sdfsmis+synthetic-support"):
        r = results[name]
        d_in, d_x = 100 * r["in_domain"]["mean_dice"] - base_in, 100 * r["cross_domain"]["mean_dice"] - base_x
        lines.append(f"- {name}: {d_in:+.2f} in-domain, {d_x:+.2f} cross-domain against sdfsmis.")
    zs = 100 * results["sdfsmis+mask-support"]["cross_domain"]["mean_dice"]
    lines.append(f"- sdfsmis+mask-support (MR supports generated from CT masks, no MR annotation): {zs:.2f} "
                 f"cross-domain, against {base_x:.2f} with real MR supports.")
    fc = filt["counts"] if filt else None
    filt_line = (f"Default filters ({describe_settings(filt['settings'])}): "
                 f"{fc['slices_out']} of {fc['slices_in']} slices kept (removed: agreement {fc['removed_by_agreement']}, "
                 f"memorisation {fc['removed_by_memorisation']}); {fc['cases_out']} of {fc['cases_in']} cases."
                 if fc else "No filter (--no-filter).")
    report = "\n".join([
        "# Generative-augmentation demo report", "",
        "One seed (train.seed of the config): a single run's difference can be noise; the 5-seed utility table "
        "is in docs/measurements/.", "",
        *lines, "",
        *rows, "",
        f"![utility](figures/{png.name})", "",
        f"Synthetic data: {syn['cases']} CT cases ({syn['slices']} slices, {args.per_case} per source case, "
        f"{syn['steps']} DDIM steps, guidance {syn['guidance']:g}, seed {args.synth_seed}) from the demo generator "
        f"({gen_ct}). {filt_line} SD-FSMIS + genaug: the demo run's config with genaug.ratio={args.ratio} "
        f"(pairing {pairing}), {summary_g['steps']} steps like the demo run's {summary['steps']}; episodes "
        f"{json.dumps(summary_g.get('episodes'))}. Synthetic support: {m} generated variant(s) per support slice "
        "(K = 1 + M; recorded in each results.json's protocol block). Mask support: fold k's support mask is the CT "
        "phantom's fold-k support case, its image generated by the MR generator (label-free).", "",
        f"Mean Dice (%), canonical protocol, EP1, per-volume 3D Dice; in-domain CT fold {cfg.data.fold}, "
        "cross-domain all 5 folds of the MR phantom.", "",
        f"Timings (s): {json.dumps(timings)}", ""])
    atomic_write_json(out / "results.json", {
        **results, "genaug": {"synthetic": {k: syn[k] for k in ("out", "cases", "slices", "steps", "guidance", "seed")},
                              "filter": filt["counts"] if filt else None, "ratio": args.ratio, "pairing": pairing,
                              "synthetic_support": m, "timings": timings}})
    atomic_write_text(out / "report.md", report)
    print("\n".join(rows))
    print("\n".join(lines))
    print(f"wrote {out / 'report.md'} and {out / 'results.json'} ({timings['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
