"""CNN backbones of the prototype-based baselines (PANet, SSL-ALPNet, ADNet), without torchvision.

``resnet101`` / ``resnet50`` are torchvision's ResNet v1.5 bottleneck trunks (no ``avgpool``, no ``fc``)
with the DeepLabV3 dilation ``replace_stride_with_dilation=[False, True, True]``: output stride 8,
2048 channels. Their ``state_dict()`` names and shapes are torchvision's, so the backbone of the
MS-COCO DeepLabV3 checkpoint (``deeplabv3_resnet101_coco``, keys ``backbone.*``) loads into them
strictly through :func:`fsmis.models.weights.load_backbone_weights`. ``small`` is a BasicBlock ResNet
with the same interface for CPU tests and the demo (random initialisation only).

Input: ``(B, 3, H, W)``; a medical slice is copied to 3 channels by the caller (docs/protocol.md §3).
Note on normalisation: the torchvision COCO / ImageNet weights were trained on RGB in [0, 1]
normalised with mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); the FSMIS baselines feed
per-volume z-scored slices instead (docs/protocol.md §3). The backbone itself does not normalise.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..weights import RANDOM_INIT, ComponentLoad, load_backbone_weights

__all__ = ["Bottleneck", "BasicBlock", "DilatedResNet", "ResNetTrunk", "SmallBackbone", "BACKBONES",
           "build_backbone"]

RESNET_LAYERS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
DEEPLAB_DILATION = (False, True, True)  # layer2 strided, layer3 / layer4 dilated: output stride 8


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv (``conv2``)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class BasicBlock(nn.Module):
    """Two 3x3 convs; unlike torchvision's BasicBlock it accepts dilation (the small backbone needs it)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class DilatedResNet(nn.Module):
    """A ResNet trunk (stem, ``layer1``..``layer4``) laid out and initialised as torchvision's.

    ``replace_stride_with_dilation[i]`` turns the stride 2 of ``layer{i+2}`` into dilation, by
    torchvision's rule: the first block of a dilated layer keeps the previous dilation (and gets
    stride 1), the following blocks use the doubled one. With (False, True, True) the 3x3 convs of
    layer3.0 / layer3.1+ / layer4.0 / layer4.1+ have dilation 1 / 2 / 2 / 4.

    ``forward(x)`` returns the ``layer4`` map; ``features(x)`` the four stage outputs.
    """

    def __init__(self, block: type[nn.Module], layers, widths, stem_width: int,
                 replace_stride_with_dilation=DEEPLAB_DILATION):
        super().__init__()
        if len(layers) != 4 or len(widths) != 4 or len(replace_stride_with_dilation) != 3:
            raise ValueError("a ResNet trunk has 4 stages (layers, widths) and 3 dilation switches")
        self.inplanes, self.dilation = stem_width, 1
        self.conv1 = nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        dilate = (False, *replace_stride_with_dilation)
        for i in range(4):
            setattr(self, f"layer{i + 1}", self._make_layer(block, widths[i], layers[i], 1 if i == 0 else 2,
                                                            dilate[i]))
        self.out_channels = widths[3] * block.expansion
        self.output_stride = 4 * 2 ** sum(not d for d in replace_stride_with_dilation)
        del self.inplanes, self.dilation  # construction state only
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        out = [block(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * block.expansion
        out += [block(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = out[name] = getattr(self, name)(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)["layer4"]


class ResNetTrunk(DilatedResNet):
    """torchvision ``resnet50`` / ``resnet101`` without ``avgpool`` / ``fc``; DeepLabV3 dilation by default."""

    def __init__(self, depth: int = 101, replace_stride_with_dilation=DEEPLAB_DILATION):
        key = f"resnet{depth}"
        if key not in RESNET_LAYERS:
            raise ValueError(f"ResNet depth must be one of {sorted(int(k[6:]) for k in RESNET_LAYERS)}, got {depth}")
        super().__init__(Bottleneck, RESNET_LAYERS[key], (64, 128, 256, 512), 64, replace_stride_with_dilation)
        self.depth = depth


class SmallBackbone(DilatedResNet):
    """A narrow BasicBlock ResNet with the trunks' interface (output stride 8), for CPU tests and the
    demo; random initialisation only."""

    def __init__(self, widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1),
                 replace_stride_with_dilation=DEEPLAB_DILATION):
        super().__init__(BasicBlock, tuple(blocks), tuple(widths), widths[0], replace_stride_with_dilation)


BACKBONES = {"resnet101": lambda **kw: ResNetTrunk(101, **kw),
             "resnet50": lambda **kw: ResNetTrunk(50, **kw),
             "small": SmallBackbone}


def build_backbone(name: str, weights: str | Path | None = None, *, prefix: str = "backbone.",
                   ignore_prefixes=("classifier.", "aux_classifier."), **kw) -> nn.Module:
    """Backbone ``name`` (resnet101 | resnet50 | small), built with ``**kw``; with ``weights`` (a local
    ``.safetensors`` / ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` file) every trunk tensor is loaded
    strictly from the keys under ``prefix`` (default: the DeepLabV3 checkpoint layout; ``prefix=""``
    and ``ignore_prefixes=("fc.",)`` for a plain torchvision ResNet file).

    The load report (a :class:`~fsmis.models.weights.ComponentLoad` row, ``source=RANDOM_INIT``
    without weights) is attached as ``module.load_report``. Raises ValueError for an unknown name,
    :class:`~fsmis.models.weights.WeightLoadError` for a partial or mismatched file.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    module = BACKBONES[name](**kw)
    if weights is not None:
        report = load_backbone_weights(module, weights, prefix=prefix, ignore_prefixes=ignore_prefixes)
    else:
        report = ComponentLoad("backbone", source=RANDOM_INIT, pretrained=False, loaded=0,
                               expected=len(module.state_dict()), params=sum(p.numel() for p in module.parameters()))
        report.notes.append(f"{name}: randomly initialised (no weights file)")
    module.load_report = report
    return module
