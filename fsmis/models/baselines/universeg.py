"""UniverSeg (Butoi et al., ICCV 2023, "UniverSeg: Universal Medical Image Segmentation").

A UNet whose every block is a CrossBlock: the target feature map is paired with each support entry
(image and label stacked as channels), one convolution runs over each [target | support] pair, the
target takes the mean of the S pair features (so the network is invariant to the order of the
support set and accepts any S >= 1) and the support entries keep theirs; then a conv + LeakyReLU on
each side. Max-pooling down, bilinear (align_corners=True) up, skip connections concatenated after
the upsampled features, a 1x1 output conv -> logits ``[B, 1, H, W]``.

Key layout: the module tree, hence the state_dict keys and shapes, follows the official code so that
the published ``universeg_v1_nf64_ss64_STA.pt`` (a plain state_dict) loads strictly into
:func:`universeg_v1`: repository ``JJGO/UniverSeg``, ``universeg/model.py`` (commit 62de02eb;
``ConvOp``, ``CrossOp``, ``CrossBlock``, ``UniverSeg``) with ``universeg/nn/cross_conv.py`` and
``universeg/nn/vmap.py`` (commit 6d6b266d). Keys::

    enc_blocks.{i}.cross.cross_conv.{weight,bias}       conv over [target | support] channels
    enc_blocks.{i}.target.vmapped.conv.{weight,bias}    conv + LeakyReLU on the target
    enc_blocks.{i}.support.vmapped.conv.{weight,bias}   conv + LeakyReLU on each support entry
    dec_blocks.{i}....                                  the same for the decoder
    out_conv.conv.{weight,bias}                         1x1 conv -> 1 logit channel

Channel order inside the cross convolution (it matters for the published weights): target channels
first, then support channels; the support is [image, label]; in the decoder each side is
[upsampled, skip]. The cross convolution is computed here as W_t * target + W_s * support + b (the
same linear map as the official conv over the repeated, concatenated pair, but the target half runs
once instead of S times, which matters on a CPU).

Published configuration: encoder_blocks [64, 64, 64, 64], decoder [64, 64, 64], 128 x 128 inputs,
1,182,785 parameters. Small CPU configurations: ``universeg_from_config({"encoder_blocks": [16, 16,
16]})``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..weights import ComponentLoad, WeightLoadError

PUBLISHED_FILE = "universeg_v1_nf64_ss64_STA.pt"
V1_ENCODER_BLOCKS = (64, 64, 64, 64)
V1_PARAMS = 1_182_785
CONFIG_KEYS = ("encoder_blocks", "decoder_blocks")
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
IMAGE_CHANNELS, LABEL_CHANNELS, OUT_CHANNELS = 1, 1, 1


def _init_conv(conv: nn.Conv2d, nonlinearity: str) -> None:
    """Kaiming-normal weights (gain of the following nonlinearity), zero bias: the official init."""
    nn.init.kaiming_normal_(conv.weight, nonlinearity=nonlinearity)
    nn.init.zeros_(conv.bias)


class _ConvAct(nn.Module):
    """conv (same padding) + optional LeakyReLU; key ``conv`` as the official ``ConvOp``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
        self.act = act
        _init_conv(self.conv, "leaky_relu" if act else "linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.leaky_relu(x) if self.act else x


class _PerEntry(nn.Module):
    """Applies a 2D module to each entry of a ``[B, S, C, H, W]`` stack (key ``vmapped``)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.vmapped = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s = x.shape[:2]
        y = self.vmapped(x.flatten(0, 1))
        return y.unflatten(0, (b, s))


class _PairConv(nn.Module):
    """One conv over every [target | support entry] pair -> (target: mean over pairs, pairs).

    ``cross_conv`` holds the official ``CrossConv2d`` weight [out, Ct + Cs, k, k]; no nonlinearity
    (the official model builds its CrossOps with ``nonlinearity=None``)."""

    def __init__(self, target_ch: int, support_ch: int, out_ch: int, kernel_size: int = 3):
        super().__init__()
        self.target_ch = target_ch
        self.cross_conv = nn.Conv2d(target_ch + support_ch, out_ch, kernel_size, padding=kernel_size // 2)
        _init_conv(self.cross_conv, "linear")

    def forward(self, target: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # target [B, 1, Ct, H, W], support [B, S, Cs, H, W]
        b, s = support.shape[:2]
        w, pad = self.cross_conv.weight, self.cross_conv.padding
        t = F.conv2d(target[:, 0], w[:, :self.target_ch], self.cross_conv.bias, padding=pad)
        u = F.conv2d(support.flatten(0, 1), w[:, self.target_ch:], None, padding=pad)
        pairs = u.unflatten(0, (b, s)) + t.unsqueeze(1)  # [B, S, Co, H, W]
        return pairs.mean(dim=1, keepdim=True), pairs


class _CrossBlock(nn.Module):
    """Official ``CrossBlock``: pair conv, then conv + LeakyReLU on target and support separately."""

    def __init__(self, target_ch: int, support_ch: int, cross_ch: int, conv_ch: int):
        super().__init__()
        self.cross = _PairConv(target_ch, support_ch, cross_ch)
        self.target = _PerEntry(_ConvAct(cross_ch, conv_ch))
        self.support = _PerEntry(_ConvAct(cross_ch, conv_ch))

    def forward(self, target: torch.Tensor, support: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target, support = self.cross(target, support)
        return self.target(target), self.support(support)


def _pairs(blocks, what: str) -> list[tuple[int, int]]:
    """[n | (cross, conv), ...] -> [(cross, conv), ...]; n means (n, n) as in the official code."""
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
        raise ValueError(f"{what} must be a non-empty list of ints or (cross, conv) pairs, got {blocks!r}")
    def is_count(c) -> bool:
        return isinstance(c, int) and not isinstance(c, bool) and c > 0

    out = []
    for b in blocks:
        pair = (b, b) if is_count(b) else tuple(b) if isinstance(b, (list, tuple)) else ()
        if len(pair) != 2 or not all(map(is_count, pair)):
            raise ValueError(f"{what}: each entry must be a positive int or a (cross, conv) pair, got {b!r}")
        out.append(pair)
    return out


class UniverSeg(nn.Module):
    """UniverSeg: (target image, support images, support labels) -> target logits.

    ``encoder_blocks``: channels per resolution level (an int n, or a (cross, conv) pair);
    ``decoder_blocks``: one fewer entry, default the encoder's reversed without its deepest level.
    Inputs: H and W divisible by 2 ** (levels - 1)."""

    def __init__(self, encoder_blocks: Sequence = V1_ENCODER_BLOCKS, decoder_blocks: Sequence | None = None):
        super().__init__()
        enc = _pairs(encoder_blocks, "encoder_blocks")
        dec = _pairs(decoder_blocks, "decoder_blocks") if decoder_blocks is not None else enc[-2::-1]
        if len(dec) != len(enc) - 1:
            raise ValueError(f"decoder_blocks needs {len(enc) - 1} entries (one per skip connection) for "
                             f"{len(enc)} encoder blocks, got {len(dec)}")
        self.encoder_blocks = [list(p) for p in enc]
        self.decoder_blocks = [list(p) for p in dec]
        self.enc_blocks = nn.ModuleList()
        self.dec_blocks = nn.ModuleList()
        t_ch, s_ch = IMAGE_CHANNELS, IMAGE_CHANNELS + LABEL_CHANNELS
        skips = []
        for cross_ch, conv_ch in enc:
            self.enc_blocks.append(_CrossBlock(t_ch, s_ch, cross_ch, conv_ch))
            t_ch = s_ch = conv_ch
            skips.append(conv_ch)
        for (cross_ch, conv_ch), skip in zip(dec, skips[-2::-1]):
            self.dec_blocks.append(_CrossBlock(t_ch + skip, s_ch + skip, cross_ch, conv_ch))
            t_ch = s_ch = conv_ch
        self.out_conv = _ConvAct(t_ch, OUT_CHANNELS, kernel_size=1, act=False)

    @property
    def config(self) -> dict:
        """The arguments that rebuild this architecture (:func:`universeg_from_config`)."""
        return {"encoder_blocks": [list(p) for p in self.encoder_blocks],
                "decoder_blocks": [list(p) for p in self.decoder_blocks]}

    def _check(self, target_image, support_images, support_labels) -> None:
        if target_image.ndim != 4 or target_image.shape[1] != IMAGE_CHANNELS:
            raise ValueError(f"target_image must be [B, 1, H, W], got {tuple(target_image.shape)}")
        b, _, h, w = target_image.shape
        for name, x in (("support_images", support_images), ("support_labels", support_labels)):
            if x.ndim != 5 or x.shape[0] != b or x.shape[1] < 1 or x.shape[2] != 1 or tuple(x.shape[3:]) != (h, w):
                raise ValueError(f"{name} must be [B, S, 1, H, W] with B={b}, S >= 1, H, W = {h}, {w}; "
                                 f"got {tuple(x.shape)}")
        if support_images.shape[1] != support_labels.shape[1]:
            raise ValueError(f"support_images and support_labels differ in S: {support_images.shape[1]} vs "
                             f"{support_labels.shape[1]}")
        k = 2 ** (len(self.enc_blocks) - 1)
        if h % k or w % k:
            raise ValueError(f"H and W ({h}, {w}) must be divisible by {k} ({len(self.enc_blocks)} levels)")

    def forward(self, target_image: torch.Tensor, support_images: torch.Tensor,
                support_labels: torch.Tensor) -> torch.Tensor:
        """[B, 1, H, W], [B, S, 1, H, W], [B, S, 1, H, W] -> logits [B, 1, H, W]."""
        self._check(target_image, support_images, support_labels)
        target = target_image.unsqueeze(1)  # [B, 1, 1, H, W]
        support = torch.cat([support_images, support_labels.to(support_images.dtype)], dim=2)
        skips = []
        for i, block in enumerate(self.enc_blocks):
            target, support = block(target, support)
            if i < len(self.enc_blocks) - 1:
                skips.append((target, support))
                target, support = _per_entry(F.max_pool2d, target, 2), _per_entry(F.max_pool2d, support, 2)
        for block in self.dec_blocks:
            t_skip, s_skip = skips.pop()
            target = torch.cat([_per_entry(_up2, target), t_skip], dim=2)
            support = torch.cat([_per_entry(_up2, support), s_skip], dim=2)
            target, support = block(target, support)
        return self.out_conv(target[:, 0])


def _up2(x: torch.Tensor) -> torch.Tensor:
    """nn.UpsamplingBilinear2d(scale_factor=2) of the official model (align_corners=True)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def _per_entry(fn, x: torch.Tensor, *args) -> torch.Tensor:
    b, s = x.shape[:2]
    return fn(x.flatten(0, 1), *args).unflatten(0, (b, s))


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------


def universeg_v1() -> UniverSeg:
    """The published architecture (``universeg_v1_nf64_ss64_STA.pt``): 4 levels of 64 channels."""
    return UniverSeg(encoder_blocks=V1_ENCODER_BLOCKS)


def universeg_from_config(config: Mapping | None = None) -> UniverSeg:
    """A UniverSeg from the project's config dict (keys ``encoder_blocks``, ``decoder_blocks``; an
    absent ``encoder_blocks`` means the published [64, 64, 64, 64]). Unknown keys are refused so that
    a typo does not silently build the published network."""
    config = dict(config or {})
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown UniverSeg config key(s) {unknown}; expected {list(CONFIG_KEYS)}")
    enc = config.get("encoder_blocks")
    return UniverSeg(encoder_blocks=V1_ENCODER_BLOCKS if enc is None else enc,
                     decoder_blocks=config.get("decoder_blocks"))


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------


def _read_state_dict(path: Path) -> dict:
    """A local weight file -> its flat state_dict, without unpickling arbitrary objects."""
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise WeightLoadError(f"{path}: unsupported weight file type {path.suffix!r} ({', '.join(WEIGHT_SUFFIXES)})")
    if not path.is_file():
        raise WeightLoadError(f"{path}: no such file")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated / corrupt file, or a pickle of more than tensors
        raise WeightLoadError(f"{path}: cannot read the weights (truncated, corrupt, or it pickles more than "
                              f"tensors): {type(exc).__name__}: {exc}") from exc
    for _ in range(3):  # {"state_dict": {...}}, {"model": {...}}, or both nested
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in ("state_dict", "model") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightLoadError(f"{path}: expected a state_dict (or one under 'state_dict' / 'model'), "
                              f"got {type(obj).__name__}")
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise WeightLoadError(f"{path}: {len(not_tensors)} entr(y/ies) of the state_dict are not tensors: "
                              f"{_head(not_tensors)}")
    return dict(obj)


def _head(keys, n: int = 5) -> str:
    keys = list(keys)
    more = f", ... ({len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    eq = a == b
    if a.is_floating_point():
        eq = eq | (a.isnan() & b.isnan())
    return bool(eq.all())


def load_universeg_weights(model: UniverSeg, path: str | Path) -> ComponentLoad:
    """Load a local UniverSeg weight file (``.pt``/``.pth`` via ``torch.load(weights_only=True)``, or
    ``.safetensors``) strictly into ``model``: every key of the model with its shape, nothing else.
    Any problem raises :class:`~fsmis.models.weights.WeightLoadError` naming the file and the keys.
    After loading, every tensor is compared with the file's (cast to the model's dtype)."""
    path = Path(path).expanduser()
    sd = _read_state_dict(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    row = ComponentLoad("universeg", source=str(path), pretrained=True, loaded=0, expected=len(expected),
                        params=n_params)
    row.file_dtype = "/".join(sorted({str(v.dtype).replace("torch.", "") for v in sd.values()}))
    row.missing = sorted(set(expected) - set(sd))
    row.unexpected = sorted(set(sd) - set(expected))
    row.mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}"
                      for k in sorted(set(expected) & set(sd)) if tuple(sd[k].shape) != expected[k]]
    if row.missing or row.unexpected or row.mismatched:
        raise WeightLoadError(f"{path}: does not match the UniverSeg model "
                              f"(encoder_blocks={model.encoder_blocks}): {row.problems()}", row)
    try:
        model.load_state_dict(sd, strict=True)
    except Exception as exc:
        raise WeightLoadError(f"{path}: load_state_dict failed: {type(exc).__name__}: {exc}", row) from exc
    after = model.state_dict()
    differ = sorted(k for k, v in after.items()
                    if not _same(v.detach().cpu(), sd[k].to(dtype=v.dtype)))
    row.loaded = len(expected) - len(differ)
    if differ:
        raise WeightLoadError(f"{path}: {len(differ)} tensor(s) differ from the file after loading: "
                              f"{_head(differ)}", row)
    row.notes.append(f"all {row.loaded} tensors equal to the file's ({n_params} parameters)")
    return row
