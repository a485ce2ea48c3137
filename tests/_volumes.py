"""Helpers for the tests: tiny NIfTI volumes with chosen orientations, and dataset folders.

Arrays are in the project's ``[Z, Y, X]`` convention; nibabel stores ``(i, j, k) = (X, Y, Z)``,
so a ``[Z, Y, X]`` array ``a`` is written as ``np.transpose(a, (2, 1, 0))``.

Orientation codes follow nibabel / RAS+ world coordinates: the letter of voxel axis ``i`` (then
``j``, ``k``) is the world direction that axis increases towards (R/L = world x, A/P = world y,
S/I = world z; R, A, S positive).
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

_WORLD_AXIS = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


# -- affines -----------------------------------------------------------------------------------
def affine_from_codes(codes: str, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Axis-aligned affine whose voxel axes i, j, k point along ``codes`` (e.g. "RAS", "LPS",
    "PSR", "LAS", "ARS"), with voxel sizes ``spacing`` given in (i, j, k) order.

    RAS -> diag(si, sj, sk); LPS -> diag(-si, -sj, sk).
    """
    codes = codes.upper()
    assert len(codes) == 3
    aff = np.eye(4)
    aff[:3, :3] = 0.0
    used = set()
    for a, letter in enumerate(codes):
        w, sign = _WORLD_AXIS[letter]
        assert w not in used, f"codes {codes!r} use a world axis twice"
        used.add(w)
        aff[w, a] = sign * float(spacing[a])
    aff[:3, 3] = origin
    return aff


def rotation(axis: str, degrees: float) -> np.ndarray:
    """3x3 rotation about world axis 'x', 'y' or 'z' (right-handed)."""
    t = np.radians(degrees)
    c, s = np.cos(t), np.sin(t)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(axis)


def oblique_affine(codes: str, spacing=(1.0, 1.0, 1.0), axis: str = "z", degrees: float = 40.0,
                   origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """An axis-aligned affine (``codes``) rotated by ``degrees`` about a world axis.

    With 30-50 degrees the volume is oblique (docs/protocol.md §2: > 20 degrees) while its nearest-axis
    codes stay ``codes`` as long as the rotation is below 45 degrees.
    """
    aff = affine_from_codes(codes, spacing, origin)
    aff[:3, :3] = rotation(axis, degrees) @ aff[:3, :3]
    return aff


def world(affine: np.ndarray, ijk) -> np.ndarray:
    """World coordinates of voxel index ``ijk`` (or an [N, 3] array of them)."""
    ijk = np.atleast_2d(np.asarray(ijk, float))
    return (ijk @ np.asarray(affine)[:3, :3].T) + np.asarray(affine)[:3, 3]


# -- re-laying out a volume without changing its world geometry ----------------------------------
def relayout(data_ijk: np.ndarray, affine: np.ndarray, perm=(0, 1, 2), flips=(False, False, False)):
    """Store the same anatomy with another voxel layout.

    New voxel axis ``a`` is old axis ``perm[a]``, reversed when ``flips[a]``. Returns
    ``(new_data_ijk, new_affine)`` such that every voxel keeps its world position:
    ``new_affine @ n == affine @ o`` whenever ``new_data[n] == data[o]``.
    """
    data_ijk = np.asarray(data_ijk)
    old_shape = data_ijk.shape
    new = np.transpose(data_ijk, perm)
    for a, f in enumerate(flips):
        if f:
            new = np.flip(new, axis=a)
    # old index o = P n + t
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for a in range(3):
        old = perm[a]
        if flips[a]:
            m[old, a] = -1.0
            m[old, 3] = old_shape[old] - 1
        else:
            m[old, a] = 1.0
    return np.ascontiguousarray(new), np.asarray(affine, float) @ m


def relayout_zyx(array_zyx: np.ndarray, affine: np.ndarray, perm=(0, 1, 2), flips=(False, False, False)):
    """:func:`relayout` for a ``[Z, Y, X]`` array: returns ``(new_array_zyx, new_affine)``;
    ``perm`` / ``flips`` are in voxel (i, j, k) order."""
    data, aff = relayout(zyx_to_ijk(array_zyx), affine, perm, flips)
    return ijk_to_zyx(data), aff


def zyx_to_ijk(a: np.ndarray) -> np.ndarray:
    return np.transpose(np.asarray(a), (2, 1, 0))


def ijk_to_zyx(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(np.asarray(a), (2, 1, 0)))


# -- writing files -------------------------------------------------------------------------------
def write_nifti(path, array_zyx: np.ndarray, affine: np.ndarray, dtype=None) -> Path:
    """Write a ``[Z, Y, X]`` array as NIfTI with ``affine`` (voxel (i, j, k) = (x, y, z))."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.ascontiguousarray(zyx_to_ijk(array_zyx))
    if dtype is not None:
        data = data.astype(dtype)
    img = nib.Nifti1Image(data, np.asarray(affine, float))
    img.set_data_dtype(data.dtype)
    nib.save(img, str(path))
    return path


def write_raw_nifti(path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``data`` exactly as given (any number of dimensions, nibabel order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, float))
    img.set_data_dtype(np.asarray(data).dtype)
    nib.save(img, str(path))
    return path


def read_ijk(path) -> tuple[np.ndarray, np.ndarray]:
    """(data in stored (i, j, k) order, affine) as nibabel reads the file."""
    img = nib.load(str(path))
    return np.asarray(img.dataobj), np.asarray(img.affine, float)


def read_zyx(path) -> np.ndarray:
    return ijk_to_zyx(read_ijk(path)[0])


# -- synthetic anatomy -------------------------------------------------------------------------
def anatomy(shape_zyx=(6, 9, 11), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An asymmetric image (every voxel distinct) and a label map with classes 1, 2 and 3.

    Class 1 on slices 1, 2, 4 (a box in the upper left), class 2 on slice 3 (lower right),
    class 3 on slice 1 only (a single voxel). Nothing is symmetric, so any wrong flip or
    transpose changes the array.
    """
    rng = np.random.default_rng(seed)
    z, y, x = shape_zyx
    image = (rng.permutation(z * y * x).reshape(shape_zyx) * 1.5 + 10.0).astype(np.float32)
    label = np.zeros(shape_zyx, np.int16)
    for s in (1, 2, 4):
        label[s, 1:4, 2:5] = 1
    label[4, 1, 2] = 0  # slice 4's mask differs from slices 1 and 2
    label[3, y - 3:y - 1, x - 4:x - 1] = 2
    label[1, y - 2, 0] = 3
    return image, label


def write_dataset(root, cases: dict, labels: dict, test_labels=None, name: str = "toy",
                  modality: str = "MR", extra: dict | None = None) -> Path:
    """A dataset.json folder.

    ``cases``: {case id: (image_zyx, label_zyx, affine)}; files ``image_<id>.nii.gz`` and
    ``label_<id>.nii.gz``. ``labels``: {class name: id}.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "modality": modality, "labels": dict(labels)}
    if test_labels is not None:
        meta["test_labels"] = list(test_labels)
    if extra:
        meta.update(extra)
    (root / "dataset.json").write_text(json.dumps(meta))
    for cid, (image, label, affine) in cases.items():
        write_nifti(root / f"image_{cid}.nii.gz", image, affine, dtype=np.float32)
        if label is not None:
            write_nifti(root / f"label_{cid}.nii.gz", label, affine, dtype=np.int16)
    return root


def write_pairs(folder, cases: dict, image_dtype=np.float64, label_dtype=np.float64) -> Path:
    """``image_<id>.nii.gz`` / ``label_<id>.nii.gz`` pairs without a dataset.json (published
    layout: images float64, labels float64 too)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for cid, (image, label, affine) in cases.items():
        write_nifti(folder / f"image_{cid}.nii.gz", image, affine, dtype=image_dtype)
        write_nifti(folder / f"label_{cid}.nii.gz", label, affine, dtype=label_dtype)
    return folder


def mentions_shape(message: str, shape) -> bool:
    """Whether ``message`` writes ``shape`` (3 ints) in one of the usual forms, in either order."""
    shape = [int(s) for s in shape]
    forms = []
    for s in (shape, shape[::-1]):
        forms += ["x".join(map(str, s)), " x ".join(map(str, s)), "×".join(map(str, s)),
                  str(tuple(s)), str(list(s))]
    return any(f in message for f in forms)
