"""Console logging with the rank prefixed, TensorBoard and metrics.jsonl on rank 0."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np


def setup_logging(rank: int, level: int = logging.INFO) -> logging.Logger:
    """Every record carries `[rank N]`, so interleaved output from many ranks stays readable."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    return logging.getLogger("seg_dist")


class RunLog:
    """TensorBoard scalars/images/text and one JSON line per validation; a no-op off rank 0."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))

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

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
