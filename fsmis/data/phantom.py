"""Procedural 3D abdominal phantoms: the embedded default data (no download needed).

``make_phantom_dataset(out_dir, modality="ct")`` writes a folder that every tool accepts as a
dataset root (``dataset.json`` kind, see :mod:`fsmis.data.datasets`), laid out like the
published preprocessed benchmarks (protocol §1, §3):

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
this file); a folder holding exactly the requested phantom is reused, not rewritten.

Difficulty: the ``support-copy`` floor (EP1 protocol, default 8-case datasets) scores about
0.50 (CT) and 0.55 (MR) mean Dice over the four organs; the organs' intensities tell them
apart from their surroundings, so a method that reads the image can do better.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..atomic import atomic_write_json

GENERATOR_VERSION = 1
DEFAULT_SHAPE = (40, 256, 256)
REFERENCE_INPLANE = 256
REFERENCE_SLICES = 40
FULL_SIZE_MIN_SIZE = 5000  # supervoxel min_size for 256 x 256 in-plane (protocol §4)

CT_LABELS = {
    "spleen": 1, "right_kidney": 2, "left_kidney": 3, "gallbladder": 4,
    "liver": 6, "stomach": 7, "aorta": 8, "ivc": 9,
}
MR_LABELS = {"liver": 1, "right_kidney": 2, "left_kidney": 3, "spleen": 4}
TEST_LABELS = ["liver", "spleen", "left_kidney", "right_kidney"]

# ---- tissue classes (internal; rendered to intensities) --------------------------------------
AIR, SUBFAT, MUSCLE, FAT, CORTBONE, MARROW, CSF, AORTA, IVC, LIVER, LIVER_VESSEL, SPLEEN, \
    KID_CORTEX, KID_MEDULLA, KID_PELVIS, STOMACH_WALL, STOMACH_FLUID, STOMACH_FOOD, GAS, \
    BOWEL_WALL, BOWEL_CONTENT, FECES, GALLBLADDER, LUNG = range(24)
N_TISSUES = 24

# (base, jitter per case, texture amplitude mid-frequency, texture amplitude low-frequency)
_CT_TISSUES = {
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
_MR_TISSUES = {
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


# ---- smooth random fields ---------------------------------------------------------------------
def _interp_matrix(n_out: int, n_grid: int) -> np.ndarray:
    g = np.linspace(0.0, n_grid - 1.0, n_out)
    w = np.exp(-0.5 * ((g[:, None] - np.arange(n_grid)[None, :]) / 0.6) ** 2)
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_noise(rng: np.random.Generator, shape, grid) -> np.ndarray:
    """A smooth random field of ``shape`` (about unit std) interpolated from a random grid.

    Separable Gaussian-weighted interpolation done with three small matrix products, so a
    40 x 256 x 256 field costs a few milliseconds.
    """
    grid = tuple(max(2, int(g)) for g in grid)
    g = rng.standard_normal(grid).astype(np.float32)
    wz, wy, wx = (_interp_matrix(int(n), m) for n, m in zip(shape, grid))
    a = np.tensordot(g, wx, axes=([2], [1]))      # (gz, gy, X)
    a = np.tensordot(a, wy, axes=([1], [1]))      # (gz, X, Y)
    a = np.tensordot(a, wz, axes=([0], [1]))      # (X, Y, Z)
    out = np.ascontiguousarray(np.transpose(a, (2, 1, 0)))
    # the interpolation averages neighbouring nodes: restore about unit variance
    scale = float(np.sqrt((wz ** 2).sum(1).mean() * (wy ** 2).sum(1).mean() * (wx ** 2).sum(1).mean()))
    out /= max(scale, 1e-6)
    return out


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


# ---- the canvas -----------------------------------------------------------------------------------
class _Canvas:
    """Coordinates and the tissue / label maps of one case being painted.

    Patient coordinates: u (mm, + towards the patient's left = image right), v (mm,
    + posterior = image down), t (0 = bottom slice region, 1 = top: fraction of the scanned
    cranio-caudal range). ``U``, ``V`` are 3D (deformed by a smooth displacement field).
    """

    def __init__(self, rng, shape, spacing, labels, max_disp=7.0):
        self.rng = rng
        self.shape = Z, Y, X = tuple(int(s) for s in shape)
        self.spacing = sz, sy, sx = tuple(float(s) for s in spacing)
        self.labels = labels
        self.margin = max_disp + 2.0
        # scanned range in t: a little jitter of where the scan starts / stops
        t0, t1 = _u(rng, -0.04, 0.04), _u(rng, 0.96, 1.04)
        self.T = np.linspace(t0, t1, Z).astype(np.float32) if Z > 1 else np.array([0.5], np.float32)
        # body centre offset and global rotation
        off_u, off_v = _u(rng, -5, 5), _u(rng, -6, 4)
        rot = math.radians(_u(rng, -5, 5))
        x = (np.arange(X, dtype=np.float32) - (X - 1) / 2) * sx
        y = (np.arange(Y, dtype=np.float32) - (Y - 1) / 2) * sy
        yy, xx = np.meshgrid(y, x, indexing="ij")
        xx, yy = xx - off_u, yy - off_v
        c, s = math.cos(rot), math.sin(rot)
        self.U0 = (c * xx + s * yy).astype(np.float32)
        self.V0 = (-s * xx + c * yy).astype(np.float32)
        fov = (Y * sy, X * sx)
        grid = (max(2, round(Z / 10)) + 1, round(fov[0] / 90) + 1, round(fov[1] / 90) + 1)
        du = np.clip(smooth_noise(rng, self.shape, grid) * (max_disp / 2.5), -max_disp, max_disp)
        dv = np.clip(smooth_noise(rng, self.shape, grid) * (max_disp / 2.5), -max_disp, max_disp)
        self.U = self.U0[None] + du
        self.V = self.V0[None] + dv
        del du, dv
        self.tissue = np.zeros(self.shape, np.uint8)
        self.label = np.zeros(self.shape, np.int16)
        # textures shared by painting and rendering
        mid = (max(2, Z // 2) + 1, round(fov[0] / 7) + 1, round(fov[1] / 7) + 1)
        self.tex_mid = smooth_noise(rng, self.shape, mid)
        low = (max(2, Z // 8) + 1, round(fov[0] / 35) + 1, round(fov[1] / 35) + 1)
        self.tex_low = smooth_noise(rng, self.shape, low)

    # -- boxes ----------------------------------------------------------------------------------
    def box(self, u_lo, u_hi, v_lo, v_hi, t_lo, t_hi):
        """Voxel slices covering the given patient-coordinate ranges (plus deformation margin)."""
        m = self.margin
        zs = np.flatnonzero((self.T >= t_lo) & (self.T <= t_hi))
        sel = (self.U0 >= u_lo - m) & (self.U0 <= u_hi + m) & (self.V0 >= v_lo - m) & (self.V0 <= v_hi + m)
        rows, cols = np.flatnonzero(sel.any(axis=1)), np.flatnonzero(sel.any(axis=0))
        if zs.size == 0 or rows.size == 0 or cols.size == 0:
            return None
        return (slice(zs[0], zs[-1] + 1), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))

    def box_around(self, cu, cv, r, t_lo, t_hi):
        return self.box(cu - r, cu + r, cv - r, cv + r, t_lo, t_hi)

    def coords(self, box):
        return self.U[box], self.V[box], self.T[box[0]][:, None, None]

    def noise(self, box, corr_mm=40.0, corr_t=0.15):
        zs, ys, xs = box
        nz, ny, nx = zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start
        tspan = float(self.T[zs.stop - 1] - self.T[zs.start]) if nz > 1 else 0.0
        grid = (math.ceil(tspan / corr_t) + 1, math.ceil(ny * self.spacing[1] / corr_mm) + 1,
                math.ceil(nx * self.spacing[2] / corr_mm) + 1)
        return smooth_noise(self.rng, (nz, ny, nx), grid)

    # -- shapes ----------------------------------------------------------------------------------
    def ellipsoid(self, box, cu, cv, ct, a, b, c, theta=0.0, tilt_u=0.0, tilt_v=0.0):
        """1 - r^2 of an ellipsoid (semi-axes a along direction theta, b across it, c in t)."""
        U, V, T = self.coords(box)
        dt = T - ct
        du = U - (cu + tilt_u * dt)
        dv = V - (cv + tilt_v * dt)
        co, si = math.cos(theta), math.sin(theta)
        p = co * du + si * dv
        q = -si * du + co * dv
        return 1.0 - (p / a) ** 2 - (q / b) ** 2 - (dt / c) ** 2

    # -- painting --------------------------------------------------------------------------------
    def paint(self, box, mask, tissue, name=None):
        """Paint ``tissue`` where ``mask``; label ``name``'s id (0 if it has none here)."""
        if box is None:
            return
        tv, lv = self.tissue[box], self.label[box]
        tv[mask] = tissue
        lv[mask] = self.labels.get(name, 0) if name else 0


# ---- anatomy --------------------------------------------------------------------------------------
def _jit(rng, j):
    return _u(rng, -j, j)


def _paint_case(cv: _Canvas, rng: np.random.Generator) -> None:
    X = cv.shape[2]
    T = cv.T[:, None, None]
    fov_half_u = X * cv.spacing[2] / 2

    # ---------------- body, fat, muscle wall, cavity ----------------
    A0 = min(_u(rng, 132, 165), 0.97 * fov_half_u)
    Ba0 = _u(rng, 95, 120)           # anterior semi-axis
    Bp0 = _u(rng, 82, 100)           # posterior semi-axis
    ph = _u(rng, 0, 2 * math.pi)
    A = A0 * (1 + 0.05 * (0.5 - T) + 0.03 * np.sin(5 * T + ph))
    Ba = Ba0 * (1 + 0.06 * (0.5 - T) + 0.03 * np.cos(4 * T + ph))
    Bp = np.full_like(T, Bp0)
    pw = _u(rng, 2.1, 2.6)           # super-ellipse exponent
    fat_ant, fat_lat, fat_post = _u(rng, 10, 32), _u(rng, 8, 26), _u(rng, 8, 20)
    wall = _u(rng, 7, 12)
    U, V = cv.U, cv.V

    def rho(a, ba, bp):
        b = np.where(V < 0, ba, bp)
        return (np.abs(U) / a) ** pw + (np.abs(V) / b) ** pw

    body = rho(A, Ba, Bp) <= 1.0
    muscle_out = rho(A - fat_lat, Ba - fat_ant, Bp - fat_post) <= 1.0
    Ac, Bac, Bpc = A - fat_lat - wall, Ba - fat_ant - wall, Bp - fat_post - wall
    rho_c = rho(Ac, Bac, Bpc)
    cavity = rho_c <= 1.0
    cv.tissue[body] = SUBFAT
    cv.tissue[muscle_out] = MUSCLE
    cv.tissue[cavity] = FAT
    cv.cavity = cavity
    ac_m, bpc_m = float(np.mean(Ac)), float(np.mean(Bpc))   # mean cavity semi-axes (lateral, posterior)
    del body, muscle_out

    # lower ribs: pieces of a ring just outside the cavity, their pattern drifting along z
    phi = np.arctan2(V, U)
    rib_phase = T * _u(rng, 55, 70) + _u(rng, 0, 6.3)
    ribs = (rho_c > 1.0) & (rho_c < 1.0 + 9.0 / Ac) & (np.sin(9 * phi + rib_phase) > 0.55)
    rib_top = _u(rng, 0.5, 0.6)      # ribs all around above this level, posterolaterally lower
    ribs &= (T > rib_top) | ((T > rib_top - 0.25) & (V > 0) & (np.abs(U) > 40))
    ribs &= (V < 0.8 * Bpc)
    cv.tissue[ribs] = CORTBONE
    del ribs, phi

    # lung bases above a dome-shaped diaphragm: peripheral crescents in the top slices, deepest
    # posteriorly (costophrenic recesses); the organs painted later cover the dome
    r = rho_c ** (1.0 / pw)
    dome = _u(rng, 1.12, 1.22) - _u(rng, 0.3, 0.4) * r ** 2 - _u(rng, 0.1, 0.16) * np.clip(V / Bpc, 0, 1)
    lung = cavity & (T > dome) & ~((np.abs(U) < 35) & (V > 0))
    cv.tissue[lung] = LUNG
    del lung, dome, r

    # ---------------- spine (geometry; painted last, highest priority) ----------------
    vb_v = float(Bp0 - fat_post - wall) - _u(rng, 34, 42)   # vertebral body centre
    vb_u = _jit(rng, 4)
    vb_r = _u(rng, 17, 22)

    # ---------------- bowel loops (lowest-priority distractors) ----------------
    n_loops = int(rng.integers(10, 18))
    for _ in range(n_loops):
        cu_, cv_ = _u(rng, -90, 90), _u(rng, -85, 20)
        ct_ = _u(rng, 0.0, 0.5)
        r1, r2, rc = _u(rng, 10, 22), _u(rng, 10, 20), _u(rng, 0.04, 0.12)
        th = _u(rng, 0, math.pi)
        bx = cv.box_around(cu_, cv_, max(r1, r2) * 1.4, ct_ - rc, ct_ + rc)
        if bx is None:
            continue
        f = cv.ellipsoid(bx, cu_, cv_, ct_, r1, r2, rc, th) + 0.25 * cv.noise(bx, 25, 0.1)
        m = (f > 0) & cavity[bx]
        cv.paint(bx, m, BOWEL_WALL)
        inner = m & (f > 6.0 / min(r1, r2))
        content = np.where(cv.tex_mid[bx] > _u(rng, 0.6, 2.5), GAS, BOWEL_CONTENT)
        cv.tissue[bx][inner] = content[inner]

    # ---------------- colon: ascending (right), descending (left), transverse ----------------
    def colon_segment(cu0, cv0, t_lo, t_hi, r, wobble=10.0):
        bx = cv.box_around(cu0, cv0, r + wobble + 5, t_lo - 0.05, t_hi + 0.05)
        if bx is None:
            return
        Uc, Vc, Tc = cv.coords(bx)
        k = rng.uniform(0, 6.3, 4)
        cu_t = cu0 + wobble * np.sin(7 * Tc + k[0])
        cv_t = cv0 + wobble * np.sin(5 * Tc + k[1])
        rr = r * (1 + 0.25 * np.sin(25 * Tc + k[2]))   # haustra
        f = 1 - ((Uc - cu_t) ** 2 + (Vc - cv_t) ** 2) / rr ** 2 + 0.25 * cv.noise(bx, 20, 0.08)
        f = np.where((Tc >= t_lo) & (Tc <= t_hi), f, -1)
        m = (f > 0) & cavity[bx]
        cv.paint(bx, m, BOWEL_WALL)
        inner = m & (f > 5.0 / r)
        gas_side = Vc < (cv_t - r * _u(rng, -0.3, 0.5))   # gas rises anteriorly
        content = np.where(gas_side | (cv.tex_mid[bx] > 1.3), GAS, FECES)
        cv.tissue[bx][inner] = content[inner]

    colon_segment(-float(Ac.mean()) + _u(rng, 22, 35), _u(rng, -25, 10), -0.1, _u(rng, 0.38, 0.48), _u(rng, 16, 24))
    colon_segment(float(Ac.mean()) - _u(rng, 20, 32), _u(rng, -15, 20), -0.1, _u(rng, 0.5, 0.6), _u(rng, 13, 20))
    tc_t = _u(rng, 0.38, 0.5)
    bx = cv.box(-110, 110, -95, -20, tc_t - 0.12, tc_t + 0.12)
    if bx is not None:
        f = cv.ellipsoid(bx, 0, _u(rng, -70, -55), tc_t, _u(rng, 90, 115), _u(rng, 14, 20), _u(rng, 0.05, 0.08),
                         _jit(rng, 0.1)) + 0.3 * cv.noise(bx, 30, 0.1)
        m = (f > 0) & cavity[bx]
        cv.paint(bx, m, BOWEL_WALL)
        inner = m & (f > 0.35)
        content = np.where(cv.tex_mid[bx] > 0.2, GAS, FECES)
        cv.tissue[bx][inner] = content[inner]

    # ---------------- stomach (left upper quadrant; wall, contents, air-fluid level) ----------------
    st_lo, st_hi = _u(rng, 0.48, 0.58), _u(rng, 0.86, 0.95)
    dist = _u(rng, 0.75, 1.2)
    p_top = (_u(rng, 45, 70), _u(rng, -15, 10))      # fundus
    p_mid = (_u(rng, 35, 60), _u(rng, -50, -30))     # body
    p_bot = (_u(rng, -5, 25), _u(rng, -70, -50))     # antrum
    bx = cv.box(-40, 110, -110, 40, st_lo, st_hi)
    if bx is not None:
        Uc, Vc, Tc = cv.coords(bx)
        s = np.clip((Tc - st_lo) / (st_hi - st_lo), 0, 1)
        # quadratic Bezier through the three points
        cu_t = (1 - s) ** 2 * p_bot[0] + 2 * s * (1 - s) * p_mid[0] + s ** 2 * p_top[0]
        cv_t = (1 - s) ** 2 * p_bot[1] + 2 * s * (1 - s) * p_mid[1] + s ** 2 * p_top[1]
        r = dist * (22 + 16 * np.sin(np.pi * np.clip(s * 1.1, 0, 1)))
        ang = _u(rng, -0.6, 0.6)
        du, dvv = Uc - cu_t, Vc - cv_t
        p = math.cos(ang) * du + math.sin(ang) * dvv
        q = -math.sin(ang) * du + math.cos(ang) * dvv
        f = 1 - (p / (1.2 * r)) ** 2 - (q / r) ** 2 - ((Tc - (st_lo + st_hi) / 2) / ((st_hi - st_lo) / 2)) ** 8
        f = f + 0.25 * cv.noise(bx, 35, 0.15)
        m = (f > 0) & cavity[bx]
        cv.paint(bx, m, STOMACH_WALL, "stomach")
        inner = m & (f > 10.0 / r)
        level = cv_t - r * _u(rng, 0.3, 0.85)
        content = np.where(Vc < level, GAS, np.where(cv.tex_mid[bx] > _u(rng, -0.5, 1.0), STOMACH_FOOD, STOMACH_FLUID))
        cv.tissue[bx][inner] = content[inner]

    # ---------------- liver (right upper quadrant) ----------------
    ls = _u(rng, 0.85, 1.15)
    lr_u, lr_v = _jit(rng, 15), _jit(rng, 15)
    l_t = _u(rng, 0.68, 0.76)
    l_rot = math.radians(_jit(rng, 10))
    t_bot = _u(rng, 0.36, 0.46)
    bx = cv.box(-170, 120, -130, 80, t_bot - 0.02, 1.1)
    if bx is not None:
        Uc, Vc, Tc = cv.coords(bx)
        # rotate about the right lobe centre
        cu0, cv0 = -60 + lr_u, -5 + lr_v
        co, si = math.cos(l_rot), math.sin(l_rot)
        Ur = cu0 + co * (Uc - cu0) + si * (Vc - cv0)
        Vr = cv0 - si * (Uc - cu0) + co * (Vc - cv0)
        sa, sb, sc = ls * _u(rng, 0.9, 1.1), ls * _u(rng, 0.9, 1.1), _u(rng, 0.9, 1.1)

        def ell(cu, cvv, ct, a, b, c, th=0.0):
            du, dvv = Ur - cu, Vr - cvv
            p = math.cos(th) * du + math.sin(th) * dvv
            q = -math.sin(th) * du + math.cos(th) * dvv
            return 1 - (p / a) ** 2 - (q / b) ** 2 - ((Tc - ct) / c) ** 2

        right = ell(cu0, cv0, l_t, 70 * sa, 80 * sb, 0.32 * sc)
        tip = ell(cu0 - 25 * sa, cv0 + 10, t_bot + 0.12, 42 * sa, 55 * sb, 0.13 * sc)
        left_lobe = ell(cu0 + _u(rng, 55, 75) * sa, cv0 - 45 * sb, l_t + _u(rng, -0.02, 0.06),
                        _u(rng, 40, 60) * sa, _u(rng, 24, 34) * sb, _u(rng, 0.14, 0.2) * sc, math.radians(_u(rng, 5, 25)))
        f = np.maximum(np.maximum(right, tip), left_lobe)
        # nothing posterior-medial: the aorta, the spine and the left posterior quadrant are not liver
        ex = ((Uc - vb_u - _u(rng, 35, 45)) / _u(rng, 50, 60)) ** 2 + ((Vc - vb_v - 5) / _u(rng, 42, 50)) ** 2
        f = np.minimum(f, 0.5 * (ex - 1)) + 0.3 * cv.noise(bx, 45, 0.2)
        f = np.where(Tc > t_bot, f, -1)
        m = (f > 0) & cavity[bx]
        cv.paint(bx, m, LIVER, "liver")
        vessels = m & (f > 0.12) & (np.abs(cv.noise(bx, 20, 0.12)) < 0.1) & (cv.noise(bx, 15, 0.1) > 0.3)
        cv.tissue[bx][vessels] = LIVER_VESSEL

    # ---------------- gallbladder (under the liver, anterior) ----------------
    gb = rng.uniform() < 0.85
    gb_t = _u(rng, 0.4, 0.52)
    gb_u, gb_v = -40 + lr_u + _jit(rng, 10), -55 + _jit(rng, 10)
    if gb:
        bx = cv.box_around(gb_u, gb_v, 40, gb_t - 0.12, gb_t + 0.12)
        if bx is not None:
            f = cv.ellipsoid(bx, gb_u, gb_v, gb_t, _u(rng, 12, 20), _u(rng, 20, 30), _u(rng, 0.05, 0.09),
                             _u(rng, 0.5, 1.3)) + 0.15 * cv.noise(bx, 20, 0.1)
            m = (f > 0) & cavity[bx]
            cv.paint(bx, m, GALLBLADDER, "gallbladder")

    # ---------------- spleen (left, posterolateral) ----------------
    ss = _u(rng, 0.85, 1.15)
    sp_u, sp_v = ac_m * _u(rng, 0.68, 0.74) + _jit(rng, 5), bpc_m * _u(rng, 0.42, 0.58) + _jit(rng, 5)
    sp_t = _u(rng, 0.64, 0.74)
    sp_c = _u(rng, 0.12, 0.18)
    sp_th = math.radians(-60 + _jit(rng, 8))
    a, b = 55 * ss * _u(rng, 0.9, 1.1), 24 * ss * _u(rng, 0.9, 1.1)
    bx = cv.box_around(sp_u, sp_v, a * 1.3, sp_t - sp_c * 1.2, sp_t + sp_c * 1.2)
    if bx is not None:
        tu, tv = _jit(rng, 80), _jit(rng, 80)
        f = cv.ellipsoid(bx, sp_u, sp_v, sp_t, a, b, sp_c, sp_th, tu, tv)
        # concave (hilar) side faces anteromedially
        n_u, n_v = -math.sin(sp_th), math.cos(sp_th)
        if n_u > 0:                      # make the normal point medially (towards -u)
            n_u, n_v = -n_u, -n_v
        notch = cv.ellipsoid(bx, sp_u + n_u * 1.3 * b, sp_v + n_v * 1.3 * b, sp_t, 0.6 * a, 0.75 * b, sp_c * 0.9,
                             sp_th, tu, tv)
        f = np.minimum(f, -notch) + 0.22 * cv.noise(bx, 35, 0.15)
        m = (f > 0) & cavity[bx]
        cv.paint(bx, m, SPLEEN, "spleen")

    # ---------------- kidneys (posterior, bean-shaped) ----------------
    ks = _u(rng, 0.85, 1.15)
    for side, name in ((+1, "left_kidney"), (-1, "right_kidney")):
        kss = ks * _u(rng, 0.92, 1.08)
        ku = side * (ac_m * _u(rng, 0.54, 0.6) + _jit(rng, 4))
        kv = vb_v + _u(rng, -1, 7) + _jit(rng, 3)
        kt = (_u(rng, 0.42, 0.5) if side > 0 else _u(rng, 0.36, 0.44))
        kc = _u(rng, 0.13, 0.18)
        # hilum faces anteromedially
        h_ang = math.atan2(-0.7, -side * 1.0) + math.radians(_jit(rng, 12))
        hu, hv = math.cos(h_ang), math.sin(h_ang)
        a_h, b_l = 20 * kss * _u(rng, 0.9, 1.1), 29 * kss * _u(rng, 0.9, 1.1)
        tilt_u = -side * _u(rng, 0, 60)   # upper pole more medial
        tilt_v = _u(rng, 0, 60)             # and more posterior
        bx = cv.box_around(ku, kv, b_l * 1.3 + 20, kt - kc * 1.1, kt + kc * 1.1)
        if bx is None:
            continue
        f = cv.ellipsoid(bx, ku, kv, kt, a_h, b_l, kc, h_ang, tilt_u, tilt_v)
        notch = cv.ellipsoid(bx, ku + hu * a_h, kv + hv * a_h, kt, 0.5 * a_h, 0.4 * b_l, 0.55 * kc, h_ang, tilt_u, tilt_v)
        fk = np.minimum(f, -notch) + 0.12 * cv.noise(bx, 30, 0.15)
        m = (fk > 0) & cavity[bx]
        cv.paint(bx, m, KID_CORTEX, name)
        med = m & (f > 0.35) & (cv.noise(bx, 9, 0.05) > -0.3)
        cv.tissue[bx][med] = KID_MEDULLA
        pel = cv.ellipsoid(bx, ku + hu * 0.45 * a_h, kv + hv * 0.45 * a_h, kt, 0.45 * a_h, 0.32 * b_l, 0.45 * kc,
                           h_ang, tilt_u, tilt_v)
        cv.tissue[bx][m & (pel > 0)] = KID_PELVIS

    # ---------------- great vessels ----------------
    ao_u, ao_v, ao_r = vb_u + _u(rng, 8, 20), vb_v - vb_r - _u(rng, 10, 16), _u(rng, 9, 13)
    bx = cv.box_around(ao_u, ao_v, ao_r + 15, -1, 2)
    if bx is not None:
        Uc, Vc, Tc = cv.coords(bx)
        k = rng.uniform(0, 6.3, 2)
        cu_t = ao_u + 5 * np.sin(3 * Tc + k[0])
        cv_t = ao_v + 5 * np.sin(2 * Tc + k[1])
        m = (Uc - cu_t) ** 2 + (Vc - cv_t) ** 2 < ao_r ** 2
        cv.paint(bx, m, AORTA, "aorta")
    ivc_u, ivc_v = vb_u - _u(rng, 18, 30), vb_v - vb_r - _u(rng, 8, 18)
    ia, ib = _u(rng, 10, 15), _u(rng, 7, 11)
    bx = cv.box_around(ivc_u, ivc_v, 30, -1, 2)
    if bx is not None:
        Uc, Vc, Tc = cv.coords(bx)
        k = rng.uniform(0, 6.3, 2)
        cu_t = ivc_u + 6 * np.sin(3 * Tc + k[0])
        cv_t = ivc_v - 8 * np.clip(Tc - 0.6, 0, None) / 0.4 + 4 * np.sin(2 * Tc + k[1])
        m = ((Uc - cu_t) / ia) ** 2 + ((Vc - cv_t) / ib) ** 2 < 1
        cv.paint(bx, m, IVC, "ivc")

    # ---------------- psoas, paraspinal muscles, vertebra ----------------
    bx = cv.box_around(vb_u, vb_v, 140, -1, 2)
    Uc, Vc, Tc = cv.coords(bx)
    inside = cv.tissue[bx] != AIR
    ps_grow = np.clip((0.6 - Tc) / 0.6, 0, None)
    for side in (+1, -1):
        pr = 6 + 20 * ps_grow * _u(rng, 0.8, 1.2)
        pu = vb_u + side * (vb_r + pr * 0.9)
        m = ((Uc - pu) / pr) ** 2 + ((Vc - vb_v + 2) / (pr * 0.85)) ** 2 < 1
        m &= Tc < 0.6
        cv.paint(bx, m, MUSCLE)
        ppu, ppv = vb_u + side * _u(rng, 30, 40), vb_v + vb_r + _u(rng, 16, 24)
        m = (((Uc - ppu) / _u(rng, 26, 34)) ** 2 + ((Vc - ppv) / _u(rng, 18, 24)) ** 2 < 1) & inside
        cv.paint(bx, m, MUSCLE)
    dU, dV = Uc - vb_u, Vc - vb_v
    body_v = (dU / vb_r) ** 2 + (dV / (vb_r * 0.85)) ** 2
    canal_v = vb_r + _u(rng, 8, 11)
    canal = (dU / 9) ** 2 + ((dV - canal_v) / 8) ** 2 < 1
    # posterior elements: a V-shaped ring around the canal and the spinous process
    arch = ((dU / 16) ** 2 + ((dV - canal_v) / 14) ** 2 < 1) & ~canal & (dV > vb_r * 0.6)
    spinous = (np.abs(dU) < 4) & (dV > canal_v) & (dV < canal_v + _u(rng, 30, 42))
    lev = np.sin(Tc * _u(rng, 40, 55) + _u(rng, 0, 6.3))   # vertebra / disc pattern along z
    trans = (np.abs(dV - canal_v + 2 + 0.25 * np.abs(dU)) < 2.5) & (np.abs(dU) < _u(rng, 24, 32)) & (lev > 0.3)
    post = (arch | (spinous & (lev > -0.2)) | trans) & inside
    cv.paint(bx, post, CORTBONE)
    vb = body_v < 1
    cv.paint(bx, vb, CORTBONE)
    disc = vb & (lev > 0.8)
    marrow = (body_v < 0.7) & ~disc
    cv.tissue[bx][marrow] = MARROW
    cv.tissue[bx][disc & (body_v < 0.9)] = MUSCLE   # intervertebral disc ~ soft tissue
    cv.paint(bx, canal, CSF)


# ---- rendering --------------------------------------------------------------------------------------
def _tables(rng, table):
    base = np.zeros(N_TISSUES, np.float32)
    amp_mid = np.zeros(N_TISSUES, np.float32)
    amp_low = np.zeros(N_TISSUES, np.float32)
    for t in range(N_TISSUES):
        b, j, am, al = table[t]
        base[t] = b + (rng.uniform(-j, j) if j else 0.0)
        amp_mid[t], amp_low[t] = am, al
    return base, amp_mid, amp_low


def _render(cv: _Canvas, rng: np.random.Generator, modality: str) -> np.ndarray:
    Z, Y, X = cv.shape
    table = _CT_TISSUES if modality == "ct" else _MR_TISSUES
    base, amp_mid, amp_low = _tables(rng, table)
    t = cv.tissue
    img = base[t] + amp_mid[t] * cv.tex_mid + amp_low[t] * cv.tex_low
    # blur: partial volume, boundaries not trivially sharp (sigma in voxels, ~1 mm in-plane)
    sig_xy = _u(rng, 0.6, 0.9) * 1.5 / cv.spacing[1]
    img = ndimage.gaussian_filter(img, sigma=(0.5, sig_xy, sig_xy * cv.spacing[1] / cv.spacing[2]), mode="nearest")
    if modality == "ct":
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(_u(rng, 10, 18))
        img = np.clip(img, -125.0, 275.0)
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) * np.float32(255.0 / max(hi - lo, 1e-6))
    else:
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
        img = np.minimum(img, hi)
    return img.astype(np.float32, copy=False)


# ---- public API ----------------------------------------------------------------------------------
def default_spacing(rng: np.random.Generator, modality: str, shape=DEFAULT_SHAPE) -> tuple:
    """(z, y, x) spacing in mm for a case of ``shape``, field of view kept as at 40 x 256 x 256."""
    Z, Y, X = shape
    if modality == "ct":
        sz, sxy = _u(rng, 2.5, 3.0), _u(rng, 1.4, 1.6)
    else:
        sz, sxy = 7.7, 1.25
    return (sz * REFERENCE_SLICES / Z, sxy * REFERENCE_INPLANE / Y, sxy * REFERENCE_INPLANE / X)


def _check_modality(modality: str) -> str:
    m = str(modality).lower()
    if m not in ("ct", "mr"):
        raise ValueError(f"modality must be 'ct' or 'mr', not {modality!r}")
    return m


def make_phantom_case(rng: np.random.Generator, modality: str, shape=DEFAULT_SHAPE, spacing=None):
    """One synthetic abdomen: ``(image_zyx float32, label_zyx int16)``.

    ``spacing`` is (z, y, x) in mm (default: :func:`default_spacing`). CT images are in [0, 255]
    (HU clipped to [-125, 275], rescaled); MR images are >= 0, clipped at their 99.5th
    percentile. Label ids: SABS for CT, CHAOS for MR (see the module docstring).
    """
    modality = _check_modality(modality)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be (Z, Y, X) with every size >= 2, not {shape}")
    if spacing is None:
        spacing = default_spacing(rng, modality, shape)
    labels = CT_LABELS if modality == "ct" else MR_LABELS
    cv = _Canvas(rng, shape, spacing, labels)
    _paint_case(cv, rng)
    image = _render(cv, rng, modality)
    return image, cv.label


def case_ids(modality: str, n_cases: int) -> list[str]:
    """Case ids written for ``modality``: ``0..N-1`` for CT (as SABS), ``1..N`` for MR (as CHAOS)."""
    start = 0 if _check_modality(modality) == "ct" else 1
    return [str(i) for i in range(start, start + int(n_cases))]


def affine_for(spacing) -> np.ndarray:
    """The stored affine for (z, y, x) ``spacing``: ``diag(-sx, -sy, sz)`` (nibabel codes LPS)."""
    sz, sy, sx = (float(s) for s in spacing)
    return np.diag([-sx, -sy, sz, 1.0])


def default_supervoxel_min_size(shape) -> int:
    """5000 voxels at 256 x 256 in-plane (protocol §4), scaled with the in-plane area."""
    _, Y, X = (int(s) for s in shape)
    return max(50, int(round(FULL_SIZE_MIN_SIZE * (Y * X) / (REFERENCE_INPLANE ** 2))))


def _read_meta(path: Path) -> dict | None:
    try:
        info = json.loads((Path(path) / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def is_phantom_folder(path: str | Path) -> bool:
    """True if ``path`` holds a dataset.json written by this generator."""
    info = _read_meta(Path(path))
    return bool(info) and isinstance(info.get("generator"), dict) and "version" in info["generator"] \
        and str(info.get("name", "")).startswith("phantom")


def _code_digest() -> str:
    """Short digest of this module's source: a phantom written by other code is not reused."""
    try:
        return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
    except OSError:  # pragma: no cover
        return "unknown"


def _generator_info(modality, n_cases, seed, shape) -> dict:
    return {"seed": int(seed), "modality": modality, "n_cases": int(n_cases),
            "shape": [int(s) for s in shape], "version": GENERATOR_VERSION, "code": _code_digest()}


def phantom_is_current(out_dir, modality: str = "ct", n_cases: int = 8, seed: int = 0,
                       shape=DEFAULT_SHAPE, supervoxels: bool = True,
                       supervoxel_min_size: int | None = None) -> bool:
    """True if ``out_dir`` already holds exactly this phantom, every file present."""
    out_dir = Path(out_dir)
    modality = _check_modality(modality)
    info = _read_meta(out_dir) if out_dir.is_dir() else None
    if not info or info.get("generator") != _generator_info(modality, n_cases, seed, shape):  # incl. code digest
        return False
    ids = case_ids(modality, n_cases)
    for cid in ids:
        if not ((out_dir / f"image_{cid}.nii.gz").is_file() and (out_dir / f"label_{cid}.nii.gz").is_file()):
            return False
    if supervoxels:
        min_size = int(supervoxel_min_size or default_supervoxel_min_size(shape))
        if info.get("supervoxels") != f"supervoxels_{min_size}":
            return False
        sv = out_dir / info["supervoxels"]
        if not all((sv / f"superpix-MIDDLE_{cid}.nii.gz").is_file() for cid in ids):
            return False
    return True


def _phantom_files(out_dir: Path):
    """What a phantom writes (and what is removed before writing a new one)."""
    for p in out_dir.iterdir():
        n = p.name
        if p.is_file() and n.startswith(("image_", "label_")) and n.endswith((".nii.gz", ".nii")):
            yield p
        elif p.is_dir() and n.startswith("supervoxels_"):
            yield p
        elif p.is_file() and (n == "dataset.json" or (n.startswith("classmap") and n.endswith(".json"))):
            yield p


def make_phantom_dataset(out_dir, modality: str = "ct", n_cases: int = 8, seed: int = 0,
                         shape=DEFAULT_SHAPE, progress: bool = True, supervoxels: bool = True,
                         overwrite: bool = False, supervoxel_min_size: int | None = None) -> Path:
    """Write ``n_cases`` phantom cases (and their supervoxels) to ``out_dir``; return ``out_dir``.

    ``shape`` is (Z, Y, X). ``out_dir`` must be missing, empty, or a previous phantom dataset:
    if that holds exactly the requested phantom (same generator version, seed, modality,
    n_cases, shape, all files present) it is reused as is, unless ``overwrite``; otherwise its
    phantom files (``image_*``, ``label_*``, ``dataset.json``, ``supervoxels_*/``) are replaced.
    Any other non-empty folder is refused with :class:`FileExistsError` unless ``overwrite``
    (then those same file patterns are removed first, other files are left alone).

    Supervoxels (``supervoxels=True``): :func:`fsmis.data.supervoxels.make_dataset_supervoxels`
    writes ``supervoxels_<min_size>/superpix-MIDDLE_<id>.nii.gz``; ``min_size`` is 5000 at
    256 x 256 in-plane, scaled with the in-plane area for smaller shapes (or
    ``supervoxel_min_size``); the folder name is recorded in dataset.json ``"supervoxels"``.
    """
    modality = _check_modality(modality)
    n_cases = int(n_cases)
    if n_cases < 1:
        raise ValueError("n_cases must be >= 1")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be (Z, Y, X) with every size >= 2, not {shape}")
    min_size = int(supervoxel_min_size or default_supervoxel_min_size(shape))
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite and phantom_is_current(out_dir, modality, n_cases, seed, shape, supervoxels, min_size):
            return out_dir
        if not (is_phantom_folder(out_dir) or overwrite):
            raise FileExistsError(
                f"{out_dir}: folder is not empty and is not a phantom dataset; choose another folder "
                "or pass overwrite=True (--overwrite) to replace its image_*/label_*/supervoxels_* files")
        for p in list(_phantom_files(out_dir)):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)

    from .nifti import atomic_save_nifti

    ids = case_ids(modality, n_cases)
    labels = CT_LABELS if modality == "ct" else MR_LABELS
    info = {
        "name": f"phantom_{modality}",
        "modality": modality.upper(),
        "description": "procedural 3D abdominal phantom (fsmis.data.phantom): stored LPS "
                       "(affine diag(-sx, -sy, sz)); arrays [Z, Y, X], slices inferior to superior",
        "labels": dict(labels),
        "test_labels": list(TEST_LABELS),
        "supervoxels": f"supervoxels_{min_size}",
        "case_ids": ids,
        "generator": _generator_info(modality, n_cases, seed, shape),
    }
    # written first: an interrupted run leaves a folder that is recognised (and regenerated)
    atomic_write_json(out_dir / "dataset.json", info)
    children = np.random.SeedSequence([int(seed), 0 if modality == "ct" else 1]).spawn(n_cases)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_cases, desc=f"phantom {modality}", unit="case")
    try:
        for cid, ss in zip(ids, children):
            rng = np.random.default_rng(ss)
            spacing = default_spacing(rng, modality, shape)
            image, label = make_phantom_case(rng, modality, shape, spacing)
            aff = affine_for(spacing)
            for kind, arr, dtype in (("image", image, np.float32), ("label", label, np.int16)):
                path = out_dir / f"{kind}_{cid}.nii.gz"
                atomic_save_nifti(np.transpose(arr, (2, 1, 0)), aff, path, dtype=dtype)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if supervoxels:
        from .supervoxels import make_dataset_supervoxels

        make_dataset_supervoxels(out_dir, min_size=min_size, overwrite=True, progress=progress)
    return out_dir
