"""What every benchmark's preparation shares (docs/protocol.md §1-§4).

A :class:`Recipe` holds one benchmark's constants and its two raw-format functions (finding
the cases, reading one); ``sabs.py``, ``chaos.py`` and ``cmr.py`` each register one. The rest
is the same for all three: geometry and resampling (the affine follows every crop, pad and
resampling, so a prepared case lies where the raw one lies in world coordinates), the checks
that refuse a misaligned case, the atomic per-case writing, the run loop, the class-slice
index, the report and the checksums.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from nibabel import orientations as nio
from scipy import ndimage as ndi

from ...atomic import atomic_write_json, atomic_write_text
from ...parallel import map_cases
from ..datasets import BENCHMARKS, open_dataset
from ..nifti import (OBLIQUE_DEGREES, DataError, atomic_save_nifti, axis_codes, check_pair, layout_for,
                     load_volume, obliquity)

PREPARE_VERSION = 1


# --------------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RawCase:
    case_id: str
    image: Path  # a NIfTI file, or the DICOM folder (chaos)
    label: Path  # a NIfTI file, or the PNG folder (chaos)
    source: str  # the raw files, relative to the raw folder (reports carry no absolute paths)


@dataclass(frozen=True)
class Recipe:
    """Every constant of one benchmark's preparation (docs/protocol.md §1, §3, §4) and its raw format."""

    key: str  # command-line name
    benchmark: str  # key of BENCHMARKS
    modality: str
    # CT: HU window then per-volume [0, 255]; MR: clip above this percentile
    hu_window: tuple | None = None
    clip_percentile: float | None = None
    border_crop: int = 0  # px cropped from each in-plane border before resampling
    spacing_zyx: tuple | None = None  # target spacing; None on an axis: keep (z) / by size (yx)
    inplane_size: int = 256  # final in-plane size (crop or pad)
    target_codes: str | None = None  # axis-aligned cases re-laid out to these codes; None = as stored
    supervoxel_min_size: int = 5000
    classmap_names: dict = field(default_factory=dict)  # published classmap name -> label id
    # the raw format: find(raw[, sequence]) -> [RawCase]; read(recipe, rc) -> (image, label, affine)
    find: Callable | None = field(default=None, compare=False, repr=False)
    read: Callable | None = field(default=None, compare=False, repr=False)
    sequences: tuple = ()  # selectable sequences, the benchmark's first (cmr); () = none
    report_note: Callable | None = field(default=None, compare=False, repr=False)  # case ids -> note

    @property
    def labels(self) -> dict:
        return dict(BENCHMARKS[self.benchmark].labels)

    def settings(self) -> dict:
        return {
            "hu_window": list(self.hu_window) if self.hu_window else None,
            "clip_percentile": self.clip_percentile,
            "border_crop_px": self.border_crop,
            "spacing_zyx_mm": [s if s is None else float(s) for s in self.spacing_zyx] if self.spacing_zyx else None,
            "inplane_size": self.inplane_size,
            "stored_orientation": self.target_codes or "as stored",
            "label_resampling": "class by class (linear), largest wins",
            "image_resampling": "linear, voxel corners aligned",
            "supervoxels": {"min_size": self.supervoxel_min_size, "scale": 1, "sigma": 0,
                            "connectivity": 26, "body_threshold": 10},
        }


# dataset key -> recipe; the package registers sabs, chaos, cmr (each module's RECIPE)
RECIPES: dict[str, Recipe] = {}


def register(*recipes: Recipe) -> None:
    for recipe in recipes:
        RECIPES[recipe.key] = recipe


# --------------------------------------------------------------------------------------------
# finding and reading the raw cases
# --------------------------------------------------------------------------------------------

def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (its name if outside), for reports."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def match_number(name: str, pattern: str) -> int | None:
    """The integer group of ``pattern`` if ``name`` matches it in full."""
    m = re.fullmatch(pattern, name)
    return int(m.group(1)) if m else None


def find_raw_cases(dataset: str, raw, sequence: str = "C0") -> list[RawCase]:
    """The labelled cases of a raw download, in case-id order."""
    raw = Path(raw)
    if not raw.is_dir():
        raise DataError(f"{raw}: raw data folder not found")
    if dataset not in RECIPES:
        raise ValueError(f"unknown dataset {dataset!r} (choose from {', '.join(RECIPES)})")
    recipe = RECIPES[dataset]
    return recipe.find(raw, sequence) if recipe.sequences else recipe.find(raw)


def _check_label_values(label, allowed, where: str):
    bad = sorted(set(np.unique(label).tolist()) - set(allowed) - {0})
    if bad:
        raise DataError(f"{where}: unexpected label values {bad[:8]} (expected {sorted(allowed)})")


def read_nifti_case(recipe: Recipe, rc: RawCase):
    """A NIfTI image + label pair: same geometry, label values the benchmark's."""
    img = load_volume(rc.image, None, dtype=np.float64, role="image")
    lab = load_volume(rc.label, None, role="label")
    check_pair(img, lab)
    _check_label_values(lab.array, recipe.labels.values(), str(rc.label))
    return img.array, lab.array, np.asarray(img.stored_affine, float)


def read_raw_case(recipe: Recipe, rc: RawCase):
    """``(image [Z,Y,X] float64, label [Z,Y,X] int32 with the stored ids, affine)`` as in the raw files."""
    return recipe.read(recipe, rc)


# --------------------------------------------------------------------------------------------
# geometry: arrays are [Z, Y, X]; affines map voxel (i, j, k) = (x, y, z) to RAS+ mm
# --------------------------------------------------------------------------------------------

def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """(z, y, x) voxel size in mm."""
    sx, sy, sz = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    return float(sz), float(sy), float(sx)


def crop_or_pad(array: np.ndarray, affine: np.ndarray, start_zyx, shape_zyx, fill=0):
    """Window ``array[start : start + shape]``; parts outside (negative start, too small) are
    ``fill``. Returns ``(window, affine of the window)``."""
    out = np.full(tuple(int(s) for s in shape_zyx), fill, dtype=array.dtype)
    src, dst = [], []
    for n_in, s, n_out in zip(array.shape, start_zyx, shape_zyx):
        lo, hi = max(0, s), min(n_in, s + n_out)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, lo - s + max(0, hi - lo)))
    out[tuple(dst)] = array[tuple(src)]
    shift = np.eye(4)
    shift[:3, 3] = [start_zyx[2], start_zyx[1], start_zyx[0]]
    return out, np.asarray(affine, float) @ shift


def centre_window(array: np.ndarray, affine: np.ndarray, size: int, fill=0):
    """Centre crop or pad the in-plane axes to ``size`` x ``size``."""
    nz, ny, nx = array.shape
    start = (0, (ny - size) // 2, (nx - size) // 2)
    return crop_or_pad(array, affine, start, (nz, size, size), fill)


def _zoom_params(factors_zyx):
    f = np.asarray(factors_zyx, float)
    return f, (f - 1.0) / 2.0  # old index = f * new + (f - 1) / 2: voxel corners aligned


def resample_affine(affine: np.ndarray, factors_zyx) -> np.ndarray:
    f, off = _zoom_params(factors_zyx)
    m = np.eye(4)
    m[[0, 1, 2], [0, 1, 2]] = f[::-1]
    m[:3, 3] = off[::-1]
    return np.asarray(affine, float) @ m


def resample_image(array: np.ndarray, factors_zyx, shape_zyx) -> np.ndarray:
    """Linear resampling; ``factors`` = new spacing / old spacing per axis."""
    f, off = _zoom_params(factors_zyx)
    if np.allclose(f, 1.0) and tuple(shape_zyx) == array.shape:
        return np.asarray(array, np.float64).copy()
    return ndi.affine_transform(np.asarray(array, np.float64), f, off, output_shape=tuple(shape_zyx),
                                order=1, mode="nearest")


def resample_label(label: np.ndarray, factors_zyx, shape_zyx) -> np.ndarray:
    """Class-by-class resampling: each class's mask linearly, the largest value wins (ties:
    the lower id, background first)."""
    f, off = _zoom_params(factors_zyx)
    if np.allclose(f, 1.0) and tuple(shape_zyx) == label.shape:
        return np.asarray(label, np.int32).copy()
    out = np.zeros(tuple(shape_zyx), np.int32)
    best = None
    for cid in np.unique(label):
        p = ndi.affine_transform((label == cid).astype(np.float32), f, off, output_shape=tuple(shape_zyx),
                                 order=1, mode="nearest")
        if best is None:
            best = p
            out[:] = int(cid)
            continue
        win = p > best
        out[win] = int(cid)
        best[win] = p[win]
    return out


def resample_to(image, label, affine, spacing_zyx, size_zyx=None):
    """Resample to ``spacing_zyx`` (None on an axis: keep it, or take it from ``size_zyx``)."""
    old = np.asarray(spacing_of(affine))
    factors, shape = [], []
    for a in range(3):
        n = image.shape[a]
        if spacing_zyx[a] is not None:
            factors.append(float(spacing_zyx[a]) / old[a])
            shape.append(max(1, int(round(n * old[a] / float(spacing_zyx[a])))))
        elif size_zyx is not None and size_zyx[a] is not None:
            factors.append(n / float(size_zyx[a]))
            shape.append(int(size_zyx[a]))
        else:
            factors.append(1.0)
            shape.append(n)
    return (resample_image(image, factors, shape), resample_label(label, factors, shape),
            resample_affine(affine, factors))


def reorient(image, label, affine, codes: str, where: str):
    """Re-lay out an axis-aligned case to ``codes`` by axis flips / in-plane transposes derived
    from its affine (no resampling); the slice axis must stay the slice axis."""
    ornt = nio.io_orientation(affine)
    target = nio.axcodes2ornt(tuple(codes))
    t = nio.ornt_transform(ornt, target)
    if int(t[2, 0]) != 2:
        raise DataError(f"{where}: slices run along {axis_codes(affine)[2]} (stored {''.join(axis_codes(affine))}); "
                        f"this dataset is stored with slices along {codes[2]}: refusing to reslice")
    ijk_shape = image.shape[::-1]

    def apply(a):
        return np.ascontiguousarray(np.transpose(nio.apply_orientation(np.transpose(a, (2, 1, 0)), t), (2, 1, 0)))

    return apply(image), apply(label), np.asarray(affine, float) @ nio.inv_ornt_aff(t, ijk_shape)


# --------------------------------------------------------------------------------------------
# preprocessing and checking one case
# --------------------------------------------------------------------------------------------

def preprocess(recipe: Recipe, image, label, affine, where: str = ""):
    """docs/protocol.md §3 for one case; returns ``(image float64, label int32, affine)``."""
    image = np.asarray(image, np.float64)
    if recipe.target_codes and obliquity(affine) <= OBLIQUE_DEGREES:
        image, label, affine = reorient(image, label, affine, recipe.target_codes, where)
    if recipe.hu_window is not None:
        lo, hi = recipe.hu_window
        image = np.clip(image, lo, hi)
        vmin, vmax = float(image.min()), float(image.max())
        image = (image - vmin) / (vmax - vmin) * 255.0 if vmax > vmin else np.zeros_like(image)
    if recipe.clip_percentile is not None:
        image = np.minimum(image, np.percentile(image, recipe.clip_percentile))
    if recipe.border_crop:
        b = recipe.border_crop
        nz, ny, nx = image.shape
        if min(ny, nx) <= 2 * b:
            raise DataError(f"{where}: in-plane size {ny}x{nx} is too small for a {b} px border crop")
        image, affine2 = crop_or_pad(image, affine, (0, b, b), (nz, ny - 2 * b, nx - 2 * b))
        label, _ = crop_or_pad(label, affine, (0, b, b), (nz, ny - 2 * b, nx - 2 * b))
        affine = affine2
    size = (None, recipe.inplane_size, recipe.inplane_size)
    image, label, affine = resample_to(image, label, affine, recipe.spacing_zyx, size)
    if image.shape[1:] != (recipe.inplane_size, recipe.inplane_size):
        fill = float(image.min())
        image2, affine2 = centre_window(image, affine, recipe.inplane_size, fill)
        label, _ = centre_window(label, affine, recipe.inplane_size, 0)
        image, affine = image2, affine2
    return image, label.astype(np.int32), affine


def label_inside_body(image: np.ndarray, label: np.ndarray, classes: dict) -> dict:
    """{class name: fraction of its voxels inside the body mask} for the classes present."""
    from ..supervoxels import body_mask

    body = body_mask(image)
    out = {}
    for name, cid in classes.items():
        m = label == cid
        n = int(m.sum())
        if n:
            out[name] = float(body[m].sum()) / n
    return out


def check_alignment(image, label, classes: dict, where: str, min_inside: float = 0.9) -> dict:
    """Refuse a case whose labels fall outside the body (misaligned: a flip, a shift, another
    patient's masks). Returns the per-class fractions inside."""
    inside = label_inside_body(image, label, classes)
    if not inside and label.any():
        raise DataError(f"{where}: label values {np.unique(label[label > 0])[:5].tolist()} are none of the classes")
    bad = {k: v for k, v in inside.items() if v < min_inside}
    if bad:
        detail = ", ".join(f"{k} {100 * v:.0f}%" for k, v in bad.items())
        raise DataError(f"{where}: labels do not fall inside the body mask of the image ({detail} of their "
                        f"voxels inside, at least {100 * min_inside:.0f}% required): image and label are "
                        "misaligned (a flipped or shifted mask?)")
    return inside


def prepare_case(recipe: Recipe, rc: RawCase, min_inside: float = 0.9):
    """Read, preprocess and check one raw case: ``(image, label, affine, inside fractions)``."""
    where = f"case {rc.case_id} ({rc.source})"
    image, label, affine = read_raw_case(recipe, rc)
    image, label, affine = preprocess(recipe, image, label, affine, where)
    inside = check_alignment(image, label, recipe.labels, where, min_inside)
    return image, label, affine, inside


# --------------------------------------------------------------------------------------------
# the dataset folder
# --------------------------------------------------------------------------------------------

@dataclass
class PreparationPlan:
    recipe: Recipe
    raw: Path
    out: Path  # the benchmark folder
    sequence: str
    cases: list  # RawCase to be in the output
    done: list  # ids already complete (image + label)
    supervoxels: bool
    name: str

    @property
    def image_dir(self) -> Path:
        return self.out / BENCHMARKS[self.recipe.benchmark].folder

    @property
    def supervoxel_dir(self) -> Path:
        return self.out / f"supervoxels_{self.recipe.supervoxel_min_size}"

    def todo(self) -> list:
        return [rc for rc in self.cases if rc.case_id not in self.done]

    def meta(self) -> dict:
        bench = BENCHMARKS[self.recipe.benchmark]
        return {
            "name": self.name,
            "modality": self.recipe.modality,
            "labels": self.recipe.labels,
            "test_labels": list(bench.test_classes),
            "supervoxels": self.supervoxel_dir.name,
            "classmap": {"file": "classmap_1.json", "min_voxels": 1,
                         "names": {k: v for k, v in self.recipe.classmap_names.items()}},
            "preparation": self.settings(),
        }

    def settings(self) -> dict:
        return {"tool": "tools/prepare_dataset.py", "version": PREPARE_VERSION, "dataset": self.recipe.key,
                "sequence": self.sequence if self.recipe.sequences else None,
                **self.recipe.settings()}

    def describe(self) -> str:
        todo = self.todo()
        ids = [rc.case_id for rc in self.cases]
        lines = [
            f"prepare {self.name} ({self.recipe.key}{', sequence ' + self.sequence if self.recipe.sequences else ''}) "
            f"from {self.raw}",
            f"  {len(self.cases)} case(s): ids {', '.join(ids[:12])}{' ...' if len(ids) > 12 else ''}",
            f"  output: {self.image_dir}" + (f" and {self.supervoxel_dir}" if self.supervoxels else ""),
            f"  {len(self.cases) - len(todo)} already prepared (skipped), {len(todo)} to prepare",
        ]
        return "\n".join(lines)


def _idkey(cid: str):
    return (0, int(cid), "") if cid.isdigit() else (1, 0, cid)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _our_files(image_dir: Path, out: Path):
    """What a preparation writes (removed by ``overwrite``)."""
    if image_dir.is_dir():
        for p in image_dir.iterdir():
            n = p.name
            if p.is_file() and (n.startswith(("image_", "label_", ".tmp-")) or n == "dataset.json"
                                or (n.startswith("classmap") and n.endswith(".json"))):
                yield p
    if out.is_dir():
        for p in out.iterdir():
            if p.is_dir() and p.name.startswith("supervoxels_"):
                yield p
            elif p.is_file() and p.name in ("preparation_report.json", "preparation_report.md", "checksums.sha256"):
                yield p


def plan_preparation(dataset: str, raw, out, sequence: str = "C0", cases=None, supervoxels: bool = True,
                     overwrite: bool = False) -> PreparationPlan:
    """Find the raw cases and what is already prepared in ``out`` (the benchmark folder)."""
    dataset = str(dataset).lower()
    if dataset not in RECIPES:
        raise ValueError(f"unknown dataset {dataset!r} (choose from {', '.join(RECIPES)})")
    sequence = str(sequence).upper()
    recipe = RECIPES[dataset]
    if recipe.sequences and sequence not in recipe.sequences:
        raise ValueError(f"unknown {recipe.benchmark} sequence {sequence!r} "
                         f"(choose from {', '.join(recipe.sequences)})")
    raw, out = Path(raw), Path(out)
    if raw.is_dir() and (out.resolve() == raw.resolve() or raw.resolve() in out.resolve().parents):
        raise ValueError(f"--out {out} is the raw folder --raw {raw} or inside it (the raw folder is searched "
                         "recursively, and the raw download is kept as it is): choose an output folder outside it")
    found = find_raw_cases(dataset, raw, sequence)
    if cases:
        wanted = [str(c) for c in cases]
        known = {rc.case_id for rc in found}
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise DataError(f"{raw}: no raw case(s) {', '.join(unknown)} (found: {', '.join(sorted(known, key=_idkey))})")
        found = [rc for rc in found if rc.case_id in wanted]
    first_sequence = not recipe.sequences or sequence == recipe.sequences[0]
    name = recipe.benchmark if first_sequence else f"{recipe.benchmark}_{sequence}"
    plan = PreparationPlan(recipe, raw, out, sequence, found, [], supervoxels, name)
    image_dir = plan.image_dir
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    info = _read_json(image_dir / "dataset.json") if image_dir.is_dir() else None
    occupied = image_dir.is_dir() and any(image_dir.glob("image_*"))
    if not overwrite:
        if occupied and info is None:
            raise FileExistsError(
                f"{image_dir}: holds images but no dataset.json written by this tool (a published archive?); "
                "choose another --out or pass --overwrite to replace its image_*/label_* files")
        if info is not None and (info.get("preparation") != plan.settings() or info.get("name") != name):
            raise FileExistsError(
                f"{image_dir}: was prepared with other settings ({(info.get('preparation') or {}).get('dataset')}, "
                f"version {(info.get('preparation') or {}).get('version')}); pass --overwrite to replace it")
        for rc in found:
            if (image_dir / f"image_{rc.case_id}.nii.gz").is_file() and (image_dir / f"label_{rc.case_id}.nii.gz").is_file():
                plan.done.append(rc.case_id)
    return plan


# --------------------------------------------------------------------------------------------
# class-slice index, report, checksums
# --------------------------------------------------------------------------------------------

def _case_ids(image_dir: Path) -> list:
    ids = [p.name[len("image_"):-len(".nii.gz")] for p in image_dir.glob("image_*.nii.gz")]
    return sorted(ids, key=_idkey)


def write_classmap(plan: PreparationPlan, min_voxels: int = 1) -> Path:
    """``classmap_1.json``: {published class name: {case id: [slices with >= min_voxels of it]}}."""
    ids = _case_ids(plan.image_dir)
    cmap = {name: {} for name in plan.recipe.classmap_names}
    for cid in ids:
        lab = load_volume(plan.image_dir / f"label_{cid}.nii.gz", role="label").array
        counts = {c: (lab == c).reshape(lab.shape[0], -1).sum(axis=1) for c in plan.recipe.classmap_names.values()}
        for name, c in plan.recipe.classmap_names.items():
            cmap[name][cid] = np.flatnonzero(counts[c] >= min_voxels).tolist()
    return atomic_write_json(plan.image_dir / f"classmap_{min_voxels}.json", cmap)


def _array_digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(str(a.dtype).encode() + str(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def write_report(plan: PreparationPlan) -> Path:
    """``preparation_report.json`` and ``.md``: per case what a second user compares against."""
    ds = open_dataset(plan.image_dir, cache=False)
    sources = {rc.case_id: rc.source for rc in plan.cases}
    rows = []
    for cid in ds.case_ids:
        case = ds.load_case(cid)
        vol = case.image_volume
        lab_counts = {name: int((case.label == i).sum()) for name, i in ds.classes.items()}
        rows.append({
            "case": cid,
            "source": sources.get(cid, "(prepared earlier; not in this raw folder)"),
            "shape_zyx": list(vol.shape),
            "spacing_zyx_mm": [round(s, 4) for s in vol.spacing],
            "orientation": "".join(vol.layout.stored_codes),
            "kind": vol.layout.kind,
            "obliquity_deg": round(vol.layout.obliquity_deg, 1),
            "on_load": vol.layout.describe(),
            "intensity": {"min": round(float(case.image.min()), 3), "max": round(float(case.image.max()), 3),
                          "mean": round(float(case.image.mean()), 3)},
            "label_voxels": lab_counts,
            "inside_body": {k: round(v, 4) for k, v in label_inside_body(case.image, case.label, ds.classes).items()},
            "image_digest": _array_digest(case.image),
            "label_digest": _array_digest(case.label),
        })
    report = {"dataset": plan.name, "benchmark": plan.recipe.benchmark, "settings": plan.settings(),
              "n_cases": len(rows), "cases": rows}
    if plan.recipe.report_note is not None:
        report["note"] = plan.recipe.report_note({r["case"] for r in rows})
    atomic_write_json(plan.out / "preparation_report.json", report)
    names = list(ds.classes)
    lines = [f"# Preparation report: {plan.name}", "",
             f"{len(rows)} case(s); recipe `{plan.recipe.key}` (protocol section 3), settings in dataset.json.", "",
             "| case | shape (z, y, x) | spacing (mm) | orientation | kind | on load | "
             + " | ".join(names) + " | min inside body |",
             "|---|---|---|---|---|---|" + "---|" * len(names) + "---|"]
    for r in rows:
        inside = min(r["inside_body"].values()) if r["inside_body"] else float("nan")
        lines.append(
            f"| {r['case']} | {'x'.join(map(str, r['shape_zyx']))} | "
            f"{' x '.join(f'{s:g}' for s in r['spacing_zyx_mm'])} | {r['orientation']} | {r['kind']} | "
            f"{r['on_load']} | " + " | ".join(str(r["label_voxels"][n]) for n in names) + f" | {inside:.3f} |")
    atomic_write_text(plan.out / "preparation_report.md", "\n".join(lines) + "\n")
    return plan.out / "preparation_report.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(out, image_dir, supervoxel_dir=None) -> Path:
    """``checksums.sha256`` in ``out``: every data file (images, labels, supervoxels, dataset.json,
    classmap; not the report, which names the raw files), paths relative to ``out``
    (check with ``sha256sum -c checksums.sha256`` from inside ``out``, or :func:`verify_checksums`)."""
    out = Path(out)
    files = sorted(p for p in Path(image_dir).iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name.endswith((".nii.gz", ".json")))
    if supervoxel_dir is not None and Path(supervoxel_dir).is_dir():
        files += sorted(Path(supervoxel_dir).glob("superpix-MIDDLE_*.nii.gz"))
    text = "".join(f"{_sha256(p)}  {p.relative_to(out).as_posix()}\n" for p in files)
    return atomic_write_text(out / "checksums.sha256", text)


def verify_checksums(out) -> list[str]:
    """Problems found checking ``out/checksums.sha256`` (empty: every file is as recorded)."""
    out = Path(out)
    manifest = out / "checksums.sha256"
    if not manifest.is_file():
        return [f"{manifest}: not found"]
    problems = []
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, _, rel = line.partition("  ")
        p = out / rel
        if not rel or len(digest) != 64:
            problems.append(f"{manifest}:{n}: malformed line")
        elif not p.is_file():
            problems.append(f"{rel}: missing")
        elif _sha256(p) != digest:
            problems.append(f"{rel}: checksum differs (modified or corrupt)")
    return problems


# --------------------------------------------------------------------------------------------
# writing the cases (atomic per case: the image last) and the run
# --------------------------------------------------------------------------------------------

def _remove_leftovers(plan: PreparationPlan) -> list:
    """Temporary files of a killed run and case files without their image (the image is written
    last, so these belong to an interrupted case)."""
    removed = []
    for folder in (plan.image_dir, plan.supervoxel_dir):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.is_file() and p.name.startswith(".tmp-"):
                p.unlink()
                removed.append(p)
    if plan.image_dir.is_dir():
        for p in plan.image_dir.glob("label_*.nii.gz"):
            cid = p.name[len("label_"):-len(".nii.gz")]
            if not (plan.image_dir / f"image_{cid}.nii.gz").is_file():
                p.unlink()
                removed.append(p)
                sv = plan.supervoxel_dir / f"superpix-MIDDLE_{cid}.nii.gz"
                if sv.is_file():
                    sv.unlink()
                    removed.append(sv)
    return removed


def _supervoxels(image, affine, min_size):
    from ..supervoxels import supervoxels_3d

    # on the float32 image, as tools/make_supervoxels.py computes them from the written file
    return supervoxels_3d(np.asarray(image, np.float32), spacing_of(affine), min_size=min_size)


def _save(array_zyx, affine, path, dtype):
    return atomic_save_nifti(np.transpose(array_zyx, (2, 1, 0)), affine, path, dtype=dtype)


def _reference_affine(plan: PreparationPlan):
    """The first prepared axis-aligned case's affine: the slice axis every case must share."""
    import nibabel as nib

    for rc in sorted(plan.cases, key=lambda r: _idkey(r.case_id)):
        p = plan.image_dir / f"image_{rc.case_id}.nii.gz"
        if p.is_file():
            aff = np.asarray(nib.load(str(p)).affine, float)
            if obliquity(aff) <= OBLIQUE_DEGREES:
                return aff
    return None


def _write_case(plan: PreparationPlan, rc: RawCase, min_inside: float, reference) -> None:
    """Prepare and write one case, its image last; an exception removes what it wrote."""
    image, label, affine, _ = prepare_case(plan.recipe, rc, min_inside)
    ref = reference.get("affine")
    if ref is not None:
        layout_for(affine, ref, f"case {rc.case_id} ({rc.source})")  # refuses another slice axis
    elif obliquity(affine) <= OBLIQUE_DEGREES:
        reference["affine"] = affine
    d = plan.image_dir
    paths = []
    try:
        if plan.supervoxels:
            sv = _supervoxels(image, affine, plan.recipe.supervoxel_min_size)
            paths.append(plan.supervoxel_dir / f"superpix-MIDDLE_{rc.case_id}.nii.gz")
            _save(sv, affine, paths[-1], np.int32)
        paths.append(d / f"label_{rc.case_id}.nii.gz")
        _save(label, affine, paths[-1], np.int16)
        paths.append(d / f"image_{rc.case_id}.nii.gz")  # last: its presence marks a finished case
        _save(image, affine, paths[-1], np.float64)
    except BaseException:
        for p in paths:
            if p.exists():
                p.unlink()
        raise


def _write_missing_supervoxels(plan: PreparationPlan, case_id: str) -> None:
    from ..nifti import save_like
    from ..supervoxels import supervoxels_3d

    out = plan.supervoxel_dir / f"superpix-MIDDLE_{case_id}.nii.gz"
    vol = load_volume(plan.image_dir / f"image_{case_id}.nii.gz")
    save_like(supervoxels_3d(vol.array, vol.spacing, min_size=plan.recipe.supervoxel_min_size), vol, out,
              dtype=np.int32)


def prepare_dataset(plan_or_dataset, raw=None, out=None, *, sequence: str = "C0", cases=None,
                    supervoxels: bool = True, overwrite: bool = False, progress: bool = True,
                    min_inside: float = 0.9, workers: int = 1) -> Path:
    """Prepare a benchmark into the folder ``out`` and return it.

    Re-running skips finished cases and first removes what a killed run left (temporary files,
    labels without their image). ``workers``: cases prepared in parallel threads.

    Accepts a :class:`PreparationPlan` or ``(dataset, raw, out)``. Errors: :class:`DataError`
    naming the case and file; :class:`FileExistsError` for an ``out`` holding other data.
    """
    if isinstance(plan_or_dataset, PreparationPlan):
        plan = plan_or_dataset
    else:
        plan = plan_preparation(plan_or_dataset, raw, out, sequence, cases, supervoxels, overwrite)
    if overwrite:
        for p in list(_our_files(plan.image_dir, plan.out)):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        plan.done = []
    # what this run creates, removed again if it fails before any case is finished
    created = [d for d in (plan.out, plan.image_dir, plan.supervoxel_dir if plan.supervoxels else None)
               if d is not None and not d.exists()]
    had_meta = (plan.image_dir / "dataset.json").is_file()
    try:
        _prepare(plan, min_inside, workers, progress)
    except BaseException:
        if not any(plan.image_dir.glob("image_*.nii.gz")):
            if not had_meta:
                (plan.image_dir / "dataset.json").unlink(missing_ok=True)
            for d in reversed(created):  # innermost first; only folders left empty
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
        raise
    return plan.out


def _prepare(plan: PreparationPlan, min_inside: float, workers: int, progress: bool) -> None:
    plan.image_dir.mkdir(parents=True, exist_ok=True)
    if plan.supervoxels:
        plan.supervoxel_dir.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(plan)
    atomic_write_json(plan.image_dir / "dataset.json", plan.meta())
    if plan.supervoxels:  # finished cases prepared earlier with --no-supervoxels
        for cid in plan.done:
            if not (plan.supervoxel_dir / f"superpix-MIDDLE_{cid}.nii.gz").is_file():
                _write_missing_supervoxels(plan, cid)
    todo = plan.todo()
    reference = {"affine": _reference_affine(plan)}
    map_cases(lambda rc: _write_case(plan, rc, min_inside, reference), todo, int(workers),
              desc=f"prepare {plan.name}", progress=progress, done=len(plan.cases) - len(todo),
              serial_first=1 if reference["affine"] is None else 0,  # the first case sets the reference
              thread_prefix="prepare")
    write_classmap(plan)
    write_report(plan)
    write_checksums(plan.out, plan.image_dir, plan.supervoxel_dir)  # whatever supervoxels are there
