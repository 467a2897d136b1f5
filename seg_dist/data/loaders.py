"""Shards -> per-rank batches: augmentation, training epochs, exact validation splits.

Training reads samples where the tar headers say they lie (an index built at start, no bytes read). An
epoch is a permutation of the whole split, seeded by `train.seed` and the epoch, cut into global batches;
rank r takes its slice of each, so every rank takes the same number of steps whatever the shard layout (no
all-reduce can hang on a rank that ran dry), a global batch is the same on any number of ranks, and a
resumed epoch goes on where it stopped. Validation reads its shards in order and partitions the split by
global sample index, so each sample is seen exactly once over all ranks and workers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import random
import re
import tarfile
import time
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
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

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
        raise ShardError.unreadable(url, e, opening=True) from e
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError.unreadable(url, e) from e
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


@dataclass(frozen=True)
class _Entry:
    """Where one sample's files lie in its shard: (offset, size) of each field's bytes."""

    shard: int
    key: str
    fields: tuple[tuple[str, int, int], ...]


_WDS_META = re.compile(r"__[^/]*__($|/)")


def _index_shard(url: str, count: int) -> list[tuple[str, tuple[tuple[str, int, int], ...]]]:
    """The samples of one shard in order: key and (field, offset, size) of each file, read from the tar
    headers without the files' bytes, with webdataset's key convention (`base_plus_ext`)."""
    samples: list[tuple[str, list[tuple[str, int, int]]]] = []
    try:
        with tarfile.open(url, "r:") as tar:
            for member in tar:
                # webdataset's tar_file_iterator skips these: not a file, or metadata named __*__
                if not member.isreg() or _WDS_META.match(member.name) or (
                        "/" not in member.name and member.name.startswith("__") and member.name.endswith("__")):
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None:
                    continue
                if not samples or samples[-1][0] != key:
                    samples.append((key, []))
                samples[-1][1].append((ext.lower(), member.offset_data, member.size))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError.unreadable(url, e) from e
    if len(samples) != count:
        raise ShardError(f"{url}: {len(samples)} samples, the manifest lists {count}; {ShardError.HINT}")
    return [(key, tuple(fields)) for key, fields in samples]


_PERMUTATION, _AUGMENTATION = 1, 2  # keep the two kinds of seed apart


class _TrainSet(Dataset):
    """Sample `position` of the run's training stream, decoded and augmented.

    Epoch e holds positions [e * span, (e + 1) * span): position p of it is sample perm_e[p % N] of the
    split, perm_e a permutation seeded by (seed, e), and its augmentation is seeded by (seed, e, p). No
    rank, worker or batch size enters, so a global batch is the same on any number of ranks.
    """

    def __init__(self, urls: list[str], entries: list[_Entry], transform: A.Compose, seed: int, span: int,
                 mask_type: torch.dtype) -> None:
        if not entries:
            raise ValueError("training split has no samples")
        self.urls, self.entries, self.transform = urls, entries, transform
        self.seed, self.span, self.mask_type = seed, span, mask_type
        self._perm: tuple[int, np.ndarray] | None = None
        self._files: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # open files stay with their process
        return {**self.__dict__, "_files": {}}

    def sample_of(self, position: int) -> int:
        epoch, p = divmod(position, self.span)
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng(_seeds(_PERMUTATION, self.seed, epoch, n=1)[0])
            self._perm = (epoch, rng.permutation(len(self.entries)))
        return int(self._perm[1][p % len(self.entries)])

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.entries[self.sample_of(position)]
        url = self.urls[entry.shard]
        f = self._files.get(entry.shard)
        try:
            if f is None:
                f = self._files[entry.shard] = open(url, "rb")  # noqa: SIM115 (kept open for the next sample)
            raw: dict[str, Any] = {"__key__": entry.key, "__url__": url}
            for field, offset, size in entry.fields:
                f.seek(offset)
                raw[field] = f.read(size)
                if len(raw[field]) != size:
                    raise EOFError(f"{field} of {entry.key!r} ends early")
        except (OSError, EOFError) as e:
            raise ShardError.unreadable(url, e) from e
        s = _decode(raw)
        aug = _seeds(_AUGMENTATION, self.seed, *divmod(position, self.span), n=1)[0]
        # One shared generator pair: Compose(seed=...) would give every transform an identical
        # stream, so e.g. hflip and vflip would always fire together.
        self.transform.set_random_state(np.random.default_rng(aug), random.Random(aug))
        return _apply(self.transform, s["image"], s["mask"], self.mask_type)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class _RankPositions(Sampler[list[int]]):
    """This rank's batches of stream positions, from batch `skip` of `epoch` on.

    Optimiser step k of an epoch takes the global batch at positions [k * G, (k + 1) * G); its micro-batch
    m on rank r is the `per_rank` positions from (m * world_size + r) * per_rank. `endless`: the next
    epochs follow, as their own samplers would give them.
    """

    def __init__(self, plan: BatchPlan, rank: int, span: int, batches_per_epoch: int, epoch: int, skip: int,
                 endless: bool) -> None:
        self.plan, self.rank, self.span = plan, rank, span
        self.batches_per_epoch, self.epoch, self.skip, self.endless = batches_per_epoch, epoch, skip, endless

    def __len__(self) -> int:
        if self.endless:
            raise TypeError("an endless sampler has no length")
        return max(0, self.batches_per_epoch - self.skip)

    def __iter__(self) -> Iterator[list[int]]:
        p = self.plan
        epoch, batch = self.epoch, self.skip
        while True:
            for j in range(batch, self.batches_per_epoch):
                step, micro = divmod(j, p.accum_steps)
                first = epoch * self.span + step * p.global_batch + (micro * p.world_size + self.rank) * p.per_rank
                yield list(range(first, first + p.per_rank))
            if not self.endless:
                return
            epoch, batch = epoch + 1, 0


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
    `mask_dtype`), or batches without end when made with `endless=True`; re-iterable, and iterating again
    repeats the same batches."""

    def __init__(self, dataset: _TrainSet, sampler: _RankPositions, loader_kwargs: dict[str, Any]) -> None:
        self.dataset, self.sampler, self.loader_kwargs = dataset, sampler, loader_kwargs

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.sampler.endless and len(self.sampler) == 0:
            return
        # Our own generator keeps the DataLoader from drawing its workers' seeds from the global torch RNG.
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, generator=torch.Generator().manual_seed(0),
                            **self.loader_kwargs)
        it = iter(loader)
        if loader.num_workers:
            log.info("train loader: %d worker process(es) started", loader.num_workers)
        try:
            yield from it
        except ShardError as e:  # from a worker, its message followed by the worker's traceback
            raise ShardError.one_line(e) from None
        finally:  # now, not at garbage collection: stops the workers and their prefetching
            del it, loader
            self.dataset.close()


def _train_entries(urls: list[str], counts: list[int]) -> list[_Entry]:
    start = time.perf_counter()
    entries: list[_Entry] = []
    for shard, (url, count) in enumerate(zip(urls, counts, strict=True)):
        entries += [_Entry(shard, key, fields) for key, fields in _index_shard(url, count)]
    if (took := time.perf_counter() - start) > 2:  # a pause at start deserves a word
        log.info("indexed %d training samples in %d shards (%.1f s)", len(entries), len(urls), took)
    return entries


def train_loader(cfg: Config, manifest: dict[str, Any], root: str, rank: int, world_size: int, epoch: int,
                 skip_steps: int = 0, endless: bool = False) -> TrainBatches:
    """This rank's batches for `epoch` from its batch `skip_steps` on: the same number on every rank.

    Each epoch is a fresh permutation of the split, and each global batch (train.batch_size x
    train.accum_steps x world_size samples) is the same with the same augmentations on any number of
    ranks: `train.seed` and the global batch alone choose them. A resumed epoch goes on exactly where it
    stopped, without reading what it skips. `endless=True`: those batches, then epoch + 1's, epoch + 2's,
    ..., from one loader whose workers start once.
    """
    if skip_steps < 0:
        raise ValueError(f"skip_steps={skip_steps} must be >= 0")
    split = cfg.data.train_split
    plan = BatchPlan(cfg.train.batch_size, cfg.train.accum_steps, world_size)
    steps = optimizer_steps_per_epoch(manifest, cfg, world_size)
    # An epoch whose length the config fixes may end mid-step: its positions still count whole steps.
    span = math.ceil(steps_per_epoch(manifest, cfg, world_size) / plan.accum_steps) * plan.global_batch
    classes = resolve_classes(cfg.data, manifest)
    crop = dataclasses.replace(cfg.data, image_size=training_crop(cfg.data, manifest))
    urls = shard_urls(root, manifest, split)
    dataset = _TrainSet(urls, _train_entries(urls, shard_counts(manifest, split)),
                        build_transforms(crop, train=True, ignore_index=classes.ignore_index), cfg.train.seed,
                        span, mask_dtype(classes.num_classes, classes.ignore_index))
    batches = steps * plan.accum_steps if endless else steps_per_epoch(manifest, cfg, world_size)
    sampler = _RankPositions(plan, rank, dataset.span, batches, epoch, skip_steps, endless)
    kw = _loader_kwargs(cfg)
    # One iterator per TrainBatches pass: persistent workers would only outlive their use.
    kw.pop("persistent_workers", None)
    return TrainBatches(dataset, sampler, kw)


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
