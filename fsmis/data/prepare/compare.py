"""Compare two prepared dataset folders case by case (``tools/compare_datasets.py``).

"Is my preparation the same data as the archive I downloaded?": per case id in both folders,
shape, spacing, orientation, the intensity correlation (blind to another normalisation) and
the Dice of every class the folders share by NAME. A case stored on another voxel grid is
resampled onto A's grid through the affines; only voxels of A inside B count (``grid``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

from ..datasets import open_dataset
from ..nifti import load_volume
from ...evaluation.metrics import dice as metrics_dice


@dataclass
class CaseComparison:
    case: str
    shape_a: tuple
    shape_b: tuple
    spacing_a: tuple
    spacing_b: tuple
    orientation_a: str
    orientation_b: str
    grid: str  # "same" | "resampled B onto A"
    overlap: float  # fraction of A's voxels inside B's field of view
    correlation: float | None
    dice: dict = field(default_factory=dict)  # class name -> Dice (None: absent from both)

    def as_dict(self) -> dict:
        return {
            "case": self.case, "shape_a": list(self.shape_a), "shape_b": list(self.shape_b),
            "spacing_a": [round(s, 4) for s in self.spacing_a], "spacing_b": [round(s, 4) for s in self.spacing_b],
            "orientation_a": self.orientation_a, "orientation_b": self.orientation_b, "grid": self.grid,
            "overlap": round(self.overlap, 4),
            "correlation": None if self.correlation is None else round(self.correlation, 6),
            "dice": {k: None if v is None else round(v, 6) for k, v in self.dice.items()},
        }


def _b_on_a_grid(vol_a, vol_b, order: int, cval: float):
    """B's ``[Z, Y, X]`` array sampled at A's voxel centres (through the affines)."""
    m = np.linalg.inv(vol_b.stored_affine) @ vol_a.stored_affine  # A voxel (i, j, k) -> B voxel
    rot = m[:3, :3][::-1, ::-1]  # the same map on (z, y, x) indices
    off = m[:3, 3][::-1]
    if vol_a.shape == vol_b.shape and np.allclose(rot, np.eye(3), atol=1e-6) and np.allclose(off, 0, atol=1e-4):
        return vol_b.array, True
    out = ndi.affine_transform(np.asarray(vol_b.array, np.float64), rot, off, output_shape=vol_a.shape,
                               order=order, mode="constant", cval=cval)
    return out, False


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """The one Dice (fsmis.evaluation.metrics); two empty masks -> None."""
    return metrics_dice(a, b, empty=None)


def compare_case(ds_a, ds_b, case_id: str, classes: list) -> CaseComparison:
    # each file on its own stored grid: the affines relate them, whatever the two datasets' layouts
    ia = load_volume(ds_a.image_path(case_id))
    ib = load_volume(ds_b.image_path(case_id))
    la = load_volume(ds_a.label_path(case_id), role="label")
    lb = load_volume(ds_b.label_path(case_id), role="label")
    img_b, same = _b_on_a_grid(ia, ib, 1, np.nan)
    lab_b, _ = _b_on_a_grid(ia, lb, 0, -1)
    valid = np.isfinite(img_b) if not same else np.ones(ia.shape, bool)
    overlap = float(valid.mean())
    corr = None
    if valid.sum() > 1:
        x = ia.array[valid].astype(np.float64)
        y = np.asarray(img_b[valid], np.float64)
        if x.std() > 0 and y.std() > 0:
            corr = float(np.corrcoef(x, y)[0, 1])
    dices = {}
    for name in classes:
        ma = (la.array == ds_a.classes[name]) & valid
        mb = (np.rint(lab_b).astype(np.int64) == ds_b.classes[name]) & valid
        dices[name] = dice(ma, mb)
    return CaseComparison(case_id, ia.shape, ib.shape, ia.spacing, ib.spacing,
                          "".join(ia.layout.stored_codes), "".join(ib.layout.stored_codes),
                          "same" if same else "resampled B onto A", overlap, corr, dices)


def compare_datasets(a, b, cases=None, progress: bool = False) -> dict:
    """Compare folders ``a`` and ``b`` (any root :func:`open_dataset` accepts). Returns a dict:
    ``cases`` (rows of :class:`CaseComparison`), ``only_in_a``, ``only_in_b``, ``classes``
    (compared, by name), ``classes_only_in_a/b``, ``summary`` (worst and mean per measure)."""
    ds_a, ds_b = open_dataset(a, cache=False), open_dataset(b, cache=False)
    ids_a, ids_b = list(ds_a.case_ids), list(ds_b.case_ids)
    common = [c for c in ids_a if c in set(ids_b)]
    if cases:
        wanted = [str(c) for c in cases]
        common = [c for c in common if c in wanted]
    classes = [n for n in ds_a.classes if n in ds_b.classes]
    it = common
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(common, desc="compare", unit="case")
    rows = [compare_case(ds_a, ds_b, cid, classes) for cid in it]
    corrs = [r.correlation for r in rows if r.correlation is not None]
    dices = [d for r in rows for d in r.dice.values() if d is not None]
    return {
        "a": str(ds_a.image_dir), "b": str(ds_b.image_dir),
        "classes": classes,
        "classes_only_in_a": [n for n in ds_a.classes if n not in ds_b.classes],
        "classes_only_in_b": [n for n in ds_b.classes if n not in ds_a.classes],
        "only_in_a": [c for c in ids_a if c not in set(ids_b)],
        "only_in_b": [c for c in ids_b if c not in set(ids_a)],
        "cases": [r.as_dict() for r in rows],
        "summary": {
            "n_compared": len(rows),
            "same_shape": sum(r.shape_a == r.shape_b for r in rows),
            "same_spacing": sum(bool(np.allclose(r.spacing_a, r.spacing_b, rtol=1e-3)) for r in rows),
            "min_correlation": min(corrs) if corrs else None,
            "mean_correlation": float(np.mean(corrs)) if corrs else None,
            "min_dice": min(dices) if dices else None,
            "mean_dice": float(np.mean(dices)) if dices else None,
        },
    }


def format_comparison(result: dict) -> str:
    """A plain-text table of :func:`compare_datasets`' result."""
    classes = result["classes"]
    head = ["case", "shape A", "shape B", "spacing A", "spacing B", "orient.", "grid", "corr"] + classes
    rows = []
    for r in result["cases"]:
        rows.append([
            r["case"], "x".join(map(str, r["shape_a"])), "x".join(map(str, r["shape_b"])),
            "x".join(f"{s:g}" for s in r["spacing_a"]), "x".join(f"{s:g}" for s in r["spacing_b"]),
            f"{r['orientation_a']}/{r['orientation_b']}", "same" if r["grid"] == "same" else "resampled",
            "-" if r["correlation"] is None else f"{r['correlation']:.4f}",
        ] + ["-" if r["dice"][c] is None else f"{r['dice'][c]:.4f}" for c in classes])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)] if rows else [len(h) for h in head]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [head] + rows]
    s = result["summary"]
    lines.append("")
    lines.append(f"{s['n_compared']} case(s) compared: same shape {s['same_shape']}, same spacing {s['same_spacing']}; "
                 f"correlation min {_f(s['min_correlation'])} mean {_f(s['mean_correlation'])}; "
                 f"Dice min {_f(s['min_dice'])} mean {_f(s['mean_dice'])}")
    if result["only_in_a"]:
        lines.append(f"only in A: {', '.join(result['only_in_a'])}")
    if result["only_in_b"]:
        lines.append(f"only in B: {', '.join(result['only_in_b'])}")
    if result["classes_only_in_a"] or result["classes_only_in_b"]:
        lines.append(f"classes not compared (names differ): A {result['classes_only_in_a']}, "
                     f"B {result['classes_only_in_b']}")
    return "\n".join(lines)


def _f(v):
    return "-" if v is None else f"{v:.4f}"


__all__ = ["compare_datasets", "compare_case", "format_comparison", "CaseComparison", "dice"]
