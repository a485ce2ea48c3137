"""Unsupervised supervoxels / superpixels for self-supervised episodes (docs/protocol.md §4).

No compile step: the graph segmentation runs in numba (JIT at first use), the rest is numpy /
scipy / scikit-image.

* :func:`supervoxels_3d`: the ADNet-family 3D supervoxels (``supervoxels_<min_size>/``).
* :func:`superpixels_2d`: the SSL-ALPNet 2D superpixels, slice by slice.
* :func:`make_dataset_supervoxels`: either, for every case of a dataset folder
  (``tools/make_supervoxels.py`` is its command line).

The 3D defaults reproduce the published files (26-connected graph, per-slice body mask);
``connectivity=6, body_per_slice=False`` (``--fast``) is a faster deviation that does not.
How close and how fast: ``docs/measurements/supervoxels.md``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
from scipy import ndimage as ndi

from ..parallel import available_cpus, map_cases

__all__ = [
    "felzenszwalb_3d",
    "body_mask",
    "supervoxels_3d",
    "superpixels_2d",
    "make_dataset_supervoxels",
    "plan_dataset_supervoxels",
    "default_min_size",
    "available_cpus",
]


# --------------------------------------------------------------------------------------------
# graph segmentation kernel (numba)
# --------------------------------------------------------------------------------------------
# cache=False on purpose: numba's on-disk cache lives beside the source file (or in a user
# cache dir) and can go stale or race between processes; the JIT costs a few seconds once per
# process. nogil=True: the kernels run in parallel threads (make_dataset_supervoxels).
#
# Edges. Directions d = 0..D-1 (3 for 6-connectivity, 13 "forward" offsets for 26); for each,
# one edge per voxel a = (z, y, x) whose neighbour b = a + offset exists, enumerated direction
# by direction, each in C order of that sub-grid. The processing order is the stable sort of
# the weights in this enumeration order (ties keep it), i.e. ``np.argsort(w, kind="stable")``.
# Each edge is carried as the payload ``(d << shift) | a`` (flat C index of a): increasing in
# the enumeration index, so the stable sort is the same, and b = a + delta[d] needs no division.


@numba.njit(cache=False, nogil=True)
def _fill_edges(vol, dz, dy, dx, factors, bounds, shift, w, p):
    """Weights ``w[e] = |vol[b] - vol[a]| * factors[d]`` and payloads ``p[e] = (d << shift) | a``."""
    nz, ny, nx = vol.shape
    for d in range(dz.shape[0]):
        oz, oy, ox = dz[d], dy[d], dx[d]
        f = factors[d]
        y0 = -oy if oy < 0 else 0
        x0 = -ox if ox < 0 else 0
        y1 = ny - oy if oy > 0 else ny
        x1 = nx - ox if ox > 0 else nx
        tag = np.int64(d) << shift
        e = bounds[d]
        for z in range(nz - oz):
            for y in range(y0, y1):
                row = (z * ny + y) * nx
                for x in range(x0, x1):
                    w[e] = abs(vol[z + oz, y + oy, x + ox] - vol[z, y, x]) * f
                    p[e] = tag | (row + x)
                    e += 1


@numba.njit(cache=False, nogil=True)
def _radix_sort_pairs(keys, vals):
    """Stable LSD radix sort of non-negative int64 ``keys`` carrying ``vals``; returns both sorted.

    On ``w.view(np.int64)`` of non-negative float64 weights this is ``np.argsort(w,
    kind="stable")``, faster (docs/measurements/supervoxels.md). Both inputs are used as buffers.
    """
    # Keys are offset so that only the bits that vary are sorted (zero stays 0, nonzero keys map
    # to 1..), in passes of at most 12 bits; a pass whose digit is the same for every key is skipped.
    n = keys.shape[0]
    if n < 2:
        return keys, vals
    kmin = np.int64(0x7FFFFFFFFFFFFFFF)
    kmax = np.int64(0)
    for i in range(n):
        k = keys[i]
        if k > kmax:
            kmax = k
        if k != 0 and k < kmin:
            kmin = k
    if kmax == 0:
        return keys, vals
    base = kmin - 1
    span = kmax - base
    bits = 0
    while (span >> bits) != 0:
        bits += 1
    npass = (bits + 11) // 12
    width = (bits + npass - 1) // npass
    nbuck = 1 << width
    mask = nbuck - 1
    hist = np.zeros((npass, nbuck), np.int64)
    for i in range(n):
        k = keys[i]
        t = k - base if k != 0 else 0
        for q in range(npass):
            hist[q, (t >> (q * width)) & mask] += 1
    kbuf = np.empty_like(keys)
    vbuf = np.empty_like(vals)
    pos = np.empty(nbuck, np.int64)
    for q in range(npass):
        sh = q * width
        k0 = keys[0]
        t0 = k0 - base if k0 != 0 else 0
        if hist[q, (t0 >> sh) & mask] == n:
            continue
        s = 0
        for b in range(nbuck):
            pos[b] = s
            s += hist[q, b]
        for i in range(n):
            k = keys[i]
            t = k - base if k != 0 else 0
            dgt = (t >> sh) & mask
            j = pos[dgt]
            pos[dgt] = j + 1
            kbuf[j] = k
            vbuf[j] = vals[i]
        keys, kbuf = kbuf, keys
        vals, vbuf = vbuf, vals
    return keys, vals


@numba.njit(cache=False, nogil=True)
def _find(node, i):
    """Root of voxel ``i``; ``node[:, 0]`` = parent, ``node[:, 1]`` = size (valid at roots)."""
    root = i
    while node[root, 0] != root:
        root = node[root, 0]
    while node[i, 0] != root:  # path compression
        nxt = node[i, 0]
        node[i, 0] = root
        i = nxt
    return root


@numba.njit(cache=False, nogil=True)
def _felzenszwalb_kernel(sorted_w, edges, shift, delta, n, k, min_size):
    """Felzenszwalb & Huttenlocher merging over edges sorted by weight; int32 labels [n].

    ``sorted_w``: the weights in processing order; ``edges``: their payloads (consumed).
    """
    # Two exact short cuts (the result is the plain two-pass algorithm's):
    # * pass 1 stops at the first weight w >= max(merged weights, 0) + k: every threshold
    #   Int(C) + k/|C| is at most that (Int(C) is a merged weight), so neither this edge nor any
    #   later one can merge; the edges it rejected before are kept (in order) for pass 2;
    # * pass 2 (min_size) visits only edges not yet inside one segment (pass-1 rejects, then all
    #   edges after the stop) and stops once no segment is smaller than min_size.
    node = np.empty((n, 2), np.int32)  # parent and size side by side: one cache line per root
    for v in range(n):
        node[v, 0] = v
        node[v, 1] = 1
    cint = np.zeros(n, dtype=np.float64)
    m = edges.shape[0]
    amask = (np.int64(1) << shift) - 1
    # 1) greedy merging in increasing edge weight (Felzenszwalb & Huttenlocher 2004)
    nrej = 0
    limit = 0.0 + k
    stop = m
    for i in range(m):
        w = sorted_w[i]
        if w >= limit:
            stop = i
            break
        pe = np.int64(edges[i])
        a = pe & amask
        b = a + delta[pe >> shift]
        r0 = _find(node, a)
        r1 = _find(node, b)
        if r0 == r1:
            continue
        t0 = cint[r0] + k / node[r0, 1]
        t1 = cint[r1] + k / node[r1, 1]
        if w < min(t0, t1):
            lo = min(r0, r1)
            hi = max(r0, r1)
            node[hi, 0] = lo  # the root is always the smallest voxel index of the segment
            node[lo, 1] += node[hi, 1]
            cint[lo] = w
            limit = w + k
        else:
            edges[nrej] = edges[i]  # nrej <= i: overwrites only edges already visited
            nrej += 1
    # 2) min_size post-processing, one more pass in the same edge order (as scikit-image)
    if min_size > 1:
        small = 0
        for v in range(n):
            if node[v, 0] == v and node[v, 1] < min_size:
                small += 1
        total = nrej + (m - stop)
        for j in range(total):
            if small == 0:
                break
            pe = np.int64(edges[j] if j < nrej else edges[stop + j - nrej])
            a = pe & amask
            b = a + delta[pe >> shift]
            r0 = _find(node, a)
            r1 = _find(node, b)
            if r0 == r1:
                continue
            s0 = node[r0, 1]
            s1 = node[r1, 1]
            if s0 < min_size or s1 < min_size:
                lo = min(r0, r1)
                hi = max(r0, r1)
                node[hi, 0] = lo
                node[lo, 1] = s0 + s1
                small -= (s0 < min_size) + (s1 < min_size) - (s0 + s1 < min_size)
    # 3) consecutive labels in raster (z, y, x) order of each segment's first voxel
    labels = np.empty(n, dtype=np.int32)
    new_id = np.full(n, -1, dtype=np.int32)
    nxt = 0
    for v in range(n):
        r = _find(node, v)
        if new_id[r] < 0:
            new_id[r] = nxt
            nxt += 1
        labels[v] = new_id[r]
    return labels


_OFFSETS_6 = ((1, 0, 0), (0, 1, 0), (0, 0, 1))
# the 13 "forward" neighbours of the 26-neighbourhood (dz >= 0, lexicographically positive)
_OFFSETS_26 = tuple(
    (oz, oy, ox)
    for oz in (0, 1) for oy in (-1, 0, 1) for ox in (-1, 0, 1)
    if (oz, oy, ox) > (0, 0, 0)
)


# edge payloads are int32 (half the memory traffic of the sort) while (d << shift) | a fits in
# this many bits, i.e. up to 2**27 voxels; int64 above (tests lower it to check that path)
_INT32_PAYLOAD_BITS = 31


def _edge_factor(offset, spacing_zyx) -> float:
    """Spacing factor of an edge direction: ``|offset * spacing| / (|offset| * d_ref)``,
    ``d_ref = sqrt(spacing_y * spacing_x)`` (in-plane isotropic: in-plane edges 1, z edges dz / dxy)."""
    off = np.asarray(offset, float)
    sp = np.asarray(spacing_zyx, float)
    d_ref = float(np.sqrt(sp[1] * sp[2]))
    return float(np.linalg.norm(off * sp) / (np.linalg.norm(off) * d_ref))


def felzenszwalb_3d(
    volume_zyx: np.ndarray,
    spacing_zyx=(1.0, 1.0, 1.0),
    scale: float = 1.0,
    sigma: float = 0.0,
    min_size: int = 5000,
    *,
    connectivity: int = 26,
) -> np.ndarray:
    """Felzenszwalb & Huttenlocher graph segmentation of a 3D volume, voxel spacing in the edge weights.

    ``connectivity=26`` (default, the ADNet kernel's neighbourhood) is needed to reproduce the
    published supervoxels; ``6`` is faster and gives other segments. ``scale`` and the merging
    criterion are scikit-image's (``k = scale / 255``); no segment is smaller than ``min_size``
    unless its connected volume is. ``sigma`` > 0: Gaussian pre-smoothing, in the units of
    ``spacing_zyx``. Deterministic. Returns int32 labels ``0..n-1``, numbered in raster
    (z, y, x) order of each segment's first voxel.
    """
    # Edge weight (after the ADNet felzenszwalb_3d kernel, a modified scikit-image
    # _felzenszwalb_cy), o the voxel offset from a to b:
    #     w(a, b) = |I_a - I_b| * |o * spacing| / (|o| * d_ref),   d_ref = sqrt(spacing_y * spacing_x)
    # For the 6-neighbourhood this is |I_a - I_b| * spacing_axis / d_ref: on the usual
    # in-plane-isotropic volumes in-plane edges keep weight |I_a - I_b| and through-plane edges
    # get |I_a - I_b| * dz / dxy. ADNet uses s = spacing[0] / spacing[1] (z over in-plane) and
    # multiplies z-edge costs by s and in-plane costs by 1 (diagonals by the same length ratio as
    # the formula above), so for in-plane-isotropic spacing the weights are identical to theirs;
    # d_ref generalises their single in-plane spacing to dy != dx. Larger spacing along an axis
    # makes edges along it more expensive: they are merged later, so segments extend less along
    # that axis (for thick-slice MRI: flatter supervoxels, growing in-plane first).
    #
    # Merging: k = scale / 255 in the intensity units of the input (scikit-image's "behave like
    # the reference implementation" rescaling); an edge joins two segments when
    # w < min(Int(C1) + k/|C1|, Int(C2) + k/|C2|). Then one pass over the edges in the same order
    # merges any segment smaller than min_size with its neighbour. Edge order: float64 weights,
    # enumerated direction by direction (each in C order), stably sorted (ties keep the
    # enumeration order), i.e. np.argsort(w, kind="stable"), computed by an exact radix sort.
    # sigma: scipy.ndimage.gaussian_filter(sigma / spacing), as in ADNet.
    vol = np.asarray(volume_zyx, dtype=np.float64)
    if vol.ndim != 3:
        raise ValueError(f"felzenszwalb_3d expects a 3D [Z, Y, X] volume, got shape {vol.shape}")
    if connectivity not in (6, 26):
        raise ValueError(f"connectivity must be 6 or 26, got {connectivity!r}")
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(spacing > 0):
        raise ValueError(f"spacing_zyx must be three positive numbers, got {spacing_zyx!r}")
    if not np.all(np.isfinite(vol)):
        raise ValueError("volume contains NaN or infinite values")
    if sigma and sigma > 0:
        vol = ndi.gaussian_filter(vol, sigma=float(sigma) / spacing)
    vol = np.ascontiguousarray(vol)
    nz, ny, nx = vol.shape
    n = vol.size
    if n == 0:
        return np.zeros(vol.shape, np.int32)

    offsets = _OFFSETS_6 if connectivity == 6 else _OFFSETS_26
    dz, dy, dx = (np.array([o[i] for o in offsets], dtype=np.int64) for i in range(3))
    factors = np.array([_edge_factor(o, spacing) for o in offsets], dtype=np.float64)
    counts = [(nz - o[0]) * (ny - abs(o[1])) * (nx - abs(o[2])) for o in offsets]
    bounds = np.zeros(len(offsets) + 1, dtype=np.int64)
    bounds[1:] = np.cumsum(counts)
    m = int(bounds[-1])
    if m == 0:  # a single voxel
        return np.zeros(vol.shape, np.int32)
    shift = max(1, (n - 1).bit_length())
    payload = np.int32 if shift + (len(offsets) - 1).bit_length() <= _INT32_PAYLOAD_BITS else np.int64
    weights = np.empty(m, dtype=np.float64)
    edges = np.empty(m, dtype=payload)
    _fill_edges(vol, dz, dy, dx, factors, bounds, shift, weights, edges)
    # float64 >= 0 orders as its int64 bit pattern (abs() never gives -0.0)
    keys, edges = _radix_sort_pairs(weights.view(np.int64), edges)
    del weights
    delta = (dz * ny + dy) * nx + dx
    labels = _felzenszwalb_kernel(keys.view(np.float64), edges, shift, delta, n,
                                  float(scale) / 255.0, int(min_size))
    return labels.reshape(vol.shape)


# --------------------------------------------------------------------------------------------
# body mask and post-processing
# --------------------------------------------------------------------------------------------

def rescale_255(volume_zyx: np.ndarray) -> np.ndarray:
    """Per-volume min/max rescaling to [0, 255] (float64); a constant volume gives zeros."""
    vol = np.asarray(volume_zyx, dtype=np.float64)
    lo, hi = float(vol.min()), float(vol.max())
    if hi <= lo:
        return np.zeros(vol.shape, np.float64)
    return 255.0 * (vol - lo) / (hi - lo)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    structure = ndi.generate_binary_structure(mask.ndim, mask.ndim)  # full connectivity
    lab, n = ndi.label(mask, structure=structure)
    if n <= 1:
        return lab > 0
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == int(np.argmax(counts))  # ties: the lowest component id


def body_mask(volume_zyx: np.ndarray, threshold: float = 10, *, per_slice: bool = True) -> np.ndarray:
    """Body (foreground) mask, bool [Z, Y, X]: the volume rescaled to 0-255, ``> threshold``.

    ``per_slice=True`` (default, as the SSL-ALPNet / ADNet scripts): the largest 2D component of
    every slice, holes filled. ``per_slice=False``: the largest 3D component, holes filled slice
    by slice (drops foreground not 3D-connected to it).
    """
    vol = rescale_255(volume_zyx)
    if vol.ndim != 3:
        raise ValueError(f"body_mask expects a 3D [Z, Y, X] volume, got shape {vol.shape}")
    fg = vol > threshold
    out = np.zeros(fg.shape, bool)
    if not fg.any():
        return out
    if per_slice:
        for z in range(fg.shape[0]):
            if fg[z].any():
                out[z] = ndi.binary_fill_holes(_largest_component(fg[z]))
        return out
    cc = _largest_component(fg)
    for z in range(cc.shape[0]):
        if cc[z].any():
            out[z] = ndi.binary_fill_holes(cc[z])
    return out


def _relabel_inside(labels: np.ndarray, mask: np.ndarray, start: int = 1) -> tuple[np.ndarray, int]:
    """Zero outside ``mask``; ids of the labels present inside renumbered ``start..`` in raster
    order of their first voxel inside the mask. Returns (int32 array, number of ids)."""
    out = np.zeros(labels.shape, np.int32)
    inside = labels[mask]
    if inside.size == 0:
        return out, 0
    uniq, first, inverse = np.unique(inside, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(uniq))
    out[mask] = (rank[inverse.ravel()] + start).astype(np.int32)
    return out, len(uniq)


def supervoxels_3d(
    volume_zyx: np.ndarray,
    spacing_zyx=(1.0, 1.0, 1.0),
    min_size: int = 5000,
    scale: float = 1.0,
    sigma: float = 0.0,
    body_threshold: float = 10,
    *,
    connectivity: int = 26,
    body_per_slice: bool = True,
) -> np.ndarray:
    """ADNet-family 3D supervoxels (what ``supervoxels_<n>/superpix-MIDDLE_<id>.nii.gz`` holds).

    :func:`felzenszwalb_3d` on the volume rescaled to 0-255, 0 outside :func:`body_mask`, ids
    renumbered ``1..n`` inside the body (ADNet leaves gaps). Returns int32 [Z, Y, X]. The
    defaults reproduce the published files; ``connectivity=6, body_per_slice=False`` is a faster
    deviation that does not (docs/measurements/supervoxels.md).
    """
    vol = rescale_255(volume_zyx)
    seg = felzenszwalb_3d(vol, spacing_zyx, scale=scale, sigma=sigma, min_size=min_size,
                          connectivity=connectivity)
    mask = body_mask(vol, body_threshold, per_slice=body_per_slice)
    out, _ = _relabel_inside(seg, mask, start=1)
    return out


def superpixels_2d(
    volume_zyx: np.ndarray,
    min_size: int = 400,
    sigma: float = 1.0,
    scale: float = 1.0,
    body_threshold: float = 10,
) -> np.ndarray:
    """SSL-ALPNet 2D superpixels: ``skimage.segmentation.felzenszwalb`` on every slice of the
    0-255 rescaled volume, 0 outside the per-slice :func:`body_mask`. Returns int32 [Z, Y, X].

    Ids are unique over the whole volume (slice 0 ``1..n0``, slice 1 ``n0+1..``), so no id spans
    two slices; SSL-ALPNet numbered ``1..n`` per slice, the same segments for slice-wise loaders.
    SSL-ALPNet's body threshold was 1e-4 on MR intensities and 50 on the 0-255 CT.
    """
    from skimage.segmentation import felzenszwalb

    vol = rescale_255(volume_zyx)
    if vol.ndim != 3:
        raise ValueError(f"superpixels_2d expects a 3D [Z, Y, X] volume, got shape {vol.shape}")
    mask = body_mask(vol, body_threshold, per_slice=True)
    out = np.zeros(vol.shape, np.int32)
    next_id = 1
    for z in range(vol.shape[0]):
        if not mask[z].any():
            continue
        seg = felzenszwalb(vol[z], scale=scale, sigma=sigma, min_size=int(min_size), channel_axis=None)
        out[z], n = _relabel_inside(seg, mask[z], start=next_id)
        next_id += n
    return out


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------

def default_min_size(dataset_name: str, mode: str = "3d") -> int:
    """Protocol defaults: 3D 5000 voxels (abdomen) / 1000 (CMR); 2D 400 pixels."""
    if mode == "2d":
        return 400
    return 1000 if str(dataset_name).upper() == "CMR" else 5000


@dataclass
class SupervoxelPlan:
    """What :func:`make_dataset_supervoxels` will do for a dataset folder."""

    dataset: object  # fsmis.data.datasets.FSMISDataset
    mode: str
    min_size: int
    sigma: float
    scale: float
    out_dir: Path
    case_ids: list
    existing: list  # case ids whose output file already exists

    def describe(self) -> str:
        kind = "3D supervoxels" if self.mode == "3d" else "2D superpixels"
        return (
            f"{kind} for {self.dataset.name} ({self.dataset.modality}, {len(self.case_ids)} cases) "
            f"from {self.dataset.image_dir}\n"
            f"  min_size={self.min_size} sigma={self.sigma:g} scale={self.scale:g}\n"
            f"  output: {self.out_dir} ({len(self.existing)} of {len(self.case_ids)} files already there)"
        )


def plan_dataset_supervoxels(data_dir, mode: str = "3d", min_size: int | None = None,
                             sigma: float | None = None, scale: float = 1.0) -> SupervoxelPlan:
    """Resolve the dataset, the defaults and the output folder (see :func:`make_dataset_supervoxels`)."""
    from .datasets import open_dataset

    mode = str(mode).lower()
    if mode not in ("3d", "2d"):
        raise ValueError(f"mode must be '3d' or '2d', got {mode!r}")
    ds = open_dataset(data_dir, cache=False)
    if min_size is None:
        min_size = default_min_size(ds.name, mode)
    min_size = int(min_size)
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if sigma is None:
        sigma = 1.0 if mode == "2d" else 0.0
    folder = f"{'supervoxels' if mode == '3d' else 'superpixels'}_{min_size}"
    image_dir = Path(ds.image_dir)
    # dataset.json folder: inside it; published layout: beside the "*_normalized" folder
    base = image_dir if (image_dir / "dataset.json").is_file() else image_dir.parent
    out_dir = base / folder
    ids = list(ds.case_ids)
    existing = [c for c in ids if (out_dir / f"superpix-MIDDLE_{c}.nii.gz").exists()]
    return SupervoxelPlan(ds, mode, min_size, float(sigma), float(scale), out_dir, ids, existing)


def _write_case(image_path: Path, out_path: Path, mode: str, params: dict) -> None:
    """Load one image, segment it, write ``out_path`` atomically; errors name the image file."""
    from .nifti import DataError, load_volume, save_like

    vol = load_volume(image_path)  # DataError naming the file if unreadable
    try:
        if mode == "3d":
            seg = supervoxels_3d(vol.array, vol.spacing, **params)
        else:
            seg = superpixels_2d(vol.array, **params)
        save_like(seg, vol, out_path, dtype=np.int32)
    except (DataError, MemoryError):
        raise
    except Exception as exc:
        raise DataError(f"{image_path}: computing {out_path.name} failed: "
                        f"{type(exc).__name__}: {exc}") from exc


def make_dataset_supervoxels(
    data_dir,
    mode: str = "3d",
    min_size: int | None = None,
    scale: float = 1.0,
    sigma: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    *,
    body_threshold: float = 10,
    connectivity: int = 26,
    body_per_slice: bool = True,
    workers: int | None = None,
) -> Path:
    """Write supervoxels (``mode="3d"``) or superpixels (``"2d"``) for every case of a dataset.

    ``data_dir``: any folder :func:`fsmis.data.datasets.open_dataset` accepts. Writes
    ``superpix-MIDDLE_<id>.nii.gz`` (int32, on each image's own grid) atomically into
    ``supervoxels_<min_size>/`` or ``superpixels_<min_size>/``, beside the ``*_normalized``
    folder (published layout) or inside a ``dataset.json`` folder; returns that folder.
    Existing files are kept unless ``overwrite``. ``connectivity`` / ``body_per_slice``: 3D only,
    see :func:`supervoxels_3d`. ``workers``: cases in parallel threads (default one per CPU; the
    output does not depend on it; memory per worker: docs/measurements/supervoxels.md). The first
    error stops the run and is raised as :class:`fsmis.data.nifti.DataError` naming the image.
    """
    from .nifti import DataError

    plan = plan_dataset_supervoxels(data_dir, mode, min_size, sigma, scale)
    ds, out_dir = plan.dataset, plan.out_dir
    if workers is not None:
        if isinstance(workers, bool) or int(workers) != workers or workers < 1:
            raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
        workers = int(workers)
    if plan.mode == "3d":
        if connectivity not in (6, 26):
            raise ValueError(f"connectivity must be 6 or 26, got {connectivity!r}")
        params = dict(min_size=plan.min_size, scale=plan.scale, sigma=plan.sigma,
                      body_threshold=body_threshold, connectivity=int(connectivity),
                      body_per_slice=bool(body_per_slice))
    else:
        params = dict(min_size=plan.min_size, sigma=plan.sigma, scale=plan.scale,
                      body_threshold=body_threshold)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a folder; the {out_dir.name} output folder goes there "
                        "(move the file away)")
    jobs = []
    for cid in plan.case_ids:
        out_path = out_dir / f"superpix-MIDDLE_{cid}.nii.gz"
        if overwrite or not out_path.exists():
            jobs.append((Path(ds.image_path(cid)), out_path))
    for image_path, _ in jobs:  # before any work: every image to compute opens as a 3D NIfTI
        check_nifti_header(image_path)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        map_cases(lambda job: _write_case(*job, plan.mode, params), jobs, workers,
                  desc=f"{ds.name} {out_dir.name}", progress=progress, done=len(plan.case_ids) - len(jobs),
                  thread_prefix="supervoxels")
    except BaseException:
        # each file is written atomically (finished cases stay, a re-run skips them); a folder this
        # run created and left empty is removed
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return out_dir


def check_nifti_header(path: Path) -> None:
    """A cheap check (header only) that ``path`` is a NIfTI file of one 3D volume; DataError naming it."""
    import nibabel as nib

    from .nifti import DataError

    try:
        shape = nib.load(str(path)).shape
    except Exception as exc:
        raise DataError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc})") from None
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise DataError(f"{path}: expected a 3D volume, found shape {tuple(shape)}")
