"""Segmentation losses: cross-entropy + soft Dice, both in fp32 and safe with ignored pixels.

All reductions are done on device without `.item()` so the training loop never syncs the host. On
several ranks `SegLoss(global_batch=True)` is the loss of the whole global batch, not a mean of the
ranks' losses: both terms are ratios of sums (CE over valid pixels, Dice per class), and a ratio of
sums over 4 images is not half the one over 8.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import CLASS_WEIGHTS
from .errors import UserError


def class_weights(histogram: list[int] | np.ndarray, mode: str) -> torch.Tensor | None:
    """Per-class CE weights from a pixel-count histogram (index = class id).

    - "none": None (unweighted CE).
    - "inverse": 1 / freq_c, scaled so the weights average to 1 over present classes.
    - "sqrt_inverse": 1 / sqrt(freq_c), scaled to average 1 over present classes: rare classes count
      more without the extreme weights of "inverse", which trade away pixel accuracy.
    - "median": median frequency balancing, median(freq) / freq_c, the median taken over present
      classes (frequencies are global pixel fractions, not the per-image variant of Eigen & Fergus).

    Classes with zero pixels get weight 0: they never occur as targets in the data the histogram
    describes, and a finite value keeps CE free of inf/nan.
    """
    if mode not in CLASS_WEIGHTS:
        raise ValueError(f"unknown class-weight mode {mode!r}; valid: {', '.join(CLASS_WEIGHTS)}")
    if mode == "none":
        return None
    counts = np.asarray(histogram, dtype=np.float64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("histogram must be a 1-D array of non-negative pixel counts")
    present = counts > 0
    if not present.any():
        # The manifest's histogram of a split whose every pixel is ignored: data, not code, is at fault.
        raise UserError(f"loss.class_weights={mode}: the class histogram (manifest.json class_histogram of "
                        "data.train_split) has no labelled pixels; use loss.class_weights=none")
    freq = counts / counts.sum()
    weights = np.zeros_like(freq)
    if mode in ("inverse", "sqrt_inverse"):
        weights[present] = 1.0 / (freq[present] if mode == "inverse" else np.sqrt(freq[present]))
        weights[present] /= weights[present].mean()
    else:
        weights[present] = np.median(freq[present]) / freq[present]
    return torch.tensor(weights, dtype=torch.float32)


def dice_sums(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Soft Dice's per-class sums over batch and space, stacked (3, C): overlap sum(p_c * y_c), the
    target's pixel count sum(y_c), and sum(p_c), with ignored pixels removed from both sides."""
    num_classes = logits.shape[1]
    target = target.long()
    logits = logits.float()  # softmax and large sums in fp16/bf16 lose too much precision
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    # The ignore value (e.g. 255) must never reach one_hot as an index.
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    mask = valid.unsqueeze(1).float()
    probs = logits.softmax(dim=1) * mask
    onehot = F.one_hot(safe_target, num_classes).permute(0, 3, 1, 2).float() * mask
    dims = (0, 2, 3)
    return torch.stack([(probs * onehot).sum(dims), onehot.sum(dims), probs.sum(dims)])


def dice_from_sums(sums: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean_c dice_c from `dice_sums`, dice_c = (2 * overlap + eps) / (sum p_c + sum y_c + eps).

    The mean runs over classes present in the (valid) target only: a class absent from the target has
    no overlap to reward, and the probability mass it wrongly receives is already penalised through
    the lower dice of the classes present. With no valid pixel at all the loss is 0 and still attached
    to the graph (DDP expects every rank's backward to touch the parameters).
    """
    intersection, gt_count, prob_sum = sums
    dice = (2.0 * intersection + eps) / (prob_sum + gt_count + eps)
    present = (gt_count > 0).float()
    # clamp avoids 0/0 when nothing is valid; the numerator is then 0 too, so the loss is 0.
    return (present * (1.0 - dice)).sum() / present.sum().clamp_min(1.0)


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255, eps: float = 1.0
) -> torch.Tensor:
    """Soft multi-class Dice loss, 1 - mean_c dice_c, for logits (N, C, H, W) and target (N, H, W):
    `dice_from_sums(dice_sums(...))`, sums over batch and space."""
    return dice_from_sums(dice_sums(logits, target, ignore_index), eps)


class SegLoss(nn.Module):
    """`ce_weight * CE + dice_weight * Dice`, both computed in fp32.

    `forward` returns `(total, {"ce": ce, "dice": dice})` with the parts detached, for logging.
    CE is the (class-weighted, optionally label-smoothed) mean over valid pixels, as `F.cross_entropy`,
    except that a target with every pixel ignored yields 0 instead of nan. Dice keeps the hard target.

    `global_batch` (`loss.global_batch` on more than one rank): CE's and Dice's sums are added up over
    the ranks first (`distributed.sum_with_local_grad`), so every rank computes the loss of the global
    batch, and its gradient is scaled by the world size because DDP averages the ranks' gradients where
    the global loss's gradient is their sum. With global BatchNorm, N ranks x B then take the step
    1 rank x N*B would take.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        class_weights: torch.Tensor | None = None,
        global_batch: bool = False,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if class_weights is not None and class_weights.numel() != num_classes:
            raise ValueError(f"class_weights has {class_weights.numel()} entries, expected {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.global_batch = global_batch
        self.label_smoothing = label_smoothing
        self.class_weights: torch.Tensor | None
        # A buffer follows .to(device); non-persistent since it is config, not learned state.
        self.register_buffer(
            "class_weights",
            None if class_weights is None else class_weights.detach().float().clone(),
            persistent=False,
        )

    def ce_sums(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """CE's (class-weighted) sum over valid pixels and its denominator (their count, or weight)."""
        per_pixel = F.cross_entropy(
            logits.float(),
            target,
            weight=self.class_weights,
            ignore_index=self.ignore_index,
            reduction="none",
            label_smoothing=self.label_smoothing,
        )
        valid = target != self.ignore_index
        if self.class_weights is None:
            denom = valid.sum().float()
        else:
            safe_target = torch.where(valid, target, torch.zeros_like(target))
            denom = (self.class_weights[safe_target] * valid).sum()
        return torch.stack([per_pixel.sum(), denom])

    @staticmethod
    def ce_from_sums(sums: torch.Tensor) -> torch.Tensor:
        total, denom = sums
        # When denom is 0 every per-pixel term is 0 as well; dividing by 1 then gives 0, not nan, and
        # keeps the backward finite (a tiny clamp would overflow once GradScaler scales the grad).
        return total / torch.where(denom > 0, denom, torch.ones_like(denom))

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.ce_from_sums(self.ce_sums(logits, target.long()))

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        target = target.long()  # masks often arrive as uint8
        ce_sums = self.ce_sums(logits, target)
        dice_sums_ = dice_sums(logits, target, self.ignore_index)
        ranks = 1
        if self.global_batch:
            sums = distributed.sum_with_local_grad(torch.cat([ce_sums, dice_sums_.flatten()]))
            ce_sums, dice_sums_ = sums[:2], sums[2:].view_as(dice_sums_)
            ranks = distributed.world_size()
        ce, dice = self.ce_from_sums(ce_sums), dice_from_sums(dice_sums_)
        total = self.ce_weight * ce + self.dice_weight * dice
        if ranks > 1:  # the same value, the gradient x ranks (see the class docstring)
            total = total + (ranks - 1) * (total - total.detach())
        return total, {"ce": ce.detach(), "dice": dice.detach()}
