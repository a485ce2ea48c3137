"""The dataset writer: a folder of phantom cases that every tool accepts as a dataset root,
reused when it already holds exactly the requested phantom."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from ...atomic import atomic_write_json
from .case import DEFAULT_SHAPE, REFERENCE_INPLANE, check_modality, check_shape, default_spacing, make_phantom_case
from .tissues import TEST_LABELS, labels_for

GENERATOR_VERSION = 1
FULL_SIZE_MIN_SIZE = 5000  # supervoxel min_size for 256 x 256 in-plane (docs/protocol.md §4)


def case_ids(modality: str, n_cases: int) -> list[str]:
    """Case ids written for ``modality``: ``0..N-1`` for CT (as SABS), ``1..N`` for MR (as CHAOS)."""
    start = 0 if check_modality(modality) == "ct" else 1
    return [str(i) for i in range(start, start + int(n_cases))]


def affine_for(spacing) -> np.ndarray:
    """The stored affine for (z, y, x) ``spacing``: ``diag(-sx, -sy, sz)`` (nibabel codes LPS)."""
    sz, sy, sx = (float(s) for s in spacing)
    return np.diag([-sx, -sy, sz, 1.0])


def default_supervoxel_min_size(shape) -> int:
    """5000 voxels at 256 x 256 in-plane (docs/protocol.md §4), scaled with the in-plane area."""
    _, Y, X = (int(s) for s in shape)
    return max(50, int(round(FULL_SIZE_MIN_SIZE * (Y * X) / (REFERENCE_INPLANE ** 2))))


# ---- recognising a previous phantom ---------------------------------------------------------------
def _read_meta(path: Path) -> dict | None:
    try:
        info = json.loads((Path(path) / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_phantom_folder(path: str | Path) -> bool:
    """True if ``path`` holds a dataset.json written by this generator."""
    info = _read_meta(Path(path))
    return bool(info) and isinstance(info.get("generator"), dict) and "version" in info["generator"] \
        and str(info.get("name", "")).startswith("phantom")


def _code_digest() -> str:
    """Short digest of the generator's source (every module of this package): a phantom
    written by other code is not reused."""
    h = hashlib.sha256()
    try:
        for p in sorted(Path(__file__).parent.glob("*.py")):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    except OSError:  # pragma: no cover
        return "unknown"
    return h.hexdigest()[:12]


def _generator_info(modality, n_cases, seed, shape) -> dict:
    return {"seed": int(seed), "modality": modality, "n_cases": int(n_cases),
            "shape": [int(s) for s in shape], "version": GENERATOR_VERSION, "code": _code_digest()}


def phantom_is_current(out_dir, modality: str = "ct", n_cases: int = 8, seed: int = 0,
                       shape=DEFAULT_SHAPE, supervoxels: bool = True,
                       supervoxel_min_size: int | None = None) -> bool:
    """True if ``out_dir`` already holds exactly this phantom, every file present."""
    out_dir = Path(out_dir)
    modality = check_modality(modality)
    info = _read_meta(out_dir) if out_dir.is_dir() else None
    if not info or info.get("generator") != _generator_info(modality, n_cases, seed, shape):  # incl. code digest
        return False
    ids = case_ids(modality, n_cases)
    for cid in ids:
        if not ((out_dir / f"image_{cid}.nii.gz").is_file() and (out_dir / f"label_{cid}.nii.gz").is_file()):
            return False
    if supervoxels:
        min_size = int(supervoxel_min_size or default_supervoxel_min_size(shape))
        if info.get("supervoxels") != f"supervoxels_{min_size}":
            return False
        sv = out_dir / info["supervoxels"]
        if not all((sv / f"superpix-MIDDLE_{cid}.nii.gz").is_file() for cid in ids):
            return False
    return True


def _phantom_files(out_dir: Path):
    """What a phantom writes (and what is removed before writing a new one)."""
    for p in out_dir.iterdir():
        n = p.name
        if p.is_file() and n.startswith(("image_", "label_")) and n.endswith((".nii.gz", ".nii")):
            yield p
        elif p.is_dir() and n.startswith("supervoxels_"):
            yield p
        elif p.is_file() and (n == "dataset.json" or (n.startswith("classmap") and n.endswith(".json"))):
            yield p


# ---- writing ----------------------------------------------------------------------------------------
def make_phantom_dataset(out_dir, modality: str = "ct", n_cases: int = 8, seed: int = 0,
                         shape=DEFAULT_SHAPE, progress: bool = True, supervoxels: bool = True,
                         overwrite: bool = False, supervoxel_min_size: int | None = None) -> Path:
    """Write ``n_cases`` phantom cases (and their supervoxels) to ``out_dir``; return ``out_dir``.

    ``shape`` is (Z, Y, X). ``out_dir`` must be missing, empty, or a previous phantom dataset:
    if that holds exactly the requested phantom (same generator version, seed, modality,
    n_cases, shape, all files present) it is reused as is, unless ``overwrite``; otherwise its
    phantom files (``image_*``, ``label_*``, ``dataset.json``, ``supervoxels_*/``) are replaced.
    Any other non-empty folder is refused with :class:`FileExistsError` unless ``overwrite``
    (then those same file patterns are removed first, other files are left alone).

    Supervoxels (``supervoxels=True``): :func:`fsmis.data.supervoxels.make_dataset_supervoxels`
    writes ``supervoxels_<min_size>/superpix-MIDDLE_<id>.nii.gz``; ``min_size`` is 5000 at
    256 x 256 in-plane, scaled with the in-plane area for smaller shapes (or
    ``supervoxel_min_size``); the folder name is recorded in dataset.json ``"supervoxels"``.
    """
    modality = check_modality(modality)
    n_cases = int(n_cases)
    if n_cases < 1:
        raise ValueError("n_cases must be >= 1")
    shape = check_shape(shape)
    min_size = int(supervoxel_min_size or default_supervoxel_min_size(shape))
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite and phantom_is_current(out_dir, modality, n_cases, seed, shape, supervoxels, min_size):
            return out_dir
        _remove_previous(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)

    ids = case_ids(modality, n_cases)
    # written first: an interrupted run leaves a folder that is recognised (and regenerated)
    atomic_write_json(out_dir / "dataset.json", _dataset_json(modality, n_cases, seed, shape, ids, min_size))
    _write_cases(out_dir, modality, seed, shape, ids, progress)
    if supervoxels:
        from ..supervoxels import make_dataset_supervoxels

        make_dataset_supervoxels(out_dir, min_size=min_size, overwrite=True, progress=progress)
    return out_dir


def _remove_previous(out_dir: Path, overwrite: bool) -> None:
    """Remove a previous phantom's files; a folder that is not a phantom only with ``overwrite``."""
    if not (is_phantom_folder(out_dir) or overwrite):
        raise FileExistsError(
            f"{out_dir}: folder is not empty and is not a phantom dataset; choose another folder "
            "or pass overwrite=True (--overwrite) to replace its image_*/label_*/supervoxels_* files")
    for p in list(_phantom_files(out_dir)):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _dataset_json(modality: str, n_cases: int, seed: int, shape, ids: list, min_size: int) -> dict:
    return {
        "name": f"phantom_{modality}",
        "modality": modality.upper(),
        "description": "procedural 3D abdominal phantom (fsmis.data.phantom): stored LPS "
                       "(affine diag(-sx, -sy, sz)); arrays [Z, Y, X], slices inferior to superior",
        "labels": dict(labels_for(modality)),
        "test_labels": list(TEST_LABELS),
        "supervoxels": f"supervoxels_{min_size}",
        "case_ids": ids,
        "generator": _generator_info(modality, n_cases, seed, shape),
    }


def _write_cases(out_dir: Path, modality: str, seed: int, shape, ids: list, progress: bool) -> None:
    """One generator per case, spawned from (seed, modality): case k does not depend on n_cases."""
    from ..nifti import atomic_save_nifti

    children = np.random.SeedSequence([int(seed), 0 if modality == "ct" else 1]).spawn(len(ids))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), desc=f"phantom {modality}", unit="case")
    try:
        for cid, ss in zip(ids, children):
            rng = np.random.default_rng(ss)
            spacing = default_spacing(rng, modality, shape)
            image, label = make_phantom_case(rng, modality, shape, spacing)
            aff = affine_for(spacing)
            for kind, arr, dtype in (("image", image, np.float32), ("label", label, np.int16)):
                path = out_dir / f"{kind}_{cid}.nii.gz"
                atomic_save_nifti(np.transpose(arr, (2, 1, 0)), aff, path, dtype=dtype)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
