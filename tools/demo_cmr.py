#!/usr/bin/env python
"""The Card-MRI demo behind `make demo-cmr DATA=<folder>`: the demo recipe on real data, on a CPU.

DATA is the published Card-MRI folder (``cmr_MR_normalized/`` with ``supervoxels_1000/`` beside
it), or a folder holding it.

1. trains (or reuses, cached by data and config) a demo VAE (configs/demo_vae.yaml, 360 steps)
   on the Card-MRI images and supervoxel masks; its mask reconstruction Dice is the "oracle" row;
2. trains the demo SD-FSMIS (configs/demo_cmr.yaml) self-supervised on fold 0 (resumed or
   reused when a finished run with the same config exists), from a random UNet (WORK/run, the
   default) or, with ``--init generator``, from the UNet of a demo generator trained label-free on
   the same fold's training slices (WORK/generator, then WORK/run_prior); ``--equal-budget`` then
   gives SD-FSMIS the random run's steps minus those the generator's training time would have
   bought (the random run must exist: train it first without ``--init``);
3. evaluates SD-FSMIS and support-copy on fold 0 with the canonical protocol (EP1, 1-shot);
4. writes OUT/results.json ({method: {in_domain: results}}, the demo's schema, in the evaluator's
   schema per split), OUT/report.md, the validation curve and overlay figures.

  make demo-cmr DATA=path/to/CMR
  python tools/demo_cmr.py --data path/to/CMR --out results/demo-cmr train.max_steps=800
  python tools/demo_cmr.py --data path/to/CMR --out results/demo-cmr-prior --init generator --equal-budget
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
DEMO_VAE_STEPS = 360


def ensure_cmr_vae(vae_config, data: Path, steps: int, size: int, work: Path, progress: bool):
    """The Card-MRI demo VAE in WORK/vae, trained or reused when cached: (vae_dir, reused)."""
    import demo as D

    from fsmis.methods.autoencoder import ensure_autoencoder

    return ensure_autoencoder(D.demo_vae_config(vae_config, data, steps, size), work / "vae", progress=progress)


def ensure_cmr_generator(args, data: Path, vae_dir: Path, size: int, work: Path, progress: bool):
    """The label-free Card-MRI demo generator in WORK/generator (``args`` carries demo.add_init_arguments'
    options), trained or reused when cached: (run, its train summary)."""
    import demo as D

    _, summary = D.ensure_generator(args.generator_config, data, vae_dir, size, args.gen_steps, work / "generator",
                                    progress, args.gen_set)
    return work / "generator", summary


def main(argv=None) -> int:
    from fsmis.cli import positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="Card-MRI folder (cmr_MR_normalized/, or a folder holding it)")
    p.add_argument("--out", default="results/demo-cmr", help="report folder")
    p.add_argument("--work", default="checkpoints/demo-cmr", help="cache of the VAE and the trained run")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo_cmr.yaml"), help="SD-FSMIS config")
    p.add_argument("--vae-config", default=str(ROOT / "configs" / "demo_vae.yaml"), help="demo VAE config")
    p.add_argument("--vae-steps", type=positive_int, default=DEMO_VAE_STEPS,
                   help=f"demo VAE training steps (default {DEMO_VAE_STEPS})")
    import demo as D

    D.add_init_arguments(p, default="random")
    p.add_argument("--equal-budget", action="store_true",
                   help="with --init generator: SD-FSMIS trains the random run's (WORK/run) steps minus the "
                        "steps the generator's training time would have bought at its seconds per step")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the SD-FSMIS config")
    args = p.parse_intermixed_args(argv)  # options may follow the key=value overrides
    if args.equal_budget and args.init != "generator":
        p.error("--equal-budget needs --init generator")
    if args.equal_budget and any(o.startswith("train.max_steps=") for o in args.overrides):
        p.error("--equal-budget sets train.max_steps from the random-init run: do not give it too")

    from fsmis.config import load_config
    from fsmis.data.datasets import open_dataset
    from fsmis.data.normalize import normalize_volume
    from fsmis.evaluation.figures import example_rows, overlay_panel, validation_curve
    from fsmis.evaluation.protocol import ProtocolConfig, evaluate
    from fsmis.evaluation.results import atomic_write_json, atomic_write_text, results_markdown, write_results
    from fsmis.methods.autoencoder import REPORT_NAME
    from fsmis.methods.base import build_predictor

    t0 = time.time()
    timings = {}
    data, out, work = Path(args.data), Path(args.out), Path(args.work)
    D.refuse_inside(data, **{"--out": out, "--work": work})
    ds = open_dataset(data)  # fails here, naming the folder, when DATA is not a dataset
    cfg = load_config(Path(args.config), [f"data.root={data}", *args.overrides])
    size = cfg.data.image_size
    vae_dir, reused = ensure_cmr_vae(args.vae_config, data, args.vae_steps, size, work, not args.quiet)
    if reused:
        print(f"reusing the demo VAE in {vae_dir}")
    vae_report = json.loads((vae_dir / REPORT_NAME).read_text(encoding="utf-8"))
    timings["vae_s"] = round(time.time() - t0, 1)

    overrides = [f"data.root={data}", f"model.vae_path={vae_dir}"]
    run, gen_summary, budget, budget_line = work / "run", None, [], ""
    if args.init == "generator":
        from demo_generator import equal_budget_steps

        if args.equal_budget:  # checked before the generator's training time is spent
            random_summary = work / "run" / "train_summary.json"
            if not random_summary.is_file():
                raise FileNotFoundError(f"{random_summary}: --equal-budget needs the random-init run; "
                                        f"run this command without --init first (same --work)")
            rs = json.loads(random_summary.read_text(encoding="utf-8"))
        t1 = time.time()
        _, gen_summary = ensure_cmr_generator(args, data, vae_dir, size, work, not args.quiet)
        timings["generator_s"] = round(time.time() - t1, 1)
        overrides.append(f"model.unet_init={work / 'generator'}")
        run = work / "run_prior"
        if args.equal_budget:
            steps = equal_budget_steps(int(rs["steps"]), float(rs["seconds"]), float(gen_summary["seconds"]))
            budget = [f"train.max_steps={steps}"]
            budget_line = (f" Equal budget: the random-init run's {rs['steps']} steps ({rs['seconds']:.0f} s) minus "
                           f"the generator's {gen_summary['seconds']:.0f} s at its seconds per step = {steps} steps.")
    overrides += [*args.overrides, *budget]  # the equal budget's steps last: it decides them
    t1 = time.time()
    cfg, summary = D.train_demo_model(Path(args.config), run, overrides, not args.quiet)
    timings["train_s"] = round(time.time() - t1, 1)
    fold = cfg.data.fold

    methods = {"sdfsmis": D.trained_predictor(run, cfg),
               "support-copy": build_predictor("support-copy")}
    proto = ProtocolConfig(fold_ids=[fold])
    all_results, sections = {}, []
    for name, predictor in methods.items():
        t1 = time.time()
        res = evaluate(ds, predictor, proto, progress=not args.quiet)
        write_results(res, out / name / "in_domain")
        all_results[name] = {"in_domain": res}
        timings[f"eval_{name}_s"] = round(time.time() - t1, 1)
        title = f"{name}, Card-MRI fold {fold}"
        rows = example_rows(ds, predictor, res["folds"][0], res["protocol"]["test_classes"], normalize_volume)
        png = overlay_panel(rows, out / "figures" / f"{name}_in_domain.png", title)
        sections.append(results_markdown(res, title) + f"\n![{title}](figures/{png.name})\n")
    curve = validation_curve({"SD-FSMIS": summary.get("history", [])}, out / "figures" / "validation_curve.png",
                             "validation Dice (held-out training case)",
                             baseline=all_results["support-copy"]["in_domain"]["mean_dice"],
                             baseline_label="support-copy (fold test Dice)")
    timings["total_s"] = round(time.time() - t0, 1)

    rows_md = D.dice_table(all_results, vae_report.get("eval", {}), "oracle (VAE mask reconstruction)",
                           cross_domain=False)
    sd = 100 * all_results["sdfsmis"]["in_domain"]["mean_dice"]
    sc = 100 * all_results["support-copy"]["in_domain"]["mean_dice"]
    verdict = (f"SD-FSMIS {'beats' if sd > sc else 'does NOT beat'} support-copy on Card-MRI fold {fold}: "
               f"{sd:.2f} vs {sc:.2f} mean Dice (%).")
    history = ", ".join(f"{h['step']}: {h['val_dice']:.3f}" for h in summary.get("history", [])
                        if h.get("val_dice") is not None)
    report = "\n".join([
        "# Card-MRI demo report", "", f"**{verdict}**", "",
        f"Data: {ds.input_root} ({len(ds.case_ids)} cases). SD-FSMIS: {Path(args.config).name} "
        f"{' '.join(args.overrides)} ({summary['steps']} steps on fold {fold}, self-supervised supervoxel episodes, "
        f"best validation Dice {summary['best_val_dice']:.3f}, "
        + (f"UNet initialised from the demo generator trained {gen_summary['steps']} steps in "
           f"{gen_summary['seconds']:.0f} s" if gen_summary else "UNet initialised at random")
        + f"); demo VAE {vae_dir.parent.name} (latent scaling "
        f"factor {vae_report['scaling_factor']:.4f}). Mean Dice (%), canonical protocol, EP1, 1-shot, per-volume 3D Dice."
        + budget_line,
        "", *rows_md, "", f"Validation Dice by step: {history}", "", f"![validation curve](figures/{curve.name})", "",
        *sections, f"Timings (s): {json.dumps(timings)}", ""])
    atomic_write_json(out / "results.json", all_results)
    atomic_write_text(out / "report.md", report)
    print("\n".join(rows_md))
    print(f"\n{verdict}")
    print(f"wrote {out / 'report.md'}, {out / 'results.json'} and figures in {out / 'figures'} "
          f"({timings['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
