"""Visual-to-Textual Condition Translator (VTCT): support features -> one implicit text token.

1. patch features of each support image from a frozen, pluggable encoder;
2. the support mask resized to the patch grid and binarised at 0.5, image and mask cropped
   identically; a foreground too small to cover one cell falls back to the soft (unbinarised)
   mask, never to a silent zero vector;
3. masked average pooling per shot, mean over shots;
4. an MLP (LayerNorm + GELU between layers) -> ONE token ``[B, 1, D]`` used as
   ``encoder_hidden_states`` for both UNet passes.

Encoders: ``dinov2`` (a local transformers folder, frozen), ``clip`` (open_clip, optional
extra, frozen), ``none`` (a small trainable convolutional encoder, no pretrained weights).

Preprocessing of a pretrained (224 px) encoder's input, ``model.vtct_crop``:

- ``aligned`` (default): image bicubic to 256 px, centre crop 224 (the DINOv2 processor's
  path); the mask resized (bilinear) to 256 and cropped the same way, so that mask cell and
  patch cover the same pixels;
- ``released``: the released code's path: the image as the processor takes a float image
  (×255, truncated to uint8, ÷255; bicubic to 256; centre crop 224) and the mask resized
  (bilinear, align_corners=False) straight to the patch grid from the UNCROPPED image, binarised
  at > 0.5, masked mean Σ(f·m) / (Σm + 1e-6) (an empty mask gives a zero vector): mask cell
  (r, c) covers pixels 16r..16r+15 of the 256 grid while patch (r, c) covers 16+14r..29+14r;
- ``resize``: the whole image resized to 224, the mask pooled over the whole image (aligned,
  no crop).

The ``none`` encoder sees the image at the model's size whatever the switch.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoV2Encoder(nn.Module):
    """Frozen DINOv2 patch tokens ([N, C, g, g]; g = 16 at 224 px)."""

    trainable = False

    def __init__(self, path: str | Path, size: int = 224):
        super().__init__()
        from transformers import Dinov2Model

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a DINOv2 folder (config.json missing); "
                                    "give model.vtct_encoder_path a local transformers folder")
        self.model, self.loading_info = Dinov2Model.from_pretrained(str(path), local_files_only=True,
                                                                    output_loading_info=True)
        self.model.requires_grad_(False).eval()
        self.size = size
        self.out_dim = self.model.config.hidden_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images01, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        with torch.no_grad():
            tokens = self.model(pixel_values=x).last_hidden_state
        patch = self.model.config.patch_size
        g = self.size // patch
        tokens = tokens[:, -g * g:]  # drop CLS (and register tokens, if any)
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, g, g)


class ClipEncoder(nn.Module):
    """Frozen open_clip image tower patch tokens (optional extra: pip install '.[clip]')."""

    trainable = False

    def __init__(self, model_name: str, pretrained_path: str | Path, size: int = 224):
        super().__init__()
        try:
            import open_clip
        except Exception as exc:  # open_clip needs torchvision, absent beside the CPU torch
            raise ImportError("model.vtct_encoder=clip needs open_clip_torch (pip install '.[clip]', "
                              f"which needs a working torchvision): {exc}") from exc
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(pretrained_path))
        self.visual = model.visual.requires_grad_(False).eval()
        self.visual.output_tokens = True
        self.size = size
        self.out_dim = self.visual.transformer.width
        self.register_buffer("mean", torch.tensor((0.4815, 0.4578, 0.4082)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor((0.2686, 0.2613, 0.2758)).view(1, 3, 1, 1), persistent=False)

    def forward(self, images01):
        x = F.interpolate(images01, size=(self.size, self.size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            _, tokens = self.visual((x - self.mean) / self.std)
        g = int(round(tokens.shape[1] ** 0.5))
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, g, g)


class ConvEncoder(nn.Module):
    """Self-contained fallback: a small trainable CNN (stride 8 feature grid)."""

    trainable = True

    def __init__(self, out_dim: int = 128, width: int = 32):
        super().__init__()
        self.out_dim = out_dim
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.GroupNorm(8, width), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.GroupNorm(8, 2 * width), nn.GELU(),
            nn.Conv2d(2 * width, out_dim, 3, 2, 1),
        )

    def forward(self, images01):
        return self.net(images01 * 2 - 1)


def masked_pooling(features: torch.Tensor, masks: torch.Tensor, n_shot: int) -> torch.Tensor:
    """features [B·K, C, g, g], masks [B·K, 1, H, W] in {0,1} -> [B, C].

    Binarised mask on the grid; where a shot's binarised mask is empty, its soft (area-resized)
    mask is used instead."""
    g = features.shape[-2:]
    soft = F.adaptive_avg_pool2d(masks.float(), g)
    hard = (soft >= 0.5).to(features.dtype)
    if bool((soft.sum((1, 2, 3)) == 0).any()):
        raise ValueError("VTCT: a support mask is empty; every support shot needs some foreground")
    empty = hard.sum((1, 2, 3)) == 0
    weights = torch.where(empty[:, None, None, None], soft.to(features.dtype), hard)
    pooled = (features * weights).sum((2, 3)) / weights.sum((2, 3)).clamp_min(1e-6)
    return pooled.view(-1, n_shot, pooled.shape[-1]).mean(1)


class VTCTMlp(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden: int = 1536, depth: int = 3):
        super().__init__()
        layers, d = [], in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.GELU()]
            d = hidden
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


CROP_MODES = ("aligned", "released", "resize")
PROCESSOR_RESIZE = 256  # the DINOv2 processor: shortest edge to 256 (bicubic), then centre crop 224


def centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def crop_inputs(images01: torch.Tensor, masks: torch.Tensor, size: int, mode: str):
    """The encoder's input images [N, 3, size, size] and the masks to pool with (see the module
    docstring): aligned -> masks cropped like the image; released -> the uncropped masks."""
    if mode == "resize":
        return images01, masks
    if mode == "released":
        images01 = torch.floor(images01 * 255.0) / 255.0  # the processor's uint8 round trip (truncation)
    big = PROCESSOR_RESIZE
    if images01.shape[-2:] != (big, big):
        images01 = F.interpolate(images01, size=(big, big), mode="bicubic", align_corners=False).clamp(0, 1)
    images01 = centre_crop(images01, size)
    if mode == "aligned":
        if masks.shape[-2:] != (big, big):
            masks = F.interpolate(masks.float(), size=(big, big), mode="bilinear", align_corners=False)
        masks = centre_crop(masks, size)
    return images01, masks


def released_pooling(features: torch.Tensor, masks: torch.Tensor, n_shot: int) -> torch.Tensor:
    """The released masked mean: masks bilinearly resized (align_corners=False) straight to the grid,
    binarised at > 0.5, Σ(f·m) / (Σm + 1e-6) per shot, mean over shots (an empty mask: zeros)."""
    g = features.shape[-2:]
    m = (F.interpolate(masks.float(), size=g, mode="bilinear", align_corners=False) > 0.5).to(features.dtype)
    pooled = (features * m).sum((2, 3)) / (m.sum((2, 3)) + 1e-6)
    return pooled.view(-1, n_shot, pooled.shape[-1]).mean(1)


class VTCT(nn.Module):
    def __init__(self, encoder: nn.Module, cross_attention_dim: int, hidden: int = 1536, depth: int = 3,
                 crop: str = "aligned"):
        super().__init__()
        if crop not in CROP_MODES:
            raise ValueError(f"model.vtct_crop must be one of {CROP_MODES}, got {crop!r}")
        self.encoder = encoder
        self.crop = crop
        self.mlp = VTCTMlp(encoder.out_dim, cross_attention_dim, hidden, depth)

    def forward(self, support_images01: torch.Tensor, support_masks: torch.Tensor, n_shot: int) -> torch.Tensor:
        """support_images01 [B·K, 3, H, W] in [0, 1], support_masks [B·K, 1, H, W] -> [B, 1, D]."""
        size = None if getattr(self.encoder, "trainable", True) else getattr(self.encoder, "size", None)
        masks = support_masks
        if size is not None:
            support_images01, masks = crop_inputs(support_images01, support_masks, size, self.crop)
        feats = self.encoder(support_images01)
        if feats.dtype in (torch.float16, torch.bfloat16):
            feats = feats.float()  # pool in fp32
        if size is not None and self.crop == "released":
            pooled = released_pooling(feats, masks.to(feats.dtype), n_shot)
        else:
            pooled = masked_pooling(feats, masks.to(feats.dtype), n_shot)
        return self.mlp(pooled.to(next(self.mlp.parameters()).dtype))[:, None, :]


def build_encoder(kind: str, path: str | None = None, out_dim: int = 128, clip_model: str = "ViT-B-16"):
    if kind == "dinov2":
        if not path:
            raise ValueError("model.vtct_encoder=dinov2 needs model.vtct_encoder_path (a local DINOv2 folder)")
        return DinoV2Encoder(path)
    if kind == "clip":
        if not path:
            raise ValueError("model.vtct_encoder=clip needs model.vtct_encoder_path (a local open_clip checkpoint)")
        return ClipEncoder(clip_model, path)
    if kind == "none":
        return ConvEncoder(out_dim)
    raise ValueError(f"unknown model.vtct_encoder {kind!r} (dinov2 | clip | none)")
