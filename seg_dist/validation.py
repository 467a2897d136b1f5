"""Validation over each rank's exact-once share, reduced to exact global metrics.

`validate` is what the trainer runs every epoch (batches padded to a common size). `evaluate_predictor`
is what `python -m seg_dist.evaluate` runs on a checkpoint: the predict path (`seg_dist.inference`), each
image at its own size, scored against its mask as stored. Both reduce one int64 confusion matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .config import AUTO_VAL_SHARE, DataConfig, Every
from .data import normalize_padded
from .inference import Predictor
from .metrics import ConfusionMatrix
from .precision import autocast

Example = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


HYSTERESIS = 0.8  # auto: validate more often again only once validation needs 20% less than that would allow


class Cadence:
    """When the trainer validates besides the run's end (`train.val_every`). A validation is a collective, so
    every rank must decide alike: the trainer feeds each rank the same agreed figures (all-reduced).

    auto validates after the first epoch, then every N epochs with N the fewest that keep one validation's
    time to `share` of the training time between two: re-measured at each validation, as epochs and
    validations change speed.
    """

    def __init__(self, every: Every, share: float = AUTO_VAL_SHARE, epoch: int = 0, step: int = 0,
                 elapsed: float = 0.0) -> None:
        self.every, self.share = every, share
        self.epochs = int(every.amount) if every.unit == "epochs" else 1
        self.last_epoch, self.last_step, self.last_time = epoch, step, elapsed  # at the last validation (or start)

    @property
    def mid_epoch(self) -> bool:
        """Whether validations may fall inside an epoch (steps and minutes)."""
        return self.every.unit in ("steps", "minutes")

    def due(self, epoch: int, step: int, elapsed: float, epoch_end: bool) -> bool:
        """`epoch`: epochs completed; `step`: global step; `elapsed`: the run's agreed wall time in seconds."""
        unit, amount = self.every.unit, self.every.amount
        if unit == "steps":  # at multiples, so a resumed run validates where it would have
            return step > self.last_step and step % amount == 0
        if unit == "minutes":
            return elapsed - self.last_time >= amount * 60
        if unit == "epochs":
            return epoch_end and epoch > self.last_epoch and epoch % self.epochs == 0
        return epoch_end and epoch - self.last_epoch >= self.epochs

    def validated(self, epoch: int, step: int, elapsed: float, val_seconds: float, train_seconds: float
                  ) -> str | None:
        """Record a validation that took `val_seconds` after `train_seconds` of training since the previous
        one; under auto, returns a sentence when the cadence changes (for the log)."""
        epochs_trained = epoch - self.last_epoch
        self.last_epoch, self.last_step, self.last_time = epoch, step, elapsed
        if self.every.unit != "auto" or epochs_trained <= 0 or train_seconds <= 0:
            return None
        per_epoch = train_seconds / epochs_trained
        needed = val_seconds / (self.share * per_epoch)  # epochs of training one validation may follow
        epochs = max(1, math.ceil(needed))
        # Fewer epochs only with a margin: timings near a boundary would flip the cadence at every validation.
        if epochs == self.epochs or (epochs < self.epochs and needed > HYSTERESIS * (self.epochs - 1)):
            return None
        self.epochs = epochs
        every = "every epoch" if epochs == 1 else f"every {epochs} epochs"
        return (f"validating {every} and at the end (train.val_every=auto: one validation takes {val_seconds:.2g} s, "
                f"an epoch of training {per_epoch:.2g} s; validation is kept to about {self.share:.0%} of the "
                "time)")


@dataclass
class Validation:
    metrics: dict[str, Any]
    samples_seen: int  # over all ranks
    matrix: torch.Tensor  # the reduced int64 confusion matrix, on CPU
    # The split's first `keep` samples (smallest keys, whichever rank validated them), on CPU, for overlays:
    # (H x W x C image as the model saw it, in its own type before normalisation, target, prediction), unpadded.
    examples: list[Example] = field(default_factory=list)
    example_keys: list[str] = field(default_factory=list)  # the sample key of each example


class _FirstSamples:
    """The `keep` samples with the smallest keys this rank has seen (the packer writes a split in key
    order, so on one rank these are the split's first samples). Copies to the CPU only those that enter."""

    def __init__(self, keep: int, num_classes: int) -> None:
        self.keep = keep
        self.pred_dtype = torch.uint8 if num_classes <= 256 else torch.int32
        self.kept: list[tuple[str, Example]] = []

    def offer(self, raw: torch.Tensor, masks: torch.Tensor, pred: torch.Tensor, keys: list[str],
              sizes: list[tuple[int, int]]) -> None:
        for i, key in enumerate(keys):
            if len(self.kept) >= self.keep and key >= self.kept[-1][0]:
                continue
            h, w = sizes[i]
            example = (raw[i, :h, :w].cpu().clone(), masks[i, :h, :w].cpu().clone(),
                       pred[i, :h, :w].to(self.pred_dtype).cpu())
            self.kept.append((key, example))
            self.kept.sort(key=lambda item: item[0])
            del self.kept[self.keep :]

    def gathered(self) -> tuple[list[Example], list[str]]:
        """The first samples over all ranks, the same on every rank. Collective on several ranks, called by
        every rank whatever its `keep`: the count kept is the largest `keep` of any rank. Two gathers: keys
        first, then only the chosen examples travel."""
        if distributed.world_size() == 1:
            return [e for _, e in self.kept], [k for k, _ in self.kept]
        offers = distributed.all_gather_objects((self.keep, [k for k, _ in self.kept]))
        want = max(keep for keep, _ in offers)
        if want == 0:
            return [], []
        chosen = sorted((key, r, i) for r, (_, keys) in enumerate(offers) for i, key in enumerate(keys))[:want]
        me = distributed.rank()
        mine = [(key, r, self.kept[i][1]) for key, r, i in chosen if r == me]
        merged = sorted((item for part in distributed.all_gather_objects(mine) for item in part),
                        key=lambda item: (item[0], item[1]))
        return [e for _, _, e in merged], [k for k, _, _ in merged]


@torch.no_grad()
def validate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor, list[str], list[tuple[int, int]]]],
    num_classes: int,
    ignore_index: int,
    device: torch.device,
    data_cfg: DataConfig,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    keep: int = 0,
    progress: Any = None,
) -> Validation:
    """Run `model` (unwrapped: no DDP hooks, so ranks with unequal batch counts cannot hang).

    The collectives come after the loop, on every rank: the reduction of the confusion matrix
    (`ConfusionMatrix.reduce_from_all_processes`) and, on several ranks, the gathering of the examples.
    The loss is the per-pixel cross-entropy summed over all valid pixels of all ranks, so, like the
    confusion matrix, it does not depend on how the set was split into batches or ranks.

    `keep`: how many examples for overlays, the split's first (smallest keys) wherever they were
    validated; give every rank the same `keep`, as each rank keeps candidates from its own share.
    """
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device)
    first = _FirstSamples(keep, num_classes)
    for raw, masks, keys, sizes in loader:
        images = normalize_padded(raw.to(device, non_blocking=True), sizes, data_cfg.mean, data_cfg.std,
                                  channels_last)
        masks = masks.to(device, non_blocking=True).long()
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        ce_sum = F.cross_entropy(logits, masks, ignore_index=ignore_index, reduction="sum")
        valid = (masks != ignore_index).sum()
        cm.update_loss(ce_sum / valid.clamp(min=1), valid)
        pred = logits.argmax(1)
        cm.update(pred, masks)
        cm.count_samples(images.shape[0])
        if keep > 0:
            first.offer(raw, masks, pred, keys, sizes)
        if progress is not None:
            progress.update(images.shape[0])
    cm.reduce_from_all_processes()
    examples, example_keys = first.gathered()
    model.train(was_training)
    return Validation(metrics=cm.compute(), samples_seen=cm.samples_seen, matrix=cm.mat.cpu(), examples=examples,
                      example_keys=example_keys)


def evaluate_predictor(
    predictor: Predictor,
    samples: Iterable[tuple[np.ndarray, np.ndarray, str]],
    ignore_index: int,
    batch_size: int = 1,
    progress: Any = None,
) -> Validation:
    """Score `predictor` on (image, stored mask, key) samples at each mask's own resolution: exactly
    the masks `seg_dist.predict` writes, counted against the ground truth. One all-reduce at the end."""
    device = predictor.device
    cm = ConfusionMatrix(predictor.num_classes, ignore_index, device)

    def score(batch: list[tuple[np.ndarray, np.ndarray, str]]) -> None:
        for logits, (_, mask, _) in zip(predictor.logits_batch([image for image, _, _ in batch]), batch, strict=True):
            target = torch.from_numpy(np.asarray(mask, dtype=np.int64)).to(device)
            ce_sum = F.cross_entropy(logits[None], target[None], ignore_index=ignore_index, reduction="sum")
            valid = (target != ignore_index).sum()
            cm.update_loss(ce_sum / valid.clamp(min=1), valid)
            cm.update(logits.argmax(0), target)
        cm.count_samples(len(batch))
        if progress is not None:
            progress.update(len(batch))

    batch: list[tuple[np.ndarray, np.ndarray, str]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            score(batch)
            batch = []
    if batch:
        score(batch)
    cm.reduce_from_all_processes()
    return Validation(metrics=cm.compute(), samples_seen=cm.samples_seen, matrix=cm.mat.cpu())


def metrics_table(metrics: dict[str, Any], class_names: list[str], samples: int) -> str:
    """Per-class IoU, Dice, precision, recall and ground-truth share, then the means: paste-ready text."""
    width = max([len(n) for n in class_names] + [5])
    rows = [f"{'class':<{width}}  {'IoU':>6}  {'Dice':>6}  {'prec':>6}  {'recall':>6}  {'GT share':>8}"]

    def cell(v: float, w: int = 6) -> str:
        return f"{'-':>{w}}" if v is None or math.isnan(v) else f"{v:>{w}.4f}"

    for i, name in enumerate(class_names):
        rows.append(f"{name:<{width}}  {cell(metrics['per_class_iou'][i])}  {cell(metrics['per_class_dice'][i])}  "
                    f"{cell(metrics['per_class_precision'][i])}  {cell(metrics['per_class_recall'][i])}  "
                    f"{100 * metrics['per_class_gt_share'][i]:>7.2f}%")
    rows.append(f"mIoU {metrics['miou']:.4f}   mean Dice {metrics['mean_dice']:.4f}   pixel accuracy "
                f"{metrics['pixel_accuracy']:.4f}   loss {metrics['loss']:.4f}   {samples} samples")
    return "\n".join(rows)
