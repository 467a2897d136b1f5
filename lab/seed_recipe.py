"""The seed tutorial's baseline recipe, reproduced as the article wrote it, to compare seg_dist against.

seg_dist grew from the tutorial "How to Implement Semantic Segmentation in PyTorch" (the article at
shared/seed/seed-article.txt: Dataset, albumentations transforms, U-Net, DiceLoss, calculate_iou,
train_model). This module is that plain loop, kept apart from seg_dist's trainer on purpose, so both
recipes can be trained on the same data for the same wall-clock budget and scored alike. As the
article: the U-Net (enc1..enc4 = w, 2w, 4w, 8w, bottleneck 16w, ConvTranspose2d up, DoubleConv =
2 x (3x3 conv without bias, BatchNorm, ReLU); the article's w is 64), loss = CrossEntropy + DiceLoss
(softmax, one-hot, dice per (image, class) with smooth 1e-6, 1 - mean over all of them), AdamW
(lr 1e-4, weight_decay 1e-4), ReduceLROnPlateau(mode='min', patience=5) stepped with each epoch's mean
validation loss, batch 8 with shuffle, Resize to one fixed size for train and val, HorizontalFlip(0.5),
RandomBrightnessContrast(p=0.2), Normalize(ImageNet mean/std), ToTensorV2, validation after every
epoch with the article's per-batch IoU averaged over batches.

Changed from the article only where it does not run here:

- Ignore label. Masks may hold `ignore_index` (e.g. 255, VOC's borders), which the article's losses
  cannot take: CE gets `ignore_index`; the Dice loss zeroes ignored pixels in both the softmax and the
  one-hot target (one_hot of 255 would raise). The IoU drops ignored pixels as well (otherwise a
  prediction there counts in the union of the class predicted). With no ignored pixel each of the three
  is exactly the article's.
- Long masks. albumentations 2.x hands int64 masks back as int32, which CE rejects: the dataset
  returns int64 again.
- ShiftScaleRotate(shift_limit=0.1, scale_limit=0.1, rotate_limit=15, p=0.5) is deprecated in
  albumentations 2.x (a special case of Affine, with a warning): the same ranges as
  Affine(translate_percent=(-0.1, 0.1), scale=(0.9, 1.1), rotate=(-15, 15), p=0.5), constant border,
  the image filled with 0, the mask nearest-interpolated and filled with `ignore_index` (pixels that
  came from outside the image are not labelled).
- Odd sizes. The article's U-Net concatenates skips only when H and W are divisible by 16; the
  upsampled map is resized (nearest) to its skip's size when they differ, so any size from 16 up runs.
- Plumbing: `num_classes` in place of the hard-coded 21, the device given instead of picked, the epoch
  count replaced by a wall-clock budget (`minutes`, with `max_epochs` as a cap), and images scored at
  their own resolution through `ResizeWrapper`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2
from torch import nn
from torch.utils.data import DataLoader, Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DoubleConv(nn.Module):
    """The article's block: 2 x (3x3 conv without bias, BatchNorm, ReLU)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _match(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """`x` resized (nearest) to `skip`'s H x W: the article's concat fails on sizes not divisible by 16."""
    return x if x.shape[-2:] == skip.shape[-2:] else F.interpolate(x, size=skip.shape[-2:], mode="nearest")


class SeedUNet(nn.Module):
    """The article's U-Net, 4 poolings deep; `width` is its first stage's channels (the article's 64),
    a parameter so that a budget too small for 31 M parameters can still run the same architecture."""

    def __init__(self, in_channels: int = 3, num_classes: int = 21, width: int = 64) -> None:
        super().__init__()
        w = width
        self.enc1 = DoubleConv(in_channels, w)
        self.enc2 = DoubleConv(w, 2 * w)
        self.enc3 = DoubleConv(2 * w, 4 * w)
        self.enc4 = DoubleConv(4 * w, 8 * w)
        self.bottleneck = DoubleConv(8 * w, 16 * w)
        self.upconv4 = nn.ConvTranspose2d(16 * w, 8 * w, 2, stride=2)
        self.dec4 = DoubleConv(16 * w, 8 * w)
        self.upconv3 = nn.ConvTranspose2d(8 * w, 4 * w, 2, stride=2)
        self.dec3 = DoubleConv(8 * w, 4 * w)
        self.upconv2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = DoubleConv(4 * w, 2 * w)
        self.upconv1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = DoubleConv(2 * w, w)
        self.out = nn.Conv2d(w, num_classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        e3 = self.enc3(self.pool(e2))
        e4 = self.enc4(self.pool(e3))
        b = self.bottleneck(self.pool(e4))
        d4 = self.dec4(torch.cat([_match(self.upconv4(b), e4), e4], dim=1))
        d3 = self.dec3(torch.cat([_match(self.upconv3(d4), e3), e3], dim=1))
        d2 = self.dec2(torch.cat([_match(self.upconv2(d3), e2), e2], dim=1))
        d1 = self.dec1(torch.cat([_match(self.upconv1(d2), e1), e1], dim=1))
        return self.out(d1)


class SeedDiceLoss(nn.Module):
    """The article's DiceLoss (softmax, one-hot, dice per (image, class), 1 - mean over all of them,
    absent classes included), with ignored pixels removed from both sides so that VOC-style masks run."""

    def __init__(self, ignore_index: int = 255, smooth: float = 1e-6) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.smooth = smooth

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = pred.shape[1]
        valid = (target != self.ignore_index).unsqueeze(1)
        target = target.long().masked_fill(~valid.squeeze(1), 0)
        pred = torch.softmax(pred, dim=1) * valid
        target_one_hot = F.one_hot(target, num_classes=num_classes).permute(0, 3, 1, 2).float() * valid
        intersection = (pred * target_one_hot).sum(dim=(2, 3))
        union = pred.sum(dim=(2, 3)) + target_one_hot.sum(dim=(2, 3))
        dice = (2.0 * intersection + self.smooth) / (union + self.smooth)
        return 1 - dice.mean()


def calculate_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255) -> float:
    """The article's IoU of one batch: per class over all its pixels, nan-mean over the classes that occur
    in the prediction or the target. Ignored pixels are left out (the article had none)."""
    pred = pred.reshape(-1)
    target = target.reshape(-1)
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    ious = []
    for cls in range(num_classes):
        pred_inds = pred == cls
        target_inds = target == cls
        intersection = (pred_inds & target_inds).sum().float()
        union = (pred_inds | target_inds).sum().float()
        ious.append(float("nan") if union == 0 else (intersection / union).item())
    if all(math.isnan(v) for v in ious):
        return float("nan")  # a batch with every pixel ignored (np.nanmean would warn)
    return float(np.nanmean(ious))


def seed_transforms(size_hw: tuple[int, int], train: bool, ignore_index: int = 255) -> A.Compose:
    """The article's train / val pipelines at `size_hw`; ShiftScaleRotate becomes the equivalent Affine."""
    h, w = size_hw
    steps: list[Any] = [A.Resize(h, w, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST)]
    if train:
        steps += [
            A.HorizontalFlip(p=0.5),
            A.RandomBrightnessContrast(p=0.2),
            A.Affine(
                translate_percent=(-0.1, 0.1),
                scale=(0.9, 1.1),
                rotate=(-15, 15),
                interpolation=cv2.INTER_LINEAR,
                mask_interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=ignore_index,
                p=0.5,
            ),
        ]
    steps += [A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD), ToTensorV2()]
    return A.Compose(steps)


class SeedDataset(Dataset):
    """The article's SegmentationDataset over in-memory (uint8 HxWx3 image, int HxW mask) pairs, so the
    baseline reads exactly the samples seg_dist is given rather than an image/mask folder."""

    def __init__(self, samples: list[tuple[np.ndarray, np.ndarray]], transform: Callable[..., dict]) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.samples[idx]
        augmented = self.transform(image=image, mask=mask)
        # albumentations 2.x returns int masks as int32 (or the input's uint8): CE wants int64.
        return augmented["image"], torch.as_tensor(augmented["mask"]).long()


class ResizeWrapper(nn.Module):
    """A model trained at one `size_hw`, scored at any image's own size: the input is resized (bilinear)
    to `size_hw`, as the article's Resize does, and the logits resized back (bilinear) to the input's H x W,
    so the baseline is scored on the same full-resolution masks as seg_dist."""

    def __init__(self, model: nn.Module, size_hw: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.size_hw = (int(size_hw[0]), int(size_hw[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hw = tuple(x.shape[-2:])
        if hw != self.size_hw:
            x = F.interpolate(x, size=self.size_hw, mode="bilinear", align_corners=False)
        logits = self.model(x)
        if tuple(logits.shape[-2:]) != hw:
            logits = F.interpolate(logits, size=hw, mode="bilinear", align_corners=False)
        return logits


@dataclass
class SeedResult:
    """What `train_seed` ran: the scorable model and how far the budget went.

    `epochs` counts the last, partial epoch as a fraction (its steps / steps per epoch); `history` has
    one row per epoch trained and validated within the budget (epoch, train_loss, val_loss, val_iou, and
    the lr the epoch trained with), so an epoch cut short, or finished just as the budget ran out, has none.
    """

    model: ResizeWrapper
    epochs: float
    steps: int
    train_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def _seed_worker(worker_id: int) -> None:
    """albumentations 2.x draws from its own generator, not numpy's: each worker's copy of the transform
    is reseeded from the worker's torch seed (itself drawn from the loader's seeded generator), so workers
    augment differently from one another and from epoch to epoch, yet reproducibly."""
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(info.seed % 2**32)


def train_seed(
    train: list[tuple[np.ndarray, np.ndarray]],
    val: list[tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    *,
    minutes: float,
    size_hw: tuple[int, int],
    width: int = 64,
    lr: float = 1e-4,
    batch_size: int = 8,
    workers: int = 0,
    seed: int = 0,
    ignore_index: int = 255,
    device: torch.device | str = "cpu",
    max_epochs: int = 10_000,
    progress: Callable[[str], None] | None = None,
) -> SeedResult:
    """The article's `train_model`, for `minutes` of wall clock instead of a number of epochs.

    The clock starts just before the first epoch and covers training and the per-epoch validation (both
    are the recipe); it is read after every optimiser step and before every epoch, and the run stops as
    soon as it is spent, mid-epoch if need be (that epoch counts as a fraction and is not validated).
    """
    if not train or not val:
        raise ValueError("train_seed needs at least one training and one validation sample")
    device = torch.device(device)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    train_tf = seed_transforms(size_hw, train=True, ignore_index=ignore_index)
    train_tf.set_random_seed(seed)
    train_loader = DataLoader(
        SeedDataset(train, train_tf),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_seed_worker if workers > 0 else None,
        persistent_workers=workers > 0,
    )
    val_loader = DataLoader(
        SeedDataset(val, seed_transforms(size_hw, train=False, ignore_index=ignore_index)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
    )

    model = SeedUNet(3, num_classes, width).to(device)
    ce_loss = nn.CrossEntropyLoss(ignore_index=ignore_index)
    dice_loss = SeedDiceLoss(ignore_index=ignore_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", patience=5)

    history: list[dict[str, float]] = []
    steps = 0
    epochs = 0.0
    start = time.perf_counter()
    deadline = start + minutes * 60.0
    for epoch in range(max_epochs):
        if time.perf_counter() >= deadline:
            break
        epoch_lr = optimizer.param_groups[0]["lr"]
        model.train()
        train_loss = 0.0
        done = 0
        out_of_time = False
        for images, masks in train_loader:
            images, masks = images.to(device), masks.to(device)
            optimizer.zero_grad()
            outputs = model(images)
            loss = ce_loss(outputs, masks) + dice_loss(outputs, masks)
            loss.backward()
            optimizer.step()
            train_loss += loss.item()
            steps += 1
            done += 1
            if time.perf_counter() >= deadline:
                out_of_time = True
                break
        epochs += done / len(train_loader)
        if out_of_time:
            break

        model.eval()
        val_loss = 0.0
        val_iou = 0.0
        with torch.no_grad():
            for images, masks in val_loader:
                images, masks = images.to(device), masks.to(device)
                outputs = model(images)
                val_loss += (ce_loss(outputs, masks) + dice_loss(outputs, masks)).item()
                val_iou += calculate_iou(torch.argmax(outputs, dim=1), masks, num_classes, ignore_index)
        val_loss /= len(val_loader)
        val_iou /= len(val_loader)
        scheduler.step(val_loss)
        row = {"epoch": epoch + 1, "train_loss": train_loss / len(train_loader), "val_loss": val_loss,
               "val_iou": val_iou, "lr": epoch_lr}
        history.append(row)
        if progress is not None:
            progress(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f}, val loss {val_loss:.4f}, "
                     f"val IoU {val_iou:.4f}, lr {epoch_lr:.3g}")
    train_seconds = time.perf_counter() - start

    wrapped = ResizeWrapper(model, size_hw).eval()
    return SeedResult(model=wrapped, epochs=epochs, steps=steps, train_seconds=train_seconds, history=history)
