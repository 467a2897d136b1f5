"""Exact segmentation metrics across ranks.

Every rank accumulates an int64 confusion matrix (and the validation loss sum) on its device;
`reduce_from_all_processes` sums them over ranks with ONE all-reduce at the end of validation,
so ranks may run different numbers of batches without hanging, and IoUs are computed from the
global counts rather than averaged per batch or per rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw


class ConfusionMatrix:
    """`mat[t, p]` counts valid pixels with target class t predicted as p.

    Also carries a weighted loss sum and its weight (`update_loss`), reduced in the same
    collective: validation loss = sum(loss_b * w_b) / sum(w_b), typically w_b = valid pixels.
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

    def reduce_from_all_processes(self) -> None:
        """Sum over ranks (every rank must call it exactly once); a no-op without a process group.

        Matrix, loss sum and weight are packed into one float64 tensor so a single collective
        suffices; float64 holds integer counts exactly up to 2**53 pixels per cell. The tensor
        lives on `device`, which must suit the backend (a CUDA device for nccl).
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._reduced:
            raise RuntimeError("ConfusionMatrix already reduced; call reset() before accumulating again")
        packed = torch.cat([self.mat.flatten().double(), self.loss_sum.view(1), self.loss_weight.view(1)])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        nn = self.num_classes * self.num_classes
        self.mat = packed[:nn].round().to(torch.int64).reshape(self.mat.shape)
        self.loss_sum = packed[nn]
        self.loss_weight = packed[nn + 1]
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
        total = mat.sum()
        loss_weight = float(self.loss_weight)
        return {
            "per_class_iou": iou.tolist(),
            "per_class_dice": dice.tolist(),
            "miou": float(iou[present].mean()) if present.any() else math.nan,
            "mean_dice": float(dice[present].mean()) if present.any() else math.nan,
            "pixel_accuracy": float(tp.sum() / total) if total > 0 else math.nan,
            "loss": float(self.loss_sum) / loss_weight if loss_weight > 0 else math.nan,
        }


def _colour(v: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1)."""
    return (round(255 - 247 * v), round(255 - 207 * v), round(255 - 148 * v))


def confusion_matrix_figure(
    mat: torch.Tensor | np.ndarray, class_names: Sequence[str] | None = None, max_size: int = 1024
) -> np.ndarray:
    """Heatmap of the row-normalised confusion matrix (rows: target, columns: prediction).

    Returns an HxWx3 uint8 image (for `SummaryWriter.add_image(..., dataformats="HWC")`), drawn
    with PIL only. Rows with no target pixels stay white. Cell values (percent of the row) are
    written when cells are large enough; columns are labelled by class index.
    """
    m = np.asarray(mat.detach().cpu() if isinstance(mat, torch.Tensor) else mat, dtype=np.float64)
    n = m.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n or m.shape != (n, n):
        raise ValueError(f"expected a square {len(names)}x{len(names)} matrix, got {m.shape}")
    rows = m.sum(axis=1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(s: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), s)
        return right - left, bottom - top

    labels = [f"{i} {name}" for i, name in enumerate(names)]
    label_w = max(text_size(s)[0] for s in labels) + 8
    char_h = text_size("0")[1]
    cell = max(2, min(28, (max_size - label_w) // max(n, 1)))
    top = char_h + 8 + (char_h + 6 if cell >= 14 else 0)
    img = Image.new("RGB", (label_w + n * cell + 1, top + n * cell + 1), "white")
    draw = ImageDraw.Draw(img)
    draw.text((label_w, 2), "target \\ pred", fill="black")

    for i in range(n):
        y = top + i * cell
        if cell >= char_h:
            draw.text((2, y + (cell - char_h) // 2), labels[i], fill="black")
        if cell >= 14:
            w, _ = text_size(str(i))
            draw.text((label_w + i * cell + (cell - w) // 2, top - char_h - 4), str(i), fill="black")
        for j in range(n):
            x = label_w + j * cell
            v = float(norm[i, j])
            draw.rectangle([x, y, x + cell, y + cell], fill=_colour(v), outline=(200, 200, 200))
            if cell >= 24 and rows[i, 0] > 0:
                s = f"{100 * v:.0f}"
                w, h = text_size(s)
                fg = "white" if v > 0.5 else "black"
                draw.text((x + (cell - w) // 2, y + (cell - h) // 2), s, fill=fg)
    return np.asarray(img, dtype=np.uint8)
