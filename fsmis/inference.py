"""Segment a new scan from one annotated scan (files in, file out).

The query is brought to the support's layout (axis flips / in-plane transposes from the
affines, see :mod:`fsmis.data.nifti`), resampled in-plane to the support's pixel spacing and
centre-cropped or padded to the support's in-plane size, predicted with the EP1 pairing
(the selected query slices are split into ``n_part`` consecutive chunks, chunk i segmented
with support slice i), then mapped back: un-cropped, resized to the query's in-plane size
and written on the query's own stored grid and affine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.nifti import DataError, check_pair, load_volume, save_like
from .data.normalize import normalize_volume
from .data.transforms import crop_or_pad, resize_image, resize_mask, uncrop_or_unpad
from .evaluation.protocol import ep1_chunks, support_slice_indices
from .methods.base import Predictor


@dataclass
class ScanPrediction:
    mask_zyx: np.ndarray  # on the query's loaded grid
    support_slices: list
    query_slices: list
    out_path: Path | None


MAX_RESAMPLE = 8.0  # a larger in-plane spacing ratio between query and support is a header error


def parse_slices(text: str | None, n: int) -> tuple[int, int]:
    """``"Z0:Z1"`` (Python slice, stored indices, either end optional) -> (z0, z1)."""
    if not text:
        return 0, n
    try:
        a, b = text.split(":")
        z0 = int(a) if a.strip() else 0
        z1 = int(b) if b.strip() else n
    except ValueError:
        raise ValueError(f"--query-slices {text!r}: expected Z0:Z1") from None
    z0, z1 = max(0, z0 if z0 >= 0 else n + z0), min(n, z1 if z1 >= 0 else n + z1)
    if z0 >= z1:
        raise ValueError(f"--query-slices {text!r} selects no slice of a {n}-slice volume")
    return z0, z1


def predict_scan(predictor: Predictor, support_image: str | Path, support_label: str | Path,
                 label_id: int, query_image: str | Path, out: str | Path | None = None,
                 query_slices: str | None = None, n_part: int = 3, out_value: int | None = None,
                 match_spacing: bool = True, support_generator=None) -> ScanPrediction:
    """``match_spacing``: resample the query in-plane to the support's pixel spacing (default); False
    keeps both grids as stored, as the benchmark evaluator does (same in-plane size, or crop / pad).

    Zero-shot support: ``support_image=None`` and a ``support_generator``
    (:class:`fsmis.genaug.zeroshot.MaskSupportGenerator`): ``support_label`` is a mask file alone, and
    the support slices' images are generated from it (the union of its labels, slice by slice)."""
    if n_part < 1:
        raise ValueError(f"n_part={n_part}: must be >= 1")
    value = label_id if out_value is None else out_value
    if not -32768 <= value <= 32767:
        raise ValueError(f"output value {value} does not fit in int16 (-32768..32767)")
    if support_image is None:
        if support_generator is None:
            raise ValueError("no support image: give one, or a support generator for a mask-only support")
        sup_lab = load_volume(support_label, role="label")
        sup = sup_lab  # the mask's grid is the support grid
    else:
        sup = load_volume(support_image)
        sup_lab = load_volume(support_label, role="label")
        check_pair(sup, sup_lab)
    present = sorted(set(np.unique(sup_lab.array).tolist()) - {0})
    if label_id not in present:
        raise DataError(f"{sup_lab.path}: label {label_id} not present (labels present: {present})")
    s_slices = np.flatnonzero((sup_lab.array == label_id).reshape(sup_lab.shape[0], -1).any(axis=1))
    s_idx = support_slice_indices(s_slices, n_part)

    qry = load_volume(query_image, reference_affine=sup.stored_affine)
    nz, qh, qw = qry.shape
    sh, sw = sup.shape[1:]
    # stored slice selection -> loaded indices (the slice axis may have been flipped)
    z0, z1 = parse_slices(query_slices, nz)
    stored = np.arange(z0, z1)
    flipped = qry.layout.transform[2, 1] < 0
    loaded = np.sort(nz - 1 - stored if flipped else stored)

    # in-plane: resample to the support's spacing, then centre crop / pad to its size
    rh = max(1, int(round(qh * qry.spacing[1] / sup.spacing[1]))) if match_spacing else qh
    rw = max(1, int(round(qw * qry.spacing[2] / sup.spacing[2]))) if match_spacing else qw
    if max(rh / qh, rw / qw, qh / rh, qw / rw) > MAX_RESAMPLE:
        raise DataError(f"{qry.path}: in-plane spacing {qry.spacing[1]:.4g} x {qry.spacing[2]:.4g} mm differs from the "
                        f"support's ({sup.path.name}: {sup.spacing[1]:.4g} x {sup.spacing[2]:.4g} mm) by more than "
                        f"{MAX_RESAMPLE}x: check the headers, or use --as-stored to keep the stored grid")
    q_arr = qry.array if (rh, rw) == (qh, qw) else resize_image(qry.array, (rh, rw))
    q_arr, offset = crop_or_pad(q_arr, (sh, sw), fill=float(qry.array.min()))

    norm = predictor.normalization
    if support_image is None:
        s_img = support_generator.images((sup_lab.array[s_idx] != 0).astype(np.float32), norm)
    else:
        s_img = normalize_volume(sup.array, norm)[s_idx]
    s_msk = (sup_lab.array[s_idx] == label_id).astype(np.float32)
    q_img = normalize_volume(q_arr, norm)

    pred = np.zeros((nz, sh, sw), dtype=bool)
    for i, zs in enumerate(ep1_chunks(loaded, n_part)):
        if len(zs) == 0:
            continue
        out_i = np.asarray(predictor.predict(s_img[i:i + 1], s_msk[i:i + 1], q_img[zs]))
        pred[zs] = out_i > 0.5 if out_i.dtype.kind == "f" else out_i.astype(bool)

    back = uncrop_or_unpad(pred, (rh, rw), offset, fill=False)
    if (rh, rw) != (qh, qw):
        back = resize_mask(back, (qh, qw))
    value = label_id if out_value is None else out_value
    mask = back.astype(np.int32) * value
    out_path = None
    if out is not None:
        dtype = np.uint8 if 0 <= value < 256 else np.int16
        out_path = save_like(mask, qry, out, dtype=dtype)
    stored_sel = [int(nz - 1 - z) if flipped else int(z) for z in loaded]
    return ScanPrediction(mask, [int(s) for s in s_idx], sorted(stored_sel), out_path)
