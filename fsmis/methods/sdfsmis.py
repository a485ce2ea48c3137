"""The SD-FSMIS predictor: the trained model behind the one predictor interface.

Images arrive min-max normalised to [-1, 1] per volume; they are resized to the model's
``data.image_size``, predicted with one support pass per group of ``eval.chunk_batch`` query
slices, and the probabilities are resized back, thresholded at ``threshold_ratio`` × the chunk
maximum and reduced to the largest 8-connected component per slice.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import Predictor, register


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
                "largest_component": self.cfg.model.largest_component, "config_name": self.cfg.name}

    @torch.no_grad()
    def predict_batch(self, s_img: torch.Tensor, s_msk: torch.Tensor, q_img: torch.Tensor) -> np.ndarray:
        """Tensors at model size: [K,1,S,S], [K,1,S,S], [Q,1,S,S] -> probabilities [Q,S,S] (numpy)."""
        from ..models.sd_fsmis import Batch

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
        from ..models.sd_fsmis import postprocess

        size = self.cfg.data.image_size
        h, w = query_images.shape[-2:]

        def to_model(a, mode):
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None].to(self.device)
            if t.shape[-2:] != (size, size):
                t = F.interpolate(t, size=(size, size), mode=mode,
                                  **({} if mode == "nearest" else {"align_corners": False}))
            return t

        prob = self.predict_batch(to_model(support_images, "bilinear"), to_model(support_masks, "nearest"),
                                  to_model(query_images, "bilinear"))
        if prob.shape[-2:] != (h, w):
            prob = F.interpolate(torch.from_numpy(prob)[:, None], size=(h, w), mode="bilinear",
                                 align_corners=False)[:, 0].numpy()
        return postprocess(prob, self.cfg.model.threshold_ratio, self.cfg.model.largest_component).astype(np.uint8)


def load_predictor(config: str, checkpoint: str, device=None, use_ema: bool | None = None) -> SDFSMISPredictor:
    from ..config import load_config
    from ..engine.checkpoints import load_checkpoint, load_model_state, resolve_checkpoint
    from ..models.build import build_model

    if not config or not checkpoint:
        raise ValueError("--method sdfsmis needs --config C and --checkpoint P")
    cfg = load_config(config)
    model, _ = build_model(cfg.model)
    step_dir = resolve_checkpoint(checkpoint)
    state = load_checkpoint(step_dir)
    ema = state.get("ema") if (use_ema if use_ema is not None else cfg.train.ema > 0) else None
    load_model_state(model, ema if ema is not None else state["model"], str(step_dir))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    return SDFSMISPredictor(model, cfg, device, checkpoint=str(step_dir))


@register("sdfsmis")
def _build(config=None, checkpoint=None, **kwargs):
    return load_predictor(config, checkpoint, **kwargs)
