"""The baselines as methods of the engine: PANet, SSL-ALPNet, ADNet (:mod:`fsmis.models.baselines.prototypes`)
and UniverSeg (:mod:`fsmis.models.baselines.universeg`).

Each trains on the fold's episodes of the shared data layer (``data.sampler``: SSL-ALPNet's
``same_slice`` superpixel episodes or the ADNet family's ``consecutive`` supervoxel episodes;
augmentation ``data.augment``), validates with the canonical evaluator like SD-FSMIS, and predicts
through the one predictor interface, so ``test.py --method <name> --checkpoint RUN`` scores it under
the same protocol. Slices arrive z-scored per volume (docs/protocol.md §3) for the prototype
baselines, min-max normalised for UniverSeg (mapped to [0, 1], its published input range); they
are brought to ``data.image_size`` by the same resize as in training. A query pixel is foreground
when its foreground probability exceeds 0.5 (the argmax of the released codes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batch import collate, slices_to_model
from ..engine.method import register_method
from .base import Predictor
from .episodic import EpisodicMethod


# -- configs ----------------------------------------------------------------------------------------
@dataclass
class PANetConfig:
    backbone: str = "resnet101"  # resnet101 | resnet50 | small (CPU tests, the demo)
    backbone_weights: str | None = None  # local MS-COCO DeepLabV3 checkpoint (torchvision layout, keys backbone.*)
    backbone_widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # backbone=small only
    feat_dim: int = 256  # the encoder's 1x1 projection
    scaler: float = 20.0  # cosine similarity × scaler
    bg_weight: float = 1.0  # cross-entropy weight of the background class
    align: bool = True  # prototype alignment loss (PAR)


@dataclass
class ALPNetConfig(PANetConfig):
    bg_weight: float = 0.05  # the released weighted cross-entropy [0.05, 1]
    window: int = 4  # local prototype pooling window in training (32 x 32 features / proto_grid_size 8)
    window_eval: int = 2  # ... at test time (val_wsize)
    fg_thresh: float = 0.95
    bg_thresh: float = 0.95


@dataclass
class ADNetConfig(PANetConfig):
    bg_weight: float = 0.1  # the released bg_wt
    t_init: float = -10.0  # the learned threshold's start
    t_loss_scaler: float = 1.0


@dataclass
class UniverSegConfig:
    encoder_blocks: list[int] = field(default_factory=lambda: [64, 64, 64, 64])  # the published v1 configuration
    decoder_blocks: list[int] | None = None  # default: the encoder's, reversed, without the deepest level
    weights: str | None = None  # local published checkpoint (universeg_v1_nf64_ss64_STA.pt), loaded strictly


# -- prototype baselines ----------------------------------------------------------------------------
class PrototypeMethod(EpisodicMethod):
    """Shared by PANet, ALPNet and ADNet: the encoder on a backbone, episodic cross-entropy training."""

    normalization = "zscore"
    supports_genaug = False
    net_kwargs: tuple = ()  # model keys passed to the network class

    def build(self) -> None:
        from ..models.baselines.backbones import build_backbone
        from ..models.baselines.prototypes import MODELS, Encoder
        from ..models.weights import LoadReport

        m = self.cfg.model
        kw = {"widths": tuple(m.backbone_widths)} if m.backbone == "small" else {}
        backbone = build_backbone(m.backbone, m.backbone_weights, **kw)
        net = MODELS[self.name](Encoder(backbone, m.feat_dim), scaler=m.scaler,
                                **{k: getattr(m, k) for k in self.net_kwargs})
        self.module = net.to(self.device)
        self.load_report = LoadReport(others=[backbone.load_report],
                                      summary={"method": self.name, "backbone": m.backbone,
                                               "params": sum(p.numel() for p in net.parameters())})

    def batch(self, step: int, micro: int):
        episodes, rng = self.episodes(step, micro)
        return collate(episodes, self.cfg.data.image_size, self.cfg.data.shift_px, rng).to(self.device)

    def loss(self, batch, generator):
        m = self.cfg.model
        total, parts = self.module.episode_loss(batch.support_images, batch.support_masks, batch.query_images,
                                                batch.query_masks, m.bg_weight, m.align)
        self._parts = {k: float(v.detach()) for k, v in parts.items()}
        return total

    def scalars(self, step: int) -> dict:
        return {**super().scalars(step), **{f"loss/{k}": v for k, v in getattr(self, "_parts", {}).items()}}

    def predictor(self, checkpoint: str | None = None):
        return BaselinePredictor(self, checkpoint)

    @torch.no_grad()
    def fg_probability(self, s_img, s_msk, q_img) -> torch.Tensor:
        return self.module.fg_probability(s_img, s_msk, q_img)


@register_method
class PANetMethod(PrototypeMethod):
    name = "panet"
    model_config = PANetConfig


@register_method
class ALPNetMethod(PrototypeMethod):
    name = "alpnet"
    model_config = ALPNetConfig
    net_kwargs = ("window", "window_eval", "fg_thresh", "bg_thresh")


@register_method
class ADNetMethod(PrototypeMethod):
    name = "adnet"
    model_config = ADNetConfig
    net_kwargs = ("t_init", "t_loss_scaler")


# -- UniverSeg ----------------------------------------------------------------------------------------
@register_method
class UniverSegMethod(EpisodicMethod):
    """UniverSeg trained on the fold's episodes (support sets of ``data.n_shot`` slices) with a soft
    Dice loss, or evaluated from the published weights (``model.weights``; train.max_steps may then
    be small, the weights are loaded strictly before training)."""

    name = "universeg"
    model_config = UniverSegConfig
    normalization = "minmax"  # [-1, 1] here, mapped to the published [0, 1] in the model inputs
    supports_genaug = False

    def build(self) -> None:
        from ..models.baselines.universeg import load_universeg_weights, universeg_from_config
        from ..models.weights import RANDOM_INIT, ComponentLoad, LoadReport

        m = self.cfg.model
        net = universeg_from_config({"encoder_blocks": list(m.encoder_blocks),
                                     **({"decoder_blocks": list(m.decoder_blocks)} if m.decoder_blocks else {})})
        if m.weights:
            row = load_universeg_weights(net, m.weights)
        else:
            row = ComponentLoad("universeg", source=RANDOM_INIT, expected=len(net.state_dict()),
                                params=sum(p.numel() for p in net.parameters()))
        self.module = net.to(self.device)
        self.load_report = LoadReport(others=[row], summary={"method": self.name,
                                                             "params": sum(p.numel() for p in net.parameters())})

    @staticmethod
    def _unit(x: torch.Tensor) -> torch.Tensor:
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    def batch(self, step: int, micro: int):
        episodes, rng = self.episodes(step, micro)
        return collate(episodes, self.cfg.data.image_size, self.cfg.data.shift_px, rng).to(self.device)

    def logits(self, s_img, s_msk, q_img) -> torch.Tensor:
        """[B·K, 1, S, S] supports of B episodes, [B, 1, S, S] queries -> [B, 1, S, S] logits."""
        b = q_img.shape[0]
        k = s_img.shape[0] // b
        size = s_img.shape[-2:]
        return self.module(self._unit(q_img), self._unit(s_img).view(b, k, 1, *size), s_msk.view(b, k, 1, *size))

    def loss(self, batch, generator):
        prob = torch.sigmoid(self.logits(batch.support_images, batch.support_masks, batch.query_images))
        t = batch.query_masks
        dice = (2 * (prob * t).sum(dim=(1, 2, 3)) + 1.0) / (prob.sum(dim=(1, 2, 3)) + t.sum(dim=(1, 2, 3)) + 1.0)
        return (1.0 - dice).mean()

    def predictor(self, checkpoint: str | None = None):
        return BaselinePredictor(self, checkpoint)

    @torch.no_grad()
    def fg_probability(self, s_img, s_msk, q_img) -> torch.Tensor:
        q = q_img.shape[0]
        k = s_img.shape[0]
        size = s_img.shape[-2:]
        logits = self.module(self._unit(q_img), self._unit(s_img)[None].expand(q, k, 1, *size),
                             s_msk[None].expand(q, k, 1, *size))
        return torch.sigmoid(logits)[:, 0]


# -- the predictor ------------------------------------------------------------------------------------
class BaselinePredictor(Predictor):
    """Any baseline method behind the one predictor interface: slices resized to ``data.image_size``,
    the support encoded with each group of ``eval.chunk_batch`` queries, foreground probability
    resized back (bilinear) and thresholded at 0.5."""

    def __init__(self, method, checkpoint: str | None = None):
        self.method = method
        self.name = method.name
        self.normalization = method.normalization
        self.checkpoint = checkpoint

    def describe(self) -> dict:
        c = self.method.cfg
        return {"method": self.name, "normalization": self.normalization, "checkpoint": self.checkpoint,
                "image_size": c.data.image_size, "config_name": c.name,
                **({"backbone": c.model.backbone} if hasattr(c.model, "backbone") else {})}

    def probability(self, support_images, support_masks, query_images) -> np.ndarray:
        """[Q, H, W] foreground probability at the query's size."""
        m = self.method
        size, dev = m.cfg.data.image_size, m.device
        s_img = slices_to_model(support_images, size, "image", dev)
        s_msk = slices_to_model(support_masks, size, "mask", dev)
        q_all = slices_to_model(query_images, size, "image", dev)
        was = m.module.training
        m.module.eval()
        out = []
        step = max(1, m.cfg.eval.chunk_batch)
        try:
            for i in range(0, q_all.shape[0], step):
                out.append(m.fg_probability(s_img, s_msk, q_all[i:i + step]).float().cpu())
        finally:
            m.module.train(was)
        prob = torch.cat(out)
        h, w = query_images.shape[-2:]
        if prob.shape[-2:] != (h, w):
            prob = F.interpolate(prob[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        return prob.numpy()

    def predict(self, support_images, support_masks, query_images):
        return (self.probability(support_images, support_masks, query_images) > 0.5).astype(np.uint8)


__all__ = ["PANetMethod", "ALPNetMethod", "ADNetMethod", "UniverSegMethod", "BaselinePredictor",
           "PANetConfig", "ALPNetConfig", "ADNetConfig", "UniverSegConfig"]
