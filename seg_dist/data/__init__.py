"""Shards -> per-rank batches: augmentation, training epochs, exact validation splits.

The rooms, in the order data flows through them:

- `reader`: the one tar reader. `read_shard` gives a shard's samples as bytes, `decode_sample` turns them
  into arrays, `iter_samples` does both for a list of shards; the training index (`split_index`: flat
  arrays the packer wrote beside the shards, memory-mapped, or read from the tar headers of older shards)
  holds where each sample's bytes lie in the tar, so training reads them without walking the shard.
- `classes`: the label space (`resolve_classes`): the manifest's, or the config's where it fits the shards.
- `epochs`: numbers only. Which sample sits at each position of the training stream, how a global batch
  is made (`BatchPlan`, `plan_batches`), optimiser steps per epoch (`steps_per_epoch`), which positions
  each rank takes, each rank's share of a validation split (`val_share`).
- `transforms`: pixels. Augmentation and validation resize in the loader workers on uint8 images, the
  training crop, and the one normalisation (`normalize`), which runs on the device.
- `cache`: decoded samples kept in a rank's memory (`data.cache_mb`), read and decoded once per run.
- `loaders`: the above put together as DataLoaders: `train_loader`, `val_loader`, `split_samples`.

An optimiser **step** takes one global batch; what one rank's loader yields per call is a **micro-batch**,
and `train.accum_steps` micro-batches on each rank make a step.

Training reads samples where the split's index says they lie (written at pack time; no bytes read at start). An
epoch is a permutation of the whole split, seeded by `train.seed` and the epoch, cut into global batches;
rank r takes its slice of each, so every rank takes the same number of micro-batches whatever the shard
layout (no all-reduce can hang on a rank that ran dry), a global batch is the same on any number of ranks,
and a resumed epoch goes on at the step where it stopped. Validation reads its shards in order and
partitions the split by global sample index, so each sample is seen exactly once over all ranks and workers.
"""

from .classes import ClassInfo, resolve_classes
from .epochs import BatchPlan, plan_batches, steps_per_epoch, val_share
from .loaders import (
    TrainBatches,
    ValBatches,
    augmented_samples,
    pad_collate,
    split_samples,
    train_loader,
    val_loader,
)
from .reader import SampleIndex, decode_sample, iter_samples, read_shard, split_index
from .transforms import (
    Normalization,
    build_transforms,
    mask_dtype,
    normalize,
    normalize_padded,
    preprocess,
    resolve_inputs,
    resolve_normalization,
    training_config,
    training_crop,
    turns,
)

__all__ = [
    "BatchPlan",
    "ClassInfo",
    "Normalization",
    "SampleIndex",
    "TrainBatches",
    "ValBatches",
    "augmented_samples",
    "build_transforms",
    "decode_sample",
    "iter_samples",
    "mask_dtype",
    "normalize",
    "normalize_padded",
    "pad_collate",
    "plan_batches",
    "preprocess",
    "read_shard",
    "resolve_classes",
    "resolve_inputs",
    "resolve_normalization",
    "split_index",
    "split_samples",
    "steps_per_epoch",
    "train_loader",
    "training_config",
    "training_crop",
    "turns",
    "val_loader",
    "val_share",
]
