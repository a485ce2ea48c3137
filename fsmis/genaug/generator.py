"""A mask-conditioned latent diffusion generator (``method: generator``).

What it is (docs/generative-augmentation.md, decision 1): a diffusers ``UNet2DConditionModel``
in the latent space of the frozen VAE that SD-FSMIS uses (SD's VAE, or the demo VAE). Its input
is [noisy image latent | conditioning-mask latent] (8 channels for a 4-channel VAE); the mask
latent is the VAE encoding of the binary mask exactly as SD-FSMIS encodes masks ({0,1} ->
{-1,+1}, repeated to 3 channels, × the latent scaling factor). Two cross-attention tokens carry
the conditioning: a learned **modality** token (``model.modalities``; the dataset's
``dataset.json`` modality, the published Card-MRI folder reads as ``CMR``) and a learned
**class** token (``model.classes``; ``supervoxel`` for label-free masks, else the class name).
Token row 0 of each table is the "dropped" token.

Training (noise prediction, ``diffusers.DDPMScheduler``): one item is one slice of a training
case and one binary region of it, a supervoxel (``data.labels: supervoxel``, label-free, the
default) or a labelled test class (``data.labels: label``) of at least ``data.min_fg_pixels``
pixels. The mask is dropped (its latent set to zero) with probability ``model.p_drop_mask``,
and each token with ``model.p_drop_modality`` / ``model.p_drop_class``, independently: the
model learns the unconditional and partially conditioned scores that classifier-free guidance
needs. ``data.fold`` (default 0) restricts training to that fold's training cases, validation
case(s) excluded, with the same fold split as SD-FSMIS (fsmis.methods.episodic.fold_split), so
that a generator used as a prior or for synthesis never sees a test case; ``data.fold: null``
uses every case. Several roots (``data.root`` a list) are pooled, every case equally likely.

Images: each volume min-max normalised to [-1, 1], slices resized in-plane to
``data.image_size`` (bilinear; masks nearest), as SD-FSMIS sees them. The VAE posteriors of
every image and every (slice, region) mask are computed once each, on first use, one item at a
time (a cached value never depends on the batch that asked for it), and latents are drawn from
them with the step's generator, as SD-FSMIS's cached path does.

Randomness is counter-based: the items of micro-batch m of step s come from a numpy stream
seeded by (seed, s, m, rank); noise, timesteps and posterior samples from the engine's
generator for that micro-batch. A resumed run continues to the bit.

Sampling (:func:`ddim_sample`): ``diffusers.DDIMScheduler`` with ``model.sample_steps`` steps
(eta 0; the last step returns the clean estimate, ``set_alpha_to_one``) and guidance scale
``model.guidance``: eps = eps(∅) + g · (eps(c) − eps(∅)), where ∅
drops mask and tokens. g = 1 is plain conditional sampling (one UNet pass per step).

Export (:meth:`GeneratorMethod.finalize`): ``RUN/unet/`` holds the UNet as a diffusers folder
(``config.json``, ``diffusion_pytorch_model.safetensors``) and ``generator.json`` (token
vocabularies, image size, latent scaling factor and the identity of the VAE whose latent space
it was trained in). SD-FSMIS's ``model.unet_init=RUN`` loads it strictly
(fsmis.models.weights.load_unet_init).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..engine.method import Method, register_method

EXPORT_DIR = "unet"
META_NAME = "generator.json"
DEFAULT_CLASSES = ["supervoxel", "liver", "spleen", "left_kidney", "right_kidney", "LV-MYO", "LV-BP", "RV"]


@dataclass
class GeneratorDataConfig:
    root: str | list | None = None  # a dataset folder, or a list of them (pooled)
    fold: int | None = 0  # train on this fold's training cases (of each root); null: every case
    protocol: str = "canonical"  # fold protocol (canonical | legacy), as SD-FSMIS's
    supp_idx: int = 2
    n_val: int = 1  # the fold's validation cases, left out as SD-FSMIS leaves them out
    labels: str = "supervoxel"  # conditioning masks: supervoxel (label-free) | label (test-class labels)
    min_fg_pixels: int = 200  # smallest region (pixels of the stored slice) used as a conditioning mask
    image_size: int = 128
    modality: str | list | None = None  # modality token per root; null: each dataset's modality


@dataclass
class GeneratorConfig:
    sd_path: str | None = None  # a local SD folder: its VAE (unless vae_path) and its UNet (conv_in widened)
    sd_config: str | None = None
    vae_path: str | None = None  # the frozen VAE (e.g. the demo VAE's exported folder)
    vae: dict | str | None = None  # AutoencoderKL arguments for a random VAE (tests)
    unet: dict | str | None = None  # UNet2DConditionModel arguments, as SD-FSMIS's model.unet (in_channels = latent)
    scaling_factor: float | None = None  # None: the VAE config's
    modalities: list = field(default_factory=lambda: ["CT", "MR", "CMR"])
    classes: list = field(default_factory=lambda: list(DEFAULT_CLASSES))
    p_drop_mask: float = 0.1
    p_drop_modality: float = 0.1
    p_drop_class: float = 0.1
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085  # SD's scaled-linear schedule
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    sample_steps: int = 50  # DDIM steps
    guidance: float = 2.0  # classifier-free guidance scale (1: none)
    preview_steps: int = 10  # DDIM steps of the TensorBoard sample grid


# -- the model ------------------------------------------------------------------------------------
class MaskConditionedGenerator(nn.Module):
    """UNet over [noisy latent | mask latent] with modality and class tokens; frozen VAE."""

    def __init__(self, unet, vae, n_modalities: int, n_classes: int, scaling_factor: float):
        super().__init__()
        dim = unet.config.cross_attention_dim
        if not isinstance(dim, int):
            raise ValueError(f"the UNet's cross_attention_dim must be one integer, got {dim!r}")
        self.unet = unet
        self.vae = vae.requires_grad_(False).eval()
        self.modality_embedding = nn.Embedding(n_modalities + 1, dim)  # row 0: dropped
        self.class_embedding = nn.Embedding(n_classes + 1, dim)
        self.scaling_factor = float(scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        return self

    def trainable_state_dict(self) -> dict:
        sd = {}
        for prefix, mod in (("unet.", self.unet), ("modality_embedding.", self.modality_embedding),
                            ("class_embedding.", self.class_embedding)):
            sd.update({prefix + k: v for k, v in mod.state_dict().items()})
        return sd

    def tokens(self, modality: torch.Tensor, klass: torch.Tensor) -> torch.Tensor:
        """Token indices [B] each (0: dropped) -> encoder hidden states [B, 2, D]."""
        return torch.stack([self.modality_embedding(modality), self.class_embedding(klass)], dim=1)

    def eps(self, noisy: torch.Tensor, t: torch.Tensor, mask_latent: torch.Tensor, modality: torch.Tensor,
            klass: torch.Tensor) -> torch.Tensor:
        x = torch.cat([noisy, mask_latent.to(noisy.dtype)], dim=1)
        return self.unet(x, t, encoder_hidden_states=self.tokens(modality, klass).to(noisy.dtype)).sample

    # VAE, as SD-FSMIS uses it
    def encode_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1, H, W] in [-1, 1] -> posterior parameters [N, 2·C, h, w]."""
        with torch.no_grad():
            return self.vae.encode(x.to(self.vae.dtype).expand(-1, 3, -1, -1)).latent_dist.parameters

    def latents(self, parameters: torch.Tensor, sample: bool, generator=None) -> torch.Tensor:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(parameters)
        return (dist.sample(generator=generator) if sample else dist.mean) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Image latents -> images [N, H, W] in [-1, 1] (mean of the 3 decoded channels)."""
        with torch.no_grad():
            x = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return x.float().mean(1).clamp(-1, 1)


def widen_conv_in(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A pretrained C-channel conv_in -> ``in_channels`` inputs: the first C keep their weights, the
    added (mask) channels start at zero, so the widened UNet computes what the pretrained one did."""
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    dtype=conv.weight.dtype, device=conv.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :conv.in_channels].copy_(conv.weight)
        new.bias.copy_(conv.bias)
    return new


def vae_identity(vae) -> str:
    """sha256 (16 hex digits) of a VAE's configuration and tensors: which latent space it spans."""
    h = hashlib.sha256()
    config = {k: v for k, v in dict(vae.config).items() if not str(k).startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_generator(cfg: GeneratorConfig, dtype=None, verify: str = "sample"):
    """The model section -> (MaskConditionedGenerator, LoadReport)."""
    from diffusers import UNet2DConditionModel

    from ..config import ConfigError
    from ..models.sd_fsmis import resolve_scaling_factor
    from ..models.weights import LoadReport, _config_dict, _random_component, load_unet, load_vae

    report = LoadReport()
    vae, report.vae = load_vae(cfg, dtype, verify)
    lat = int(vae.config.latent_channels)
    if cfg.sd_path:
        unet, report.unet = load_unet(cfg, dtype, verify)
        if unet.config.in_channels != lat:
            raise ConfigError(f"model.sd_path: the UNet takes {unet.config.in_channels} channels, the VAE gives {lat}")
        unet.conv_in = widen_conv_in(unet.conv_in, 2 * lat)
        unet.register_to_config(in_channels=2 * lat)
        report.unet.notes.append(f"conv_in widened {lat} -> {2 * lat} channels (mask channels start at zero)")
    else:
        if cfg.unet is None:
            raise ConfigError("no UNet source: set model.unet (UNet2DConditionModel arguments or a preset name) "
                              "or model.sd_path")
        arch = _config_dict(cfg.unet, "unet", "model.unet")
        if arch.get("in_channels", 4) != lat or arch.get("out_channels", 4) != lat:
            raise ConfigError(f"model.unet: in_channels and out_channels must equal the VAE's latent channels ({lat}) "
                              "as in SD-FSMIS's model.unet; the generator doubles in_channels for the mask latent")
        unet, report.unet = _random_component(UNet2DConditionModel, "unet", {**arch, "in_channels": 2 * lat},
                                              "model.unet", dtype)
    if vae.config.in_channels != 3:
        raise ConfigError(f"the VAE must take 3-channel images, its in_channels is {vae.config.in_channels}")
    sf = resolve_scaling_factor(cfg.scaling_factor, vae.config, report)
    model = MaskConditionedGenerator(unet, vae, len(cfg.modalities), len(cfg.classes), sf)
    report.summary = {"latent_channels": lat, "unet_in_channels": 2 * lat, "scaling_factor": round(sf, 6),
                      "modalities": len(cfg.modalities), "classes": len(cfg.classes),
                      "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return model, report


# -- schedulers and sampling ------------------------------------------------------------------------
def _scheduler_kwargs(cfg: GeneratorConfig) -> dict:
    return {"num_train_timesteps": cfg.num_train_timesteps, "beta_start": cfg.beta_start,
            "beta_end": cfg.beta_end, "beta_schedule": cfg.beta_schedule, "prediction_type": "epsilon"}


def ddpm_scheduler(cfg: GeneratorConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_scheduler_kwargs(cfg), clip_sample=False)


def ddim_scheduler(cfg: GeneratorConfig, steps: int):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(**_scheduler_kwargs(cfg), clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    s.set_timesteps(int(steps))
    return s


@torch.no_grad()
def ddim_loop(eps_fn, x: torch.Tensor, scheduler) -> torch.Tensor:
    """Run a set-up DDIM scheduler from ``x`` (the latent at its first timestep), eta 0:
    ``eps_fn(x_t, t) -> predicted noise``."""
    for t in scheduler.timesteps:
        x = scheduler.step(eps_fn(x, t), t, x, eta=0.0).prev_sample
    return x


@torch.no_grad()
def ddim_sample(model: MaskConditionedGenerator, cfg: GeneratorConfig, mask_latent: torch.Tensor,
                modality: torch.Tensor, klass: torch.Tensor, generator: torch.Generator,
                steps: int | None = None, guidance: float | None = None) -> torch.Tensor:
    """Image latents [N, C, h, w] for the conditions (mask latents [N, C, h, w]; token indices [N],
    0 = dropped), from noise drawn with ``generator`` (same generator state -> same latents)."""
    steps = int(steps or cfg.sample_steps)
    g = float(cfg.guidance if guidance is None else guidance)
    sched = ddim_scheduler(cfg, steps)
    dev = mask_latent.device
    x = torch.randn(mask_latent.shape, generator=generator, dtype=torch.float32).to(dev) * sched.init_noise_sigma
    zero_tok = torch.zeros_like(modality)
    n = x.shape[0]

    def eps_fn(xt, t):
        tt = torch.full((xt.shape[0],), int(t), device=dev, dtype=torch.long)
        if g == 1.0:
            return model.eps(xt, tt, mask_latent, modality, klass)
        both = model.eps(torch.cat([xt, xt]), torch.cat([tt, tt]), torch.cat([mask_latent, torch.zeros_like(mask_latent)]),
                         torch.cat([modality, zero_tok]), torch.cat([klass, zero_tok]))
        cond, uncond = both[:n], both[n:]
        return uncond + g * (cond - uncond)

    was = model.training
    model.eval()
    try:
        return ddim_loop(eps_fn, x, sched)
    finally:
        model.train(was)


# -- data ---------------------------------------------------------------------------------------------
def modality_token(ds, override: str | None = None) -> str:
    """The modality token of a dataset: ``override``, else its modality; the published Card-MRI
    folder (benchmark ``CMR``, stored modality MR) reads as ``CMR``."""
    if override:
        return str(override)
    if getattr(ds, "name", None) == "CMR":
        return "CMR"
    return str(ds.modality)


@dataclass
class _Item:
    dataset: int
    case: str
    z: int
    region: int  # supervoxel id or label id
    klass: int  # class token index (1-based)


class GeneratorData:
    """Slices and conditioning regions of the training cases of every root."""

    def __init__(self, cfg, rank: int = 0):
        from ..config import ConfigError
        from ..data.datasets import open_dataset
        from ..data.normalize import normalize_volume

        d, m = cfg.data, cfg.model
        if d.root is None:
            raise ValueError("data.root is not set (give data.root=DIR on the command line)")
        if d.labels not in ("supervoxel", "label"):
            raise ConfigError(f"data.labels must be supervoxel or label, not {d.labels!r}")
        roots = list(d.root) if isinstance(d.root, (list, tuple)) else [d.root]
        mods = d.modality if isinstance(d.modality, (list, tuple)) else [d.modality] * len(roots)
        if len(mods) != len(roots):
            raise ConfigError(f"data.modality: {len(mods)} tokens for {len(roots)} data.root folders")
        self.datasets, self.cases, self.modality_idx, self.images, self.regions = [], [], [], {}, {}
        self.items: dict[tuple, list[_Item]] = {}
        for di, (root, mod) in enumerate(zip(roots, mods)):
            ds = open_dataset(root)
            tok = modality_token(ds, mod)
            if tok not in m.modalities:
                raise ConfigError(f"{ds.image_dir}: modality {tok!r} is not in model.modalities {list(m.modalities)} "
                                  "(add it, or set data.modality)")
            if d.labels == "supervoxel" and ds.supervoxel_dir is None:
                raise ValueError(f"{ds.image_dir}: no supervoxels for data.labels=supervoxel "
                                 "(make them with tools/make_supervoxels.py, or use data.labels=label)")
            if d.fold is None:
                cases = list(ds.case_ids)
            else:
                from ..methods.episodic import fold_split

                _, cases, _ = fold_split(_FoldView(d), ds)
                cases = list(cases)
            if d.labels == "label":
                missing = [c for c in ds.test_classes if c not in m.classes]
                if missing:
                    raise ConfigError(f"{ds.image_dir}: class(es) {missing} are not in model.classes {list(m.classes)}")
                class_tokens = {int(ds.class_id(c)): m.classes.index(c) + 1 for c in ds.test_classes}
            else:
                if "supervoxel" not in m.classes:
                    raise ConfigError("model.classes must contain 'supervoxel' for data.labels=supervoxel")
            self.datasets.append(ds)
            self.modality_idx.append(m.modalities.index(tok) + 1)
            for cid in cases:
                case = ds.load_case(cid, supervoxels=(d.labels == "supervoxel"))
                img = normalize_volume(case.image, "minmax")
                regions = np.asarray(case.supervoxels if d.labels == "supervoxel" else case.label)
                items = []
                for z in range(regions.shape[0]):
                    ids, counts = np.unique(regions[z], return_counts=True)
                    for rid, cnt in zip(ids.tolist(), counts.tolist()):
                        if rid <= 0 or cnt < d.min_fg_pixels:
                            continue
                        if d.labels == "label":
                            if rid not in class_tokens:
                                continue
                            k = class_tokens[rid]
                        else:
                            k = m.classes.index("supervoxel") + 1
                        items.append(_Item(di, str(cid), z, int(rid), k))
                if items:
                    self.images[(di, str(cid))] = img
                    self.regions[(di, str(cid))] = regions
                    self.items[(di, str(cid))] = items
                    self.cases.append((di, str(cid)))
        if not self.cases:
            raise ValueError(f"{', '.join(str(r) for r in roots)}: no slice has a conditioning region of "
                             f">= data.min_fg_pixels={d.min_fg_pixels} pixels in the training cases")
        self.size = d.image_size

    def sample(self, rng) -> _Item:
        key = self.cases[int(rng.integers(len(self.cases)))]
        items = self.items[key]
        return items[int(rng.integers(len(items)))]

    def image_slice(self, it: _Item) -> torch.Tensor:
        from ..data.batch import slices_to_model

        return slices_to_model(self.images[(it.dataset, it.case)][it.z][None], self.size, "image")

    def mask_slice(self, it: _Item) -> torch.Tensor:
        from ..data.batch import slices_to_model

        m = (self.regions[(it.dataset, it.case)][it.z] == it.region).astype(np.float32)
        return slices_to_model(m[None], self.size, "mask")

    def n_items(self) -> int:
        return sum(len(v) for v in self.items.values())


@dataclass
class _FoldView:
    """The fold keys of a generator data section, as fold_split reads them from a config."""

    data: object


class _Batch:
    def __init__(self, items, drop_mask, drop_modality, drop_class):
        self.items, self.drop_mask, self.drop_modality, self.drop_class = items, drop_mask, drop_modality, drop_class


# -- the method -------------------------------------------------------------------------------------
@register_method
class GeneratorMethod(Method):
    name = "generator"
    model_config = GeneratorConfig
    data_config = GeneratorDataConfig

    def setup_data(self) -> None:
        m = self.cfg.model
        for key in ("p_drop_mask", "p_drop_modality", "p_drop_class"):
            v = getattr(m, key)
            if not 0 <= v <= 1:
                from ..config import ConfigError

                raise ConfigError(f"model.{key}={v!r}: must be in [0, 1]")
        self.data = GeneratorData(self.cfg, self.rank)

    def describe_data(self):
        rows = []
        for di, ds in enumerate(self.data.datasets):
            cases = [c for d, c in self.data.cases if d == di]
            rows.append((f"dataset {ds.name}", f"{len(cases)} training cases at {ds.image_dir} "
                                               f"(modality token {self.cfg.model.modalities[self.data.modality_idx[di] - 1]})"))
        rows.append(("conditioning", f"{self.data.n_items()} (slice, {self.cfg.data.labels}) regions"))
        return rows

    def data_identity(self) -> dict:
        return {"datasets": [{"name": ds.name, "image_dir": str(Path(ds.image_dir).resolve())}
                             for ds in self.data.datasets],
                "cases": [[d, c] for d, c in self.data.cases], "fold": self.cfg.data.fold}

    def build(self) -> None:
        self.module, self.load_report = build_generator(self.cfg.model)
        self.noise_scheduler = ddpm_scheduler(self.cfg.model)
        self._img_post: dict = {}
        self._msk_post: dict = {}

    def param_groups(self):
        return [{"params": [p for p in self.module.parameters() if p.requires_grad], "lr": self.cfg.train.lr}]

    def batch(self, step: int, micro: int):
        m = self.cfg.model
        rng = np.random.default_rng([self.cfg.train.seed, step, micro, self.rank])
        n = self.cfg.train.batch_size
        items = [self.data.sample(rng) for _ in range(n)]
        drops = rng.random((3, n))
        return _Batch(items, drops[0] < m.p_drop_mask, drops[1] < m.p_drop_modality, drops[2] < m.p_drop_class)

    def _posteriors(self, items, kind: str) -> torch.Tensor:
        store = self._img_post if kind == "image" else self._msk_post
        rows = []
        for it in items:
            key = (it.dataset, it.case, it.z) if kind == "image" else (it.dataset, it.case, it.z, it.region)
            p = store.get(key)
            if p is None:
                x = self.data.image_slice(it) if kind == "image" else self.data.mask_slice(it) * 2 - 1
                p = self.module.encode_posterior(x.to(self.device))[0]
                store[key] = p
            rows.append(p)
        return torch.stack(rows)

    def conditions(self, b: _Batch, generator=None, sample: bool = True):
        """(mask latents with drops applied, modality indices, class indices) of a batch."""
        dev = self.device
        mask_lat = self.module.latents(self._posteriors(b.items, "mask"), sample, generator)
        keep = torch.as_tensor(~b.drop_mask, dtype=mask_lat.dtype, device=dev).view(-1, 1, 1, 1)
        modality = torch.tensor([0 if dm else self.data.modality_idx[it.dataset]
                                 for it, dm in zip(b.items, b.drop_modality)], device=dev)
        klass = torch.tensor([0 if dc else it.klass for it, dc in zip(b.items, b.drop_class)], device=dev)
        return mask_lat * keep, modality, klass

    def loss(self, b: _Batch, generator):
        x0 = self.module.latents(self._posteriors(b.items, "image"), True, generator)
        mask_lat, modality, klass = self.conditions(b, generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(self.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],),
                          generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(x0, noise, t)
        pred = self.module.eps(noisy, t, mask_lat, modality, klass)
        return F.mse_loss(pred.float(), noise.float())

    def trained_state(self) -> dict:
        return self.module.trainable_state_dict()

    def frozen_state(self) -> dict:
        if self.load_report is not None and not self.load_report.vae.pretrained:
            return {"vae." + k: v for k, v in self.module.vae.state_dict().items()}
        return {}

    def sample_items(self, items, generator: torch.Generator, steps: int | None = None,
                     guidance: float | None = None) -> torch.Tensor:
        """Generated images [N, S, S] in [-1, 1] for training items (their mask and tokens)."""
        b = _Batch(items, np.zeros(len(items), bool), np.zeros(len(items), bool), np.zeros(len(items), bool))
        mask_lat, modality, klass = self.conditions(b, sample=False)
        lat = ddim_sample(self.module, self.cfg.model, mask_lat, modality, klass, generator, steps, guidance)
        return self.module.decode(lat)

    @torch.no_grad()
    def generate(self, masks: np.ndarray, modality: str | None, klass: str | None, generator: torch.Generator,
                 steps: int | None = None, guidance: float | None = None, chunk: int = 16) -> np.ndarray:
        """Images for arbitrary binary masks: ``masks`` [N, H, W] ({0, 1}, any size) -> float32
        [N, H, W] in [-1, 1] at the masks' size (generated at ``data.image_size``, resized back
        bilinearly). ``modality`` / ``klass``: token names (None: that token dropped). An all-zero
        mask is an empty mask, not a dropped one. Each mask is VAE-encoded on its own (posterior
        mean); chunks of ``chunk`` masks are sampled in order from the one ``generator``, so the same
        generator state and chunk size give the same images."""
        from ..data.batch import slices_to_model

        m = self.cfg.model
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise ValueError(f"masks must be [N, H, W], got shape {masks.shape}")
        for name, value, vocab in (("modality", modality, m.modalities), ("class", klass, m.classes)):
            if value is not None and value not in vocab:
                raise ValueError(f"{name} token {value!r} is not one the generator knows ({list(vocab)})")
        mod_idx = 0 if modality is None else m.modalities.index(modality) + 1
        cls_idx = 0 if klass is None else m.classes.index(klass) + 1
        h, w = masks.shape[1:]
        out = []
        for i in range(0, len(masks), max(1, int(chunk))):
            x = slices_to_model((masks[i:i + chunk] > 0).astype(np.float32), self.cfg.data.image_size, "mask",
                                self.device)
            mask_lat = self.module.latents(
                torch.cat([self.module.encode_posterior(x[j:j + 1] * 2 - 1) for j in range(x.shape[0])]), False)
            n = x.shape[0]
            mod = torch.full((n,), mod_idx, dtype=torch.long, device=self.device)
            cls = torch.full((n,), cls_idx, dtype=torch.long, device=self.device)
            lat = ddim_sample(self.module, m, mask_lat, mod, cls, generator, steps, guidance)
            img = self.module.decode(lat)[:, None]
            if img.shape[-2:] != (h, w):
                img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
            out.append(img[:, 0].clamp(-1, 1).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, h, w), np.float32)

    @torch.no_grad()
    def preview(self, step: int):
        """Rows of [real slice | conditioning mask | generated] for 2 fixed training items."""
        rng = np.random.default_rng([self.cfg.train.seed, 20261202])
        items = [self.data.sample(rng) for _ in range(2)]
        fake = self.sample_items(items, torch.Generator().manual_seed(self.cfg.train.seed),
                                 steps=self.cfg.model.preview_steps)
        rows = []
        for it, f in zip(items, fake):
            rows.append(torch.cat([(self.data.image_slice(it)[0, 0] + 1) / 2, self.data.mask_slice(it)[0, 0],
                                   (f.cpu() + 1) / 2], dim=1))
        return torch.cat(rows, dim=0)[None].clamp(0, 1)

    def finalize(self, run_dir: Path, summary: dict) -> list[Path]:
        from ..atomic import atomic_directory

        m, d = self.cfg.model, self.cfg.data
        meta = {"format": 1, "modalities": list(m.modalities), "classes": list(m.classes),
                "image_size": d.image_size, "latent_channels": self.module.latent_channels,
                "unet_in_channels": int(self.module.unet.config.in_channels),
                "scaling_factor": self.module.scaling_factor, "vae_identity": vae_identity(self.module.vae),
                "vae_source": self.load_report.vae.source if self.load_report else None,
                "conditioning": d.labels, "steps": summary.get("steps"), "scheduler": _scheduler_kwargs(m)}
        out = Path(run_dir) / EXPORT_DIR
        with atomic_directory(out) as tmp:
            self.module.unet.save_pretrained(tmp, safe_serialization=True)
            (Path(tmp) / META_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        summary["generator"] = {"export": str(out), "vae_identity": meta["vae_identity"]}
        return [out]


__all__ = ["GeneratorConfig", "GeneratorDataConfig", "GeneratorMethod", "MaskConditionedGenerator",
           "build_generator", "ddim_sample", "ddim_loop", "ddim_scheduler", "ddpm_scheduler", "vae_identity",
           "widen_conv_in", "modality_token", "EXPORT_DIR", "META_NAME"]
