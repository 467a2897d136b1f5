"""Model factory: a table of builders, each taking the run's `model:` section and the class count.

A new model is a builder function `(ModelConfig, num_classes) -> nn.Module` and a row in `MODELS`;
`model.name` is checked against that table when the config is loaded. `encoder_of(model)` names the
part that `model.freeze_encoder_epochs` and `optim.encoder_lr_mult` act on.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from seg_dist.errors import UserError
from seg_dist.models.unet import DoubleConv, Down, OutConv, UNet, Up

if TYPE_CHECKING:  # config imports this table to check model.name, so only type checkers import config here
    from seg_dist.config import ModelConfig

__all__ = [
    "MODELS", "MODEL_NAMES", "DoubleConv", "Down", "OutConv", "SmpSegmenter", "UNet", "Up", "build_model",
    "count_parameters", "encoder_of", "freeze_encoder_batchnorm", "load_encoder_weights",
]

log = logging.getLogger("seg_dist.models")

SMP_MISSING = (
    "model.name=smp_unet needs the smp extra: pip install 'seg_dist[smp]' (with a torchvision matching torch)"
)


class SmpMissing(UserError, ImportError):
    """segmentation_models_pytorch (or a torchvision matching torch) is not importable: an ImportError,
    and a UserError so that a command reports it as one line."""


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def build_unet(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Our U-Net (`models/unet.py`): `width` base channels, `depth` down-steps, any input size; in_channels 0
    (not resolved from data: `data.resolve_inputs`) builds the classic 3-channel one."""
    return UNet(cfg.in_channels or 3, num_classes, width=cfg.width, depth=cfg.depth, bilinear=cfg.bilinear,
                norm=cfg.norm)


class SmpSegmenter(nn.Module):
    """An smp model that takes any input size, as our U-Net does.

    smp's encoders need each side divisible by their output stride (32 for depth-5 encoders), while
    training crops (`data.image_size`) and validation batches (original resolution, padded per batch)
    can be any size. The input is zero-padded at the bottom/right to the next multiple (zero is the
    mean colour after normalisation) and the logits are cropped back. The smp model's state-dict keys
    are its own under the prefix `smp.`.
    """

    def __init__(self, model: nn.Module, stride: int) -> None:
        super().__init__()
        self.smp = model
        self.stride = stride

    @property
    def encoder(self) -> nn.Module:
        return self.smp.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = -h % self.stride, -w % self.stride
        if ph or pw:
            x = F.pad(x, [0, pw, 0, ph])
        out = self.smp(x)
        return out[..., :h, :w] if ph or pw else out


def build_smp_unet(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """`segmentation_models_pytorch.Unet` with `cfg.encoder`, wrapped to take any input size. Nothing is
    downloaded: `cfg.encoder_weights` is a local state dict for the encoder (e.g. a torchvision/timm
    ResNet checkpoint, whose `fc.*` head is ignored), or None for random initialisation."""
    encoder_weights = cfg.encoder_weights
    if cfg.norm != "batch":  # the pretrained encoders come with BatchNorm statistics of their own
        raise UserError(f"model.norm={cfg.norm}: smp_unet keeps its encoder's BatchNorm; use model.norm=batch")
    # Checked before the heavy import so a config typo fails fast, and so named weights such as
    # "imagenet" (smp's own convention, which downloads) are rejected instead of fetched.
    if encoder_weights is not None and not Path(encoder_weights).is_file():
        raise UserError(
            f"model.encoder_weights={encoder_weights!r} is not a file; pass a local state-dict path "
            "(weights are never downloaded at run time) or leave it unset"
        )
    try:
        import segmentation_models_pytorch as smp
    except (ImportError, RuntimeError) as e:  # RuntimeError: torchvision built for another torch
        raise SmpMissing(f"{SMP_MISSING} [{type(e).__name__}: {e}]") from e

    names = smp.encoders.get_encoder_names()
    if cfg.encoder not in names and not cfg.encoder.startswith("tu-"):  # tu-*: any timm model, checked by timm
        close = difflib.get_close_matches(cfg.encoder, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"{len(names)} known, e.g. resnet18"
        raise UserError(f"model.encoder={cfg.encoder!r} is not an smp encoder ({hint})")
    model = smp.Unet(encoder_name=cfg.encoder, encoder_weights=None, in_channels=cfg.in_channels or 3,
                     classes=num_classes)
    if encoder_weights is not None:
        load_encoder_weights(model.encoder, encoder_weights, f"{cfg.encoder} encoder")
    stride = getattr(model.encoder, "output_stride", 32)
    return SmpSegmenter(model, int(stride))


def load_encoder_weights(encoder: nn.Module, path: str | Path, what: str = "encoder") -> None:
    """Load a local state dict into `encoder`, or raise one `UserError` line that names the file and what
    does not fit. A classifier head (`fc.*`, as in torchvision/timm ResNet checkpoints) is ignored and
    logged; BatchNorm `num_batches_tracked` counters missing from older checkpoints are not an error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"model.encoder_weights={path}: not a readable torch state dict "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.encoder_weights={path}: expected a state dict (parameter name -> tensor), "
                        f"got {type(state).__name__}")
    own = encoder.state_dict()
    head = sorted(k for k in state if k.startswith("fc.") and k not in own)
    if head:
        log.info("model.encoder_weights=%s: ignoring the classifier head (%s)", path, ", ".join(head))
        state = {k: v for k, v in state.items() if k not in head}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{len(keys)} {label} ({_some(keys)})" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches, file vs model", shapes)) if keys]
        raise UserError(f"model.encoder_weights={path} does not fit the {what}: {'; '.join(problems)}")
    state = {**{k: v for k, v in own.items() if k not in state}, **state}  # counters the file lacks
    encoder.load_state_dict(state)
    log.info("model.encoder_weights=%s: loaded %d tensors into the %s", path, len(state), what)


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "")


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
    "smp_unet": build_smp_unet,
}
MODEL_NAMES = tuple(MODELS)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model a run's `model:` section describes, returning logits of shape (N, num_classes, H, W)."""
    builder = MODELS.get(cfg.name)
    if builder is None:
        raise ValueError(f"unknown model.name={cfg.name!r}; valid names: {', '.join(MODELS)}")
    return builder(cfg, num_classes)
