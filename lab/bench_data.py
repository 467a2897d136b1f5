"""`bench data`: the input pipeline against what bounds it and against the seed tutorial's folder Dataset.

Samples/s of (a) decoding, (b) decoding + the train augmentation in one process on one thread (a bound
per core, as each loader worker runs), (c) the shard pipeline as training uses it (`data.train_loader`
and the copy to the device) and (d) a folder-of-files Dataset with the same transforms and DataLoader
settings, for each worker count; their ratios.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from seg_dist import data, shards
from seg_dist.errors import UserError

from . import measure
from .measure import Progress, Sample, load_average, quiet, timed_rate

Pair = tuple[str, str, bytes, bytes]  # key, image extension, image bytes, mask bytes


def default_workers() -> tuple[int, ...]:
    """0, 1, 2 ... up to the cores; on many cores powers of two and the core count."""
    n = measure.cores()
    if n <= 4:
        return tuple(range(n + 1))
    return (0, *sorted({2**i for i in range(int(math.log2(n)) + 1)} | {n}))


@dataclass
class DataSettings:
    root: str
    size: int = 256  # training crop; the shards' images are decoded at their stored size
    batch: int = 8
    workers: tuple[int, ...] = (0, 1, 2)
    samples: int = 512  # per timed repeat
    repeats: int = 3
    device: str = "cpu"

    @classmethod
    def for_device(cls, device: torch.device, root: str, **given: Any) -> DataSettings:
        defaults: dict[str, Any] = {"workers": default_workers(), "device": device.type}
        if device.type == "cuda":
            defaults.update(size=512, batch=8)  # the loader target is set at 512^2
        return cls(root=root, **{**defaults, **{k: v for k, v in given.items() if v is not None}})

    @property
    def calls(self) -> int:
        """Batches per timed repeat."""
        return max(1, self.samples // self.batch)


def read_pairs(urls: Sequence[str]) -> list[Pair]:
    """Every sample's image and mask as stored in the shards, undecoded (`data.read_shard`)."""
    pairs: list[Pair] = []
    for url in urls:
        for raw in data.read_shard(url):
            ext = next((e for e in shards.IMAGE_EXTS if e in raw), None)
            if ext is not None and shards.MASK_FIELD in raw:
                pairs.append((raw["__key__"], ext, raw[ext], raw[shards.MASK_FIELD]))
    if not pairs:
        raise UserError(f"no image/mask samples in {', '.join(urls) or 'the split'}")
    return pairs


class FolderDataset(Dataset):
    """The seed tutorial's loader: one image file and one PNG mask file per sample, decoded and augmented in
    `__getitem__` (with seg_dist's decoders, so masks keep their class ids), shipping what the shard
    pipeline ships: uint8 H x W x 3 images and masks of `mask_dtype`."""

    def __init__(self, images: list[Path], masks: list[Path], transform: Any, mask_dtype: torch.dtype) -> None:
        self.images, self.masks, self.transform, self.mask_dtype = images, masks, transform, mask_dtype

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = shards.decode_image(self.images[i].read_bytes())
        mask = shards.decode_mask(self.masks[i].read_bytes())
        out = self.transform(image=image, mask=mask)
        return _tensor(out["image"]).to(torch.uint8), _tensor(out["mask"]).to(self.mask_dtype)


def _tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def write_folder(pairs: list[Pair], folder: Path) -> tuple[list[Path], list[Path]]:
    """images/NNNNNN.<ext> and masks/NNNNNN.png, the shard's own bytes (so only the container differs)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    images, masks = [], []
    for i, (_, ext, image, mask) in enumerate(pairs):
        images.append(folder / "images" / f"{i:06d}.{ext}")
        masks.append(folder / "masks" / f"{i:06d}.png")
        images[-1].write_bytes(image)
        masks[-1].write_bytes(mask)
    return images, masks


def _to_device(images: torch.Tensor, masks: torch.Tensor, device: torch.device) -> int:
    images.to(device, non_blocking=True)
    masks.to(device, non_blocking=True)
    return images.shape[0]


def _loader_rate(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device, workers: int,
                 s: DataSettings) -> Sample:
    # Worker start-up and the first prefetched batches are not the steady state.
    return timed_rate(lambda: _to_device(*next(batches), device), "samples/s", warmup=2 + 2 * workers,
                      calls=s.calls, repeats=s.repeats, sync=measure.device_sync(device))


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """OpenCV and torch on one thread, as in a loader worker: on many cores OpenCV's resize and warp spread
    over all of them, and an in-process rate is then no bound per core (on a 16-vCPU H200 host (b) gave 149
    samples/s in process against 90 for one loader worker before this, the likely cause)."""
    import cv2

    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)


def measure_data(s: DataSettings, progress: Progress = quiet) -> dict[str, Any]:
    """The four rates for each worker count and their ratios (the module's docstring)."""
    device = measure.resolve_device(s.device)
    env = measure.environment(device)
    manifest = shards.load_manifest(s.root)
    base = measure.base_config(s.root, manifest, data={"image_size": s.size}, train={"batch_size": s.batch})
    split = base.data.train_split
    classes = data.resolve_classes(base.data, manifest)
    pairs = read_pairs(shards.shard_urls(s.root, manifest, split))
    transform = data.build_transforms(base.data, train=True, ignore_index=classes.ignore_index)
    rates: dict[str, Sample] = {}

    def note(name: str, sample: Sample) -> Sample:
        progress(f"  {name}: {sample.median:,.0f} {sample.unit} (load {load_average()})")
        return sample

    progress(f"bench data: {len(pairs)} samples of {s.root} ({split}), crop {s.size}, batch {s.batch}, "
             f"workers {list(s.workers)}, {device.type}")
    nxt = measure.cycle(pairs)

    def decode() -> int:
        _, _, image, mask = nxt()
        shards.decode_image(image)
        shards.decode_mask(mask)
        return 1

    def decode_augment() -> int:
        _, _, image, mask = nxt()
        transform(image=shards.decode_image(image), mask=shards.decode_mask(mask))
        return 1

    with one_thread():
        progress("(a) decode only, in this process, 1 thread ...")
        rates["decode"] = note("decode", timed_rate(decode, "samples/s", warmup=16, calls=s.samples,
                                                    repeats=s.repeats))
        progress("(b) decode + train augmentation, in this process, 1 thread ...")
        rates["decode_augment"] = note("decode+augment", timed_rate(decode_augment, "samples/s", warmup=16,
                                                                      calls=s.samples, repeats=s.repeats))
    pipeline: dict[int, Sample] = {}
    folder: dict[int, Sample] = {}
    with tempfile.TemporaryDirectory(prefix="seg_dist_bench_folder_") as tmp:
        images, masks = write_folder(pairs, Path(tmp))
        folder_set = FolderDataset(images, masks, transform, data.mask_dtype(classes.num_classes,
                                                                              classes.ignore_index))
        for w in s.workers:
            # Decoding every read, as the folder Dataset does: the cache (data.cache_mb) would skip it.
            cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, workers=w, cache_mb=0))
            progress(f"(c) shard pipeline (data.train_loader + copy to {device.type}), {w} workers ...")
            batches = iter(data.train_loader(cfg, manifest, s.root, 0, 1, epoch=0, endless=True))
            pipeline[w] = note(f"shard pipeline, {w} workers", _loader_rate(batches, device, w, s))
            del batches  # stops its workers before the next loader starts its own
            progress(f"(d) folder of files Dataset, {w} workers ...")
            kw: dict[str, Any] = {"num_workers": w, "pin_memory": cfg.data.pin_memory and device.type == "cuda"}
            if w > 0:
                kw["prefetch_factor"] = cfg.data.prefetch_factor
            steps = 2 + 2 * w + s.calls * s.repeats
            sampler = RandomSampler(folder_set, replacement=True, num_samples=steps * s.batch)
            loader = iter(DataLoader(folder_set, batch_size=s.batch, sampler=sampler, drop_last=True, **kw))
            folder[w] = note(f"folder Dataset, {w} workers", _loader_rate(loader, device, w, s))
            del loader
    bound = rates["decode_augment"].median
    # Per core: w workers may use w cores (the main process collates and copies besides).
    vs_bound = {w: pipeline[w].median / (bound * max(1, w)) for w in s.workers}
    vs_folder = {w: pipeline[w].median / folder[w].median for w in s.workers}

    def scaling(rates: dict[int, Sample]) -> dict[int, float]:
        return {w: rates[w].median / (w * rates[1].median) for w in s.workers if w >= 1} if 1 in s.workers else {}

    pipeline_scaling = scaling(pipeline)
    best_pipeline = max(s.workers, key=lambda w: pipeline[w].median)
    best_folder = max(s.workers, key=lambda w: folder[w].median)
    env["load_average_end"] = load_average()
    return {
        "env": env,
        "settings": {**dataclasses.asdict(s), "workers": list(s.workers), "split": split,
                     "samples_in_split": len(pairs), "image_shape": list(shards.decode_image(pairs[0][2]).shape),
                     "shard_image_format": pairs[0][1]},
        "rates": {**{k: v.as_dict() for k, v in rates.items()},
                  "pipeline": {str(w): v.as_dict() for w, v in pipeline.items()},
                  "folder": {str(w): v.as_dict() for w, v in folder.items()}},
        # Headlines: c/b with the pipeline in this one process (0 workers, or the fewest given), c/d of
        # each at its best worker count, scaling at the most workers.
        "pipeline_vs_bound": vs_bound[min(s.workers)],
        "pipeline_vs_bound_workers": min(s.workers),
        "pipeline_vs_bound_by_workers": {str(w): v for w, v in vs_bound.items()},
        "pipeline_vs_folder": pipeline[best_pipeline].median / folder[best_folder].median,
        "pipeline_vs_folder_workers": [best_pipeline, best_folder],
        "pipeline_vs_folder_by_workers": {str(w): v for w, v in vs_folder.items()},
        # 1.0 by definition if 1 is the most workers measured
        "worker_scaling": pipeline_scaling[max(pipeline_scaling)] if pipeline_scaling else None,
        "worker_scaling_workers": max(pipeline_scaling) if pipeline_scaling else None,
        "worker_scaling_by_workers": {str(w): v for w, v in pipeline_scaling.items()},
        "folder_worker_scaling_by_workers": {str(w): v for w, v in scaling(folder).items()},
        "best_pipeline_samples_per_s": pipeline[best_pipeline].median,
        "best_pipeline_workers": best_pipeline,
    }


def render(r: dict[str, Any]) -> str:
    """The console table."""
    s, rates, dev = r["settings"], r["rates"], measure.device_kind(r)
    title = (f"bench data: {s['samples_in_split']} samples ({s['shard_image_format']} {s['image_shape'][1]}x"
             f"{s['image_shape'][0]}), crop {s['size']}, batch {s['batch']}, copy to {s['device']}")
    rows = [("(a) decode image + mask, 1 thread", rates["decode"]),
            ("(b) decode + train augmentation, 1 thread", rates["decode_augment"])]
    for w in s["workers"]:
        rows.append((f"(c) shard pipeline, {w} workers", rates["pipeline"][str(w)]))
        rows.append((f"(d) folder of files Dataset, {w} workers", rates["folder"][str(w)]))
    lines = [*measure.table(title, "samples/s", rows), measure.env_line(r["env"]), "  ratios:"]
    lines.append(measure.ratio("c/b", r["pipeline_vs_bound"], dev, "pipeline_vs_bound",
                               f"shard pipeline at {r['pipeline_vs_bound_workers']} workers / (b x max(1, workers))"))
    lines.append(measure.ratio("c/d", r["pipeline_vs_folder"], dev, "pipeline_vs_folder",
                               "best shard pipeline ({} workers) / best folder Dataset ({} workers)"
                               .format(*r["pipeline_vs_folder_workers"])))
    if r["worker_scaling"] is not None:
        w = r["worker_scaling_workers"]
        lines.append(measure.ratio("worker scaling", r["worker_scaling"], dev, "worker_scaling",
                                   f"c at {w} workers / ({w} x c at 1)"))
    by = r["pipeline_vs_bound_by_workers"]
    lines.append("  by workers:     " + "   ".join(
        f"{w}: c/b {by[w]:.2f}, c/d {r['pipeline_vs_folder_by_workers'][w]:.2f}"
        + (f", scaling {r['worker_scaling_by_workers'][w]:.2f}" if w in r["worker_scaling_by_workers"] else "")
        for w in by))
    if dev == "cuda":
        lines.append(measure.ratio("best shard pipeline samples/s", r["best_pipeline_samples_per_s"], dev,
                                   "loader_samples_per_s",
                                   f"at {r['best_pipeline_workers']} workers, crop {s['size']}"))
    return "\n".join(lines)
