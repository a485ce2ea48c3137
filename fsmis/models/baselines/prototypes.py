"""The prototype baselines: PANet, SSL-ALPNet and ADNet on one encoder.

All three embed support and query slices with the same encoder (a backbone of
:mod:`fsmis.models.baselines.backbones` and a 1x1 convolution to ``feat_dim`` channels without
bias, the ``localconv`` of the SSL-ALPNet / ADNet encoder; slices are copied to 3 channels) and
compare query features with support prototypes by cosine similarity × ``scaler`` (20 in all three
papers). They differ in the prototypes and the decision:

- **PANet** (Wang et al., ICCV 2019): one foreground and one background prototype per support slice
  by masked average pooling of the features upsampled (bilinear) to the mask's size, averaged over
  the shots; logits [bg, fg] = scaled cosine; prototype alignment (PAR): the query's predicted
  masks give query prototypes that must segment the support (cross-entropy), skipped when the
  query prediction has no foreground.
- **SSL-ALPNet** (Ouyang et al., ECCV 2020): masks are brought to the feature grid (bilinear);
  adaptive local prototypes are the average-pooled feature windows (``window`` × ``window``; 4 in
  training on the 32 × 32 feature map, 2 at test time) whose pooled mask exceeds ``thresh`` (0.95);
  the background uses local prototypes only, the foreground local ones and its global prototype
  (or the global one alone when no 4 × 4 window of the mask reaches the threshold); the class score
  is Σ softmax(d) · d over the class's prototype similarities d. Alignment as PANet, always on.
- **ADNet** (Hansen et al., MedIA 2022): one foreground prototype (masked average pooling as
  PANet); anomaly score S = −scaler · cos(f, p); foreground probability p = 1 − σ(0.5 (S − t))
  with a learned threshold t (initialised at −10); loss terms: the query's weighted NLL, the
  alignment loss (NLL, skipped when no foreground is predicted) and t / scaler.

Deviation (documented switch-free because the released code has no defined behaviour there): when
no local window passes the threshold (a tiny or absent class), SSL-ALPNet's released code fails on an
empty prototype set (training skips the episode, evaluation crashes); here the class falls back to
its global prototype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SCALER = 20.0
EPS_MASK = 1e-5  # masked average pooling denominator (all three released codes)


class Encoder(nn.Module):
    """backbone -> 1x1 conv (no bias) to ``feat_dim`` channels. Input [N, 1 or 3, H, W]."""

    def __init__(self, backbone: nn.Module, feat_dim: int = 256):
        super().__init__()
        self.backbone = backbone
        self.localconv = nn.Conv2d(backbone.out_channels, feat_dim, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.localconv(self.backbone(x))


def masked_average(feats: torch.Tensor, masks: torch.Tensor, upsample: bool = True) -> torch.Tensor:
    """Masked average pooling: [N, C, h, w] features, [N, H, W] masks -> [N, C] prototypes.
    ``upsample``: features resized (bilinear) to the masks' size (PANet, ADNet); else masks
    resized to the features' (SSL-ALPNet)."""
    if upsample:
        if feats.shape[-2:] != masks.shape[-2:]:
            feats = F.interpolate(feats, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    elif masks.shape[-2:] != feats.shape[-2:]:
        masks = F.interpolate(masks[:, None], size=feats.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (feats * masks[:, None]).sum(dim=(2, 3)) / (masks.sum(dim=(1, 2))[:, None] + EPS_MASK)


def cosine_map(feats: torch.Tensor, protos: torch.Tensor, scaler: float = SCALER, eps: float = 1e-8) -> torch.Tensor:
    """[Q, C, h, w] features, [P, C] prototypes -> [Q, P, h, w] scaled cosine similarities."""
    f = feats / feats.norm(dim=1, keepdim=True).clamp_min(eps)
    p = protos / protos.norm(dim=1, keepdim=True).clamp_min(eps)
    return torch.einsum("qchw,pc->qphw", f, p) * scaler


def local_prototypes(feats: torch.Tensor, masks_lr: torch.Tensor, window: int, thresh: float) -> torch.Tensor:
    """SSL-ALPNet's adaptive local prototypes: the ``window`` × ``window`` average-pooled feature
    cells of [K, C, h, w] whose pooled [K, h, w] mask (on the feature grid) exceeds ``thresh`` -> [P, C]."""
    pf = F.avg_pool2d(feats, window)
    pm = F.avg_pool2d(masks_lr[:, None], window)[:, 0]
    return pf.permute(0, 2, 3, 1)[pm > thresh]


def alp_score(q_feats: torch.Tensor, protos: torch.Tensor, scaler: float = SCALER) -> torch.Tensor:
    """Σ_p softmax_p(d) · d_p over the similarities d [Q, P, h, w] -> [Q, 1, h, w]."""
    d = cosine_map(q_feats, protos, scaler, eps=1e-4)
    return (F.softmax(d, dim=1) * d).sum(dim=1, keepdim=True)


class PrototypeNet(nn.Module):
    """What the three share: the encoder, and episodes of K shots and Q queries.

    Subclasses implement :meth:`logits` ([Q, 2, h, w] on the feature grid, bg / fg; ADNet returns
    probabilities as its two "logit" channels are [1 − p, p]) and :meth:`align_loss`."""

    probabilities = False  # True: logits() returns [1 − p, p] (ADNet), else scores for a softmax

    def __init__(self, encoder: Encoder, scaler: float = SCALER):
        super().__init__()
        self.encoder = encoder
        self.scaler = float(scaler)

    def logits(self, s_feats, s_masks, q_feats):  # pragma: no cover - abstract
        raise NotImplementedError

    def fg_probability(self, s_img: torch.Tensor, s_msk: torch.Tensor, q_img: torch.Tensor) -> torch.Tensor:
        """Model-size tensors [K, 1, S, S], [K, 1, S, S], [Q, 1, S, S] -> [Q, S, S] foreground probability."""
        feats = self.encoder(torch.cat([s_img, q_img]))
        k = s_img.shape[0]
        return self.probability(self.logits(feats[:k], s_msk[:, 0], feats[k:]), q_img.shape[-2:])

    def probability(self, out: torch.Tensor, size) -> torch.Tensor:
        """[Q, 2, h, w] of :meth:`logits` -> [Q, H, W] foreground probability at ``size``."""
        up = self.upsample(out, size)
        return up[:, 1] if self.probabilities else F.softmax(up, dim=1)[:, 1]

    def upsample(self, out: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)

    def episode_loss(self, s_img, s_msk, q_img, q_msk, bg_weight: float, align: bool) -> tuple[torch.Tensor, dict]:
        """Loss of B episodes: [B·K, 1, S, S] supports, [B, 1, S, S] queries (one query per episode)."""
        b = q_img.shape[0]
        k = s_img.shape[0] // b
        feats = self.encoder(torch.cat([s_img, q_img]))
        s_f, q_f = feats[:b * k], feats[b * k:]
        size = q_img.shape[-2:]
        weight = torch.tensor([bg_weight, 1.0], device=q_img.device)
        query, aligned = [], []
        for i in range(b):
            sf, sm = s_f[i * k:(i + 1) * k], s_msk[i * k:(i + 1) * k, 0]
            out = self.logits(sf, sm, q_f[i:i + 1])
            target = q_msk[i:i + 1, 0].long()
            query.append(self.query_loss(self.upsample(out, size), target, weight))
            if align:
                aligned.append(self.align_loss(q_f[i:i + 1], out, sf, sm))
        parts = {"query": torch.stack(query).mean()}
        if align:
            parts["align"] = torch.stack(aligned).mean()
        return sum(parts.values()), parts

    def query_loss(self, up: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.probabilities:
            eps = torch.finfo(torch.float32).eps
            return F.nll_loss(torch.log(up.clamp(eps, 1 - eps)), target, weight=weight)
        return F.cross_entropy(up, target, weight=weight)

    def align_loss(self, q_feats, out, s_feats, s_masks):  # pragma: no cover - abstract
        raise NotImplementedError


class PANet(PrototypeNet):
    """PANet: global foreground / background prototypes, scaled cosine logits, PAR."""

    def prototypes(self, feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """[K, C, h, w], [K, H, W] -> [2, C]: background and foreground, averaged over the shots."""
        fg = masked_average(feats, masks).mean(dim=0)
        bg = masked_average(feats, 1.0 - masks).mean(dim=0)
        return torch.stack([bg, fg])

    def logits(self, s_feats, s_masks, q_feats):
        return cosine_map(q_feats, self.prototypes(s_feats, s_masks), self.scaler)

    def align_loss(self, q_feats, out, s_feats, s_masks):
        pred = out.argmax(dim=1)  # [1, h, w] on the feature grid
        fg = (pred == 1).float()
        if fg.sum() == 0:
            return out.sum() * 0.0
        q_protos = torch.stack([masked_average(q_feats, 1.0 - fg)[0], masked_average(q_feats, fg)[0]])
        s_out = self.upsample(cosine_map(s_feats, q_protos, self.scaler), s_masks.shape[-2:])
        return F.cross_entropy(s_out, s_masks.long())


class ALPNet(PrototypeNet):
    """SSL-ALPNet: adaptive local prototypes (see the module docstring)."""

    def __init__(self, encoder: Encoder, scaler: float = SCALER, window: int = 4, window_eval: int = 2,
                 fg_thresh: float = 0.95, bg_thresh: float = 0.95, fg_check_window: int = 4):
        super().__init__(encoder, scaler)
        self.window, self.window_eval = int(window), int(window_eval)
        self.fg_thresh, self.bg_thresh = float(fg_thresh), float(bg_thresh)
        self.fg_check_window = int(fg_check_window)

    def class_score(self, q_feats, s_feats, masks_lr, thresh: float, with_global: bool) -> torch.Tensor:
        """[Q, 1, h, w] score of one class whose support masks are ``masks_lr`` [K, h, w] on the feature grid."""
        glob = masked_average(s_feats, masks_lr, upsample=False)  # [K, C]
        if with_global and self.fg_check_window and \
                F.avg_pool2d(masks_lr[:, None], self.fg_check_window).max() < self.fg_thresh:
            return cosine_map(q_feats, glob.mean(dim=0, keepdim=True), self.scaler, eps=1e-4)  # "mask" mode
        window = self.window if self.training else self.window_eval
        protos = local_prototypes(s_feats, masks_lr, window, thresh)
        if with_global:
            protos = torch.cat([protos, glob])
        if protos.shape[0] == 0:  # no window passes: the global prototype (see the module docstring)
            return cosine_map(q_feats, glob.mean(dim=0, keepdim=True), self.scaler, eps=1e-4)
        return alp_score(q_feats, protos, self.scaler)

    def logits(self, s_feats, s_masks, q_feats):
        fg_lr = F.interpolate(s_masks[:, None], size=s_feats.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        bg = self.class_score(q_feats, s_feats, 1.0 - fg_lr, self.bg_thresh, with_global=False)
        fg = self.class_score(q_feats, s_feats, fg_lr, self.fg_thresh, with_global=True)
        return torch.cat([bg, fg], dim=1)

    def align_loss(self, q_feats, out, s_feats, s_masks):
        pred = out.argmax(dim=1).float()  # [1, h, w]
        s_out = self.logits(q_feats, pred, s_feats)  # the query as support, the supports as queries
        s_out = self.upsample(s_out, s_masks.shape[-2:])
        return F.cross_entropy(s_out, s_masks.long())


class ADNet(PrototypeNet):
    """ADNet: one foreground prototype, anomaly scores, a learned threshold t."""

    probabilities = True

    def __init__(self, encoder: Encoder, scaler: float = SCALER, t_init: float = -10.0, t_loss_scaler: float = 1.0):
        super().__init__(encoder, scaler)
        self.t = nn.Parameter(torch.tensor([float(t_init)]))
        self.t_loss_scaler = float(t_loss_scaler)

    def fg_map(self, q_feats, proto) -> torch.Tensor:
        """[Q, C, h, w], [1, C] -> [Q, 1, h, w] foreground probability 1 − σ(0.5 (S − t))."""
        s = -cosine_map(q_feats, proto, self.scaler)
        return 1.0 - torch.sigmoid(0.5 * (s - self.t))

    def logits(self, s_feats, s_masks, q_feats):
        p = self.fg_map(q_feats, masked_average(s_feats, s_masks).mean(dim=0, keepdim=True))
        return torch.cat([1.0 - p, p], dim=1)

    def upsample(self, out, size):
        return F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=True)

    def align_loss(self, q_feats, out, s_feats, s_masks):
        fg = (out.argmax(dim=1) == 1).float()
        if fg.sum() == 0:
            return out.sum() * 0.0
        p = self.fg_map(s_feats, masked_average(q_feats, fg))
        up = self.upsample(torch.cat([1.0 - p, p], dim=1), s_masks.shape[-2:])
        eps = torch.finfo(torch.float32).eps
        return F.nll_loss(torch.log(up.clamp(eps, 1 - eps)), s_masks.long())

    def episode_loss(self, s_img, s_msk, q_img, q_msk, bg_weight: float, align: bool):
        total, parts = super().episode_loss(s_img, s_msk, q_img, q_msk, bg_weight, align)
        parts["threshold"] = self.t_loss_scaler * (self.t / self.scaler).sum()
        return total + parts["threshold"], parts


MODELS = {"panet": PANet, "alpnet": ALPNet, "adnet": ADNet}

__all__ = ["Encoder", "PANet", "ALPNet", "ADNet", "PrototypeNet", "MODELS", "masked_average", "cosine_map",
           "local_prototypes", "alp_score", "SCALER"]
