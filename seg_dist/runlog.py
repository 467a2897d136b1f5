"""Run logs: console lines with the rank prefixed; TensorBoard, metrics.jsonl and overlays on rank 0; where a
run's wall time went (`StartClock`, `TimeLedger`, `goodput`)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import atomic
from .visualize import confusion_matrix_figure, save_png

STOP_MARKER = "STOPPED"  # in the run directory while a run is stopped on request (not finished)
GOODPUT_FILE = "goodput.json"  # in the run directory: where the last process's wall time went
HANDLER_NAME = "seg_dist"  # how `cli.report` knows that errors should go through this handler


class _Stdout(logging.StreamHandler):
    """Writes to `sys.stdout` as it is when a record is written, not as it was when the handler was made, so
    a redirected or replaced stdout (a notebook cell, a test's capture) never gets a closed stream."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def setup_logging(rank: int, level: int = logging.INFO) -> logging.Logger:
    """Every record carries `[rank N]`, so interleaved output from many ranks stays readable."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = _Stdout()
    handler.set_name(HANDLER_NAME)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    return logging.getLogger("seg_dist")


class RunLog:
    """TensorBoard scalars/images/text and one JSON line per validation; a no-op off rank 0.

    `later` runs work (drawing and encoding a validation's pictures) on one writer thread, in order, so the
    ranks' steps do not wait for rank 0's PNGs; `close` waits for it, and a failure there is raised at the
    next `later`, `wait` or `close`."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True,
                 resumed_at: int | None = None) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run supersedes what the interrupted one logged after its checkpoint, so curves
            # continue without a gap and without a doubled step range.
            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=resumed_at)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def image(self, tag: str, hwc_uint8: np.ndarray, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, hwc_uint8, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def jsonl(self, record: dict[str, Any], name: str = "metrics.jsonl") -> None:
        if self.enabled:
            with open(self.run_dir / name, "a") as f:
                f.write(json.dumps(record) + "\n")

    def validation(self, metrics: dict[str, Any], matrix: torch.Tensor, samples: int, class_names: list[str],
                   pictures: list[np.ndarray], epoch: int, step: int, train_loss: float) -> None:
        """Everything one validation leaves: scalars, per-class IoU, confusion matrix, overlays, a JSON line."""
        if not self.enabled:
            return
        m = metrics
        self.scalars({"val/loss": m["loss"], "val/miou": m["miou"], "val/pixel_accuracy": m["pixel_accuracy"],
                      "val/mean_dice": m["mean_dice"]}, step)
        self.scalars({f"val_iou/{name}": iou for name, iou in zip(class_names, m["per_class_iou"], strict=True)
                      if not math.isnan(iou)}, step)
        if self.tb is not None:
            self.image("val/confusion_matrix", confusion_matrix_figure(matrix, class_names), step)
        for i, picture in enumerate(pictures):
            self.image(f"val_overlay/{i}", picture, step)
        self.jsonl({
            "epoch": epoch, "step": step, "train_loss": train_loss, "val_loss": m["loss"], "miou": m["miou"],
            "pixel_accuracy": m["pixel_accuracy"], "mean_dice": m["mean_dice"],
            "per_class_iou": dict(zip(class_names, m["per_class_iou"], strict=True)),
            "samples": samples,
        })
        self.flush()

    def goodput(self, record: dict[str, Any], step: int) -> None:
        """The end-of-run split of the wall time: TensorBoard scalars under `goodput/` and RUN_DIR/goodput.json."""
        if not self.enabled:
            return
        self.scalars({"goodput/goodput": record["goodput"], "goodput/wall_s": record["wall_s"],
                      "goodput/images_per_s": record["images_per_s"],
                      "goodput/step_images_per_s": record["step_images_per_s"],
                      **{f"goodput/{k}_fraction": v for k, v in record["fractions"].items()},
                      **{f"goodput/{k}_s": v for k, v in record["seconds"].items()}}, step)
        atomic.write_text(self.run_dir / GOODPUT_FILE, json.dumps(record, indent=2) + "\n")
        self.flush()

    def overlays(self, pictures: list[np.ndarray]) -> None:
        """`overlays/val_NNN.png` in the run directory: the last validation's examples, and only those (a
        resumed run with fewer `logging.overlays` leaves no stale pictures from the earlier one)."""
        if self.enabled:
            folder = self.run_dir / "overlays"
            names = {f"val_{i:03d}.png" for i in range(len(pictures))}
            for old in folder.glob("val_*.png") if folder.is_dir() else ():
                if old.name not in names:
                    old.unlink(missing_ok=True)
            for i, picture in enumerate(pictures):
                save_png(folder / f"val_{i:03d}.png", picture)

    def later(self, fn: Callable[..., object], *args: object) -> None:
        """`fn(*args)` on the writer thread, after what was handed to it before."""
        if not self.enabled:
            return
        self._settle(block=False)
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="seg_dist-runlog")
        self._pending.append(self._writer.submit(fn, *args))

    def wait(self) -> None:
        """Until the writer thread has done all it was given; its first failure is raised here."""
        self._settle(block=True)

    def _settle(self, block: bool) -> None:
        pending, self._pending = self._pending, []
        failure = None
        for future in pending:
            if not block and not future.done():
                self._pending.append(future)
            elif future.exception() is not None and failure is None:
                failure = future.exception()
        if failure is not None:
            raise failure

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the run's own failure is the one to report
            self.close()
        except Exception as e:
            logging.getLogger("seg_dist").warning("run logs incomplete (%s: %s)", type(e).__name__, e)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            if self.tb is not None:
                self.tb.close()
                self.tb = None


# --- where the wall time went ---------------------------------------------------------------------

# The parts of the wall time that are not steps, in the order the end-of-run line gives them.
GOODPUT_PARTS = ("startup", "validation", "checkpoints", "data_wait", "rest")


def process_age() -> float | None:
    """Seconds since this process started, from /proc/self/stat's start time against /proc/uptime (both
    count from boot); None where there is no /proc (not Linux)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, counted after the command name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# Interpreter start-up and `import seg_dist` before seg_dist.train's first line take well under this.
PROCESS_START_SLACK_S = 60.0


@dataclass
class StartClock:
    """Where a run's wall time starts, and the start-up's stages as they end (`mark`), on time.perf_counter()."""

    origin: float  # time.perf_counter() at the start
    source: str  # what the start is, for the log and goodput.json
    marks: list[tuple[str, float]] = field(default_factory=list)  # (stage, perf_counter() at its end)

    @classmethod
    def now(cls, source: str = "the call of train()") -> StartClock:
        return cls(time.perf_counter(), source)

    @classmethod
    def for_command(cls, imported_at: float | None) -> StartClock:
        """The start of the command's process: its start time in /proc where the command's module was imported
        (`imported_at`, perf_counter()) as part of starting the process; else the import, else now.

        A process that imported the module long after it started (a notebook, a test session) or runs the
        command again (`imported_at` None) counts from the call instead: its start is not the command's.
        """
        now = time.perf_counter()
        if imported_at is None:
            return cls(now, "the call of seg_dist.train.main")
        age = process_age()
        if age is not None and 0 <= age - (now - imported_at) < PROCESS_START_SLACK_S:
            return cls(now - age, "process start (/proc/self/stat)")
        if now - imported_at < PROCESS_START_SLACK_S:
            return cls(imported_at, "import of seg_dist.train")
        return cls(now, "the call of seg_dist.train.main")

    def mark(self, stage: str) -> None:
        self.marks.append((stage, time.perf_counter()))

    def stages(self) -> list[tuple[str, float]]:
        """Each marked stage's seconds, from the origin on."""
        out, last = [], self.origin
        for stage, at in self.marks:
            out.append((stage, at - last))
            last = at
        return out


class TimeLedger:
    """Seconds per named part of a run. Parts nest: time spent in an inner part is the inner part's only."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self._open: list[list[Any]] = []  # [part, started, seconds taken by parts inside it]

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        frame: list[Any] = [name, time.perf_counter(), 0.0]
        self._open.append(frame)
        try:
            yield
        finally:
            self._open.pop()
            spent = time.perf_counter() - frame[1]
            self.seconds[name] += spent - frame[2]
            if self._open:
                self._open[-1][2] += spent

    def total(self) -> float:
        return sum(self.seconds.values())


def goodput(wall: float, steps: int, images_per_step: int, step_seconds: float, first_step: float,
            first_step_ended: float, before_first_step: float, parts: dict[str, float]) -> dict[str, Any]:
    """Goodput and where the rest of the wall time went, on one process's figures.

    `steps` were taken. The steps after the first took `step_seconds` inside the steps, data waits excluded.
    The first took `first_step` seconds, ending `first_step_ended` seconds after the origin with
    `before_first_step` seconds of `parts` before it; it counts as one step at the others' mean pace (or its
    own, if faster), and what it took beyond that (compile, the loader's start, the first batch) is start-up.
    The steps' rate is the images over those seconds, and goodput = (images / wall) / rate: the steps' share
    of the wall time. Start-up runs to the first step's end (without steps: all that `parts` do not hold);
    `parts` give validation, checkpoints and data waits; the rest is what no part measured (logging, stop
    checks, the loop).
    """
    images = steps * images_per_step
    first_counted = first_step
    if steps > 1 and step_seconds > 0:
        first_counted = min(first_step, step_seconds / (steps - 1))
    productive = step_seconds + first_counted if steps else 0.0
    rate = images / productive if productive > 0 else 0.0
    seconds = {"startup": 0.0, "validation": parts.get("validation", 0.0),
               "checkpoints": parts.get("checkpoints", 0.0), "data_wait": parts.get("data_wait", 0.0)}
    if steps:
        seconds["startup"] = first_step_ended - before_first_step - first_counted
        seconds["rest"] = wall - productive - sum(seconds.values())
    else:  # no step: all but the measured parts went into getting there
        seconds["startup"] = wall - sum(seconds.values())
        seconds["rest"] = 0.0
    wall = max(wall, 1e-9)
    return {"images": images, "steps": steps, "wall_s": wall, "images_per_s": images / wall,
            "step_images_per_s": rate, "goodput": productive / wall, "steps_s": productive,
            "seconds": seconds, "fractions": {k: v / wall for k, v in seconds.items()}}


def goodput_line(g: dict[str, Any], covers: str) -> str:
    """The end-of-run line."""
    parts = ", ".join(f"{name.replace('_', ' ')} {g['seconds'][name]:.1f} s ({g['fractions'][name]:.1%})"
                      for name in GOODPUT_PARTS)
    return (f"goodput {g['goodput']:.3f} ({covers}): {g['images']:,} images in {g['wall_s']:.1f} s, "
            f"{g['images_per_s']:.1f} images/s against the steps' own {g['step_images_per_s']:.1f}; "
            f"the rest of the wall time: {parts}")


def write_stop_marker(run_dir: str | Path, info: dict[str, Any]) -> None:
    """`RUN_DIR/STOPPED`: tells a wrapper script (launch/slurm.sbatch) that the run stopped early, not finished."""
    atomic.write_text(Path(run_dir) / STOP_MARKER, json.dumps(info) + "\n")


def clear_stop_marker(run_dir: str | Path) -> None:
    (Path(run_dir) / STOP_MARKER).unlink(missing_ok=True)


class LineProgress:
    """tqdm's interface for logs that are not a terminal (a SLURM .out file): one plain line every
    `every` percent instead of a carriage-return update per step."""

    def __init__(self, total: int, desc: str, initial: int = 0, every: float = 10.0) -> None:
        self.total, self.desc, self.n, self.every = total, desc, initial, every
        self.postfix = ""
        self._next = self._threshold(initial)
        self.started = time.perf_counter()

    def _threshold(self, n: int) -> int:
        step = max(1, math.ceil(self.total * self.every / 100))
        return (n // step + 1) * step

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next or self.n == self.total:
            self._next = self._threshold(self.n)
            pct = 100 * self.n / max(1, self.total)
            logging.getLogger("seg_dist.progress").info(
                "%s: %3.0f%% (%d/%d) %.0fs%s", self.desc, pct, self.n, self.total,
                time.perf_counter() - self.started, f" {self.postfix}" if self.postfix else "")

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NoProgress(LineProgress):
    def update(self, n: int = 1) -> None:
        self.n += n


class ShareProgress:
    """A bar over all ranks' work driven by one rank's share: it shows `total` (the whole split) and each
    `update(n)` of this rank's `share` advances it by the all-ranks estimate n * total / share, so it ends
    at exactly `total` when the share is done. Ranks' shares differ by at most one sample."""

    def __init__(self, bar: Any, total: int, share: int) -> None:
        self.bar, self.total, self.share = bar, total, share
        self.done = 0  # of this rank's share
        self.shown = 0  # on the bar

    def update(self, n: int = 1) -> None:
        self.done += n
        target = self.total if self.done >= self.share else self.done * self.total // max(1, self.share)
        if target > self.shown:
            self.bar.update(target - self.shown)
            self.shown = target

    def set_postfix(self, **values: Any) -> None:
        self.bar.set_postfix(**values)

    def close(self) -> None:
        if self.done >= self.share:  # a rank with an empty share still shows the split as done
            self.update(0)
        self.bar.close()

    def __enter__(self) -> ShareProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(total: int, desc: str, enabled: bool, initial: int = 0, share: int | None = None) -> Any:
    """A tqdm bar on a terminal; plain log lines every 10% when stderr is a file (batch jobs); nothing
    when disabled (other ranks, logging.progress=false). With `share` (this rank's part of `total`, as in
    validation), the bar counts `total` while this rank works through its share (`ShareProgress`)."""
    if not enabled:
        bar: Any = _NoProgress(total, desc, initial)
    elif sys.stderr.isatty():
        bar = tqdm(total=total, initial=initial, desc=desc, leave=False)
    else:
        bar = LineProgress(total, desc, initial)
    return bar if share is None else ShareProgress(bar, total, share)
