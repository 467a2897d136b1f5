"""The product's test helpers: tiny configs, real processes (torchrun, local groups), checkpoints. CUDA hiding
and the `tiny_shards` fixture are in the repository's conftest.py, shared with the lab's tests.

Not a conftest.py: processes the tests spawn find these functions by module name, and `conftest` would
name the repository's conftest.py there."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    """A model and schedule small enough for 2 CPU processes to train in seconds."""
    return [
        f"data.root={shards}",
        f"run.dir={run_dir}",
        "data.image_size=32",
        "data.workers=0",
        "model.width=8",
        "model.depth=3",
        "train.batch_size=4",
        "train.epochs=3",
        "optim.lr=3e-3",
        "schedule.warmup_iters=0",
        "logging.progress=false",
        "logging.log_every=2",
        "logging.overlays=2",
        "train.val_every=1",  # tests count validations; auto's cadence follows the machine's speed
        *extra,
    ]


def torchrun(
    nproc: int, module: str, *args: str, timeout: float = 300, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    cmd = torchrun_cmd(nproc, module, *args)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env or child_env())
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def torchrun_cmd(nproc: int, module: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *args,
    ]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_port() -> int:
    """A TCP port nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(array: np.ndarray, palette_mode: bool = False) -> bytes:
    """PNG file bytes of a uint8 or uint16 array (other integers are cast to uint8); `palette_mode` stores a
    mask as a palette PNG (index = class)."""
    from seg_dist.visualize import palette

    im = Image.fromarray(array if array.dtype in (np.uint8, np.uint16) else array.astype(np.uint8))
    if palette_mode:
        im = im.convert("P")
        im.putpalette(palette(256).tobytes())
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# --- real processes: 2-rank training in-process, and torchrun process trees ---------------------------


def as_rank(rank: int, world: int, port: int) -> None:
    """The environment torchrun gives rank `rank` of `world` on this machine, for a spawned test process."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _train_rank(denv, device: torch.device, overrides: list[str], out: str) -> None:
    from seg_dist.config import load_config
    from seg_dist.trainer import train

    torch.set_num_threads(1)
    result = train(load_config(REPO / "configs" / "default.yaml", overrides), denv, device)
    torch.save({"model": result.model.state_dict(), "history": result.history, "step": result.global_step},
               f"{out}.{denv.rank}")


def spawn_train(world: int, overrides: list[str], tmp_path: Path) -> list[dict]:
    """Train with `world` real gloo processes (distributed.spawn_local_group); each rank's weights and history."""
    from seg_dist import distributed

    out = str(tmp_path / "rank")
    distributed.spawn_local_group(world, _train_rank, (overrides, out))
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]


def descendants(pid: int) -> list[int]:
    """Child processes, read from /proc (torchrun starts workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rank_pid(root: int, rank: int) -> int | None:
    """The pid of torchrun's worker with global rank `rank` under process `root`."""
    for pid in descendants(root):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"GROUP_RANK=0" in env:
            return pid
    return None


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything under it, if still running (no chance to clean up)."""
    import contextlib
    import signal

    if proc.poll() is None:
        for child in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        proc.wait()


def last_step(path: Path) -> int:
    """The global step of a checkpoint, -1 while it is missing or being replaced."""
    from seg_dist import checkpoint

    try:
        return checkpoint.load(path)["global_step"]
    except (FileNotFoundError, RuntimeError):
        return -1


def save_tiny_checkpoint(path: Path, model_cfg, class_names: list[str], mean, std, global_step: int) -> Path:
    """A model saved with the keys the trainer writes, BatchNorm statistics moved off 0/1 so that
    an export or inference that ignored them would show."""
    from seg_dist import checkpoint
    from seg_dist.config import Config, to_dict
    from seg_dist.models import build_model

    cfg = Config()
    cfg.model = model_cfg
    cfg.data.mean, cfg.data.std = mean, std
    torch.manual_seed(0)
    model = build_model(cfg.model, len(class_names))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    checkpoint.save(path, {"model": model.state_dict(), "config": to_dict(cfg), "num_classes": len(class_names),
                           "ignore_index": 255, "class_names": class_names, "global_step": global_step})
    return path
