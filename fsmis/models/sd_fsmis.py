"""SD-FSMIS: a Stable Diffusion UNet as a one-step few-shot segmenter.

Data path of one batch of B episodes with K support shots and Q queries each:

  support images/masks --VAE--> latents --[img | mask]--> conv_in_support --UNet (SQI store)
  query images --VAE--> latents; QE prototype from support latents
          --[img | proto]--> conv_in_query --UNet (SQI fuse, VTCT token)--> output
  prediction z_mask = -output (timestep 1; the released DDIM with all betas 1 and
  v-prediction reduces to this); loss = MSE(output, -z_query_mask) in fp32.

Inference decodes z_mask with the VAE, averages (x+1)/2 over the 3 channels, thresholds at
``threshold_ratio`` × the maximum over the chunk (never below ``threshold_floor``, 0 by default)
and keeps the largest 8-connected component per slice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.batch import Batch
from .qe import query_enhancement
from .sqi import install_sqi
from .vtct import VTCT


@dataclass
class SDFSMISConfig:
    """The ``model:`` section of an SD-FSMIS config (docs/sd-fsmis.md; weights: fsmis.models.weights)."""

    sd_path: str | None = None  # local diffusers SD folder (unet/, vae/) or single checkpoint file
    sd_config: str | None = None  # for a single checkpoint file: local folder with unet/ and vae/ configs
    vae_path: str | None = None  # a separate local AutoencoderKL folder (e.g. the demo VAE)
    unet: dict | None = None  # UNet2DConditionModel config for random initialisation (no sd_path)
    unet_init: str | None = None  # a generator run (or its unet/ folder): the UNet starts from its weights
    unet_init_conv_in: str = "surgery"  # surgery: its image-latent conv_in, [W, W] / 2 as from SD | direct: its 8-channel conv
    vae: dict | None = None  # AutoencoderKL config for random initialisation
    vtct_encoder: str = "dinov2"  # dinov2 | clip | none
    vtct_encoder_path: str | None = None
    vtct_hidden: int = 1536
    vtct_depth: int = 3
    vtct_feat_dim: int = 128  # feature size of the "none" encoder
    vtct_crop: str = "aligned"  # aligned | released (the image cropped, the mask not) | resize (fsmis/models/vtct.py)
    scaling_factor: float | None = None  # latent scale; None: the VAE config's scaling_factor (SD: 0.18215)
    qe_threshold: float = 0.7
    qe_topk_ratio: float = 0.1875
    qe_align_corners: bool = False  # QE's support-mask resize (released: true)
    qe_eps: float = 1.0e-5  # QE's masked-average epsilon (released: 1e-6)
    threshold_ratio: float = 0.25
    threshold_floor: float = 0.0  # absolute probability floor under the relative threshold; 0: none (released)
    largest_component: bool = True


TIMESTEP = 1


def expand_conv_in(conv: nn.Conv2d, in_channels: int = 8) -> nn.Conv2d:
    """Weight surgery: [W, W] / 2 along the input channels, bias copied."""
    if in_channels % conv.in_channels:
        raise ValueError(f"cannot expand a {conv.in_channels}-channel conv to {in_channels} channels")
    reps = in_channels // conv.in_channels
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    dtype=conv.weight.dtype, device=conv.weight.device)
    with torch.no_grad():
        new.weight.copy_(conv.weight.repeat(1, reps, 1, 1) / reps)
        new.bias.copy_(conv.bias)
    return new


class SDFSMIS(nn.Module):
    def __init__(self, unet, vae, vtct: VTCT, scaling_factor: float = 0.18215,
                 qe_threshold: float = 0.7, qe_topk_ratio: float = 0.1875, qe_align_corners: bool = False,
                 qe_eps: float = 1e-5):
        super().__init__()
        self.unet = unet
        self.conv_in_support = expand_conv_in(unet.conv_in, 8)
        self.conv_in_query = expand_conv_in(unet.conv_in, 8)
        # the two 8-channel convolutions live outside the UNet; its forward does not check channels
        unet.conv_in = nn.Identity()
        self.vae = vae.requires_grad_(False).eval()
        self.vtct = vtct
        self.bank = install_sqi(unet)
        self.scaling_factor = scaling_factor
        self.qe_threshold = qe_threshold
        self.qe_topk_ratio = qe_topk_ratio
        self.qe_align_corners = bool(qe_align_corners)
        self.qe_eps = float(qe_eps)

    @classmethod
    def from_config(cls, cfg: SDFSMISConfig, dtype: torch.dtype | None = None, verify: str = "sample"):
        """Assemble the model from its config section: -> (SDFSMIS, LoadReport). Pretrained parts load
        strictly (fsmis.models.weights): WeightLoadError on a partial load, ConfigError without a source."""
        return build_model(cfg, dtype, verify)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()
        return self

    # -- parameter groups (AdamW: UNet at the base LR, VTCT at 5x) -------------------------------
    def unet_parameters(self):
        return [*self.unet.parameters(), *self.conv_in_support.parameters(), *self.conv_in_query.parameters()]

    def vtct_parameters(self):
        return [p for p in self.vtct.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict:
        """Everything trained: UNet (with the two input convs) and the VTCT's trainable parts."""
        sd = {}
        for prefix, mod in (("unet.", self.unet), ("conv_in_support.", self.conv_in_support),
                            ("conv_in_query.", self.conv_in_query), ("vtct.mlp.", self.vtct.mlp)):
            sd.update({prefix + k: v for k, v in mod.state_dict().items()})
        if getattr(self.vtct.encoder, "trainable", False):
            sd.update({"vtct.encoder." + k: v for k, v in self.vtct.encoder.state_dict().items()})
        return sd

    # -- VAE -------------------------------------------------------------------------------------
    def encode_posterior(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 1, H, W] in [-1, 1] -> the VAE posterior's parameters [N, 2·4, h, w] (mean, log-variance)."""
        x = images.to(self.vae.dtype).expand(-1, 3, -1, -1)
        with torch.no_grad():
            return self.vae.encode(x).latent_dist.parameters

    def latents_from_posterior(self, parameters: torch.Tensor, sample: bool,
                               generator: torch.Generator | None = None) -> torch.Tensor:
        """Posterior parameters -> latents (× scaling factor): a sample (training) or the mean."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        dist = DiagonalGaussianDistribution(parameters)
        z = dist.sample(generator=generator) if sample else dist.mean
        return z * self.scaling_factor

    def encode(self, images: torch.Tensor, sample: bool, generator: torch.Generator | None = None):
        """[N, 1, H, W] in [-1, 1] -> latents [N, 4, h, w] (× scaling factor)."""
        return self.latents_from_posterior(self.encode_posterior(images), sample, generator)

    def decode_probability(self, latents: torch.Tensor) -> torch.Tensor:
        """Mask latents -> foreground probability [N, H, W] in [0, 1]."""
        with torch.no_grad():
            x = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return ((x.float() + 1) / 2).mean(1).clamp(0, 1)

    # -- the two passes --------------------------------------------------------------------------
    def forward_latents(self, s_img_lat, s_mask_lat, q_img_lat, support_images, support_masks,
                        n_shot: int, queries_per_episode: int) -> torch.Tensor:
        """UNet output for the query latents (the negated mask-latent prediction)."""
        enc_param = next(self.vtct.encoder.parameters(), None)
        enc_dtype = enc_param.dtype if enc_param is not None else torch.float32
        cond = self.vtct((support_images.to(enc_dtype).expand(-1, 3, -1, -1) + 1) / 2,
                         support_masks.to(enc_dtype), n_shot)
        cond = cond.to(self.unet.dtype)
        t = torch.tensor(TIMESTEP, device=q_img_lat.device)
        bank = self.bank
        bank.n_shot = n_shot
        try:
            bank.mode = "store"
            x_s = self.conv_in_support(torch.cat([s_img_lat, s_mask_lat], 1).to(self.conv_in_support.weight.dtype))
            self.unet(x_s, t, encoder_hidden_states=cond.repeat_interleave(n_shot, 0),
                      cross_attention_kwargs=bank.context())
            proto = query_enhancement(s_img_lat.float(), support_masks.float(), q_img_lat.float(), n_shot,
                                      queries_per_episode, self.qe_threshold, self.qe_topk_ratio,
                                      self.qe_align_corners, self.qe_eps)
            x_q = self.conv_in_query(torch.cat([q_img_lat, proto.to(q_img_lat.dtype)], 1)
                                     .to(self.conv_in_query.weight.dtype))
            bank.mode = "fuse"
            out = self.unet(x_q, t, encoder_hidden_states=cond.repeat_interleave(queries_per_episode, 0),
                            cross_attention_kwargs=bank.context()).sample
        finally:
            bank.clear()
        return out

    def loss(self, batch: Batch, generator: torch.Generator | None = None, posteriors=None,
             fg_weight: float = 1.0) -> torch.Tensor:
        """MSE of the UNet output against the negated query-mask latent (posterior samples).

        ``posteriors``: optional VAE posterior parameters of (support images, support masks,
        query images, query masks), e.g. from a :class:`~fsmis.engine.latent_cache.LatentCache`;
        without them the four groups are encoded here. The samples are drawn from ``generator``
        in the same order either way.

        ``fg_weight`` (``train.fg_weight``; 1 = the released plain MSE): latent cells whose
        footprint holds any query-mask foreground (max-pooled to the latent grid) weigh
        ``fg_weight``, the others 1, and the loss is the weighted mean (see :func:`weighted_latent_mse`)."""
        if posteriors is None:
            posteriors = (self.encode_posterior(batch.support_images),
                          self.encode_posterior(batch.support_masks * 2 - 1),
                          self.encode_posterior(batch.query_images),
                          self.encode_posterior(batch.query_masks * 2 - 1))
        s_img, s_msk, q_img, q_msk = (self.latents_from_posterior(p, True, generator) for p in posteriors)
        out = self.forward_latents(s_img, s_msk, q_img, batch.support_images, batch.support_masks,
                                   batch.n_shot, batch.queries_per_episode)
        if fg_weight == 1.0:
            return F.mse_loss(out.float(), -q_msk.float())
        return weighted_latent_mse(out, -q_msk, batch.query_masks, fg_weight)

    @torch.no_grad()
    def predict_probability(self, batch: Batch) -> torch.Tensor:
        s_img = self.encode(batch.support_images, sample=False)
        s_msk = self.encode(batch.support_masks * 2 - 1, sample=False)
        q_img = self.encode(batch.query_images, sample=False)
        out = self.forward_latents(s_img, s_msk, q_img, batch.support_images, batch.support_masks,
                                   batch.n_shot, batch.queries_per_episode)
        return self.decode_probability(-out)


# model keys that act only after the network (post-processing): changing them needs no retraining
POSTPROCESS_KEYS = ("threshold_ratio", "threshold_floor", "largest_component")


def weighted_latent_mse(out: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, fg_weight: float) -> torch.Tensor:
    """Weighted mean of the squared error over [B, C, h, w] latents: a cell weighs ``fg_weight``
    where the [B, 1, H, W] mask has foreground anywhere in its footprint, else 1. With
    ``fg_weight=1`` this is exactly the plain MSE."""
    fg = F.adaptive_max_pool2d(masks.float(), out.shape[-2:]) > 0.5
    w = torch.where(fg, torch.as_tensor(float(fg_weight), device=out.device), torch.ones((), device=out.device))
    se = (out.float() - target.float()) ** 2
    return (se * w).sum() / (w.sum() * out.shape[1])


def postprocess(prob: np.ndarray, threshold_ratio: float = 0.25, largest_component: bool = True,
                threshold_floor: float = 0.0) -> np.ndarray:
    """[Q, H, W] probabilities of one chunk -> masks: threshold at ratio × chunk maximum (and at
    least ``threshold_floor``, an absolute probability; 0 = none, released), then the largest
    8-connected component per slice. With a floor, a flat output (maximum below the floor)
    predicts nothing instead of its specks."""
    from scipy import ndimage as ndi

    prob = np.asarray(prob, dtype=np.float32)
    if prob.size and prob.max() > 0:
        mask = prob > max(threshold_ratio * float(prob.max()), float(threshold_floor))
    else:
        mask = np.zeros(prob.shape, bool)
    if largest_component:
        structure = np.ones((3, 3), bool)
        for i in range(mask.shape[0]):
            lab, n = ndi.label(mask[i], structure=structure)
            if n > 1:
                sizes = np.bincount(lab.ravel())[1:]
                mask[i] = lab == (int(np.argmax(sizes)) + 1)
    return mask


# -- assembly -------------------------------------------------------------------------------------
def build_model(cfg: SDFSMISConfig, dtype: torch.dtype | None = None, verify: str = "sample"):
    """The model section -> (SDFSMIS, LoadReport). Raises WeightLoadError when a pretrained part loads
    partially and ConfigError when a part has no source."""
    from ..config import ConfigError
    from .weights import LoadReport, load_unet, load_vae, load_vtct_encoder
    from .sqi import count_sqi_layers

    report = LoadReport()
    unet, report.unet = load_unet(cfg, dtype, verify)
    vae, report.vae = load_vae(cfg, dtype, verify)
    if cfg.unet_init:
        from .weights import check_unet_init_vae

        check_unet_init_vae(cfg, vae, report)
    ucfg, vcfg = unet.config, vae.config
    if vcfg.latent_channels != ucfg.in_channels or ucfg.out_channels != ucfg.in_channels:
        raise ConfigError(f"VAE latent channels ({vcfg.latent_channels}) must equal the UNet's input and output "
                          f"channels ({ucfg.in_channels} / {ucfg.out_channels})")
    if vcfg.in_channels != 3:
        raise ConfigError(f"the VAE must take 3-channel images (images and masks are repeated to 3 channels), "
                          f"its in_channels is {vcfg.in_channels}")
    cross = ucfg.cross_attention_dim
    if not isinstance(cross, int):
        raise ConfigError(f"UNet cross_attention_dim must be one integer for the VTCT token, got {cross!r}")
    encoder, report.vtct_encoder = load_vtct_encoder(cfg)
    vtct = VTCT(encoder, cross, cfg.vtct_hidden, cfg.vtct_depth, cfg.vtct_crop)
    scaling_factor = resolve_scaling_factor(cfg.scaling_factor, vcfg, report)
    if cfg.unet_init:
        from .weights import unet_init_scaling_factor

        gen_sf = unet_init_scaling_factor(cfg)
        if not math.isclose(gen_sf, scaling_factor, rel_tol=1e-6):
            report.warnings.append(f"model.unet_init: the generator's latents were scaled by {gen_sf}, this "
                                   f"model's by {scaling_factor}")
    model = SDFSMIS(unet, vae, vtct, scaling_factor, cfg.qe_threshold, cfg.qe_topk_ratio, cfg.qe_align_corners,
                    cfg.qe_eps)
    counts = parameter_counts(model)
    report.summary = {"sqi_layers": count_sqi_layers(model.unet), "cross_attention_dim": cross,
                      "latent_channels": vcfg.latent_channels, "scaling_factor": round(scaling_factor, 6),
                      "params_total": counts["total"],
                      "params_trainable": counts["trainable"]}
    return model, report


SD_SCALING_FACTOR = 0.18215


def resolve_scaling_factor(configured, vae_config, report=None) -> float:
    """The latent scale: ``model.scaling_factor`` when set, else the VAE config's ``scaling_factor``
    (SD-1.5 / SD-2.1: 0.18215; the demo VAE stores the factor that gives its latents unit
    variance), else SD's 0.18215. A set value that differs from the VAE's is reported."""
    vae_sf = getattr(vae_config, "scaling_factor", None)
    if configured is None:
        return float(vae_sf) if vae_sf is not None else SD_SCALING_FACTOR
    if vae_sf is not None and report is not None and not math.isclose(float(vae_sf), float(configured), rel_tol=1e-6):
        report.warnings.append(f"model.scaling_factor={configured} differs from the VAE config's "
                               f"scaling_factor={vae_sf} ({report.vae.source}); using model.scaling_factor")
    return float(configured)


def parameter_counts(model) -> dict:
    """Parameters of an SDFSMIS model: total, trainable and per component (the UNet without its
    conv_in, which the weight surgery replaced by the two 8-channel convolutions)."""
    def n(mod, trainable_only=False):
        return sum(p.numel() for p in mod.parameters() if p.requires_grad or not trainable_only)

    return {
        "total": n(model), "trainable": n(model, True),
        "unet": n(model.unet), "conv_in_support": n(model.conv_in_support), "conv_in_query": n(model.conv_in_query),
        "vtct_mlp": n(model.vtct.mlp), "vtct_encoder": n(model.vtct.encoder),
        "vtct_encoder_trainable": n(model.vtct.encoder, True), "vae": n(model.vae),
    }
