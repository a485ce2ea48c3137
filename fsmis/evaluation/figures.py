"""Overlay panels (support, query, prediction, ground truth) for reports."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_target


def save_figure(fig, path, dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically as PNG and close it (the one figure writer of reports)."""
    import matplotlib.pyplot as plt

    try:
        with atomic_target(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def _contour(ax, mask, color):
    if mask is not None and np.any(mask):
        ax.contour(np.asarray(mask, float), levels=[0.5], colors=[color], linewidths=1.2)


def overlay_panel(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """One row per example: dict(support=img, support_mask=m, query=img, pred=m, gt=m, label=str).

    Columns: support with its mask (green), query with prediction (red) and ground truth
    (yellow), prediction alone, ground truth alone. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n), squeeze=False)
    for r, row in enumerate(rows):
        ax = axes[r]
        ax[0].imshow(row["support"], cmap="gray")
        _contour(ax[0], row["support_mask"], "lime")
        ax[1].imshow(row["query"], cmap="gray")
        _contour(ax[1], row["gt"], "yellow")
        _contour(ax[1], row["pred"], "red")
        ax[2].imshow(row["pred"], cmap="magma", vmin=0, vmax=1)
        ax[3].imshow(row["gt"], cmap="magma", vmin=0, vmax=1)
        for a, t in zip(ax, ("support + mask", "query: pred (red), GT (yellow)", "prediction", "ground truth")):
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title(t, fontsize=8)
        ax[0].set_ylabel(row.get("label", ""), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)


def example_rows(dataset, predictor, fold_result: dict, classes, normalize) -> list[dict]:
    """One example per class from a fold of a results object: the middle query slice of the
    first query case, predicted again with its paired support slice."""
    from .protocol import ep1_chunks

    rows = []
    sup_id = fold_result["support"]
    sup = dataset.load_case(sup_id)
    sup_img = normalize(sup.image, predictor.normalization)
    for cls in classes:
        if cls not in fold_result["support_slices"] or not fold_result["queries"]:
            continue
        cid = dataset.class_id(cls)
        q_id = fold_result["queries"][0]
        q = dataset.load_case(q_id)
        q_slices = dataset.class_slices(q_id, cls)
        if len(q_slices) == 0:
            continue
        chunks = ep1_chunks(q_slices, len(fold_result["support_slices"][cls]))
        part = max(range(len(chunks)), key=lambda i: len(chunks[i]))
        zs = chunks[part]
        z = int(zs[len(zs) // 2])
        s = fold_result["support_slices"][cls][part]
        s_mask = (sup.label[s] == cid).astype(np.float32)
        q_img = normalize(q.image, predictor.normalization)
        pred = np.asarray(predictor.predict(sup_img[s:s + 1], s_mask[None], q_img[z:z + 1]))[0]
        rows.append({"support": sup.image[s], "support_mask": s_mask, "query": q.image[z],
                     "pred": (pred > 0.5).astype(float), "gt": (q.label[z] == cid).astype(float),
                     "label": f"{cls}\nsupport {sup_id}:{s} query {q_id}:{z}"})
    return rows


def validation_curve(curves: dict[str, list[dict]], path: str | Path, title: str | None = None,
                     baseline: float | None = None, baseline_label: str = "support-copy") -> Path:
    """Validation Dice against training step, one line per run: ``curves`` maps a label to a
    training history (``[{"step": s, "val_dice": d}, ...]``, as in ``train_summary.json``).
    An optional horizontal ``baseline`` (a Dice in [0, 1]) is drawn dashed. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for label, history in curves.items():
        pts = [(h["step"], h["val_dice"]) for h in history if h.get("val_dice") is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    if baseline is not None:
        ax.axhline(baseline, ls="--", c="gray", lw=1, label=baseline_label)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if curves or baseline is not None:
        ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
