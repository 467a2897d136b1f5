"""Shards -> per-rank batches: augmentation, resampled training streams, exact validation splits.

Training streams resample shards (weighted by their sample counts) forever and are cut to exactly
`steps_per_epoch` batches, so every rank takes the same number of steps whatever the shard layout
and no all-reduce can hang on a rank that ran dry. Validation instead partitions the split by
global sample index, so each sample is seen exactly once over all ranks and workers.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import random
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# Importing albumentations otherwise asks PyPI for a newer version (in every worker, and offline
# clusters wait for the timeout).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from .config import Config, DataConfig, crop_hw
from .errors import UserError
from .shards import (
    IMAGE_EXTS,
    MASK_FIELD,
    META_FIELD,
    ShardError,
    decode_image,
    decode_mask,
    mean_image_size,
    shard_counts,
    shard_urls,
    split_count,
)

__all__ = [
    "BatchPlan",
    "ClassInfo",
    "augmented_samples",
    "build_transforms",
    "iter_samples",
    "mask_dtype",
    "normalize",
    "normalize_padded",
    "optimizer_steps_per_epoch",
    "pad_collate",
    "plan_batches",
    "preprocess",
    "resolve_classes",
    "split_samples",
    "steps_per_epoch",
    "train_loader",
    "training_crop",
    "val_loader",
    "val_share",
]

log = logging.getLogger(__name__)


# --- classes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassInfo:
    num_classes: int
    ignore_index: int
    names: list[str]


def resolve_classes(data_cfg: DataConfig, manifest: dict[str, Any]) -> ClassInfo:
    """Class count, ignore index and names: the manifest's unless the config overrides them."""
    num_classes = int(data_cfg.num_classes or manifest["num_classes"])
    ignore_index = int(data_cfg.ignore_index if data_cfg.ignore_index is not None else manifest["ignore_index"])
    names = list(data_cfg.class_names or manifest.get("class_names") or [])
    if len(names) != num_classes:
        names = [f"class_{i}" for i in range(num_classes)]
    return ClassInfo(num_classes, ignore_index, names)


# --- transforms --------------------------------------------------------------------------------


def build_transforms(data_cfg: DataConfig, train: bool, ignore_index: int) -> A.Compose:
    """Image+mask augmentation (train) or resize (val, when data.val_size is set) on uint8 HxWx3 images;
    masks always use nearest. Normalisation is not here: it runs on the device (`normalize`).

    Every op that can introduce pixels fills the mask with `ignore_index`: albumentations fills
    masks with 0, a real class, unless told otherwise.
    """
    if not train:
        ops: list[Any] = []
        if data_cfg.val_size > 0:
            ops.append(A.Resize(data_cfg.val_size, data_cfg.val_size, mask_interpolation=cv2.INTER_NEAREST))
        return A.Compose(ops)
    aug = data_cfg.augment
    if data_cfg.image_size == 0:
        raise ValueError("data.image_size=0 (auto) is resolved from the manifest: pass the crop training_crop() gives")
    height, width = crop_hw(data_cfg)
    ops = []
    lo, hi = aug.scale
    if (lo, hi) != (1.0, 1.0):
        # RandomScale samples from (1 + low, 1 + high).
        ops.append(A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    ops += [
        A.PadIfNeeded(height, width, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index),
        A.RandomCrop(height, width),
    ]
    if aug.hflip > 0:
        ops.append(A.HorizontalFlip(p=aug.hflip))
    if aug.vflip > 0:
        ops.append(A.VerticalFlip(p=aug.vflip))
    if aug.brightness_contrast > 0:
        ops.append(A.RandomBrightnessContrast(p=aug.brightness_contrast))
    if aug.affine > 0:
        ops.append(A.Affine(
            translate_percent=(-aug.translate, aug.translate), rotate=(-aug.rotate, aug.rotate),
            border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=ignore_index,
            mask_interpolation=cv2.INTER_NEAREST, p=aug.affine,
        ))
    return A.Compose(ops)


AUTO_CROP_MAX = 512  # the longest auto crop side: larger frames are cropped, not trained whole


def training_crop(data_cfg: DataConfig, manifest: dict[str, Any]) -> tuple[int, int]:
    """`data.image_size` as (H, W); 0 (auto): the train split's mean frame, each side rounded up to a multiple
    of 8 and capped at 512. Small images train whole (CCP packed at 200 x 133: 200 x 136; a 120 x 160 set:
    120 x 160) because the scene around a pixel is what tells its class apart; only sides above 512 are
    cropped (Cityscapes at 1024 x 2048: 512 x 512). docs/recipe.md has the evidence."""
    if data_cfg.image_size != 0:
        return crop_hw(data_cfg)
    h, w = mean_image_size(manifest, data_cfg.train_split)
    return _auto_side(h), _auto_side(w)


def _auto_side(mean: float) -> int:
    return min(AUTO_CROP_MAX, max(8, math.ceil(mean / 8) * 8))


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              channels_last: bool = False) -> torch.Tensor:
    """uint8 (N x) H x W x 3 images, as batches leave the loader -> float32 (N x) 3 x H x W, normalised.

    The one normalisation of seg_dist (training, validation, evaluate, predict, preview): run on the
    device, so loader workers ship 4x fewer bytes than float32. Same arithmetic as albumentations'
    Normalize(max_pixel_value=255): (x - 255 mean) * (1 / (255 std)) in float32. The permute of an
    N x H x W x 3 batch is already channels-last in memory; `channels_last=False` makes it contiguous.
    """
    if images.dtype != torch.uint8 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 ... x H x W x 3 images, got {images.dtype} {tuple(images.shape)}")
    shift, scale = _normalize_constants(images.device, tuple(mean), tuple(std))
    x = (images.float() - shift) * scale
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(2, 0, 1)
    if x.ndim == 4 and channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


@functools.lru_cache(maxsize=16)
def _normalize_constants(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a tensor built from a Python list on a GPU is a blocking copy, every step.
    shift = torch.tensor([255.0 * m for m in mean], dtype=torch.float32, device=device)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=device)
    return shift, scale


def preprocess(image: np.ndarray, data_cfg: DataConfig) -> torch.Tensor:
    """uint8 HxWx3 RGB -> 3xHxW float normalised as validation does, at the original resolution."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    return normalize(torch.from_numpy(np.ascontiguousarray(image)), data_cfg.mean, data_cfg.std)


def mask_dtype(num_classes: int, ignore_index: int) -> torch.dtype:
    """The smallest integer type holding every class id and the ignore index (shipped between processes)."""
    top = max(num_classes - 1, ignore_index)
    lowest = min(0, ignore_index)
    if lowest >= 0 and top <= 255:
        return torch.uint8
    if lowest >= -(2**15) and top < 2**15:
        return torch.int16
    return torch.int32


def _apply(transform: A.Compose, image: np.ndarray, mask: np.ndarray,
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 H x W x 3 image and compact H x W mask tensors (see `normalize` for the rest)."""
    out = transform(image=image, mask=mask)
    mask = torch.from_numpy(np.ascontiguousarray(out["mask"])).to(dtype)
    return torch.from_numpy(np.ascontiguousarray(out["image"])), mask


# --- raw samples -------------------------------------------------------------------------------


def _decode(raw: dict[str, Any]) -> dict[str, Any]:
    key, url = raw["__key__"], raw.get("__url__", "?")
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None or MASK_FIELD not in raw:
        fields = sorted(k for k in raw if not k.startswith("__"))
        raise ShardError(f"{url}: sample {key!r} needs an image ({'/'.join(IMAGE_EXTS)}) and {MASK_FIELD}; "
                         f"has {fields}")
    try:
        image = decode_image(raw[ext])
        mask = decode_mask(raw[MASK_FIELD])
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... for damaged bytes
        raise ShardError(f"{url}: sample {key!r} does not decode ({type(e).__name__}: {e}); {ShardError.HINT}") from e
    if image.shape[:2] != mask.shape:
        raise ShardError(f"{url}: sample {key!r}: image {image.shape[:2]} and mask {mask.shape} differ in size")
    meta = json.loads(raw[META_FIELD]) if META_FIELD in raw else {}
    return {"key": key, "image": image, "mask": mask, "meta": meta, "url": url}


def _raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """Undecoded samples of one shard (dicts of bytes by extension, plus __key__ and __url__)."""
    # webdataset's tarfile_samples leaves the file open when a reader stops mid-shard; closing it
    # here also covers abandoned train streams and validation readers that stop at their range end.
    try:
        stream = gopen(url, "rb")
    except OSError as e:
        raise ShardError(f"{url}: cannot open ({e}); {ShardError.HINT}") from e
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{url}: unreadable shard ({type(e).__name__}: {e}); {ShardError.HINT}") from e
    finally:
        stream.close()


def iter_samples(urls: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Decoded samples in shard order, no augmentation: dicts of key, image (uint8 HxWx3),
    mask (int64 HxW), meta (dict) and url."""
    for url in urls:
        for raw in _raw_samples(url):
            yield _decode(raw)


# --- training ----------------------------------------------------------------------------------


def _seeds(*parts: int, n: int = 3) -> list[int]:
    # SeedSequence mixes the parts well, unlike sums or webdataset's make_seed.
    return [int(s) for s in np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(n)]


def _worker() -> tuple[int, int]:
    # (No cv2.setNumThreads(1) in workers: called in a worker forked after the parent used OpenCV's
    # thread pool, it deadlocks.)
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _resampled(urls: list[str], weights: list[int], rng: random.Random) -> Iterator[dict[str, Any]]:
    """Raw samples of shards drawn with replacement, forever."""
    # webdataset's ResampledShards picks shards uniformly and seeds itself from RANK/WORLD_SIZE or
    # torch.distributed (and pid/time unless deterministic); weighting by sample count keeps a
    # small last shard from being oversampled, and the caller owns the seed.
    while True:
        url = rng.choices(urls, weights)[0]
        empty = True
        for raw in _raw_samples(url):
            empty = False
            yield raw
        if empty:  # drawing it again and again would loop forever without a sample
            raise ValueError(f"{url}: no samples in the shard, the manifest lists some")


class _TrainStream(IterableDataset):
    """Augmented (image, mask) pairs.

    One epoch's stream (`epoch_steps=None`): endless, seeded by (seed, epoch, rank, skip, worker); the
    loader cuts it at the epoch's length. Several epochs' (`epoch_steps` set): the batches the per-epoch
    loaders of `epoch`, `epoch + 1`, ... would give one after the other, from one set of workers.
    """

    def __init__(self, urls: list[str], counts: list[int], transform: A.Compose, shuffle_buffer: int,
                 seed: int, epoch: int, rank: int, skip_steps: int, mask_type: torch.dtype,
                 batch_size: int = 1, epoch_steps: int | None = None) -> None:
        if not urls or sum(counts) == 0:
            raise ValueError("training split has no samples")
        self.urls, self.counts, self.transform = urls, counts, transform
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.epoch, self.rank, self.skip_steps = seed, epoch, rank, skip_steps
        self.mask_type = mask_type
        self.batch_size, self.epoch_steps = batch_size, epoch_steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, workers = _worker()
        if self.epoch_steps is None:
            yield from self._epoch(self.epoch, self.skip_steps, worker)
            return
        # The DataLoader takes batch n from worker n % workers. A per-epoch loader takes batch j of its
        # epoch from worker j % workers, so within an epoch starting at batch `start` this worker plays
        # the per-epoch loader's worker (worker - start) % workers, for every `workers`-th batch.
        epoch, skip, start = self.epoch, self.skip_steps, 0
        while True:
            length = max(0, self.epoch_steps - skip)
            plays = (worker - start) % workers
            batches = max(0, -(-(length - plays) // workers))
            yield from itertools.islice(self._epoch(epoch, skip, plays), batches * self.batch_size)
            epoch, skip, start = epoch + 1, 0, start + length

    def _epoch(self, epoch: int, skip: int, worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shard_seed, shuffle_seed, aug_seed = _seeds(self.seed, epoch, self.rank, skip, worker)
        # One shared generator pair: Compose(seed=...) would give every transform an identical
        # stream, so e.g. hflip and vflip would always fire together.
        self.transform.set_random_state(np.random.default_rng(aug_seed), random.Random(aug_seed))
        raw = _resampled(self.urls, self.counts, random.Random(shard_seed))
        if self.shuffle_buffer > 1:
            raw = wds_shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                              rng=random.Random(shuffle_seed))(raw)
        for sample in raw:
            s = _decode(sample)
            yield _apply(self.transform, s["image"], s["mask"], self.mask_type)


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is made: `world_size` ranks x `per_rank` samples x `accum_steps` micro-batches."""

    per_rank: int
    accum_steps: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.accum_steps * self.world_size

    def describe(self) -> str:
        return f"{self.world_size} ranks x {self.per_rank} x {self.accum_steps} accumulation = {self.global_batch}"


def plan_batches(global_batch: int, world_size: int, max_per_rank: int) -> BatchPlan:
    """The largest per-rank batch (at most `max_per_rank`) that makes `global_batch` exactly on `world_size`
    ranks, with gradient accumulation making up the rest."""
    if global_batch < 1 or global_batch % world_size:
        fits = [w for w in range(1, global_batch + 1) if global_batch % w == 0][:8]
        nearest = world_size * max(1, round(global_batch / world_size))
        raise UserError(
            f"a global batch of {global_batch} cannot be split over {world_size} ranks: set "
            f"train.global_batch_size to a multiple of {world_size} (e.g. {nearest}), run on "
            f"{', '.join(map(str, fits))} ranks, or accept a changed global batch with train.allow_batch_change=true"
        )
    per_world = global_batch // world_size
    per_rank = max(b for b in range(1, min(max_per_rank, per_world) + 1) if per_world % b == 0)
    return BatchPlan(per_rank, per_world // per_rank, world_size)


def steps_per_epoch(manifest: dict[str, Any], cfg: Config, world_size: int) -> int:
    """Batches per rank per epoch: the config's, or a whole number of optimiser steps (of accum_steps
    batches each) that covers the split once. Counted in optimiser steps of the global batch, so the
    same global batch gives the same schedule on any number of ranks."""
    if cfg.train.steps_per_epoch > 0:
        return cfg.train.steps_per_epoch
    n = split_count(manifest, cfg.data.train_split)
    accum = cfg.train.accum_steps
    return max(1, math.ceil(n / (world_size * cfg.train.batch_size * accum))) * accum


def optimizer_steps_per_epoch(manifest: dict[str, Any], cfg: Config, world_size: int) -> int:
    """The trainer's epoch in optimiser steps (each `train.accum_steps` batches): at least one."""
    return max(1, steps_per_epoch(manifest, cfg, world_size) // cfg.train.accum_steps)


def _loader_kwargs(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    kw: dict[str, Any] = {"num_workers": d.workers, "pin_memory": d.pin_memory and torch.cuda.is_available()}
    if d.workers > 0:
        kw.update(persistent_workers=d.persistent_workers, prefetch_factor=d.prefetch_factor)
    return kw


class TrainBatches:
    """`len(self)` batches of (uint8 images B x H x W x 3, compact masks B x H x W: see `normalize` and
    `mask_dtype`), or batches without end when made with `steps=None`; re-iterable, and iterating again
    repeats the same batches."""

    def __init__(self, dataset: _TrainStream, batch_size: int, steps: int | None, loader_kwargs: dict[str, Any],
                 seed: int) -> None:
        self.dataset, self.batch_size, self.steps = dataset, batch_size, steps
        self.loader_kwargs, self.seed = loader_kwargs, seed

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless TrainBatches has no length")
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.steps == 0:
            return
        # The stream is endless, so the epoch ends here and every worker's batches are full.
        # Our own generator keeps the DataLoader from drawing on the global torch RNG.
        loader = DataLoader(self.dataset, batch_size=self.batch_size, drop_last=True,
                            generator=torch.Generator().manual_seed(self.seed), **self.loader_kwargs)
        it = iter(loader)
        if loader.num_workers:
            log.info("train loader: %d worker process(es) started", loader.num_workers)
        try:
            for _ in range(self.steps) if self.steps is not None else itertools.count():
                yield next(it)
        except ShardError as e:  # from a worker, its message followed by the worker's traceback
            raise ShardError.one_line(e) from None
        finally:  # now, not at garbage collection: stops the workers and their prefetching
            del it, loader


def train_loader(cfg: Config, manifest: dict[str, Any], root: str, rank: int, world_size: int, epoch: int,
                 skip_steps: int = 0, endless: bool = False) -> TrainBatches:
    """This rank's batches for `epoch`: exactly steps_per_epoch - skip_steps of them on every rank.

    Same (train.seed, epoch, rank, skip_steps) -> same batches. A resumed epoch (skip_steps > 0)
    draws fresh samples rather than replaying the skipped ones, which would cost their decoding.
    `endless=True`: those batches, then epoch + 1's, epoch + 2's, ... exactly as their own loaders would give
    them (so a run resumed at an epoch boundary continues as if never stopped), from one loader whose
    workers start once. Started afresh every epoch, workers each refill a shuffle buffer before their
    first batch; kept, they fill the next epoch's while this one ends and validation runs.
    """
    if skip_steps < 0:
        raise ValueError(f"skip_steps={skip_steps} must be >= 0")
    split = cfg.data.train_split
    steps = max(0, steps_per_epoch(manifest, cfg, world_size) - skip_steps)
    classes = resolve_classes(cfg.data, manifest)
    crop = dataclasses.replace(cfg.data, image_size=training_crop(cfg.data, manifest))
    transform = build_transforms(crop, train=True, ignore_index=classes.ignore_index)
    dataset = _TrainStream(shard_urls(root, manifest, split), shard_counts(manifest, split), transform,
                           cfg.data.shuffle_buffer, cfg.train.seed, epoch, rank, skip_steps,
                           mask_dtype(classes.num_classes, classes.ignore_index), cfg.train.batch_size,
                           # the batches the trainer takes per epoch (whole optimiser steps)
                           optimizer_steps_per_epoch(manifest, cfg, world_size) * cfg.train.accum_steps
                           if endless else None)
    kw = _loader_kwargs(cfg)
    # One iterator per TrainBatches pass: persistent workers would only outlive their use.
    kw.pop("persistent_workers", None)
    return TrainBatches(dataset, cfg.train.batch_size, None if endless else steps, kw,
                        _seeds(cfg.train.seed, epoch, rank, n=1)[0])


def augmented_samples(cfg: Config, manifest: dict[str, Any], n: int, split: str,
                      epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`n` (uint8 HxWx3 image, int64 HxW mask) pairs as training sees them: the trainer's own loader,
    one sample per batch and in-process."""
    split_count(manifest, split)  # a one-line error for an unknown split
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, train_split=split, workers=0),
        train=dataclasses.replace(cfg.train, batch_size=1, steps_per_epoch=n),
    )
    for images, masks in train_loader(cfg, manifest, cfg.data.root, 0, 1, epoch):
        yield images[0].numpy(), masks[0].long().numpy()


# --- validation --------------------------------------------------------------------------------


def _share(n: int, part: int, parts: int) -> tuple[int, int]:
    return part * n // parts, (part + 1) * n // parts


def val_share(manifest: dict[str, Any], split: str, rank: int, world_size: int) -> int:
    """How many samples of `split` rank `rank` validates."""
    lo, hi = _share(sum(shard_counts(manifest, split)), rank, world_size)
    return hi - lo


class _ValStream(IterableDataset):
    """This rank's contiguous range of global sample indices, split again between workers; each
    worker opens only the shards overlapping its range and decodes only its own samples."""

    def __init__(self, urls: list[str], counts: list[int], transform: A.Compose | None, start: int,
                 stop: int, mask_type: torch.dtype = torch.int64) -> None:
        self.urls, self.counts, self.transform = urls, counts, transform  # None: decoded numpy, untransformed
        self.mask_type = mask_type
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
        worker, num_workers = _worker()
        lo, hi = _share(self.stop - self.start, worker, num_workers)
        start, stop = self.start + lo, self.start + hi
        first = 0  # global index of the shard's first sample
        for url, count in zip(self.urls, self.counts, strict=True):
            if first >= stop:
                break
            if first + count > start:
                yield from self._shard(url, count, first, start, stop)
            first += count

    def _shard(self, url: str, count: int, first: int, start: int, stop: int) -> Iterator[Any]:
        read = 0
        for i, raw in enumerate(_raw_samples(url)):
            # A shard that disagrees with the manifest would shift every later index: fail loudly.
            if i >= count:
                raise ValueError(f"{url}: more samples than the manifest's {count}")
            read = i + 1
            if first + i >= stop:
                return
            if first + i < start:
                continue  # another reader's sample: skipped before decoding
            s = _decode(raw)
            if self.transform is None:
                yield s["image"], s["mask"], s["key"]
            else:
                image, mask = _apply(self.transform, s["image"], s["mask"], self.mask_type)
                yield image, mask, s["key"]
        if read != count:
            raise ValueError(f"{url}: {read} samples, the manifest lists {count}")


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor, str]], ignore_index: int
                ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[tuple[int, int]]]:
    """Stack samples of different sizes: pad uint8 H x W x 3 images to the largest H and W (bottom/right)
    with 0 and masks with `ignore_index`, so padded pixels never count; the sizes come along, so the
    padding can be zeroed again after normalisation (`normalize_padded`)."""
    h = max(img.shape[0] for img, _, _ in batch)
    w = max(img.shape[1] for img, _, _ in batch)
    images = torch.zeros((len(batch), h, w, 3), dtype=torch.uint8)
    masks = torch.full((len(batch), h, w), ignore_index, dtype=batch[0][1].dtype)
    for i, (img, mask, _) in enumerate(batch):
        images[i, : img.shape[0], : img.shape[1]] = img
        masks[i, : mask.shape[0], : mask.shape[1]] = mask
    return images, masks, [key for _, _, key in batch], [tuple(img.shape[:2]) for img, _, _ in batch]


def normalize_padded(images: torch.Tensor, sizes: Sequence[tuple[int, int]], mean: Sequence[float],
                     std: Sequence[float], channels_last: bool = False) -> torch.Tensor:
    """`normalize` for a padded batch: the padding is 0 after normalisation, as if padded then, so a
    batch's numbers do not depend on how it was assembled."""
    x = normalize(images, mean, std, channels_last)
    h, w = x.shape[-2:]
    for i, (hi, wi) in enumerate(sizes):
        if hi < h:
            x[i, :, hi:, :] = 0
        if wi < w:
            x[i, :, :, wi:] = 0
    return x


class ValBatches:
    """(uint8 images, masks, keys, sizes) batches of this rank's share; iterating again restarts (with
    persistent workers the same worker processes are reused)."""

    def __init__(self, loader: DataLoader, num_samples: int, num_batches: int) -> None:
        self.loader, self.num_samples, self.num_batches = loader, num_samples, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str], list[tuple[int, int]]]]:
        try:
            yield from self.loader
        except ShardError as e:  # from a worker, its message followed by the worker's traceback
            raise ShardError.one_line(e) from None


def val_loader(cfg: Config, manifest: dict[str, Any], root: str, rank: int, world_size: int,
               split: str | None = None) -> ValBatches:
    """Every sample of `split` (default data.val_split) exactly once over all ranks and workers,
    never padded or repeated; ranks may get unequal counts (see `val_share`)."""
    split = split or cfg.data.val_split
    counts = shard_counts(manifest, split)
    start, stop = _share(sum(counts), rank, world_size)
    classes = resolve_classes(cfg.data, manifest)
    ignore = classes.ignore_index
    dataset = _ValStream(shard_urls(root, manifest, split), counts,
                         build_transforms(cfg.data, train=False, ignore_index=ignore), start, stop,
                         mask_dtype(classes.num_classes, ignore))
    batch_size = cfg.data.val_batch_size or cfg.train.batch_size
    # Each worker batches its own samples, so each worker's last batch may be partial.
    workers = max(1, cfg.data.workers)
    num_batches = sum(math.ceil((hi - lo) / batch_size) for lo, hi in
                      (_share(stop - start, w, workers) for w in range(workers)))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=functools.partial(pad_collate, ignore_index=ignore),
                        **_loader_kwargs(cfg))
    return ValBatches(loader, stop - start, num_batches)


def _no_collate(sample: Any) -> Any:
    return sample


def split_samples(cfg: Config, manifest: dict[str, Any], root: str, rank: int, world_size: int,
                  split: str) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """This rank's exact-once share of `split` as stored: (uint8 H x W x 3 image, int64 H x W mask, key),
    decoded in `data.workers` loader processes, neither resized nor normalised."""
    counts = shard_counts(manifest, split)
    start, stop = _share(sum(counts), rank, world_size)
    dataset = _ValStream(shard_urls(root, manifest, split), counts, None, start, stop)
    kw = _loader_kwargs(cfg)
    kw.pop("pin_memory", None)
    try:
        yield from DataLoader(dataset, batch_size=None, collate_fn=_no_collate, **kw)
    except ShardError as e:  # from a worker, its message followed by the worker's traceback
        raise ShardError.one_line(e) from None
