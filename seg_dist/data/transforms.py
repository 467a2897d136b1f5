"""Pixels: the training augmentation and validation resize (in loader workers, on uint8 images), the
training crop, the one normalisation (on the device), and the compact mask type batches travel in."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any

# Importing albumentations otherwise asks PyPI for a newer version (in every worker, and offline
# clusters wait for the timeout).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import torch

from ..config import DataConfig, crop_hw
from ..shards import mean_image_size

__all__ = [
    "AUTO_CROP_MAX",
    "build_transforms",
    "mask_dtype",
    "normalize",
    "normalize_padded",
    "preprocess",
    "training_crop",
    "transform_sample",
]


def build_transforms(data_cfg: DataConfig, train: bool, ignore_index: int) -> A.Compose:
    """Image+mask augmentation (train) or resize (val, when data.val_size is set) on uint8 HxWx3 images;
    masks always use nearest. Normalisation is not here: it runs on the device (`normalize`).

    Every op that can introduce pixels fills the mask with `ignore_index`: albumentations fills
    masks with 0, a real class, unless told otherwise.
    """
    if not train:
        ops: list[Any] = []
        if data_cfg.val_size > 0:
            ops.append(A.Resize(data_cfg.val_size, data_cfg.val_size, mask_interpolation=cv2.INTER_NEAREST))
        return A.Compose(ops)
    aug = data_cfg.augment
    if data_cfg.image_size == 0:
        raise ValueError("data.image_size=0 (auto) is resolved from the manifest: pass the crop training_crop() gives")
    height, width = crop_hw(data_cfg)
    ops = []
    lo, hi = aug.scale
    if (lo, hi) != (1.0, 1.0):
        # RandomScale samples from (1 + low, 1 + high).
        ops.append(A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    ops += [
        A.PadIfNeeded(height, width, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index),
        A.RandomCrop(height, width),
    ]
    if aug.hflip > 0:
        ops.append(A.HorizontalFlip(p=aug.hflip))
    if aug.vflip > 0:
        ops.append(A.VerticalFlip(p=aug.vflip))
    if aug.brightness_contrast > 0:
        ops.append(A.RandomBrightnessContrast(p=aug.brightness_contrast))
    if aug.affine > 0:
        ops.append(A.Affine(
            translate_percent=(-aug.translate, aug.translate), rotate=(-aug.rotate, aug.rotate),
            border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index,
            mask_interpolation=cv2.INTER_NEAREST, p=aug.affine,
        ))
    return A.Compose(ops)


AUTO_CROP_MAX = 512  # the longest auto crop side: larger frames are cropped, not trained whole


def training_crop(data_cfg: DataConfig, manifest: dict[str, Any]) -> tuple[int, int]:
    """`data.image_size` as (H, W); 0 (auto): the train split's mean frame, each side rounded up to a multiple
    of 8 and capped at 512 (a 200 x 133 set: 200 x 136; Cityscapes at 1024 x 2048: 512 x 512). Small images
    train whole because the scene around a pixel is what tells its class apart (lab/recipe.md)."""
    if data_cfg.image_size != 0:
        return crop_hw(data_cfg)
    h, w = mean_image_size(manifest, data_cfg.train_split)
    return _auto_side(h), _auto_side(w)


def _auto_side(mean: float) -> int:
    return min(AUTO_CROP_MAX, max(8, math.ceil(mean / 8) * 8))


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              channels_last: bool = False) -> torch.Tensor:
    """uint8 (N x) H x W x 3 images, as batches leave the loader -> float32 (N x) 3 x H x W, normalised.

    The one normalisation of seg_dist (training, validation, evaluate, predict, preview): run on the
    device, so loader workers ship 4x fewer bytes than float32. Same arithmetic as albumentations'
    Normalize(max_pixel_value=255): (x - 255 mean) * (1 / (255 std)) in float32. The permute of an
    N x H x W x 3 batch is already channels-last in memory; `channels_last=False` makes it contiguous.
    """
    if images.dtype != torch.uint8 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 ... x H x W x 3 images, got {images.dtype} {tuple(images.shape)}")
    shift, scale = _normalize_constants(images.device, tuple(mean), tuple(std))
    x = (images.float() - shift) * scale
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(2, 0, 1)
    if x.ndim == 4 and channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


@functools.lru_cache(maxsize=16)
def _normalize_constants(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a tensor built from a Python list on a GPU is a blocking copy, every step.
    shift = torch.tensor([255.0 * m for m in mean], dtype=torch.float32, device=device)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device)
    return shift, scale


def preprocess(image: np.ndarray, data_cfg: DataConfig) -> torch.Tensor:
    """uint8 HxWx3 RGB -> 3xHxW float normalised as validation does, at the original resolution."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    return normalize(torch.from_numpy(np.ascontiguousarray(image)), data_cfg.mean, data_cfg.std)


def mask_dtype(num_classes: int, ignore_index: int) -> torch.dtype:
    """The smallest integer type holding every class id and the ignore index (shipped between processes)."""
    top = max(num_classes - 1, ignore_index)
    lowest = min(0, ignore_index)
    if lowest >= 0 and top <= 255:
        return torch.uint8
    if lowest >= -(2**15) and top < 2**15:
        return torch.int16
    return torch.int32


def transform_sample(transform: A.Compose, image: np.ndarray, mask: np.ndarray,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`transform` applied to one sample -> uint8 H x W x 3 image and compact H x W mask (`dtype`) tensors
    (see `normalize` for the rest)."""
    out = transform(image=image, mask=mask)
    mask = torch.from_numpy(np.ascontiguousarray(out["mask"])).to(dtype)
    return torch.from_numpy(np.ascontiguousarray(out["image"])), mask


def normalize_padded(images: torch.Tensor, sizes: Sequence[tuple[int, int]], mean: Sequence[float],
                     std: Sequence[float], channels_last: bool = False) -> torch.Tensor:
    """`normalize` for a padded batch: the padding is 0 after normalisation, as if padded then, so a
    batch's numbers do not depend on how it was assembled."""
    x = normalize(images, mean, std, channels_last)
    h, w = x.shape[-2:]
    for i, (hi, wi) in enumerate(sizes):
        if hi < h:
            x[i, :, hi:, :] = 0
        if wi < w:
            x[i, :, :, wi:] = 0
    return x
