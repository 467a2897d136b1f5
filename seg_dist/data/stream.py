"""Training from remote shards (`data.root` an `http(s)://`, `s3://`, `gs://` URL or a `pipe:` command): whole
shards streamed in order, samples shuffled in a bounded buffer, broken reads retried.

A remote shard cannot be read at an offset cheaply, so the exact loader of local files (every sample at its
place in a permutation of the split) gives way to this one:

- **Shards dealt to slots.** Epoch e permutes the split's shards (seeded by `train.seed` and e; the same
  on every rank) and deals them round-robin to the ranks x loader workers "slots"; a slot with no shard of
  its own (fewer shards than slots) shares one.
- **The same number of steps on every rank.** An epoch is `steps_per_epoch` x `train.accum_steps`
  micro-batches on every rank whatever its shards hold: each slot cycles over its shards (a later pass in
  a new order) until it has given its share, and what is left of the pass is dropped at the epoch's end.
  No rank runs dry, so no collective waits for one.
- **Bounded shuffle.** Each slot draws samples at random from a buffer of `data.shuffle_buffer` undecoded
  samples; decoding and augmentation follow (augmentation seeded by the seed, epoch, rank and slot).
- **Retries.** A shard whose connection breaks, or that ends early, is read again from its start after
  waits of 1, 2, 4 ... seconds (at most 30), skipping the samples it already gave; after `data.retries`
  retries the run fails with one line naming the URL.
- **Resume.** A run resumed at step k of epoch e streams the rest of that epoch reseeded by (seed, e, k):
  other samples than the interrupted run would have read, but the same number of steps. Epoch e + 1 on is
  what an uninterrupted run reads (at any loader worker count the micro-batches are dealt to the same slots).

Loader workers hand micro-batches over round-robin (worker `i % workers` gives the rank's i-th), and each
slot knows the micro-batch numbers it owes, so the stream is deterministic for a given world size and
worker count. It is not the same on another world size: global batches are made of different slots.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import random
import tarfile
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from ..config import Config
from ..remote import is_remote, open_url
from ..shards import ShardError, image_spec, shard_counts, shard_urls
from .classes import resolve_classes
from .epochs import BatchPlan, TrainingEpochs, seeds
from .reader import decode_sample, read_shard
from .transforms import build_transforms, mask_dtype, training_config, transform_sample

if TYPE_CHECKING:
    import albumentations as A

__all__ = ["StreamBatches", "deal", "shard_samples", "stream_loader"]

log = logging.getLogger(__name__)

# What a broken connection or a shard cut short raises on the way through urllib, botocore, tarfile and
# webdataset (remote.open_url turns the transports' own errors into OSError).
_BROKEN = (OSError, EOFError, tarfile.TarError, http.client.HTTPException)
MAX_WAIT = 30.0  # seconds between retries, at most
_SHARDS, _SAMPLES = 11, 12  # kinds of seed, apart from epochs.py's


class _EndedEarly(OSError):
    pass


def _read_remote(url: str) -> Iterator[dict[str, Any]]:
    stream = open_url(url)
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    finally:
        stream.close()


def shard_samples(url: str, count: int, retries: int, first_wait: float = 1.0) -> Iterator[dict[str, Any]]:
    """The `count` raw samples (as `read_shard` gives them) of one shard, in order. A local file is read once
    (`read_shard`). A remote one that breaks or ends before `count` samples is read again from its start,
    skipping the samples already given, up to `retries` times with doubling waits; then `ShardError` names
    the URL and the last failure."""
    if not is_remote(url):
        yield from read_shard(url)
        return
    given, attempt = 0, 0
    while True:
        try:
            seen = 0
            for raw in _read_remote(url):
                seen += 1
                if seen > count:
                    raise ShardError(f"{url}: more samples than the manifest's {count}; {ShardError.HINT}")
                if seen > given:
                    given = seen
                    yield raw
            if seen < count:
                raise _EndedEarly(f"ended after {seen} of {count} samples")
            return
        except _BROKEN as e:
            reason = _reason(e)
            if attempt >= retries:
                tries = f"after {attempt + 1} attempts" if attempt else "(data.retries=0)"
                raise ShardError(f"{url}: cannot read the shard {tries}: {reason}") from e
            wait = min(MAX_WAIT, first_wait * 2**attempt)
            attempt += 1
            log.warning("%s: %s; reading it again in %.0f s (retry %d of %d, skipping the %d samples given)",
                        url, reason, wait, attempt, retries, given)
            time.sleep(wait)


def _reason(e: BaseException) -> str:
    # webdataset appends " @ <stream>" to an error's first argument and the stream and URL to its args.
    first = str(e.args[0]) if e.args else ""
    return (first.split(" @ ")[0] or type(e).__name__) if not isinstance(e, ShardError) else str(e)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def deal(num_shards: int, slot: int, slots: int, order: np.ndarray) -> list[int]:
    """The shards (places in the split's list) slot `slot` of `slots` reads: every `slots`-th of `order`, a
    permutation of range(num_shards), from its `slot`-th on; one shared shard when there are fewer shards
    than slots."""
    return [int(order[i % num_shards]) for i in range(slot, max(num_shards, slots), slots)]


class _StreamSet(IterableDataset):
    """One rank's endless stream of augmented samples, its micro-batches dealt to loader workers; see the
    module's docstring."""

    def __init__(self, urls: list[str], counts: list[int], seed: int, plan: BatchPlan, rank: int, steps: int,
                 epoch: int, skip_steps: int, endless: bool, buffer: int, retries: int, transform: A.Compose,
                 mask_type: torch.dtype) -> None:
        self.urls, self.counts, self.seed, self.plan, self.rank = urls, counts, seed, plan, rank
        self.steps, self.epoch, self.skip_steps, self.endless = steps, epoch, skip_steps, endless
        self.buffer, self.retries, self.transform, self.mask_type = buffer, retries, transform, mask_type
        self.readable = [i for i, c in enumerate(counts) if c > 0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker, workers = _worker()
        epoch, skip = self.epoch, self.skip_steps
        given = 0  # micro-batches this loader has handed over, over all workers: worker `i % workers` gives the i-th
        while True:
            micro = max(0, self.steps - skip) * self.plan.accum_steps
            # The micro-batches of this epoch that this worker hands over are those of the slot that owns
            # micro-batch numbers v, v + workers, ... of the epoch, whatever the loader gave before.
            v = (worker - given) % workers
            owed = len(range(v, micro, workers)) * self.plan.per_rank
            if owed:
                yield from self._epoch(epoch, skip, v, workers, owed)
            given += micro
            if not self.endless:
                return
            epoch, skip = epoch + 1, 0

    def _epoch(self, epoch: int, skip: int, v: int, workers: int, owed: int) -> Iterator[Any]:
        n = len(self.readable)
        order = np.random.default_rng(seeds(_SHARDS, self.seed, epoch, skip, n=1)[0]).permutation(n)
        slots = self.plan.world_size * workers
        mine = [self.readable[i] for i in deal(n, self.rank * workers + v, slots, order)]
        rng_seed, aug_seed = seeds(_SAMPLES, self.seed, epoch, skip, self.rank, v, n=2)
        rng = np.random.default_rng(rng_seed)
        # One generator pair for the slot's epoch (see loaders._TrainSet on Compose(seed=...)).
        self.transform.set_random_state(np.random.default_rng(aug_seed), random.Random(aug_seed))
        # Closed at the epoch's end, not at garbage collection: what is left of the shard being read is dropped.
        with contextlib.closing(self._drawn(self._cycle(mine, rng), rng)) as drawn:
            for raw in drawn:
                s = decode_sample(raw)
                yield transform_sample(self.transform, s["image"], s["mask"], self.mask_type)
                owed -= 1
                if owed == 0:
                    return

    def _cycle(self, shards: list[int], rng: np.random.Generator) -> Generator[dict[str, Any], None, None]:
        """The slot's shards over and over (a shard list of non-empty shards: never ends), each later pass in a
        new order."""
        order = list(shards)
        while True:
            for i in order:
                yield from shard_samples(self.urls[i], self.counts[i], self.retries)
            order = [shards[j] for j in rng.permutation(len(shards))]

    def _drawn(self, samples: Generator[dict[str, Any], None, None], rng: np.random.Generator
               ) -> Generator[dict[str, Any], None, None]:
        """`samples` (never ending) in random order through a buffer of at most `self.buffer`."""
        buffer: list[dict[str, Any]] = []
        try:
            for raw in samples:
                buffer.append(raw)
                if len(buffer) >= self.buffer:
                    i = int(rng.integers(len(buffer)))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield buffer.pop()
        finally:
            samples.close()


class StreamBatches:
    """A rank's micro-batches (images B x H x W x C in the data's type, compact masks B x H x W) streamed from remote
    shards: `len(self)` of them, or without end when made with `endless=True` (`train_loader`'s interface)."""

    def __init__(self, dataset: _StreamSet, batch_size: int, loader_kwargs: dict[str, Any]) -> None:
        self.dataset, self.batch_size, self.loader_kwargs = dataset, batch_size, loader_kwargs

    def __len__(self) -> int:
        d = self.dataset
        if d.endless:
            raise TypeError("an endless stream has no length")
        return max(0, d.steps - d.skip_steps) * d.plan.accum_steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(self.dataset, batch_size=self.batch_size, **self.loader_kwargs)
        it = iter(loader)
        if loader.num_workers:
            log.info("train stream: %d worker process(es) started", loader.num_workers)
        try:
            yield from it
        except ShardError as e:  # from a worker, its message followed by the worker's traceback
            raise ShardError.one_line(e) from None
        finally:  # now, not at garbage collection: stops the workers and their downloads
            del it, loader


def stream_loader(cfg: Config, manifest: dict[str, Any], root: str, rank: int, world_size: int, epoch: int,
                  skip_steps: int = 0, endless: bool = False,
                  loader_kwargs: dict[str, Any] | None = None) -> StreamBatches:
    """`train_loader` for a remote root: this rank's micro-batches of `epoch` from optimiser step
    `skip_steps` on, `steps_per_epoch` x `train.accum_steps` of them per epoch on every rank, streamed from
    whole shards (see the module's docstring for what that gives up against local files)."""
    epochs = TrainingEpochs.of(cfg, manifest, root, world_size, skip_steps)
    split, plan, steps = epochs.split, epochs.plan, epochs.steps
    classes = resolve_classes(cfg.data, manifest)
    crop = training_config(cfg.data, manifest)
    counts = shard_counts(manifest, split)
    slots = world_size * max(1, cfg.data.workers)
    readable = sum(c > 0 for c in counts)
    if readable < slots:
        log.warning("%d shards in split %r for %d ranks x %d loader workers: some read the same shards (pack "
                    "smaller shards: --samples-per-shard)", readable, split, world_size, max(1, cfg.data.workers))
    dataset = _StreamSet(shard_urls(root, manifest, split), counts, cfg.train.seed, plan, rank, steps, epoch,
                         skip_steps, endless, cfg.data.shuffle_buffer, cfg.data.retries,
                         build_transforms(crop, train=True, ignore_index=classes.ignore_index,
                                          image=image_spec(manifest)),
                         mask_dtype(classes.num_classes, classes.ignore_index))
    kw = dict(loader_kwargs or {})
    kw.pop("persistent_workers", None)  # one iterator per pass: persistent workers would only outlive it
    if kw.get("num_workers", 0) == 0:
        kw.pop("prefetch_factor", None)
    log.info("streaming %d training shards from %s: %d steps per epoch, shuffle buffer %d, %d retries", len(counts),
             root, steps, cfg.data.shuffle_buffer, cfg.data.retries)
    if skip_steps:
        log.info("epoch %d resumes at step %d: its other %d steps stream a reseeded draw of the shards, not what "
                 "the interrupted run would have read (local shards resume at the exact sample)", epoch + 1,
                 skip_steps, max(0, steps - skip_steps))
    return StreamBatches(dataset, plan.per_rank, kw)

