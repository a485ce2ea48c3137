"""SD-FSMIS as a method: episodic training (:class:`SDFSMISMethod`) and the predictor behind the one
predictor interface (:class:`SDFSMISPredictor`).

Training: self-supervised (or GT-label) episodes of the fold's training cases from the
ADNet-family sampler (:mod:`fsmis.data.episodes`), collated and resized by
:func:`fsmis.data.batch.collate`; the loss is the model's one-step latent MSE
(:meth:`fsmis.models.sd_fsmis.SDFSMIS.loss`). ``train.cache_latents`` encodes each training slice
and mask once (:mod:`fsmis.engine.latent_cache`).

Prediction: images arrive min-max normalised to [-1, 1] per volume; they are resized to the model's
``data.image_size`` by the same function as in training, predicted with one support pass per group
of ``eval.chunk_batch`` query slices, and the probabilities are resized back, thresholded at
``threshold_ratio`` × the chunk maximum and reduced to the largest 8-connected component per slice.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.batch import Batch, collate, slices_to_model
from ..engine.method import register_method
from ..models.sd_fsmis import SDFSMIS, SDFSMISConfig, parameter_counts, postprocess
from .base import Predictor
from .episodic import EpisodicMethod


@register_method
class SDFSMISMethod(EpisodicMethod):
    name = "sdfsmis"
    model_config = SDFSMISConfig

    def build(self) -> None:
        cfg = self.cfg
        self.module, self.load_report = SDFSMIS.from_config(cfg.model)
        if cfg.train.grad_checkpointing:
            self.module.unet.enable_gradient_checkpointing()
        self.latent_cache = None
        if cfg.train.cache_latents:
            if cfg.data.augment or cfg.data.shift_px:
                raise ValueError("train.cache_latents=true needs data.augment=false and data.shift_px=0 "
                                 f"(got data.augment={cfg.data.augment}, data.shift_px={cfg.data.shift_px}): "
                                 "augmented or shifted slices never repeat")
            from ..engine.latent_cache import LatentCache

            self.latent_cache = LatentCache(self.module)

    def parameter_counts(self) -> dict:
        return parameter_counts(self.module)

    def param_groups(self) -> list[dict]:
        """UNet (and input convs) at ``lr``, VTCT at ``lr × vtct_lr_mult``."""
        t = self.cfg.train
        return [{"params": self.module.unet_parameters(), "lr": t.lr},
                {"params": self.module.vtct_parameters(), "lr": t.lr * t.vtct_lr_mult}]

    def batch(self, step: int, micro: int):
        episodes, rng = self.episodes(step, micro)
        batch = collate(episodes, self.cfg.data.image_size, self.cfg.data.shift_px, rng).to(self.device)
        return batch, episodes

    def loss(self, batch, generator):
        batch, episodes = batch
        posteriors = None
        if self.latent_cache is not None:
            posteriors = self.latent_cache.batch_posteriors(batch, episodes)
        return self.module.loss(batch, generator, posteriors, fg_weight=self.cfg.train.fg_weight)

    def trained_state(self) -> dict:
        return self.module.trainable_state_dict()

    def frozen_state(self) -> dict:
        """The VAE's tensors when no file provides them (random initialisation from ``model.vae``)."""
        if self.load_report is not None and not self.load_report.vae.pretrained:
            return {"vae." + k: v for k, v in self.module.vae.state_dict().items()}
        return {}

    def predictor(self, checkpoint: str | None = None):
        return SDFSMISPredictor(self.module, self.cfg, device=self.device, checkpoint=checkpoint)

    @torch.no_grad()
    def preview(self, step: int):
        batch, _ = self.batch(step, 0)
        pred = self.predictor().predict_batch(batch.support_images[:1], batch.support_masks[:1],
                                              batch.query_images[:1])
        panel = torch.cat([(batch.support_images[0, 0] + 1) / 2, batch.support_masks[0, 0],
                           (batch.query_images[0, 0] + 1) / 2, torch.as_tensor(pred[0]).float().to(self.device),
                           batch.query_masks[0, 0]], dim=1)
        return panel[None].clamp(0, 1)

    def finalize(self, run_dir, summary):
        if self.latent_cache is not None:
            summary["latent_cache"] = self.latent_cache.stats()
        return []


class SDFSMISPredictor(Predictor):
    name = "sdfsmis"
    normalization = "minmax"

    def __init__(self, model, cfg, device=None, checkpoint: str | None = None):
        self.model = model
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.checkpoint = checkpoint

    def describe(self) -> dict:
        return {"method": self.name, "normalization": self.normalization, "checkpoint": self.checkpoint,
                "image_size": self.cfg.data.image_size, "threshold_ratio": self.cfg.model.threshold_ratio,
                "threshold_floor": self.cfg.model.threshold_floor,
                "largest_component": self.cfg.model.largest_component, "config_name": self.cfg.name}

    def model_inputs(self, support_images, support_masks, query_images):
        """Numpy slices -> the tensors the model sees (resized exactly as in training)."""
        size = self.cfg.data.image_size
        return (slices_to_model(support_images, size, "image", self.device),
                slices_to_model(support_masks, size, "mask", self.device),
                slices_to_model(query_images, size, "image", self.device))

    @torch.no_grad()
    def predict_batch(self, s_img: torch.Tensor, s_msk: torch.Tensor, q_img: torch.Tensor) -> np.ndarray:
        """Tensors at model size: [K,1,S,S], [K,1,S,S], [Q,1,S,S] -> probabilities [Q,S,S] (numpy)."""
        was_training = self.model.training
        self.model.eval()
        out = []
        step = max(1, self.cfg.eval.chunk_batch)
        for i in range(0, q_img.shape[0], step):
            q = q_img[i:i + step]
            batch = Batch(s_img, s_msk, q, n_shot=s_img.shape[0], queries_per_episode=q.shape[0])
            out.append(self.model.predict_probability(batch).float().cpu())
        self.model.train(was_training)
        return torch.cat(out).numpy()

    def predict(self, support_images, support_masks, query_images):
        h, w = query_images.shape[-2:]
        prob = self.predict_batch(*self.model_inputs(support_images, support_masks, query_images))
        if prob.shape[-2:] != (h, w):
            prob = F.interpolate(torch.from_numpy(prob)[:, None], size=(h, w), mode="bilinear",
                                 align_corners=False)[:, 0].numpy()
        return postprocess(prob, self.cfg.model.threshold_ratio, self.cfg.model.largest_component,
                           self.cfg.model.threshold_floor).astype(np.uint8)


__all__ = ["SDFSMISMethod", "SDFSMISPredictor"]
