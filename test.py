#!/usr/bin/env python
"""Evaluate a few-shot segmentation method with the canonical FSMIS protocol.

Examples
  python test.py --method support-copy --data datasets/phantom/ct --out results/sc_ct
  python test.py --checkpoint checkpoints/demo/run --data datasets/phantom/ct --out results/demo_ct
  python test.py --method support-copy --data CMR/ --out results/cmr --protocol legacy --supp-idx 2
  python test.py --method support-copy --data CMR/ --out results/one --support-case 7 --query-cases 1 2 3

A trained method is evaluated from its run folder (--checkpoint RUN_DIR): the model, its
settings and the training protocol (setting, exclusion, training labels, fold protocol, fold)
come from RUN_DIR/config.yaml; a command-line value that contradicts them is refused.

Writes OUT/results.json (schema fsmis-results/1, see README), results.csv, results.md and, per
fold and query case, OUT/predictions/fold<k>/pred_<case>_<class>.nii.gz (the scored binary mask of
each class, on the query's own grid) and pred_<case>.nii.gz (all classes as one label map, with
the dataset's class ids; where class masks overlap the later class wins).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fsmis.data.nifti import DataError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from fsmis.methods.base import available_methods

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", help=f"method name: {', '.join(available_methods())} (with --checkpoint: "
                                     "taken from the run)")
    p.add_argument("--checkpoint", help="trained run folder (train.py --out), or one of its step folders")
    p.add_argument("--config", help="optional, with --checkpoint: a config whose eval section is used; its model "
                                    "keys must equal the run's")
    p.add_argument("--weights", choices=["best", "last"], default="best",
                   help="which checkpoint of the run (default best, falling back to last)")
    p.add_argument("--data", required=True, help="dataset root: benchmark folder, its *_normalized folder, "
                                                 "or a folder with dataset.json")
    p.add_argument("--out", required=True, help="output folder for results and predictions")
    g = p.add_argument_group("protocol (every switch is written into results.json)")
    g.add_argument("--protocol", choices=["canonical", "legacy"], default=None,
                   help="fold protocol (default: the run's, else canonical: support = first case of the next fold)")
    g.add_argument("--supp-idx", type=int, default=None,
                   help="legacy folds: index of the support case in the sorted fold "
                        "(2 Q-Net/RPT/PAMI/GMRD/FAMNet, 3 CAT-Net, -1 ADNet; default: the run's, else 2)")
    g.add_argument("--folds", type=int, nargs="+", help="evaluate only these folds (default: all 5)")
    g.add_argument("--n-folds", type=int, default=5)
    g.add_argument("--setting", type=int, choices=[1, 2], default=None,
                   help="training setting of the evaluated model (recorded; a run's own is used and a "
                        "different value refused; default 1)")
    g.add_argument("--exclusion", choices=["any", "all", "released"], default=None,
                   help="Setting-2 exclusion used in training (recorded; as --setting; default any)")
    g.add_argument("--chunking", choices=["ep1", "alpnet"], default="ep1",
                   help="ep1: chunks of the class slices (default); alpnet: equal-extent chunks over z_min..z_max")
    g.add_argument("--support-mode", choices=["1shot", "3shot"], default=None,
                   help="1shot: chunk i uses support slice i; 3shot: all support slices for every chunk "
                        "(default: the run's eval.support, else 1shot)")
    g.add_argument("--dice", choices=["per_volume", "pooled"], default=None,
                   help="headline Dice: per-volume 3D Dice averaged (default) or pooled over a fold's volumes")
    g.add_argument("--preset", choices=["released"], default=None,
                   help="released: evaluate as the released SD-FSMIS script (legacy folds, supp_idx 2, the three "
                        "support slices as one 3-shot support for every chunk, pooled Dice, every test class, the "
                        "per-slice HD95 / ASSD in pixels as extra columns); explicit switches win")
    g.add_argument("--n-part", type=int, default=3, help="EP1 parts (default 3)")
    g.add_argument("--classes", nargs="+", help="test classes by name (default: the dataset's test classes)")
    g.add_argument("--support-case", help="evaluate this one support case against --query-cases (no folds)")
    g.add_argument("--query-cases", nargs="+", help="query case ids for --support-case")
    g = p.add_argument_group("synthetic support (docs/generative-augmentation.md; recorded in results.json)")
    g.add_argument("--synthetic-support", type=int, default=0, metavar="M",
                   help="add M generated variants (edited mask, generated image in the dataset's modality) of each "
                        "support slice to the support: K = 1 + M (needs --generator; default 0)")
    g.add_argument("--support-from-mask-of", metavar="DIR",
                   help="zero-shot support: every fold's support MASK is taken from fold k's support case of the "
                        "dataset DIR (e.g. another modality), its image generated in this dataset's modality "
                        "(needs --generator; no overlay figures)")
    g.add_argument("--generator", metavar="RUN", help="a trained generator run (method: generator)")
    g.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic variants (default 0)")
    g.add_argument("--synthetic-steps", type=int, default=None, metavar="K",
                   help="DDIM steps of the variants (default: the generator run's model.sample_steps)")
    g.add_argument("--synthetic-guidance", type=float, default=None, metavar="G",
                   help="guidance scale of the variants (default: the generator run's model.guidance)")
    p.add_argument("--no-surface", action="store_true", help="skip HD95/ASD (faster)")
    p.add_argument("--released-slice-metrics", action="store_true",
                   help="also the released SD-FSMIS script's per-slice HD95 / ASSD in pixels (extra columns "
                        "hd95_px_2d_released / assd_px_2d_released)")
    p.add_argument("--no-nifti", action="store_true", help="do not write NIfTI predictions")
    p.add_argument("--no-figures", action="store_true",
                   help="do not write overlay PNGs (support, query, prediction, ground truth; one per fold)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fsmis.config import ConfigError
    from fsmis.data.datasets import open_dataset
    from fsmis.engine.checkpoints import CheckpointError
    from fsmis.evaluation.protocol import Evaluator, ProtocolConfig
    from fsmis.evaluation.results import results_markdown, write_results
    from fsmis.methods.base import build_predictor
    from fsmis.models.weights import WeightLoadError

    if (args.support_case is None) != (args.query_cases is None):
        print("error: --support-case and --query-cases go together", file=sys.stderr)
        return 2
    if args.method is None and args.checkpoint is None:
        parser.error("give --method (e.g. support-copy) or --checkpoint RUN_DIR")
    if args.n_folds < 1 or args.n_part < 1:
        parser.error(f"--n-folds ({args.n_folds}) and --n-part ({args.n_part}) must be >= 1")
    if args.synthetic_support < 0:
        parser.error(f"--synthetic-support must be >= 0, got {args.synthetic_support}")
    if args.synthetic_support and args.support_from_mask_of:
        parser.error("--synthetic-support and --support-from-mask-of are two different supports: give one")
    if (args.synthetic_support > 0 or args.support_from_mask_of is not None) != (args.generator is not None):
        parser.error("--synthetic-support M (M >= 1) or --support-from-mask-of DIR, and --generator RUN, go together")
    bad_folds = [k for k in args.folds or [] if not 0 <= k < args.n_folds]
    if bad_folds:
        parser.error(f"--folds {' '.join(map(str, bad_folds))}: out of range 0..{args.n_folds - 1} "
                     f"(--n-folds {args.n_folds})")
    if args.preset == "released":  # the preset's evaluation switches (fsmis.config.PRESETS), then the script's Dice
        from fsmis.config import PRESETS

        rel = PRESETS["released"]
        args.protocol = args.protocol or rel["data.protocol"]
        args.supp_idx = rel["data.supp_idx"] if args.supp_idx is None else args.supp_idx
        args.support_mode = args.support_mode or rel["eval.support"]
        args.dice = args.dice or "pooled"
        args.released_slice_metrics = True
    args.dice = args.dice or "per_volume"
    try:
        ds = open_dataset(args.data)
        if args.preset == "released" and args.classes is None:
            args.classes = list(ds.test_classes)  # the released script scores every class (a leak is recorded)
        training = None
        if args.checkpoint is not None:
            from fsmis.engine.runs import load_run

            run = load_run(args.checkpoint, which=args.weights, config=args.config)
            if args.method is not None and args.method != run.cfg.method:
                raise ValueError(f"--method {args.method} but {run.run_dir} is a {run.cfg.method!r} run")
            predictor = run.predictor()
            training = training_protocol(run, ds, args)
        else:
            predictor = build_predictor(args.method, config=args.config)
        if args.synthetic_support:
            from fsmis.genaug.generator import modality_token
            from fsmis.genaug.support import SyntheticSupport

            predictor = SyntheticSupport(predictor, args.generator, args.synthetic_support, modality_token(ds),
                                         seed=args.synthetic_seed, steps=args.synthetic_steps,
                                         guidance=args.synthetic_guidance)
        source = None
        if args.support_from_mask_of:
            from fsmis.genaug.generator import modality_token
            from fsmis.genaug.zeroshot import MaskSupportGenerator, MaskSupportSource

            source = MaskSupportSource(args.support_from_mask_of, MaskSupportGenerator(
                args.generator, modality_token(ds), seed=args.synthetic_seed, steps=args.synthetic_steps,
                guidance=args.synthetic_guidance))
            args.no_figures = True  # the overlays show the dataset's own support case
        cfg = ProtocolConfig(
            folds=args.protocol or "canonical", supp_idx=2 if args.supp_idx is None else args.supp_idx,
            n_folds=args.n_folds, fold_ids=args.folds,
            n_part=args.n_part, chunking=args.chunking, support=args.support_mode or "1shot", dice=args.dice,
            setting=args.setting or 1, exclusion=args.exclusion or "any", test_classes=args.classes,
            surface_metrics=not args.no_surface, support_case=args.support_case,
            query_cases=args.query_cases, released_slice_metrics=args.released_slice_metrics, preset=args.preset)
        out = Path(args.out)
        check_output_folder(out)
        sink = None if args.no_nifti else PredictionWriter(ds, out / "predictions")
        ev = Evaluator(ds, predictor, cfg, progress=not args.quiet, prediction_sink=sink, support_source=source)
        folds = ev.folds()
        print(f"{predictor.name} on {ds.name} ({len(ds.case_ids)} cases, classes {', '.join(ev.classes)}); "
              f"{len(folds)} fold(s): " + "; ".join(f"support {f.support} -> {len(f.queries)} queries" for f in folds))
        from fsmis.atomic import atomic_directory, exclusive_lock

        with exclusive_lock(out, "output folder", out.parent / f".{out.name}.lock"):
            remove_debris(out)
            results = ev.run()
            if training is not None:
                results["training"] = training
            # the whole folder is written as one unit: a killed run leaves the previous one (or nothing)
            with atomic_directory(out) as tmp:
                written = write_results(results, tmp)
                if sink is not None:
                    sink.folder = Path(tmp) / "predictions"
                    written += sink.flush()
                if not args.no_figures:
                    written += write_figures(ds, predictor, results, Path(tmp) / "figures")
    except (DataError, ValueError, ConfigError, CheckpointError, WeightLoadError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(results_markdown(results))
    print(f"wrote {len(written)} files under {out}: results.json, results.csv, results.md"
          + ("" if args.no_nifti else f", predictions in {out / 'predictions'}")
          + ("" if args.no_figures else f", overlays in {out / 'figures'}"))
    return 0


def check_output_folder(out: Path) -> None:
    """Before any work: --out must be a new folder, an empty one, or an earlier test.py output
    (which is then replaced as a whole), in a writable place."""
    import os

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file():
        raise ValueError(f"--out {out} holds other files and no results.json: it is not a test.py output folder, "
                         "and would be replaced; choose a new or empty folder")
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: {parent} is not writable")


def remove_debris(out: Path) -> None:
    """Remove what a killed earlier run into ``out`` left beside it (its hidden temporary folder,
    or the previous output renamed aside for the swap); called while holding the lock of ``out``."""
    import shutil

    for p in [*out.parent.glob(f".tmp-{out.name}-*"), *out.parent.glob(f".old-{out.name}-*")]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def training_protocol(run, ds, args) -> dict:
    """Fill the protocol switches from the run's saved config; refuse command-line values that
    contradict it. Returns the training record written into results.json."""
    data = run.cfg.data
    record = {"run": str(run.run_dir), "checkpoint": str(run.step_dir), "step": run.step, "weights": run.weights,
              "method": run.cfg.method, "config_name": run.cfg.name, "preset": run.cfg.preset_applied}
    if not hasattr(data, "setting"):
        return record
    same_data = _same_dataset(run, ds)
    # what the model was trained with; the fold protocol binds only on the training dataset itself
    own = {"setting": data.setting, "exclusion": data.exclusion}
    if same_data:
        own.update({"protocol": data.protocol, "supp_idx": data.supp_idx if data.protocol == "legacy" else None})
    clash = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run has {v!r})"
             for k, v in own.items() if v is not None and getattr(args, k) is not None and getattr(args, k) != v]
    if same_data and args.support_case is None and args.folds is not None and list(args.folds) != [data.fold]:
        clash.append(f"--folds {' '.join(map(str, args.folds))} (the run was trained on fold {data.fold} of this "
                     "dataset: the other folds' queries were training cases)")
    if clash:
        raise ValueError(f"{run.run_dir / 'config.yaml'} contradicts " + "; ".join(clash))
    for k, v in {**own, "support_mode": run.cfg.eval.support}.items():
        if getattr(args, k) is None and v is not None:
            setattr(args, k, v)
    if same_data and args.folds is None and args.support_case is None:
        args.folds = [data.fold]
    record.update({"setting": data.setting, "exclusion": data.exclusion, "labels": data.labels,
                   "folds_protocol": data.protocol, "supp_idx": data.supp_idx, "fold": data.fold,
                   "train_data": str(data.root), "same_dataset": same_data})
    if data.labels == "label":
        # GT-label training: the test classes the episodes used as labels (data.test_group keeps the
        # others in the pool); by default only the held-out ones are scored, and a score on a class
        # trained on is recorded as a leak
        from fsmis.data.episodes import label_pool

        group = getattr(data, "test_group", None)
        ids = getattr(data, "test_group_ids", "names")
        pool = set(label_pool(ds.name, ds.classes, ds.test_classes, group, ids))
        trained = [c for c in ds.test_classes if ds.classes[c] in pool]
        if args.classes is None and trained:
            args.classes = [c for c in ds.test_classes if c not in trained]
        scored = args.classes or list(ds.test_classes)
        leak = [c for c in scored if c in trained]
        record.update({"test_group": group, "test_group_ids": ids, "trained_on_test_classes": trained, "leak": leak})
        if leak:
            print(f"warning: the model trained on {', '.join(leak)} as episode labels (data.labels=label, "
                  f"test_group {group}); scoring them leaks (recorded as training.leak in results.json)",
                  file=sys.stderr)
    return record


def _same_dataset(run, ds) -> bool:
    """Whether the run trained on the dataset being evaluated: the same image folder, or the same
    dataset name and cases (RUN/data.json; else the run's data.root, resolved from here)."""
    ident = run.data_identity
    here = Path(ds.image_dir).resolve()
    if ident is not None:
        return Path(ident["image_dir"]) == here or (ident["name"] == ds.name and ident["cases"] == list(ds.case_ids))
    root = run.cfg.data.root
    if root is None:
        return False
    try:
        from fsmis.data.datasets import open_dataset

        return Path(open_dataset(root).image_dir).resolve() == here
    except Exception:
        return False


def write_figures(ds, predictor, results, folder: Path) -> list:
    """One overlay panel per fold: for each class, the middle slice of the first query case."""
    from fsmis.data.normalize import normalize_volume
    from fsmis.evaluation.figures import example_rows, overlay_panel

    written = []
    for f in results["folds"]:
        rows = example_rows(ds, predictor, f, results["protocol"]["test_classes"], normalize_volume)
        if rows:
            name = "explicit" if f["fold"] is None else f"fold{f['fold']}"
            written.append(overlay_panel(rows, folder / f"{name}.png",
                                         f"{predictor.name} on {ds.name}, {name}, support {f['support']}"))
    return written


class PredictionWriter:
    """Collects the scored per-class predictions and writes, per (fold, query case), one binary mask
    per class and one label map, on the query file's own grid."""

    def __init__(self, dataset, folder: Path):
        self.ds = dataset
        self.folder = Path(folder)
        self.masks: dict = {}

    def __call__(self, fold, case, cls, mask):
        self.masks.setdefault((fold, case), {})[cls] = mask.copy()

    def flush(self) -> list[Path]:
        import numpy as np

        from fsmis.data.nifti import save_like

        written = []
        for (fold, case), per_class in self.masks.items():
            sub = self.folder / ("explicit" if fold is None else f"fold{fold}")
            vol = self.ds.load_case(case).image_volume
            label_map = None
            for cls, mask in per_class.items():
                written.append(save_like(mask.astype(np.uint8), vol, sub / f"pred_{case}_{cls}.nii.gz", dtype=np.uint8))
                if label_map is None:
                    label_map = np.zeros(mask.shape, dtype=np.int16)
                label_map[mask] = self.ds.class_id(cls)
            written.append(save_like(label_map, vol, sub / f"pred_{case}.nii.gz", dtype=np.int16))
        return written


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
