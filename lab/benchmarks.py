"""The measurements behind `seg-dist bench`: input pipeline, trainer step against a bare loop, DDP scaling.

Every figure is either a ratio of two rates measured side by side in one run, or an absolute rate
recorded with the device, dtype, sizes, torch version, core count and load average it was measured
under (`environment`). A rate is the median over `repeats` timed blocks after warm-up; min and max
are kept, and a spread (max/min) above `WIDE_SPREAD` is flagged. On CUDA every timed block starts and
ends with `torch.cuda.synchronize()`, and memory is `torch.cuda.max_memory_allocated()`.

    bench_data(DataSettings.for_device(device, root=...))       # decode, augment, shard loader, folder loader
    bench_train(TrainSettings.for_device(device, root=...))     # trainer.train_step vs a bare loop, MFU
    bench_scaling(ScalingSettings.for_device(device, root=...)) # 1 process vs N, same global batch
    render(section, result)                                      # the console table

`SyntheticShards` packs the procedural dataset once per image size for benchmarks without `--data`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import socket
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

from . import data, distributed, precision, shards
from .config import Config, DataConfig, load_config_dict
from .errors import RunFailed, UserError
from .losses import SegLoss
from .models import build_model
from .trainer import CUDA_GRAPH_MODES, Run, StepMeter, compile_mode, compile_options, setup_run, train_step, wrap_ddp

__all__ = [
    "TARGETS",
    "WIDE_SPREAD",
    "DataSettings",
    "Sample",
    "ScalingSettings",
    "SyntheticShards",
    "TrainSettings",
    "bench_data",
    "bench_scaling",
    "bench_train",
    "environment",
    "peak_flops",
    "render",
    "scaling_unavailable",
]

WIDE_SPREAD = 1.3  # max/min over repeats above this: the figure is flagged as noisy

# What the issue asks for, printed beside the figures (never asserted).
TARGETS: dict[str, dict[str, tuple[str, float]]] = {
    "cpu": {
        "pipeline_vs_bound": (">=", 0.9),
        "pipeline_vs_folder": (">=", 1.0),
        "overhead_ratio": (">=", 0.97),
        "mfu": (">=", 0.60),
        "efficiency": (">=", 0.95),
    },
    "cuda": {
        "loader_samples_per_s": (">=", 600.0),  # at 512^2
        "overhead_ratio": (">=", 0.95),
        "mfu": (">=", 0.45),  # of the bf16 matmul peak, 8 x 512^2 compiled
        "efficiency": (">=", 0.95),
    },
}

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --- figures and where they were measured ------------------------------------------------------------


@dataclass
class Sample:
    """One measurement: a rate per timed repeat, after warm-up."""

    values: list[float]
    unit: str

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        lo = min(self.values)
        return max(self.values) / lo if lo > 0 else math.inf

    @property
    def wide(self) -> bool:
        return self.spread > WIDE_SPREAD

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": min(self.values), "max": max(self.values), "spread": self.spread,
                "values": self.values, "unit": self.unit}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


def environment(device: torch.device) -> dict[str, Any]:
    """Where a figure was measured: device, torch, cores, threads, the 1-minute load average."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": f"{device.type}: {name}", "torch": torch.__version__, "cores": cores(),
            "torch_threads": torch.get_num_threads(), "load_average": load_average(),
            "python": platform.python_version()}


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed_rate(work: Callable[[], float], unit: str, *, warmup: int, calls: int, repeats: int,
               sync: Callable[[], None] = lambda: None) -> Sample:
    """`work()` does one unit (a step, a batch, a sample) and returns how much it did (images, FLOPs ...);
    the rate of each of `repeats` blocks of `calls` units after `warmup` untimed units."""
    for _ in range(warmup):
        work()
    rates = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        done = sum(work() for _ in range(calls))
        sync()  # CUDA work is asynchronous: the block ends when the device is done
        rates.append(done / (time.perf_counter() - t0))
    return Sample(rates, unit)


def _memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "what": "torch.cuda.max_memory_allocated during this loop"}
    # ru_maxrss only grows: it covers this loop and whatever the process did before it.
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "what": "process max RSS so far (includes earlier loops)"}


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def resolve_device(kind: str) -> torch.device:
    device = distributed.pick_device(0, kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


# --- data sets -----------------------------------------------------------------------------------------


class SyntheticShards:
    """The procedural dataset packed once per image size under `folder` (`seg_dist.pack.pack_synthetic`)."""

    def __init__(self, folder: str | Path, n: int = 96, progress: Progress = _quiet) -> None:
        self.folder, self.n, self.progress = Path(folder), n, progress
        self._roots: dict[int, str] = {}

    def root(self, size: int) -> str:
        if size not in self._roots:
            from .pack import pack_synthetic  # late: the packer is only needed without --data

            out = self.folder / f"synth{size}"
            self.progress(f"packing {self.n} synthetic {size} px samples into {out}")
            pack_synthetic(out, n=self.n, size=size, workers=min(4, cores()))
            self._roots[size] = str(out)
        return self._roots[size]


def _base_config(root: str, manifest: dict[str, Any], **sections: dict[str, Any]) -> Config:
    """Built-in defaults for `root`; validation is never run here, so a set without a val split uses train."""
    cfg = {"data": {"root": root, "verify": "off"}, "logging": {"tensorboard": False, "progress": False},
           "train": {"resume": "never", "epochs": 1}}
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    if DataConfig.val_split not in manifest["splits"]:
        cfg["data"]["val_split"] = cfg["data"].get("train_split", DataConfig.train_split)
    return load_config_dict(cfg)


def read_pairs(urls: Sequence[str]) -> list[tuple[str, str, bytes, bytes]]:
    """(key, image extension, image bytes, mask bytes) as stored in the shards, without decoding."""
    # data.py's raw-sample reader is private; a tar's members of one sample share a key (basename up to
    # the first dot, as webdataset splits it).
    pairs: list[tuple[str, str, bytes, bytes]] = []
    for url in urls:
        fields: dict[str, dict[str, bytes]] = {}
        with tarfile.open(url) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                stem, _, ext = base.partition(".")
                fields.setdefault(os.path.join(folder, stem), {})[ext] = tar.extractfile(member).read()
        for key, f in fields.items():
            ext = next((e for e in shards.IMAGE_EXTS if e in f), None)
            if ext is not None and shards.MASK_FIELD in f:
                pairs.append((key, ext, f[ext], f[shards.MASK_FIELD]))
    if not pairs:
        raise UserError(f"no image/mask samples in {', '.join(urls) or 'the split'}")
    return pairs


class FolderDataset(Dataset):
    """The seed tutorial's loader: one image file and one PNG mask file per sample, decoded and augmented in
    `__getitem__` (with our decoders, so masks keep their class ids), shipping the same dtypes as the
    shard pipeline (`like`: one of its samples)."""

    def __init__(self, images: list[Path], masks: list[Path], transform: Any,
                 like: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.images, self.masks, self.transform = images, masks, transform
        self.image_dtype, self.mask_dtype = like[0].dtype, like[1].dtype

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = shards.decode_image(self.images[i].read_bytes())
        mask = shards.decode_mask(self.masks[i].read_bytes())
        out = self.transform(image=image, mask=mask)
        return _tensor(out["image"]).to(self.image_dtype), _tensor(out["mask"]).to(self.mask_dtype)


def _tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def write_folder(pairs: list[tuple[str, str, bytes, bytes]], folder: Path) -> tuple[list[Path], list[Path]]:
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


def _cycle(items: Sequence[Any]) -> Callable[[], Any]:
    state = {"i": 0}

    def nxt() -> Any:
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return item

    return nxt


# --- bench data ----------------------------------------------------------------------------------------


def default_workers() -> tuple[int, ...]:
    """0, 1, 2 ... up to the cores; on many cores powers of two and the core count."""
    n = cores()
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


def _to_device(images: torch.Tensor, masks: torch.Tensor, device: torch.device) -> int:
    images.to(device, non_blocking=True)
    masks.to(device, non_blocking=True)
    return images.shape[0]


def _loader_rate(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device, batch: int,
                 workers: int, s: DataSettings) -> Sample:
    calls = max(1, s.samples // batch)
    # Worker start-up and the first prefetched batches are not the steady state.
    warmup = 2 + 2 * workers
    return timed_rate(lambda: _to_device(*next(batches), device), "samples/s", warmup=warmup, calls=calls,
                      repeats=s.repeats, sync=_sync(device))


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


def bench_data(s: DataSettings, progress: Progress = _quiet) -> dict[str, Any]:
    """Samples/s of (a) decoding, (b) decoding + train augmentation in one process, (c) the shard pipeline
    (`data.train_loader` and the copy to the device) and (d) a folder-of-files Dataset with the same
    transforms and DataLoader settings, for each worker count; their ratios."""
    device = resolve_device(s.device)
    env = environment(device)
    manifest = shards.load_manifest(s.root)
    base = _base_config(s.root, manifest, data={"image_size": s.size}, train={"batch_size": s.batch})
    split = base.data.train_split
    classes = data.resolve_classes(base.data, manifest)
    pairs = read_pairs(shards.shard_urls(s.root, manifest, split))
    transform = data.build_transforms(base.data, train=True, ignore_index=classes.ignore_index)
    rates: dict[str, Any] = {}

    def note(name: str, sample: Sample) -> Sample:
        progress(f"  {name}: {sample.median:,.0f} {sample.unit} (load {load_average()})")
        return sample

    progress(f"bench data: {len(pairs)} samples of {s.root} ({split}), crop {s.size}, batch {s.batch}, "
             f"workers {list(s.workers)}, {device.type}")
    nxt = _cycle(pairs)

    def decode() -> int:
        _, _, image, mask = nxt()
        shards.decode_image(image)
        shards.decode_mask(mask)
        return 1

    def decode_augment() -> int:
        _, _, image, mask = nxt()
        transform(image=shards.decode_image(image), mask=shards.decode_mask(mask))
        return 1

    with one_thread():  # a bound per core, as each loader worker runs
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
        one = dataclasses.replace(base, train=dataclasses.replace(base.train, batch_size=1, steps_per_epoch=1))
        like = next(iter(data.train_loader(one, manifest, s.root, 0, 1, epoch=0)))
        folder_set = FolderDataset(images, masks, transform, (like[0][0], like[1][0]))
        for w in s.workers:
            calls = max(1, s.samples // s.batch)
            steps = 2 + 2 * w + calls * s.repeats
            cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, workers=w),
                                      train=dataclasses.replace(base.train, steps_per_epoch=steps))
            progress(f"(c) shard pipeline (data.train_loader + copy to {device.type}), {w} workers ...")
            batches = iter(data.train_loader(cfg, manifest, s.root, 0, 1, epoch=0))
            pipeline[w] = note(f"shard pipeline, {w} workers", _loader_rate(batches, device, s.batch, w, s))
            del batches  # stops its workers before the next loader starts its own
            progress(f"(d) folder of files Dataset, {w} workers ...")
            kw: dict[str, Any] = {"num_workers": w, "pin_memory": cfg.data.pin_memory and device.type == "cuda"}
            if w > 0:
                kw["prefetch_factor"] = cfg.data.prefetch_factor
            sampler = RandomSampler(folder_set, replacement=True, num_samples=steps * s.batch)
            loader = iter(DataLoader(folder_set, batch_size=s.batch, sampler=sampler, drop_last=True, **kw))
            folder[w] = note(f"folder Dataset, {w} workers", _loader_rate(loader, device, s.batch, w, s))
            del loader
    bound = rates["decode_augment"].median
    # Per core: w workers may use w cores (the main process collates and copies besides).
    vs_bound = {w: pipeline[w].median / (bound * max(1, w)) for w in s.workers}
    vs_folder = {w: pipeline[w].median / folder[w].median for w in s.workers}
    scaling = {w: pipeline[w].median / (w * pipeline[1].median) for w in s.workers if w >= 1} if 1 in s.workers else {}
    folder_scaling = {w: folder[w].median / (w * folder[1].median) for w in s.workers if w >= 1} \
        if 1 in s.workers else {}
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
        "worker_scaling": scaling[max(scaling)] if scaling else None,  # 1.0 by definition if 1 is the most
        "worker_scaling_workers": max(scaling) if scaling else None,
        "worker_scaling_by_workers": {str(w): v for w, v in scaling.items()},
        "folder_worker_scaling_by_workers": {str(w): v for w, v in folder_scaling.items()},
        "best_pipeline_samples_per_s": pipeline[best_pipeline].median,
        "best_pipeline_workers": best_pipeline,
    }


# --- peaks and FLOPs -----------------------------------------------------------------------------------

def peak_flops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> tuple[Sample, str]:
    """FLOP/s of the device's best case in `dtype`, and what was run.

    CPU: a 3x3 convolution 256->256 channels, 64x64, batch 2, channels_last (oneDNN; MKL's fp32 matmul
    runs at AVX2 speed on this kind of CPU, a conv net's convolutions do not). GPU: an 8192^3 matmul.
    """
    with torch.no_grad():
        if device.type == "cuda":
            n = 8192
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            out = torch.empty(n, n, device=device, dtype=dtype)
            flops, what = 2 * n**3, f"{precision.name(dtype)} matmul {n}x{n}x{n}"

            def work() -> float:
                torch.mm(a, b, out=out)
                return flops

            sample = timed_rate(work, "FLOP/s", warmup=5, calls=20, repeats=repeats, sync=_sync(device))
        else:
            x = torch.randn(2, 256, 64, 64).to(dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(256, 256, 3, 3).to(dtype).contiguous(memory_format=torch.channels_last)
            flops = 2 * 2 * 256 * 256 * 9 * 64 * 64
            what = (f"{precision.name(dtype)} conv3x3 256->256 ch, 64x64, batch 2, channels_last, "
                    f"{torch.get_num_threads()} threads")

            def work() -> float:
                F.conv2d(x, w, padding=1)
                return flops

            sample = timed_rate(work, "FLOP/s", warmup=3, calls=5, repeats=repeats)
    return sample, what


def step_flops(model: torch.nn.Module, loss_fn: SegLoss, images: torch.Tensor, masks: torch.Tensor,
               device: torch.device, amp_dtype: torch.dtype | None) -> int:
    """FLOPs of one training step's forward and backward (`torch.utils.flop_counter`; the optimiser's
    elementwise work is not counted, as usual for MFU)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with precision.autocast(device, amp_dtype):
            loss, _ = loss_fn(model(images), masks)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


# --- bench train ---------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    root: str
    width: int = 64
    depth: int = 4
    size: int = 256
    batch: int = 2
    amp: str = "auto"  # off | bf16 | fp16 | auto (precision.resolve_amp)
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "auto"  # train.compile_mode
    ddp: bool = True  # wrap the trainer's model in DDP over a real 1-rank group, as a multi-rank run does
    workers: int = 0  # the trainer's loader workers
    warmup: int = 3
    steps: int = 5  # per timed repeat
    repeats: int = 3
    device: str = "cpu"

    @classmethod
    def for_device(cls, device: torch.device, root: str, **given: Any) -> list[TrainSettings]:
        """One case per (batch, size): on CUDA 16 x 256^2 and 8 x 512^2 unless a size or batch is given."""
        given = {k: v for k, v in given.items() if v is not None}
        if device.type == "cuda":
            cases = [(16, 256), (8, 512)] if "size" not in given and "batch" not in given else \
                [(given.get("batch", 16), given.get("size", 256))]
            defaults: dict[str, Any] = {"workers": max(0, cores() - 2), "device": "cuda"}
        else:
            cases = [(given.get("batch", 2), given.get("size", 256))]
            defaults = {"device": device.type}
        rest = {k: v for k, v in given.items() if k not in ("batch", "size")}
        return [cls(root=root, batch=b, size=px, **{**defaults, **rest}) for b, px in cases]

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps * self.repeats


def train_config(s: TrainSettings | ScalingSettings, run_dir: str, batch: int) -> Config:
    manifest = shards.load_manifest(s.root)
    return _base_config(
        s.root, manifest,
        data={"image_size": s.size, "workers": s.workers},
        model={"width": s.width, "depth": s.depth},
        train={"batch_size": batch, "amp": s.amp, "channels_last": s.channels_last, "compile": s.compile,
               "compile_mode": s.compile_mode, "device": s.device, "steps_per_epoch": s.warmup + s.steps * s.repeats},
        run={"dir": run_dir},
    )


def _float_batch(images: torch.Tensor, masks: torch.Tensor, cfg: Config, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch on the device as the model takes it (normalised as the trainer does, untimed here)."""
    images = data.normalize(images.to(device), cfg.data.mean, cfg.data.std, cfg.train.channels_last)
    return images, masks.to(device).long()


def _trainer_work(run: Run, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], meter: StepMeter
                  ) -> Callable[[], float]:
    """One optimiser step as `train_one_epoch` takes it (train_step, a meter flush every log_every steps);
    returns the images of the step over all ranks."""
    cfg = run.cfg
    images = cfg.train.batch_size * cfg.train.accum_steps * run.denv.world_size
    count = {"steps": 0}

    def work() -> float:
        train_step(run, batches, meter)
        count["steps"] += 1
        if count["steps"] % cfg.logging.log_every == 0:
            meter.flush()  # the host sync a logged step costs
        return images

    return work


@contextlib.contextmanager
def one_rank_group(device: torch.device, folder: str) -> Iterator[bool]:
    """A real 1-process group (FileStore) unless one exists; yields whether it made one."""
    if distributed.is_initialized():
        yield False
        return
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(distributed.backend_for(device), init_method=f"file://{Path(folder, 'pg_store')}",
                            rank=0, world_size=1, **kwargs)
    try:
        yield True
    finally:
        dist.destroy_process_group()


def _bare_loop(s: TrainSettings, cfg: Config, manifest: dict[str, Any], classes: data.ClassInfo,
               device: torch.device, amp_dtype: torch.dtype | None) -> tuple[Sample, dict[str, Any], int]:
    """Images/s of model, SegLoss, backward and a fused AdamW step on batches already on the device; the
    peak memory, and the FLOPs of one step (counted on the eager model)."""
    _reset_memory(device)
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
    model = build_model(cfg.model, classes.num_classes).to(device)
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn = SegLoss(classes.num_classes, classes.ignore_index, cfg.loss.ce_weight, cfg.loss.dice_weight).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=cfg.optim.betas, fused=True)
    scaler = precision.grad_scaler(device, amp_dtype)
    few = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps_per_epoch=4),
                              data=dataclasses.replace(cfg.data, workers=0))
    in_memory = [_float_batch(x, y, cfg, device) for x, y in data.train_loader(few, manifest, s.root, 0, 1, 0)]
    flops = step_flops(model, loss_fn, *in_memory[0], device, amp_dtype)
    # The model alone, as a bare loop would (the trainer compiles its loss too), in the trainer's mode.
    mode = compile_mode(s.compile_mode, device, 1)
    called = torch.compile(model, **compile_options(mode)) if s.compile else model
    nxt = _cycle(in_memory)

    def bare_step() -> float:
        images, masks = nxt()
        if s.compile and mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast(device, amp_dtype):
            loss, _ = loss_fn(called(images), masks)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return images.shape[0]

    rate = timed_rate(bare_step, "images/s", warmup=s.warmup, calls=s.steps, repeats=s.repeats, sync=_sync(device))
    return rate, _memory(device), flops


def _trainer_loop(s: TrainSettings, cfg: Config, device: torch.device, tmp: str) -> tuple[Sample, dict[str, Any]]:
    """Images/s of the trainer's own step: setup_run, then train_step fed by data.train_loader."""
    _reset_memory(device)
    group = one_rank_group(device, tmp) if s.ddp else contextlib.nullcontext(False)
    with group:
        run, _ = setup_run(cfg, distributed.DistEnv(), device)
        if s.ddp:  # setup_run wraps only with >1 rank; over a 1-rank group DDP's hooks do their per-step work
            run = dataclasses.replace(run, model=wrap_ddp(run.model, run.raw_model, device))
        with run.runlog:
            run.model.train()
            batches = iter(data.train_loader(cfg, run.manifest, cfg.data.root, 0, 1, epoch=0))
            work = _trainer_work(run, batches, StepMeter(device))
            rate = timed_rate(work, "images/s", warmup=s.warmup, calls=s.steps, repeats=s.repeats,
                              sync=_sync(device))
        memory = _memory(device)
    return rate, memory


def bench_train(s: TrainSettings, progress: Progress = _quiet) -> dict[str, Any]:
    """The trainer's step (setup_run + train_step fed by data.train_loader, DDP over a 1-rank group) against
    a bare loop (same model, SegLoss, backward, fused AdamW on batches already on the device), at the same
    batch, dtype, layout and compile setting; images/s, their ratio, peak memory and model FLOP utilisation."""
    device = resolve_device(s.device)
    if s.compile:  # auto resolved as the trainer resolves it on one device, so the tables name the mode
        s = dataclasses.replace(s, compile_mode=compile_mode(s.compile_mode, device, 1))
    env = environment(device)
    amp_dtype = precision.resolve_amp(s.amp, device)
    dtype_name = precision.name(amp_dtype)
    progress(f"bench train: width {s.width}, {s.batch} x {s.size}^2, {dtype_name}, "
             f"{'channels_last' if s.channels_last else 'NCHW'}, {_compiled(s.compile, s.compile_mode)}, "
             f"{device.type}")
    progress(f"peak: {dtype_name} on {device.type} ...")
    peak, peak_what = peak_flops(device, amp_dtype or torch.float32, repeats=max(3, s.repeats))
    progress(f"  {peak_what}: {peak.median / 1e9:,.0f} GFLOP/s (load {load_average()})")

    with tempfile.TemporaryDirectory(prefix="seg_dist_bench_train_") as tmp:
        cfg = train_config(s, str(Path(tmp, "run")), s.batch)
        manifest = shards.load_manifest(s.root)
        classes = data.resolve_classes(cfg.data, manifest)

        # Bare loop first: on CPU memory is the process's max RSS, which only grows.
        progress(f"bare loop: {s.warmup} warm-up + {s.repeats} x {s.steps} steps ...")
        bare, bare_memory, flops = _bare_loop(s, cfg, manifest, classes, device, amp_dtype)
        progress(f"  bare loop: {bare.median:,.2f} images/s (load {load_average()})")
        progress(f"trainer (setup_run + train_step{' + DDP, 1 rank' if s.ddp else ''}): {s.warmup} warm-up + "
                 f"{s.repeats} x {s.steps} steps ...")
        trainer, trainer_memory = _trainer_loop(s, cfg, device, tmp)
        progress(f"  trainer: {trainer.median:,.2f} images/s (load {load_average()})")
        _reset_memory(device)
    # The peak again after the loops, so that a change of load during them shows in its min and max.
    after, _ = peak_flops(device, amp_dtype or torch.float32, repeats=max(3, s.repeats))
    peak = Sample(peak.values + after.values, peak.unit)
    progress(f"  peak again: {after.median / 1e9:,.0f} GFLOP/s (load {load_average()})")
    best = max(peak.values)  # a peak is the best the device did in this run

    per_image = flops / s.batch
    env["load_average_end"] = load_average()
    return {
        "env": env,
        "settings": {**dataclasses.asdict(s), "dtype": dtype_name,
                     "model": f"unet width {s.width} depth {s.depth}, {classes.num_classes} classes"},
        "trainer": {"rate": trainer.as_dict(), "memory": trainer_memory},
        "bare": {"rate": bare.as_dict(), "memory": bare_memory},
        "overhead_ratio": trainer.median / bare.median,
        "flops_per_step": flops,
        "flops_per_image": per_image,
        "peak": {"rate": peak.as_dict(), "what": peak_what, "flops_per_s": best,
                 "how": "before and after the loops; MFU uses the max"},
        "mfu": trainer.median * per_image / best,
        "mfu_bare": bare.median * per_image / best,
        "images_per_s": trainer.median,
        "bare_images_per_s": bare.median,
    }


# --- bench scaling -------------------------------------------------------------------------------------


@dataclass
class ScalingSettings:
    root: str
    procs: int = 2
    width: int = 16
    depth: int = 4
    size: int = 128
    batch: int = 8  # global: every world size trains on the same images per step
    amp: str = "auto"
    channels_last: bool = False  # no gain at small widths on CPU
    compile: bool = False
    compile_mode: str = "auto"
    workers: int = 0
    warmup: int = 3
    steps: int = 5
    repeats: int = 3
    device: str = "cpu"
    pin_cpu_ranks: bool = True  # train.pin_cpu_ranks

    @classmethod
    def for_device(cls, device: torch.device, root: str, **given: Any) -> ScalingSettings:
        defaults: dict[str, Any] = {"device": device.type}
        if device.type == "cuda":
            procs = given.get("procs") or min(2, torch.cuda.device_count())
            defaults.update(width=64, size=256, batch=16 * procs, channels_last=True,
                            workers=max(0, cores() // procs - 2))
        return cls(root=root, **{**defaults, **{k: v for k, v in given.items() if v is not None}})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scaling_rank(rank: int, world: int, port: int, cfg: Config, s: ScalingSettings, out: str) -> None:
    """One rank of a scaling run, started by torch.multiprocessing.spawn; rank 0 writes the figures."""
    import multiprocessing

    if s.workers > 0:  # spawned ranks would otherwise spawn (not fork) their loader workers: seconds each
        multiprocessing.set_start_method("fork", force=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with distributed.setup(s.device, timeout_minutes=10) as (denv, device):
        distributed.share_cpu_threads(denv, device, pin=s.pin_cpu_ranks)  # as seg_dist.train
        run, _ = setup_run(cfg, denv, device)
        with run.runlog:
            run.model.train()
            batches = iter(data.train_loader(cfg, run.manifest, cfg.data.root, denv.rank, denv.world_size, 0))
            work = _trainer_work(run, batches, StepMeter(device))
            cuda_sync = _sync(device)

            def sync() -> None:
                cuda_sync()
                distributed.barrier()  # every rank has finished its block

            rate = timed_rate(work, "images/s", warmup=s.warmup, calls=s.steps, repeats=s.repeats, sync=sync)
            del batches
        if denv.is_main:
            Path(out).write_text(json.dumps({"rate": rate.as_dict(), "threads": torch.get_num_threads(),
                                             "per_rank_batch": cfg.train.batch_size, "memory": _memory(device)}))


def _spawn_scaling(world: int, s: ScalingSettings, tmp: str) -> dict[str, Any]:
    import torch.multiprocessing as mp

    cfg = train_config(s, str(Path(tmp, f"run{world}")), s.batch // world)
    out = str(Path(tmp, f"result{world}.json"))
    try:
        mp.spawn(_scaling_rank, args=(world, _free_port(), cfg, s, out), nprocs=world, join=True)
    except mp.ProcessRaisedException as e:
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1:]
        raise RunFailed(f"the {world}-process run failed: {last[0] if last else e}") from None
    except mp.ProcessExitedException as e:
        raise RunFailed(f"the {world}-process run failed: {e}") from None
    return json.loads(Path(out).read_text())


def scaling_unavailable(device: torch.device, procs: int) -> str | None:
    """Why `procs` processes cannot be compared with 1 here, or None."""
    if procs < 2:
        return f"--procs {procs}: scaling compares 1 process with at least 2"
    if device.type == "cuda" and torch.cuda.device_count() < procs:
        return f"{procs} processes need {procs} GPUs; {torch.cuda.device_count()} visible"
    return None


def bench_scaling(s: ScalingSettings, progress: Progress = _quiet) -> dict[str, Any]:
    """The trainer in 1 process against `procs` processes (gloo on CPU, NCCL on GPUs; real process groups,
    spawned) at the same global batch: global images/s and efficiency = N-process / 1-process."""
    device = resolve_device(s.device)
    why = scaling_unavailable(device, s.procs)
    if why:
        raise UserError(why)
    if s.batch % s.procs:
        raise UserError(f"global batch {s.batch} does not split over {s.procs} processes: pass a multiple of "
                        f"{s.procs} (--batch)")
    env = environment(device)
    amp_dtype = precision.resolve_amp(s.amp, device)
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="seg_dist_bench_scaling_") as tmp:
        for world in (1, s.procs):
            progress(f"bench scaling: {world} process(es) x batch {s.batch // world} (global {s.batch}), "
                     f"width {s.width}, {s.size}^2, {precision.name(amp_dtype)}, {device.type} ...")
            results[world] = _spawn_scaling(world, s, tmp)
            progress(f"  {world} process(es), {results[world]['threads']} thread(s) each: "
                     f"{results[world]['rate']['median']:,.2f} "
                     f"images/s (load {load_average()})")
    one, many = (Sample(results[w]["rate"]["values"], "images/s") for w in (1, s.procs))
    env["load_average_end"] = load_average()
    return {
        "env": env,
        "settings": {**dataclasses.asdict(s), "dtype": precision.name(amp_dtype),
                     "backend": distributed.backend_for(device)},
        "runs": {str(w): {**r, "steps_per_s": Sample(r["rate"]["values"], "").median / s.batch}
                 for w, r in results.items()},
        "efficiency": many.median / one.median,
        "efficiency_spread": max(one.spread, many.spread),
    }


# --- the console tables --------------------------------------------------------------------------------


def _target(device: str, key: str, value: float | None) -> str:
    goal = TARGETS.get(device, {}).get(key)
    if goal is None or value is None:
        return ""
    op, bound = goal
    met = value >= bound if op == ">=" else value <= bound
    return f"target {op} {bound:g}: {'met' if met else 'NOT met'}"


def _row(name: str, s: dict[str, Any], scale: float = 1.0, digits: int = 1) -> tuple[str, str]:
    flag = f"  ! spread {s['spread']:.2f}" if s["spread"] > WIDE_SPREAD else ""
    fmt = f"{{:>12,.{digits}f}}"
    cells = "".join(fmt.format(s[k] * scale) for k in ("median", "min", "max"))
    return f"  {name:<44}{cells}{flag}", name if flag else ""


def _table(title: str, unit: str, rows: list[tuple[str, dict[str, Any], float]], digits: int = 1) -> list[str]:
    lines = [title, f"  {'':<44}{'median':>12}{'min':>12}{'max':>12}   ({unit})"]
    noisy = []
    for name, sample, scale in rows:
        line, wide = _row(name, sample, scale, digits)
        lines.append(line)
        if wide:
            noisy.append(wide)
    if noisy:
        lines.append(f"  warning: max/min > {WIDE_SPREAD} over the repeats in {len(noisy)} row(s) (marked !): the "
                     "machine was busy or the blocks too short; rerun on an idle machine (more --repeats/--steps)")
    return lines


def _env_line(env: dict[str, Any]) -> str:
    line = (f"  {env['device']}, {env['cores']} cores, {env['torch_threads']} torch threads, torch {env['torch']}, "
            f"load average {env['load_average']} -> {env.get('load_average_end', '?')}")
    if max(env["load_average"], env.get("load_average_end", 0)) > env["cores"]:
        # Measured here: with the cores oversubscribed, a 2-thread step ran 20-40x slower than a 1-thread one
        # (OpenMP threads wait for a descheduled peer), so such figures say little about an idle machine.
        line += "\n  warning: load average above the core count: other processes share these cores"
    return line


def _ratio(name: str, value: float | None, device: str, key: str, how: str) -> str:
    shown = "n/a" if value is None else f"{value:.3f}"
    target = _target(device, key, value)
    return f"  {name:<32}{shown:>8}   {how}{'   ' + target if target else ''}"


def render(section: str, result: dict[str, Any]) -> str:
    """The console table of one section's result."""
    return {"data": _render_data, "train": _render_train, "scaling": _render_scaling}[section](result)


def _render_data(r: dict[str, Any]) -> str:
    s, rates, dev = r["settings"], r["rates"], r["env"]["device"].split(":")[0]
    title = (f"bench data: {s['samples_in_split']} samples ({s['shard_image_format']} {s['image_shape'][1]}x"
             f"{s['image_shape'][0]}), crop {s['size']}, batch {s['batch']}, copy to {s['device']}")
    rows = [("(a) decode image + mask, 1 thread", rates["decode"], 1.0),
            ("(b) decode + train augmentation, 1 thread", rates["decode_augment"], 1.0)]
    for w in s["workers"]:
        rows.append((f"(c) shard pipeline, {w} workers", rates["pipeline"][str(w)], 1.0))
        rows.append((f"(d) folder of files Dataset, {w} workers", rates["folder"][str(w)], 1.0))
    lines = [*_table(title, "samples/s", rows), _env_line(r["env"]), "  ratios:"]
    lines.append(_ratio("c/b", r["pipeline_vs_bound"], dev, "pipeline_vs_bound",
                        f"shard pipeline at {r['pipeline_vs_bound_workers']} workers / (b x max(1, workers))"))
    lines.append(_ratio("c/d", r["pipeline_vs_folder"], dev, "pipeline_vs_folder",
                        "best shard pipeline ({} workers) / best folder Dataset ({} workers)"
                        .format(*r["pipeline_vs_folder_workers"])))
    if r["worker_scaling"] is not None:
        lines.append(_ratio("worker scaling", r["worker_scaling"], dev, "worker_scaling",
                            f"c at {r['worker_scaling_workers']} workers / ({r['worker_scaling_workers']} x c at 1)"))
    by = r["pipeline_vs_bound_by_workers"]
    lines.append("  by workers:     " + "   ".join(
        f"{w}: c/b {by[w]:.2f}, c/d {r['pipeline_vs_folder_by_workers'][w]:.2f}"
        + (f", scaling {r['worker_scaling_by_workers'][w]:.2f}" if w in r["worker_scaling_by_workers"] else "")
        for w in by))
    if dev == "cuda":
        best = r["best_pipeline_samples_per_s"]
        lines.append(_ratio("best shard pipeline samples/s", best, dev, "loader_samples_per_s",
                            f"at {r['best_pipeline_workers']} workers, crop {s['size']}"))
    return "\n".join(lines)


def _compiled(compile: bool, mode: str) -> str:
    return f"compiled ({mode})" if compile else "eager"


def _render_train(r: dict[str, Any]) -> str:
    s, dev = r["settings"], r["env"]["device"].split(":")[0]
    compiled = _compiled(s["compile"], s.get("compile_mode", "default"))
    title = (f"bench train: {s['model']}, {s['batch']} x {s['size']}^2, {s['dtype']}, "
             f"{'channels_last' if s['channels_last'] else 'NCHW'}, {compiled}, "
             f"{s['device']}; {s['warmup']} warm-up + {s['repeats']} x {s['steps']} steps")
    rows = [("trainer (train_step, real loader" + (", DDP 1 rank)" if s["ddp"] else ")"), r["trainer"]["rate"], 1.0),
            ("bare loop (in-memory batches)", r["bare"]["rate"], 1.0)]
    lines = _table(title, "images/s", rows, digits=2)
    peak = r["peak"]["rate"]
    lines.append(f"  peak {peak['max'] / 1e9:,.0f} GFLOP/s (max of {len(peak['values'])} blocks before and after the "
                 f"loops; median {peak['median'] / 1e9:,.0f}, min {peak['min'] / 1e9:,.0f}): {r['peak']['what']}")
    lines.append(_env_line(r["env"]))
    lines.append(_ratio("trainer / bare", r["overhead_ratio"], dev, "overhead_ratio", "images/s, same model and batch"))
    lines.append(_ratio("MFU (trainer)", r["mfu"], dev, "mfu",
                        f"{r['flops_per_step'] / 1e9:,.1f} GFLOP/step x steps/s / peak"))
    lines.append(_ratio("MFU (bare loop)", r["mfu_bare"], dev, "", "the same, bare loop"))
    mem = (f"  peak memory: trainer {r['trainer']['memory']['peak_mib']:,.0f} MiB, bare "
           f"{r['bare']['memory']['peak_mib']:,.0f} MiB ({r['trainer']['memory']['what']})")
    lines.append(mem)
    return "\n".join(lines)


def _render_scaling(r: dict[str, Any]) -> str:
    s, dev = r["settings"], r["env"]["device"].split(":")[0]
    title = (f"bench scaling ({s['backend']}): global batch {s['batch']}, width {s['width']}, {s['size']}^2, "
             f"{s['dtype']}, {s['device']}; {s['warmup']} warm-up + {s['repeats']} x {s['steps']} steps")
    rows = [(f"{w} process(es) x {run['per_rank_batch']}, {run['threads']} thread(s) each", run["rate"], 1.0)
            for w, run in r["runs"].items()]
    lines = [*_table(title, "global images/s", rows, digits=2), _env_line(r["env"])]
    lines.append("  steps/s: " + ", ".join(f"{w} process(es) {run['steps_per_s']:.3f}" for w, run in r["runs"].items()))
    lines.append(_ratio("efficiency", r["efficiency"], dev, "efficiency",
                        f"{s['procs']}-process global images/s / 1-process images/s"))
    return "\n".join(lines)
