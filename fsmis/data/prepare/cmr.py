"""CMR (Card-MRI): MS-CMRSeg ``patient<k>_C0.nii.gz`` + ``patient<k>_C0_manual.nii.gz``.

``sequence`` ``C0`` (bSSFP, the benchmark), ``DE`` (LGE) or ``T2`` for the cross-sequence
direction. Recipe (docs/protocol.md §3): clipped above the 99.5th percentile; resampled to
1.25 x 1.25 x 7.99 mm; centre crop / pad to 256 x 256; oblique short-axis stacks used exactly
as stored (never reoriented, never resliced); labels keep the raw 200 / 500 / 600 (LV-MYO,
LV-BP, RV), as the published files and :data:`fsmis.data.datasets.BENCHMARKS`.
"""
from __future__ import annotations

from pathlib import Path

from ..nifti import DataError
from .common import RawCase, Recipe, match_number, read_nifti_case, relative

CMR_SEQUENCES = ("C0", "DE", "T2")


def find_cases(raw: Path, sequence: str) -> list[RawCase]:
    """Patients with both an image and a manual label of ``sequence``, anywhere below ``raw``."""
    img_re = rf"patient(\d+)_{sequence}\.nii(?:\.gz)?"
    lab_re = rf"patient(\d+)_{sequence}_manual\.nii(?:\.gz)?"
    images, labels = {}, {}
    for p in sorted(raw.rglob(f"patient*_{sequence}*.nii*")):
        if (n := match_number(p.name, img_re)) is not None:
            images.setdefault(n, p)
        elif (n := match_number(p.name, lab_re)) is not None:
            labels.setdefault(n, p)
    both = sorted(set(images) & set(labels))
    if not both:
        raise DataError(f"{raw}: no MS-CMRSeg pairs patient<k>_{sequence}.nii.gz + patient<k>_{sequence}_manual.nii.gz")
    return [RawCase(str(n), images[n], labels[n], f"{relative(images[n], raw)} + {relative(labels[n], raw)}")
            for n in both]


RECIPE = Recipe(
    "cmr", "CMR", "MR", clip_percentile=99.5, spacing_zyx=(7.99, 1.25, 1.25), inplane_size=256,
    supervoxel_min_size=1000,
    classmap_names={"BG": 0, "LV-MYO": 200, "LV-BP": 500, "RV": 600},
    find=find_cases, read=read_nifti_case, sequences=CMR_SEQUENCES,
)
