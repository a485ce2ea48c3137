"""Quality of a synthetic dataset against the real one (docs/generative-augmentation.md, §7).

A synthetic folder is an ordinary dataset folder (``image_<id>`` / ``label_<id>`` and a
``dataset.json``) whose ``dataset.json`` carries a ``synthetic`` block::

    "synthetic": {"checkpoint": "<generator run folder or null>",
                  "sources": {"<synthetic case id>": "<source case id of the real folder>", ...}}

Every synthetic case has its source case's array shape, and slice z of the one corresponds to
slice z of the other. :func:`quality_report` measures, in this order:

- **Feature distances** ``fid_<extractor>`` / ``kid_<extractor>`` between the real slices (every
  slice of the source cases) and the synthetic slices (every slice of the synthetic cases).
  The standard Inception weights are not available, so no key is a plain ``fid`` / ``kid``;
  the extractor is named in the key:

  - ``vae``: a diffusers ``AutoencoderKL`` encoder (``vae=DIR``, else the generator run's
    ``model.vae_path`` / ``model.sd_path``): posterior-mean latents, average-pooled to a
    ``grid`` x ``grid`` grid per channel and flattened (4 x 4 x 4 = 64 features for SD's VAE);
  - ``dinov2``: the CLS token of a local transformers DINOv2 folder (``dinov2=DIR``), fed as
    SD-FSMIS's VTCT feeds it (224 px, ImageNet mean / std).

  Slices reach an extractor as the project feeds its models: each volume min-max normalised to
  [-1, 1], resized bilinearly to ``image_size`` (the generator run's ``data.image_size``, else
  128) and repeated to 3 channels. FID is ``monai.metrics.FIDMetric`` on the two feature
  matrices. KID is the unbiased squared MMD with the polynomial kernel
  k(x, y) = (x·y / d + 1)³ (Bińkowski et al. 2018), averaged over random subsets
  (:func:`kid`); ``monai.metrics.MMDMetric`` is the linear-kernel MMD of equal-sized samples and
  cannot compute it.
- **Fidelity** ``ssim`` / ``psnr`` of each synthetic slice against its source slice (both
  volumes min-max normalised to [0, 1]; ``skimage.metrics``, ``data_range=1``; PSNR capped at
  :data:`PSNR_CAP` dB, identical slices have an infinite PSNR).
- **Mask faithfulness** ``mask_dice``: a segmenter (``support-copy``, or a trained run given as
  ``checkpoint``) gets the real source slice and its class mask as the 1-shot support and the
  synthetic slice as the query; Dice (a fraction, as the evaluator reports it) of its prediction
  against the synthetic label.
- **Memorisation**: the SSIM of each synthetic slice to its nearest real slice (over every case
  of the real folder) against a threshold, the 99th percentile of the SSIM of each real slice to
  its nearest real slice of another case. Computed at :data:`MEMO_SIZE` px with the vectorised
  SSIM of :func:`ssim_matrix` (equal to skimage's ``structural_similarity``, tested).

:func:`write_quality` writes the report atomically as JSON; ``tools/synth_quality.py`` is its
command line.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.nifti import DataError

PSNR_CAP = 100.0  # dB; identical slices have an infinite PSNR
MEMO_SIZE = 64  # memorisation SSIM is computed on slices resized to this size
MEMO_PERCENTILE = 99.0
FLAT_RANGE = 1e-3  # a slice whose [0, 1] intensity range is below this is constant: left out of memorisation
DEFAULT_IMAGE_SIZE = 128
DEFAULT_GRID = 4
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
SSIM_WIN = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03
DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- the synthetic folder -------------------------------------------------------------------------
@dataclass
class SyntheticPair:
    """A synthetic dataset, the real one its cases come from, and the source map."""

    real: object  # FSMISDataset
    synthetic: object  # FSMISDataset
    sources: dict  # synthetic case id -> source case id
    generator: str | None  # the generator run folder of the synthetic block (or None)
    meta_path: Path  # the synthetic folder's dataset.json


def read_synthetic_block(meta: str | Path) -> dict:
    """The ``synthetic`` block of a dataset.json: ``{"checkpoint": str | None, "sources": {id: id}}``."""
    meta = Path(meta)
    if not meta.is_file():
        raise DataError(f"{meta}: file not found (a synthetic folder needs a dataset.json with a 'synthetic' block)")
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{meta}: invalid JSON ({exc})") from None
    block = info.get("synthetic") if isinstance(info, dict) else None
    if block is None:
        raise DataError(f"{meta}: no 'synthetic' block: not a synthetic dataset (expected \"synthetic\": "
                        "{\"checkpoint\": RUN or null, \"sources\": {synthetic case id: source case id}})")
    if not isinstance(block, dict):
        raise DataError(f"{meta}: 'synthetic' must be a mapping, not a {type(block).__name__}")
    sources = block.get("sources")
    if not isinstance(sources, dict) or not sources:
        raise DataError(f"{meta}: synthetic.sources must map each synthetic case id to its source case id")
    ckpt = block.get("checkpoint")
    if ckpt is not None and not isinstance(ckpt, str):
        raise DataError(f"{meta}: synthetic.checkpoint must be a run folder or null, got {ckpt!r}")
    return {"checkpoint": ckpt, "sources": {str(k): str(v) for k, v in sources.items()}}


def open_synthetic(real, synthetic) -> SyntheticPair:
    """Open and check a synthetic folder against its real folder: the block, every synthetic case
    mapped to a source case of ``real``, and each pair of the same array shape."""
    from ..data.datasets import open_dataset

    real_ds = open_dataset(real)
    syn_ds = open_dataset(synthetic)
    meta = Path(syn_ds.image_dir) / "dataset.json"
    block = read_synthetic_block(meta)
    sources = block["sources"]
    unknown = [c for c in sources if c not in syn_ds.case_ids]
    if unknown:
        raise DataError(f"{meta}: synthetic.sources names case(s) {unknown[:5]} that have no image_<id> file in "
                        f"{syn_ds.image_dir}")
    unmapped = [c for c in syn_ds.case_ids if c not in sources]
    if unmapped:
        raise DataError(f"{meta}: synthetic case(s) {unmapped[:5]} have no source in synthetic.sources")
    missing = sorted({s for s in sources.values() if s not in real_ds.case_ids})
    if missing:
        raise DataError(f"{meta}: source case(s) {missing[:5]} are not cases of the real folder {real_ds.image_dir} "
                        f"(its cases: {', '.join(real_ds.case_ids[:10])}{' ...' if len(real_ds.case_ids) > 10 else ''})")
    absent = [c for c in syn_ds.test_classes if c not in real_ds.classes]
    if absent:
        raise DataError(f"{meta}: test class(es) {absent} are not classes of the real folder {real_ds.image_dir} "
                        f"({list(real_ds.classes)})")
    for sid in syn_ds.case_ids:
        s_shape = syn_ds.load_case(sid).image.shape
        r_shape = real_ds.load_case(sources[sid]).image.shape
        if s_shape != r_shape:
            raise DataError(f"{syn_ds.image_path(sid)}: shape {tuple(s_shape)} differs from its source "
                            f"{real_ds.image_path(sources[sid])} {tuple(r_shape)}")
    return SyntheticPair(real_ds, syn_ds, dict(sources), block["checkpoint"], meta)


# -- SSIM, vectorised -----------------------------------------------------------------------------
def _box(x: torch.Tensor, win: int) -> torch.Tensor:
    """[N, H, W] -> the mean over every full win x win window, [N, H - win + 1, W - win + 1]."""
    return F.avg_pool2d(x[:, None], win, stride=1)[:, 0]


def _ssim_map(ux, uy, uxx, uyy, uxy, win: int, data_range: float) -> torch.Tensor:
    np_ = win * win
    cov = np_ / (np_ - 1.0)  # sample covariance, as skimage's use_sample_covariance=True
    vx = cov * (uxx - ux * ux)
    vy = cov * (uyy - uy * uy)
    vxy = cov * (uxy - ux * uy)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def _as64(a) -> torch.Tensor:
    a = torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)
    if a.ndim != 3:
        raise ValueError(f"expected slices [N, H, W], got shape {tuple(a.shape)}")
    return a


def ssim_pairs(x, y, data_range: float = 1.0, win_size: int = SSIM_WIN) -> np.ndarray:
    """Mean SSIM of x[i] against y[i] for stacked slices [N, H, W] -> [N] (float64).

    The same number as ``skimage.metrics.structural_similarity(x[i], y[i], data_range=...)``
    with its defaults (7 x 7 uniform window, sample covariance, K1 0.01, K2 0.03): skimage filters
    the whole image and then averages the map with a (win - 1) / 2 border cut off, which is the
    map over the full windows only, computed here with one ``avg_pool2d`` per moment."""
    x, y = _as64(x), _as64(y)
    if x.shape != y.shape:
        raise ValueError(f"ssim_pairs: shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
    ux, uy = _box(x, win_size), _box(y, win_size)
    s = _ssim_map(ux, uy, _box(x * x, win_size), _box(y * y, win_size), _box(x * y, win_size), win_size, data_range)
    return s.mean(dim=(1, 2)).numpy()


def ssim_matrix(x, y, data_range: float = 1.0, win_size: int = SSIM_WIN, budget: int = 1_000_000,
                device=None) -> np.ndarray:
    """SSIM of every x[i] against every y[j] -> [N, M] (float64); each entry equals
    :func:`ssim_pairs` (and skimage) on that pair. The per-slice moments (mean, variance) are
    computed once; each block of pairs needs one ``avg_pool2d`` of the products (the cross moment)
    and a few in-place operations over at most ``budget`` window positions. Float64 throughout, on
    ``device`` (default CPU): about 0.35 s per 1000 pairs of 64 x 64 slices on one shared CPU core
    (measured on a busy 2-core machine), growing as N x M; a GPU ``device`` is much faster."""
    dev = torch.device(device or "cpu")
    x, y = _as64(x).to(dev), _as64(y).to(dev)
    if x.shape[1:] != y.shape[1:]:
        raise ValueError(f"ssim_matrix: slice shapes {tuple(x.shape[1:])} and {tuple(y.shape[1:])} differ")
    n, m = x.shape[0], y.shape[0]
    out = np.zeros((n, m), np.float64)
    if n == 0 or m == 0:
        return out
    np_ = win_size * win_size
    cov = np_ / (np_ - 1.0)  # as _ssim_map
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ux, uy = _box(x, win_size), _box(y, win_size)
    vx, vy = cov * (_box(x * x, win_size) - ux * ux), cov * (_box(y * y, win_size) - uy * uy)
    ax, ay = ux * ux, uy * uy
    hw = ux.shape[1] * ux.shape[2]
    bm = max(1, min(m, budget // hw))
    bn = max(1, budget // (hw * bm))
    for j in range(0, m, bm):
        yj = y[j:j + bm]
        for i in range(0, n, bn):
            xi = x[i:i + bn]
            ci, cj = xi.shape[0], yj.shape[0]
            s = _box((xi[:, None] * yj[None]).reshape(ci * cj, *x.shape[1:]), win_size).reshape(ci, cj, *ux.shape[1:])
            p = ux[i:i + bn, None] * uy[None, j:j + bm]
            s.sub_(p).mul_(2 * cov).add_(c2)  # 2 cov_xy + C2
            s.mul_(p.mul_(2).add_(c1))  # x (2 ux uy + C1)
            den = (ax[i:i + bn, None] + ay[None, j:j + bm]).add_(c1)
            den.mul_((vx[i:i + bn, None] + vy[None, j:j + bm]).add_(c2))
            out[i:i + ci, j:j + cj] = s.div_(den).mean(dim=(2, 3)).cpu().numpy()
    return out


# -- KID ------------------------------------------------------------------------------------------
def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """KID's kernel k(x, y) = (x·y / d + 1)³ (degree 3, gamma 1/d, coef 1), d the feature size."""
    d = x.shape[1]
    return (x @ y.T / d + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimate of MMD² with :func:`polynomial_kernel` (Gretton et al. 2012, Lemma 6):
    sum_{i≠j} k(x_i, x_j) / (m(m−1)) + sum_{i≠j} k(y_i, y_j) / (n(n−1)) − 2 sum_{i,j} k(x_i, y_j) / (mn)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {m} and {n}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kid(x: np.ndarray, y: np.ndarray, n_subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        seed: int = 0) -> dict:
    """Kernel Inception Distance (Bińkowski et al. 2018) on any features: the mean (and std) over
    ``n_subsets`` random subsets of :func:`mmd2_unbiased`, each subset ``m = min(subset_size,
    len(x), len(y))`` rows of x and m rows of y drawn without replacement from
    ``numpy.random.default_rng(seed)`` (x's indices, then y's, subset after subset)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    m = min(int(subset_size), len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(int(n_subsets)):
        ix = rng.choice(len(x), m, replace=False)
        iy = rng.choice(len(y), m, replace=False)
        vals.append(mmd2_unbiased(x[ix], y[iy]))
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "subsets": int(n_subsets), "subset_size": m}


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance of two feature matrices [N, D] via ``monai.metrics.FIDMetric``."""
    import contextlib
    import io

    from monai.metrics import FIDMetric

    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 samples on each side, got {len(real)} and {len(fake)}")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # MONAI prints when it regularises a singular product, and passes scipy's deprecated sqrtm(disp=)
        warnings.simplefilter("ignore", DeprecationWarning)
        value = FIDMetric()(torch.as_tensor(np.asarray(fake, np.float64)), torch.as_tensor(np.asarray(real, np.float64)))
    return float(value)


# -- feature extractors ---------------------------------------------------------------------------
class VAEFeatures:
    """Posterior-mean latents of an AutoencoderKL encoder, average-pooled to grid x grid per channel."""

    name = "vae"

    def __init__(self, vae, source: str, image_size: int, grid: int = DEFAULT_GRID, device="cpu", batch: int = 16):
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.source, self.size, self.grid, self.device, self.batch = source, int(image_size), int(grid), device, batch
        self.dim = int(vae.config.latent_channels) * self.grid * self.grid

    def describe(self) -> str:
        return (f"diffusers AutoencoderKL encoder from {self.source}: posterior mean latents "
                f"({self.vae.config.latent_channels} channels) average-pooled to {self.grid}x{self.grid} per channel "
                f"and flattened ({self.dim} features); slices min-max normalised to [-1, 1] per volume, resized "
                f"bilinearly to {self.size} px, repeated to 3 channels")

    @torch.no_grad()
    def __call__(self, slices: np.ndarray) -> np.ndarray:
        from ..data.batch import slices_to_model

        out = []
        dtype = next(self.vae.parameters()).dtype
        for i in range(0, len(slices), self.batch):
            x = slices_to_model(slices[i:i + self.batch], self.size, "image", self.device).expand(-1, 3, -1, -1)
            mean = self.vae.encode(x.to(dtype)).latent_dist.mean.float()
            out.append(F.adaptive_avg_pool2d(mean, self.grid).flatten(1).cpu().numpy())
        return np.concatenate(out).astype(np.float64)


class DinoV2Features:
    """The CLS token of a DINOv2 model (fed as SD-FSMIS's VTCT: [0, 1], 224 px, ImageNet mean / std)."""

    name = "dinov2"

    def __init__(self, model, source: str, device="cpu", batch: int = 16, size: int = DINOV2_SIZE):
        self.model = model.to(device).eval().requires_grad_(False)
        self.source, self.device, self.batch, self.size = source, device, batch, int(size)
        self.dim = int(model.config.hidden_size)
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    def describe(self) -> str:
        return (f"transformers DINOv2 from {self.source}: CLS token of the last hidden state ({self.dim} features); "
                f"slices min-max normalised to [-1, 1] per volume, mapped to [0, 1], resized bilinearly to "
                f"{self.size} px, repeated to 3 channels, ImageNet mean/std")

    @torch.no_grad()
    def __call__(self, slices: np.ndarray) -> np.ndarray:
        from ..data.batch import slices_to_model

        out = []
        dtype = next(self.model.parameters()).dtype
        for i in range(0, len(slices), self.batch):
            x = (slices_to_model(slices[i:i + self.batch], self.size, "image", self.device) + 1) / 2
            x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std
            h = self.model(pixel_values=x.to(dtype)).last_hidden_state[:, 0]
            out.append(h.float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)


def load_vae_folder(path: str | Path):
    """An AutoencoderKL from a local diffusers folder (``config.json`` in it, or in ``vae/``)."""
    from diffusers import AutoencoderKL

    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        sub = None
    elif (p / "vae" / "config.json").is_file():
        sub = "vae"
    else:
        raise DataError(f"{p}: not a local AutoencoderKL folder (no config.json, nor vae/config.json)")
    try:
        kw = {"subfolder": sub} if sub else {}
        return AutoencoderKL.from_pretrained(str(p), local_files_only=True, **kw)
    except Exception as exc:
        raise DataError(f"{p}: cannot load an AutoencoderKL from it ({type(exc).__name__}: {exc})") from None


def generator_config(run: str | Path):
    """The config of a generator run folder (``RUN/config.yaml``)."""
    from ..config import load_config

    p = Path(run).expanduser()
    if not (p / "config.yaml").is_file():
        raise DataError(f"{p / 'config.yaml'}: file not found (the generator run named by the synthetic block)")
    return load_config(p / "config.yaml")


def vae_from_run(run: str | Path, cfg=None):
    """The frozen VAE of a generator run: its ``model.vae_path``, else its ``model.sd_path``."""
    from ..models.weights import load_vae

    cfg = cfg if cfg is not None else generator_config(run)
    m = cfg.model
    if not (getattr(m, "vae_path", None) or getattr(m, "sd_path", None)):
        raise DataError(f"{Path(run) / 'config.yaml'}: the run's VAE has no weight folder (model.vae_path and "
                        "model.sd_path are empty); give the VAE with --vae DIR")
    vae, row = load_vae(m)
    return vae, str(row.source)


def load_dinov2_folder(path: str | Path):
    from transformers import AutoModel

    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise DataError(f"{p}: not a local transformers DINOv2 folder (config.json missing)")
    try:
        return AutoModel.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:
        raise DataError(f"{p}: cannot load a DINOv2 model from it ({type(exc).__name__}: {exc})") from None


# -- helpers --------------------------------------------------------------------------------------
def _unit(img: np.ndarray) -> np.ndarray:
    """A volume min-max normalised to [0, 1] (float64)."""
    from ..data.normalize import normalize_volume

    return (normalize_volume(img, "minmax").astype(np.float64) + 1.0) / 2.0


def _small(vol01: np.ndarray, size: int) -> np.ndarray:
    from ..data.batch import slices_to_model

    return slices_to_model(vol01, size, "image")[:, 0].double().numpy()


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


class _Bar:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="quality", unit="step", file=sys.stderr, dynamic_ncols=True)

    def step(self, what: str, n: int = 1):
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# -- the parts of the report ----------------------------------------------------------------------
def fidelity(pair: SyntheticPair, bar=None) -> dict:
    """SSIM and PSNR of each synthetic slice against its source slice, both volumes in [0, 1]."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    per_case, all_ssim, all_psnr = {}, [], []
    for sid in pair.synthetic.case_ids:
        src = pair.sources[sid]
        a = _unit(pair.real.load_case(src).image)
        b = _unit(pair.synthetic.load_case(sid).image)
        ss, ps = [], []
        for z in range(a.shape[0]):
            ss.append(float(structural_similarity(a[z], b[z], data_range=1.0)))
            with np.errstate(divide="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = float(peak_signal_noise_ratio(a[z], b[z], data_range=1.0))
            ps.append(min(p, PSNR_CAP))
        per_case[sid] = {"source": src, "ssim": _mean(ss), "psnr": _mean(ps), "slices": len(ss)}
        all_ssim += ss
        all_psnr += ps
        if bar is not None:
            bar.step(f"fidelity {sid}")
    return {"ssim": _mean(all_ssim), "psnr": _mean(all_psnr), "per_case": per_case}


def agreement_rows(pair: SyntheticPair, predictor, bar=None) -> list[dict]:
    """One row ``{"case", "z", "class", "dice"}`` per synthetic case, test class and slice z where
    both the synthetic and the source label have the class: the segmenter's prediction on the
    synthetic slice (support: the real source slice z and its class mask, 1-shot) against the
    synthetic label slice."""
    from ..data.normalize import normalize_volume
    from ..evaluation.metrics import dice

    norm = predictor.normalization
    rows = []
    for sid in pair.synthetic.case_ids:
        src = pair.sources[sid]
        r_case, s_case = pair.real.load_case(src), pair.synthetic.load_case(sid)
        r_img, s_img = normalize_volume(r_case.image, norm), normalize_volume(s_case.image, norm)
        for cls in pair.synthetic.test_classes:
            s_id, r_id = pair.synthetic.class_id(cls), pair.real.class_id(cls)
            s_has = (s_case.label == s_id).reshape(s_case.label.shape[0], -1).any(1)
            r_has = (r_case.label == r_id).reshape(r_case.label.shape[0], -1).any(1)
            for z in np.flatnonzero(s_has & r_has):
                out = np.asarray(predictor.predict(r_img[z:z + 1], (r_case.label[z:z + 1] == r_id).astype(np.float32),
                                                   s_img[z:z + 1]))
                if out.shape != (1,) + s_img.shape[1:]:
                    raise RuntimeError(f"{predictor.name} returned shape {out.shape}, expected {(1,) + s_img.shape[1:]}")
                pred = out[0] > 0.5 if out.dtype.kind == "f" else out[0].astype(bool)
                rows.append({"case": sid, "z": int(z), "class": cls, "dice": float(dice(pred, s_case.label[z] == s_id))})
        if bar is not None:
            bar.step(f"mask dice {sid}")
    return rows


def mask_faithfulness(pair: SyntheticPair, predictor, segmenter: str, bar=None) -> dict:
    """Dice of the segmenter's prediction on each synthetic slice (support: the real source slice
    and its class mask, 1-shot) against the synthetic label, over the slices where both labels
    have the class (:func:`agreement_rows`)."""
    rows = agreement_rows(pair, predictor, bar)
    per_class: dict = {c: [r["dice"] for r in rows if r["class"] == c] for c in pair.synthetic.test_classes}
    values = [r["dice"] for r in rows]
    return {"segmenter": segmenter, "mean": _mean(values), "per_class": {c: _mean(v) for c, v in per_class.items()},
            "slices_per_class": {c: len(v) for c, v in per_class.items()}, "slices": len(values)}


def memorisation(pair: SyntheticPair, size: int = MEMO_SIZE, percentile: float = MEMO_PERCENTILE, bar=None,
                 device=None) -> dict:
    """Nearest-real-slice SSIM of every synthetic slice against the real-vs-real threshold. Cost:
    (n_real + n_synthetic) x n_real slice pairs of :func:`ssim_matrix`, on ``device``."""
    def stack(ds, ids):
        slices, owner, names, skipped = [], [], [], []
        for k, cid in enumerate(ids):
            small = _small(_unit(ds.load_case(cid).image), size)
            for z in range(small.shape[0]):
                if np.ptp(small[z]) < FLAT_RANGE:
                    skipped.append(f"{cid}:{z}")
                    continue
                slices.append(small[z])
                owner.append(k)
                names.append(f"{cid}:{z}")
        arr = np.stack(slices) if slices else np.zeros((0, size, size))
        return arr, np.asarray(owner, int), names, skipped

    real, r_owner, _, r_skipped = stack(pair.real, pair.real.case_ids)
    syn, _, s_names, s_skipped = stack(pair.synthetic, pair.synthetic.case_ids)
    threshold = None
    if len(real) and len(set(r_owner.tolist())) > 1:
        rr = ssim_matrix(real, real, device=device)
        rr[r_owner[:, None] == r_owner[None, :]] = -np.inf
        nn_other = rr.max(axis=1)
        threshold = float(np.percentile(nn_other[np.isfinite(nn_other)], percentile))
    if bar is not None:
        bar.step("memorisation: real vs real")
    nearest = ssim_matrix(syn, real, device=device).max(axis=1) if len(syn) and len(real) else np.zeros(len(syn))
    flagged = [n for n, v in zip(s_names, nearest) if threshold is not None and v > threshold]
    if bar is not None:
        bar.step("memorisation: synthetic vs real")
    return {"nearest_ssim": [float(v) for v in nearest], "slices": s_names, "threshold": threshold,
            "flagged": flagged, "flagged_fraction": (len(flagged) / len(s_names)) if s_names else None,
            "n_slices": len(s_names), "skipped": s_skipped, "n_real_slices": len(real),
            "n_real_skipped": len(r_skipped)}


def _volumes(ds, ids):
    from ..data.normalize import normalize_volume

    for cid in ids:
        yield cid, normalize_volume(ds.load_case(cid).image, "minmax")


# -- the report -----------------------------------------------------------------------------------
def quality_report(real, synthetic, checkpoint=None, vae=None, dinov2=None, device=None, progress: bool = False,
                   image_size: int | None = None, grid: int = DEFAULT_GRID, kid_subsets: int = KID_SUBSETS,
                   kid_subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> dict:
    """The quality report of a synthetic folder against its real folder (see the module docstring).

    ``checkpoint``: a trained segmenter run (SD-FSMIS) for ``mask_dice`` (default ``support-copy``);
    ``vae``: a local AutoencoderKL folder (default: the generator run's VAE); ``dinov2``: a local
    transformers DINOv2 folder. At least one feature extractor must be available."""
    t0 = time.perf_counter()
    pair = open_synthetic(real, synthetic)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # extractors
    gen_cfg = None
    if pair.generator:
        gen_path = Path(pair.generator).expanduser()
        if not gen_path.is_dir():
            if vae is None:
                raise DataError(f"{pair.meta_path}: synthetic.checkpoint {pair.generator} is not a folder "
                                "(give the VAE with --vae DIR)")
        else:
            gen_cfg = generator_config(gen_path)
    size = int(image_size or (getattr(gen_cfg.data, "image_size", None) if gen_cfg is not None else None)
               or DEFAULT_IMAGE_SIZE)
    extractors = []
    if vae is not None:
        extractors.append(VAEFeatures(load_vae_folder(vae), str(vae), size, grid, dev))
    elif gen_cfg is not None:
        model, src = vae_from_run(pair.generator, gen_cfg)
        extractors.append(VAEFeatures(model, f"{src} (the VAE of the generator run {pair.generator})", size, grid, dev))
    if dinov2 is not None:
        extractors.append(DinoV2Features(load_dinov2_folder(dinov2), str(dinov2), dev))
    if not extractors:
        raise DataError(f"{pair.meta_path}: no feature extractor for FID/KID: the synthetic block names no generator "
                        "run (synthetic.checkpoint is null) and neither --vae DIR (a diffusers AutoencoderKL folder) nor "
                        "--dinov2 DIR (a transformers DINOv2 folder) was given")

    # segmenter
    from ..methods.base import build_predictor

    if checkpoint is not None:
        predictor = build_predictor(None, checkpoint=str(checkpoint), device=str(dev))
        segmenter = f"{predictor.name} (checkpoint {checkpoint})"
    else:
        predictor = build_predictor("support-copy")
        segmenter = "support-copy (no checkpoint)"

    src_ids = sorted(set(pair.sources.values()), key=pair.real.case_ids.index)
    syn_ids = list(pair.synthetic.case_ids)
    n_syn = len(syn_ids)
    bar = _Bar(len(extractors) * (len(src_ids) + n_syn) + 2 * n_syn + 2, progress)
    try:
        report = {"real": str(Path(pair.real.image_dir).resolve()),
                  "synthetic": str(Path(pair.synthetic.image_dir).resolve()),
                  "generator": pair.generator, "checkpoint": None if checkpoint is None else str(checkpoint)}
        feats = {}
        for ex in extractors:
            fr, fs = [], []
            for cid, vol in _volumes(pair.real, src_ids):
                fr.append(ex(vol))
                bar.step(f"{ex.name} features real {cid}")
            for cid, vol in _volumes(pair.synthetic, syn_ids):
                fs.append(ex(vol))
                bar.step(f"{ex.name} features synthetic {cid}")
            feats[ex.name] = (np.concatenate(fr), np.concatenate(fs))
        n_real = len(next(iter(feats.values()))[0])
        n_fake = len(next(iter(feats.values()))[1])
        report["n_real_slices"], report["n_synthetic_slices"] = n_real, n_fake
        report["extractors"] = {}
        for ex in extractors:
            fr, fs = feats[ex.name]
            k = kid(fr, fs, kid_subsets, kid_subset_size, seed)
            report[f"fid_{ex.name}"] = fid(fr, fs)
            report[f"kid_{ex.name}"] = k["mean"]
            report["extractors"][ex.name] = {"description": ex.describe(), "features": ex.dim,
                                             "kid_std": k["std"], "kid_subsets": k["subsets"],
                                             "kid_subset_size": k["subset_size"]}
        fidel = fidelity(pair, bar)
        report["ssim"], report["psnr"], report["per_case"] = fidel["ssim"], fidel["psnr"], fidel["per_case"]
        report["mask_dice"] = mask_faithfulness(pair, predictor, segmenter, bar)
        report["memorisation"] = memorisation(pair, bar=bar, device=dev)
    finally:
        bar.close()
    report["definitions"] = definitions([ex.name for ex in extractors], size, grid, kid_subsets, kid_subset_size, seed)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


def definitions(extractors, image_size: int = DEFAULT_IMAGE_SIZE, grid: int = DEFAULT_GRID,
                kid_subsets: int = KID_SUBSETS, kid_subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> dict:
    """One line per metric: exactly how it was computed."""
    d = {}
    for name in extractors:
        d[f"fid_{name}"] = (f"Frechet distance (monai.metrics.FIDMetric) between the {name} features (see "
                            "extractors) of every slice of the source cases (real) and of every slice of the "
                            "synthetic cases; not the Inception FID")
        d[f"kid_{name}"] = (f"unbiased MMD^2 with the polynomial kernel (x.y/d + 1)^3 between the {name} features of "
                            f"real and synthetic slices, mean over {kid_subsets} random subsets of min({kid_subset_size}, "
                            f"n_real, n_synthetic) slices per side (seed {seed}; std in extractors); not the "
                            "Inception KID")
    if "vae" in extractors:
        d["vae_features"] = (f"AutoencoderKL posterior mean of each slice (per-volume min-max to [-1, 1], bilinear to "
                             f"{image_size} px, 3 channels), average-pooled to {grid}x{grid} per latent channel, flattened")
    if "dinov2" in extractors:
        d["dinov2_features"] = (f"DINOv2 CLS token of each slice (per-volume min-max to [0, 1], bilinear to "
                                f"{DINOV2_SIZE} px, 3 channels, ImageNet mean/std)")
    d.update({
        "ssim": "mean over synthetic slices of skimage structural_similarity(source slice z, synthetic slice z, "
                "data_range=1), both volumes min-max normalised to [0, 1] per volume (7x7 uniform window); "
                "per_case: the mean over that case's slices",
        "psnr": f"mean over synthetic slices of skimage peak_signal_noise_ratio(source slice z, synthetic slice z, "
                f"data_range=1) in dB on the same [0, 1] volumes, each slice capped at {PSNR_CAP:g} dB (identical "
                "slices have an infinite PSNR); per_case: the mean over that case's slices",
        "mask_dice": "for each synthetic case, test class and slice z where both the synthetic and the source label "
                     "have the class: the segmenter's 1-shot prediction on the synthetic image slice z (support: the "
                     "source image slice z and its class mask, images normalised per volume as the segmenter asks), "
                     "Dice 2TP/(2TP+FP+FN) (a fraction) against the synthetic label slice z; mean over those slices, "
                     "per_class over the slices of each class",
        "memorisation": f"slices of every volume min-max normalised to [0, 1] per volume and resized bilinearly to "
                        f"{MEMO_SIZE}x{MEMO_SIZE}; slices with an intensity range below {FLAT_RANGE:g} are skipped on "
                        "both sides; nearest_ssim: per synthetic slice, the largest SSIM (7x7 uniform window, "
                        "data_range 1, equal to skimage's) to any real slice of any case of the real folder; threshold: "
                        f"the {MEMO_PERCENTILE:g}th percentile over real slices of the SSIM to the nearest real slice "
                        "of a different case; flagged: synthetic slices (case:z) with nearest_ssim > threshold; "
                        "flagged_fraction = flagged / n_slices",
        "n_real_slices": "slices of the source cases (each source case once) given to the feature extractors",
        "n_synthetic_slices": "slices of the synthetic cases given to the feature extractors",
        "generator": "the generator run named by the synthetic folder's dataset.json (synthetic.checkpoint)",
        "checkpoint": "the segmenter run used for mask_dice (null: support-copy)",
    })
    return d


def write_quality(real, synthetic, out_json, **kwargs) -> dict:
    """:func:`quality_report` written atomically as JSON to ``out_json``; returns the report."""
    from ..atomic import atomic_write_json

    report = quality_report(real, synthetic, **kwargs)
    atomic_write_json(out_json, report)
    return report


__all__ = ["quality_report", "write_quality", "open_synthetic", "read_synthetic_block", "SyntheticPair",
           "ssim_pairs", "ssim_matrix", "polynomial_kernel", "mmd2_unbiased", "kid", "fid",
           "VAEFeatures", "DinoV2Features", "load_vae_folder", "load_dinov2_folder", "vae_from_run",
           "fidelity", "agreement_rows", "mask_faithfulness", "memorisation", "definitions", "PSNR_CAP", "MEMO_SIZE"]
