"""An ``AutoencoderKL`` trained on a dataset's images and masks (``method: autoencoder``).

What for: the CPU demo has no pretrained Stable Diffusion, and a randomly initialised frozen VAE
cannot reconstruct masks (docs/measurements/demo_architecture_probe.md), so SD-FSMIS on top of it
learns nothing. The demo therefore first trains a small VAE on the phantom images AND masks
through ``train.py --config configs/demo_vae.yaml``, and SD-FSMIS then freezes it, as it freezes
SD's VAE (``model.vae_path``: the run's exported ``vae/`` folder). Its mask reconstruction Dice
is the ceiling ("oracle") of the demo segmenter. The architecture lives in the config
(``model.architecture``: ``AutoencoderKL`` arguments).

Inputs exactly as SD-FSMIS feeds the VAE: an image is one slice of the volume min-max
normalised per volume to [-1, 1], resized in-plane to ``data.image_size`` and repeated to 3
channels; a mask is {0,1} -> {-1,+1}, repeated to 3 channels. A decoded mask is the mean over
the 3 channels of (x + 1) / 2.

Training batches: random ``data.crop`` x ``data.crop`` crops of slices resized to
``data.image_size``, half image crops, half mask crops (mask crops lie around a random
foreground pixel 85 % of the time, anywhere otherwise; a mask is one supervoxel, or 25 % of the
time the union with a touching one), each randomly flipped / rotated by 90 degrees. Loss: L1 +
MSE of the reconstruction from a posterior **sample** + ``model.kl_weight`` KL. The masks are the
dataset's unsupervised supervoxels (``data.masks: auto`` uses them when the dataset has them,
else the label masks of every labelled class, with a warning: that fallback sees test-class
labels and is only meant for tiny test datasets). With several datasets (``data.root`` a list)
every case of every dataset is equally likely.

Random streams: crops come from one numpy stream seeded by (seed, 20260403) and posterior noise
from one torch generator seeded by seed + 1, drawn in step order; both are saved in every
checkpoint (:meth:`AutoencoderMethod.rng_state`), so a resumed run continues to the bit.

Export (:meth:`AutoencoderMethod.finalize`): ``scaling_factor`` is set to 1 / the standard
deviation of the posterior-mean latents of the training images (every 2nd slice of every case,
full frames), as SD's 0.18215 was chosen for its VAE, so that SD-FSMIS sees and predicts
unit-variance latents; then ``RUN/vae/`` is written atomically: ``config.json`` (with the
factor), ``diffusion_pytorch_model.safetensors`` and ``vae_report.json``.

Evaluation (in the report, per test class; labels are read only here): the mask reconstruction
3D Dice per volume (posterior mean -> decode -> probability > 0.5, at ``image_size``, every slice
of the volume) averaged over the volumes containing the class, the per-slice Dice (slices
containing the class) and the pooled Dice; and the image reconstruction PSNR (dB, on the
[-1, 1] scale, peak-to-peak 2) over every 4th slice of every case.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_directory
from ..engine.method import Method, register_method
from ..evaluation.metrics import Counts, confusion

VERSION = 3  # of the training procedure; part of the demo cache key
REPORT_NAME = "vae_report.json"
EXPORT_DIR = "vae"
FG_CROP_PROB = 0.85
UNION_PROB = 0.25
LATENT_STD_STRIDE = 2


@dataclass
class AutoencoderDataConfig:
    root: str | list | None = None  # a dataset folder, or a list of them (pooled)
    image_size: int = 128  # slices are resized in-plane to this
    crop: int = 64  # training crop size
    masks: str = "auto"  # supervoxels | labels | auto (supervoxels when the dataset has them)


@dataclass
class AutoencoderConfig:
    architecture: dict | None = None  # diffusers AutoencoderKL arguments
    kl_weight: float = 1.0e-6
    eval_image_stride: int = 4  # PSNR over every n-th slice


def downsampling_factor(architecture: dict) -> int:
    return 2 ** (len(architecture["block_out_channels"]) - 1)



# -- data -----------------------------------------------------------------------------------------
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


# -- evaluation -----------------------------------------------------------------------------------
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
    """Mask reconstruction Dice per class and image PSNR (module docstring, "Evaluation").

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
            per_case[name][str(cid)] = Counts(inter, p_sum - inter, g_sum - inter).dice
            for k in range(len(zs)):
                per_slice[name].append(confusion(pred[k], g[k]).dice)
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
        "dice_pooled": {c: (Counts(v[0], v[1] - v[0], v[2] - v[0]).dice if v[1] + v[2] else float("nan"))
                        for c, v in pooled.items()},
        "empty_slice_false_positives": empty_fp,
        "image_stride": max(1, int(image_stride)),
        "psnr_db": float(10.0 * math.log10(4.0 / mse)) if mse > 0 else float("inf"),
        "image_mse": mse,
        "seconds": round(time.time() - t0, 1),
        "definition": "masks {0,1}->{-1,+1} x3 channels, posterior mean, decode, mean over channels of (x+1)/2 > 0.5; "
                      "3D Dice per volume averaged over volumes containing the class (all slices); "
                      f"PSNR on [-1, 1] (peak-to-peak 2) over every {max(1, int(image_stride))}th slice",
    }


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




# -- the method ---------------------------------------------------------------------------------
@register_method
class AutoencoderMethod(Method):
    name = "autoencoder"
    model_config = AutoencoderConfig
    data_config = AutoencoderDataConfig

    def setup_data(self) -> None:
        d = self.cfg.data
        if d.root is None:
            raise ValueError("data.root is not set (give data.root=DIR on the command line)")
        if d.masks not in ("auto", "supervoxels", "labels"):
            raise ValueError(f"data.masks must be auto, supervoxels or labels, not {d.masks!r}")
        arch = self._architecture()
        f = downsampling_factor(arch)
        if d.image_size % f or d.crop % f or min(d.crop, d.image_size) < f:
            raise ValueError(f"data.image_size ({d.image_size}) and data.crop ({d.crop}) must be positive multiples "
                             f"of the VAE's downsampling factor {f}")
        if self.cfg.train.batch_size < 2:
            raise ValueError("train.batch_size must be >= 2 (half image crops, half mask crops)")
        self.datasets = _open_many(d.root)
        self.sources = [_mask_source(ds, d.masks) for ds in self.datasets]
        for ds, source in zip(self.datasets, self.sources):
            if source == "labels":
                warnings.warn(f"{ds.image_dir}: no supervoxels: training the autoencoder on the label masks "
                              "(test-class labels are seen; fine for tests, not for an honest demo)", stacklevel=2)
        self.train_data = _TrainData(self.datasets, d.image_size, self.sources)
        seed = self.cfg.train.seed
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 20260403] + ([self.rank] if self.rank else [])))
        self.gen = torch.Generator().manual_seed(seed + 1 + 1000003 * self.rank)

    def describe_data(self):
        return [(f"dataset {n}", f"{ds.name} ({len(ds.case_ids)} cases) at {ds.image_dir}, masks from {src}")
                for n, ds, src in zip(_names(self.datasets), self.datasets, self.sources)]

    def _architecture(self) -> dict:
        arch = self.cfg.model.architecture
        if not isinstance(arch, dict):
            from ..config import ConfigError

            raise ConfigError("model.architecture: expected a mapping of diffusers AutoencoderKL arguments")
        return {k: v for k, v in arch.items() if not str(k).startswith("_")}

    def build(self) -> None:
        from diffusers import AutoencoderKL

        from ..models.weights import ComponentLoad, LoadReport, RANDOM_INIT

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.cfg.train.seed))
            try:
                vae = AutoencoderKL(**self._architecture())
            except TypeError as exc:
                from ..config import ConfigError

                raise ConfigError(f"model.architecture: not a valid AutoencoderKL configuration: {exc}") from None
        self.module = vae.float()
        n = sum(p.numel() for p in vae.parameters())
        row = ComponentLoad("vae", source=RANDOM_INIT, pretrained=False, expected=len(vae.state_dict()), params=n)
        row.notes.append(f"trained here; downsampling factor {downsampling_factor(self._architecture())}")
        self.load_report = LoadReport(vae=row)

    def batch(self, step: int, micro: int):
        d = self.cfg.data
        return self.train_data.batch(self.rng, self.cfg.train.batch_size, min(d.crop, d.image_size)).to(self.device)

    def loss(self, x, generator):
        post = self.module.encode(x).latent_dist
        rec = self.module.decode(post.sample(generator=self.gen)).sample
        loss_rec = (rec - x).abs().mean() + torch.square(rec - x).mean()
        return loss_rec + self.cfg.model.kl_weight * post.kl().mean()

    def rng_state(self) -> dict:
        import base64

        return {"numpy": self.rng.bit_generator.state,
                "torch": base64.b64encode(self.gen.get_state().numpy().tobytes()).decode("ascii")}

    def load_rng_state(self, state: dict) -> None:
        import base64

        if not state:
            return
        self.rng.bit_generator.state = state["numpy"]
        raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
        self.gen.set_state(torch.from_numpy(raw))

    def finalize(self, run_dir: Path, summary: dict) -> list[Path]:
        vae = self.module.eval()
        d = self.cfg.data
        latent_std = latent_standard_deviation(vae, self.train_data.images)
        vae.register_to_config(scaling_factor=1.0 / latent_std)
        names = _names(self.datasets)
        report = {
            "version": VERSION, "config": dict(self._architecture()),
            "parameters": int(sum(p.numel() for p in vae.parameters())),
            "downsampling_factor": downsampling_factor(self._architecture()),
            "latent_grid": d.image_size // downsampling_factor(self._architecture()),
            "scaling_factor": 1.0 / latent_std, "latent_std": latent_std,
            "train": {"image_size": d.image_size, "crop": d.crop, "steps": self.cfg.train.max_steps,
                      "batch_size": self.cfg.train.batch_size, "lr": self.cfg.train.lr, "seed": self.cfg.train.seed,
                      "mask_source": self.sources[0] if len(set(self.sources)) == 1 else "mixed",
                      "mask_sources": dict(zip(names, self.sources)), "steps_done": summary["steps"],
                      "seconds": summary["seconds"],
                      "seconds_per_step": round(summary["seconds"] / max(summary["steps"], 1), 4),
                      "loss": "L1 + MSE (posterior sample) + kl_weight KL", "threads": torch.get_num_threads()},
            "data": data_fingerprint(self.datasets),
            "versions": _versions(),
        }
        if self.cfg.name:
            report["config_name"] = self.cfg.name
        evals = {name: evaluate_vae(vae, ds, d.image_size, image_stride=self.cfg.model.eval_image_stride)
                 for name, ds in zip(names, self.datasets)}
        report["eval"] = evals[names[0]]
        if len(self.datasets) > 1:
            report["eval_by_dataset"] = evals
        summary["vae_report"] = {"scaling_factor": report["scaling_factor"], "mean_dice": report["eval"]["mean_dice"]}
        out = Path(run_dir) / EXPORT_DIR
        with atomic_directory(out) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
            (Path(tmp) / REPORT_NAME).write_text(json.dumps(report, indent=2, allow_nan=True) + "\n",
                                                 encoding="utf-8")
        return [out]


def _versions() -> dict:
    from ..engine.runs import environment

    env = environment()
    del env["threads"]  # recorded under "train" (the report's format)
    return env


# -- a cache of trained autoencoders (the demo) ---------------------------------------------------
# train.* keys added after the cache format: left out of the key at these (their default) values, so
# that the keys of caches written before they existed still hold; any other value changes the key
LATER_TRAIN_DEFAULTS = {"optimizer": "adamw", "momentum": 0.9, "lr_step_every": 1000, "lr_gamma": 0.95,
                        "tf32": False}


def cache_key(cfg) -> str:
    """16 hex digits identifying a trained autoencoder: the data (dataset.json and file names and
    sizes), every config key but ``data.root``, ``name``, the ``genaug`` section (synthetic
    episodes are refused for an autoencoder, so it changes no weights) and the train keys of
    :data:`LATER_TRAIN_DEFAULTS` at their defaults (left out, the keys of caches written before they
    existed still hold), and :data:`VERSION`."""
    d = cfg.to_dict()
    d.pop("name", None)
    d.pop("genaug", None)
    for k in ("preset", "preset_applied"):  # top-level keys added after the cache format, when unset
        if d.get(k) is None:
            d.pop(k, None)
    d["data"].pop("root", None)
    for k, v in LATER_TRAIN_DEFAULTS.items():
        if d["train"].get(k) == v:
            d["train"].pop(k)
    blob = json.dumps({"data": data_fingerprint(_open_many(cfg.data.root))["sha256"], "config": d,
                       "version": VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_exported(folder: Path) -> bool:
    """A complete exported autoencoder (config, weights, report)."""
    folder = Path(folder)
    return all((folder / n).is_file() for n in ("config.json", "diffusion_pytorch_model.safetensors", REPORT_NAME))


def ensure_autoencoder(cfg, cache_dir: str | Path, progress: bool = True) -> tuple[Path, bool]:
    """``cache_dir/<key>/vae``, trained through the engine when missing (an interrupted training
    resumes). Returns (folder, reused)."""
    from ..engine.trainer import Trainer

    run = Path(cache_dir) / cache_key(cfg)
    if is_exported(run / EXPORT_DIR):
        return run / EXPORT_DIR, True
    tr = Trainer(cfg, run, progress=progress).setup()
    tr.resume()
    tr.fit()
    return run / EXPORT_DIR, False
