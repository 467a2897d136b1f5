"""How the lab measures and shows a figure: timed rates, where they were measured, the console tables.

Every figure is either a ratio of two rates measured side by side in one run, or an absolute rate
recorded with the device, dtype, sizes, torch version, core count and load average it was measured
under (`environment`). A rate is the median over `repeats` timed blocks after warm-up; min and max
are kept, and a spread (max/min) above `WIDE_SPREAD` is flagged. On CUDA every timed block starts and
ends with `torch.cuda.synchronize()`, and memory is `torch.cuda.max_memory_allocated()`.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seg_dist import data, distributed
from seg_dist.config import Config, DataConfig, load_config_dict

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


def quiet(_: str) -> None:
    pass


@dataclass
class Sample:
    """One measurement: a rate per timed repeat, after warm-up."""

    values: list[float]  # counts[i] / seconds[i]
    unit: str
    counts: list[float]  # what each block did: samples, images, FLOPs
    seconds: list[float]  # each block's wall time

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        lo = min(self.values)
        return max(self.values) / lo if lo > 0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        return {"median": self.median, "min": min(self.values), "max": max(self.values), "spread": self.spread,
                "values": self.values, "unit": self.unit, "counts": self.counts, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sample:
        return cls(d["values"], d["unit"], d["counts"], d["seconds"])

    def __add__(self, other: Sample) -> Sample:
        return Sample(self.values + other.values, self.unit, self.counts + other.counts,
                      self.seconds + other.seconds)


def timed_rate(work: Callable[[], float], unit: str, *, warmup: int, calls: int, repeats: int,
               sync: Callable[[], None] = lambda: None) -> Sample:
    """`work()` does one unit (a step, a batch, a sample) and returns how much it did (images, FLOPs ...);
    the rate of each of `repeats` blocks of `calls` units after `warmup` untimed units."""
    for _ in range(warmup):
        work()
    counts, seconds = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        counts.append(sum(work() for _ in range(calls)))
        sync()  # CUDA work is asynchronous: the block ends when the device is done
        seconds.append(time.perf_counter() - t0)
    return Sample([c / s for c, s in zip(counts, seconds, strict=True)], unit, counts, seconds)


# --- where a figure was measured -----------------------------------------------------------------------


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


def device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "what": "torch.cuda.max_memory_allocated during this loop"}
    # ru_maxrss only grows: it covers this loop and whatever the process did before it.
    return {"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "what": "process max RSS so far (includes earlier loops)"}


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def resolve_device(kind: str) -> torch.device:
    device = distributed.pick_device(0, kind)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


# --- data sets and configs -----------------------------------------------------------------------------


class SyntheticShards:
    """The procedural dataset packed once per image size under `folder` (`seg_dist.pack.pack_synthetic`)."""

    def __init__(self, folder: str | Path, n: int = 96, progress: Progress = quiet) -> None:
        self.folder, self.n, self.progress = Path(folder), n, progress
        self._roots: dict[int, str] = {}

    def root(self, size: int) -> str:
        if size not in self._roots:
            from seg_dist.pack import pack_synthetic  # late: the packer is only needed without --data

            out = self.folder / f"synth{size}"
            self.progress(f"packing {self.n} synthetic {size} px samples into {out}")
            pack_synthetic(out, n=self.n, size=size, workers=min(4, cores()))
            self._roots[size] = str(out)
        return self._roots[size]


def base_config(root: str, manifest: dict[str, Any], **sections: dict[str, Any]) -> Config:
    """Built-in defaults for `root`, with what the data decides filled in (normalisation, input channels) as
    the trainer fills it in; validation is never run here, so a set without a val split uses train."""
    cfg: dict[str, Any] = {"data": {"root": root, "verify": "off"},
                           "logging": {"tensorboard": False, "progress": False},
                           "train": {"resume": "never", "epochs": 1}}
    for key, values in sections.items():
        cfg.setdefault(key, {}).update(values)
    if DataConfig.val_split not in manifest["splits"]:
        cfg["data"]["val_split"] = cfg["data"].get("train_split", DataConfig.train_split)
    return data.resolve_inputs(load_config_dict(cfg), manifest)


def cycle(items: Sequence[Any]) -> Callable[[], Any]:
    """A function returning the items in turn, round and round."""
    state = {"i": 0}

    def nxt() -> Any:
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return item

    return nxt


# --- the console tables --------------------------------------------------------------------------------


def _target(device: str, key: str, value: float | None) -> str:
    goal = TARGETS.get(device, {}).get(key)
    if goal is None or value is None:
        return ""
    op, bound = goal
    met = value >= bound if op == ">=" else value <= bound
    return f"target {op} {bound:g}: {'met' if met else 'NOT met'}"


def table(title: str, unit: str, rows: list[tuple[str, dict[str, Any]]], digits: int = 1) -> list[str]:
    """Median, min and max of each row's rate (a `Sample.as_dict()`), noisy rows marked."""
    lines = [title, f"  {'':<44}{'median':>12}{'min':>12}{'max':>12}   ({unit})"]
    noisy = 0
    for name, s in rows:
        flag = f"  ! spread {s['spread']:.2f}" if s["spread"] > WIDE_SPREAD else ""
        noisy += bool(flag)
        cells = "".join(f"{s[k]:>12,.{digits}f}" for k in ("median", "min", "max"))
        lines.append(f"  {name:<44}{cells}{flag}")
    if noisy:
        lines.append(f"  warning: max/min > {WIDE_SPREAD} over the repeats in {noisy} row(s) (marked !): the "
                     "machine was busy or the blocks too short; rerun on an idle machine (more --repeats/--steps)")
    return lines


def env_line(env: dict[str, Any]) -> str:
    line = (f"  {env['device']}, {env['cores']} cores, {env['torch_threads']} torch threads, torch {env['torch']}, "
            f"load average {env['load_average']} -> {env.get('load_average_end', '?')}")
    if max(env["load_average"], env.get("load_average_end", 0)) > env["cores"]:
        # Measured here: with the cores oversubscribed, a 2-thread step ran 20-40x slower than a 1-thread one
        # (OpenMP threads wait for a descheduled peer), so such figures say little about an idle machine.
        line += "\n  warning: load average above the core count: other processes share these cores"
    return line


def ratio(name: str, value: float | None, device: str, key: str, how: str) -> str:
    """One figure's line: its value, how it was formed, and its target where there is one."""
    shown = "n/a" if value is None else f"{value:.3f}"
    target = _target(device, key, value)
    return f"  {name:<32}{shown:>8}   {how}{'   ' + target if target else ''}"


def device_kind(result: dict[str, Any]) -> str:
    """"cpu" or "cuda": the device a section's result was measured on."""
    return result["env"]["device"].split(":")[0]
