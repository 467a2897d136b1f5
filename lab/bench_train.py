"""`bench train`: the trainer's step against a bare loop, and model FLOP utilisation.

The trainer's step is `trainer.setup_run` + `trainer.train_step` fed by `data.train_loader`, with DDP
over a real 1-process group as a multi-rank run has it; the bare loop is the same model, `SegLoss`,
backward and a fused AdamW step on batches already on the device. Same batch, dtype, layout and
compile setting; images/s, their ratio, peak memory and MFU against a peak measured in the same run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from seg_dist import data, distributed, precision, shards
from seg_dist.config import Config
from seg_dist.losses import SegLoss
from seg_dist.models import build_model
from seg_dist.trainer import CUDA_GRAPH_MODES, StepMeter, compile_mode, compile_options, setup_run, train_step

from . import measure
from .measure import Progress, Sample, load_average, quiet, timed_rate


@dataclass
class StepSettings:
    """A model and a loop of optimiser steps: what `bench train` and `bench scaling` share."""

    root: str
    width: int = 64
    depth: int = 4
    size: int = 256
    batch: int = 2
    amp: str = "auto"  # off | bf16 | fp16 | auto (precision.resolve_amp)
    channels_last: bool = True
    compile: bool = False
    compile_mode: str = "auto"  # train.compile_mode
    workers: int = 0  # the trainer's loader workers
    warmup: int = 3
    steps: int = 5  # per timed repeat
    repeats: int = 3
    device: str = "cpu"


@dataclass
class TrainSettings(StepSettings):
    ddp: bool = True  # the trainer in a real 1-process group, where setup_run wraps the model in DDP

    @classmethod
    def for_device(cls, device: torch.device, root: str, **given: Any) -> list[TrainSettings]:
        """One case per (batch, size): on CUDA 16 x 256^2 and 8 x 512^2 unless a size or batch is given."""
        given = {k: v for k, v in given.items() if v is not None}
        if device.type == "cuda":
            cases = [(16, 256), (8, 512)] if "size" not in given and "batch" not in given else \
                [(given.get("batch", 16), given.get("size", 256))]
            defaults: dict[str, Any] = {"workers": max(0, measure.cores() - 2), "device": "cuda"}
        else:
            cases = [(given.get("batch", 2), given.get("size", 256))]
            defaults = {"device": device.type}
        rest = {k: v for k, v in given.items() if k not in ("batch", "size")}
        return [cls(root=root, batch=b, size=px, **{**defaults, **rest}) for b, px in cases]


def train_config(s: StepSettings, run_dir: str, batch: int) -> Config:
    """The built-in defaults at the settings' model, crop and loop, `batch` per rank."""
    manifest = shards.load_manifest(s.root)
    return measure.base_config(
        s.root, manifest,
        data={"image_size": s.size, "workers": s.workers},
        model={"width": s.width, "depth": s.depth},
        train={"batch_size": batch, "amp": s.amp, "channels_last": s.channels_last, "compile": s.compile,
               "compile_mode": s.compile_mode, "device": s.device},
        run={"dir": run_dir},
    )


def trainer_work(run: Any, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], meter: StepMeter
                 ) -> tuple[Callable[[], float], Callable[[], int]]:
    """One optimiser step as the trainer takes it (train_step, a meter flush every log_every steps), returning
    the images of the step over all ranks; and a function giving the steps the trainer's meter counted."""
    cfg = run.cfg
    images = cfg.train.batch_size * cfg.train.accum_steps * run.denv.world_size
    count = {"steps": 0, "metered": 0}

    def work() -> float:
        train_step(run, batches, meter)
        count["steps"] += 1
        if count["steps"] % cfg.logging.log_every == 0:
            count["metered"] += meter.flush().steps  # the host sync a logged step costs
        return images

    def metered() -> int:
        count["metered"] += meter.flush().steps
        return count["metered"]

    return work, metered


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

            sample = timed_rate(work, "FLOP/s", warmup=5, calls=20, repeats=repeats,
                                sync=measure.device_sync(device))
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


# --- the two loops -------------------------------------------------------------------------------------


def _bare_loop(s: TrainSettings, cfg: Config, manifest: dict[str, Any], classes: data.ClassInfo,
               device: torch.device, amp_dtype: torch.dtype | None) -> tuple[Sample, dict[str, Any], int]:
    """Images/s of model, SegLoss, backward and a fused AdamW step on batches already on the device; the
    peak memory, and the FLOPs of one step (counted on the eager model)."""
    measure.reset_memory(device)
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
    model = build_model(cfg.model, classes.num_classes).to(device)
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn = SegLoss(classes.num_classes, classes.ignore_index, cfg.loss.ce_weight, cfg.loss.dice_weight).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=cfg.optim.betas, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    in_process = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=0))
    loader = data.train_loader(in_process, manifest, s.root, 0, 1, epoch=0, endless=True)
    in_memory = [(data.normalize(x.to(device), cfg.data.mean, cfg.data.std, cfg.train.channels_last),
                  y.to(device).long()) for x, y in itertools.islice(loader, 4)]
    flops = step_flops(model, loss_fn, *in_memory[0], device, amp_dtype)
    # The model alone, as a bare loop would (the trainer compiles its loss too), in the trainer's mode.
    mode = compile_mode(s.compile_mode, device, 1)
    called = torch.compile(model, **compile_options(mode)) if s.compile else model
    nxt = measure.cycle(in_memory)

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

    rate = timed_rate(bare_step, "images/s", warmup=s.warmup, calls=s.steps, repeats=s.repeats,
                      sync=measure.device_sync(device))
    return rate, measure.memory(device), flops


def _trainer_loop(s: TrainSettings, cfg: Config, device: torch.device) -> tuple[Sample, dict[str, Any], int]:
    """Images/s of the trainer's own step, its peak memory, and the steps its meter counted."""
    measure.reset_memory(device)
    group = distributed.single_process_group(device) if s.ddp else contextlib.nullcontext(distributed.DistEnv())
    with group as denv:
        run, _ = setup_run(cfg, denv, device)
        with run.runlog:
            run.nets.bare.train()
            batches = iter(data.train_loader(run.cfg, run.data.manifest, cfg.data.root, 0, 1, epoch=0,
                                             endless=True))
            work, metered = trainer_work(run, batches, StepMeter(device))
            rate = timed_rate(work, "images/s", warmup=s.warmup, calls=s.steps, repeats=s.repeats,
                              sync=measure.device_sync(device))
            del batches
        memory = measure.memory(device)
    return rate, memory, metered()


def measure_train(s: TrainSettings, progress: Progress = quiet) -> dict[str, Any]:
    """The trainer's step against the bare loop (the module's docstring)."""
    device = measure.resolve_device(s.device)
    if s.compile:  # auto resolved as the trainer resolves it on one device, so the tables name the mode
        s = dataclasses.replace(s, compile_mode=compile_mode(s.compile_mode, device, 1))
    env = measure.environment(device)
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
        progress(f"trainer (setup_run + train_step{', DDP over 1 rank' if s.ddp else ''}): {s.warmup} warm-up + "
                 f"{s.repeats} x {s.steps} steps ...")
        trainer, trainer_memory, metered = _trainer_loop(s, cfg, device)
        progress(f"  trainer: {trainer.median:,.2f} images/s (load {load_average()})")
        measure.reset_memory(device)
    # The peak again after the loops, so that a change of load during them shows in its min and max.
    after, _ = peak_flops(device, amp_dtype or torch.float32, repeats=max(3, s.repeats))
    peak = peak + after
    progress(f"  peak again: {after.median / 1e9:,.0f} GFLOP/s (load {load_average()})")
    best = max(peak.values)  # a peak is the best the device did in this run

    per_image = flops / s.batch
    env["load_average_end"] = load_average()
    return {
        "env": env,
        "settings": {**dataclasses.asdict(s), "dtype": dtype_name,
                     "model": f"unet width {s.width} depth {s.depth}, {classes.num_classes} classes"},
        "trainer": {"rate": trainer.as_dict(), "memory": trainer_memory, "metered_steps": metered},
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


def _compiled(compile: bool, mode: str) -> str:
    return f"compiled ({mode})" if compile else "eager"


def render(r: dict[str, Any]) -> str:
    """The console table."""
    s, dev = r["settings"], measure.device_kind(r)
    title = (f"bench train: {s['model']}, {s['batch']} x {s['size']}^2, {s['dtype']}, "
             f"{'channels_last' if s['channels_last'] else 'NCHW'}, {_compiled(s['compile'], s['compile_mode'])}, "
             f"{s['device']}; {s['warmup']} warm-up + {s['repeats']} x {s['steps']} steps")
    rows = [("trainer (train_step, real loader" + (", DDP 1 rank)" if s["ddp"] else ")"), r["trainer"]["rate"]),
            ("bare loop (in-memory batches)", r["bare"]["rate"])]
    lines = measure.table(title, "images/s", rows, digits=2)
    peak = r["peak"]["rate"]
    lines.append(f"  peak {peak['max'] / 1e9:,.0f} GFLOP/s (max of {len(peak['values'])} blocks before and after the "
                 f"loops; median {peak['median'] / 1e9:,.0f}, min {peak['min'] / 1e9:,.0f}): {r['peak']['what']}")
    lines.append(measure.env_line(r["env"]))
    lines.append(measure.ratio("trainer / bare", r["overhead_ratio"], dev, "overhead_ratio",
                               "images/s, same model and batch"))
    lines.append(measure.ratio("MFU (trainer)", r["mfu"], dev, "mfu",
                               f"{r['flops_per_step'] / 1e9:,.1f} GFLOP/step x steps/s / peak"))
    lines.append(measure.ratio("MFU (bare loop)", r["mfu_bare"], dev, "", "the same, bare loop"))
    lines.append(f"  peak memory: trainer {r['trainer']['memory']['peak_mib']:,.0f} MiB, bare "
                 f"{r['bare']['memory']['peak_mib']:,.0f} MiB ({r['trainer']['memory']['what']})")
    return "\n".join(lines)
