"""Model factory: our U-Net, or an optional segmentation_models_pytorch U-Net."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from seg_dist.config import ModelConfig
from seg_dist.models.unet import DoubleConv, Down, OutConv, UNet, Up

__all__ = [
    "MODEL_NAMES", "DoubleConv", "Down", "OutConv", "UNet", "Up",
    "build_model", "count_parameters", "model_from_config",
]

MODEL_NAMES = ("unet", "smp_unet")

SMP_MISSING = (
    "model.name=smp_unet needs the smp extra: pip install 'seg_dist[smp]' (with a torchvision matching torch)"
)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    width: int = 64,
    depth: int = 4,
    bilinear: bool = False,
    encoder: str = "resnet34",
    encoder_weights: str | None = None,
) -> nn.Module:
    """Build a segmentation model returning logits of shape (N, num_classes, H, W).

    - "unet": `UNet(in_channels, num_classes, width, depth, bilinear)`; `encoder*` are ignored.
    - "smp_unet": `segmentation_models_pytorch.Unet` with `encoder`; `width/depth/bilinear` are
      ignored. Nothing is downloaded: `encoder_weights` must be a local path to a state dict for
      `model.encoder` (e.g. a torchvision/timm ResNet checkpoint), or None for random init.
    """
    if name == "unet":
        return UNet(in_channels, num_classes, width=width, depth=depth, bilinear=bilinear)
    if name == "smp_unet":
        return _build_smp_unet(num_classes, in_channels, encoder, encoder_weights)
    raise ValueError(f"unknown model.name={name!r}; valid names: {', '.join(MODEL_NAMES)}")


def _build_smp_unet(
    num_classes: int, in_channels: int, encoder: str, encoder_weights: str | None
) -> nn.Module:
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

    model = smp.Unet(encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=num_classes)
    if encoder_weights is not None:
        state = torch.load(encoder_weights, map_location="cpu", weights_only=True)
        model.encoder.load_state_dict(state)
    return model


def model_from_config(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model a run's `model:` section describes (the trainer, evaluate and predict share it)."""
    return build_model(
        cfg.name, num_classes, in_channels=cfg.in_channels, width=cfg.width, depth=cfg.depth,
        bilinear=cfg.bilinear, encoder=cfg.encoder, encoder_weights=cfg.encoder_weights,
    )
