"""Epochs and batches as numbers: which sample sits at each position of the training stream, how a global
batch is made of ranks, per-rank micro-batches and accumulation, how many optimiser steps an epoch has,
which positions each rank takes, and each rank's share of a validation split.

Words: an optimiser **step** takes one global batch; what one rank's loader yields per call is a
**micro-batch** of `per_rank` samples, and `accum_steps` micro-batches on each of `world_size` ranks make a
step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from ..config import Config
from ..errors import UserError
from ..shards import shard_counts, split_count

__all__ = ["BatchPlan", "RankPositions", "StreamOrder", "plan_batches", "share", "steps_per_epoch", "val_share"]


def seeds(*parts: int, n: int = 3) -> list[int]:
    """`n` seeds mixed from `parts` (any ints)."""
    # SeedSequence mixes the parts well, unlike sums or webdataset's make_seed.
    return [int(s) for s in np.random.SeedSequence([p % 2**64 for p in parts]).generate_state(n)]


_PERMUTATION, _AUGMENTATION = 1, 2  # keep the two kinds of seed apart


class StreamOrder:
    """Which sample of the split, with which augmentation seed, sits at each position of a run's training
    stream.

    Epoch e holds positions [e * span, (e + 1) * span): position p of it is sample perm_e[p % N] of the
    split, perm_e a permutation seeded by (seed, e), and its augmentation is seeded by (seed, e, p). No
    rank, worker or batch size enters, so a global batch is the same on any number of ranks.
    """

    def __init__(self, seed: int, span: int, num_samples: int) -> None:
        if num_samples < 1 or span < 1:
            raise ValueError(f"a training stream needs samples and positions, got {num_samples} and span {span}")
        self.seed, self.span, self.num_samples = seed, span, num_samples
        self._perm: tuple[int, np.ndarray] | None = None

    def sample_of(self, position: int) -> int:
        epoch, p = divmod(position, self.span)
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng(seeds(_PERMUTATION, self.seed, epoch, n=1)[0])
            self._perm = (epoch, rng.permutation(self.num_samples))
        return int(self._perm[1][p % self.num_samples])

    def augmentation_seed(self, position: int) -> int:
        return seeds(_AUGMENTATION, self.seed, *divmod(position, self.span), n=1)[0]


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is made: `world_size` ranks x micro-batches of `per_rank` samples x `accum_steps`
    micro-batches per optimiser step."""

    per_rank: int
    accum_steps: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.accum_steps * self.world_size

    def describe(self) -> str:
        return f"{self.world_size} ranks x {self.per_rank} x {self.accum_steps} accumulation = {self.global_batch}"


def plan_batches(global_batch: int, world_size: int, max_per_rank: int) -> BatchPlan:
    """The largest per-rank micro-batch (at most `max_per_rank`) that makes `global_batch` exactly on
    `world_size` ranks, with gradient accumulation making up the rest."""
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
    """Optimiser steps per epoch: `train.steps_per_epoch` when set, else enough steps of the global batch
    (train.batch_size x train.accum_steps x world_size) to cover the train split once; at least 1. Counted in
    global batches, so the same global batch gives the same schedule on any number of ranks."""
    if cfg.train.steps_per_epoch > 0:
        return cfg.train.steps_per_epoch
    n = split_count(manifest, cfg.data.train_split)
    return max(1, math.ceil(n / (world_size * cfg.train.batch_size * cfg.train.accum_steps)))


class RankPositions(Sampler[list[int]]):
    """This rank's micro-batches of stream positions for `steps` optimiser steps per epoch, from step
    `skip_steps` of `epoch` on.

    Optimiser step k of an epoch takes the global batch at positions [k * G, (k + 1) * G) after the epoch's
    first position; its micro-batch m on rank r is the `per_rank` positions from (m * world_size + r) *
    per_rank on. `endless`: the next epochs follow, as their own samplers would give them.
    """

    def __init__(self, plan: BatchPlan, rank: int, span: int, steps: int, epoch: int, skip_steps: int,
                 endless: bool) -> None:
        if span < steps * plan.global_batch:
            raise ValueError(f"an epoch of {steps} steps of {plan.global_batch} needs a span of at least "
                             f"{steps * plan.global_batch} positions, got {span}")
        self.plan, self.rank, self.span = plan, rank, span
        self.steps, self.epoch, self.skip_steps, self.endless = steps, epoch, skip_steps, endless

    def __len__(self) -> int:
        """Micro-batches left in the epoch."""
        if self.endless:
            raise TypeError("an endless sampler has no length")
        return max(0, self.steps - self.skip_steps) * self.plan.accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        p = self.plan
        epoch, first_step = self.epoch, self.skip_steps
        while True:
            for step in range(first_step, self.steps):
                for micro in range(p.accum_steps):
                    first = epoch * self.span + step * p.global_batch + (micro * p.world_size + self.rank) * p.per_rank
                    yield list(range(first, first + p.per_rank))
            if not self.endless:
                return
            epoch, first_step = epoch + 1, 0


def share(n: int, part: int, parts: int) -> tuple[int, int]:
    """[start, stop) of part `part` of `parts` near-equal contiguous parts of range(n)."""
    return part * n // parts, (part + 1) * n // parts


def val_share(manifest: dict[str, Any], split: str, rank: int, world_size: int) -> int:
    """How many samples of `split` rank `rank` validates."""
    lo, hi = share(sum(shard_counts(manifest, split)), rank, world_size)
    return hi - lo


@dataclass(frozen=True)
class TrainingEpochs:
    """What both training loaders (local offsets, remote streams) start from: the split, the batch plan and
    the epoch's optimiser steps on this world size."""

    split: str
    plan: BatchPlan
    steps: int

    @classmethod
    def of(cls, cfg: Config, manifest: dict[str, Any], root: str, world_size: int, skip_steps: int
           ) -> TrainingEpochs:
        if skip_steps < 0:
            raise ValueError(f"skip_steps={skip_steps} must be >= 0")
        split = cfg.data.train_split
        if split_count(manifest, split) < 1:
            raise UserError(f"data.train_split={split!r}: the split has no samples in {root.rstrip('/')}/"
                            "manifest.json")
        return cls(split, BatchPlan(cfg.train.batch_size, cfg.train.accum_steps, world_size),
                   steps_per_epoch(manifest, cfg, world_size))
