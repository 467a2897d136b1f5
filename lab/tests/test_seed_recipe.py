import math
import time

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lab.seed_recipe import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ResizeWrapper,
    SeedDataset,
    SeedDiceLoss,
    SeedUNet,
    calculate_iou,
    seed_transforms,
    train_seed,
)

IGNORE = 255


def article_dice(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1e-6) -> torch.Tensor:
    """The tutorial's DiceLoss.forward, verbatim."""
    pred = torch.softmax(pred, dim=1)
    target_one_hot = F.one_hot(target, num_classes=pred.shape[1]).permute(0, 3, 1, 2).float()
    intersection = (pred * target_one_hot).sum(dim=(2, 3))
    union = pred.sum(dim=(2, 3)) + target_one_hot.sum(dim=(2, 3))
    dice = (2.0 * intersection + smooth) / (union + smooth)
    return 1 - dice.mean()


def samples(n: int, seed: int, hw: tuple[int, int] = (24, 20)) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random images whose mask is the red channel cut in 3 bands (a per-pixel rule a 3x3 conv can learn),
    the top row ignored."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        mask = np.digitize(image[..., 0], [85, 170]).astype(np.int64)
        mask[0] = IGNORE
        out.append((image, mask))
    return out


def normalise(image: np.ndarray) -> torch.Tensor:
    x = (image.astype(np.float32) / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)


def test_unet_keeps_odd_sizes() -> None:
    torch.manual_seed(0)
    model = SeedUNet(3, 5, width=4).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 37, 50)).shape == (2, 5, 37, 50)
        assert model(torch.randn(1, 3, 32, 48)).shape == (1, 5, 32, 48)


def test_unet_has_the_articles_channels_at_width_64() -> None:
    def double_conv(i: int, o: int) -> int:  # 2 bias-free 3x3 convs + 2 BatchNorms (weight, bias)
        return 9 * i * o + 9 * o * o + 4 * o

    def up(i: int, o: int) -> int:  # ConvTranspose2d(i, o, 2) with bias
        return 4 * i * o + o

    expected = (
        double_conv(3, 64) + double_conv(64, 128) + double_conv(128, 256) + double_conv(256, 512)
        + double_conv(512, 1024)
        + up(1024, 512) + double_conv(1024, 512) + up(512, 256) + double_conv(512, 256)
        + up(256, 128) + double_conv(256, 128) + up(128, 64) + double_conv(128, 64)
        + 64 * 21 + 21
    )  # fmt: skip
    model = SeedUNet()
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.bottleneck.conv[3].out_channels == 1024
    assert model.dec1.conv[0].in_channels == 128 and model.out.out_channels == 21


def test_dice_equals_the_article_without_ignored_pixels() -> None:
    torch.manual_seed(0)
    logits, target = torch.randn(3, 4, 9, 7), torch.randint(0, 4, (3, 9, 7))
    target[1] = target[1].clamp(max=1)  # classes absent from an image count, as in the article
    torch.testing.assert_close(SeedDiceLoss()(logits, target), article_dice(logits, target))


def test_dice_with_ignored_pixels_is_finite_and_ignores_them() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 6, 5, requires_grad=True)
    target = torch.randint(0, 3, (2, 6, 5))
    target[0, :2] = IGNORE
    target[1] = IGNORE  # an image with nothing labelled
    loss = SeedDiceLoss(ignore_index=IGNORE)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert logits.grad[0, :, :2].abs().max() == 0 and logits.grad[1].abs().max() == 0
    assert logits.grad[0, :, 2:].abs().max() > 0
    changed = logits.detach().clone()
    changed[0, :, :2] += 10 * torch.randn(3, 2, 5)
    torch.testing.assert_close(SeedDiceLoss()(changed, target), loss.detach())


def test_iou_leaves_ignored_pixels_out() -> None:
    target = torch.tensor([[0, 0, 1, IGNORE]])
    assert calculate_iou(torch.tensor([[0, 0, 1, 1]]), target, 3) == pytest.approx(1.0)
    assert calculate_iou(torch.tensor([[0, 1, 1, 2]]), target, 3) == pytest.approx((0.5 + 0.5) / 2)


def test_transforms_and_dataset() -> None:
    train_tf = seed_transforms((16, 24), train=True)
    affine = next(t for t in train_tf.transforms if isinstance(t, A.Affine))
    assert affine.fill_mask == IGNORE and affine.mask_interpolation == cv2.INTER_NEAREST
    assert not any(type(t).__name__ == "ShiftScaleRotate" for t in train_tf.transforms)
    data = samples(3, seed=0, hw=(37, 50))
    for tf, allowed in ((seed_transforms((16, 24), train=False), {0, 1, 2, IGNORE}), (train_tf, {0, 1, 2, IGNORE})):
        ds = SeedDataset(data, tf)
        for i in range(len(ds)):
            image, mask = ds[i]
            assert image.dtype == torch.float32 and image.shape == (3, 16, 24)
            assert mask.dtype == torch.int64 and mask.shape == (16, 24)
            assert set(mask.unique().tolist()) <= allowed  # nearest: no label is blended
    # Val: Resize + Normalize only, so a same-size image comes back normalised as the article's constants say.
    image, _ = SeedDataset(samples(1, seed=1, hw=(16, 24)), seed_transforms((16, 24), train=False))[0]
    torch.testing.assert_close(image, normalise(samples(1, seed=1, hw=(16, 24))[0][0]), atol=1e-5, rtol=0)


def test_resize_wrapper_returns_logits_at_the_inputs_size() -> None:
    torch.manual_seed(0)
    seen: list[tuple[int, int]] = []
    model = SeedUNet(3, 4, width=4).eval()
    model.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    wrapped = ResizeWrapper(model, (32, 32))
    with torch.no_grad():
        out = wrapped(torch.randn(2, 3, 37, 50))
        same = wrapped(x := torch.randn(1, 3, 32, 32))
    assert out.shape == (2, 4, 37, 50) and seen == [(32, 32), (32, 32)]
    torch.testing.assert_close(same, model(x))


def test_train_seed_spends_the_budget_and_learns() -> None:
    train, val = samples(16, seed=0), samples(8, seed=1)
    lines: list[str] = []
    minutes = 0.05
    t0 = time.perf_counter()
    result = train_seed(train, val, 3, minutes=minutes, size_hw=(24, 20), width=8, lr=1e-2, progress=lines.append)
    wall = time.perf_counter() - t0
    budget = minutes * 60

    # Runs until the budget is spent, and stops within one step or one validation pass of it.
    assert budget <= result.train_seconds <= budget + 2.0 and wall <= budget + 10.0
    steps_per_epoch = 2  # 16 samples, batch 8
    assert result.steps > 0 and result.epochs * steps_per_epoch == pytest.approx(result.steps)
    assert math.floor(result.epochs) - 1 <= len(result.history) <= math.floor(result.epochs)
    assert [row["epoch"] for row in result.history] == list(range(1, len(result.history) + 1))
    assert len(lines) == len(result.history) and all(line.startswith("epoch ") for line in lines)

    # The returned model is the scorable wrapper, in eval mode, and beats chance (1/3) on held-out images.
    assert isinstance(result.model, ResizeWrapper) and not result.model.training
    images = torch.stack([normalise(im) for im, _ in val])
    masks = torch.from_numpy(np.stack([m for _, m in val]))
    with torch.no_grad():
        pred = result.model(images).argmax(1)
    keep = masks != IGNORE
    accuracy = (pred[keep] == masks[keep]).float().mean().item()
    assert accuracy > 0.5, (accuracy, result.steps, result.history[-1:] if result.history else None)


def test_train_seed_is_seeded_and_honours_max_epochs() -> None:
    train, val = samples(12, seed=2), samples(4, seed=3)

    def run() -> tuple[dict[str, torch.Tensor], list[dict[str, float]], list[str]]:
        lines: list[str] = []
        result = train_seed(train, val, 3, minutes=10, size_hw=(16, 16), width=4, lr=1e-3, batch_size=4,
                            seed=7, max_epochs=2, progress=lines.append)
        assert result.epochs == 2.0 and result.steps == 6 and len(result.history) == 2
        return result.model.state_dict(), result.history, lines

    (weights_a, history_a, lines_a), (weights_b, history_b, _) = run(), run()
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=0)
    assert history_a == history_b
    assert all(row["lr"] == 1e-3 and math.isfinite(row["val_loss"]) for row in history_a)
    assert lines_a[1].startswith("epoch 2: train loss ") and ", val IoU " in lines_a[1] and ", lr " in lines_a[1]
