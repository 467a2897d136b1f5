"""Validation over each rank's exact-once share, reduced to exact global metrics.

`validate` is what the trainer runs every epoch and what `python -m seg_dist.evaluate` runs on a
checkpoint: the same code, so their figures agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import ConfusionMatrix
from .precision import autocast


@dataclass
class Validation:
    metrics: dict[str, Any]
    samples_seen: int  # over all ranks
    matrix: torch.Tensor  # the reduced int64 confusion matrix, on CPU
    # Up to `keep` (image, target, prediction) triples from this rank, on CPU, for overlays.
    examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]],
    num_classes: int,
    ignore_index: int,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    keep: int = 0,
    progress: Any = None,
) -> Validation:
    """Run `model` (unwrapped: no DDP hooks, so ranks with unequal batch counts cannot hang).

    The only collective is the one at the end (`ConfusionMatrix.reduce_from_all_processes`). The
    loss is the per-pixel cross-entropy summed over all valid pixels of all ranks, so, like the
    confusion matrix, it does not depend on how the set was split into batches or ranks.
    """
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device)
    examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for images, masks, _keys in loader:
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        ce_sum = F.cross_entropy(logits, masks, ignore_index=ignore_index, reduction="sum")
        valid = (masks != ignore_index).sum()
        cm.update_loss(ce_sum / valid.clamp(min=1), valid)
        pred = logits.argmax(1)
        cm.update(pred, masks)
        cm.count_samples(images.shape[0])
        for i in range(min(images.shape[0], keep - len(examples))):
            examples.append((images[i].float().cpu(), masks[i].cpu(), pred[i].cpu()))
        if progress is not None:
            progress.update(images.shape[0])
    cm.reduce_from_all_processes()
    model.train(was_training)
    return Validation(metrics=cm.compute(), samples_seen=cm.samples_seen, matrix=cm.mat.cpu(), examples=examples)
