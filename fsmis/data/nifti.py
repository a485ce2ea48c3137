"""NIfTI volumes as the published FSMIS loaders read them (docs/protocol.md §2).

Array convention: ``[Z, Y, X]``: slice ``z`` is ``array[z]``, the stored third voxel axis,
exactly what ``SimpleITK.GetArrayFromImage`` returns and what every published loader slices.

Axis-aligned cases of one dataset are brought to one reference layout by axis flips and
in-plane transposes derived from their affines (never by resampling), so a case stored LPS
and one stored RAS load to the same array. Oblique cases (cardiac short axis) are used
exactly as stored. Every change is recorded in :class:`Layout` so that a prediction can be
written back on the file's own grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as nio

from ..atomic import atomic_target

OBLIQUE_DEGREES = 20.0


class DataError(ValueError):
    """A data file is missing, unreadable or inconsistent. The message names the file."""


@dataclass(frozen=True)
class Layout:
    """How a stored volume was re-laid out on load.

    ``transform`` is a nibabel orientation transform (rows: stored voxel axis -> [new axis, flip])
    applied to the stored (i, j, k) array; identity for oblique cases and cases already in the
    reference layout.
    """

    stored_codes: tuple[str, str, str]
    kind: str  # "axis-aligned" | "oblique"
    obliquity_deg: float
    transform: np.ndarray = field(default_factory=lambda: np.array([[0, 1], [1, 1], [2, 1]], float))

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.transform, np.array([[0, 1], [1, 1], [2, 1]], float)))

    def describe(self) -> str:
        if self.kind == "oblique":
            return f"oblique ({self.obliquity_deg:.0f} deg), used as stored"
        if self.is_identity:
            return "as stored"
        parts = []
        if self.transform[0, 0] != 0:
            parts.append("in-plane transpose")
        for new_axis, flip in self.transform:
            if flip < 0:
                parts.append(f"flip {'XYZ'[int(new_axis)]}")
        return ", ".join(parts)


@dataclass
class Volume:
    array: np.ndarray  # [Z, Y, X]
    spacing: tuple[float, float, float]  # mm, in array order (z, y, x)
    affine: np.ndarray  # voxel (i=x, j=y, k=z) -> world (RAS+) of the re-laid-out array
    path: Path
    layout: Layout
    stored_shape: tuple[int, int, int]  # nibabel (i, j, k) shape of the file
    stored_affine: np.ndarray
    header: nib.Nifti1Header | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)


def obliquity(affine: np.ndarray) -> float:
    """Largest angle (degrees) between a voxel axis and its nearest world axis."""
    rot = np.asarray(affine, float)[:3, :3]
    norms = np.linalg.norm(rot, axis=0)
    norms[norms == 0] = 1.0
    cosines = np.abs(rot / norms).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())


def axis_codes(affine: np.ndarray) -> tuple[str, str, str]:
    return tuple(nio.aff2axcodes(affine))


def layout_for(affine: np.ndarray, reference_affine: np.ndarray | None, path: Path | str = "") -> Layout:
    """The layout change that brings a volume with ``affine`` to ``reference_affine``'s layout.

    Raises :class:`DataError` if the slice axis runs along a different world axis from the
    reference (that would need reslicing, which is never done silently).
    """
    deg = obliquity(affine)
    codes = axis_codes(affine)
    if deg > OBLIQUE_DEGREES:
        return Layout(codes, "oblique", deg)
    if reference_affine is None or obliquity(reference_affine) > OBLIQUE_DEGREES:
        return Layout(codes, "axis-aligned", deg)
    ornt = nio.io_orientation(affine)
    ref = nio.io_orientation(reference_affine)
    if ornt[2, 0] != ref[2, 0]:
        ref_codes = axis_codes(reference_affine)
        raise DataError(
            f"{path}: slices run along {codes[2]} (stored {''.join(codes)}) but the reference case "
            f"slices along {ref_codes[2]} (stored {''.join(ref_codes)}); reslicing would be needed, "
            "which this loader never does silently"
        )
    transform = nio.ornt_transform(ornt, ref)
    return Layout(codes, "axis-aligned", deg, transform)


def _to_zyx(data_ijk: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(data_ijk, (2, 1, 0)))


def load_volume(
    path: str | Path,
    reference_affine: np.ndarray | None = None,
    dtype=np.float32,
    role: str = "image",
) -> Volume:
    """Read a NIfTI file, bring it to the reference layout, return it as ``[Z, Y, X]``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise DataError(f"{path}: cannot be read as NIfTI ({exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, found shape {data.shape}")
    affine = np.asarray(img.affine, float)
    layout = layout_for(affine, reference_affine, path)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    if not layout.is_identity:
        data = nio.apply_orientation(data, layout.transform)
        new_affine = affine @ nio.inv_ornt_aff(layout.transform, img.shape[:3])
        perm = layout.transform[:, 0].astype(int)
        new_zooms = [0.0, 0.0, 0.0]
        for old_axis, new_axis in enumerate(perm):
            new_zooms[new_axis] = zooms[old_axis]
        zooms = tuple(new_zooms)
    else:
        new_affine = affine
    if role == "label":
        arr = as_label_array(data, path)
    else:
        arr = np.asarray(data, dtype=dtype)
        if not np.all(np.isfinite(arr)):
            n_bad = int((~np.isfinite(arr)).sum())
            raise DataError(f"{path}: {n_bad} voxels are NaN or infinite")
    return Volume(
        array=_to_zyx(arr),
        spacing=(zooms[2], zooms[1], zooms[0]),
        affine=new_affine,
        path=path,
        layout=layout,
        stored_shape=tuple(int(s) for s in img.shape[:3]),
        stored_affine=affine,
        header=img.header.copy(),
    )


def as_label_array(data: np.ndarray, path: Path | str) -> np.ndarray:
    """Integer label map of ids >= 0; refuses non-integer, negative or non-finite values and ids
    beyond int32, naming the file."""
    data = np.asarray(data)
    if np.issubdtype(data.dtype, np.integer):
        values = data
    else:
        if not np.all(np.isfinite(data)):
            raise DataError(f"{path}: label map contains NaN or infinite values")
        values = np.rint(data)
        bad = np.abs(data - values) > 1e-3
        if bad.any():
            vals = np.unique(data[bad])[:5]
            raise DataError(f"{path}: label map has non-integer values (e.g. {', '.join(f'{v:g}' for v in vals)})")
    if values.size and values.min() < 0:
        vals = np.unique(values[values < 0])[:5]
        raise DataError(f"{path}: label map has negative values (e.g. {', '.join(f'{v:g}' for v in vals)}); "
                        "label ids must be >= 0")
    if values.size and values.max() > np.iinfo(np.int32).max:
        raise DataError(f"{path}: label map has ids beyond {np.iinfo(np.int32).max} (e.g. {values.max():g})")
    return values.astype(np.int32)


def check_pair(image: Volume, label: Volume) -> None:
    """Image and label must share shape and geometry (DataError naming the label file)."""
    if image.stored_shape != label.stored_shape:
        raise DataError(
            f"{label.path}: shape {'x'.join(map(str, label.stored_shape))} differs from "
            f"{image.path.name} {'x'.join(map(str, image.stored_shape))}"
        )
    if not np.allclose(image.stored_affine, label.stored_affine, atol=1e-3, rtol=1e-4):
        def rows(a):
            return "; ".join(" ".join(f"{v:.3f}" for v in r) for r in np.asarray(a)[:3])
        raise DataError(
            f"{label.path}: geometry differs from {image.path.name} (affines differ: "
            f"[{rows(label.stored_affine)}] vs [{rows(image.stored_affine)}])"
        )


def restore_stored_layout(array_zyx: np.ndarray, volume: Volume) -> np.ndarray:
    """Map an array on ``volume``'s loaded grid back to the stored (i, j, k) voxel order."""
    data = np.transpose(array_zyx, (2, 1, 0))
    if volume.layout.is_identity:
        return data
    return nio.apply_orientation(data, _inverse_ornt(volume.layout.transform))


def _inverse_ornt(transform: np.ndarray) -> np.ndarray:
    """The orientation transform undoing ``transform``."""
    inv = np.zeros_like(transform)
    for old_axis, (new_axis, flip) in enumerate(transform):
        inv[int(new_axis)] = [old_axis, flip]
    return inv


def atomic_save_nifti(data_ijk: np.ndarray, affine: np.ndarray, path: str | Path,
                      header: nib.Nifti1Header | None = None, dtype=None) -> Path:
    """Write a NIfTI file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        data_ijk = np.asarray(data_ijk, dtype=dtype)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(data_ijk, affine, hdr)
    img.set_data_dtype(data_ijk.dtype)
    if hdr is not None:
        img.header.set_slope_inter(1.0, 0.0)
    with atomic_target(path) as tmp:
        nib.save(img, tmp)
    return path


def save_like(array_zyx: np.ndarray, volume: Volume, path: str | Path, dtype=np.uint8) -> Path:
    """Save an array on ``volume``'s loaded grid as a file on the volume's stored grid and affine."""
    if tuple(array_zyx.shape) != volume.shape:
        raise ValueError(f"array shape {array_zyx.shape} does not match volume {volume.path.name} {volume.shape}")
    data = restore_stored_layout(np.asarray(array_zyx), volume)
    header = volume.header.copy() if volume.header is not None else None
    return atomic_save_nifti(np.asarray(data, dtype=dtype), volume.stored_affine, path, header)
