"""The classic U-Net (Ronneberger et al., 2015) built from small composable blocks.

Differences from the paper: 'same' padding plus a norm layer (BatchNorm, or GroupNorm, which uses no
batch statistics), so the output has the input's spatial size for any H x W (odd sizes are handled by
padding the upsampled tensor in `Up`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def norm_layer(kind: str, channels: int) -> nn.Module:
    """"batch": BatchNorm2d. "group": GroupNorm with at least 4 channels per group (at most 32 groups),
    so a narrow U-Net (16 channels) still normalises over groups, not single channels."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = max(1, min(32, channels // 4))
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {kind!r}: expected batch or group")


class DoubleConv(nn.Sequential):
    """2 x (3x3 conv -> norm -> ReLU); conv bias is redundant before a norm layer."""

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None,
                 norm: str = "batch") -> None:
        mid = mid_channels or out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid, kernel_size=3, padding=1, bias=False),
            norm_layer(norm, mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_channels, kernel_size=3, padding=1, bias=False),
            norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Halve the resolution, then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels, norm=norm))


class Up(nn.Module):
    """Upsample x2, concatenate the skip connection, then DoubleConv.

    `in_channels` is the channel count after concatenation. With `bilinear=False` a transposed
    conv halves the incoming channels so that they match the skip's; with `bilinear=True` the
    incoming tensor already has the skip's channel count (the encoder bottleneck is halved instead)
    and the DoubleConv squeezes through `in_channels // 2` mid channels.
    """

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool = False, norm: str = "batch") -> None:
        super().__init__()
        if bilinear:
            self.up: nn.Module = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2, norm=norm)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        # MaxPool floors odd sizes, so the upsampled map can be 1 px short of the skip per level.
        dh = skip.shape[-2] - x.shape[-2]
        dw = skip.shape[-1] - x.shape[-1]
        if dh or dw:
            x = F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])
        return self.conv(torch.cat([skip, x], dim=1))


class OutConv(nn.Conv2d):
    """1x1 conv producing per-class logits."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes, kernel_size=1)


class UNetPass(nn.Module):
    """The U-Net's pass through the `inc`, `downs`, `ups` and `head` modules a subclass sets: `UNet`, and
    `exporting.ExportUNet`, which shares those modules but swaps in up steps without a shape branch."""

    def encode_decode(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


class UNet(UNetPass):
    """U-Net with `depth` down/up levels; level i has `width * 2**i` channels.

    With `bilinear=False` the bottleneck has `width * 2**depth` channels (the classic model:
    31,038,933 parameters for width=64, depth=4, 3 -> 21 classes). With `bilinear=True` the
    bottleneck and every up block's output are halved (factor 2), as upsampling has no weights
    to reduce channels.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        width: int = 64,
        depth: int = 4,
        bilinear: bool = False,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if width < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError("width, num_classes and in_channels must be >= 1")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.depth = depth
        factor = 2 if bilinear else 1
        ch = [width * 2**i for i in range(depth + 1)]

        self.inc = DoubleConv(in_channels, ch[0], norm=norm)
        self.downs = nn.ModuleList(
            Down(ch[i], ch[i + 1] // (factor if i == depth - 1 else 1), norm) for i in range(depth)
        )
        # Up block i maps level i+1 to level i; the last one (level 0) is never reduced.
        self.ups = nn.ModuleList(
            Up(ch[i + 1], ch[i] // (factor if i > 0 else 1), bilinear, norm) for i in reversed(range(depth))
        )
        self.head = OutConv(ch[0], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        min_size = 2**self.depth
        if x.shape[-2] < min_size or x.shape[-1] < min_size:
            # MaxPool would reach a 0-sized map and fail with an opaque error deep inside.
            raise ValueError(f"input {tuple(x.shape[-2:])} is smaller than 2**depth={min_size} per side")
        return self.encode_decode(x)
