"""Shared fixtures: tiny packed synthetic datasets and a torchrun helper."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The suite is about behaviour on CPU with gloo (what CI has). On a GPU machine, 2 ranks would each
# want a GPU of their own; hide CUDA unless asked, for this process and every process it starts.
if not os.environ.get("SEG_DIST_TEST_CUDA"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

from seg_dist import pack

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 synthetic 32 px samples (64 train, 16 val) in uneven shards of 12."""
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    pack.pack_synthetic(out, n=80, size=32, samples_per_shard=12, workers=1)
    return out


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
