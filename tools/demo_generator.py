#!/usr/bin/env python
"""The generator demo behind `make demo-generator`: the mask-conditioned latent diffusion generator on
the phantom CT, its samples and their quality, and its UNet as SD-FSMIS's diffusion prior at an
equal CPU budget. Everything is cached under --work, like `make demo`.

1. the phantom data and the demo VAE, exactly as `make demo` (reused when present);
2. the demo generator (configs/generator_demo.yaml, --gen-steps steps) on the phantom CT fold-0
   training cases with label-free supervoxel masks; its exported UNet is RUN/unet;
3. synthetic cases (fsmis.genaug.synthesize, as tools/synthesize.py): --per-case edited mask
   volumes of each of the first --sources training cases, every slice generated; OUT/synthetic/
   holds them in the standard layout with samples.png; their quality.json (FID/KID on the demo
   VAE's features, SSIM/PSNR against the source slice, mask Dice with the random-init SD-FSMIS run
   as the segmenter, memorisation) becomes a table;
4. the prior at an equal CPU budget: SD-FSMIS from a random UNet (configs/demo.yaml in
   --work/run_random, the run of `tools/demo.py --init random`, reused when that trained it with
   the same config) against SD-FSMIS with
   model.unet_init=<generator run>, whose training gets the random run's steps minus the steps the
   generator's training seconds buy at the random run's measured seconds per step (the
   generator's time counts against the prior); both evaluated in-domain (CT fold 0) and
   cross-domain (CT -> MR, 5 folds) with the canonical protocol;
5. writes OUT/report.md (the generator section: sample grid, quality table, prior table),
   OUT/results.json and OUT/figures/.

key=value overrides apply to the SD-FSMIS config of both arms (e.g. train.fg_weight=5).

  python tools/demo_generator.py --out results/demo-generator
  python tools/demo_generator.py --out results/demo-generator train.fg_weight=5 train.seed=1
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


def equal_budget_steps(random_steps: int, random_seconds: float, generator_seconds: float) -> int:
    """SD-FSMIS steps of the prior arm: the random arm's steps minus those the generator's training
    time would have bought at the random arm's seconds per step (at least 1)."""
    if random_steps < 1 or random_seconds <= 0:
        raise ValueError(f"the random-init run has {random_steps} steps in {random_seconds} s: no step time")
    per_step = random_seconds / random_steps
    return max(1, random_steps - int(round(generator_seconds / per_step)))


def quality_table(q: dict) -> list[str]:
    """Markdown rows of a quality.json."""
    rows = ["| metric | value |", "|---|---|"]
    for key in sorted(k for k in q if k.startswith(("fid_", "kid_"))):
        rows.append(f"| {key} | {q[key]:.4g} |")
    rows.append(f"| ssim (synthetic vs source slice) | {q['ssim']:.4f} |")
    rows.append(f"| psnr (dB) | {q['psnr']:.2f} |")
    md = q["mask_dice"]
    per = ", ".join(f"{c} {100 * v:.2f}" for c, v in md["per_class"].items() if v is not None)
    mean = "–" if md["mean"] is None else f"{100 * md['mean']:.2f}"
    rows.append(f"| mask Dice (%), segmenter {md['segmenter']} | {mean} ({per}; {md['slices']} slices) |")
    mem = q["memorisation"]
    thr = "–" if mem["threshold"] is None else f"{mem['threshold']:.4f}"
    frac = "–" if mem["flagged_fraction"] is None else f"{100 * mem['flagged_fraction']:.2f} %"
    rows.append(f"| memorisation: flagged slices | {len(mem['flagged'])} of {mem['n_slices']} ({frac}; "
                f"nearest-real SSIM threshold {thr}) |")
    rows.append(f"| slices: real / synthetic | {q['n_real_slices']} / {q['n_synthetic_slices']} |")
    return rows


def main(argv=None) -> int:
    import demo as D
    from fsmis.cli import positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="datasets/phantom", help="phantom data folder (ct/ and mr/ inside)")
    p.add_argument("--out", default="results/demo-generator", help="report folder")
    p.add_argument("--work", default="checkpoints/demo", help="cache of the demo VAE, the generator and the runs")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="SD-FSMIS demo config")
    p.add_argument("--vae-config", default=str(ROOT / "configs" / "demo_vae.yaml"))
    p.add_argument("--cases", type=positive_int, default=10, help="phantom cases per modality")
    p.add_argument("--shape", type=D._shape, default=None, metavar="Z,Y,X", help="phantom volume shape")
    p.add_argument("--vae-steps", type=positive_int, default=D.DEMO_VAE_STEPS)
    p.add_argument("--sources", type=positive_int, default=2, help="source cases of the synthetic set (default 2)")
    p.add_argument("--per-case", type=positive_int, default=1, help="synthetic cases per source (default 1)")
    p.add_argument("--sample-steps", type=positive_int, default=None, help="DDIM steps (default: the generator's)")
    p.add_argument("--seed", type=int, default=0, help="synthesis seed")
    D.add_generator_arguments(p)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the SD-FSMIS config (both arms)")
    args = p.parse_args(argv)

    from fsmis.data.datasets import open_dataset
    from fsmis.data.normalize import normalize_volume
    from fsmis.evaluation.figures import example_rows, overlay_panel
    from fsmis.evaluation.protocol import ProtocolConfig, evaluate
    from fsmis.evaluation.results import atomic_write_json, atomic_write_text, write_results
    from fsmis.genaug.quality import write_quality
    from fsmis.genaug.synthesize import SAMPLES_NAME, synthesize
    from fsmis.methods.base import build_predictor

    progress = not args.quiet
    out, data, work = Path(args.out), Path(args.data), Path(args.work)
    D.refuse_inside(data, **{"--out": out, "--work": work})
    t0 = time.time()
    parts = D.ensure_demo_parts(args)  # the phantoms, the demo VAE and the generator, as make demo makes them
    ct_dir, mr_dir, vae_dir, gen_run, gen_summary = parts.ct_dir, parts.mr_dir, parts.vae_dir, parts.gen_ct, parts.gen_summary
    timings = {"data_and_vae_s": round(parts.timings["data_s"] + parts.timings["vae_s"], 1)}
    gen_seconds = float(gen_summary["seconds"])

    # 4a. SD-FSMIS from a random UNet (the demo's run)
    base = [f"data.root={ct_dir}", f"model.vae_path={vae_dir}", *args.overrides]
    cfg_r, sum_r = D.train_demo_model(Path(args.config), work / "run_random", base, progress)
    steps_p = equal_budget_steps(int(sum_r["steps"]), float(sum_r["seconds"]), gen_seconds)
    # 4b. SD-FSMIS from the generator's UNet, at the equal budget
    cfg_p, sum_p = D.train_demo_model(Path(args.config), work / "run_prior",
                                      [*base, f"model.unet_init={gen_run}", f"train.max_steps={steps_p}"], progress)

    # 3. synthetic cases and their quality
    t1 = time.time()
    synth_dir = out / "synthetic"
    trained_on = json.loads((gen_run / "data.json").read_text(encoding="utf-8"))
    sources = [str(c) for d, c in trained_on.get("cases", []) if int(d) == 0][: args.sources] or None
    syn = synthesize(gen_run, ct_dir, synth_dir, args.per_case, seed=args.seed, steps=args.sample_steps,
                     cases=sources, device="cpu", progress=progress, quality=False, overwrite=True)
    quality = write_quality(ct_dir, synth_dir, synth_dir / "quality.json", checkpoint=work / "run_random", device="cpu",
                            progress=progress)
    timings["synthesis_s"] = syn["seconds_synthesis"]
    timings["quality_s"] = round(time.time() - t1 - syn["seconds_synthesis"], 1)

    # 4c. evaluation of both arms and support-copy
    ct, mr = open_dataset(ct_dir), open_dataset(mr_dir)
    splits = {"in_domain": (ct, ProtocolConfig(fold_ids=[cfg_r.data.fold])), "cross_domain": (mr, ProtocolConfig())}
    arms = {"sdfsmis_random_init": D.trained_predictor(work / "run_random", cfg_r),
            "sdfsmis_generator_init": D.trained_predictor(work / "run_prior", cfg_p),
            "support-copy": build_predictor("support-copy")}
    results, figures = {}, []
    for name, predictor in arms.items():
        results[name] = {}
        for split, (ds, proto) in splits.items():
            res = evaluate(ds, predictor, proto, progress=progress)
            write_results(res, out / name / split)
            results[name][split] = res
        if name == "sdfsmis_generator_init":
            res = results[name]["in_domain"]
            rows = example_rows(ct, predictor, res["folds"][0], res["protocol"]["test_classes"], normalize_volume)
            figures.append(overlay_panel(rows, out / "figures" / f"{name}_in_domain.png",
                                         "SD-FSMIS from the generator's UNet, in-domain (phantom CT, fold 0)"))
    timings["total_s"] = round(time.time() - t0, 1)

    # report
    import shutil

    (out / "figures").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(synth_dir / SAMPLES_NAME, out / "figures" / "generator_samples.png")
    classes = results["support-copy"]["in_domain"]["protocol"]["test_classes"]
    budget = {"sdfsmis_random_init": (sum_r["steps"], sum_r["seconds"], 0.0),
              "sdfsmis_generator_init": (sum_p["steps"], sum_p["seconds"], gen_seconds)}
    head = ("| SD-FSMIS initialisation | generator s | SD-FSMIS steps | SD-FSMIS s | total s | "
            + " | ".join(f"in-domain {c}" for c in classes) + " | in-domain mean | cross-domain mean |")
    prior_rows = [head, "|---|" + "---|" * (len(classes) + 6)]
    for name, r in results.items():
        steps, secs, gsecs = budget.get(name, (None, None, None))
        label = {"sdfsmis_random_init": "random", "sdfsmis_generator_init": "generator (model.unet_init)"}.get(name, name)
        cells = (["–"] * 4 if steps is None
                 else [f"{gsecs:.0f}", str(steps), f"{secs:.0f}", f"{gsecs + secs:.0f}"])
        prior_rows.append(f"| {label} | " + " | ".join(cells) + " | "
                          + " | ".join(f"{100 * r['in_domain']['per_class'][c]:.2f}" for c in classes)
                          + f" | {100 * r['in_domain']['mean_dice']:.2f} | {100 * r['cross_domain']['mean_dice']:.2f} |")
    rd = 100 * results["sdfsmis_random_init"]["in_domain"]["mean_dice"]
    pd = 100 * results["sdfsmis_generator_init"]["in_domain"]["mean_dice"]
    verdict = (f"With the generator's UNet as its initialisation, at an equal CPU budget, SD-FSMIS scores "
               f"{pd:.2f} in-domain against {rd:.2f} from a random UNet ({'better' if pd > rd else 'not better'}; "
               f"one seed, train.seed={cfg_r.train.seed}: docs/measurements/generator_prior.md has seeds 0-4).")
    report = "\n".join([
        "# Generator demo report", "", f"**{verdict}**", "",
        "## The generator", "",
        f"configs/generator_demo.yaml: a mask-conditioned latent diffusion model in the demo VAE's latent space "
        f"(the demo SD-FSMIS UNet's architecture, conv_in widened for the mask latent; modality and class tokens "
        f"through cross-attention), {gen_summary['steps']} steps on the phantom CT fold-0 training cases with "
        f"supervoxel masks, {gen_seconds:.0f} s. Rows: a real source slice, its edited mask (the union of the test "
        f"classes), the slice generated for it ({syn['steps']} DDIM steps, guidance {syn['guidance']:g}).", "",
        "![generated slices](figures/generator_samples.png)", "",
        f"Quality of {syn['cases']} synthetic cases ({syn['slices']} slices, {args.per_case} per source case, "
        f"seed {args.seed}) against their sources (synthetic/quality.json; definitions in that file):", "",
        *quality_table(quality), "",
        "## The diffusion prior at an equal CPU budget", "",
        f"SD-FSMIS (configs/demo.yaml {' '.join(args.overrides)}) trained from a random UNet, and from the "
        f"generator's UNet with {steps_p} steps: the random run's steps minus those its seconds per step buy in the "
        f"generator's training time. Mean Dice (%), canonical protocol, EP1, 1-shot, per-volume 3D Dice; in-domain "
        f"CT fold 0, cross-domain all 5 folds of the phantom MR.", "",
        *prior_rows, "",
        *[f"![{f.stem}](figures/{f.name})" for f in figures], "",
        f"Timings (s): {json.dumps(timings)}", ""])
    atomic_write_json(out / "results.json", {
        "generator": {"run": str(gen_run), "steps": gen_summary["steps"], "seconds": gen_seconds},
        "synthetic": {k: syn[k] for k in ("out", "cases", "slices", "steps", "guidance", "seed")},
        "quality": {k: v for k, v in quality.items() if k not in ("per_case", "definitions")},
        "prior": {"equal_budget_steps": steps_p, "budget": {k: {"steps": v[0], "seconds": v[1], "generator_seconds": v[2]}
                                                           for k, v in budget.items()}},
        **results})
    atomic_write_text(out / "report.md", report)
    print("\n".join(quality_table(quality)))
    print("\n".join(prior_rows))
    print(f"\n{verdict}")
    print(f"wrote {out / 'report.md'} and {out / 'results.json'} ({timings['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
