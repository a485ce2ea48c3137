"""Prepare the three public benchmarks from their raw downloads (docs/protocol.md §1-§4).

``prepare_dataset("sabs" | "chaos" | "cmr", raw, out)`` writes the published layout that every
loader here reads into the benchmark folder ``out``::

    out/<folder>/image_<id>.nii.gz, label_<id>.nii.gz   float64 clipped image, int16 stored label ids
    out/<folder>/dataset.json, classmap_1.json          settings; class-slice index
    out/supervoxels_<n>/superpix-MIDDLE_<id>.nii.gz     3D supervoxels (docs/protocol.md §4)
    out/preparation_report.json, .md                    per case: source, geometry, label counts
    out/checksums.sha256                                ``sha256sum -c`` format

One module per benchmark (``sabs``, ``chaos``, ``cmr``: its raw layout and recipe), the shared
machinery in ``common``, and ``compare`` for checking two prepared folders against each other.
"""
from . import chaos, cmr, sabs
from .chaos import CHAOS_PATIENTS
from .common import (RECIPES, PreparationPlan, RawCase, Recipe, centre_window, check_alignment, crop_or_pad,
                     find_raw_cases, plan_preparation, prepare_case, prepare_dataset, preprocess, register,
                     resample_to, spacing_of, verify_checksums, write_checksums, write_classmap, write_report)

register(sabs.RECIPE, chaos.RECIPE, cmr.RECIPE)  # this order: the order of every "choose from" list

__all__ = [
    "RECIPES", "Recipe", "RawCase", "PreparationPlan", "plan_preparation", "prepare_dataset",
    "find_raw_cases", "prepare_case", "verify_checksums", "write_checksums", "CHAOS_PATIENTS",
    "preprocess", "check_alignment", "write_classmap", "write_report",
    "spacing_of", "crop_or_pad", "centre_window", "resample_to",
]
