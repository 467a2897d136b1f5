"""What every dataset converter of the lab writes alike: the output folder it claims, masks as single-channel
PNGs of class ids, the split lists and class names that `seg_dist.pack` takes, and its one summary line."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from seg_dist.errors import UserError


def claim_output(out: Path, overwrite: bool) -> None:
    """OUT/images, OUT/masks and OUT/splits, refusing a folder that holds anything unless `overwrite`."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: not empty; pass --overwrite to replace what is there")
    for sub in ("images", "masks", "splits"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def write_mask(path: Path, labels: np.ndarray) -> None:
    """Class ids (uint8, H x W) as a single-channel PNG, written whole or not at all."""
    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8, copy=False), mode="L").save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def write_splits(out: Path, parts: Mapping[str, Sequence[str]], class_names: Sequence[str] | None = None
                 ) -> dict[str, int]:
    """OUT/splits/<split>.txt (one stem a line) and OUT/class_names.txt (comma-separated, for --class-names);
    the count of each split."""
    for name, part in parts.items():
        (out / "splits" / f"{name}.txt").write_text("".join(f"{s}\n" for s in part))
    if class_names is not None:
        (out / "class_names.txt").write_text(",".join(class_names) + "\n")
    return {name: len(part) for name, part in parts.items()}


def summary(out: str | Path, counts: Mapping[str, int]) -> str:
    return f"wrote {sum(counts.values())} samples to {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
