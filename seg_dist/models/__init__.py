"""Model factory: a table of builders, each taking the run's `model:` section and the class count.

A new model is a builder function `(ModelConfig, num_classes) -> nn.Module` and a row in `MODELS`;
`model.name` is checked against that table when the config is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from seg_dist.config import ModelConfig
from seg_dist.models.unet import DoubleConv, Down, OutConv, UNet, Up

__all__ = ["MODELS", "MODEL_NAMES", "DoubleConv", "Down", "OutConv", "UNet", "Up", "build_model", "count_parameters"]

SMP_MISSING = (
    "model.name=smp_unet needs the smp extra: pip install 'seg_dist[smp]' (with a torchvision matching torch)"
)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_unet(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Our U-Net (`models/unet.py`): `width` base channels, `depth` down-steps, any input size."""
    return UNet(cfg.in_channels, num_classes, width=cfg.width, depth=cfg.depth, bilinear=cfg.bilinear)


def build_smp_unet(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """`segmentation_models_pytorch.Unet` with `cfg.encoder`. Nothing is downloaded: `cfg.encoder_weights`
    is a local state dict for `model.encoder` (e.g. a timm/torchvision ResNet checkpoint), or None."""
    encoder_weights = cfg.encoder_weights
    # Checked before the heavy import so a config typo fails fast, and so named weights such as
    # "imagenet" (smp's own convention, which downloads) are rejected instead of fetched.
    if encoder_weights is not None and not Path(encoder_weights).is_file():
        raise FileNotFoundError(
            f"model.encoder_weights={encoder_weights!r} is not a file; pass a local state-dict path "
            "(weights are never downloaded at run time) or leave it unset"
        )
    try:
        import segmentation_models_pytorch as smp
    except (ImportError, RuntimeError) as e:  # RuntimeError: torchvision built for another torch
        raise ImportError(f"{SMP_MISSING} [{type(e).__name__}: {e}]") from e

    model = smp.Unet(encoder_name=cfg.encoder, encoder_weights=None, in_channels=cfg.in_channels,
                     classes=num_classes)
    if encoder_weights is not None:
        state = torch.load(encoder_weights, map_location="cpu", weights_only=True)
        model.encoder.load_state_dict(state)
    return model


MODELS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "unet": build_unet,
    "smp_unet": build_smp_unet,
}
MODEL_NAMES = tuple(MODELS)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model a run's `model:` section describes, returning logits of shape (N, num_classes, H, W)."""
    builder = MODELS.get(cfg.name)
    if builder is None:
        raise ValueError(f"unknown model.name={cfg.name!r}; valid names: {', '.join(MODELS)}")
    return builder(cfg, num_classes)
