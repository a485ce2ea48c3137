"""One synthetic case: spacing, canvas, anatomy, rendering."""
from __future__ import annotations

import numpy as np

from .anatomy import paint_case
from .canvas import Canvas
from .intensity import render
from .random_fields import _u
from .tissues import labels_for

DEFAULT_SHAPE = (40, 256, 256)
REFERENCE_INPLANE = 256
REFERENCE_SLICES = 40


def check_modality(modality: str) -> str:
    m = str(modality).lower()
    if m not in ("ct", "mr"):
        raise ValueError(f"modality must be 'ct' or 'mr', not {modality!r}")
    return m


def check_shape(shape) -> tuple:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be (Z, Y, X) with every size >= 2, not {shape}")
    return shape


def default_spacing(rng: np.random.Generator, modality: str, shape=DEFAULT_SHAPE) -> tuple:
    """(z, y, x) spacing in mm for a case of ``shape``, field of view kept as at 40 x 256 x 256."""
    Z, Y, X = shape
    if modality == "ct":
        sz, sxy = _u(rng, 2.5, 3.0), _u(rng, 1.4, 1.6)
    else:
        sz, sxy = 7.7, 1.25
    return (sz * REFERENCE_SLICES / Z, sxy * REFERENCE_INPLANE / Y, sxy * REFERENCE_INPLANE / X)


def make_phantom_case(rng: np.random.Generator, modality: str, shape=DEFAULT_SHAPE, spacing=None):
    """One synthetic abdomen: ``(image_zyx float32, label_zyx int16)``.

    ``spacing`` is (z, y, x) in mm (default: :func:`default_spacing`). CT images are in [0, 255]
    (HU clipped to [-125, 275], rescaled); MR images are >= 0, clipped at their 99.5th
    percentile. Label ids: SABS for CT, CHAOS for MR (see :mod:`fsmis.data.phantom`).
    """
    modality = check_modality(modality)
    shape = check_shape(shape)
    if spacing is None:
        spacing = default_spacing(rng, modality, shape)
    cv = Canvas(rng, shape, spacing, labels_for(modality))
    paint_case(cv, rng)
    image = render(cv, rng, modality)
    return image, cv.label
