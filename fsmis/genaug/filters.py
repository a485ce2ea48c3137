"""Filters of a synthetic folder (docs/generative-augmentation.md, decision 5), each a switch:

- **agreement** (``min_dice`` = τ): a trained segmenter (an SD-FSMIS run), given the real source
  slice and its class mask as the 1-shot support, segments the synthetic slice; a slice is removed
  when the mean Dice over its classes (the test classes present in both the synthetic and the
  source label slice; :func:`fsmis.genaug.quality.agreement_rows`) is below τ. Slices without
  such a class cannot be judged and are kept (counted as ``not_judged``). ``support-copy`` is
  refused as this segmenter: it never looks at the synthetic image, so its Dice would measure
  the mask edit, not the image.
- **memorisation** (``no_memorised``): a slice flagged by :func:`fsmis.genaug.quality.memorisation`
  (nearest real slice SSIM above the real-vs-real 99th percentile) is removed. The flags of the
  folder's own ``quality.json`` (``tools/synthesize.py``, ``tools/synth_quality.py``) are used
  when it holds them for the same real folder and is newer than every image of the folder
  (:func:`saved_memorisation`); otherwise they are computed.
- **erosion** (``erode`` = n): every label and supervoxel region of every slice loses its n
  outer pixel rings in-plane (a pixel stays only if its 4 in-plane neighbours, n times over, hold
  the same id; outside the image counts as another id), which drops the boundary pixels where a
  generated image and its mask disagree most (MedDiff-FT).

A removed slice is listed in ``synthetic.excluded_slices`` of the output's dataset.json (the
training samplers never draw it, as Setting 2 removes slices); a case left with no slice is
dropped. :func:`filter_synthetic` writes the kept cases as a new folder in the same layout, with
``OUT/filter.json`` (settings, counts, and per slice the agreement Dice and nearest-real SSIM),
the same counts in ``synthetic.filter`` of its dataset.json (so a training that uses the folder
reports them in train_summary.json), atomically.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

FILTER_NAME = "filter.json"
# τ of --default-filters: None, the agreement filter is off unless asked for (--min-dice T). Measured
# with the demo segmenters (docs/measurements/genaug_utility.md): on the phantom τ 0.2 and 0.5 both
# lowered the median Dice against the same synthetic folder unfiltered, and on Card-MRI τ 0.5 removed
# every slice it could judge. Memorisation stays on.
DEFAULT_MIN_DICE: float | None = None


def default_filter_settings(min_dice: float | None = None) -> dict:
    """The keyword arguments of :func:`filter_synthetic` for ``--default-filters`` (memorisation, and
    agreement at ``min_dice`` when given, else at :data:`DEFAULT_MIN_DICE` when that is set)."""
    return {"min_dice": DEFAULT_MIN_DICE if min_dice is None else min_dice, "no_memorised": True}


def describe_settings(settings: dict) -> str:
    """One line naming the filters of a filter record's ``settings``."""
    parts = []
    if settings.get("min_dice") is not None:
        parts.append(f"agreement tau {settings['min_dice']:g}")
    if settings.get("no_memorised"):
        parts.append("memorisation")
    if settings.get("erode"):
        parts.append(f"erosion {settings['erode']} px")
    return ", ".join(parts) or "none"


class FilterError(ValueError):
    """Filter settings or folders that cannot be used (the message says which and why)."""


def erode_labels(volume: np.ndarray, n: int = 1) -> np.ndarray:
    """In-plane erosion of every id region of a label volume [Z, Y, X] by ``n`` pixels (4-neighbourhood;
    pixels at the image border count as next to another id). Id 0 stays 0."""
    out = np.asarray(volume).copy()
    for _ in range(int(n)):
        keep = out != 0
        pad = np.pad(out, ((0, 0), (1, 1), (1, 1)), mode="constant", constant_values=-1)
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            keep &= pad[:, dy:dy + out.shape[1], dx:dx + out.shape[2]] == out
        out = np.where(keep, out, 0).astype(volume.dtype)
    return out


def _save_label_like(array_zyx: np.ndarray, src_path: Path, case_volume, dst: Path) -> None:
    """``array_zyx`` (project order) written with ``src_path``'s stored dtype, grid and header."""
    import nibabel as nib

    from ..data.nifti import save_like

    dtype = np.asarray(nib.load(str(src_path)).dataobj).dtype
    save_like(array_zyx, case_volume, dst, dtype=dtype)


def saved_memorisation(pair) -> dict | None:
    """The memorisation section of the synthetic folder's quality.json when it can stand for a fresh
    computation: same real folder, same definition, and the file newer than every image and label
    of the folder. None otherwise."""
    from .quality import definitions
    from .synthesize import QUALITY_NAME

    syn = pair.synthetic
    path = Path(syn.image_dir) / QUALITY_NAME
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    mem = saved.get("memorisation") if isinstance(saved, dict) else None
    if (not isinstance(mem, dict) or saved.get("real") != str(Path(pair.real.image_dir).resolve())
            or (saved.get("definitions") or {}).get("memorisation") != definitions([])["memorisation"]
            or not {"flagged", "threshold", "slices", "nearest_ssim", "n_slices"} <= set(mem)):
        return None
    newest = max((f.stat().st_mtime for f in Path(syn.image_dir).glob("*.nii*")), default=0.0)
    if path.stat().st_mtime < newest:
        return None
    return mem


def filter_synthetic(data, real, out, min_dice: float | None = None, checkpoint=None, no_memorised: bool = False,
                     erode: int = 0, device=None, progress: bool = False, overwrite: bool = False) -> dict:
    """Filter the synthetic folder ``data`` (made from ``real``) into ``out``; returns the filter record
    (also ``OUT/filter.json``). See the module docstring."""
    from ..atomic import atomic_directory, atomic_write_json
    from .quality import _Bar, agreement_rows, memorisation, open_synthetic
    from .synthesize import check_out_folder

    t0 = time.perf_counter()
    if min_dice is not None and not 0.0 <= float(min_dice) <= 1.0:
        raise FilterError(f"min_dice must be a Dice fraction in [0, 1], got {min_dice}")
    if int(erode) < 0:
        raise FilterError(f"erode must be >= 0 pixels, got {erode}")
    if min_dice is not None and checkpoint is None:
        raise FilterError("the agreement filter (min_dice) needs a trained segmenter run (--checkpoint RUN): "
                          "support-copy never looks at the synthetic image")
    if min_dice is None and not no_memorised and int(erode) == 0:
        raise FilterError("no filter chosen: give --min-dice T (with --checkpoint RUN), --no-memorised, --erode N "
                          "or --default-filters")
    pair = open_synthetic(real, data)
    syn = pair.synthetic
    check_out_folder(out, [syn.input_root, syn.image_dir, syn.supervoxel_dir, pair.real.image_dir,
                           Path(checkpoint) if checkpoint else None], None, overwrite)
    out = Path(out)
    prior = {c: set(v) for c, v in syn.excluded_slices.items()}
    n_slices = {sid: int(syn.load_case(sid).image.shape[0]) for sid in syn.case_ids}
    removed = {"agreement": {}, "memorisation": {}}  # case -> set of z
    record: dict = {"input": str(Path(syn.image_dir).resolve()), "real": str(Path(pair.real.image_dir).resolve()),
                    "settings": {"min_dice": None if min_dice is None else float(min_dice),
                                 "checkpoint": None if checkpoint is None else str(Path(checkpoint).resolve()),
                                 "no_memorised": bool(no_memorised), "erode": int(erode)}}
    bar = _Bar(len(syn.case_ids) * (2 if min_dice is not None else 1) + (2 if no_memorised else 0), progress)
    try:
        if min_dice is not None:
            from ..methods.base import build_predictor

            predictor = build_predictor(None, checkpoint=str(checkpoint), device=device)
            rows = agreement_rows(pair, predictor, bar)
            per_slice: dict = {}
            for r in rows:
                per_slice.setdefault((r["case"], r["z"]), []).append(r["dice"])
            for (sid, z), ds in per_slice.items():
                if float(np.mean(ds)) < float(min_dice):
                    removed["agreement"].setdefault(sid, set()).add(z)
            judged = len(per_slice)
            record["agreement"] = {
                "segmenter": f"{predictor.name} (checkpoint {checkpoint})", "tau": float(min_dice),
                "judged_slices": judged, "not_judged_slices": int(sum(n_slices.values()) - judged),
                "removed_slices": int(sum(len(v) for v in removed["agreement"].values())),
                "per_slice": [{"case": sid, "z": z, "dice": float(np.mean(ds)), "classes": len(ds)}
                              for (sid, z), ds in sorted(per_slice.items(), key=lambda kv: (syn.case_ids.index(kv[0][0]),
                                                                                            kv[0][1]))]}
        if no_memorised:
            mem = saved_memorisation(pair)
            mem_from = "quality.json" if mem is not None else "computed"
            if mem is None:
                mem = memorisation(pair, bar=bar, device=device)
            else:
                bar.step("memorisation: from quality.json")
                bar.step("memorisation: from quality.json")
            for name in mem["flagged"]:
                sid, z = name.rsplit(":", 1)
                removed["memorisation"].setdefault(sid, set()).add(int(z))
            record["memorisation"] = {"from": mem_from, "threshold": mem["threshold"], "checked_slices": mem["n_slices"],
                                      "removed_slices": len(mem["flagged"]), "flagged": mem["flagged"],
                                      "nearest_ssim": dict(zip(mem["slices"], mem["nearest_ssim"]))}
        excluded, kept, dropped = {}, [], []
        for sid in syn.case_ids:
            gone = prior.get(sid, set()) | removed["agreement"].get(sid, set()) | removed["memorisation"].get(sid, set())
            if len(gone) >= n_slices[sid]:
                dropped.append(sid)
                continue
            kept.append(sid)
            if gone:
                excluded[sid] = sorted(gone)
        if not kept:
            raise FilterError(f"{syn.image_dir}: the filters removed every slice of every case; nothing to write "
                              f"({json.dumps({k: sum(len(v) for v in d.values()) for k, d in removed.items()})} slices "
                              "removed per filter)")
        sv_name = syn.supervoxel_dir.name if syn.supervoxel_dir is not None else None
        eroded = {"label_pixels": 0, "supervoxel_pixels": 0}
        with atomic_directory(out) as tmp:
            tmp = Path(tmp)
            if sv_name:
                (tmp / sv_name).mkdir()
            for sid in kept:
                ip = syn.image_path(sid)
                shutil.copy2(ip, tmp / ip.name)
                lp = syn.label_path(sid)
                sp = syn.supervoxel_path(sid) if sv_name else None
                if int(erode) > 0:
                    case = syn.load_case(sid, supervoxels=sv_name is not None)
                    lab = erode_labels(case.label, erode)
                    eroded["label_pixels"] += int(((case.label != 0) & (lab == 0)).sum())
                    _save_label_like(lab, lp, case.image_volume, tmp / lp.name)
                    if sp is not None:
                        sv = erode_labels(case.supervoxels, erode)
                        eroded["supervoxel_pixels"] += int(((case.supervoxels != 0) & (sv == 0)).sum())
                        _save_label_like(sv, sp, case.image_volume, tmp / sv_name / sp.name)
                else:
                    shutil.copy2(lp, tmp / lp.name)
                    if sp is not None:
                        shutil.copy2(sp, tmp / sv_name / sp.name)
            counts = {"cases_in": len(syn.case_ids), "slices_in": int(sum(n_slices.values())),
                      "excluded_before": int(sum(len(v) for v in prior.values())),
                      "removed_by_agreement": int(sum(len(v) for v in removed["agreement"].values())),
                      "removed_by_memorisation": int(sum(len(v) for v in removed["memorisation"].values())),
                      "removed_by_both": int(sum(len(removed["agreement"].get(c, set()) & v)
                                                 for c, v in removed["memorisation"].items())),
                      "eroded_label_pixels": eroded["label_pixels"],
                      "eroded_supervoxel_pixels": eroded["supervoxel_pixels"],
                      "cases_out": len(kept), "cases_dropped": dropped,
                      "slices_out": int(sum(n_slices[c] - len(excluded.get(c, ())) for c in kept))}
            record["counts"] = counts
            meta = json.loads(pair.meta_path.read_text(encoding="utf-8"))
            block = dict(meta["synthetic"])
            block["sources"] = {c: pair.sources[c] for c in kept}
            if "edits" in block and isinstance(block["edits"], dict):
                block["edits"] = {c: block["edits"][c] for c in kept if c in block["edits"]}
            block["excluded_slices"] = excluded
            block["filter"] = {"input": record["input"], **record["settings"], "counts": counts}
            meta["synthetic"] = block
            if "case_ids" in meta:
                meta["case_ids"] = kept
            atomic_write_json(tmp / "dataset.json", meta)
            record["seconds"] = round(time.perf_counter() - t0, 3)
            atomic_write_json(tmp / FILTER_NAME, record)
            if sv_name:  # atomic_directory syncs the top-level files; these lie one folder down
                import os

                for f in (tmp / sv_name).iterdir():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
    finally:
        bar.close()
    record["out"] = str(out)
    return record


__all__ = ["filter_synthetic", "erode_labels", "FilterError", "DEFAULT_MIN_DICE", "FILTER_NAME",
           "default_filter_settings", "describe_settings"]
