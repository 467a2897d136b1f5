"""Learning-rate schedules: per-iteration poly and cosine with linear warmup, or a plateau rule.

Per-iteration schedules are stepped after every optimiser step. ReduceLROnPlateau is stepped after
each validation with the all-reduced validation loss, so every rank takes the same decision.

Fine-tuning a pretrained encoder: `param_groups` puts the encoder's parameters (`models.encoder_of`) in
a group of their own at `optim.lr x optim.encoder_lr_mult`, and the per-iteration schedule gives that
group a factor of 0 for its first `freeze_steps` steps (`model.freeze_encoder_epochs` epochs). The
encoder is frozen by its learning rate, never by `requires_grad`: the learning rate stays a pure
function of the step (a resume lands on the same value), and DDP's reducer sees the same parameters
needing gradients throughout. With AdamW a learning rate of 0 also means no weight decay (the decoupled
decay is lr x weight_decay).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from .config import ConfigError, ScheduleConfig

ENCODER_GROUP = "encoder"  # the `name` of the encoder's param group; the other group is "main"


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig, base_lr: float) -> float:
    """Multiplier of the base learning rate after `step` optimiser steps."""
    if cfg.warmup_iters > 0 and step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    if cfg.name in ("constant", "plateau"):
        return 1.0
    span = max(1, total_steps - cfg.warmup_iters)
    progress = min(1.0, (step - cfg.warmup_iters) / span)
    floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
    if cfg.name == "poly":
        decay = (1.0 - progress) ** cfg.power
    elif cfg.name == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown schedule {cfg.name!r}")
    return floor + (1.0 - floor) * decay


def group_factor(step: int, total_steps: int, cfg: ScheduleConfig, base_lr: float, frozen_steps: int = 0) -> float:
    """`lr_factor` for a param group that is frozen (factor 0) for its first `frozen_steps` steps.

    `base_lr` is the main group's, for every group: an encoder group keeps `encoder_lr_mult` x the main
    group's rate at every step (min_lr scales with it)."""
    if step < frozen_steps:
        return 0.0
    return lr_factor(step, total_steps, cfg, base_lr)


def param_groups(model: nn.Module, lr: float, encoder: nn.Module | None, encoder_lr_mult: float = 1.0,
                 separate: bool = True) -> list[dict[str, Any]]:
    """The optimiser's param groups: "main" (everything else, first, so `param_groups[0]` is the run's
    learning rate in logs) and, when `separate` and there is an encoder, "encoder" at lr x encoder_lr_mult.

    Without `separate` it is one group, as before these knobs existed, so old checkpoints still resume.
    """
    if encoder_lr_mult < 0:
        raise ConfigError(f"optim.encoder_lr_mult={encoder_lr_mult}: must be at least 0")
    params = [p for p in model.parameters() if p.requires_grad]
    if not separate:
        return [{"params": params, "lr": lr, "name": "main"}]
    if encoder is None:
        raise ConfigError(f"{type(model).__name__} has no encoder: model.freeze_encoder_epochs and "
                          "optim.encoder_lr_mult need a model with one (unet, smp)")
    in_encoder = {id(p) for p in encoder.parameters()}
    main = [p for p in params if id(p) not in in_encoder]
    enc = [p for p in params if id(p) in in_encoder]
    if not enc:
        raise ConfigError("the model's encoder has no trainable parameters to put in their own group")
    return [{"params": main, "lr": lr, "name": "main"},
            {"params": enc, "lr": lr * encoder_lr_mult, "name": ENCODER_GROUP}]


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int | Callable[[], int],
    freeze_steps: int = 0,
) -> LRScheduler | ReduceLROnPlateau:
    """The run's schedule; `freeze_steps` > 0 holds the "encoder" param group at 0 for that many steps.

    `total_steps` may be a function, read at every step: a run with a time budget learns its horizon as
    it goes, and the rate stays a function of the step and that horizon."""
    groups = optimizer.param_groups
    if freeze_steps < 0:
        raise ConfigError(f"model.freeze_encoder_epochs: {freeze_steps} frozen steps, must be at least 0")
    if freeze_steps and not any(g.get("name") == ENCODER_GROUP for g in groups):
        raise ValueError("freeze_steps needs an optimiser with an 'encoder' param group (schedule.param_groups)")
    if cfg.name == "plateau":
        if freeze_steps:
            # ReduceLROnPlateau only ever scales each group's rate down: it cannot hold a group at 0 and
            # release it at a given step, and mixing it with a LambdaLR makes the rate depend on both.
            raise ConfigError("model.freeze_encoder_epochs needs a per-iteration schedule (poly, cosine or "
                              "constant), not schedule.name=plateau; optim.encoder_lr_mult works with plateau")
        main_lr = groups[0]["lr"]
        min_lrs = [cfg.min_lr * (g["lr"] / main_lr if main_lr > 0 else 1.0) for g in groups]
        return ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience,
            min_lr=min_lrs if len(groups) > 1 else cfg.min_lr,
        )
    base_lr = groups[0]["lr"]
    horizon = total_steps if callable(total_steps) else lambda: total_steps

    def factor(frozen: int) -> Any:
        return lambda step: group_factor(step, horizon(), cfg, base_lr, frozen)

    return LambdaLR(optimizer, [factor(freeze_steps if g.get("name") == ENCODER_GROUP else 0) for g in groups])


def is_per_iteration(scheduler: object) -> bool:
    return not isinstance(scheduler, ReduceLROnPlateau)
