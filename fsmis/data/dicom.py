"""DICOM series and PNG masks read with SimpleITK (no external converter, no pydicom).

Geometry comes from the DICOM header (ImagePositionPatient, ImageOrientationPatient, pixel
spacing), read by SimpleITK/GDCM, which sorts the files of a series along the slice normal.
ITK works in LPS world coordinates; everything here is returned in the project's convention:
a ``[Z, Y, X]`` array (``Z`` = the series' slice order, ``Y`` = DICOM rows, ``X`` = DICOM
columns) and a nibabel affine (voxel ``(i, j, k) = (x, y, z)`` -> RAS+ millimetres).

A 2D PNG mask drawn on a DICOM slice shares that slice's pixel grid (PNG row ``r``, column
``c`` = DICOM row ``r``, column ``c``), so stacking the masks in the series' slice order gives
a label volume with exactly the image's geometry; no flip is ever assumed.
"""
from __future__ import annotations

import contextlib
import locale
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .nifti import DataError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def itk_affine(origin, spacing, direction) -> np.ndarray:
    """nibabel (RAS+) affine of an ITK image geometry (LPS origin, spacing, 3x3 direction)."""
    d = np.asarray(direction, float).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = _LPS_TO_RAS @ d @ np.diag(np.asarray(spacing, float))
    aff[:3, 3] = _LPS_TO_RAS @ np.asarray(origin, float)
    return aff


@dataclass
class DicomSeries:
    array: np.ndarray  # [Z, Y, X], float64, slices in the order of ``files``
    affine: np.ndarray  # voxel (i, j, k) = (x, y, z) -> RAS+ mm
    files: list  # Path of the file of slice z
    instance_numbers: list  # InstanceNumber (0020|0013) of slice z, or None
    folder: Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(z, y, x) mm."""
        sx, sy, sz = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(sz), float(sy), float(sx)


@contextlib.contextmanager
def keep_locale():
    """SimpleITK's DICOM I/O (GDCM) sets the process locale to "C" and leaves it there; after
    that every text ``open()`` without an encoding would default to ASCII. Restore it."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


def read_dicom_series(folder: str | Path, max_gap_ratio: float = 0.01) -> DicomSeries:
    """Read the one DICOM series in ``folder`` (checks: :func:`_read_dicom_series`)."""
    with keep_locale():
        return _read_dicom_series(folder, max_gap_ratio)


def _read_dicom_series(folder: str | Path, max_gap_ratio: float = 0.01) -> DicomSeries:
    """Read the one DICOM series in ``folder``.

    Refuses (:class:`DataError` naming the folder) a folder with no series or several, a
    series with fewer than 2 slices, and slices that are not evenly spaced along the normal
    (a missing slice would silently shift every label below it).
    """
    import SimpleITK as sitk

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: DICOM folder not found")
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise DataError(f"{folder}: no DICOM series found")
    if len(series_ids) > 1:
        raise DataError(f"{folder}: {len(series_ids)} DICOM series found ({', '.join(series_ids)}); expected one")
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0])
    if len(names) < 2:
        raise DataError(f"{folder}: the DICOM series has {len(names)} slice(s); a volume needs at least 2")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise DataError(f"{folder}: cannot read the DICOM series ({str(exc).strip().splitlines()[-1]})") from exc
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{folder}: expected a 3D single-channel series, got {image.GetDimension()}D "
                        f"with {image.GetNumberOfComponentsPerPixel()} component(s)")
    positions, instances = [], []
    for z in range(len(names)):
        def tag(key):
            return reader.GetMetaData(z, key).strip() if reader.HasMetaDataKey(z, key) else None
        ipp = tag("0020|0032")
        positions.append([float(v) for v in ipp.split("\\")] if ipp else None)
        inst = tag("0020|0013")
        instances.append(int(float(inst)) if inst else None)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    if all(p is not None for p in positions):
        along = np.asarray(positions) @ direction[:, 2]
        gaps = np.diff(along)
        if np.any(gaps <= 0) or (np.ptp(gaps) > max_gap_ratio * float(np.mean(gaps))):
            raise DataError(
                f"{folder}: slices are not evenly spaced along the slice normal (gaps "
                f"{', '.join(f'{g:.2f}' for g in gaps[:8])}{' ...' if len(gaps) > 8 else ''} mm): "
                "missing or duplicate slices?")
        spacing = list(image.GetSpacing())
        spacing[2] = float(np.mean(gaps))  # from the positions, not SliceThickness
        image.SetSpacing(spacing)
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    affine = itk_affine(image.GetOrigin(), image.GetSpacing(), direction)
    return DicomSeries(array, affine, [Path(n) for n in names], instances, folder)


def read_png_mask(path: str | Path) -> np.ndarray:
    """A 2D grey-value mask ``[rows, columns]`` (uint8/uint16 values as stored)."""
    with keep_locale():
        return _read_png_mask(path)


def _read_png_mask(path: str | Path) -> np.ndarray:
    import SimpleITK as sitk

    path = Path(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise DataError(f"{path}: cannot be read as an image ({str(exc).strip().splitlines()[-1]})") from exc
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim == 3 and img.GetNumberOfComponentsPerPixel() > 1:
        # grey drawn as RGB(A): all colour channels must agree
        rgb = arr[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError(f"{path}: a colour image; expected a grey-value mask")
        arr = rgb[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2D mask, got an image of shape {arr.shape}")
    return arr


_TRAILING_NUMBER = re.compile(r"(\d+)\D*$")


def stack_masks(series: DicomSeries, mask_dir: str | Path, suffix: str = ".png") -> np.ndarray:
    """Stack the 2D masks of ``mask_dir`` onto the slices of ``series``: ``[Z, Y, X]`` grey values.

    A mask belongs to the DICOM slice whose file has the same name stem (CHAOS:
    ``DICOM_anon/IMG-0004-00017.dcm`` <-> ``Ground/IMG-0004-00017.png``); failing that, the
    trailing number of the mask's name is taken as the slice's InstanceNumber. Every slice
    needs exactly one mask and every mask one slice; the error names what is missing.
    """
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise DataError(f"{mask_dir}: mask folder not found")
    masks = sorted(p for p in mask_dir.iterdir() if p.suffix.lower() == suffix and not p.name.startswith("."))
    if not masks:
        raise DataError(f"{mask_dir}: no {suffix} masks")
    by_stem = {p.stem: p for p in masks}
    slice_stems = [f.stem for f in series.files]
    if all(s in by_stem for s in slice_stems):
        chosen = [by_stem[s] for s in slice_stems]
        how = "file name"
    else:
        by_number = {}
        for p in masks:
            m = _TRAILING_NUMBER.search(p.stem)
            if m:
                by_number.setdefault(int(m.group(1)), []).append(p)
        missing = [series.files[z].name for z, n in enumerate(series.instance_numbers)
                   if n is None or len(by_number.get(n, [])) != 1]
        if missing:
            raise DataError(
                f"{mask_dir}: no unambiguous mask for {len(missing)} of {len(series.files)} DICOM slices "
                f"(e.g. {', '.join(missing[:3])}); masks are matched to slices by file name, "
                "else by the number at the end of the mask name = the slice's InstanceNumber")
        chosen = [by_number[n][0] for n in series.instance_numbers]
        how = "instance number"
    extra = sorted(set(masks) - set(chosen))
    if extra:
        raise DataError(f"{mask_dir}: {len(extra)} mask(s) match no DICOM slice of {series.folder} "
                        f"(matched by {how}; e.g. {', '.join(p.name for p in extra[:3])})")
    nz, ny, nx = series.array.shape
    out = np.zeros((nz, ny, nx), np.int32)
    for z, p in enumerate(chosen):
        m = read_png_mask(p)
        if m.shape != (ny, nx):
            raise DataError(f"{p}: mask is {m.shape[0]}x{m.shape[1]} (rows x columns) but its DICOM slice "
                            f"{series.files[z].name} is {ny}x{nx}")
        out[z] = m
    return out
