"""`bench goodput`: the demo run end to end, and where its wall time went.

Packs the procedural dataset as the demo does (480 samples of 64 px, `seg_dist.pack.pack_synthetic`) into a
temporary folder (or takes `--data`), trains `configs/default.yaml` on it with 2 CPU processes through
torchrun (`python -m torch.distributed.run --standalone`), and reads the run's `goodput.json`: goodput =
(images trained / wall time) / the steps' own rate, beside the start-up, validation, checkpoints, data waits
and the rest. The wall time is rank 0's process, from its own start (/proc/self/stat) to the end of
training; torchrun's start-up before it and the processes' exit after it are outside, and the command's own
seconds are shown beside it.

Target (printed, never asserted; issue 22): goodput >= 0.95 for the demo on CPU, >= 0.85 on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from seg_dist.errors import RunFailed
from seg_dist.runlog import GOODPUT_FILE, GOODPUT_PARTS

from . import measure
from .measure import Progress, quiet

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"cpu": 0.95, "cuda": 0.85}


@dataclass
class GoodputSettings:
    data: str | None = None  # a shard folder (default: the demo's synthetic set, packed into a temporary folder)
    procs: int = 2
    config: str = "configs/default.yaml"
    device: str = "cpu"
    samples: int = 480  # the synthetic set, as the demo packs it
    size: int = 64
    overrides: tuple[str, ...] = field(default_factory=tuple)


def train_command(s: GoodputSettings, root: str, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={s.procs}",
            "-m", "seg_dist.train", "--config", s.config, f"data.root={root}", f"run.dir={run_dir}",
            f"train.device={s.device}", "train.resume=never", "logging.progress=false", *s.overrides]


def measure_goodput(s: GoodputSettings, progress: Progress = quiet) -> dict[str, Any]:
    """One run of the command; its goodput.json, the log lines that report it and where it ran."""
    env_info = measure.environment(torch.device(s.device))
    with tempfile.TemporaryDirectory(prefix="seg_dist_goodput_") as tmp:
        root = s.data
        if root is None:
            from seg_dist.pack import pack_synthetic

            root = str(Path(tmp) / "synth")
            progress(f"packing {s.samples} synthetic {s.size} px samples into {root}")
            pack_synthetic(root, n=s.samples, size=s.size, workers=min(4, measure.cores()))
        run_dir = Path(tmp) / "run"
        command = train_command(s, root, run_dir)
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, measure.cores() // s.procs))}
        progress(" ".join(command[1:]))
        t0 = time.perf_counter()
        out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        command_s = time.perf_counter() - t0
        output = out.stdout + out.stderr
        if out.returncode != 0:
            raise RunFailed(f"seg_dist.train exited with {out.returncode}:\n{output[-3000:]}")
        goodput = json.loads((run_dir / GOODPUT_FILE).read_text())
    env_info["load_average_end"] = measure.load_average()
    lines = [line for line in output.splitlines() if "first step after" in line or "] goodput " in line]
    return {"settings": asdict(s), "command_s": command_s, "goodput": goodput, "log": lines,
            "target": TARGETS.get(s.device, TARGETS["cuda"]), "env": env_info}


def render(r: dict[str, Any]) -> str:
    """The console table."""
    s, g, target = r["settings"], r["goodput"], r["target"]
    verdict = "met" if g["goodput"] >= target else f"missed by {1 - g['goodput'] / target:.0%}"
    data = s["data"] or f"{s['samples']} synthetic {s['size']} px samples"
    lines = [f"bench goodput: {s['config']} on {data}, "
             f"{s['procs']} processes ({s['device']}), {g['steps']} steps of {g['images'] // max(1, g['steps'])} "
             f"images", measure.env_line(r["env"]),
             f"  goodput {g['goodput']:.3f}   target >= {target}: {verdict}",
             f"  images/s: whole run {g['images_per_s']:.1f}, the steps' own {g['step_images_per_s']:.1f}",
             f"  wall time {g['wall_s']:.1f} s (rank 0, from {g['wall_from']}); the command {r['command_s']:.1f} s",
             "  where the wall time went       seconds   fraction",
             f"    steps                       {g['steps_s']:8.1f}   {g['goodput']:7.1%}"]
    lines += [f"    {part.replace('_', ' '):<28}{g['seconds'][part]:8.1f}   {g['fractions'][part]:7.1%}"
              for part in GOODPUT_PARTS]
    lines.append("  start-up to the first step's end: " + ", ".join(f"{name} {seconds:.1f} s"
                                                               for name, seconds in g["startup_stages"].items()))
    return "\n".join(lines)
