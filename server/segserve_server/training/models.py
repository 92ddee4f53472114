"""Segmentation networks trained from scratch for the bundled demo models.

Two architectures, written with plain ``torch.nn`` (no torchvision):

* :func:`deeplabv3plus` -- DeepLabV3+ (Chen et al., 2018): a small ResNet-style
  backbone with output stride 16 (last stage dilated), an ASPP head with
  depthwise-separable atrous branches plus image pooling, and the usual
  stride-4 decoder that fuses low-level features.
* :func:`unet` -- a narrow U-Net (Ronneberger et al., 2015): four
  down-sampling levels of double 3x3 convolutions and a symmetric decoder with
  skip concatenations.

Both take a float32 NCHW image already normalised with the dataset mean/std and
return class logits (N, C, H, W) at the input resolution.  Any H, W work:
decoder stages resize to the exact size of their skip connection, so odd
feature-map sizes (e.g. 360 -> 45 -> 23) need no padding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ASPP",
    "MODELS",
    "BasicBlock",
    "DeepLabV3Plus",
    "UNet",
    "build_model",
    "conv_bn_relu",
    "deeplabv3plus",
    "init_weights",
    "resize_to",
    "sep_conv",
    "unet",
]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def conv_bn_relu(
    cin: int, cout: int, k: int = 3, stride: int = 1, dilation: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + ReLU with 'same' padding."""
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def sep_conv(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    """Depthwise-separable 3x3 conv: depthwise (dilated) + pointwise, each with BN+ReLU."""
    return nn.Sequential(
        conv_bn_relu(cin, cin, 3, dilation=dilation, groups=cin),
        conv_bn_relu(cin, cout, 1),
    )


def resize_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize ``x`` to the spatial size of ``ref``."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs) with an optional strided/dilated first conv."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin, cout, 3, stride, dilation)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(self.conv1(x))) + self.short(x), inplace=True)


def _stage(cin: int, cout: int, blocks: int, stride: int, dilation: int = 1) -> nn.Sequential:
    layers = [BasicBlock(cin, cout, stride, 1 if stride > 1 else dilation)]
    layers += [BasicBlock(cout, cout, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three separable atrous 3x3 and image pooling."""

    def __init__(self, cin: int, cout: int, rates: tuple[int, ...] = (4, 8, 12)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(cin, cout, 1)] + [sep_conv(cin, cout, r) for r in rates]
        )
        # No BatchNorm after global pooling: it would see a single value per
        # channel and sample, which is unstable at small batch sizes.
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True)
        )
        self.project = nn.Sequential(
            conv_bn_relu(cout * (len(rates) + 2), cout, 1), nn.Dropout2d(0.1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [b(x) for b in self.branches]
        feats.append(self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        out: torch.Tensor = self.project(torch.cat(feats, dim=1))
        return out


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ over a small ResNet-style backbone, output stride 16.

    Backbone strides: stem /2, stage1 /4 (low-level features), stage2 /8,
    stage3 /16, stage4 /16 with dilation 2.
    """

    def __init__(
        self,
        num_classes: int = 11,
        widths: tuple[int, int, int, int, int] = (24, 32, 64, 128, 192),
        blocks: tuple[int, int, int, int] = (1, 2, 2, 2),
        aspp_channels: int = 128,
        low_channels: int = 32,
        decoder_channels: int = 96,
    ) -> None:
        super().__init__()
        w0, w1, w2, w3, w4 = widths
        self.stem = conv_bn_relu(3, w0, 3, stride=2)
        self.stage1 = _stage(w0, w1, blocks[0], stride=2)
        self.stage2 = _stage(w1, w2, blocks[1], stride=2)
        self.stage3 = _stage(w2, w3, blocks[2], stride=2)
        self.stage4 = _stage(w3, w4, blocks[3], stride=1, dilation=2)
        self.aspp = ASPP(w4, aspp_channels)
        self.low = conv_bn_relu(w1, low_channels, 1)
        self.decoder = nn.Sequential(
            sep_conv(aspp_channels + low_channels, decoder_channels),
            sep_conv(decoder_channels, decoder_channels),
        )
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.stage1(self.stem(x))
        high = self.aspp(self.stage4(self.stage3(self.stage2(low))))
        y = torch.cat([resize_to(high, low), self.low(low)], dim=1)
        return resize_to(self.classifier(self.decoder(y)), x)


class UNet(nn.Module):
    """Narrow U-Net: double 3x3 convs, max-pool down, bilinear up + skip concat."""

    def __init__(
        self, num_classes: int = 11, widths: tuple[int, ...] = (16, 32, 64, 128, 192)
    ) -> None:
        super().__init__()
        self.down = nn.ModuleList()
        cin = 3
        for w in widths:
            self.down.append(nn.Sequential(conv_bn_relu(cin, w), conv_bn_relu(w, w)))
            cin = w
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.Sequential(conv_bn_relu(cin + w, w), conv_bn_relu(w, w)))
            cin = w
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = self.dropout(skips.pop())
        for block in self.up:
            skip = skips.pop()
            x = block(torch.cat([resize_to(x, skip), skip], dim=1))
        logits: torch.Tensor = self.classifier(x)
        return logits


def init_weights(model: ModuleT) -> ModuleT:
    """Kaiming-normal conv init, BN to identity; returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def deeplabv3plus(num_classes: int = 11) -> DeepLabV3Plus:
    """DeepLabV3+ as bundled (small ResNet backbone, OS 16)."""
    return init_weights(DeepLabV3Plus(num_classes))


def unet(num_classes: int = 11) -> UNet:
    """U-Net as bundled (widths 16-32-64-128-192)."""
    return init_weights(UNet(num_classes))


MODELS: dict[str, Callable[[int], nn.Module]] = {"deeplabv3plus": deeplabv3plus, "unet": unet}


def build_model(name: str, num_classes: int = 11) -> nn.Module:
    """Build a registered architecture by name."""
    try:
        return MODELS[name](num_classes)
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}") from None
