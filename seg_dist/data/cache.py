"""Decoded samples kept in a rank's memory (`data.cache_mb`), so later epochs and validations skip reading and
decoding them, and the size-bucketed order of a cached validation share.

Only a loader that decodes in the rank's own process caches (`data.workers=0`): each loader worker would hold
its own copy, and workers decode beside the steps anyway. Whether a split fits is decided from the manifest
(`split_pixels`: every pixel of the split, as packed), and the bytes actually held are counted as samples
arrive, so a manifest whose figure is wrong cannot make a cache outgrow its budget: it stops at the budget.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..shards import ImageSpec

__all__ = ["MIB", "SampleCache", "ValCache", "cache_budget", "sample_bytes", "size_order", "split_pixels"]

log = logging.getLogger(__name__)

MIB = 2**20
# What a held sample costs beyond its pixels (the arrays' and the table's Python objects), so a split of
# many tiny samples is not under-counted.
_PER_SAMPLE = 512


def split_pixels(manifest: dict[str, Any], split: str) -> int | None:
    """Pixels of every sample of `split` as packed: its class histogram plus its ignored pixels, which the
    packer counts over each stored mask, else (manifests without the ignored count) its mean frame times
    its samples. None where the manifest records neither."""
    entry = manifest["splits"][split]
    n = int(entry.get("num_samples", 0))
    hist, ignored = entry.get("class_histogram"), entry.get("ignored_pixels")
    if hist is not None and ignored is not None:
        pixels = int(sum(hist)) + int(ignored)
    elif (mean_hw := (entry.get("image_size") or {}).get("mean_hw")) is not None:
        pixels = math.ceil(mean_hw[0] * mean_hw[1] * n)
    else:
        return None
    return pixels if pixels > 0 or n == 0 else None


def sample_bytes(pixels: int, samples: int, image: ImageSpec, mask_itemsize: int) -> int:
    """What `samples` samples of `pixels` pixels in all take decoded: image channels of `image`'s type, a
    mask of `mask_itemsize` bytes per pixel."""
    per_pixel = image.channels * np.dtype(image.dtype).itemsize + mask_itemsize
    return pixels * per_pixel + samples * _PER_SAMPLE


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


def cache_budget(what: str, cache_mb: int, workers: int, decoded: int | None, *, remote: bool = False,
                 after: str = "its first read") -> int | None:
    """The bytes a cache of `what` (e.g. "train split") may hold, or None where it is not cached; logs one
    line saying which, and why. `decoded`: its size decoded, from the manifest (None: unknown)."""
    why = None
    if cache_mb == 0:
        why = "data.cache_mb=0"
    elif remote:
        why = "data.root is remote: whole shards are streamed, not read by sample"
    elif workers > 0:
        why = f"data.workers={workers} decode beside the steps, and each worker would hold its own copy"
    elif decoded is None:
        why = "the manifest records neither its pixel count nor its mean frame, so its size is unknown"
    elif decoded > cache_mb * MIB:
        why = f"{_mib(decoded)} decoded, more than data.cache_mb={cache_mb}"
    if why is not None:
        log.info("%s not cached in memory: %s", what, why)
        return None
    log.info("%s cached in memory after %s: %s (data.cache_mb=%d)", what, after, _mib(decoded or 0), cache_mb)
    return cache_mb * MIB


def _compact_mask(mask: np.ndarray) -> np.ndarray:
    """`mask` in the smallest integer type that holds its values exactly (masks decode as int64)."""
    if mask.size == 0:
        return mask
    lo, hi = int(mask.min()), int(mask.max())
    for dtype in (np.uint8, np.int8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return mask.astype(dtype)
    return mask.copy()


def _frozen(a: np.ndarray) -> np.ndarray:
    # Held arrays are never handed out (callers get copies): read-only turns a slip into an error, not a
    # silently changed sample for every later epoch.
    a.flags.writeable = False
    return a


class SampleCache:
    """Decoded (image, int64 mask) pairs of a split by sample index, up to `budget` bytes; what does not fit
    is decoded at each read. Callers get fresh writable arrays equal to the decoded ones, whether held or
    not, so whatever they do with them (augmentation) is as without the cache."""

    def __init__(self, what: str, budget: int, num_samples: int) -> None:
        self.what, self.budget, self.num_samples = what, budget, num_samples
        self.nbytes = 0
        self.full = False
        self._held: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def get(self, i: int, decode: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Sample `i`: held, or `decode()`d (and held while the budget allows)."""
        held = self._held.get(i)
        if held is not None:
            return held[0].copy(), held[1].astype(np.int64)
        image, mask = decode()
        if not self.full:
            mask_held = _compact_mask(mask)
            size = image.nbytes + mask_held.nbytes + _PER_SAMPLE
            if self.nbytes + size > self.budget:
                self.full = True
                log.warning("%s: the cache reached data.cache_mb=%d after %d of %d samples (more than the manifest "
                            "says); the rest are decoded at each read", self.what, self.budget // MIB,
                            len(self._held), self.num_samples)
            else:
                # The caller gets the decoded arrays themselves, so the cache holds its own copy.
                self._held[i] = (_frozen(image.copy()), _frozen(mask_held))
                self.nbytes += size
        return image, mask


Sample = tuple[torch.Tensor, torch.Tensor, str]


class ValCache:
    """This rank's share of a validation split as validation yields it (transformed: image, compact mask,
    key), up to `budget` bytes, in the order `size_order` gives; `complete` once the whole share is held."""

    def __init__(self, what: str, budget: int, batch_size: int) -> None:
        self.what, self.budget, self.batch_size = what, budget, batch_size
        self.samples: list[Sample] = []
        self.nbytes = 0
        self.complete = False

    def add(self, sample: Sample) -> bool:
        """Hold `sample`; False (and `sample` not held) where it would pass the budget."""
        image, mask, _ = sample
        size = image.numel() * image.element_size() + mask.numel() * mask.element_size() + _PER_SAMPLE
        if self.nbytes + size > self.budget:
            log.warning("%s: not cached after all: more than data.cache_mb=%d decoded after %d samples (more than "
                        "the manifest says); read and decoded at each validation", self.what, self.budget // MIB,
                        len(self.samples))
            return False
        self.samples.append(sample)
        self.nbytes += size
        return True

    def release(self) -> list[Sample]:
        """What is held, no longer held."""
        held, self.samples, self.nbytes = self.samples, [], 0
        return held

    def seal(self) -> None:
        """The whole share is held: from now on in batches of one image size where the sizes allow."""
        order = size_order([tuple(image.shape[:2]) for image, _, _ in self.samples], self.batch_size)
        self.samples = [self.samples[i] for i in order]
        self.complete = True


def size_order(sizes: Sequence[tuple[int, ...]], batch_size: int) -> list[int]:
    """An order of samples of `sizes` whose consecutive runs of `batch_size` (the batches) need little padding.

    Each size's samples fill whole batches of that size alone (zero padding); the few left over of each size
    come last, sorted by size, so a batch that mixes sizes mixes near ones. As many batches as in any other
    order (ceil(n / batch_size)), and samples of one size keep their order: a split of one size keeps its
    order exactly.
    """
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(size, []).append(i)
    whole: list[int] = []
    rest: list[int] = []
    for size in sorted(by_size):
        idx = by_size[size]
        cut = len(idx) - len(idx) % batch_size
        whole += idx[:cut]
        rest += idx[cut:]
    return whole + rest
