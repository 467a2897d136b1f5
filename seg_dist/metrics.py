"""Exact segmentation metrics across ranks.

Every rank accumulates an int64 confusion matrix, the validation loss sum and its sample count on
its device; `reduce_from_all_processes` sums them over ranks with ONE all-reduce at the end of validation,
so ranks may run different numbers of batches without hanging, and IoUs are computed from the
global counts rather than averaged per batch or per rank.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import distributed


class ConfusionMatrix:
    """`mat[t, p]` counts valid pixels with target class t predicted as p.

    Also carries a weighted loss sum and its weight (`update_loss`) and a sample count
    (`count_samples`), reduced in the same collective: validation loss = sum(loss_b * w_b) / sum(w_b),
    typically w_b = valid pixels.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        n = self.num_classes
        self.mat = torch.zeros((n, n), dtype=torch.int64, device=self.device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_weight = torch.zeros((), dtype=torch.float64, device=self.device)
        self.samples = torch.zeros((), dtype=torch.int64, device=self.device)
        self._reduced = False

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted class ids (must lie in [0, num_classes)) and targets, any same shape."""
        n = self.num_classes
        pred = pred.flatten().to(self.device, torch.int64)
        target = target.flatten().to(self.device, torch.int64)
        # No boolean indexing and no bincount: on CUDA both size their output on the host, a sync per
        # batch. Invalid pixels go to an extra bin that is dropped.
        valid = (target != self.ignore_index) & (target >= 0) & (target < n)
        idx = torch.where(valid, n * target + pred, n * n)
        counts = torch.zeros(n * n + 1, dtype=torch.int64, device=self.device)
        counts.scatter_add_(0, idx, torch.ones_like(idx))
        self.mat += counts[:-1].view(n, n)

    @torch.no_grad()
    def update_loss(self, loss: torch.Tensor | float, weight: torch.Tensor | float = 1.0) -> None:
        """Accumulate a batch loss (a mean) with its weight, e.g. the batch's valid-pixel count."""
        loss = torch.as_tensor(loss).detach().to(self.device, torch.float64)
        weight = torch.as_tensor(weight).detach().to(self.device, torch.float64)
        self.loss_sum += loss * weight
        self.loss_weight += weight

    def count_samples(self, n: int) -> None:
        self.samples += n

    @property
    def samples_seen(self) -> int:
        return int(self.samples)

    def reduce_from_all_processes(self) -> None:
        """Sum over ranks (every rank must call it exactly once); a no-op without a process group.

        Matrix, loss sum and weight and sample count are packed into one float64 tensor so a single collective
        suffices; float64 holds integer counts exactly up to 2**53 pixels per cell. The tensor
        lives on `device`, which must suit the backend (a CUDA device for nccl).
        """
        if not distributed.is_initialized():
            return
        if self._reduced:
            raise RuntimeError("ConfusionMatrix already reduced; call reset() before accumulating again")
        mat, self.loss_sum, self.loss_weight, samples = distributed.sum_packed(
            [self.mat, self.loss_sum, self.loss_weight, self.samples])
        self.mat = mat.round().to(torch.int64)
        self.samples = samples.round().to(torch.int64)
        self._reduced = True

    def compute(self) -> dict[str, float | list[float]]:
        """Metrics from the (reduced) matrix.

        Per-class IoU / Dice are NaN for classes absent from both target and prediction; `miou`
        and `mean_dice` average over the classes present in target OR prediction. `loss` is NaN
        if no loss was recorded; any value is NaN when there is nothing to average.
        """
        mat = self.mat.detach().cpu().double().numpy()
        tp = np.diag(mat)
        gt = mat.sum(axis=1)
        pr = mat.sum(axis=0)
        union = gt + pr - tp
        present = union > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(present, tp / union, np.nan)
            dice = np.where(present, 2 * tp / (gt + pr), np.nan)
            precision = np.where(pr > 0, tp / pr, np.nan)  # of the pixels predicted as c, how many are c
            recall = np.where(gt > 0, tp / gt, np.nan)  # of the pixels of c, how many were found
            share = gt / gt.sum() if gt.sum() > 0 else np.zeros_like(gt)
        total = mat.sum()
        loss_weight = float(self.loss_weight)
        return {
            "per_class_iou": iou.tolist(),
            "per_class_dice": dice.tolist(),
            "per_class_precision": precision.tolist(),
            "per_class_recall": recall.tolist(),
            "per_class_gt_share": share.tolist(),
            "miou": float(iou[present].mean()) if present.any() else math.nan,
            "mean_dice": float(dice[present].mean()) if present.any() else math.nan,
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
            "loss": float(self.loss_sum) / loss_weight if loss_weight > 0 else math.nan,
        }
