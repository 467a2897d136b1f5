"""segmentation_models_pytorch's architectures and encoders as one configurable model (`model.name=smp`).

`model.arch` names an smp architecture (taken from smp itself: `smp.MODEL_ARCHITECTURES_MAPPING`, any case)
and `model.encoder` an smp encoder or `tu-<timm model>`; `model.name=smp_unet` is the same with the Unet,
as configs and checkpoints written before `model.arch` say. Every architecture goes through `SmpSegmenter`,
which pads inputs to the multiple the architecture needs, so training, validation, predict, evaluate and
export treat all of them alike.

Weights (`model.encoder_weights`): a local state dict, or smp's and timm's pretrained weights by name
(`weights.py`), loaded into the encoder with one check that names what does not fit. A model of N != 3 input
channels takes 3-channel weights through `adapt_first_conv`.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from seg_dist.errors import UserError
from seg_dist.models import checkpointing, weights

if TYPE_CHECKING:
    from types import ModuleType

    from seg_dist.config import ModelConfig

__all__ = [
    "SMP_MISSING", "SMP_NAMES", "SmpMissing", "SmpSegmenter", "adapt_first_conv", "architectures", "build_smp",
    "check_config", "import_smp", "load_encoder_weights", "pad_multiple", "pretrained_normalization",
    "smp_importable",
]

log = logging.getLogger("seg_dist.models")

SMP_NAMES = ("smp", "smp_unet")  # model.name values served here; smp_unet: smp with model.arch=Unet
SMP_MISSING = (
    "model.name=smp needs the smp extra: pip install 'seg_dist[smp]' (with a torchvision matching torch)"
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How many encoder strides a side must be a multiple of, beyond the encoder's own output stride (measured
# with smp 0.6.0 on resnet18, tu-test_resnet and tu-test_vit): PAN's feature pyramid attention halves its
# stride-16 map three more times and doubles it back (16 x 8 = 128 px); DPT fuses its token grid with a
# half-resolution copy, so the grid must be even (2 x the patch size).
_EXTRA_MULTIPLE = {"pan": 8, "dpt": 2}
# Decoders that pool a map to 1 x 1 ahead of a BatchNorm (ASPP's and the pyramid's image pooling), which
# cannot train on one sample per rank.
_POOLED_NORM = ("deeplabv3", "deeplabv3plus", "pan", "upernet")
# Keys of classifier heads in ImageNet checkpoints (torchvision, timm, Cadene's pretrainedmodels), which an
# encoder does not have.
_HEADS = ("fc", "_fc", "classifier", "last_linear", "head", "linear")


class SmpMissing(UserError, ImportError):
    """segmentation_models_pytorch (or a torchvision matching torch) is not importable: an ImportError,
    and a UserError so that a command reports it as one line."""


def smp_importable() -> bool:
    """Cheap: whether the package is there at all (it may still fail to import)."""
    return importlib.util.find_spec("segmentation_models_pytorch") is not None


def import_smp() -> ModuleType:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # timm's and smp's import-time deprecation notices
            import segmentation_models_pytorch as smp
    except (ImportError, RuntimeError) as e:  # RuntimeError: torchvision built for another torch
        raise SmpMissing(f"{SMP_MISSING} [{type(e).__name__}: {e}]") from e
    return smp


def architectures() -> dict[str, str]:
    """smp's architectures: lower-case name -> smp's class name (unet -> Unet)."""
    smp = import_smp()
    return {key: cls.__name__ for key, cls in smp.MODEL_ARCHITECTURES_MAPPING.items()}


def arch_key(cfg: ModelConfig) -> str:
    """The architecture as smp's mapping keys it (lower case); smp_unet is always the Unet."""
    return "unet" if cfg.name == "smp_unet" else cfg.arch.lower()


def check_config(cfg: ModelConfig) -> None:
    """model.* of an smp model against smp's own lists, each problem one UserError naming the key (with a
    did-you-mean): what can be known without building. Where smp is not importable, nothing is checked
    here; the build then stops with SmpMissing."""
    if cfg.norm != "batch":  # the encoders come with BatchNorm layers (and pretrained statistics) of their own
        raise UserError(f"model.norm={cfg.norm}: smp models keep their encoder's BatchNorm; use model.norm=batch")
    if cfg.name == "smp_unet" and cfg.arch.lower() != "unet":
        raise UserError(f"model.arch={cfg.arch}: model.name=smp_unet is smp's Unet; use model.name=smp for "
                        "another architecture")
    if not smp_importable():
        return
    try:
        archs = architectures()
    except SmpMissing:
        return
    if arch_key(cfg) not in archs:
        raise UserError(f"model.arch={cfg.arch!r} is not an smp architecture "
                        f"({_did_you_mean(cfg.arch, list(archs.values()), key=str.lower)})")
    check_encoder(cfg.encoder)
    if arch_key(cfg) == "dpt" and not cfg.encoder.startswith("tu-"):
        raise UserError(f"model.encoder={cfg.encoder}: model.arch=DPT takes a timm vision transformer "
                        "(tu-vit_base_patch16_224 or similar)")
    weights.named_weights(cfg)  # a weights name the encoder does not have fails here


def check_encoder(encoder: str) -> None:
    smp = import_smp()
    if encoder.startswith("tu-"):
        import timm

        model = encoder[3:].split(".")[0]
        if not timm.is_model(model):
            raise UserError(f"model.encoder={encoder!r} is not a timm model "
                            f"({_did_you_mean(model, timm.list_models(), prefix='tu-')})")
        return
    names = smp.encoders.get_encoder_names()
    if encoder not in names:
        raise UserError(f"model.encoder={encoder!r} is not an smp encoder ({_did_you_mean(encoder, names)}; "
                        "tu-<name> for a timm model)")


def _did_you_mean(value: str, names: list[str], key: Any = None, prefix: str = "") -> str:
    keyed = {(key(n) if key else n): n for n in names}
    close = difflib.get_close_matches(key(value) if key else value, list(keyed), n=3, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(prefix + keyed[c] for c in close)}?"
    if len(names) <= 20:
        return f"valid: {', '.join(prefix + n for n in names)}"
    return f"{len(names)} known, e.g. {prefix + names[0]}"


class SmpSegmenter(nn.Module):
    """An smp model that takes any input size, as our U-Net does.

    smp's architectures need each side divisible by a multiple of the encoder's output stride (`stride`
    here: 32 for most depth-5 encoders; 8 or 16 where the encoder is dilated; 128 for PAN, 32 for DPT),
    while training crops (`data.image_size`) and validation batches (original resolution, padded per batch)
    can be any size. The input is zero-padded at the bottom/right to the next multiple (zero is the mean
    colour after normalisation) and the logits are cropped back. The smp model's state-dict keys are its
    own under the prefix `smp.`.
    """

    def __init__(self, model: nn.Module, stride: int, arch: str = "unet") -> None:
        super().__init__()
        self.smp = model
        self.stride = stride
        self.arch = arch

    @property
    def encoder(self) -> nn.Module:
        return self.smp.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] < 2 and self.arch in _POOLED_NORM:
            raise UserError(f"model.arch={architectures().get(self.arch, self.arch)} pools features to 1 x 1 "
                            "before a BatchNorm, which cannot train on 1 sample per rank: set train.batch_size "
                            "to 2 or more")
        h, w = x.shape[-2:]
        ph, pw = -h % self.stride, -w % self.stride
        if ph or pw:
            x = F.pad(x, [0, pw, 0, ph])
        out = self.smp(x)
        return out[..., :h, :w] if ph or pw else out


def pad_multiple(arch: str, encoder: nn.Module) -> int:
    """The side multiple `arch` needs over `encoder` (see `_EXTRA_MULTIPLE`)."""
    stride = int(getattr(encoder, "output_stride", 32))
    return stride * _EXTRA_MULTIPLE.get(arch, 1)


def build_smp(cfg: ModelConfig, num_classes: int) -> SmpSegmenter:
    """`cfg.arch` (Unet for smp_unet) over `cfg.encoder` with `cfg.in_channels` input channels, wrapped to
    take any input size; the encoder's weights as `cfg.encoder_weights` says (nothing: random)."""
    check_config(cfg)
    local = cfg.encoder_weights if cfg.encoder_weights and weights.is_local_file_name(cfg.encoder_weights) else None
    # Checked before the heavy import, so that a mistyped path fails at once.
    if local is not None and not Path(local).expanduser().is_file():
        raise UserError(f"model.encoder_weights={local!r} is not a file; give a local state-dict path, a weights "
                        "name (imagenet, ...) or leave it unset")
    smp = import_smp()
    arch = arch_key(cfg)
    in_channels = cfg.in_channels or 3
    model = _create(smp, cfg, arch, in_channels, num_classes)
    named = weights.named_weights(cfg)
    if local is not None:
        state = weights.read_state_dict(Path(local).expanduser())
        if cfg.encoder.startswith("tu-") and not any(k.startswith("model.") for k in state):
            state = _through_timm(smp, cfg, arch, num_classes, state, local)  # a timm model's own checkpoint
        load_encoder_weights(model.encoder, state, f"{cfg.encoder} encoder", local)
    elif named is not None:
        files = weights.fetch(named)
        state = weights.read_state_dict(files[0], f"model.encoder_weights={named.name} ({files[0]})")
        if named.timm:
            state = _through_timm(smp, cfg, arch, num_classes, state, str(files[0]))
        load_encoder_weights(model.encoder, state, f"{cfg.encoder} encoder", f"{named.name} ({named.label})",
                             bgr=weights.input_space(named, files) == "BGR")
    _freeze_unused(model, in_channels, pad_multiple(arch, model.encoder))
    if cfg.activation_checkpointing:
        encoder, decoder = checkpointing.blocks_of(model.encoder), checkpointing.blocks_of(model.decoder, whole=False)
        checkpointing.enable([*encoder, *decoder])
        log.info("activation checkpointing: %d blocks of the %s encoder, %d of the %s decoder", len(encoder),
                 cfg.encoder, len(decoder), type(model).__name__)
    return SmpSegmenter(model, pad_multiple(arch, model.encoder), arch)


def _freeze_unused(model: nn.Module, in_channels: int, side: int) -> None:
    """Parameters no forward reaches (DPT's timm ViT keeps its final norm and classifier) get requires_grad
    off: DDP would wait for their gradients forever and leave the rest of their bucket unreduced. Found by
    one backward pass in eval mode (no statistics move) on a small input; they stay in the state dict."""
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        model(torch.zeros(1, in_channels, side, side)).sum().backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    model.train(was_training)
    if unused:
        log.info("%d parameters the forward never uses are not trained (%s)", len(unused), _some(unused))


def _create(smp: ModuleType, cfg: ModelConfig, arch: str, in_channels: int, num_classes: int,
            **extra: Any) -> nn.Module:
    kwargs: dict[str, Any] = {"dynamic_img_size": True} if arch == "dpt" else {}  # a ViT at any padded size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # smp's timm- encoder notices
            return smp.create_model(arch, encoder_name=cfg.encoder, encoder_weights=extra.pop("weights", None),
                                    in_channels=in_channels, classes=num_classes, **kwargs, **extra)
    except (ValueError, KeyError, TypeError, RuntimeError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:240]
        raise UserError(f"model.arch={cfg.arch} with model.encoder={cfg.encoder}: smp cannot build it ({first})") \
            from None


def _through_timm(smp: ModuleType, cfg: ModelConfig, arch: str, num_classes: int, state: dict[str, torch.Tensor],
                  where: str) -> dict[str, torch.Tensor]:
    """A timm model's checkpoint as its smp encoder's 3-channel state dict: timm loads it (its own key filters,
    its classifier dropped) into the model built at 3 channels."""
    try:
        model = _create(smp, cfg, arch, 3, num_classes, weights=True, pretrained_cfg_overlay={"state_dict": state})
    except UserError as e:
        raise UserError(f"model.encoder_weights={where} does not fit {cfg.encoder}: {str(e).split(': ', 1)[-1]}") \
            from None
    return model.encoder.state_dict()


def adapt_first_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A first convolution's 3-channel (RGB) kernel for `channels` input bands: bands beyond the third get the
    mean of the RGB kernels, and every kernel is scaled by 3 / channels, so an input whose bands look alike
    gives the response an RGB image gave; with fewer than 3 bands each band gets sum / channels (1 band: the
    sum of the RGB kernels, as a grey image seen as RGB)."""
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"expected an O x 3 x kH x kW kernel, got {tuple(weight.shape)}")
    mean = weight.mean(1, keepdim=True)
    if channels < 3:
        return (mean * (3.0 / channels)).repeat(1, channels, 1, 1)
    extra = mean.repeat(1, channels - 3, 1, 1)
    return torch.cat([weight, extra], 1) * (3.0 / channels)


def load_encoder_weights(encoder: nn.Module, state: Mapping[str, torch.Tensor] | str | Path, what: str = "encoder",
                         where: str | Path | None = None, bgr: bool = False) -> None:
    """Load a state dict (or a local file's) into `encoder`, or raise one `UserError` line naming the file and
    what does not fit. A classifier head (`fc.*`, `classifier.*`, ...) is ignored and logged; BatchNorm
    `num_batches_tracked` counters missing from older checkpoints are not an error; a 3-channel first
    convolution is adapted to the encoder's input channels (`adapt_first_conv`), flipped to RGB first for
    weights trained on BGR."""
    if not isinstance(state, Mapping):
        where = where or state
        state = weights.read_state_dict(state)
    where = where or "state dict"
    state = dict(state)
    own = encoder.state_dict()
    head = sorted(k for k in state if k not in own and k.split(".")[0] in _HEADS)
    if head:
        log.info("model.encoder_weights=%s: ignoring the classifier head (%s)", where, ", ".join(head))
        state = {k: v for k, v in state.items() if k not in head}
    adapted = [k for k, v in state.items() if k in own and _first_conv_pair(v, own[k])]
    for k in adapted:
        kernel = state[k].flip(1) if bgr else state[k]
        state[k] = adapt_first_conv(kernel, own[k].shape[1]).to(own[k].dtype)
        log.info("model.encoder_weights=%s: %s adapted from 3 to %d input channels", where, k, own[k].shape[1])
    if bgr and not adapted:
        first = next((k for k, v in state.items() if v.ndim == 4 and v.shape[1] == 3), None)
        if first is not None:
            state[first] = state[first].flip(1)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{len(keys)} {label} ({_some(keys)})" for label, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches, file vs model", shapes)) if keys]
        raise UserError(f"model.encoder_weights={where} does not fit the {what}: {'; '.join(problems)}")
    state = {**{k: v for k, v in own.items() if k not in state}, **state}  # counters the file lacks
    encoder.load_state_dict(state)
    log.info("model.encoder_weights=%s: loaded %d tensors into the %s", where, len(state), what)


def _first_conv_pair(given: torch.Tensor, own: torch.Tensor) -> bool:
    """A 3-channel kernel where the model has another channel count, all else equal: the first convolution."""
    return (given.ndim == 4 and own.ndim == 4 and given.shape[1] == 3 and own.shape[1] != 3
            and given.shape[0] == own.shape[0] and given.shape[2:] == own.shape[2:])


def _some(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f", ... {len(keys) - n} more" if len(keys) > n else "")


def pretrained_normalization(cfg: ModelConfig) -> tuple[tuple[float, ...], tuple[float, ...], str] | None:
    """The mean, std (fractions of 255, RGB) and a label of what `cfg.encoder_weights` was trained with, for
    `data.resolve_normalization`; None without pretrained weights. A local file is taken as ImageNet-trained;
    named smp weights bring theirs in their config.json (fetched, as the weights are, once per node); timm's
    are in timm."""
    if cfg.name not in SMP_NAMES or not cfg.encoder_weights:
        return None
    named = weights.named_weights(cfg)
    if named is None:
        return IMAGENET_MEAN, IMAGENET_STD, "imagenet"
    if named.timm_mean is not None and named.timm_std is not None:
        return named.timm_mean, named.timm_std, f"{cfg.encoder} {named.name} weights ({named.label})"
    files = weights.fetch(named)
    mean, std = weights.config_normalization(files[1], named)
    return mean, std, f"{cfg.encoder} {named.name} weights ({named.label})"
