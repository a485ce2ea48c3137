"""CHAOS T2 (Abd-MRI): ``Train_Sets/MR/<patient>/T2SPIR/DICOM_anon/*.dcm`` + ``Ground/*.png``.

The DICOM series is read with SimpleITK; each PNG is stacked on the slice of the DICOM file
with the same name, so the label has the image's geometry by construction. Grey 63/126/189/252
-> 1 liver, 2 RK, 3 LK, 4 spleen. Recipe (docs/protocol.md §3): intensities clipped above the 99.5th
percentile; resampled to 1.25 x 1.25 x 7.70 mm; centre crop / pad to 256 x 256 (image padded
with its minimum). Stored LAS, as the published archive, reached by the axis flips the affine
calls for (an axial series in any in-plane orientation ends LAS), never by a fixed flip.
Case id = patient.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..nifti import DataError
from .common import RawCase, Recipe, relative

# the 20 CHAOS MR training patients (docs/protocol.md §1)
CHAOS_PATIENTS = ("1", "2", "3", "5", "8", "10", "13", "15", "19", "20", "21", "22", "31", "32", "33", "34",
                  "36", "37", "38", "39")
# CHAOS ground-truth grey values (challenge definition: 63, 126, 189, 252 with these tolerances)
CHAOS_GREY = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))


def find_cases(raw: Path) -> list[RawCase]:
    """Every ``T2SPIR`` folder of a numbered patient with ground truth (test-set patients have none)."""
    found = {}
    for t2 in sorted(raw.rglob("T2SPIR")):
        patient = t2.parent.name
        if not (t2.is_dir() and patient.isdigit()):
            continue
        dicom, ground = t2 / "DICOM_anon", t2 / "Ground"
        if not dicom.is_dir():
            raise DataError(f"{dicom}: DICOM folder not found for CHAOS patient {patient}")
        if not ground.is_dir():
            continue  # a test-set patient: no ground truth
        pid = str(int(patient))
        if pid in found:
            raise DataError(f"{raw}: CHAOS patient {pid} found twice ({found[pid].image} and {dicom})")
        found[pid] = RawCase(pid, dicom, ground, f"{relative(dicom, raw)} + {relative(ground, raw)}")
    if not found:
        raise DataError(f"{raw}: no CHAOS MR patients (Train_Sets/MR/<patient>/T2SPIR/DICOM_anon + Ground) found")
    return [found[k] for k in sorted(found, key=int)]


def chaos_grey_to_ids(grey: np.ndarray, where: str) -> np.ndarray:
    """CHAOS PNG grey values -> 1 liver, 2 RK, 3 LK, 4 spleen (challenge tolerances)."""
    out = np.zeros(grey.shape, np.int32)
    known = grey == 0
    for lo, hi, cid in CHAOS_GREY:
        m = (grey >= lo) & (grey <= hi)
        out[m] = cid
        known |= m
    if not known.all():
        vals = np.unique(grey[~known])[:8]
        raise DataError(f"{where}: mask grey values {vals.tolist()} are not CHAOS classes "
                        "(63 liver, 126 right kidney, 189 left kidney, 252 spleen)")
    return out


def read_case(recipe: Recipe, rc: RawCase):
    """The DICOM series and its PNG masks stacked on it, as class ids."""
    from ..dicom import read_dicom_series, stack_masks

    series = read_dicom_series(rc.image)
    grey = stack_masks(series, rc.label)
    return series.array, chaos_grey_to_ids(grey, str(rc.label)), series.affine


def report_note(case_ids: set) -> str:
    """Whether the report covers the benchmark's 20 patients."""
    return ("the 20 CHAOS MR training patients" if case_ids == set(CHAOS_PATIENTS) else
            f"{len(case_ids)} patient(s); the benchmark uses 20: {', '.join(CHAOS_PATIENTS)}")


RECIPE = Recipe(
    "chaos", "CHAOST2", "MR", clip_percentile=99.5, spacing_zyx=(7.70, 1.25, 1.25), inplane_size=256,
    target_codes="LAS", supervoxel_min_size=5000,
    classmap_names={"BG": 0, "LIVER": 1, "RK": 2, "LK": 3, "SPLEEN": 4},
    find=find_cases, read=read_case, report_note=report_note,
)
