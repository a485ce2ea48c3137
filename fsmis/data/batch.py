"""Episodes as model inputs: the one resize to the model's size, and the collated batch.

Training (:func:`collate`) and evaluation (the predictors) bring slices to the model's
``image_size`` through :func:`to_model_size`, so that a slice reaches the model identically in
both (tested): images bilinear (``align_corners=False``), masks nearest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def to_model_size(x: torch.Tensor, size: int, kind: str) -> torch.Tensor:
    """[N, 1, H, W] -> [N, 1, size, size]; ``kind`` "image" (bilinear) or "mask" (nearest)."""
    if kind not in ("image", "mask"):
        raise ValueError(f"kind must be 'image' or 'mask', got {kind!r}")
    if x.shape[-2:] == (size, size):
        return x
    if kind == "mask":
        return F.interpolate(x, size=(size, size), mode="nearest")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def slices_to_model(a: np.ndarray, size: int, kind: str, device=None) -> torch.Tensor:
    """[N, H, W] numpy slices -> float32 [N, 1, size, size] on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None]
    if device is not None:
        t = t.to(device)
    return to_model_size(t, size, kind)


@dataclass
class Batch:
    """Tensors of one batch of B episodes with K shots and Q queries each. Images in [-1, 1]
    (per-volume min-max), masks in {0, 1}."""

    support_images: torch.Tensor  # [B·K, 1, H, W]
    support_masks: torch.Tensor  # [B·K, 1, H, W]
    query_images: torch.Tensor  # [B·Q, 1, H, W]
    n_shot: int = 1
    queries_per_episode: int = 1
    query_masks: torch.Tensor | None = None  # [B·Q, 1, H, W], training only

    def to(self, device) -> "Batch":
        for name in ("support_images", "support_masks", "query_images", "query_masks"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def collate(episodes, image_size: int, shift_px: int = 0, rng: np.random.Generator | None = None) -> Batch:
    """Episodes (numpy) -> a Batch of B episodes with K shots and one query each."""
    s_img = slices_to_model(np.concatenate([e.support_images for e in episodes]), image_size, "image")
    s_msk = slices_to_model(np.concatenate([e.support_masks for e in episodes]), image_size, "mask")
    q_img = slices_to_model(np.concatenate([e.query_images for e in episodes]), image_size, "image")
    q_msk = slices_to_model(np.concatenate([e.query_masks for e in episodes]), image_size, "mask")
    if shift_px > 0 and rng is not None:
        # independent random shifts keep the model from copying the support mask's position
        for t_img, t_msk in ((s_img, s_msk), (q_img, q_msk)):
            for i in range(t_img.shape[0]):
                dy, dx = (int(v) for v in rng.integers(-shift_px, shift_px + 1, size=2))
                t_img[i] = _shift(t_img[i], dy, dx)
                t_msk[i] = _shift(t_msk[i], dy, dx)
    return Batch(s_img, s_msk, q_img, episodes[0].n_shot, 1, q_msk)


__all__ = ["Batch", "collate", "to_model_size", "slices_to_model"]
