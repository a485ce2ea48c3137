"""Result files: ``results.json`` (schema ``fsmis-results/1``, see README), ``results.csv``
(one row per fold × query × class) and ``results.md`` (tables for a paper). All written
atomically: a crash never leaves a half-written file."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..atomic import atomic_write_json, atomic_write_text  # noqa: F401  (re-exported)


def _fmt(v, scale=100.0, digits=2):
    return "–" if v is None else f"{v * scale:.{digits}f}"


def results_csv(results: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["fold", "support", "query", "class", "dice", "hd95_mm", "asd_mm", "tp", "fp", "fn"])
    for f in results["folds"]:
        for cls, vols in f["per_volume"].items():
            for case, d in vols.items():
                c = f["counts"][cls][case]
                hd = f["hd95_mm"][cls][case]
                asd = f["asd_mm"][cls][case]
                w.writerow([f["fold"], f["support"], case, cls, f"{d:.6f}",
                            "" if hd is None else f"{hd:.3f}", "" if asd is None else f"{asd:.3f}",
                            c["tp"], c["fp"], c["fn"]])
    return buf.getvalue()


def protocol_line(results: dict) -> str:
    p = results["protocol"]
    fold = p["folds"] + (f" (supp_idx {p['supp_idx']})" if p["folds"] == "legacy" else "")
    if p.get("support_case") is not None:
        fold = f"explicit support {p['support_case']}"
    return (f"folds {fold}, EP1 n_part {p['n_part']}, chunking {p['chunking']}, support {p['support']}, "
            f"Dice {p['dice']} (3D, averaged over volumes then folds), setting {p['setting']} "
            f"(exclusion {p['exclusion']}), normalization {p['normalization']}"
            + (f", synthetic support {p['synthetic_support']} generated variant(s) per support slice"
               if p.get("synthetic_support") else "")
            + (f", supports generated from the masks of {p['support_from_mask']} (no annotated support image)"
               if p.get("support_from_mask") else ""))


def results_markdown(results: dict, title: str | None = None) -> str:
    classes = list(results["per_class"])
    name = results["method"]["method"]
    ds = results["dataset"]["name"]
    lines = [f"## {title or f'{name} on {ds}'}", "", f"Protocol: {protocol_line(results)}.", ""]
    lines.append("| fold | support | " + " | ".join(classes) + " | mean |")
    lines.append("|---|---|" + "---|" * (len(classes) + 1))
    key_pc = "per_class" if results["protocol"]["dice"] == "per_volume" else "per_class_pooled"
    key_m = "mean_dice" if results["protocol"]["dice"] == "per_volume" else "mean_dice_pooled"
    for f in results["folds"]:
        lines.append(f"| {f['fold'] if f['fold'] is not None else '–'} | {f['support']} | "
                     + " | ".join(_fmt(f[key_pc][c]) for c in classes) + f" | {_fmt(f[key_m])} |")
    mean = results["mean_dice"]
    std = results["std_dice"]
    lines.append("| **all** | | " + " | ".join(f"**{_fmt(results['per_class'][c])}**" for c in classes)
                 + f" | **{_fmt(mean)}** ± {_fmt(std)} |")
    lines += ["", "Dice in %, mean over folds (± std over folds). "
              f"Pooled Dice: {_fmt(results['mean_dice_pooled'])}; per-volume Dice: "
              f"{_fmt(results['mean_dice_per_volume'])}.", ""]
    if any(v is not None for v in results["hd95_mm"].values()):
        lines.append("| | " + " | ".join(classes) + " |")
        lines.append("|---|" + "---|" * len(classes))
        lines.append("| HD95 (mm) | " + " | ".join(_fmt(results["hd95_mm"][c], 1, 1) for c in classes) + " |")
        lines.append("| ASD (mm) | " + " | ".join(_fmt(results["asd_mm"][c], 1, 2) for c in classes) + " |")
        if results.get("surface_undefined_volumes"):
            lines.append(f"\n{results['surface_undefined_volumes']} volume(s) with an empty prediction have no "
                         "surface distance and are left out of HD95/ASD means.")
        lines.append("")
    if "hd95_px_2d_released" in results:
        lines.append("| released per-slice metrics (pixels) | " + " | ".join(classes) + " |")
        lines.append("|---|" + "---|" * len(classes))
        lines.append("| HD95 (px, 2D, released) | " + " | ".join(_fmt(results["hd95_px_2d_released"][c], 1, 1)
                                                         for c in classes) + " |")
        lines.append("| ASSD (px, 2D, released) | " + " | ".join(_fmt(results["assd_px_2d_released"][c], 1, 2)
                                                          for c in classes) + " |")
        lines += ["", "The released script's distances: per 2D slice in pixels (HD95 over region pixels, ASSD as "
                      "medpy), slices with an empty prediction or ground truth left out; not comparable with the "
                      "3D distances in mm.", ""]
    return "\n".join(lines)


def write_results(results: dict, out_dir: str | Path, title: str | None = None) -> list[Path]:
    out = Path(out_dir)
    return [
        atomic_write_json(out / "results.json", results),
        atomic_write_text(out / "results.csv", results_csv(results)),
        atomic_write_text(out / "results.md", results_markdown(results, title) + "\n"),
    ]
