"""Shards -> per-rank batches: the training loader (micro-batches of an epoch's permutation, augmented) and
the exact-once readers of a split (validation batches, and samples as stored)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..config import Config
from ..distributed import loader_worker_init
from ..remote import is_remote
from ..shards import ImageSpec, ShardError, image_spec, shard_counts, shard_urls, split_count
from .cache import SampleCache, ValCache, cache_budget, sample_bytes, split_pixels
from .classes import resolve_classes
from .epochs import RankPositions, StreamOrder, TrainingEpochs, share
from .reader import SampleIndex, SampleReader, decode_sample, index_entry, split_index
from .stream import StreamBatches, shard_samples, stream_loader
from .transforms import build_transforms, mask_dtype, training_config, transform_sample

if TYPE_CHECKING:
    import albumentations as A

__all__ = [
    "TrainBatches",
    "ValBatches",
    "augmented_samples",
    "pad_collate",
    "split_samples",
    "train_loader",
    "val_loader",
]

log = logging.getLogger(__name__)


def _loader_kwargs(cfg: Config) -> dict[str, Any]:
    d = cfg.data
    kw: dict[str, Any] = {"num_workers": d.workers, "pin_memory": d.pin_memory and torch.cuda.is_available()}
    if d.workers > 0:
        kw.update(persistent_workers=d.persistent_workers, prefetch_factor=d.prefetch_factor,
                  worker_init_fn=loader_worker_init)  # a stop signal is the rank's to act on, not its loader's
    return kw


# --- training ----------------------------------------------------------------------------------


class _TrainSet(Dataset):
    """Sample `position` of the run's training stream (see `StreamOrder`), read where the split's index says
    it lies (or taken from `cache`, decoded before), decoded and augmented with the position's own seed. The
    index is flat numpy arrays (memory-mapped when packed with the shards): forked workers share it, and a
    pickled one maps the same file."""

    def __init__(self, reader: SampleReader, index: SampleIndex, order: StreamOrder, transform: A.Compose,
                 mask_type: torch.dtype, cache: SampleCache | None = None) -> None:
        self.reader, self.index, self.order = reader, index, order
        self.transform, self.mask_type, self.cache = transform, mask_type, cache

    def sample_of(self, position: int) -> int:
        return self.order.sample_of(position)

    def _decode(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = decode_sample(self.reader.read(index_entry(self.index, i)))
        return s["image"], s["mask"]

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.sample_of(position)
        if self.cache is None:
            image, mask = self._decode(i)
        else:
            image, mask = self.cache.get(i, functools.partial(self._decode, i))
        aug = self.order.augmentation_seed(position)
        # One shared generator pair: Compose(seed=...) would give every transform an identical
        # stream, so e.g. hflip and vflip would always fire together.
        self.transform.set_random_state(np.random.default_rng(aug), random.Random(aug))
        return transform_sample(self.transform, image, mask, self.mask_type)

    def close(self) -> None:
        self.reader.close()


class TrainBatches:
    """`len(self)` micro-batches of (uint8 images B x H x W x 3, compact masks B x H x W: see `normalize` and
    `mask_dtype`), or micro-batches without end when made with `endless=True`; re-iterable, and iterating
    again repeats the same micro-batches."""

    def __init__(self, dataset: _TrainSet, sampler: RankPositions, loader_kwargs: dict[str, Any]) -> None:
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
        failed = None
        try:
            yield from it
        except ShardError as e:  # from a worker, its message followed by the worker's traceback
            # Raised below, outside this block: the caught error's traceback holds the DataLoader iterator,
            # which would keep its workers alive (waiting for work) until the process exits and joins them.
            failed = ShardError.one_line(e)
        finally:  # now, not at garbage collection: stops the workers and their prefetching
            del it, loader
            self.dataset.close()
        if failed is not None:
            raise failed


def train_loader(cfg: Config, manifest: dict[str, Any], root: str, rank: int, world_size: int, epoch: int,
                 skip_steps: int = 0, endless: bool = False) -> TrainBatches | StreamBatches:
    """This rank's micro-batches of `epoch` from optimiser step `skip_steps` on: `train.accum_steps` per step,
    `steps_per_epoch` steps, the same number on every rank.

    Each epoch is a fresh permutation of the split, and each global batch (train.batch_size x
    train.accum_steps x world_size samples) is the same with the same augmentations on any number of
    ranks: `train.seed` and the global batch alone choose them. A resumed epoch goes on exactly where it
    stopped, without reading what it skips. `endless=True`: those micro-batches, then epoch + 1's,
    epoch + 2's, ..., from one loader whose workers start once.

    With `data.workers=0`, a split that fits in `data.cache_mb` is kept decoded (before augmentation) after its
    first read: the same batches, read once (see `data.cache`).
    """
    if is_remote(root):  # no offsets to read at: whole shards streamed (data/stream.py says what that gives up)
        cache_budget(f"{cfg.data.train_split} split", cfg.data.cache_mb, cfg.data.workers, None, remote=True)
        return stream_loader(cfg, manifest, root, rank, world_size, epoch, skip_steps, endless, _loader_kwargs(cfg))
    epochs = TrainingEpochs.of(cfg, manifest, root, world_size, skip_steps)
    split, plan, steps = epochs.split, epochs.plan, epochs.steps
    classes = resolve_classes(cfg.data, manifest)
    crop = training_config(cfg.data, manifest)
    urls = shard_urls(root, manifest, split)
    index = split_index(root, manifest, split)
    order = StreamOrder(cfg.train.seed, steps * plan.global_batch, len(index))
    spec = image_spec(manifest)
    masks = mask_dtype(classes.num_classes, classes.ignore_index)
    dataset = _TrainSet(SampleReader(urls), index, order,
                        build_transforms(crop, train=True, ignore_index=classes.ignore_index, image=spec),
                        masks, _train_cache(cfg, manifest, split, len(index), spec, masks))
    sampler = RankPositions(plan, rank, order.span, steps, epoch, skip_steps, endless)
    kw = _loader_kwargs(cfg)
    # One iterator per TrainBatches pass: persistent workers would only outlive their use.
    kw.pop("persistent_workers", None)
    return TrainBatches(dataset, sampler, kw)


def _train_cache(cfg: Config, manifest: dict[str, Any], split: str, num_samples: int, image: ImageSpec,
                 masks: torch.dtype) -> SampleCache | None:
    # Every rank reads samples of the whole split over the epochs (each epoch permutes all of it), so the
    # whole split counts against one rank's budget.
    pixels = split_pixels(manifest, split)
    decoded = None if pixels is None else sample_bytes(pixels, num_samples, image, masks.itemsize)
    what = f"{split} split"
    budget = cache_budget(what, cfg.data.cache_mb, cfg.data.workers, decoded)
    return None if budget is None else SampleCache(what, budget, num_samples)


def augmented_samples(cfg: Config, manifest: dict[str, Any], n: int, split: str,
                      epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`n` (uint8 HxWx3 image, int64 HxW mask) pairs as training sees them: the trainer's own loader,
    one sample per micro-batch and step, in-process."""
    split_count(manifest, split)  # a one-line error for an unknown split
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, train_split=split, workers=0),
        train=dataclasses.replace(cfg.train, batch_size=1, accum_steps=1, steps_per_epoch=n),
    )
    for images, masks in train_loader(cfg, manifest, cfg.data.root, 0, 1, epoch):
        yield images[0].numpy(), masks[0].long().numpy()


# --- validation --------------------------------------------------------------------------------


def _worker() -> tuple[int, int]:
    # (No cv2.setNumThreads(1) in workers: called in a worker forked after the parent used OpenCV's
    # thread pool, it deadlocks.)
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _ValStream(IterableDataset):
    """This rank's contiguous range of global sample indices, split again between workers; each
    worker opens only the shards overlapping its range and decodes only its own samples."""

    def __init__(self, urls: list[str], counts: list[int], transform: A.Compose | None, start: int,
                 stop: int, mask_type: torch.dtype = torch.int64, retries: int = 0) -> None:
        self.urls, self.counts, self.transform = urls, counts, transform  # None: decoded numpy, untransformed
        self.mask_type, self.retries = mask_type, retries  # retries: of a remote shard's read
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
        worker, num_workers = _worker()
        lo, hi = share(self.stop - self.start, worker, num_workers)
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
        for i, raw in enumerate(shard_samples(url, count, self.retries)):
            # A shard that disagrees with the manifest would shift every later index: fail loudly.
            if i >= count:
                raise ShardError(f"{url}: more samples than the manifest's {count}; {ShardError.HINT}")
            read = i + 1
            if first + i >= stop:
                return
            if first + i < start:
                continue  # another reader's sample: skipped before decoding
            s = decode_sample(raw)
            if self.transform is None:
                yield s["image"], s["mask"], s["key"]
            else:
                image, mask = transform_sample(self.transform, s["image"], s["mask"], self.mask_type)
                yield image, mask, s["key"]
        if read != count:
            raise ShardError(f"{url}: {read} samples, the manifest lists {count}; {ShardError.HINT}")


class _CachedVal(IterableDataset):
    """`stream`'s samples, all read into `cache` before the first is given, then given in the cache's order
    (batches of one image size, `size_order`), so every pass, the first too, gives the same batches. A share
    that passes the budget after all is given as read, in `stream`'s order, and is not cached again."""

    def __init__(self, stream: _ValStream, cache: ValCache) -> None:
        self.stream, self.cache = stream, cache
        self.gave_up = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
        if self.gave_up:
            yield from self.stream
            return
        if not self.cache.complete:
            self.cache.release()  # what a pass broken off (a damaged shard) held: read again, in order
            it = iter(self.stream)
            for sample in it:
                if not self.cache.add(sample):
                    self.gave_up = True
                    yield from self.cache.release()
                    yield sample
                    yield from it
                    return
            self.cache.seal()
        yield from self.cache.samples


def pad_collate(batch: list[tuple[torch.Tensor, torch.Tensor, str]], ignore_index: int
                ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[tuple[int, int]]]:
    """Stack samples of different sizes: pad H x W x C images to the largest H and W (bottom/right)
    with 0 and masks with `ignore_index`, so padded pixels never count; the sizes come along, so the
    padding can be zeroed again after normalisation (`normalize_padded`)."""
    h = max(img.shape[0] for img, _, _ in batch)
    w = max(img.shape[1] for img, _, _ in batch)
    first = batch[0][0]
    images = torch.zeros((len(batch), h, w, first.shape[2]), dtype=first.dtype)
    masks = torch.full((len(batch), h, w), ignore_index, dtype=batch[0][1].dtype)
    for i, (img, mask, _) in enumerate(batch):
        images[i, : img.shape[0], : img.shape[1]] = img
        masks[i, : mask.shape[0], : mask.shape[1]] = mask
    return images, masks, [key for _, _, key in batch], [tuple(img.shape[:2]) for img, _, _ in batch]


class ValBatches:
    """(uint8 images, masks, keys, sizes) batches of this rank's share; iterating again gives the same batches
    (with persistent workers the same worker processes are reused)."""

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
    never padded or repeated; ranks may get unequal counts (see `val_share`).

    Batches follow the shards' order, except where this rank's share is cached (`data.cache_mb`, with
    `data.workers=0`): then it is read whole into memory before the first batch, and batched by image size
    (`size_order`), so mixed sizes are padded little; the same batches at every pass.
    """
    split = split or cfg.data.val_split
    counts = shard_counts(manifest, split)
    start, stop = share(sum(counts), rank, world_size)
    classes = resolve_classes(cfg.data, manifest)
    ignore = classes.ignore_index
    spec, masks = image_spec(manifest), mask_dtype(classes.num_classes, ignore)
    stream = _ValStream(shard_urls(root, manifest, split), counts,
                        build_transforms(cfg.data, train=False, ignore_index=ignore, image=spec),
                        start, stop, masks, cfg.data.retries)
    batch_size = cfg.data.val_batch_size or cfg.train.batch_size
    cache = _val_cache(cfg, manifest, split, stop - start, spec, masks, batch_size)
    dataset: IterableDataset = stream if cache is None else _CachedVal(stream, cache)
    # Each worker batches its own samples, so each worker's last batch may be partial.
    workers = max(1, cfg.data.workers)
    num_batches = sum(math.ceil((hi - lo) / batch_size) for lo, hi in
                      (share(stop - start, w, workers) for w in range(workers)))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=functools.partial(pad_collate, ignore_index=ignore),
                        **_loader_kwargs(cfg))
    return ValBatches(loader, stop - start, num_batches)


def _val_cache(cfg: Config, manifest: dict[str, Any], split: str, samples: int, image: ImageSpec,
               masks: torch.dtype, batch_size: int) -> ValCache | None:
    # The samples are held as validation takes them: resized to data.val_size where set, masks compact.
    total = split_count(manifest, split)
    if cfg.data.val_size > 0:
        pixels: int | None = samples * cfg.data.val_size ** 2
    else:
        in_split = split_pixels(manifest, split)
        pixels = None if in_split is None or total == 0 else in_split * samples // total
    decoded = None if pixels is None else sample_bytes(pixels, samples, image, masks.itemsize)
    what = f"{split} split (this rank's {samples} of {total} samples)"
    budget = cache_budget(what, cfg.data.cache_mb, cfg.data.workers, decoded,
                          after="its first read, batched by image size")
    return None if budget is None else ValCache(what, budget, batch_size)


def _no_collate(sample: Any) -> Any:
    return sample


def split_samples(cfg: Config, manifest: dict[str, Any], root: str, rank: int, world_size: int,
                  split: str) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """This rank's exact-once share of `split` as stored: (uint8 H x W x 3 image, int64 H x W mask, key),
    decoded in `data.workers` loader processes, neither resized nor normalised."""
    counts = shard_counts(manifest, split)
    start, stop = share(sum(counts), rank, world_size)
    dataset = _ValStream(shard_urls(root, manifest, split), counts, None, start, stop, retries=cfg.data.retries)
    kw = _loader_kwargs(cfg)
    kw.pop("pin_memory", None)
    try:
        yield from DataLoader(dataset, batch_size=None, collate_fn=_no_collate, **kw)
    except ShardError as e:  # from a worker, its message followed by the worker's traceback
        raise ShardError.one_line(e) from None
