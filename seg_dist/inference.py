"""Inference on whole images at their original size: the one path predict and evaluate share.

    from seg_dist.predict import Predictor
    p = Predictor.from_checkpoint("runs/x/checkpoints/best.pt")
    mask = p(image)                 # uint8 H x W x 3 RGB -> int64 H x W class ids, same size
    picture = p.overlay(image, mask)

An image is normalised as in training (the checkpoint's mean/std), resized to `data.val_size` when the
model was validated at a fixed size, run, and its logits are resized back, so the mask always has the
input's size. Mixed precision only on CUDA (`train.amp` as trained): on the CPU the model runs in fp32,
so its masks are those of an fp32 export. An image smaller than the model's smallest input (2**depth
for the U-Net) is padded at the bottom and right with the mean colour (0 after normalisation, as
`SmpSegmenter` pads) and its logits cropped back. Large images go through overlapping tiles whose logits are
blended with a smooth weight, so memory stays bounded and tile borders leave no seams.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, distributed, precision
from .config import DataConfig
from .data import normalize
from .models.unet import UNet
from .visualize import overlay_with_legend

__all__ = ["AUTO_TILE_PIXELS", "Predictor", "min_input_size", "tile_starts"]

log = logging.getLogger(__name__)

# Above this many pixels an image is tiled even without --tile (4 Mpx: a 2000 x 2000 photo goes whole).
AUTO_TILE_PIXELS = 4_000_000
AUTO_TILE = 1024


@dataclass
class Predictor:
    """A trained model with what it needs to turn images into masks (see the module docstring)."""

    model: nn.Module  # in eval mode, on `device`
    data: DataConfig  # mean, std and val_size as trained
    num_classes: int
    class_names: list[str]
    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    tile: int = 0  # tile side in px; 0: whole images unless larger than AUTO_TILE_PIXELS
    overlap: float = 0.25  # fraction of a tile shared with its neighbour
    tta_flip: bool = False  # average with the horizontally flipped image's prediction
    min_size: int = 1  # the smallest height and width the model takes; smaller inputs are padded to it

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto", **options: Any) -> Predictor:
        """`device`: auto (the first GPU if there is one), cpu, cuda or cuda:N; `options`: the fields above."""
        return cls.from_trained(checkpoint.load_model(path, distributed.named_device(device)), **options)

    @classmethod
    def from_trained(cls, trained: checkpoint.TrainedModel, **options: Any) -> Predictor:
        """From a model `checkpoint.load_model` loaded (with config overrides, say)."""
        cfg = trained.cfg
        device = next(trained.model.parameters()).device
        if cfg.train.channels_last:
            trained.model.to(memory_format=torch.channels_last)
        # bf16 autocast on a CPU would move masks off the fp32 ones an export gives, for little speed.
        options.setdefault("amp_dtype", precision.resolve_amp(cfg.train.amp, device) if device.type == "cuda" else None)
        options.setdefault("min_size", min_input_size(trained.model))
        tile, crop = options.get("tile", 0), trained.train_crop
        if tile and crop and tile < max(crop):
            # Measured on CCP: 256 px tiles of a model trained on 512 px crops agreed with whole-image
            # prediction on only 76-92% of pixels.
            log.warning("tile %d px is smaller than the %d x %d crops the model trained on: tiles see less "
                        "context than training did, so masks may differ from whole-image ones; use --tile %d "
                        "or more", tile, crop[0], crop[1], max(crop))
        return cls(trained.model, cfg.data, trained.num_classes, trained.class_names, device,
                   channels_last=cfg.train.channels_last, **options)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """uint8 H x W x 3 (or H x W grey) -> int64 H x W class ids."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Masks for several images; images of one size run as one batch."""
        return [logits.argmax(0).cpu().numpy() for logits in self.logits_batch(images)]

    @torch.no_grad()
    def logits_batch(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """float32 C x H x W logits per image, at each image's own size (on the device)."""
        out: list[torch.Tensor | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault(_rgb(image).shape[:2], []).append(i)
        for (h, w), idx in groups.items():
            batch = torch.stack([self._to_tensor(images[i]) for i in idx])
            logits = self._logits(batch, h, w)
            for j, i in enumerate(idx):
                out[i] = logits[j]
        return out  # type: ignore[return-value]

    def overlay(self, image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """image | prediction | blend, with a legend of the classes present: an H x W' x 3 uint8 picture."""
        return overlay_with_legend(_rgb(image), mask, self.class_names, alpha=alpha)

    # --- internals ------------------------------------------------------------------------------------

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        return normalize(torch.from_numpy(np.ascontiguousarray(_rgb(image))).to(self.device), self.data.mean,
                         self.data.std)

    def _logits(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        size = self.data.val_size
        if size > 0 and (h, w) != (size, size):  # trained to see val_size x val_size: resize, run, resize back
            small = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            return F.interpolate(self._forward(small), size=(h, w), mode="bilinear", align_corners=False)
        tile = self.tile or (AUTO_TILE if h * w > AUTO_TILE_PIXELS else 0)
        if tile and (h > tile or w > tile):
            return self._tiled(x, tile)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._run(x)
        if self.tta_flip:
            logits = (logits + self._run(x.flip(-1)).flip(-1)) / 2
        return logits

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = max(0, self.min_size - h), max(0, self.min_size - w)
        if ph or pw:
            x = F.pad(x, [0, pw, 0, ph])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast(self.device, self.amp_dtype):
            return self.model(x).float()[..., :h, :w]

    def _tiled(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        """Sliding windows; each tile's logits are weighted by a ramp that falls towards its borders, so
        every pixel is a smooth mix of the tiles that cover it (no seams)."""
        n, _, h, w = x.shape
        th, tw = min(tile, h), min(tile, w)
        stride = max(1, int(tile * (1 - self.overlap)))
        weight = _ramp(th, self.device)[:, None] * _ramp(tw, self.device)[None, :]
        total = torch.zeros((n, self.num_classes, h, w), device=self.device)
        norm = torch.zeros((h, w), device=self.device)
        for top in tile_starts(h, th, stride):
            for left in tile_starts(w, tw, stride):
                logits = self._forward(x[:, :, top : top + th, left : left + tw])
                total[:, :, top : top + th, left : left + tw] += logits * weight
                norm[top : top + th, left : left + tw] += weight
        return total / norm


def min_input_size(model: nn.Module) -> int:
    """The smallest side `model` takes: 2**depth for our U-Net (each down-step halves it); smp models pad
    to their stride themselves, so any side from 1."""
    return 2**model.depth if isinstance(model, UNet) else 1


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Window offsets covering [0, length): a stride apart, the last one flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def _ramp(n: int, device: torch.device) -> torch.Tensor:
    """Weights rising linearly from the border to the middle and never 0 (an edge tile's border is the
    image's border and must still count)."""
    pos = torch.arange(n, device=device, dtype=torch.float32)
    dist = torch.minimum(pos + 1, n - pos)
    return (dist / math.ceil(n / 2)).clamp(min=1e-3)


def _rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 H x W x 3 RGB image, got {image.dtype} {image.shape}")
    return image[:, :, :3]
