"""Model factory: a table of builders, each taking the run's `model:` section and the class count.

A new model is a builder function `(ModelConfig, num_classes) -> nn.Module` and a row in `MODELS`;
`model.name` is checked against that table when the config is loaded, and `check_model` checks the rest of
`model.*` for that name. Models that differ only by configuration share a row: `smp` builds any of smp's
architectures (`model.arch`) over any of its encoders (`model.encoder`, `models/smp.py`). `encoder_of(model)`
names the part that `model.freeze_encoder_epochs` and `optim.encoder_lr_mult` act on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from seg_dist.models import checkpointing
from seg_dist.models.smp import (
    SMP_MISSING,
    SMP_NAMES,
    SmpMissing,
    SmpSegmenter,
    adapt_first_conv,
    build_smp,
    load_encoder_weights,
)
from seg_dist.models.smp import check_config as check_smp_config
from seg_dist.models.unet import DoubleConv, Down, OutConv, UNet, Up

if TYPE_CHECKING:  # config imports this table to check model.name, so only type checkers import config here
    from seg_dist.config import ModelConfig

__all__ = [
    "MODELS", "MODEL_NAMES", "SMP_MISSING", "SMP_NAMES", "DoubleConv", "Down", "OutConv", "SmpMissing",
    "SmpSegmenter", "UNet", "Up", "adapt_first_conv", "build_model", "check_model", "count_parameters",
    "encoder_of", "freeze_encoder_batchnorm", "load_encoder_weights",
]

log = logging.getLogger("seg_dist.models")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_unet(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Our U-Net (`models/unet.py`): `width` base channels, `depth` down-steps, any input size; in_channels 0
    (not resolved from data: `data.resolve_inputs`) builds the classic 3-channel one. With activation
    checkpointing each level's blocks (`inc`, every down and up step) keep only their inputs."""
    model = UNet(cfg.in_channels or 3, num_classes, width=cfg.width, depth=cfg.depth, bilinear=cfg.bilinear,
                 norm=cfg.norm)
    if cfg.activation_checkpointing:
        checkpointing.enable([model.inc, *model.downs, *model.ups])
    return model


def encoder_of(model: nn.Module) -> nn.Module | None:
    """The pretrained-style part of `model` (through DDP and torch.compile wrappers), or None.

    smp models: their `encoder`. Our U-Net: its contracting path (`inc` and every `downs` block, the
    bottleneck included), returned as a ModuleList that shares those modules and parameters.
    """
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    if isinstance(model, SmpSegmenter):
        return model.encoder
    if isinstance(model, UNet):
        return nn.ModuleList([model.inc, model.downs])
    encoder = getattr(model, "encoder", None)
    return encoder if isinstance(encoder, nn.Module) else None


def freeze_encoder_batchnorm(model: nn.Module) -> int:
    """Put the encoder's BatchNorm layers in eval mode (running statistics stay as they are until the
    next `model.train()`); returns how many layers that was."""
    encoder = encoder_of(model)
    norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if encoder else []
    for m in norms:
        m.eval()
    return len(norms)


MODELS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "unet": build_unet,
    "smp_unet": build_smp,  # smp with model.arch=Unet: the name configs and checkpoints used before model.arch
    "smp": build_smp,  # model.arch over model.encoder
}
MODEL_NAMES = tuple(MODELS)


def check_model(cfg: ModelConfig) -> None:
    """What can be checked of `model.*` beyond each key's range when a config is loaded (UserError naming the
    key): for smp models, the architecture, encoder and weights name against smp's own lists."""
    if cfg.name in SMP_NAMES:
        check_smp_config(cfg)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model a run's `model:` section describes, returning logits of shape (N, num_classes, H, W)."""
    builder = MODELS.get(cfg.name)
    if builder is None:
        raise ValueError(f"unknown model.name={cfg.name!r}; valid names: {', '.join(MODELS)}")
    return builder(cfg, num_classes)
