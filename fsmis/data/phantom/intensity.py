"""The intensity model: a painted case's tissue map rendered to a CT or an MR image.

Each tissue has a base value (jittered per case) and two texture amplitudes, applied to the
canvas' shared mid- and low-frequency textures; the image is then blurred (partial volume)
and gets the modality's acquisition model: CT noise in Hounsfield units, clipped to
[-125, 275] and rescaled to [0, 255]; MR (T2-SPIR-like) a smooth multiplicative bias field,
Rician noise, arbitrary scanner units, clipped above the 99.5th percentile.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .canvas import Canvas
from .random_fields import _jit, _u, smooth_noise
from .tissues import (AIR, AORTA, BOWEL_CONTENT, BOWEL_WALL, CORTBONE, CSF, FAT, FECES, GALLBLADDER, GAS, IVC,
                      KID_CORTEX, KID_MEDULLA, KID_PELVIS, LIVER, LIVER_VESSEL, LUNG, MARROW, MUSCLE, N_TISSUES,
                      SPLEEN, STOMACH_FLUID, STOMACH_FOOD, STOMACH_WALL, SUBFAT)

# (base, jitter per case, texture amplitude mid-frequency, texture amplitude low-frequency)
CT_TISSUES = {
    AIR: (-1000, 0, 0, 0), SUBFAT: (-100, 8, 8, 6), MUSCLE: (45, 6, 6, 4), FAT: (-90, 8, 14, 8),
    CORTBONE: (650, 60, 40, 0), MARROW: (260, 40, 45, 10), CSF: (12, 4, 3, 0),
    AORTA: (180, 30, 3, 0), IVC: (110, 20, 4, 4), LIVER: (60, 7, 5, 6), LIVER_VESSEL: (105, 15, 6, 0),
    SPLEEN: (50, 7, 5, 5), KID_CORTEX: (150, 20, 8, 4), KID_MEDULLA: (95, 15, 8, 0),
    KID_PELVIS: (12, 5, 4, 0), STOMACH_WALL: (70, 10, 6, 0), STOMACH_FLUID: (15, 8, 10, 5),
    STOMACH_FOOD: (45, 15, 35, 15), GAS: (-900, 30, 40, 0), BOWEL_WALL: (60, 10, 6, 0),
    BOWEL_CONTENT: (25, 10, 30, 10), FECES: (20, 20, 70, 20), GALLBLADDER: (10, 5, 3, 0),
    LUNG: (-840, 30, 45, 10),
}
# T2-SPIR-like, relative units (fat partly suppressed, fluid bright, flow voids dark)
MR_TISSUES = {
    AIR: (0.0, 0, 0, 0), SUBFAT: (0.21, 0.03, 0.02, 0.02), MUSCLE: (0.13, 0.02, 0.015, 0.01),
    FAT: (0.18, 0.03, 0.03, 0.02), CORTBONE: (0.03, 0.01, 0.01, 0), MARROW: (0.22, 0.04, 0.03, 0.01),
    CSF: (1.0, 0.05, 0.02, 0), AORTA: (0.05, 0.02, 0.01, 0), IVC: (0.10, 0.04, 0.02, 0),
    LIVER: (0.34, 0.03, 0.015, 0.015), LIVER_VESSEL: (0.08, 0.03, 0.02, 0),
    SPLEEN: (0.52, 0.06, 0.02, 0.015), KID_CORTEX: (0.55, 0.06, 0.025, 0.01),
    KID_MEDULLA: (0.70, 0.06, 0.03, 0), KID_PELVIS: (0.92, 0.05, 0.03, 0),
    STOMACH_WALL: (0.30, 0.04, 0.02, 0), STOMACH_FLUID: (0.80, 0.08, 0.05, 0.03),
    STOMACH_FOOD: (0.50, 0.1, 0.12, 0.05), GAS: (0.01, 0.005, 0.005, 0), BOWEL_WALL: (0.30, 0.04, 0.02, 0),
    BOWEL_CONTENT: (0.62, 0.1, 0.15, 0.05), FECES: (0.35, 0.08, 0.15, 0.05),
    GALLBLADDER: (0.95, 0.05, 0.02, 0), LUNG: (0.03, 0.01, 0.015, 0),
}


def render(cv: Canvas, rng: np.random.Generator, modality: str) -> np.ndarray:
    """The image of the painted case ``cv`` (float32 ``[Z, Y, X]``), ``modality`` "ct" or "mr"."""
    img = _tissue_image(cv, rng, CT_TISSUES if modality == "ct" else MR_TISSUES)
    img = _partial_volume_blur(cv, rng, img)
    img = _ct_acquisition(rng, img) if modality == "ct" else _mr_acquisition(cv, rng, img)
    return img.astype(np.float32, copy=False)


def _tissue_values(rng, table):
    """Per-tissue base value (jittered for this case) and texture amplitudes."""
    base = np.zeros(N_TISSUES, np.float32)
    amp_mid = np.zeros(N_TISSUES, np.float32)
    amp_low = np.zeros(N_TISSUES, np.float32)
    for t in range(N_TISSUES):
        b, j, am, al = table[t]
        base[t] = b + (rng.uniform(-j, j) if j else 0.0)
        amp_mid[t], amp_low[t] = am, al
    return base, amp_mid, amp_low


def _tissue_image(cv: Canvas, rng, table) -> np.ndarray:
    base, amp_mid, amp_low = _tissue_values(rng, table)
    t = cv.tissue
    return base[t] + amp_mid[t] * cv.tex_mid + amp_low[t] * cv.tex_low


def _partial_volume_blur(cv: Canvas, rng, img: np.ndarray) -> np.ndarray:
    """Boundaries not trivially sharp (sigma in voxels, ~1 mm in-plane)."""
    sig_xy = _u(rng, 0.6, 0.9) * 1.5 / cv.spacing[1]
    return ndimage.gaussian_filter(img, sigma=(0.5, sig_xy, sig_xy * cv.spacing[1] / cv.spacing[2]), mode="nearest")


def _ct_acquisition(rng, img: np.ndarray) -> np.ndarray:
    """Noise in HU, clipped to [-125, 275], rescaled to [0, 255] by the volume's range."""
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(_u(rng, 10, 18))
    img = np.clip(img, -125.0, 275.0)
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) * np.float32(255.0 / max(hi - lo, 1e-6))


def _mr_acquisition(cv: Canvas, rng, img: np.ndarray) -> np.ndarray:
    """Bias field, Rician noise, scanner units, clipped above the 99.5th percentile."""
    Y, X = cv.shape[1:]
    # smooth multiplicative bias: a random low-frequency field times a surface-coil profile
    fov = (Y * cv.spacing[1], X * cv.spacing[2])
    bias = np.exp(_u(rng, 0.1, 0.2) * smooth_noise(rng, cv.shape, (3, round(fov[0] / 120) + 1, round(fov[1] / 120) + 1)))
    r2 = (cv.U / 160.0) ** 2 + (cv.V / 120.0) ** 2
    bias *= 1 + _u(rng, 0.15, 0.35) * r2 + _jit(rng, 0.1) * cv.V / 120.0
    img = np.maximum(img, 0) * bias
    sigma = np.float32(_u(rng, 0.008, 0.013))
    re = img + rng.standard_normal(img.shape, dtype=np.float32) * sigma
    im = rng.standard_normal(img.shape, dtype=np.float32) * sigma
    img = np.sqrt(re * re + im * im)          # Rician magnitude
    img *= np.float32(_u(rng, 900, 1300))    # arbitrary scanner units
    hi = float(np.percentile(img, 99.5))
    return np.minimum(img, hi)
