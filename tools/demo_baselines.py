#!/usr/bin/env python
"""The baselines demo behind `make demo-baselines`: PANet, SSL-ALPNet, ADNet and UniverSeg on the
phantom, each trained at the wall-clock budget of the demo SD-FSMIS, in the report format of
`make demo`.

1. the phantom CT (with supervoxels) and MR data of `make demo` (reused when present);
2. the budget: the training seconds of make demo's SD-FSMIS run (WORK/run/train_summary.json) when
   it exists, else --budget (the 726 s make demo's training measured on 2 CPU cores);
3. a calibration: each method trains --probe-steps steps (configs/<method>_demo.yaml) and one
   validation; its step count is the largest multiple of 50 whose steps, four validations and four
   checkpoints (at every quarter of the run) fit the budget, from the probe's steady-state seconds
   per step (the mean over its second half) and its seconds per validation and checkpoint;
4. the trainings (train.py, one thread each, --parallel at a time: on this 2-core CPU two baselines
   train side by side, each for the budget's wall-clock seconds on one core), in WORK/baselines/<method>
   (a finished run is reused with its step count, no calibration);
5. evaluation, canonical protocol, EP1, 1-shot: in-domain CT fold 0, cross-domain all 5 folds of the
   MR phantom, of every baseline, support-copy and (when make demo's run exists) SD-FSMIS;
6. OUT/report.md (both tables with their protocol fingerprints, bar charts), OUT/results.json
   ({method: {split: results}}, the schema of make demo), OUT/<split>/report.{md,csv,json,png}.

  python tools/demo_baselines.py --out results/demo-baselines
  python tools/demo_baselines.py --methods adnet alpnet --budget 300 --out results/bl_quick

--dataset DIR replaces the phantom by one dataset (e.g. the published Card-MRI folder): the
baselines train on its fold 0 and are evaluated on fold 0 only (no cross-domain split); the
SD-FSMIS row and the budget come from --sd-run (default WORK/run, e.g. make demo-cmr's
checkpoints/demo-cmr/run):

  python tools/demo_baselines.py --dataset ../data/cmr --work checkpoints/demo-cmr --out results/baselines-cmr
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("panet", "alpnet", "adnet", "universeg")
DEFAULT_BUDGET_S = 726.0  # make demo's SD-FSMIS training, 1600 steps on 2 CPU cores (docs/measurements)
STEP_ROUND = 50
BUDGET_KEYS = ("train.max_steps", "train.val_every", "train.ckpt_every")  # set from the budget, per machine


def _train_cmd(config: Path, out: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(config), "--out", str(out), "--quiet",
            "--device", "cpu", *overrides]


def _checks(steps: int) -> int:
    """Validations (and checkpoints) of a run of ``steps``: every quarter, and the last step."""
    every = max(1, steps // 4)
    return steps // every + (1 if steps % every else 0)


def steps_for_budget(budget: float, step_s: float, check_s: float, min_steps: int = STEP_ROUND,
                     round_to: int = STEP_ROUND) -> int:
    """The most steps (a multiple of ``round_to`` when that many fit) whose training time, ``step_s`` per step plus
    ``check_s`` for each validation and checkpoint (:func:`_checks`), stays within ``budget`` seconds."""
    def fits(n):
        return n * step_s + _checks(n) * check_s <= budget

    n = int(budget / step_s) if step_s > 0 else 0
    big = n // round_to * round_to
    while big >= round_to and not fits(big):  # the check count is not monotonic in n: test each candidate
        big -= round_to
    if big >= round_to:
        return max(min_steps, big)
    n = min(n, round_to - 1)
    while n > 0 and not fits(n):
        n -= 1
    return max(min_steps, n)


def _run_parallel(jobs: list[tuple[str, list[str]]], parallel: int, threads: int) -> dict[str, float]:
    """Run (name, argv) jobs, ``parallel`` at a time with ``threads`` threads each; returns wall seconds
    per job. A failed job raises RuntimeError with its stderr tail."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending, running, seconds = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, argv = pending.pop(0)
            running[name] = (subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                              cwd=ROOT, env=env), time.time())
        time.sleep(0.5)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            out, err = proc.communicate()
            del running[name]
            if proc.returncode != 0:
                for other, _ in running.values():
                    other.kill()
                raise RuntimeError(f"{name}: train.py failed (exit {proc.returncode}):\n{err[-2000:]}")
            seconds[name] = time.time() - t0
    return seconds


def _finished(run: Path) -> dict | None:
    summary = run / "train_summary.json"
    if not summary.is_file():
        return None
    from fsmis.engine import checkpoints as ck

    s = json.loads(summary.read_text())
    return s if ck.read_index(run).get("last") == f"step_{s.get('steps')}" else None


def main(argv=None) -> int:
    import demo as D
    from fsmis.cli import positive_int

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="datasets/phantom", help="phantom data folder (ct/ and mr/ inside)")
    p.add_argument("--out", default="results/demo-baselines", help="report folder")
    p.add_argument("--work", default="checkpoints/demo", help="make demo's cache (WORK/run is SD-FSMIS; the "
                                                             "baselines train into WORK/baselines/<method>)")
    p.add_argument("--dataset", default=None, help="one dataset instead of the phantom: fold 0 in-domain only")
    p.add_argument("--sd-run", default=None, help="the SD-FSMIS run of the comparison and the budget (default WORK/run)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--cases", type=positive_int, default=10, help="phantom cases per modality")
    p.add_argument("--shape", type=D._shape, default=None, metavar="Z,Y,X", help="phantom volume shape")
    p.add_argument("--budget", type=float, default=None,
                   help=f"training seconds per method (default: make demo's SD-FSMIS training time, else "
                        f"{DEFAULT_BUDGET_S:g})")
    p.add_argument("--probe-steps", type=positive_int, default=40, help="calibration steps per method")
    p.add_argument("--min-steps", type=positive_int, default=STEP_ROUND, help="fewest training steps per method")
    p.add_argument("--parallel", type=positive_int, default=2, help="trainings side by side (one thread each)")
    p.add_argument("--threads", type=positive_int, default=1, help="threads per training")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", help="key=value overrides of every baseline config (e.g. "
                                                "data.image_size=64)")
    args = p.parse_args(argv)

    from fsmis.config import load_config
    from fsmis.data.datasets import open_dataset
    from fsmis.evaluation.protocol import ProtocolConfig, evaluate
    from fsmis.evaluation.report import build_report, markdown, write_report
    from fsmis.evaluation.results import atomic_write_json, atomic_write_text, write_results
    from fsmis.methods.base import build_predictor

    out, work = Path(args.out), Path(args.work)
    data = Path(args.dataset or args.data)
    D.refuse_inside(data, **{"--out": out, "--work": work})
    t0 = time.time()
    timings = {}
    if args.dataset:
        ct_dir, mr_dir = data, None  # the one dataset: in-domain fold 0 only
        open_dataset(ct_dir)  # a clear error now rather than after the calibration
    else:
        ct_dir = D.ensure_phantom(data / "ct", "ct", args.cases, 0, shape=args.shape)
        mr_dir = D.ensure_phantom(data / "mr", "mr", args.cases, 1000, supervoxels=False, shape=args.shape)

    sd_run = Path(args.sd_run) if args.sd_run else work / "run"
    sd_summary = _finished(sd_run)
    budget = args.budget or (float(sd_summary["seconds"]) if sd_summary else DEFAULT_BUDGET_S)
    budget_src = ("--budget" if args.budget else f"the training time of {sd_run}" if sd_summary
                  else f"make demo's measured training time ({DEFAULT_BUDGET_S:g} s; {sd_run} not found)")
    print(f"budget: {budget:.0f} s of training per method ({budget_src})")

    base = [f"data.root={ct_dir}", *args.overrides]
    runs = {m: work / "baselines" / m for m in args.methods}
    steps, probes, checks = {}, {}, {}
    for m, run in runs.items():
        done = _finished(run)
        if done is not None:
            wanted = load_config(ROOT / "configs" / f"{m}_demo.yaml", base)
            diff = [d for d in D.reuse_conflicts(load_config(run / "config.yaml"), wanted)
                    if d.split(":")[0] not in BUDGET_KEYS]
            if diff:
                raise ValueError(f"{run} holds a {m} run trained with another config ({'; '.join(diff[:6])}); give "
                                 f"another --work folder, or delete {run} to train it again")
            steps[m] = int(done["steps"])
            print(f"reusing the trained {m} in {run} ({steps[m]} steps)")
    todo = [m for m in args.methods if m not in steps]
    if todo:  # 3. calibration, under the same parallel load as the trainings
        t1 = time.time()
        probe_dir = work / "baselines" / "_probe"
        jobs = [(m, _train_cmd(ROOT / "configs" / f"{m}_demo.yaml", probe_dir / m,
                               [*base, f"train.max_steps={args.probe_steps}", "train.val_every=0",
                                f"train.ckpt_every={args.probe_steps}", "train.warmup_steps=1"])) for m in todo]
        for m in todo:
            if (probe_dir / m).exists():
                import shutil

                shutil.rmtree(probe_dir / m)
        _run_parallel(jobs, args.parallel, args.threads)
        for m in todo:
            # the probe's steady-state seconds per step (its warm-up steps left out), and its one validation
            # and checkpoint
            probe = json.loads((probe_dir / m / "train_summary.json").read_text())
            check_s = float(probe["seconds_validation"]) + float(probe["seconds_checkpoints"])
            sps = float(probe["seconds_per_step"])
            probes[m], checks[m] = sps, check_s
            steps[m] = steps_for_budget(budget, sps, check_s, args.min_steps)
            print(f"{m}: {sps:.3f} s per step, {check_s:.1f} s per validation and checkpoint -> {steps[m]} steps")
        timings["calibration_s"] = round(time.time() - t1, 1)
        # 4. the trainings
        t1 = time.time()
        jobs = [(m, _train_cmd(ROOT / "configs" / f"{m}_demo.yaml", runs[m],
                               [*base, f"train.max_steps={steps[m]}", f"train.val_every={max(1, steps[m] // 4)}",
                                f"train.ckpt_every={max(1, steps[m] // 4)}"])) for m in todo]
        print(f"training {', '.join(todo)}, {args.parallel} at a time ({args.threads} thread each)")
        trained = _run_parallel(jobs, args.parallel, args.threads)
        timings["training_s"] = round(time.time() - t1, 1)
        timings.update({f"train_{m}_wall_s": round(s, 1) for m, s in trained.items()})

    # 5. evaluation
    t1 = time.time()
    ct = open_dataset(ct_dir)
    predictors = {m: build_predictor(None, checkpoint=str(runs[m]), device="cpu") for m in args.methods}
    if sd_summary is not None:
        cfg = load_config(sd_run / "config.yaml")
        predictors = {"sdfsmis": D.trained_predictor(sd_run, cfg), **predictors}
    predictors["support-copy"] = build_predictor("support-copy")
    splits = {"in_domain": (ct, ProtocolConfig(fold_ids=[0]))}
    if mr_dir is not None:
        splits["cross_domain"] = (open_dataset(mr_dir), ProtocolConfig())
    results = {}
    for name, pred in predictors.items():
        results[name] = {}
        for split, (ds, proto) in splits.items():
            res = evaluate(ds, pred, proto, progress=not args.quiet)
            write_results(res, out / name / split)
            results[name][split] = res
    timings["evaluation_s"] = round(time.time() - t1, 1)
    timings["total_s"] = round(time.time() - t0, 1)

    # 6. report
    sections = []
    titles = ({"in_domain": f"{ct.name}, fold 0"} if args.dataset else
              {"in_domain": "in-domain (phantom CT, fold 0)", "cross_domain": "cross-domain CT -> MR (phantom MR, 5 folds)"})
    for split, title in titles.items():
        rep = build_report([out / n / split for n in results], labels=list(results))
        write_report(rep, out / split, f"Baselines, {title}")
        sections += [f"## {title}", "", markdown(rep), "", f"![{split}]({split}/report.png)", ""]
    trained = ", ".join(f"{m} {steps[m]} steps" + (f" ({probes[m]:.3f} s/step)" if m in probes else "")
                        for m in args.methods)
    report = "\n".join([
        "# Baselines demo report", "",
        f"Each baseline trained from random weights for the wall-clock budget of the demo SD-FSMIS ({budget:.0f} s, "
        f"{budget_src}), {args.parallel} at a time with {args.threads} thread(s) each: {trained}. Configs: "
        "configs/<method>_demo.yaml (the small backbone). SD-FSMIS: " + (f"the run {sd_run}" if sd_summary else
        f"not found at {sd_run} (run make demo first to include it)") + ". One training seed.", "",
        *sections, f"Timings (s): {json.dumps(timings)}", ""])
    atomic_write_json(out / "results.json", {**results, "baselines": {
        "budget_s": budget, "budget_source": budget_src, "steps": steps, "seconds_per_step": probes,
        "seconds_per_check": checks,
        "parallel": args.parallel, "threads": args.threads, "timings": timings}})
    atomic_write_text(out / "report.md", report)
    print(report)
    print(f"wrote {out / 'report.md'} and {out / 'results.json'} ({timings['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
