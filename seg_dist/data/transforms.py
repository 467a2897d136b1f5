"""Pixels: the training augmentation and validation resize (in loader workers, on images in their own type:
uint8, uint16 or float32, any channel count), the training crop, the normalisation constants
(`resolve_normalization`) and the one normalisation (`normalize`, on the device), and the compact mask type
batches travel in."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Importing albumentations otherwise asks PyPI for a newer version (in every worker, and offline
# clusters wait for the timeout).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import torch

from ..config import AugmentConfig, Config, DataConfig, crop_hw
from ..errors import UserError
from ..shards import (
    FULL_SCALE,
    MANIFEST,
    RGB8,
    ImageSpec,
    image_spec,
    image_statistics,
    mean_image_size,
    rotation_invariant,
)

__all__ = [
    "AUTO_CROP_MAX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalization",
    "build_transforms",
    "mask_dtype",
    "normalize",
    "normalize_padded",
    "photometric_on",
    "preprocess",
    "resolve_inputs",
    "resolve_normalization",
    "training_config",
    "training_crop",
    "transform_sample",
    "turns",
]

# What ImageNet-pretrained encoders were trained with, in fractions of 255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def photometric_on(data_cfg: DataConfig, image: ImageSpec) -> bool:
    """Whether brightness/contrast augmentation runs on these images (`data.augment.photometric`): auto
    means 8-bit grey or RGB only, where a shift in fractions of 255 means what it says."""
    mode = data_cfg.augment.photometric
    return mode == "on" or (mode == "auto" and image.dtype == "uint8" and image.channels in (1, 3))


def build_transforms(data_cfg: DataConfig, train: bool, ignore_index: int, image: ImageSpec = RGB8) -> A.Compose:
    """Image+mask augmentation (train) or resize (val, when data.val_size is set) on H x W x C images of
    `image`'s channels and type (uint8, uint16, float32: albumentations' geometric ops keep both); masks
    always use nearest. Brightness/contrast only where `photometric_on`. Normalisation is not here: it runs
    on the device (`normalize`).

    Every op that can introduce pixels fills the mask with `ignore_index`: albumentations fills
    masks with 0, a real class, unless told otherwise. Orientation knobs left unset (not resolved against a
    manifest by `training_config`) flip and turn nothing.
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
    fill = _mean_fill(data_cfg, image)
    ops = []
    lo, hi = aug.scale
    if (lo, hi) != (1.0, 1.0):
        # RandomScale samples from (1 + low, 1 + high).
        ops.append(A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    ops += [
        A.PadIfNeeded(height, width, border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=ignore_index),
        A.RandomCrop(height, width),
    ]
    if aug.hflip > 0:
        ops.append(A.HorizontalFlip(p=aug.hflip))
    if aug.vflip:
        ops.append(A.VerticalFlip(p=aug.vflip))
    if aug.rot90:
        check_quarter_turns(aug, height, width)
        ops.append(A.RandomRotate90(p=aug.rot90))
    if aug.brightness_contrast > 0 and photometric_on(data_cfg, image):
        ops.append(A.RandomBrightnessContrast(p=aug.brightness_contrast))
    if aug.affine > 0:
        ops.append(A.Affine(
            translate_percent=(-aug.translate, aug.translate), rotate=(-aug.rotate, aug.rotate),
            border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=ignore_index,
            mask_interpolation=cv2.INTER_NEAREST, p=aug.affine,
        ))
    return A.Compose(ops)


def check_quarter_turns(aug: AugmentConfig, height: int, width: int) -> None:
    """UserError where `data.augment.rot90` meets a crop that a quarter turn would reshape. A set crop is
    checked at config load; this catches the auto one (the mean frame) before a run writes anything."""
    if aug.rot90 and height != width:
        raise UserError(f"data.augment.rot90={aug.rot90} turns square crops only, and the training crop is "
                        f"{height} x {width} (the train split's mean frame): set data.image_size=N or rot90=0")


def _mean_fill(data_cfg: DataConfig, image: ImageSpec) -> float | tuple[float, ...]:
    """What padding and rotation put into new image pixels: the normalisation mean, which normalises to 0
    as validation's padding does. Raw 0 is far outside offset data (16-bit microscopy sits near 33,000: 0 is
    -134 std) and teaches BatchNorm statistics that never occur. OpenCV fills at most 4 channels with their
    own values; more share the mean of the means."""
    if data_cfg.mean is None:  # not resolved from the data (a bare config): 0, as albumentations does
        return 0.0
    raw = [m * FULL_SCALE[image.dtype] for m in data_cfg.mean]
    if image.dtype != "float32":
        raw = [float(round(v)) for v in raw]
    return tuple(raw) if len(raw) <= 4 else float(sum(raw) / len(raw))


AUTO_CROP_MAX = 512  # the longest auto crop side: larger frames are cropped, not trained whole


def training_crop(data_cfg: DataConfig, manifest: dict[str, Any]) -> tuple[int, int]:
    """`data.image_size` as (H, W); 0 (auto): the train split's mean frame, each side rounded up to a multiple
    of 8 and capped at 512 (a 200 x 133 set: 200 x 136; Cityscapes at 1024 x 2048: 512 x 512). Small images
    train whole because the scene around a pixel is what tells its class apart (lab/recipe.md)."""
    if data_cfg.image_size != 0:
        return crop_hw(data_cfg)
    h, w = mean_image_size(manifest, data_cfg.train_split)
    crop = _auto_side(h), _auto_side(w)
    check_quarter_turns(data_cfg.augment, *crop)
    return crop


def turns(aug: AugmentConfig, manifest: dict[str, Any], crop: tuple[int, int]) -> tuple[float, float]:
    """(vflip, rot90): each as set, or where unset as the data says: 0.5 and 1 for a rotation-invariant set
    (`shards.rotation_invariant`), rot90 only where `crop` is square (a quarter turn would reshape it); else 0."""
    free = rotation_invariant(manifest)
    vflip = aug.vflip if aug.vflip is not None else (0.5 if free else 0.0)
    rot90 = aug.rot90 if aug.rot90 is not None else (1.0 if free and crop[0] == crop[1] else 0.0)
    return vflip, rot90


def training_config(data_cfg: DataConfig, manifest: dict[str, Any]) -> DataConfig:
    """`data_cfg` with what the manifest decides for training filled in: the crop (`training_crop`) and the
    orientations (`turns`). What `build_transforms(..., train=True)` takes."""
    crop = training_crop(data_cfg, manifest)
    vflip, rot90 = turns(data_cfg.augment, manifest, crop)
    return dataclasses.replace(data_cfg, image_size=crop,
                               augment=dataclasses.replace(data_cfg.augment, vflip=vflip, rot90=rot90))


def _auto_side(mean: float) -> int:
    return min(AUTO_CROP_MAX, max(8, math.ceil(mean / 8) * 8))


@dataclass(frozen=True)
class Normalization:
    """The normalisation constants of a run and what they apply to. `mean` and `std` are in `data.mean`'s
    units, the pixel type's full scale (`shards.FULL_SCALE`: 8-bit values / 255, 16-bit / 65535, float32
    as stored), so `normalize(images, mean, std)` takes them as they are."""

    channels: int
    dtype: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # "data.mean/std", "manifest", "imagenet" (a local pretrained file), the named weights' label, or
    # "imagenet (old manifest)"
    source: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data for checkpoints and export JSON; `raw_mean`/`raw_std` are in pixel values."""
        full = FULL_SCALE[self.dtype]
        return {"channels": self.channels, "dtype": self.dtype, "mean": list(self.mean), "std": list(self.std),
                "raw_mean": [m * full for m in self.mean], "raw_std": [s * full for s in self.std],
                "source": self.source}


def resolve_normalization(cfg: Config, manifest: dict[str, Any]) -> Normalization:
    """The one rule for the normalisation constants (training, validation, and through the checkpoint the
    Predictor and export): `data.mean`/`data.std` where set; else, for a pretrained smp encoder
    (`model.encoder_weights`) on 8-bit images of 3 or more channels, the mean and std its weights were trained
    with (a local file: ImageNet's; named weights: their own, `models.smp.pretrained_normalization`) for the
    first three channels, taken as RGB, and the manifest's statistics for any further ones; else the
    manifest's train-split statistics (a channel that never varied gets std 1); ImageNet's again for manifests
    from before statistics were recorded, which hold 8-bit RGB. UserError, naming the key and the data, where
    they do not fit the images."""
    from ..models.smp import pretrained_normalization

    image = image_spec(manifest)
    where = f"data.root={cfg.data.root} ({image.text()} images)"
    d = cfg.data
    if d.mean is not None and d.std is not None:
        if len(d.mean) != image.channels or len(d.std) != image.channels:
            raise UserError(f"data.mean has {len(d.mean)} and data.std {len(d.std)} values, {where} need one per "
                            f"channel ({image.channels}); unset both for the manifest's statistics")
        return Normalization(image.channels, image.dtype, tuple(d.mean), tuple(d.std), "data.mean/std")
    measured = image_statistics(manifest)
    pretrained = pretrained_normalization(cfg.model) if image.dtype == "uint8" and image.channels >= 3 else None
    if pretrained is not None and (image.channels == 3 or measured is not None):
        mean, std, label = pretrained
        if image.channels > 3 and measured is not None:
            full = FULL_SCALE[image.dtype]
            mean = (*mean, *(m / full for m in measured[0][3:]))
            std = (*std, *((s if s > 0 else full) / full for s in measured[1][3:]))
            label = f"{label} for channels 1-3, manifest for 4-{image.channels}"
        return Normalization(image.channels, image.dtype, tuple(mean), tuple(std), label)
    if measured is not None:
        full = FULL_SCALE[image.dtype]
        mean = tuple(m / full for m in measured[0])
        std = tuple((s if s > 0 else full) / full for s in measured[1])
        return Normalization(image.channels, image.dtype, mean, std, "manifest")
    if image == RGB8:
        return Normalization(3, "uint8", IMAGENET_MEAN, IMAGENET_STD, "imagenet (old manifest)")
    raise UserError(f"{cfg.data.root}/{MANIFEST} has no pixel statistics (no train split was packed): pack one, "
                    f"or set data.mean and data.std ({image.channels} values each)")


def resolve_inputs(cfg: Config, manifest: dict[str, Any]) -> Config:
    """`cfg` with what the data decides filled in: `data.mean`/`data.std` (`resolve_normalization`),
    `model.in_channels` (the manifest's channels; a set value that differs is a UserError naming both) and
    `data.augment.photometric` (auto: on or off by `photometric_on`). Idempotent, so a checkpoint's config,
    resolved once, resolves to itself."""
    image = image_spec(manifest)
    given = cfg.model.in_channels
    if given not in (0, image.channels):
        raise UserError(f"model.in_channels={given}, but data.root={cfg.data.root} holds {image.text()} images "
                        f"({MANIFEST}); set model.in_channels=0 (from the data) or {image.channels}")
    norm = resolve_normalization(cfg, manifest)
    augment = dataclasses.replace(cfg.data.augment, photometric="on" if photometric_on(cfg.data, image) else "off")
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, mean=list(norm.mean), std=list(norm.std), augment=augment),
        model=dataclasses.replace(cfg.model, in_channels=image.channels))


_FULL_SCALE = {torch.uint8: 255.0, torch.uint16: 65535.0, torch.float32: 1.0}


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              channels_last: bool = False) -> torch.Tensor:
    """(N x) H x W x C images of uint8, uint16 or float32, as batches leave the loader -> float32
    (N x) C x H x W, normalised.

    The one normalisation of seg_dist (training, validation, evaluate, predict, preview): run on the
    device, so loader workers ship 8-bit images 4x smaller than float32. `mean` and `std` have one value per
    channel in the type's full scale (`Normalization`): (x - F mean) * (1 / (F std)) in float32 with F =
    255, 65535 or 1, for 8-bit the arithmetic of albumentations' Normalize(max_pixel_value=255). The
    permute of an N x H x W x C batch is already channels-last in memory; `channels_last=False` makes it
    contiguous.
    """
    full = _FULL_SCALE.get(images.dtype)
    if full is None or images.shape[-1] != len(mean) or len(std) != len(mean):
        raise ValueError(f"expected uint8, uint16 or float32 ... x H x W x {len(mean)} images (one channel per "
                         f"mean), got {images.dtype} {tuple(images.shape)}")
    shift, scale = _normalize_constants(images.device, tuple(mean), tuple(std), full)
    x = (images.float() - shift) * scale
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(2, 0, 1)
    if x.ndim == 4 and channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


@functools.lru_cache(maxsize=16)
def _normalize_constants(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...], full: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a tensor built from a Python list on a GPU is a blocking copy, every step.
    shift = torch.tensor([full * m for m in mean], dtype=torch.float32, device=device)
    scale = torch.tensor([1.0 / (full * s) for s in std], dtype=torch.float32, device=device)
    return shift, scale


def preprocess(image: np.ndarray, data_cfg: DataConfig) -> torch.Tensor:
    """H x W x C image (uint8, uint16 or float32, as `shards.decode_image` gives it) -> C x H x W float
    normalised as validation does, at the original resolution, with `data_cfg`'s resolved mean and std
    (`resolve_inputs`)."""
    if image.ndim != 3:
        raise ValueError(f"expected an H x W x C image, got {image.dtype} {image.shape}")
    if data_cfg.mean is None or data_cfg.std is None:
        raise ValueError("data.mean/std are unset: resolve them first (data.resolve_inputs)")
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
    """`transform` applied to one sample -> H x W x C image (in its own type) and compact H x W mask
    (`dtype`) tensors (see `normalize` for the rest)."""
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
