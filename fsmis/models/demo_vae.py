"""The CPU demo's stand-in for SD's frozen VAE: a tiny ``AutoencoderKL`` trained on the data.

Why: a randomly initialised frozen VAE cannot reconstruct masks (3D Dice 0.03 measured), so
SD-FSMIS on top of it learns nothing. The demo (no pretrained SD weights) therefore first
trains this small VAE on the phantom images AND masks, caches it, and then freezes it, as
SD-FSMIS freezes SD's VAE. Its mask reconstruction Dice is the ceiling ("oracle") of the
whole demo model and is reported as such.

Architecture (:data:`DEMO_VAE_CONFIG`): blocks 32/64/64, one resnet per encoder block (two
per decoder block, as diffusers builds it), 4 latent channels. ``scaling_factor`` is set
after training, as Stable Diffusion's 0.18215 was for its VAE: 1 / the standard deviation of
the posterior-mean latents of the training images (every ``LATENT_STD_STRIDE``-th slice of
every case, full frames), so that the UNet sees and predicts unit-variance latents. (SD's
0.18215 applied to this VAE gave latents of standard deviation about 0.13, eight times too
small for a randomly initialised UNet.) It is saved in the VAE's ``config.json`` and read from
there by the model (``model.scaling_factor: null``). Three blocks mean diffusers downsamples
``len(blocks) - 1 = 2`` times: **spatial factor 4** (SD's VAE: 4 blocks, factor 8). The
demo runs SD-FSMIS at ``image_size`` 128, so its latent grid is 32 x 32, the grid SD gets
at 256 px.

Inputs exactly as SD-FSMIS feeds the VAE: an image is one slice of the volume min-max
normalised per volume to [-1, 1] (:func:`fsmis.data.normalize.normalize_volume` "minmax"),
resized in-plane to ``image_size`` and repeated to 3 channels; a mask is {0,1} -> {-1,+1},
repeated to 3 channels. A decoded mask is the mean over the 3 channels of (x + 1) / 2.

Training (:func:`train_demo_vae`), on one dataset or a list of them (for the cross-domain
demo pass the CT and the MR folders: SD's VAE is domain-generic, a stand-in trained on CT
alone encodes MR images out of distribution):
- random ``crop`` x ``crop`` crops (64 by default) of slices resized to ``image_size``: on
  this machine the architecture probe found full 128 x 128 frames 6x slower per step than
  64 x 64 crops; the model
  is convolutional (plus one mid-block attention), so it is applied to full frames after;
- every batch is half image crops, half mask crops (mask crops are placed around a random
  foreground pixel 85 % of the time, anywhere otherwise, so empty crops occur too);
  random flips / 90 degree rotations of each crop;
- loss L1 + MSE of the reconstruction (posterior **sample**) + 1e-6 KL; AdamW, linear
  warm-up then cosine decay of the learning rate;
- budgeted in optimiser **steps** (deterministic: the same seed, data and kwargs give the
  same weights on the same machine and thread count); ``minutes`` optionally stops earlier
  (then the result depends on the machine's speed).
- defaults (:data:`DEFAULT_TRAIN_KWARGS`): 720 steps x 8 crops, lr 1e-3. Measured on the
  2-core CPU machine (torch 2.13, 2 threads, unloaded), 10 phantom CT cases of
  40 x 256 x 256: 0.30 s/step, 215 s of training + 43 s of evaluation; mask reconstruction
  3D Dice liver 0.993, spleen 0.983, left kidney 0.982, right kidney 0.986 (mean 0.986),
  image PSNR 28.5 dB. 240 steps (about 75 s unloaded): mean Dice 0.959, PSNR 25.7 dB. With other
  processes on the two cores the same steps took 3-6x longer (OpenMP threads waiting on
  each other), hence the optional ``minutes`` cap.

No test labels are used for training. SD's VAE never saw these images nor their organ
labels; to keep the stand-in equally label-free, the training masks are the dataset's
unsupervised supervoxels (``ds.load_case(id, supervoxels=True).supervoxels``: single
supervoxels, and sometimes the union of two touching ones), from all cases. The images of
all cases are used (unlabelled images are what the self-supervised protocol trains on
anyway). The ground-truth organ labels are used only to *evaluate* the reconstruction.
Without a supervoxel folder, ``masks="auto"`` falls back to the label masks of every
labelled class (recorded as ``mask_source: "labels"`` in the report, with a warning): that
fallback sees test-class labels and is only meant for tiny test datasets.

Evaluation (in the report): per test class, the mask reconstruction 3D Dice per volume
(encode with the posterior mean -> decode -> probability > 0.5, at ``image_size``, every
slice of the volume) averaged over the volumes containing the class, the per-slice Dice
(slices containing the class) and the pooled Dice; and the image reconstruction PSNR
(dB, on the [-1, 1] scale, peak-to-peak 2) over every 4th slice of every case. Labels of
the test classes are the only ones read for the evaluation.

Caching (:func:`ensure_demo_vae`): ``cache_dir/<key>/`` where the key hashes the data's
``dataset.json`` content, the names and sizes of its image / label / supervoxel files, the
training kwargs, :data:`DEMO_VAE_CONFIG` and :data:`VERSION`. A folder is written
atomically (trained in a temporary sibling, then renamed), so a cache entry is complete or
absent.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DEMO_VAE_CONFIG",
    "DOWNSAMPLING_FACTOR",
    "DEFAULT_TRAIN_KWARGS",
    "VERSION",
    "build_demo_vae",
    "train_demo_vae",
    "evaluate_vae",
    "ensure_demo_vae",
    "demo_vae_key",
    "data_fingerprint",
    "is_demo_vae_folder",
]

VERSION = 2  # bump when the training procedure changes (invalidates every cache entry)

DEMO_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": 128,
    "scaling_factor": 0.18215,
}
DOWNSAMPLING_FACTOR = 2 ** (len(DEMO_VAE_CONFIG["block_out_channels"]) - 1)  # 4

# Defaults measured on the 2-core CPU machine of this project (see the module docstring and
# the report of tools/train_vae.py): about 4 minutes on 10 phantom CT cases.
DEFAULT_TRAIN_KWARGS: dict = {
    "image_size": 128,
    "crop": 64,
    "steps": 720,
    "batch_size": 8,
    "lr": 1e-3,
    "seed": 0,
    "masks": "auto",
    "minutes": None,
}

REPORT_NAME = "vae_report.json"
KL_WEIGHT = 1e-6
FG_CROP_PROB = 0.85
UNION_PROB = 0.25
WARMUP_FRACTION = 0.03
LATENT_STD_STRIDE = 2


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
def build_demo_vae(seed: int = 0):
    """A randomly initialised :data:`DEMO_VAE_CONFIG` ``AutoencoderKL`` (init seeded, global RNG untouched)."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        vae = AutoencoderKL(**copy.deepcopy(DEMO_VAE_CONFIG))
    return vae.float()


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def _open(data):
    from fsmis.data.datasets import FSMISDataset, open_dataset

    return data if isinstance(data, FSMISDataset) else open_dataset(data)


def _open_many(data) -> list:
    """One dataset (folder or opened) or a list / tuple of them -> list of opened datasets."""
    items = list(data) if isinstance(data, (list, tuple)) else [data]
    if not items:
        raise ValueError("no dataset given")
    return [_open(d) for d in items]


def _names(dss) -> list[str]:
    """Dataset names, made unique (``name``, ``name#2``, ...)."""
    out, seen = [], {}
    for ds in dss:
        seen[ds.name] = seen.get(ds.name, 0) + 1
        out.append(ds.name if seen[ds.name] == 1 else f"{ds.name}#{seen[ds.name]}")
    return out


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def _resize_nearest(vol: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour in-plane resize of an integer / bool [Z, Y, X] volume to [Z, size, size]."""
    iy, ix = _nearest_index(vol.shape[1], size), _nearest_index(vol.shape[2], size)
    return np.ascontiguousarray(vol[:, iy][:, :, ix])


def _prep_image(image: np.ndarray, size: int) -> np.ndarray:
    from fsmis.data.normalize import normalize_volume
    from fsmis.data.transforms import resize_image

    img = normalize_volume(image, "minmax")
    if img.shape[1:] != (size, size):
        img = np.clip(resize_image(img, (size, size)), -1.0, 1.0)
    return np.ascontiguousarray(img, dtype=np.float32)


def _mask_source(ds, masks: str) -> str:
    if masks not in ("auto", "supervoxels", "labels"):
        raise ValueError(f"masks must be 'auto', 'supervoxels' or 'labels', not {masks!r}")
    if masks == "auto":
        return "supervoxels" if ds.supervoxel_dir is not None else "labels"
    return masks


class _TrainData:
    """Images and mask sources of every case of every dataset, resized to ``image_size``, with a
    crop sampler (cases pooled: every case is equally likely, whatever its dataset)."""

    def __init__(self, dss, image_size: int, sources):
        self.images, self.maps, self.ids_per_slice = [], [], []
        for ds, source in zip(dss, sources):
            class_ids = sorted(set(int(v) for v in ds.classes.values()))
            for cid in ds.case_ids:
                case = ds.load_case(cid, supervoxels=(source == "supervoxels"))
                self.images.append(_prep_image(case.image, image_size))
                lab = case.supervoxels if source == "supervoxels" else case.label
                lab = _resize_nearest(np.asarray(lab), image_size).astype(np.int32)
                if source == "labels":  # only the named classes (never e.g. unnamed ids)
                    lab = np.where(np.isin(lab, class_ids), lab, 0).astype(np.int32)
                self.maps.append(lab)
                self.ids_per_slice.append([np.unique(s[s > 0]) for s in lab])
        self.mask_slices = [(c, z) for c, per in enumerate(self.ids_per_slice)
                            for z, ids in enumerate(per) if ids.size]
        if not self.mask_slices:
            raise ValueError(f"{', '.join(str(d.image_dir) for d in dss)}: no foreground {'/'.join(sorted(set(sources)))} "
                             "in any slice: nothing to train the masks on")
        self.size = image_size

    def _crop_at(self, rng, arr2d, crop, around=None):
        s = self.size
        if crop >= s:
            return arr2d
        if around is not None:
            y, x = around
            y0 = int(np.clip(y - rng.integers(0, crop), 0, s - crop))
            x0 = int(np.clip(x - rng.integers(0, crop), 0, s - crop))
        else:
            y0, x0 = int(rng.integers(0, s - crop + 1)), int(rng.integers(0, s - crop + 1))
        return arr2d[y0:y0 + crop, x0:x0 + crop]

    def sample_image(self, rng, crop):
        c = int(rng.integers(len(self.images)))
        z = int(rng.integers(self.images[c].shape[0]))
        return self._crop_at(rng, self.images[c][z], crop)

    def sample_mask(self, rng, crop):
        c, z = self.mask_slices[int(rng.integers(len(self.mask_slices)))]
        lab = self.maps[c][z]
        ids = self.ids_per_slice[c][z]
        m = lab == ids[int(rng.integers(ids.size))]
        if ids.size > 1 and rng.random() < UNION_PROB:  # a touching neighbour, if any
            ring = np.zeros_like(m)
            ring[1:] |= m[:-1]; ring[:-1] |= m[1:]; ring[:, 1:] |= m[:, :-1]; ring[:, :-1] |= m[:, 1:]
            nb = np.unique(lab[ring & ~m])
            nb = nb[nb > 0]
            if nb.size:
                m |= lab == nb[int(rng.integers(nb.size))]
        around = None
        if rng.random() < FG_CROP_PROB:
            ys, xs = np.nonzero(m)
            k = int(rng.integers(ys.size))
            around = (int(ys[k]), int(xs[k]))
        return self._crop_at(rng, m, crop, around).astype(np.float32) * 2.0 - 1.0

    def batch(self, rng, batch_size, crop) -> torch.Tensor:
        n_img = batch_size // 2
        items = [self.sample_image(rng, crop) for _ in range(n_img)]
        items += [self.sample_mask(rng, crop) for _ in range(batch_size - n_img)]
        out = []
        for a in items:
            k = int(rng.integers(4))
            a = np.rot90(a, k)
            if rng.random() < 0.5:
                a = a[:, ::-1]
            out.append(np.ascontiguousarray(a))
        x = torch.from_numpy(np.stack(out)).unsqueeze(1)
        return x.expand(-1, 3, -1, -1).contiguous()


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _reconstruct(vae, frames: np.ndarray, chunk: int = 32) -> np.ndarray:
    """[N, H, W] in [-1, 1] -> reconstruction [N, H, W] (mean over 3 channels), posterior mean."""
    out = []
    for i in range(0, len(frames), chunk):
        x = torch.from_numpy(np.ascontiguousarray(frames[i:i + chunk], dtype=np.float32))
        x = x.unsqueeze(1).expand(-1, 3, -1, -1)
        z = vae.encode(x).latent_dist.mean
        out.append(vae.decode(z).sample.float().mean(1).numpy())
    return np.concatenate(out) if out else np.zeros((0,) + frames.shape[1:], np.float32)


@torch.no_grad()
def latent_standard_deviation(vae, volumes, stride: int = LATENT_STD_STRIDE, chunk: int = 32) -> float:
    """Standard deviation of the posterior-mean latents (all channels and positions) of every
    ``stride``-th slice of each volume ([Z, H, W] arrays in [-1, 1], already at the model size)."""
    frames = np.concatenate([np.asarray(v)[::stride] for v in volumes])
    total, total_sq, n = 0.0, 0.0, 0
    for i in range(0, len(frames), chunk):
        x = torch.from_numpy(np.ascontiguousarray(frames[i:i + chunk], dtype=np.float32))
        z = vae.encode(x.unsqueeze(1).expand(-1, 3, -1, -1)).latent_dist.mean.double()
        total += float(z.sum())
        total_sq += float((z * z).sum())
        n += z.numel()
    mean = total / n
    return float(np.sqrt(max(total_sq / n - mean * mean, 1e-24)))


def evaluate_vae(vae, data, image_size: int = 128, case_ids=None, classes=None, image_stride: int = 4,
                 progress: bool = False) -> dict:
    """Mask reconstruction Dice per class and image PSNR (see the module docstring).

    Exact shortcut: an empty mask slice is the same constant frame (all -1) wherever it
    occurs and the VAE treats every frame independently (posterior mean, GroupNorm per
    sample), so it is reconstructed once and its false positives counted for every empty
    slice of the volume. The PSNR uses every ``image_stride``-th slice of every case (4 by
    default: the image reconstruction costs as much as the masks and varies little along z).
    """
    ds = _open(data)
    vae = vae.eval()
    case_ids = list(ds.case_ids if case_ids is None else case_ids)
    classes = list(ds.test_classes if classes is None else classes)
    t0 = time.time()
    empty_fp = int((_reconstruct(vae, np.full((1, image_size, image_size), -1.0, np.float32)) > 0.0).sum())
    per_case = {c: {} for c in classes}
    per_slice = {c: [] for c in classes}
    pooled = {c: [0, 0, 0] for c in classes}  # intersection, |pred|, |gt|
    sq_err, n_pix = 0.0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(case_ids), desc="evaluate VAE", unit="case", leave=False)
    for cid in case_ids:
        case = ds.load_case(cid)
        img = _prep_image(case.image, image_size)[::max(1, int(image_stride))]
        rec = np.clip(_reconstruct(vae, img), -1.0, 1.0)
        sq_err += float(np.square(rec.astype(np.float64) - img).sum())
        n_pix += img.size
        lab = _resize_nearest(np.asarray(case.label), image_size)
        for name in classes:
            gt = lab == ds.class_id(name)
            zs = np.flatnonzero(gt.reshape(gt.shape[0], -1).any(1))
            if zs.size == 0:
                continue
            # probability = mean over channels of (x + 1) / 2 > 0.5  <=>  mean of x > 0
            pred = _reconstruct(vae, gt[zs].astype(np.float32) * 2.0 - 1.0) > 0.0
            g = gt[zs]
            inter = int((pred & g).sum())
            p_sum = int(pred.sum()) + empty_fp * (gt.shape[0] - zs.size)
            g_sum = int(g.sum())
            per_case[name][str(cid)] = 2.0 * inter / (p_sum + g_sum)
            for k in range(len(zs)):
                pi, gi = pred[k], g[k]
                per_slice[name].append(2.0 * float((pi & gi).sum()) / float(pi.sum() + gi.sum()))
            pooled[name][0] += inter
            pooled[name][1] += p_sum
            pooled[name][2] += g_sum
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    mse = sq_err / max(n_pix, 1)
    dice = {c: (float(np.mean(list(v.values()))) if v else float("nan")) for c, v in per_case.items()}
    valid = [v for v in dice.values() if not math.isnan(v)]
    return {
        "image_size": int(image_size),
        "cases": [str(c) for c in case_ids],
        "dice": dice,
        "mean_dice": float(np.mean(valid)) if valid else float("nan"),
        "dice_per_case": per_case,
        "dice_slice": {c: (float(np.mean(v)) if v else float("nan")) for c, v in per_slice.items()},
        "dice_pooled": {c: (2.0 * v[0] / (v[1] + v[2]) if v[1] + v[2] else float("nan")) for c, v in pooled.items()},
        "empty_slice_false_positives": empty_fp,
        "image_stride": max(1, int(image_stride)),
        "psnr_db": float(10.0 * math.log10(4.0 / mse)) if mse > 0 else float("inf"),
        "image_mse": mse,
        "seconds": round(time.time() - t0, 1),
        "definition": "masks {0,1}->{-1,+1} x3 channels, posterior mean, decode, mean over channels of (x+1)/2 > 0.5; "
                      "3D Dice per volume averaged over volumes containing the class (all slices); "
                      f"PSNR on [-1, 1] (peak-to-peak 2) over every {max(1, int(image_stride))}th slice",
    }


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, int(WARMUP_FRACTION * steps))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))


def _fresh_temp_dir(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` folder to ``out_dir`` (replacing it).

    Modes as if written directly (mkdtemp and the weight writer use 0700 / 0600)."""
    mask = _current_umask()
    for f in tmp.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~mask)
    os.chmod(tmp, 0o777 & ~mask)
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{time.time_ns()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _normalise_kwargs(image_size, crop, steps, batch_size, lr, seed, masks, minutes) -> dict:
    image_size, crop, steps, batch_size = int(image_size), int(crop), int(steps), int(batch_size)
    if image_size % DOWNSAMPLING_FACTOR or image_size < DOWNSAMPLING_FACTOR:
        raise ValueError(f"image_size must be a positive multiple of {DOWNSAMPLING_FACTOR}, not {image_size}")
    crop = min(crop, image_size)
    if crop % DOWNSAMPLING_FACTOR or crop < DOWNSAMPLING_FACTOR:
        raise ValueError(f"crop must be a positive multiple of {DOWNSAMPLING_FACTOR}, not {crop}")
    if steps < 1 or batch_size < 2:
        raise ValueError("steps must be >= 1 and batch_size >= 2")
    return {"image_size": image_size, "crop": crop, "steps": steps, "batch_size": batch_size,
            "lr": float(lr), "seed": int(seed), "masks": str(masks),
            "minutes": None if minutes is None else float(minutes)}


def train_demo_vae(data, out_dir=None, image_size: int = DEFAULT_TRAIN_KWARGS["image_size"],
                   crop: int = DEFAULT_TRAIN_KWARGS["crop"], minutes: float | None = None,
                   steps: int = DEFAULT_TRAIN_KWARGS["steps"], batch_size: int = DEFAULT_TRAIN_KWARGS["batch_size"],
                   lr: float = DEFAULT_TRAIN_KWARGS["lr"], seed: int = 0, masks: str = "auto",
                   progress: bool = True, evaluate: bool = True, return_model: bool = False,
                   _extra_report: dict | None = None) -> dict:
    """Train the demo VAE on ``data``; return the report (a JSON-able dict).

    ``data``: a dataset folder or an opened dataset, or a list of them (e.g. the CT and the MR
    phantom: SD's VAE is domain-generic, so a VAE for a cross-domain run should see both
    modalities; every case of every dataset is equally likely). With ``out_dir`` the model is
    saved there (``save_pretrained``, safetensors) together with ``vae_report.json``,
    atomically (any previous content of ``out_dir`` is replaced). ``return_model=True`` adds
    the trained model under the report key ``"_model"`` (not JSON-able). ``evaluate=False``
    skips the reconstruction evaluation. The report's ``"eval"`` is the evaluation on the
    first dataset; with several datasets ``"eval_by_dataset"`` has every one.
    """
    kw = _normalise_kwargs(image_size, crop, steps, batch_size, lr, seed, masks, minutes)
    dss = _open_many(data)
    names = _names(dss)
    sources = [_mask_source(ds, kw["masks"]) for ds in dss]
    for ds, source in zip(dss, sources):
        if source == "labels":
            warnings.warn(f"{ds.image_dir}: no supervoxels: training the demo VAE on the label masks "
                          "(test-class labels are seen; fine for tests, not for an honest demo)", stacklevel=2)
    t_load = time.time()
    train = _TrainData(dss, kw["image_size"], sources)
    t_load = time.time() - t_load

    vae = build_demo_vae(kw["seed"])
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=kw["lr"], weight_decay=0.0)
    rng = np.random.default_rng(np.random.SeedSequence([kw["seed"], 20260403]))
    gen = torch.Generator().manual_seed(kw["seed"] + 1)
    deadline = None if kw["minutes"] is None else time.time() + 60.0 * kw["minutes"]
    curve, running = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=kw["steps"], desc="train demo VAE", unit="step")
    t0 = time.time()
    done = 0
    try:
        for step in range(kw["steps"]):
            if deadline is not None and time.time() > deadline:
                break
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, kw["steps"], kw["lr"])
            x = train.batch(rng, kw["batch_size"], kw["crop"])
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample
            loss_rec = (rec - x).abs().mean() + torch.square(rec - x).mean()
            loss = loss_rec + KL_WEIGHT * post.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done = step + 1
            lv = float(loss_rec.detach())
            running.append(lv)
            if done % 50 == 0 or done == kw["steps"]:
                curve.append([done, round(float(np.mean(running)), 5)])
                running = []
            if bar is not None:
                bar.update(1)
                if done % 10 == 0:
                    bar.set_postfix(loss=f"{lv:.4f}")
    finally:
        if bar is not None:
            bar.close()
    seconds = time.time() - t0
    vae.eval()
    latent_std = latent_standard_deviation(vae, train.images)
    vae.register_to_config(scaling_factor=1.0 / latent_std)

    report = {
        "version": VERSION,
        "config": copy.deepcopy(DEMO_VAE_CONFIG),
        "parameters": int(sum(p.numel() for p in vae.parameters())),
        "downsampling_factor": DOWNSAMPLING_FACTOR,
        "latent_grid": kw["image_size"] // DOWNSAMPLING_FACTOR,
        "scaling_factor": 1.0 / latent_std,
        "latent_std": latent_std,
        "train": {**kw, "mask_source": sources[0] if len(set(sources)) == 1 else "mixed",
                  "mask_sources": dict(zip(names, sources)), "steps_done": done, "seconds": round(seconds, 1),
                  "seconds_per_step": round(seconds / max(done, 1), 4), "data_load_seconds": round(t_load, 1),
                  "loss": "L1 + MSE (posterior sample) + 1e-6 KL", "loss_curve": curve,
                  "threads": torch.get_num_threads()},
        "data": data_fingerprint(dss),
        "versions": _versions(),
    }
    if _extra_report:
        report.update(_extra_report)
    if evaluate:
        evals = {name: evaluate_vae(vae, ds, kw["image_size"], progress=progress) for name, ds in zip(names, dss)}
        report["eval"] = evals[names[0]]
        if len(dss) > 1:
            report["eval_by_dataset"] = evals
    if out_dir is not None:
        out_dir = Path(out_dir)
        tmp = _fresh_temp_dir(out_dir)
        try:
            vae.save_pretrained(tmp, safe_serialization=True)
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
            _atomic_replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        report["path"] = str(out_dir)
    if return_model:
        report["_model"] = vae
    return report


def _versions() -> dict:
    import diffusers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version()}


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def data_fingerprint(data) -> dict:
    """What identifies the training data: dataset.json's content and the data files' names and sizes.

    For a list of datasets: ``{"datasets": [one fingerprint each], "sha256": of them all}``.
    """
    if isinstance(data, (list, tuple)):
        if len(data) == 1:
            return data_fingerprint(data[0])
        fps = [data_fingerprint(d) for d in data]
        h = hashlib.sha256(json.dumps([f["sha256"] for f in fps]).encode()).hexdigest()
        return {"datasets": fps, "sha256": h}
    ds = _open(data)
    root = Path(ds.image_dir)
    meta = root / "dataset.json"
    files = []
    for cid in ds.case_ids:
        for p in (ds.image_path(cid), ds.label_path(cid)):
            files.append([p.name, p.stat().st_size])
        if ds.supervoxel_dir is not None:
            p = Path(ds.supervoxel_dir) / f"superpix-MIDDLE_{cid}.nii.gz"
            if p.is_file():
                files.append([f"{ds.supervoxel_dir.name}/{p.name}", p.stat().st_size])
    h = hashlib.sha256()
    h.update(meta.read_bytes() if meta.is_file() else f"benchmark:{ds.name}".encode())
    h.update(json.dumps(files, sort_keys=True).encode())
    return {"name": ds.name, "root": str(root), "n_cases": len(ds.case_ids), "cases": list(ds.case_ids),
            "test_classes": list(ds.test_classes), "files": len(files), "sha256": h.hexdigest()}


def demo_vae_key(data, **train_kwargs) -> str:
    """The cache key of ``ensure_demo_vae(data, ..., **train_kwargs)`` (16 hex digits)."""
    train_kwargs.pop("progress", None)
    unknown = set(train_kwargs) - set(DEFAULT_TRAIN_KWARGS)
    if unknown:
        raise TypeError(f"unknown training arguments: {sorted(unknown)}")
    kw = _normalise_kwargs(**{**DEFAULT_TRAIN_KWARGS, **train_kwargs})
    blob = json.dumps({"data": data_fingerprint(data)["sha256"], "train": kw, "config": DEMO_VAE_CONFIG,
                       "version": VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_demo_vae_folder(folder, key: str | None = None) -> bool:
    """A complete saved demo VAE (config, weights, report), with the given cache key if any."""
    folder = Path(folder)
    rep = folder / REPORT_NAME
    if not ((folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
            and rep.is_file()):
        return False
    if key is None:
        return True
    try:
        return json.loads(rep.read_text()).get("cache_key") == key
    except (OSError, json.JSONDecodeError):
        return False


def ensure_demo_vae(data_dir, cache_dir, progress: bool = True, **train_kwargs) -> Path:
    """The cached demo VAE folder for this data and these kwargs; trains it when missing.

    ``data_dir``: as ``data`` of :func:`train_demo_vae` (one dataset or a list).
    Returns ``cache_dir/<key>/`` (loadable with ``AutoencoderKL.from_pretrained(path,
    local_files_only=True)``; its ``vae_report.json`` holds the report, ``"reused"`` is not
    stored: compare the folder's mtime or use :func:`demo_vae_key` / :func:`is_demo_vae_folder`
    before calling to know whether it will train).
    """
    dss = _open_many(data_dir)
    key = demo_vae_key(dss, **train_kwargs)
    folder = Path(cache_dir) / key
    if is_demo_vae_folder(folder, key):
        return folder
    train_demo_vae(dss, folder, progress=progress, **train_kwargs, _extra_report={"cache_key": key})
    return folder
