"""The anatomy of one case, painted into a :class:`~.canvas.Canvas`.

:func:`paint_case` paints the structures in a fixed priority order (each voxel keeps the last
structure painted, so organs never overlap): the trunk (body outline, subcutaneous fat,
muscle wall, abdominal cavity), lower ribs and lung bases, then the distractors (bowel loops,
colon, stomach), the organs (liver, gallbladder, spleen, kidneys), the great vessels, and
last the back muscles and the vertebra. Every structure draws its own random numbers, in
that order, from the case's generator; the geometry that later structures depend on (the
cavity, the vertebral body) is passed on as :class:`Trunk` and :class:`Spine`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .canvas import Canvas
from .random_fields import _jit, _u
from .tissues import (AIR, AORTA, BOWEL_CONTENT, BOWEL_WALL, CORTBONE, CSF, FAT, FECES, GALLBLADDER, GAS, IVC,
                      KID_CORTEX, KID_MEDULLA, KID_PELVIS, LIVER, LIVER_VESSEL, LUNG, MARROW, MUSCLE, SPLEEN,
                      STOMACH_FLUID, STOMACH_FOOD, STOMACH_WALL, SUBFAT)


@dataclass
class Trunk:
    """The body cross-section that later structures are placed in."""

    cavity: np.ndarray  # bool [Z, Y, X]: inside the muscle wall
    rho_c: np.ndarray  # super-ellipse radius of the cavity (<= 1 inside)
    pw: float  # super-ellipse exponent
    Ac: np.ndarray  # cavity lateral semi-axis per slice [Z, 1, 1]
    Bpc: np.ndarray  # cavity posterior semi-axis per slice [Z, 1, 1]
    ac_m: float  # mean cavity lateral semi-axis
    bpc_m: float  # mean cavity posterior semi-axis
    posterior_wall_v: float  # v of the inner posterior wall, before the per-slice variation


@dataclass
class Spine:
    """The vertebral body: centre (u, v) and radius, in mm."""

    u: float
    v: float
    r: float


def paint_case(cv: Canvas, rng: np.random.Generator) -> None:
    """Paint one abdomen into ``cv`` (tissue and label maps), drawing from ``rng``."""
    trunk = _paint_trunk(cv, rng)
    _paint_ribs(cv, rng, trunk)
    _paint_lung_bases(cv, rng, trunk)
    spine = _place_spine(rng, trunk)
    _paint_bowel_loops(cv, rng, trunk.cavity)
    _paint_colon(cv, rng, trunk)
    _paint_stomach(cv, rng, trunk.cavity)
    liver_shift_u = _paint_liver(cv, rng, trunk.cavity, spine)
    _paint_gallbladder(cv, rng, trunk.cavity, liver_shift_u)
    _paint_spleen(cv, rng, trunk)
    _paint_kidneys(cv, rng, trunk, spine)
    _paint_great_vessels(cv, rng, spine)
    _paint_back_and_vertebra(cv, rng, spine)


# ---- body, fat, muscle wall, cavity -------------------------------------------------------------
def _super_ellipse(U, V, a, ba, bp, pw):
    """Super-ellipse radius (<= 1 inside): lateral semi-axis a, anterior ba, posterior bp."""
    b = np.where(V < 0, ba, bp)
    return (np.abs(U) / a) ** pw + (np.abs(V) / b) ** pw


def _paint_trunk(cv: Canvas, rng) -> Trunk:
    X = cv.shape[2]
    T = cv.T[:, None, None]
    fov_half_u = X * cv.spacing[2] / 2
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
    body = _super_ellipse(U, V, A, Ba, Bp, pw) <= 1.0
    muscle_out = _super_ellipse(U, V, A - fat_lat, Ba - fat_ant, Bp - fat_post, pw) <= 1.0
    Ac, Bac, Bpc = A - fat_lat - wall, Ba - fat_ant - wall, Bp - fat_post - wall
    rho_c = _super_ellipse(U, V, Ac, Bac, Bpc, pw)
    cavity = rho_c <= 1.0
    cv.tissue[body] = SUBFAT
    cv.tissue[muscle_out] = MUSCLE
    cv.tissue[cavity] = FAT
    return Trunk(cavity, rho_c, pw, Ac, Bpc, float(np.mean(Ac)), float(np.mean(Bpc)),
                 float(Bp0 - fat_post - wall))


def _paint_ribs(cv: Canvas, rng, trunk: Trunk) -> None:
    """Lower ribs: pieces of a ring just outside the cavity, their pattern drifting along z."""
    U, V, T = cv.U, cv.V, cv.T[:, None, None]
    rho_c = trunk.rho_c
    phi = np.arctan2(V, U)
    rib_phase = T * _u(rng, 55, 70) + _u(rng, 0, 6.3)
    ribs = (rho_c > 1.0) & (rho_c < 1.0 + 9.0 / trunk.Ac) & (np.sin(9 * phi + rib_phase) > 0.55)
    rib_top = _u(rng, 0.5, 0.6)      # ribs all around above this level, posterolaterally lower
    ribs &= (T > rib_top) | ((T > rib_top - 0.25) & (V > 0) & (np.abs(U) > 40))
    ribs &= (V < 0.8 * trunk.Bpc)
    cv.tissue[ribs] = CORTBONE


def _paint_lung_bases(cv: Canvas, rng, trunk: Trunk) -> None:
    """Lung bases above a dome-shaped diaphragm: peripheral crescents in the top slices, deepest
    posteriorly (costophrenic recesses); the organs painted later cover the dome."""
    U, V, T = cv.U, cv.V, cv.T[:, None, None]
    r = trunk.rho_c ** (1.0 / trunk.pw)
    dome = _u(rng, 1.12, 1.22) - _u(rng, 0.3, 0.4) * r ** 2 - _u(rng, 0.1, 0.16) * np.clip(V / trunk.Bpc, 0, 1)
    lung = trunk.cavity & (T > dome) & ~((np.abs(U) < 35) & (V > 0))
    cv.tissue[lung] = LUNG


def _place_spine(rng, trunk: Trunk) -> Spine:
    """The vertebral body's geometry (painted last, highest priority)."""
    vb_v = trunk.posterior_wall_v - _u(rng, 34, 42)   # vertebral body centre
    vb_u = _jit(rng, 4)
    vb_r = _u(rng, 17, 22)
    return Spine(vb_u, vb_v, vb_r)


# ---- distractors: bowel loops, colon, stomach ---------------------------------------------------
def _paint_bowel_loops(cv: Canvas, rng, cavity) -> None:
    """Small-bowel loops with gas (the lowest-priority distractors)."""
    n_loops = int(rng.integers(10, 18))
    for _ in range(n_loops):
        _paint_bowel_loop(cv, rng, cavity)


def _paint_bowel_loop(cv: Canvas, rng, cavity) -> None:
    cu_, cv_ = _u(rng, -90, 90), _u(rng, -85, 20)
    ct_ = _u(rng, 0.0, 0.5)
    r1, r2, rc = _u(rng, 10, 22), _u(rng, 10, 20), _u(rng, 0.04, 0.12)
    th = _u(rng, 0, math.pi)
    bx = cv.box_around(cu_, cv_, max(r1, r2) * 1.4, ct_ - rc, ct_ + rc)
    if bx is None:
        return
    f = cv.ellipsoid(bx, cu_, cv_, ct_, r1, r2, rc, th) + 0.25 * cv.noise(bx, 25, 0.1)
    m = (f > 0) & cavity[bx]
    cv.paint(bx, m, BOWEL_WALL)
    inner = m & (f > 6.0 / min(r1, r2))
    content = np.where(cv.tex_mid[bx] > _u(rng, 0.6, 2.5), GAS, BOWEL_CONTENT)
    cv.tissue[bx][inner] = content[inner]


def _paint_colon(cv: Canvas, rng, trunk: Trunk) -> None:
    """Colon: ascending (right), descending (left), transverse."""
    cavity = trunk.cavity
    _paint_colon_segment(cv, rng, cavity, -trunk.ac_m + _u(rng, 22, 35), _u(rng, -25, 10), -0.1,
                         _u(rng, 0.38, 0.48), _u(rng, 16, 24))
    _paint_colon_segment(cv, rng, cavity, trunk.ac_m - _u(rng, 20, 32), _u(rng, -15, 20), -0.1,
                         _u(rng, 0.5, 0.6), _u(rng, 13, 20))
    _paint_transverse_colon(cv, rng, cavity)


def _paint_colon_segment(cv: Canvas, rng, cavity, cu0, cv0, t_lo, t_hi, r, wobble=10.0) -> None:
    """A vertical colon segment with haustra, feces and gas (gas rises anteriorly)."""
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


def _paint_transverse_colon(cv: Canvas, rng, cavity) -> None:
    tc_t = _u(rng, 0.38, 0.5)
    bx = cv.box(-110, 110, -95, -20, tc_t - 0.12, tc_t + 0.12)
    if bx is None:
        return
    f = cv.ellipsoid(bx, 0, _u(rng, -70, -55), tc_t, _u(rng, 90, 115), _u(rng, 14, 20), _u(rng, 0.05, 0.08),
                     _jit(rng, 0.1)) + 0.3 * cv.noise(bx, 30, 0.1)
    m = (f > 0) & cavity[bx]
    cv.paint(bx, m, BOWEL_WALL)
    inner = m & (f > 0.35)
    content = np.where(cv.tex_mid[bx] > 0.2, GAS, FECES)
    cv.tissue[bx][inner] = content[inner]


def _paint_stomach(cv: Canvas, rng, cavity) -> None:
    """Stomach (left upper quadrant): wall, contents, air-fluid level, along a curved axis."""
    st_lo, st_hi = _u(rng, 0.48, 0.58), _u(rng, 0.86, 0.95)
    dist = _u(rng, 0.75, 1.2)
    p_top = (_u(rng, 45, 70), _u(rng, -15, 10))      # fundus
    p_mid = (_u(rng, 35, 60), _u(rng, -50, -30))     # body
    p_bot = (_u(rng, -5, 25), _u(rng, -70, -50))     # antrum
    bx = cv.box(-40, 110, -110, 40, st_lo, st_hi)
    if bx is None:
        return
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


# ---- organs ----------------------------------------------------------------------------------------
def _paint_liver(cv: Canvas, rng, cavity, spine: Spine) -> float:
    """Liver (right upper quadrant): right lobe, inferior tip and left lobe, with vessels.
    Returns the right lobe's lateral shift (mm), which places the gallbladder."""
    ls = _u(rng, 0.85, 1.15)
    lr_u, lr_v = _jit(rng, 15), _jit(rng, 15)
    l_t = _u(rng, 0.68, 0.76)
    l_rot = math.radians(_jit(rng, 10))
    t_bot = _u(rng, 0.36, 0.46)
    bx = cv.box(-170, 120, -130, 80, t_bot - 0.02, 1.1)
    if bx is None:
        return lr_u
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
    ex = ((Uc - spine.u - _u(rng, 35, 45)) / _u(rng, 50, 60)) ** 2 + ((Vc - spine.v - 5) / _u(rng, 42, 50)) ** 2
    f = np.minimum(f, 0.5 * (ex - 1)) + 0.3 * cv.noise(bx, 45, 0.2)
    f = np.where(Tc > t_bot, f, -1)
    m = (f > 0) & cavity[bx]
    cv.paint(bx, m, LIVER, "liver")
    vessels = m & (f > 0.12) & (np.abs(cv.noise(bx, 20, 0.12)) < 0.1) & (cv.noise(bx, 15, 0.1) > 0.3)
    cv.tissue[bx][vessels] = LIVER_VESSEL
    return lr_u


def _paint_gallbladder(cv: Canvas, rng, cavity, liver_shift_u: float) -> None:
    """Gallbladder (under the liver, anterior), present in most cases."""
    gb = rng.uniform() < 0.85
    gb_t = _u(rng, 0.4, 0.52)
    gb_u, gb_v = -40 + liver_shift_u + _jit(rng, 10), -55 + _jit(rng, 10)
    if not gb:
        return
    bx = cv.box_around(gb_u, gb_v, 40, gb_t - 0.12, gb_t + 0.12)
    if bx is None:
        return
    f = cv.ellipsoid(bx, gb_u, gb_v, gb_t, _u(rng, 12, 20), _u(rng, 20, 30), _u(rng, 0.05, 0.09),
                     _u(rng, 0.5, 1.3)) + 0.15 * cv.noise(bx, 20, 0.1)
    m = (f > 0) & cavity[bx]
    cv.paint(bx, m, GALLBLADDER, "gallbladder")


def _paint_spleen(cv: Canvas, rng, trunk: Trunk) -> None:
    """Spleen (left, posterolateral), its concave hilar side facing anteromedially."""
    ss = _u(rng, 0.85, 1.15)
    sp_u, sp_v = trunk.ac_m * _u(rng, 0.68, 0.74) + _jit(rng, 5), trunk.bpc_m * _u(rng, 0.42, 0.58) + _jit(rng, 5)
    sp_t = _u(rng, 0.64, 0.74)
    sp_c = _u(rng, 0.12, 0.18)
    sp_th = math.radians(-60 + _jit(rng, 8))
    a, b = 55 * ss * _u(rng, 0.9, 1.1), 24 * ss * _u(rng, 0.9, 1.1)
    bx = cv.box_around(sp_u, sp_v, a * 1.3, sp_t - sp_c * 1.2, sp_t + sp_c * 1.2)
    if bx is None:
        return
    tu, tv = _jit(rng, 80), _jit(rng, 80)
    f = cv.ellipsoid(bx, sp_u, sp_v, sp_t, a, b, sp_c, sp_th, tu, tv)
    # concave (hilar) side faces anteromedially
    n_u, n_v = -math.sin(sp_th), math.cos(sp_th)
    if n_u > 0:                      # make the normal point medially (towards -u)
        n_u, n_v = -n_u, -n_v
    notch = cv.ellipsoid(bx, sp_u + n_u * 1.3 * b, sp_v + n_v * 1.3 * b, sp_t, 0.6 * a, 0.75 * b, sp_c * 0.9,
                         sp_th, tu, tv)
    f = np.minimum(f, -notch) + 0.22 * cv.noise(bx, 35, 0.15)
    m = (f > 0) & trunk.cavity[bx]
    cv.paint(bx, m, SPLEEN, "spleen")


def _paint_kidneys(cv: Canvas, rng, trunk: Trunk, spine: Spine) -> None:
    """Kidneys (posterior, bean-shaped): left first, then right."""
    ks = _u(rng, 0.85, 1.15)
    for side, name in ((+1, "left_kidney"), (-1, "right_kidney")):
        _paint_kidney(cv, rng, trunk, spine, ks, side, name)


def _paint_kidney(cv: Canvas, rng, trunk: Trunk, spine: Spine, ks: float, side: int, name: str) -> None:
    """One kidney: cortex, medulla and pelvis, the hilum facing anteromedially."""
    kss = ks * _u(rng, 0.92, 1.08)
    ku = side * (trunk.ac_m * _u(rng, 0.54, 0.6) + _jit(rng, 4))
    kv = spine.v + _u(rng, -1, 7) + _jit(rng, 3)
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
        return
    f = cv.ellipsoid(bx, ku, kv, kt, a_h, b_l, kc, h_ang, tilt_u, tilt_v)
    notch = cv.ellipsoid(bx, ku + hu * a_h, kv + hv * a_h, kt, 0.5 * a_h, 0.4 * b_l, 0.55 * kc, h_ang, tilt_u, tilt_v)
    fk = np.minimum(f, -notch) + 0.12 * cv.noise(bx, 30, 0.15)
    m = (fk > 0) & trunk.cavity[bx]
    cv.paint(bx, m, KID_CORTEX, name)
    med = m & (f > 0.35) & (cv.noise(bx, 9, 0.05) > -0.3)
    cv.tissue[bx][med] = KID_MEDULLA
    pel = cv.ellipsoid(bx, ku + hu * 0.45 * a_h, kv + hv * 0.45 * a_h, kt, 0.45 * a_h, 0.32 * b_l, 0.45 * kc,
                       h_ang, tilt_u, tilt_v)
    cv.tissue[bx][m & (pel > 0)] = KID_PELVIS


# ---- great vessels -------------------------------------------------------------------------------
def _paint_great_vessels(cv: Canvas, rng, spine: Spine) -> None:
    """Aorta (round, left-anterior of the vertebra) and IVC (oval, right), over the whole range."""
    ao_u, ao_v, ao_r = spine.u + _u(rng, 8, 20), spine.v - spine.r - _u(rng, 10, 16), _u(rng, 9, 13)
    bx = cv.box_around(ao_u, ao_v, ao_r + 15, -1, 2)
    if bx is not None:
        Uc, Vc, Tc = cv.coords(bx)
        k = rng.uniform(0, 6.3, 2)
        cu_t = ao_u + 5 * np.sin(3 * Tc + k[0])
        cv_t = ao_v + 5 * np.sin(2 * Tc + k[1])
        m = (Uc - cu_t) ** 2 + (Vc - cv_t) ** 2 < ao_r ** 2
        cv.paint(bx, m, AORTA, "aorta")
    ivc_u, ivc_v = spine.u - _u(rng, 18, 30), spine.v - spine.r - _u(rng, 8, 18)
    ia, ib = _u(rng, 10, 15), _u(rng, 7, 11)
    bx = cv.box_around(ivc_u, ivc_v, 30, -1, 2)
    if bx is not None:
        Uc, Vc, Tc = cv.coords(bx)
        k = rng.uniform(0, 6.3, 2)
        cu_t = ivc_u + 6 * np.sin(3 * Tc + k[0])
        cv_t = ivc_v - 8 * np.clip(Tc - 0.6, 0, None) / 0.4 + 4 * np.sin(2 * Tc + k[1])
        m = ((Uc - cu_t) / ia) ** 2 + ((Vc - cv_t) / ib) ** 2 < 1
        cv.paint(bx, m, IVC, "ivc")


# ---- psoas, paraspinal muscles, vertebra ---------------------------------------------------------
def _paint_back_and_vertebra(cv: Canvas, rng, spine: Spine) -> None:
    bx = cv.box_around(spine.u, spine.v, 140, -1, 2)
    Uc, Vc, Tc = cv.coords(bx)
    inside = cv.tissue[bx] != AIR  # the body, as it is before the muscles below are painted
    _paint_back_muscles(cv, rng, spine, bx, Uc, Vc, Tc, inside)
    _paint_vertebra(cv, rng, spine, bx, Uc, Vc, Tc, inside)


def _paint_back_muscles(cv: Canvas, rng, spine: Spine, bx, Uc, Vc, Tc, inside) -> None:
    """Psoas (growing towards the bottom) and paraspinal muscles, on both sides."""
    vb_u, vb_v, vb_r = spine.u, spine.v, spine.r
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


def _paint_vertebra(cv: Canvas, rng, spine: Spine, bx, Uc, Vc, Tc, inside) -> None:
    """Vertebral body (cortex, marrow, discs), posterior elements and the spinal canal."""
    vb_r = spine.r
    dU, dV = Uc - spine.u, Vc - spine.v
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
