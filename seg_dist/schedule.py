"""Learning-rate schedules: per-iteration poly and cosine with linear warmup, or a plateau rule.

Per-iteration schedules are stepped after every optimiser step. ReduceLROnPlateau is stepped after
each validation with the all-reduced validation loss, so every rank takes the same decision.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, ReduceLROnPlateau

from .config import ScheduleConfig


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


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int
) -> LRScheduler | ReduceLROnPlateau:
    if cfg.name == "plateau":
        return ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience, min_lr=cfg.min_lr
        )
    base_lr = optimizer.param_groups[0]["lr"]
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg, base_lr))


def is_per_iteration(scheduler: object) -> bool:
    return not isinstance(scheduler, ReduceLROnPlateau)
