"""Typed run configuration: dataclasses loaded from YAML with `key.sub=value` overrides.

Every key is declared here, so a misspelt key in a YAML file or on the command line is an error
that names it and suggests the closest valid one, instead of a silently ignored setting; and every key
has a range in `CHECKS`, checked when a config is loaded, so a value out of range fails with one line.
A YAML file may start from another with `base: other.yaml` (a path relative to that file); keys in
the file then override the base's, section by section.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .models import MODEL_NAMES, check_model


class ConfigError(UserError):
    """A config file or override that cannot be used; the message names the key."""


@dataclass
class AugmentConfig:
    """Training augmentation; each probability 0 switches that transform off."""

    scale: tuple[float, float] = (0.9, 1.1)  # random rescale before the crop; mild, as short runs fit faster
    hflip: float = 0.5
    # Unset: from the data. A set packed with --rotation-invariant (its manifest says so: overhead, microscopy,
    # fundus images) gets vflip 0.5 and, on square crops, rot90 1: with hflip, every one of the 8 orientations;
    # any other set 0 and 0 (street scenes and people have an up).
    vflip: float | None = None
    rot90: float | None = None  # probability of a random quarter turn (0, 90, 180 or 270 degrees); square crops
    brightness_contrast: float = 0.2  # probability of RandomBrightnessContrast
    # Whether brightness/contrast runs at all: auto (8-bit grey or RGB only: on 16-bit, float or extra bands a
    # shift in fractions of 255 has no meaning) | on (any data: shifts by fractions of the type's full scale,
    # 255, 65535 or 1.0 for float) | off.
    photometric: str = "auto"
    affine: float = 0.2  # probability of a small Affine (translate, rotate)
    rotate: float = 10.0  # degrees, for the Affine
    translate: float = 0.1  # fraction of the crop size, for the Affine


@dataclass
class DataConfig:
    root: str = "shards/synth"  # a shard directory holding manifest.json
    train_split: str = "train"
    val_split: str = "val"
    # Training crop: N (square) or [H, W]; smaller images are padded with the ignore label. 0 (auto): the train
    # split's mean frame, sides rounded up to a multiple of 8, at most 512 each (data.training_crop).
    image_size: int | tuple[int, int] = 0
    val_size: int = 0  # 0: validate at the original resolution (batches padded with the ignore label)
    # Taken from the manifest when unset.
    num_classes: int | None = None
    ignore_index: int | None = None
    class_names: list[str] | None = None
    # Normalisation, one value per image channel, in the pixel type's full scale (8-bit: fractions of 255,
    # as ImageNet's 0.485 ...; 16-bit: of 65535; float32: the stored values). Unset (the default): the
    # manifest's statistics of the train split, except that a pretrained smp encoder (model.encoder_weights)
    # on 8-bit images of 3+ channels gets the constants its weights were trained with (a local file:
    # ImageNet's; data.resolve_normalization). Set both to override.
    mean: list[float] | None = None
    std: list[float] | None = None
    # The image channels pictures show (overlays, previews, predict's blends): one (grey) or three (RGB)
    # indices; unset: the first three of 3+ channels, else the first. Non-8-bit images are shown with a
    # 2-98 percentile stretch.
    display_bands: list[int] | None = None
    # On 2 cores 0 workers beats 2 (moving batches between processes costs more than decoding).
    workers: int = 0
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2
    # Decoded samples a rank keeps in memory, so later epochs and validations skip reading and decoding
    # them: a split whose decoded pixels fit in this many MiB (the manifest knows; each split counted on its
    # own, a validation split as this rank's share) is cached by a loader that decodes in the rank's own
    # process (data.workers=0); loader workers decode beside the steps instead. A cached validation share is
    # batched by image size. 0: never.
    cache_mb: int = 1024
    val_batch_size: int = 0  # 0: same as train.batch_size
    # At start: "size" checks every shard's byte size against the manifest (cheap: a truncated copy),
    # "full" its sha256 too (reads every shard), "off" skips the check.
    verify: str = "size"
    # Remote data.root (http(s)://, s3://, gs://, pipe:) only, where training streams whole shards: samples
    # drawn at random from a buffer of this many per loader worker (1: the shards' own order), and the
    # retries of a broken shard read (waits of 1, 2, 4 ... s, at most 30 s) before the run fails.
    shuffle_buffer: int = 512
    retries: int = 5
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    # unet (ours) | smp (segmentation_models_pytorch: model.arch over model.encoder) | smp_unet (smp's Unet, the
    # name configs and checkpoints used before model.arch)
    name: str = "unet"
    width: int = 64  # base channels; 64 is the classic U-Net
    depth: int = 4
    in_channels: int = 0  # 0: the data's channel count (the manifest's image.channels); set: must match it
    bilinear: bool = False
    # batch: BatchNorm (statistics of each rank's batch, so results move with the per-rank batch on CPU);
    # group: GroupNorm, no batch statistics, the same on any number of ranks and at any batch size.
    norm: str = "batch"
    arch: str = "Unet"  # smp: one of smp's architectures (Unet, FPN, DeepLabV3Plus, Segformer, ...; any case)
    encoder: str = "resnet34"  # smp: an smp encoder name or tu-<timm model>
    # smp: a local state-dict file, or a weights name smp gives the encoder (imagenet, ssl, ...; imagenet for
    # tu- encoders), downloaded once per node into the cache (models/weights.py). Unset: random weights.
    encoder_weights: str | None = None
    # Epochs at the start with the encoder's learning rate at 0 and its BatchNorm statistics kept (unet: the
    # contracting path; smp: the encoder). Needs a per-iteration schedule (not plateau).
    freeze_encoder_epochs: int = 0
    # Recompute blocks' activations in the backward pass instead of keeping them (unet: every level; smp: the
    # encoder's and the decoder's blocks): less memory for large crops, about one more forward pass per step.
    activation_checkpointing: bool = False

    def without_pretrained(self) -> ModelConfig:
        """The same architecture from random weights: for a model whose every weight a checkpoint then gives,
        so that a pretrained file or name used at training time need not be there any more."""
        return dataclasses.replace(self, encoder_weights=None)


@dataclass
class LossConfig:
    ce_weight: float = 1.0
    dice_weight: float = 1.0
    class_weights: str = "none"  # none | inverse | sqrt_inverse | median (from the manifest's pixel histogram)
    # CE's target: 1 - s on the labelled class and s spread evenly over all classes (0: one-hot).
    label_smoothing: float = 0.0
    # On several ranks, the loss of the global batch (CE's and Dice's sums added over the ranks) instead of
    # the mean of the ranks' losses: N x B then steps exactly as 1 x N*B. Off by default: it costs an exchange
    # per step and scored no better in the lab's recipe comparison (lab/recipe.md).
    global_batch: bool = False


@dataclass
class OptimConfig:
    # For short runs of small U-Nets (the measured recipe, lab/recipe.md); a large model fine-tuned for
    # long on many GPUs wants less (configs/voc_unet_8gpu.yaml: 1e-4 with 500 warm-up steps).
    lr: float = 3e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    encoder_lr_mult: float = 1.0  # the encoder's learning rate is lr x this (e.g. 0.1 for a pretrained one)


@dataclass
class ScheduleConfig:
    name: str = "poly"  # poly | cosine | plateau | constant
    warmup_iters: int = 20  # linear warmup for poly and cosine
    power: float = 0.9  # poly
    min_lr: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 2


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8  # per rank; with global_batch_size set, the largest per-rank batch allowed
    # 0: batch_size x accum_steps x ranks. Set: per-rank batch and accumulation are derived from the world
    # size, so the same config optimises the same way on 1, 2 or 8 GPUs (and after a resume on another count).
    global_batch_size: int = 0
    # On a world size that cannot make the configured (or resumed run's) global batch exactly: carry on with
    # batch_size x accum_steps x ranks instead of stopping with an error.
    allow_batch_change: bool = False
    # Optimiser steps per epoch (each takes accum_steps micro-batches per rank); 0: from the manifest, enough
    # steps of the global batch for one epoch to see the train split once.
    steps_per_epoch: int = 0
    accum_steps: int = 1
    amp: str = "auto"  # off | bf16 | fp16 | auto
    grad_clip: float = 0.0  # 0: off
    # BatchNorm statistics: "on" over the global batch (CUDA: SyncBatchNorm; CPU: models/norms.py), so the
    # same global batch trains alike on any number of ranks; "off" each rank's own batch; "auto" (see
    # trainer.global_batchnorm) on GPUs, and on CPU ranks only when they hold fewer than
    # SMALL_RANK_BATCH samples each. A no-op on 1 rank. true/false read as on/off.
    sync_bn: str = "auto"
    # Where BatchNorm is per rank (not global): its statistics over each group of this many samples of a rank's
    # batch (ghost batch norm; 0: the whole batch). Unset: SMALL_RANK_BATCH on CPU under sync_bn=auto, so one
    # process of 8 normalises as 2 ranks of 4 do and a CPU run's recipe does not change with its rank count
    # (trainer.batchnorm_group); 0 elsewhere.
    bn_group: int | None = None
    # NHWC activations: on the 2-core CPU machine the demo's steps ran 20% faster (lab/performance.md), as
    # tensor cores prefer it on GPUs.
    channels_last: bool = True
    compile: bool = False
    # torch.compile's mode: auto (reduce-overhead on one GPU, else default) | default | reduce-overhead
    # (CUDA graphs: each step's launches replayed at once) | max-autotune | max-autotune-no-cudagraphs.
    # The loss is compiled with the model. Measured in README "Performance".
    compile_mode: str = "auto"
    cudnn_benchmark: bool = True
    seed: int = 0
    device: str = "auto"  # auto (cuda:LOCAL_RANK when CUDA is there, else cpu) | cpu | cuda
    # CPU ranks each keep their own slice of the cores they were given, unless a launcher bound them already.
    # Turn off when several unbound jobs share one machine: each would pin its rank 0 to the same cores.
    pin_cpu_ranks: bool = True
    resume: str = "auto"  # auto | never | PATH
    # How often to validate (and always at the end): auto | N (epochs) | "N epochs" | "N steps" | "N minutes".
    # auto: after the first epoch, then every few epochs, as many as keep validation to about AUTO_VAL_SHARE
    # of the training time it interrupts (measured as the run goes; the log says the cadence it chose).
    # Steps and minutes validate mid-epoch too: for epochs of hours.
    val_every: str = "auto"
    max_nonfinite: int = 20  # consecutive skipped (non-finite) steps that stop the run; checked per log line
    max_steps: int = 0  # stop after this many optimiser steps in total (0: no limit)
    # Wall-clock training budget (validation included; 0: none). The step count, and with it the schedule's
    # horizon, is re-estimated from the measured rate as the run goes; train.epochs is then only a cap.
    budget_minutes: float = 0.0
    # Exponential moving average of the weights (0: off; e.g. 0.999): validated, checkpointed as `model` and
    # so used by evaluate/predict/export; the trained weights are kept for resuming.
    ema_decay: float = 0.99
    # After a stop request under a SLURM batch job, rank 0 runs `scontrol requeue $SLURM_JOB_ID`.
    requeue: bool = True
    # A collective that waits longer than this (a peer died inside it) fails instead of hanging the job.
    dist_timeout_minutes: float = 30.0


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # also write last.pt every N steps (0: only at epoch end)
    keep_last: int = 3  # step/epoch snapshots kept beside last.pt and best.pt


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    log_every: int = 10  # steps between train scalars (each costs one host sync)
    overlays: int = 4  # validation overlays written to TensorBoard each validation
    progress: bool = True  # tqdm on rank 0


@dataclass
class RunConfig:
    # auto: runs/<name of data.root's folder>, so runs on two datasets never share a directory (a run
    # directory holds one run: train refuses another dataset's checkpoints there).
    dir: str = "auto"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)


# The valid values of each choice key; the modules that act on them import these.
AMP_MODES = ("off", "bf16", "fp16", "auto")
SCHEDULES = ("poly", "cosine", "plateau", "constant")
CLASS_WEIGHTS = ("none", "inverse", "sqrt_inverse", "median")
NORMS = ("batch", "group")
PHOTOMETRIC = ("auto", "on", "off")
SYNC_BN = ("auto", "on", "off")
# Below this many samples per CPU rank, `train.sync_bn=auto` takes BatchNorm statistics over the global batch;
# from it up, over groups of this many (`train.bn_group` unset).
SMALL_RANK_BATCH = 4
DEVICES = ("auto", "cpu", "cuda")
VERIFY = ("off", "size", "full")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# train.val_every=auto: validation takes at most about this share of the training time between validations.
# A run's overheads together should stay near 5% (goodput 0.95); start-up, checkpoints and data waits take
# about 2% of a small set's run, so validation gets the other 3%.
AUTO_VAL_SHARE = 0.03
_EVERY_UNITS = {"epoch": "epochs", "epochs": "epochs", "step": "steps", "steps": "steps", "minute": "minutes",
                "minutes": "minutes", "min": "minutes"}


@dataclass(frozen=True)
class Every:
    """A parsed `train.val_every`: `amount` of `unit` (epochs, steps or minutes), or unit "auto"."""

    unit: str
    amount: float = 0.0


def parse_every(text: str) -> Every:
    """`train.val_every` -> Every; ValueError for anything else ("3", "3 epochs", "500 steps", "10 minutes")."""
    words = str(text).strip().lower().split()
    if words == ["auto"]:
        return Every("auto")
    if len(words) not in (1, 2) or (len(words) == 2 and words[1] not in _EVERY_UNITS):
        raise ValueError(text)
    unit = _EVERY_UNITS[words[1]] if len(words) == 2 else "epochs"
    amount = float(words[0])
    if not amount > 0 or (unit != "minutes" and amount != int(amount)) or not math.isfinite(amount):
        raise ValueError(text)
    return Every(unit, amount)


def _parses(parse: Callable[[Any], Any], value: Any) -> bool:
    try:
        parse(value)
    except ValueError:
        return False
    return True


def crop_hw(data_cfg: DataConfig) -> tuple[int, int]:
    """The training crop as (height, width)."""
    size = data_cfg.image_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _between(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)


def _at_least(lo: float) -> Callable[[Any], bool]:
    return lambda v: v >= lo


def _one_of(allowed: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in allowed), f"expected one of {', '.join(allowed)}"


def _each(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: all(ok(x) for x in v)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _nonempty(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


BOOL = (_is_bool, "expected true or false")
AT_LEAST_0 = (_at_least(0), "must be at least 0")
AT_LEAST_1 = (_at_least(1), "must be at least 1")
POSITIVE = ((lambda v: v > 0), "must be greater than 0")
PROBABILITY = (_between(0.0, 1.0), "a probability, must be in [0, 1]")
FROM_DATA_OR_PROBABILITY = ((lambda v: v is None or 0.0 <= v <= 1.0),
                            "unset (from the data: pack --rotation-invariant) or a probability in [0, 1]")
NONEMPTY = (_nonempty, "must not be empty")

# Every key of every section: (key, predicate, the valid range as the error states it). Checked when a config
# is loaded (`load_config_dict`), so a value out of range fails at once with one line instead of training
# nothing, dividing by zero or aborting a healthy run later.
CHECKS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("data.root", *NONEMPTY),
    ("data.train_split", *NONEMPTY),
    ("data.val_split", *NONEMPTY),
    ("data.image_size", lambda v: v == 0 or min(v if isinstance(v, tuple) else (v,)) >= 1,
     "0 (auto from the manifest), or a crop side N or [H, W], each at least 1"),
    ("data.val_size", *AT_LEAST_0),
    ("data.num_classes", lambda v: v is None or v >= 1, "unset (from the manifest) or at least 1"),
    ("data.ignore_index", lambda v: v is None or 0 <= v <= 65535,
     "unset (from the manifest) or a label value in [0, 65535]"),
    ("data.class_names", lambda v: v is None or len(v) >= 1, "unset (from the manifest) or a list of names"),
    ("data.mean", lambda v: v is None or (len(v) >= 1 and _each(math.isfinite)(v)),
     "unset (from the manifest) or one finite number per channel, in the pixel type's full scale"),
    ("data.std", lambda v: v is None or (len(v) >= 1 and _each(lambda x: math.isfinite(x) and x > 0)(v)),
     "unset (from the manifest) or one number greater than 0 per channel"),
    ("data.display_bands", lambda v: v is None or (len(v) in (1, 3) and _each(_at_least(0))(v)),
     "unset, or 1 (grey) or 3 (RGB) channel indices, each at least 0"),
    ("data.workers", *AT_LEAST_0),
    ("data.pin_memory", *BOOL),
    ("data.persistent_workers", *BOOL),
    ("data.prefetch_factor", *AT_LEAST_1),
    ("data.cache_mb", *AT_LEAST_0),
    ("data.val_batch_size", lambda v: v >= 0, "0 (train.batch_size) or at least 1"),
    ("data.verify", *_one_of(VERIFY)),
    ("data.shuffle_buffer", lambda v: v >= 1, "at least 1 (1: samples in the shards' order)"),
    ("data.retries", *AT_LEAST_0),
    ("data.augment.scale", lambda v: 0 < v[0] <= v[1], "[low, high] with 0 < low <= high"),
    ("data.augment.hflip", *PROBABILITY),
    ("data.augment.vflip", *FROM_DATA_OR_PROBABILITY),
    ("data.augment.rot90", *FROM_DATA_OR_PROBABILITY),
    ("data.augment.brightness_contrast", *PROBABILITY),
    ("data.augment.photometric", *_one_of(PHOTOMETRIC)),
    ("data.augment.affine", *PROBABILITY),
    ("data.augment.rotate", _between(0.0, 180.0), "degrees, must be in [0, 180]"),
    ("data.augment.translate", _between(0.0, 1.0), "a fraction of the crop, must be in [0, 1]"),
    ("model.name", *_one_of(MODEL_NAMES)),
    ("model.width", *AT_LEAST_1),
    ("model.depth", *AT_LEAST_1),
    ("model.in_channels", *AT_LEAST_0),
    ("model.bilinear", *BOOL),
    ("model.norm", *_one_of(NORMS)),
    ("model.arch", *NONEMPTY),
    ("model.encoder", *NONEMPTY),
    ("model.encoder_weights", lambda v: v is None or _nonempty(v),
     "unset, a weights name (imagenet, ...) or the path of a local state dict"),
    ("model.freeze_encoder_epochs", *AT_LEAST_0),
    ("model.activation_checkpointing", *BOOL),
    ("loss.ce_weight", *AT_LEAST_0),
    ("loss.dice_weight", *AT_LEAST_0),
    ("loss.class_weights", *_one_of(CLASS_WEIGHTS)),
    ("loss.label_smoothing", _between(0.0, 1.0, hi_open=True), "must be in [0, 1)"),
    ("loss.global_batch", *BOOL),
    ("optim.lr", *POSITIVE),
    ("optim.weight_decay", *AT_LEAST_0),
    ("optim.betas", _each(_between(0.0, 1.0, hi_open=True)), "each beta must be in [0, 1)"),
    ("optim.encoder_lr_mult", *AT_LEAST_0),
    ("schedule.name", *_one_of(SCHEDULES)),
    ("schedule.warmup_iters", *AT_LEAST_0),
    ("schedule.power", *POSITIVE),
    ("schedule.min_lr", *AT_LEAST_0),
    ("schedule.plateau_factor", _between(0.0, 1.0, lo_open=True, hi_open=True), "must be in (0, 1)"),
    ("schedule.plateau_patience", *AT_LEAST_0),
    ("train.epochs", *AT_LEAST_1),
    ("train.batch_size", *AT_LEAST_1),
    ("train.global_batch_size", lambda v: v >= 0, "0 (batch_size x accum_steps x ranks) or at least 1"),
    ("train.allow_batch_change", *BOOL),
    ("train.steps_per_epoch", lambda v: v >= 0, "0 (from the manifest) or at least 1"),
    ("train.accum_steps", *AT_LEAST_1),
    ("train.amp", *_one_of(AMP_MODES)),
    ("train.grad_clip", lambda v: v >= 0, "0 (off) or a norm greater than 0"),
    ("train.sync_bn", *_one_of(SYNC_BN)),
    ("train.bn_group", (lambda v: v is None or v >= 0), "must be unset (from the device) or at least 0"),
    ("train.channels_last", *BOOL),
    ("train.compile", *BOOL),
    ("train.compile_mode", *_one_of(COMPILE_MODES)),
    ("train.cudnn_benchmark", *BOOL),
    ("train.seed", _between(0, 2**32 - 1), "must be in [0, 2**32 - 1]"),
    ("train.device", *_one_of(DEVICES)),
    ("train.pin_cpu_ranks", *BOOL),
    ("train.resume", _nonempty, "auto, never or a checkpoint path"),
    ("train.val_every", lambda v: _parses(parse_every, v),
     "expected auto, N (epochs), 'N epochs', 'N steps' or 'N minutes', with N greater than 0 (whole for epochs "
     "and steps)"),
    ("train.max_nonfinite", *AT_LEAST_1),
    ("train.max_steps", lambda v: v >= 0, "0 (no limit) or at least 1"),
    ("train.budget_minutes", lambda v: v >= 0, "0 (none) or minutes greater than 0"),
    ("train.ema_decay", _between(0.0, 1.0, hi_open=True), "0 (off) or a decay in (0, 1)"),
    ("train.requeue", *BOOL),
    ("train.dist_timeout_minutes", *POSITIVE),
    ("checkpoint.every_steps", lambda v: v >= 0, "0 (only at epoch end) or at least 1"),
    ("checkpoint.keep_last", *AT_LEAST_0),
    ("logging.tensorboard", *BOOL),
    ("logging.log_every", *AT_LEAST_1),
    ("logging.overlays", *AT_LEAST_0),
    ("logging.progress", *BOOL),
    ("run.dir", *NONEMPTY),
)


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for name in key.split("."):
        node = getattr(node, name)
    return node


def _show(value: Any) -> str:
    """A value as it would be written in YAML or an override: `0`, `'fp8'`, `[0.9, 0.8]`."""
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)


def check(cfg: Config) -> None:
    """Every value in its valid range, and the keys that constrain each other consistent; else a ConfigError
    that names the key, its value and the range."""
    for key, ok, valid in CHECKS:
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={_show(value)}: {valid}")
    if cfg.loss.ce_weight + cfg.loss.dice_weight <= 0:
        raise ConfigError(f"loss.ce_weight={cfg.loss.ce_weight} and loss.dice_weight={cfg.loss.dice_weight}: "
                          "at least one must be greater than 0 (the loss would be zero)")
    if cfg.schedule.min_lr > cfg.optim.lr:
        raise ConfigError(f"schedule.min_lr={cfg.schedule.min_lr}: must be at most optim.lr={cfg.optim.lr}")
    mean, std = cfg.data.mean, cfg.data.std
    if (mean is None) != (std is None) or (mean is not None and std is not None and len(mean) != len(std)):
        raise ConfigError(f"data.mean={_show(mean)} and data.std={_show(std)}: set both, one value per image "
                          "channel each, or neither (the manifest's statistics)")
    names, classes = cfg.data.class_names, cfg.data.num_classes
    if names is not None and classes is not None and len(names) != classes:
        raise ConfigError(f"data.class_names has {len(names)} names but data.num_classes={classes}: "
                          "give one name per class")
    if cfg.data.augment.rot90 and cfg.data.image_size != 0 and len(set(crop_hw(cfg.data))) > 1:
        raise ConfigError(f"data.augment.rot90={cfg.data.augment.rot90} turns square crops only, data.image_size="
                          f"{_show(cfg.data.image_size)}: give one side (data.image_size=N) or set rot90=0")
    if cfg.model.name == "unet" and cfg.data.image_size != 0 and min(crop_hw(cfg.data)) < 2**cfg.model.depth:
        raise ConfigError(f"data.image_size={_show(cfg.data.image_size)}: the U-Net needs each side at least "
                          f"2**model.depth={2**cfg.model.depth}")
    try:
        check_model(cfg.model)  # smp's architecture, encoder and weights names, where smp is importable
    except UserError as e:
        raise ConfigError(str(e)) from None


# --- typed conversion ---------------------------------------------------------------------------


_WORDS = {int: ("an integer", "integer", "integers"), float: ("a number", "number", "numbers"),
          str: ("a string", "string", "strings"), bool: ("true or false", "true/false", "true/false values"),
          type(None): ("null (unset)", "null", "nulls")}


def _type_name(tp: Any) -> str:
    """An annotation in a user's words: `int | None` -> "an integer or null (unset)"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is list:
        return f"a list of {_WORDS.get(args[0], (None, None, str(args[0])))[2]}"
    if origin is tuple:
        return "[" + ", ".join(_WORDS.get(a, (None, str(a)))[1] for a in args) + "]"
    return _WORDS.get(tp, (getattr(tp, "__name__", str(tp)),))[0]


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(args) != len(value):
                raise ConfigError(f"{key}={value!r}: expected {len(args)} values, {_type_name(tp)}")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in pairs)
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads `3e-4` (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        # YAML 1.1 reads `amp: off` as false: for a string field that means "off" (and true "on").
        if isinstance(value, bool):
            return "on" if value else "off"
        # YAML reads `resume=42` or `root=2024` as numbers; a string field takes them as written.
        if isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(f"{key}={value!r}: expected a string")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1, cutoff=0.5)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (valid: {', '.join(valid)})"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    for key in data:
        if key not in names:
            raise _unknown_key(f"{prefix}{key}", names)
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name] or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", data[name], tp)
    return cls(**kwargs)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_read_yaml(path.parent / base, (*seen, path)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (and its `base` chain), then `key.sub=value` overrides."""
    return load_config_dict(_read_yaml(Path(path)) if path is not None else {}, overrides)


def load_config_dict(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A config from plain data (a checkpoint's, say) with `key.sub=value` overrides applied."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    cfg = _build(Config, data)
    check(cfg)
    if cfg.run.dir == "auto":
        cfg.run.dir = str(Path("runs") / (Path(cfg.data.root.rstrip("/")).name or "default"))
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data (lists, not tuples) that YAML, JSON and `torch.load(weights_only=True)` accept."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
