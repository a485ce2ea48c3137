#!/usr/bin/env python
"""The utility table of the generative branch: each use of synthetic data against the same model
without it, over the same training seeds, from `tools/seeds.py` outputs.

  python tools/genaug_utility.py --base runs/util_base \\
      --arm "synthetic episodes, no filter=runs/util_genaug_nof" \\
      --arm "synthetic episodes, default filters=runs/util_genaug_f" --out docs/measurements/genaug_utility

--base: a seeds.py folder (or its seeds.json) of the model without synthetic data, scored with
--synthetic-support M and --mask-support (its test-time variants become rows); each --arm: a
seeds.py folder trained with synthetic episodes (same config, seeds and step count; the overrides
recorded in its seeds.json must differ from the base's only in genaug.* keys, else it is refused).

A sweep that ran in parts (some seeds in one seeds.py folder, the rest in another) is one input:
give --base several times, or an arm as NAME=DIR,DIR,... (or the same NAME several times). The
parts' seeds are merged; parts must agree on the config, the initialisation, the overrides
(genaug.data aside: each part names its own copy of the synthetic folder), the test-time variants
and support-copy's numbers (the same data), and a seed may appear in one part only.
Per seed: in-domain / cross-domain mean Dice; per row: median and range over the seeds, and on how
many seeds the row beats the base model (paired by seed). Only seeds present in every input are
used, and the table says which.

Writes OUT/utility.md, OUT/utility.json and OUT/utility.png (medians with ranges), as one folder;
--out must be a new or empty folder or an earlier utility table, never an input's folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


PHANTOM_SPLITS = {"in_domain": "phantom CT fold 0", "cross_domain": "CT -> MR, 5 folds"}  # sweeps before splits were recorded


def _load(path: str) -> tuple[Path, dict]:
    p = Path(path)
    p = p / "seeds.json" if p.is_dir() else p
    if not p.is_file():
        raise ValueError(f"{p}: no seeds.json (a tools/seeds.py output folder)")
    return p, json.loads(p.read_text(encoding="utf-8"))


def _non_genaug(overrides) -> list[str]:
    return sorted(o for o in overrides or [] if not str(o).startswith("genaug."))


def _recipe(overrides) -> list[str]:
    """The overrides that decide the training recipe: all but the synthetic folder's path."""
    return sorted(o for o in overrides or [] if not str(o).startswith("genaug.data="))


def _sc_means(d: dict) -> list:
    sc = d.get("support_copy", {})
    mask = sc.get("variants", {}).get("mask_support", {}).get("cross_domain", {}).get("mean")
    return [sc.get("in_domain", {}).get("mean"), sc.get("cross_domain", {}).get("mean"), mask]


def _test_time(d: dict) -> dict:
    """The test-time variants a sweep scored (the generator paths aside: each part names its copy)."""
    return {k: v for k, v in (d.get("test_time") or {}).items() if not k.startswith("generator")}


def load_parts(paths: list[str]) -> tuple[str, dict]:
    """One input from one or more seeds.json (the parts of one sweep), merged; a label of its paths."""
    import math

    loaded = [_load(p) for p in paths]
    first_path, merged = loaded[0]
    merged = {**merged, "seeds": dict(merged["seeds"]), "parts": [str(first_path)]}
    for path, d in loaded[1:]:
        checks = {"dataset": (d.get("dataset", "phantom"), merged.get("dataset", "phantom")),
                  "config": (Path(str(d.get("config"))).name, Path(str(merged.get("config"))).name),
                  "init": (d.get("init"), merged.get("init")),
                  "overrides": (_recipe(d.get("overrides")), _recipe(merged.get("overrides"))),
                  "test-time variants": (_test_time(d), _test_time(merged))}
        for what, (a, b) in checks.items():
            if a != b:
                raise ValueError(f"{path} and {first_path} are not parts of one sweep: {what} differ ({a} vs {b})")
        if not all((x is None and y is None) or (x is not None and y is not None and math.isclose(x, y, abs_tol=1e-6))
                   for x, y in zip(_sc_means(d), _sc_means(merged))):
            raise ValueError(f"{path} and {first_path} are not parts of one sweep: support-copy's Dice differs "
                             f"({_sc_means(d)} vs {_sc_means(merged)}), so the data differ")
        twice = sorted(set(d["seeds"]) & set(merged["seeds"]), key=int)
        if twice:
            raise ValueError(f"{path}: seed(s) {', '.join(twice)} already given by another part of this input")
        merged["seeds"].update(d["seeds"])
        merged["parts"].append(str(path))
    return " + ".join(merged["parts"]), merged


def build(base: dict, arms: dict[str, dict]) -> dict:
    """{"seeds": [...], "rows": [{"name", "in": {seed: v}, "cross": {seed: v}}], "support_copy": {...}}."""
    seeds = set(base["seeds"])
    for a in arms.values():
        seeds &= set(a["seeds"])
    seeds = sorted(seeds, key=int)
    if not seeds:
        raise ValueError("no training seed is present in every input")

    def take(src, key=None, variant=None):
        out = {"in": {}, "cross": {}}
        for s in seeds:
            r = src["seeds"][s] if variant is None else src["seeds"][s].get("variants", {}).get(variant)
            if r is None:
                return None
            for split, short in (("in_domain", "in"), ("cross_domain", "cross")):
                if split in r:
                    out[short][s] = 100 * r[split]["mean"]
        return out

    rows = [{"name": "SD-FSMIS", **take(base)}]
    for name, arm in arms.items():
        rows.append({"name": f"SD-FSMIS + {name}", **take(arm)})
    v = take(base, variant="synthetic_support")
    if v is not None:
        m = base.get("test_time", {}).get("synthetic_support")
        rows.append({"name": f"SD-FSMIS + synthetic support (M = {m})", **v})
    v = take(base, variant="mask_support")
    if v is not None:
        rows.append({"name": "SD-FSMIS, supports generated from CT masks (no MR annotation)", **v})
    sc = base["support_copy"]
    return {"seeds": seeds, "rows": rows, "splits": base.get("splits", PHANTOM_SPLITS),
            "support_copy": {"in": 100 * sc["in_domain"]["mean"],
                             "cross": 100 * sc["cross_domain"]["mean"] if "cross_domain" in sc else None,
                             "cross_from_ct_masks": (100 * sc["variants"]["mask_support"]["cross_domain"]["mean"]
                                                     if "mask_support" in sc.get("variants", {}) else None)}}


def _stats(vals: dict):
    import numpy as np

    if not vals:
        return None
    v = sorted(vals.values())
    return {"median": float(np.median(v)), "min": v[0], "max": v[-1]}


def markdown(table: dict) -> str:
    seeds, rows = table["seeds"], table["rows"]
    base = rows[0]
    lines = ["| variant | " + " | ".join(f"seed {s}" for s in seeds)
             + " | in-domain median (range) | cross-domain median (range) | beats SD-FSMIS (in / cross) |",
             "|---|" + "---|" * (len(seeds) + 3)]

    def rng(st):
        return "–" if st is None else f"{st['median']:.2f} ({st['min']:.2f}-{st['max']:.2f})"

    for r in rows:
        cells = [(f"{r['in'][s]:.2f}" if s in r["in"] else "–") + " / " + (f"{r['cross'][s]:.2f}" if s in r["cross"] else "–")
                 for s in seeds]
        if r is base:
            wins = ""
        else:
            wi = sum(r["in"][s] > base["in"][s] for s in seeds if s in r["in"])
            wc = sum(r["cross"][s] > base["cross"][s] for s in seeds if s in r["cross"])
            wins = (f"{wi} of {len(seeds)}" if r["in"] else "–") + " / " + (f"{wc} of {len(seeds)}" if r["cross"] else "–")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {rng(_stats(r['in']))} | {rng(_stats(r['cross']))} | {wins} |")
    sc = table["support_copy"]
    blank = [""] * (len(seeds) + 2)  # one value per row: the method has no training seed

    def row(name, value):
        return "| " + " | ".join([name, value, *blank]) + " |"

    lines.append(row("support-copy", f"{sc['in']:.2f} / " + ("–" if sc["cross"] is None else f"{sc['cross']:.2f}")))
    if sc.get("cross_from_ct_masks") is not None:
        lines.append(row("support-copy of the CT masks", f"– / {sc['cross_from_ct_masks']:.2f}"))
    splits = table["splits"]
    lines += ["", f"Per seed: in-domain ({splits['in_domain']}) / cross-domain ({splits.get('cross_domain', 'none')}) "
                  "mean Dice (%), canonical "
                  f"protocol, EP1, per-volume 3D Dice; training seeds {', '.join(seeds)}; a row beats SD-FSMIS on a "
                  "seed when its Dice is higher than the plain model's of the same seed."]
    return "\n".join(lines)


def bar_chart(table: dict, path: Path) -> Path:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from fsmis.evaluation.figures import save_figure

    rows = table["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    for k, (key, label) in enumerate((("in", "in-domain"), ("cross", "cross-domain"))):
        st = [_stats(r[key]) for r in rows]
        med = [s["median"] if s else np.nan for s in st]
        err = np.array([[s["median"] - s["min"], s["max"] - s["median"]] if s else [0, 0] for s in st]).T
        ax.bar(x + (k - 0.5) * 0.38, med, 0.38, yerr=err, capsize=3, label=f"{label} (median, range)")
        if table["support_copy"][key] is not None:
            ax.axhline(table["support_copy"][key], ls="--", lw=0.8, color=f"C{k}")
    ax.set_xticks(x)
    ax.set_xticklabels([textwrap.fill(r["name"].replace("SD-FSMIS", "SD"), 20) for r in rows], fontsize=7)
    ax.set_ylabel("mean Dice (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(f"synthetic data on the demo SD-FSMIS, {table['splits']['in_domain']}, seeds {', '.join(table['seeds'])} "
                 "(dashed: support-copy)",
                 fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, action="append",
                   help="seeds.py folder of the model without synthetic data (repeat for the parts of one sweep)")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=DIR[,DIR...]",
                   help="a seeds.py folder trained with synthetic episodes (repeatable; several folders, or the "
                        "same NAME again, are the parts of one sweep)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)

    from fsmis.atomic import atomic_directory, atomic_write_json, atomic_write_text
    from fsmis.evaluation.report import check_out_folder

    try:
        arm_parts: dict[str, list[str]] = {}
        for spec in args.arm:
            if "=" not in spec:
                raise ValueError(f"--arm {spec!r}: expected NAME=DIR")
            name, paths = spec.split("=", 1)
            arm_parts.setdefault(name, []).extend(x for x in paths.split(",") if x)
        check_out_folder(args.out, [*args.base, *(x for v in arm_parts.values() for x in v)], "utility.json")
        base_path, base = load_parts(args.base)
        arms = {}
        for name, paths in arm_parts.items():
            arm_path, arm = load_parts(paths)
            if arm.get("dataset", "phantom") != base.get("dataset", "phantom"):
                raise ValueError(f"{arm_path}: a sweep on {arm.get('dataset', 'phantom')}, the base's is on "
                                 f"{base.get('dataset', 'phantom')}")
            if _non_genaug(arm.get("overrides")) != _non_genaug(base.get("overrides")) or arm.get("init") != base.get("init"):
                raise ValueError(f"{arm_path}: trained with other settings than {base_path} (overrides "
                                 f"{arm.get('overrides')} vs {base.get('overrides')}, init {arm.get('init')} vs "
                                 f"{base.get('init')}): only genaug.* keys may differ")
            arms[name] = arm
        table = build(base, arms)
    except (ValueError, KeyError) as exc:  # ReportError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    final = Path(args.out)
    md = markdown(table)
    with atomic_directory(final) as out:  # the folder is complete or as it was
        png = bar_chart(table, out / "utility.png")
        inputs = "\n".join([f"- SD-FSMIS: {base_path}", *(f"- {n}: {' + '.join(a['parts'])}"
                                                           for n, a in arms.items())])
        title = f"# Utility of synthetic data (demo SD-FSMIS, {table['splits']['in_domain']})"
        atomic_write_text(out / "utility.md", f"{title}\n\n{md}\n\n"
                                              f"![utility]({png.name})\n\nInputs (seeds.json):\n\n{inputs}\n")
        atomic_write_json(out / "utility.json", {**table, "base": base["parts"],
                                                 "arms": {n: {"overrides": a.get("overrides"), "parts": a["parts"]}
                                                          for n, a in arms.items()}})
    print(md)
    print(f"wrote {final / 'utility.md'}, {final / 'utility.json'} and {final / 'utility.png'}")
    return 0


if __name__ == "__main__":
    from fsmis.cli import run_tool

    sys.exit(run_tool(main))
