"""Procedural 3D abdominal phantoms: the embedded default data (no download needed).

``make_phantom_dataset(out_dir, modality="ct")`` writes a folder that every tool accepts as a
dataset root (``dataset.json`` kind, see :mod:`fsmis.data.datasets`), laid out like the
published preprocessed benchmarks (docs/protocol.md §1, §3):

- ``image_<id>.nii.gz`` (float32) and ``label_<id>.nii.gz`` (int16), ``dataset.json``, and
  (unless ``supervoxels=False``) ``supervoxels_<min_size>/superpix-MIDDLE_<id>.nii.gz``.
- Case ids: ``0..N-1`` for CT (as SABS), ``1..N`` for MR (CHAOS ids start at 1).
- Label ids: CT uses the SABS ids (1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder,
  6 liver, 7 stomach, 8 aorta, 9 IVC); MR uses the CHAOS ids (1 liver, 2 right kidney,
  3 left kidney, 4 spleen). Distractors without an id (bowel, colon, gas, lungs, bone,
  muscle, fat, and on MR also stomach / vessels / gallbladder) are label 0.
- Intensities: CT is rendered in Hounsfield units, then clipped to [-125, 275] and rescaled
  to [0, 255] per volume; MR (T2-SPIR-like) gets a smooth multiplicative bias field and
  Rician noise and is clipped above its 99.5th percentile (arbitrary units, >= 0).

Geometry
  Arrays are ``[Z, Y, X]`` (the project convention). Every file of both modalities is stored
  with the axis-aligned affine ``diag(-sx, -sy, sz)`` (nibabel codes **LPS**): the voxel
  index i (X) runs from the patient's right to left, j (Y) from anterior to posterior, k (Z)
  from inferior to superior. Shown with ``imshow(array[z])`` a slice is in radiological
  convention: anterior at the top, the patient's right (the liver) on the image left.
  In-plane size 256 x 256 by default. Spacing: CT (z, y, x) = (2.5-3.0, 1.4-1.6, same) mm,
  drawn per case; MR (7.7, 1.25, 1.25) mm as CHAOS. For other shapes the spacing is scaled
  so that the field of view stays the same (x, y by 256/size, z by 40/slices).
  The Z slices always span the same upper-abdominal range (above the liver dome down to
  below the kidneys), whatever their number, so small test volumes contain every organ.

Anatomy
  Body outline (super-ellipse varying along z) with subcutaneous fat and a muscle wall;
  lower ribs; lung bases in the top slices; vertebra (cortex, marrow, spinal canal,
  posterior elements), paraspinal and psoas muscles; aorta and IVC; liver (right, with
  vessels), spleen (left, posterolateral), kidneys (bean-shaped, posterior, cortex / medulla
  / pelvis), stomach (wall, heterogeneous contents, air-fluid level), gallbladder, colon
  and small-bowel loops with gas. Per subject: body size and shape, organ positions (about 5-15 mm),
  sizes (+-15 %), in-plane rotations (+-10 deg), slice ranges, tilts, a smooth displacement
  field and smooth level-set noise (3D shape). Organs never overlap: structures are painted
  in a fixed priority order, each voxel keeps the last one painted.

Deterministic: the same ``seed`` (and modality, shape) gives identical arrays and files.
Anatomy along z is laid out on the fraction of the scanned range, so the z spacing in the
header is nominal. dataset.json ``generator`` records seed, modality, n_cases, shape,
``version`` (bump :data:`GENERATOR_VERSION` when the output changes) and ``code`` (a digest of
this package's source); a folder holding exactly the requested phantom is reused, not rewritten.

How hard the phantom is for a baseline: docs/measurements/data_and_evaluation.md.

Modules, in the order a case is made:

- :mod:`.tissues`: tissue classes and the label ids of each modality;
- :mod:`.random_fields`: random draws and smooth random fields;
- :mod:`.canvas`: patient coordinates, deformation, textures, the maps painted into;
- :mod:`.anatomy`: the structures of one case, painted in priority order;
- :mod:`.intensity`: the per-modality intensity model (tissue values, blur, acquisition);
- :mod:`.case`: one case (spacing, canvas, anatomy, image);
- :mod:`.writer`: the dataset folder (files, dataset.json, supervoxels, reuse).
"""
from __future__ import annotations

from .case import DEFAULT_SHAPE, default_spacing, make_phantom_case
from .random_fields import smooth_noise
from .tissues import CT_LABELS, MR_LABELS, TEST_LABELS
from .writer import (FULL_SIZE_MIN_SIZE, GENERATOR_VERSION, affine_for, case_ids, default_supervoxel_min_size,
                     is_phantom_folder, make_phantom_dataset, phantom_is_current)

__all__ = [
    "CT_LABELS", "DEFAULT_SHAPE", "FULL_SIZE_MIN_SIZE", "GENERATOR_VERSION", "MR_LABELS", "TEST_LABELS",
    "affine_for", "case_ids", "default_spacing", "default_supervoxel_min_size", "is_phantom_folder",
    "make_phantom_case", "make_phantom_dataset", "phantom_is_current", "smooth_noise",
]
