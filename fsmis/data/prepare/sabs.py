"""SABS (Abd-CT): the Synapse multi-atlas abdomen CT, RawData ``img/imgNNNN.nii.gz`` +
``label/labelNNNN.nii.gz``.

Recipe (docs/protocol.md §3, the SSL-ALPNet preprocessing): HU clipped to [-125, 275] and rescaled per
volume to [0, 255]; 32 px cropped from every in-plane border (512 -> 448); in-plane resampled
to exactly 256 x 256 (spacing x 1.75), z unchanged. Cases re-indexed 0..N-1 in sorted file
order; label ids kept (1 spleen ... 6 liver ... 13).
"""
from __future__ import annotations

from pathlib import Path

from ..nifti import DataError
from .common import RawCase, Recipe, match_number, read_nifti_case, relative


def find_cases(raw: Path) -> list[RawCase]:
    """The first ``img/`` folder holding Synapse images, and the ``label/`` folder beside it."""
    img_re, lab_re = r"img(\d+)\.nii(?:\.gz)?", r"label(\d+)\.nii(?:\.gz)?"
    folders = [raw / "img"] if (raw / "img").is_dir() else sorted(p for p in raw.rglob("img") if p.is_dir())
    for img_dir in folders:
        images = {n: p for p in img_dir.iterdir() if (n := match_number(p.name, img_re)) is not None}
        if images:
            break
    else:
        raise DataError(f"{raw}: no Synapse images (img/imgNNNN.nii.gz) found")
    lab_dir = img_dir.parent / "label"
    if not lab_dir.is_dir():
        raise DataError(f"{lab_dir}: label folder not found (expected beside {img_dir})")
    labels = {n: p for p in lab_dir.iterdir() if (n := match_number(p.name, lab_re)) is not None}
    missing = sorted(set(images) - set(labels))
    if missing:
        raise DataError(f"{lab_dir}: no label for {', '.join(images[n].name for n in missing[:5])}")
    # docs/protocol.md §1: re-indexed 0..N-1 in sorted file order
    return [RawCase(str(i), images[n], labels[n], f"{relative(images[n], raw)} + {relative(labels[n], raw)}")
            for i, n in enumerate(sorted(images))]


RECIPE = Recipe(
    "sabs", "SABS", "CT", hu_window=(-125.0, 275.0), border_crop=32,
    spacing_zyx=(None, None, None), inplane_size=256, supervoxel_min_size=5000,
    classmap_names={n: i for i, n in enumerate(
        ["BGD", "SPLEEN", "KID_R", "KID_l", "GALLBLADDER", "ESOPHAGUS", "LIVER", "STOMACH", "AORTA",
         "IVC", "PS_VEIN", "PANCREAS", "AG_R", "AG_L"])},
    find=find_cases, read=read_nifti_case,
)
