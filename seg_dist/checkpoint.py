"""Checkpoints: rank 0 writes atomically, every rank reads with `weights_only=True`.

A checkpoint holds only plain data and tensors (the config as a dict, not a dataclass), so it loads
in a fresh process without unpickling arbitrary objects.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import dataclasses
import io
import logging
import pickle
import platform
import re
import threading
import time
import traceback
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import atomic
from .config import Config, ConfigError, load_config_dict
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalization
from .errors import UserError
from .models import build_model
from .shards import FULL_SCALE, ImageSpec

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
_SNAPSHOT = re.compile(r"epoch\d+-step(\d+)\.pt$")
# What `load_model` rebuilds a model from, and what a resumed run needs besides (the trainer writes both).
MODEL_KEYS = ("model", "config", "num_classes", "ignore_index", "class_names", "global_step")
RESUME_KEYS = (*MODEL_KEYS, "optimizer", "scheduler", "scaler")

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A file that is not a loadable checkpoint (a RuntimeError too, as torch's own load errors are)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under DDP and torch.compile, whose state dict has no `module.`/`_orig_mod.`."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def versions() -> dict[str, str]:
    import numpy

    import seg_dist

    return {
        "seg_dist": seg_dist.__version__,
        "torch": str(torch.__version__),
        "numpy": str(numpy.__version__),
        "python": platform.python_version(),
        "cuda": str(torch.version.cuda),
    }


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Atomic: a crash leaves the previous file or the new one, never a torn checkpoint."""
    atomic.write_bytes(path, _serialised(state).getbuffer())


def _serialised(state: dict[str, Any]) -> io.BytesIO:
    # In memory first, so a full disk is found before a byte is written, with the size needed.
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf


def copy(src: str | Path, dst: str | Path) -> None:
    """`dst` is whole or absent (a hard link where the file system allows)."""
    atomic.copy(src, dst)


def to_host(state: Any) -> Any:
    """A copy of `state` that training may go on mutating: every tensor copied to the CPU (off the device and
    off the live parameters and optimiser moments), containers rebuilt, other values deep-copied. A tensor
    that appears twice is copied once, so torch.save still stores it once."""
    copies: dict[int, torch.Tensor] = {}

    def snap(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in copies:
                copies[id(obj)] = obj.detach().to("cpu", copy=True)
            return copies[id(obj)]
        if isinstance(obj, dict):
            items = [(k, snap(v)) for k, v in obj.items()]
            out = OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
            if hasattr(obj, "_metadata"):  # a module state dict's per-module versions, which load_state_dict reads
                out._metadata = _copy.deepcopy(obj._metadata)  # type: ignore[attr-defined]
            return out
        if isinstance(obj, (list, tuple)):
            items = [snap(v) for v in obj]
            return items if isinstance(obj, list) else tuple(items)
        return _copy.deepcopy(obj)

    return snap(state)


class AsyncWriter:
    """Checkpoints written by a background thread, one at a time, in the order they were handed over.

    `submit` takes a state the caller no longer mutates (see `to_host`), waits for the previous write, and
    returns at once; the thread serialises it, writes it atomically (`save`) and then runs `after` (copies
    of the new file, pruning). So at most one state is held: its host copy, and while it is serialised its
    bytes too, about twice the checkpoint's size at the peak. An error in the thread (a full disk:
    `atomic.DiskFull`) is raised by the next `submit` or `wait`, in the caller's thread; the file it was
    writing is left as it was.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.submitted = 0
        self.writes = 0  # completed
        self.write_seconds = 0.0  # in the thread, all writes: serialisation, write, fsync, rename, `after`
        self.last_write_seconds = 0.0
        self.wait_seconds = 0.0  # the caller blocked on a previous write (in `submit` and `wait`)

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, path: str | Path, state: dict[str, Any], after: Callable[[], None] | None = None) -> None:
        """Write `state` to `path` in the background, then call `after` there."""
        self.wait()
        self.submitted += 1
        job = [state]  # the thread drops its reference once serialised, freeing the host copy
        # Not a daemon: an interpreter that exits without `wait` (an interrupt) still finishes the write.
        self._thread = threading.Thread(target=self._write, args=(Path(path), job, after), name="checkpoint-writer")
        self._thread.start()

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error, if it failed."""
        if self._thread is not None:
            started = time.perf_counter()
            self._thread.join()
            self.wait_seconds += time.perf_counter() - started
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write(self, path: Path, job: list[dict[str, Any]], after: Callable[[], None] | None) -> None:
        started = time.perf_counter()
        try:
            atomic.write_bytes(path, _serialised(job.pop()).getbuffer())
            if after is not None:
                after()
        except BaseException as e:  # handed to the caller's thread, which raises it
            cause: BaseException | None = e
            while cause is not None:  # keep the traceback's lines, not its frames' locals (the state's bytes)
                traceback.clear_frames(cause.__traceback__)
                cause = cause.__cause__ or cause.__context__
            self._error = e
            return
        self.last_write_seconds = time.perf_counter() - started
        self.write_seconds += self.last_write_seconds
        self.writes += 1


def load(path: str | Path, map_location: str | torch.device = "cpu", require: Sequence[str] = ()) -> dict[str, Any]:
    """The checkpoint at `path`; a CheckpointError naming the file if it is missing, unreadable, or lacks
    any of the `require`d keys (a plain state_dict or another program's file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message goes on to suggest unpickling it anyway: not here
        if not zipfile.is_zipfile(path):  # torch.save writes zip archives: this is a torn or foreign file
            raise CheckpointError(f"{path}: cannot load checkpoint (damaged, or not written by torch.save)") from e
        raise CheckpointError(f"{path}: holds Python objects besides tensors and plain data, which seg_dist does "
                              "not load (a file from another program, or altered); seg_dist's checkpoints hold "
                              "only tensors and plain data") from e
    except Exception as e:  # a torn or foreign file: bad input, not a bug
        first_line = (str(e).strip().splitlines() or [""])[0]  # torch's weights-only errors run to a page
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(e).__name__}: {first_line})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a seg_dist checkpoint (holds a {type(state).__name__}, not a dict)")
    missing = [k for k in require if k not in state]
    if missing:
        what = ("a plain state_dict (parameter name -> tensor)"
                if state and all(isinstance(v, torch.Tensor) for v in state.values()) else "not a seg_dist checkpoint")
        raise CheckpointError(f"{path}: {what}, lacks {', '.join(missing)}; give a checkpoint that "
                              "`python -m seg_dist.train` wrote (run.dir/checkpoints/*.pt)")
    return state


def resume_path(resume: str, run_dir: str | Path) -> Path | None:
    """`auto`: last.pt in the run directory if there is one; `never`: none; else the given file."""
    if resume == "never":
        return None
    if resume == "auto":
        last = Path(run_dir) / CHECKPOINT_DIR / LAST
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"train.resume={resume}: checkpoint not found (auto, never or an existing .pt file)")
    return path


def load_for_resume(resume: str, run_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint `train.resume` points at, loaded on the CPU; None for a fresh start.

    With `auto`, an unreadable last.pt (a node died while copying it to a shared file system, a full
    quota) falls back to the newest readable step snapshot, with a warning naming both; an explicit
    path that cannot be read stays an error.
    """
    path = resume_path(resume, run_dir)
    if path is None:
        return None
    if resume != "auto":
        return path, load(path, require=RESUME_KEYS)
    folder = Path(run_dir) / CHECKPOINT_DIR
    failed: list[str] = []
    for candidate in [path, *reversed(_snapshots(folder))]:
        try:
            state = load(candidate, require=RESUME_KEYS)
        except CheckpointError as e:
            failed.append(str(e))
            continue
        if failed:
            log.warning("resuming from %s instead: %s", candidate, "; ".join(failed))
        return candidate, state
    raise CheckpointError(f"no readable checkpoint in {folder}: {'; '.join(failed)}")


def _snapshots(folder: Path) -> list[Path]:
    """Step snapshots, oldest first."""
    snaps = [(int(m.group(1)), p) for p in folder.glob("epoch*-step*.pt") if (m := _SNAPSHOT.match(p.name))]
    return [p for _, p in sorted(snaps)]


def snapshot_name(epoch: int, step: int) -> str:
    return f"epoch{epoch:04d}-step{step:08d}.pt"


def remove_temporaries(folder: str | Path) -> None:
    """Delete the partial files of writes that were killed (up to a checkpoint's size each). Only for the
    holder of the run directory's lock: no other writer can be alive in `folder`."""
    stale = atomic.temporaries(folder)
    size = 0
    for p in stale:
        with contextlib.suppress(OSError):
            size += p.stat().st_size
            p.unlink()
    if stale:
        log.info("removed %d partial checkpoint file(s) (%.1f MB) that a killed run left in %s", len(stale),
                 size / 1e6, folder)


def prune_snapshots(folder: str | Path, keep_last: int) -> None:
    """Keep the newest `keep_last` step snapshots; last.pt and best.pt are never touched."""
    snaps = _snapshots(Path(folder))
    for old in snaps[: max(0, len(snaps) - keep_last)]:
        old.unlink(missing_ok=True)


# What checkpoints from before the input was recorded take: 8-bit RGB, normalised with ImageNet's constants.
_OLD_INPUT = Normalization(3, "uint8", IMAGENET_MEAN, IMAGENET_STD, "imagenet (old checkpoint)")


@dataclass
class TrainedModel:
    """A checkpoint's model with what is needed to use it: no training config file required."""

    model: nn.Module  # in eval mode
    cfg: Config  # the config it was trained with, plus any overrides
    num_classes: int
    ignore_index: int
    class_names: list[str]
    global_step: int
    train_crop: tuple[int, int] | None = None  # (H, W) of the training crops; None in older checkpoints
    max_size: int | None = None  # the packing scale (pack --max-size); None: packed as given, or an older checkpoint
    palette: list[list[int]] | None = None  # [r, g, b] per class as the run drew them; None in older checkpoints
    train_mean_hw: tuple[float, float] | None = None  # the train split's mean frame as packed; None if not stored
    # What the model takes: channels, pixel type and normalisation (`input_contract`); cfg.data.mean/std and
    # cfg.model.in_channels agree with it.
    input: Normalization = _OLD_INPUT
    alpha: bool = False  # trained on images packed with --keep-alpha: decode inputs with their alpha channel
    # pack --tile of the training data ({"size", "overlap", "drop_empty"}, the manifest's `tiling`); None: the
    # model saw whole images (or an older checkpoint)
    tiling: dict[str, Any] | None = None

    @property
    def image(self) -> ImageSpec:
        """The images the model takes, as `shards.conform_image` checks them."""
        return ImageSpec(self.input.channels, self.input.dtype, self.alpha)


def input_contract(state: dict[str, Any], cfg: Config, path: str | Path = "checkpoint") -> Normalization:
    """What the checkpoint's model takes: its `input` entry (channels, dtype, mean, std, as training
    resolved them); for checkpoints written before it, channels from `model.in_channels` (0 or missing: 3),
    8-bit pixels, and `data.mean`/`data.std` (ImageNet's constants where unset, as those runs trained). A
    `data.mean`/`data.std` given (the stored config's, or an override) wins over the entry's; a count
    that does not fit the channels is a CheckpointError naming the file and the key."""
    entry = state.get("input")
    if isinstance(entry, dict) and isinstance(entry.get("channels"), int) and entry.get("dtype") in FULL_SCALE:
        channels, dtype, source = int(entry["channels"]), str(entry["dtype"]), str(entry.get("source", "checkpoint"))
        mean, std = entry.get("mean"), entry.get("std")
    elif entry is not None:
        raise CheckpointError(f"{path}: its 'input' entry is not what seg_dist writes (channels, dtype, mean, std): "
                              f"{entry!r}")
    else:
        channels, dtype, source = cfg.model.in_channels or 3, "uint8", "config (old checkpoint)"
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (None, None)
    if cfg.data.mean is not None and cfg.data.std is not None:
        if (list(cfg.data.mean), list(cfg.data.std)) != (list(mean or []), list(std or [])):
            source = "data.mean/std"
        mean, std = cfg.data.mean, cfg.data.std
    if mean is None or std is None:
        raise CheckpointError(f"{path}: no normalisation for its {channels}-channel input (no 'input' entry, "
                              "data.mean/std unset); give data.mean=[...] data.std=[...] as trained")
    if len(mean) != channels or len(std) != channels:
        raise CheckpointError(f"{path}: data.mean has {len(mean)} and data.std {len(std)} values, but the model "
                              f"takes {channels} channels; give one value per channel")
    return Normalization(channels, dtype, tuple(float(m) for m in mean), tuple(float(s) for s in std), source)


def load_model(path: str | Path, device: torch.device, overrides: Sequence[str] = ()) -> TrainedModel:
    """The model stored in a checkpoint, on `device`, with the config it was trained with."""
    state = load(path, map_location=device, require=MODEL_KEYS)
    try:
        cfg = load_config_dict(state["config"], list(overrides))
    except ConfigError as e:  # the stored config (or an override) names the key; say which checkpoint
        raise CheckpointError(f"{path}: {e}") from None
    norm = input_contract(state, cfg, path)
    if cfg.model.in_channels not in (0, norm.channels):
        raise CheckpointError(f"{path}: model.in_channels={cfg.model.in_channels}, but the model was trained on "
                              f"{norm.channels}-channel {norm.dtype} images")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mean=list(norm.mean), std=list(norm.std)),
                              model=dataclasses.replace(cfg.model, in_channels=norm.channels))
    model = build_model(cfg.model.without_pretrained(), state["num_classes"]).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # weights of another shape than the stored config builds: an edited or foreign file
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: its weights do not fit its model.* config ({first_line})") from None
    model.eval()
    crop, mean_hw = state.get("train_crop"), state.get("train_mean_hw")
    entry = state.get("input")
    return TrainedModel(model, cfg, state["num_classes"], state["ignore_index"], list(state["class_names"]),
                        state["global_step"], tuple(crop) if crop else None, state.get("max_size"),
                        state.get("palette"), tuple(mean_hw) if mean_hw else None, norm,
                        bool(entry.get("alpha", False)) if isinstance(entry, dict) else False,
                        _tiling(state.get("tiling"), path))


def _tiling(entry: Any, path: str | Path) -> dict[str, Any] | None:
    """The checkpoint's `tiling` (the training data's pack --tile) as a checked dict; None where it has none."""
    if entry is None:
        return None
    if (not isinstance(entry, dict) or not all(isinstance(entry.get(k), int) for k in ("size", "overlap"))
            or not 0 <= entry["overlap"] < entry["size"]):
        raise CheckpointError(f"{path}: its 'tiling' entry is not what seg_dist writes (size, overlap with "
                              f"0 <= overlap < size): {entry!r}")
    return {"size": entry["size"], "overlap": entry["overlap"], "drop_empty": bool(entry.get("drop_empty", False))}
