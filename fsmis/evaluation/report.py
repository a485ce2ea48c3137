"""One comparison table from several results files (``tools/report.py``).

Each row is one results.json of the evaluator (any method). Its **protocol fingerprint** is a short
hash of everything that decides what a number means: the protocol block of the results (fold
protocol, support index, folds evaluated, chunking, support, Dice averaging, setting, exclusion,
test classes, explicit support / query cases, synthetic or mask-generated supports) and the dataset
(name, modality, number of cases, test classes). Left out: the results format ``version`` and the
method's own input ``normalization`` (a property of the method, recorded in its row), and which
extra distance columns were computed (``surface_metrics``, ``released_slice_metrics``). Rows are
ranked only against rows of the same fingerprint; rows under another protocol are marked, and the
keys in which they differ are listed under the table.

Per class: the mean Dice over the evaluated folds (the evaluator's reported number) ± the standard
deviation over folds (population std, as ``std_dice``; "–" for one fold).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FINGERPRINT_IGNORED = ("version", "normalization", "surface_metrics", "released_slice_metrics")
PROTOCOL_DEFAULTS = {"synthetic_support": 0, "support_from_mask": None, "preset": None}  # results written before these existed


class ReportError(ValueError):
    """A results file that cannot be read or compared (the message names it)."""


def load_results(path) -> tuple[Path, dict]:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise ReportError(f"{p}: no such results file (give a results.json or a folder holding one)")
    try:
        res = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{p}: not a readable results.json ({exc})") from None
    for key in ("protocol", "per_class", "mean_dice", "folds", "dataset"):
        if key not in res:
            raise ReportError(f"{p}: not an evaluator results file (no {key!r}; written by test.py or the demo tools)")
    return p, res


def protocol_identity(res: dict) -> dict:
    """What a result's number means, as a dict (see the module docstring)."""
    proto = {**PROTOCOL_DEFAULTS, **{k: v for k, v in res["protocol"].items() if k not in FINGERPRINT_IGNORED}}
    ds = res.get("dataset", {})
    return {"protocol": proto, "dataset": {k: ds.get(k) for k in ("name", "modality", "n_cases", "test_classes")}}


def fingerprint(res: dict) -> str:
    blob = json.dumps(protocol_identity(res), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differing_keys(a: dict, b: dict) -> list[str]:
    fa, fb = _flat(protocol_identity(a)), _flat(protocol_identity(b))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def row_label(res: dict, path: Path) -> str:
    m = res.get("method", {}) or {}
    name = m.get("method") or "?"
    extra = m.get("config_name")
    return f"{name} ({extra})" if extra and extra != name else name


def per_class_stats(res: dict) -> dict:
    """class -> (mean over folds, std over folds or None)."""
    out = {}
    for c in res["protocol"]["test_classes"]:
        vals = [f["per_class"][c] for f in res["folds"] if c in f.get("per_class", {})
                and f["per_class"][c] is not None]
        mean = res["per_class"].get(c)
        out[c] = (mean, float(np.std(vals)) if len(vals) > 1 else None)
    return out


def build_report(paths, labels=None) -> dict:
    """The comparison of the results files ``paths`` (rows in the given order)."""
    rows = []
    for i, path in enumerate(paths):
        p, res = load_results(path)
        label = labels[i] if labels and i < len(labels) else row_label(res, p)
        rows.append({"label": label, "path": str(p), "fingerprint": fingerprint(res), "results": res})
    names = [r["label"] for r in rows]
    for r in rows:  # same labels: tell them apart by their folder
        if names.count(r["label"]) > 1:
            r["label"] = f"{r['label']} [{Path(r['path']).parent.name}]"
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["fingerprint"], []).append(i)
    letters = {fp: chr(ord("A") + k) for k, fp in enumerate(groups)}
    for fp, idx in groups.items():
        order = sorted(idx, key=lambda i: -rows[i]["results"]["mean_dice"])
        for rank, i in enumerate(order, 1):
            rows[i]["rank"] = rank if len(idx) > 1 else None
            rows[i]["protocol"] = letters[fp]
    ref = rows[0]["results"] if rows else None
    legend = []
    for fp, idx in groups.items():
        res = rows[idx[0]]["results"]
        diff = differing_keys(ref, res) if res is not ref else []
        legend.append({"protocol": letters[fp], "fingerprint": fp, "rows": len(idx),
                       "differs_from_A": diff, "identity": protocol_identity(res)})
    classes = []
    for r in rows:
        for c in r["results"]["protocol"]["test_classes"]:
            if c not in classes:
                classes.append(c)
    return {"rows": rows, "classes": classes, "protocols": legend}


def _pct(v):
    return "–" if v is None else f"{100 * v:.2f}"


def markdown(report: dict) -> str:
    classes, rows = report["classes"], report["rows"]
    mixed = len(report["protocols"]) > 1
    head = "| rank | method | " + " | ".join(classes) + " | mean Dice | protocol |"
    lines = [head, "|---|---|" + "---|" * (len(classes) + 2)]
    for r in rows:
        st = per_class_stats(r["results"])
        cells = []
        for c in classes:
            if c not in st:
                cells.append("n/a")
                continue
            mean, std = st[c]
            cells.append(_pct(mean) + ("" if std is None else f" ± {100 * std:.2f}"))
        res = r["results"]
        std = res.get("std_dice")
        mean = _pct(res["mean_dice"]) + ("" if not std or len(res["folds"]) < 2 else f" ± {100 * std:.2f}")
        rank = "–" if r["rank"] is None else str(r["rank"])
        mark = f"{r['protocol']} `{r['fingerprint']}`" + (" **≠**" if mixed and r["protocol"] != "A" else "")
        lines.append(f"| {rank} | {r['label']} | " + " | ".join(cells) + f" | {mean} | {mark} |")
    lines += ["", "Dice (%) per class: mean over the evaluated folds ± std over folds; rank within rows of the same "
                  "protocol only."]
    for g in report["protocols"]:
        ident = g["identity"]
        p = ident["protocol"]
        desc = (f"{ident['dataset']['name']} ({ident['dataset']['n_cases']} cases), {p.get('folds')} folds "
                f"{p.get('folds_evaluated')}, supp_idx {p.get('supp_idx')}, {p.get('support')}, chunking "
                f"{p.get('chunking')}, Dice {p.get('dice')}, Setting {p.get('setting')} ({p.get('exclusion')})"
                + (f", synthetic support {p['synthetic_support']}" if p.get("synthetic_support") else "")
                + (f", supports generated from the masks of {p['support_from_mask']}" if p.get("support_from_mask") else ""))
        line = f"- protocol {g['protocol']} (`{g['fingerprint']}`, {g['rows']} row(s)): {desc}"
        if g["differs_from_A"]:
            line += (". **Not comparable with protocol A**; differs in: " + ", ".join(g["differs_from_A"]))
        lines.append(line)
    return "\n".join(lines)


def csv_text(report: dict) -> str:
    import csv
    import io

    classes = report["classes"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "method", "protocol", "fingerprint", *[f"{c}_dice" for c in classes],
                *[f"{c}_std" for c in classes], "mean_dice", "std_dice", "folds", "results"])
    for r in report["rows"]:
        st = per_class_stats(r["results"])
        res = r["results"]
        w.writerow([r["rank"] if r["rank"] is not None else "", r["label"], r["protocol"], r["fingerprint"],
                    *[st.get(c, (None, None))[0] if st.get(c, (None,))[0] is not None else "" for c in classes],
                    *[st.get(c, (None, None))[1] if st.get(c, (None, None))[1] is not None else "" for c in classes],
                    res["mean_dice"], res.get("std_dice", ""), len(res["folds"]), r["path"]])
    return buf.getvalue()


def bar_chart(report: dict, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import save_figure

    classes, rows = report["classes"], report["rows"]
    groups = [*classes, "mean"]
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) * max(1, len(rows)) ** 0.5 + 2), 4))
    for k, r in enumerate(rows):
        st = per_class_stats(r["results"])
        vals = [100 * st[c][0] if c in st and st[c][0] is not None else np.nan for c in classes]
        errs = [100 * st[c][1] if c in st and st[c][1] is not None else 0.0 for c in classes]
        vals.append(100 * r["results"]["mean_dice"])
        errs.append(100 * (r["results"].get("std_dice") or 0.0) if len(r["results"]["folds"]) > 1 else 0.0)
        ax.bar(x - 0.4 + (k + 0.5) * width, vals, width, yerr=errs, capsize=2,
               label=f"{r['label']} [{r['protocol']}]", hatch=None if r["protocol"] == "A" else "//")
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title or "per-class Dice (hatched: another protocol than A)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def check_out_folder(out, inputs, marker: str) -> None:
    """Refuse, before any work, an output folder that would overwrite an input or a foreign folder:
    ``out`` may be new, empty, or an earlier output of the same tool (it holds ``marker``; it is then
    replaced as a whole); it must not be or hold any of ``inputs``, nor lie inside an input folder."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file; give a folder")
    for i in inputs:
        src = Path(i).resolve()
        # replacing OUT would delete an input inside it; writing into an input folder would mix outputs in it
        if src == out or out in src.parents or (src.is_dir() and src in out.parents):
            raise ReportError(f"--out {out} is, holds or lies inside the input folder {src}: choose another folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise ReportError(f"--out {out} holds other files and no {marker}: it would be replaced; choose a new or "
                          "empty folder")


def write_report(report: dict, out, title: str = "Comparison") -> list[Path]:
    """OUT/report.md, OUT/report.csv, OUT/report.json (rows without the full results) and
    OUT/report.png, written as one folder: OUT is complete or as it was."""
    from ..atomic import atomic_directory

    final = Path(out)
    with atomic_directory(final) as out:
        _write_report_files(report, out, title)
    return [final / "report.md", final / "report.csv", final / "report.json", final / "report.png"]


def _write_report_files(report: dict, out: Path, title: str) -> None:
    from ..atomic import atomic_write_json, atomic_write_text

    png = bar_chart(report, out / "report.png", title)
    md = f"# {title}\n\n" + markdown(report) + f"\n\n![per-class Dice]({png.name})\n"
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.csv", csv_text(report))
    atomic_write_json(out / "report.json", {
        "classes": report["classes"], "protocols": report["protocols"],
        "rows": [{k: v for k, v in r.items() if k != "results"} | {
            "mean_dice": r["results"]["mean_dice"], "std_dice": r["results"].get("std_dice"),
            "per_class": {c: {"mean": m, "std": s} for c, (m, s) in per_class_stats(r["results"]).items()},
            "method": r["results"].get("method")} for r in report["rows"]]})


__all__ = ["build_report", "write_report", "check_out_folder", "markdown", "csv_text", "bar_chart", "fingerprint", "protocol_identity",
           "differing_keys", "ReportError", "load_results"]
