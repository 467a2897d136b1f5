"""`bench scaling`: the trainer in 1 process against N processes at the same global batch.

Real process groups (gloo on CPU, NCCL on GPUs) started by `distributed.spawn_local_group`; every rank
runs the trainer's own step (`bench_train.trainer_work`) on its share of each global batch. Reports global
images/s of both and the efficiency, N-process / 1-process.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seg_dist import data, distributed, precision
from seg_dist.config import Config
from seg_dist.errors import UserError
from seg_dist.trainer import StepMeter, setup_run

from . import measure
from .bench_train import StepSettings, train_config, trainer_work
from .measure import Progress, Sample, load_average, quiet, timed_rate


@dataclass
class ScalingSettings(StepSettings):
    procs: int = 2
    width: int = 16
    size: int = 128
    batch: int = 8  # global: every world size trains on the same images per step
    channels_last: bool = False  # no gain at small widths on CPU
    pin_cpu_ranks: bool = True  # train.pin_cpu_ranks

    @classmethod
    def for_device(cls, device: torch.device, root: str, **given: Any) -> ScalingSettings:
        defaults: dict[str, Any] = {"device": device.type}
        if device.type == "cuda":
            procs = given.get("procs") or min(2, torch.cuda.device_count())
            defaults.update(width=64, size=256, batch=16 * procs, channels_last=True,
                            workers=max(0, measure.cores() // procs - 2))
        return cls(root=root, **{**defaults, **{k: v for k, v in given.items() if v is not None}})


def _rank(denv: distributed.DistEnv, device: torch.device, cfg: Config, s: ScalingSettings, out: str) -> None:
    """One rank of a scaling run; rank 0 writes the figures to `out`."""
    if s.workers > 0:  # spawned ranks would otherwise spawn (not fork) their loader workers: seconds each
        multiprocessing.set_start_method("fork", force=True)
    distributed.share_cpu_threads(denv, device, pin=s.pin_cpu_ranks)  # as seg_dist.train
    run, _ = setup_run(cfg, denv, device)
    with run.runlog:
        run.nets.bare.train()
        batches = iter(data.train_loader(run.cfg, run.data.manifest, cfg.data.root, denv.rank, denv.world_size,
                                         epoch=0, endless=True))
        work, metered = trainer_work(run, batches, StepMeter(device))
        cuda_sync = measure.device_sync(device)

        def sync() -> None:
            cuda_sync()
            distributed.barrier()  # every rank has finished its block

        rate = timed_rate(work, "images/s", warmup=s.warmup, calls=s.steps, repeats=s.repeats, sync=sync)
        del batches
    if denv.is_main:
        Path(out).write_text(json.dumps({"rate": rate.as_dict(), "threads": torch.get_num_threads(),
                                         "per_rank_batch": run.cfg.train.batch_size, "metered_steps": metered(),
                                         "memory": measure.memory(device)}))


def unavailable(device: torch.device, procs: int) -> str | None:
    """Why `procs` processes cannot be compared with 1 here, or None."""
    if procs < 2:
        return f"--procs {procs}: scaling compares 1 process with at least 2"
    if device.type == "cuda" and torch.cuda.device_count() < procs:
        return f"{procs} processes need {procs} GPUs; {torch.cuda.device_count()} visible"
    return None


def measure_scaling(s: ScalingSettings, progress: Progress = quiet) -> dict[str, Any]:
    """1 process and `procs` processes at the same global batch (the module's docstring)."""
    device = measure.resolve_device(s.device)
    why = unavailable(device, s.procs)
    if why:
        raise UserError(why)
    if s.batch % s.procs:
        raise UserError(f"global batch {s.batch} does not split over {s.procs} processes: pass a multiple of "
                        f"{s.procs} (--batch)")
    env = measure.environment(device)
    amp_dtype = precision.resolve_amp(s.amp, device)
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="seg_dist_bench_scaling_") as tmp:
        for world in (1, s.procs):
            progress(f"bench scaling: {world} process(es) x batch {s.batch // world} (global {s.batch}), "
                     f"width {s.width}, {s.size}^2, {precision.name(amp_dtype)}, {device.type} ...")
            cfg = train_config(s, str(Path(tmp, f"run{world}")), s.batch // world)
            out = str(Path(tmp, f"result{world}.json"))
            distributed.spawn_local_group(world, _rank, (cfg, s, out), device=device.type)
            results[world] = json.loads(Path(out).read_text())
            progress(f"  {world} process(es), {results[world]['threads']} thread(s) each: "
                     f"{results[world]['rate']['median']:,.2f} images/s (load {load_average()})")
    one, many = (Sample.from_dict(results[w]["rate"]) for w in (1, s.procs))
    env["load_average_end"] = load_average()
    return {
        "env": env,
        "settings": {**dataclasses.asdict(s), "dtype": precision.name(amp_dtype),
                     "backend": distributed.backend_for(device)},
        "runs": {str(w): {**r, "steps_per_s": Sample.from_dict(r["rate"]).median / s.batch}
                 for w, r in results.items()},
        "efficiency": many.median / one.median,
        "efficiency_spread": max(one.spread, many.spread),
    }


def render(r: dict[str, Any]) -> str:
    """The console table."""
    s, dev = r["settings"], measure.device_kind(r)
    title = (f"bench scaling ({s['backend']}): global batch {s['batch']}, width {s['width']}, {s['size']}^2, "
             f"{s['dtype']}, {s['device']}; {s['warmup']} warm-up + {s['repeats']} x {s['steps']} steps")
    rows = [(f"{w} process(es) x {run['per_rank_batch']}, {run['threads']} thread(s) each", run["rate"])
            for w, run in r["runs"].items()]
    lines = [*measure.table(title, "global images/s", rows, digits=2), measure.env_line(r["env"])]
    lines.append("  steps/s: " + ", ".join(f"{w} process(es) {run['steps_per_s']:.3f}" for w, run in r["runs"].items()))
    lines.append(measure.ratio("efficiency", r["efficiency"], dev, "efficiency",
                               f"{s['procs']}-process global images/s / 1-process images/s"))
    return "\n".join(lines)
