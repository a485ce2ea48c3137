"""Query Enhancement (QE): a parameter-free query prototype computed on VAE latents.

1. support foreground / background prototypes: masked averages of the support latent with the
   soft (bilinear-resized) support mask and its complement, mean over shots;
2. per query latent pixel: cosine similarity to both prototypes, softmax over the two
   (no temperature);
3. query prototype = mean of the query latents whose foreground probability > ``threshold``
   (0.7); if none, the top-k pixels by foreground probability, k = floor(0.1875 · latent width);
4. the prototype broadcast over the grid, to be concatenated to the query latent.

Two numerical details are switches (``model.qe_align_corners``, ``model.qe_eps``): the mask resize
with ``align_corners`` (released: True; default False, the resize used everywhere else) and the
epsilon of the masked averages (released: 1e-6; default 1e-5).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EPS = 1e-5


def resize_masks(masks: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    """[N, 1, H, W] soft masks -> [N, 1, h, w], bilinear."""
    return F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=align_corners)


def support_prototypes(s_latents: torch.Tensor, s_masks: torch.Tensor, n_shot: int, eps: float = EPS):
    """s_latents [B·K, C, h, w], s_masks [B·K, 1, h, w] (already at latent size) ->
    (fg, bg) prototypes [B, C], averaged over the K shots."""
    fg = (s_latents * s_masks).sum((2, 3)) / (s_masks.sum((2, 3)) + eps)
    bg = (s_latents * (1 - s_masks)).sum((2, 3)) / ((1 - s_masks).sum((2, 3)) + eps)
    b = s_latents.shape[0] // n_shot
    return fg.view(b, n_shot, -1).mean(1), bg.view(b, n_shot, -1).mean(1)


def foreground_probability(q_latents: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """q_latents [N, C, h, w], fg/bg [N, C] -> P(fg) [N, h, w] (softmax of the two cosines)."""
    sim_fg = F.cosine_similarity(q_latents, fg[:, :, None, None], dim=1)
    sim_bg = F.cosine_similarity(q_latents, bg[:, :, None, None], dim=1)
    return torch.softmax(torch.stack([sim_bg, sim_fg], dim=1), dim=1)[:, 1]


def query_prototype(q_latents: torch.Tensor, prob: torch.Tensor, threshold: float = 0.7,
                    topk_ratio: float = 0.1875) -> torch.Tensor:
    """Mean of the query latents with P(fg) > threshold; top-k fallback. -> [N, C]."""
    n, c, h, w = q_latents.shape
    flat = q_latents.flatten(2)  # [N, C, hw]
    p = prob.flatten(1)  # [N, hw]
    sel = (p > threshold).to(q_latents.dtype)
    count = sel.sum(1)
    k = max(1, int(math.floor(topk_ratio * w)))
    top = torch.zeros_like(p).scatter_(1, p.topk(k, dim=1).indices, 1.0)
    weights = torch.where((count > 0)[:, None], sel, top)
    return (flat * weights[:, None]).sum(2) / weights.sum(1, keepdim=True)


def query_enhancement(s_latents, s_masks, q_latents, n_shot: int, queries_per_episode: int = 1,
                      threshold: float = 0.7, topk_ratio: float = 0.1875, align_corners: bool = False,
                      eps: float = EPS) -> torch.Tensor:
    """Return the prototype map [B·Q, C, h, w] for the query latents [B·Q, C, h, w].

    s_masks may be at image size; they are bilinearly resized to the latent grid."""
    h, w = s_latents.shape[-2:]
    if s_masks.shape[-2:] != (h, w):
        s_masks = resize_masks(s_masks, (h, w), align_corners)
    fg, bg = support_prototypes(s_latents, s_masks, n_shot, eps)
    if queries_per_episode > 1:
        fg = fg.repeat_interleave(queries_per_episode, 0)
        bg = bg.repeat_interleave(queries_per_episode, 0)
    prob = foreground_probability(q_latents, fg, bg)
    proto = query_prototype(q_latents, prob, threshold, topk_ratio)
    return proto[:, :, None, None].expand_as(q_latents)
