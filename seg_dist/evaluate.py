"""Validation over each rank's exact-once share, reduced to exact global metrics.

`validate` is what the trainer runs every epoch; the `evaluate` command reuses it unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import atomic, checkpoint, data, distributed, precision, shards
from .config import Config, ConfigError, load_config_dict
from .log import setup_logging
from .metrics import ConfusionMatrix
from .models import model_from_config
from .precision import autocast

log = logging.getLogger("seg_dist.evaluate")


@dataclass
class Validation:
    metrics: dict[str, Any]
    samples_seen: int  # over all ranks
    matrix: torch.Tensor  # the reduced int64 confusion matrix, on CPU
    # Up to `keep` (image, target, prediction) triples from this rank, on CPU, for overlays.
    examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class Trained:
    model: nn.Module
    cfg: Config
    num_classes: int
    ignore_index: int
    class_names: list[str]
    global_step: int


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

    The only collectives are the two at the end. The loss is the per-pixel cross-entropy summed
    over all valid pixels of all ranks, so, like the confusion matrix, it does not depend on how
    the set was split into batches or ranks.
    """
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device)
    seen = torch.zeros((), dtype=torch.int64, device=device)
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
        seen += images.shape[0]
        for i in range(min(images.shape[0], keep - len(examples))):
            examples.append((images[i].float().cpu(), masks[i].cpu(), pred[i].cpu()))
        if progress is not None:
            progress.update(images.shape[0])
    cm.reduce_from_all_processes()
    distributed.all_reduce_(seen)
    model.train(was_training)
    return Validation(metrics=cm.compute(), samples_seen=int(seen.item()), matrix=cm.mat.cpu(), examples=examples)


def load_trained(path: str | Path, device: torch.device, overrides: list[str] | tuple[str, ...] = ()) -> Trained:
    """A checkpoint's model (in eval mode, on `device`) with the config it was trained with."""
    state = checkpoint.load(path, map_location=device)
    cfg = load_config_dict(state["config"], overrides)
    model = model_from_config(cfg.model, state["num_classes"]).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return Trained(model, cfg, state["num_classes"], state["ignore_index"], list(state["class_names"]),
                   state["global_step"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m seg_dist.evaluate",
                                description="Exact metrics of a checkpoint on a split (any number of ranks).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default=None, help="default: the run's data.val_split")
    p.add_argument("--out", default=None, help="also write the metrics as JSON here")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. data.root=shards/other")
    args = p.parse_args(argv)
    with distributed.setup() as (denv, device):
        setup_logging(denv.rank)
        try:
            trained = load_trained(args.checkpoint, device, args.overrides)
            cfg = trained.cfg
            manifest = shards.load_manifest(cfg.data.root)
            split = args.split or cfg.data.val_split
            loader = data.val_loader(cfg, manifest, cfg.data.root, denv.rank, denv.world_size, split=split)
            expected = shards.split_count(manifest, split)
        except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
            log.error("%s", e)
            return 2
        amp_dtype = precision.resolve_amp(cfg.train.amp, device)
        bar = tqdm(total=data.val_share(manifest, split, denv.rank, denv.world_size), desc=f"evaluate {split}",
                   disable=not denv.is_main)
        result = validate(trained.model, loader, trained.num_classes, trained.ignore_index, device, amp_dtype,
                          cfg.train.channels_last, progress=bar)
        bar.close()
        if result.samples_seen != expected:
            log.error("saw %d samples of split %r, the manifest lists %d", result.samples_seen, split, expected)
            return 1
        if denv.is_main:
            report = {"checkpoint": str(args.checkpoint), "split": split, "samples": result.samples_seen,
                      "global_step": trained.global_step, **result.metrics,
                      "class_names": trained.class_names, "confusion_matrix": result.matrix.tolist()}
            text = json.dumps(report, indent=2)
            if args.out:
                atomic.write_text(args.out, text + "\n")
            print(json.dumps({k: report[k] for k in ("split", "samples", "miou", "pixel_accuracy", "loss")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
