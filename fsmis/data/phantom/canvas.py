"""The canvas of one case: patient coordinates, the smooth deformation, the shared textures,
and the tissue / label maps that the anatomy is painted into."""
from __future__ import annotations

import math

import numpy as np

from .random_fields import _u, smooth_noise


class Canvas:
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
