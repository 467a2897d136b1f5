"""Per-sample work, run in worker processes: check a pair (validation pass), encode it (writing pass).

The pool is spawn-based, so what it runs must be importable top-level functions of this module; the
LabelSpec reaches each worker once, through the pool initializer, and lives in a module global there.
"""

from __future__ import annotations

import io
import json
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from seg_dist import shards
from seg_dist.pack.errors import PackError, Problem
from seg_dist.pack.labels import LabelSpec, MaskError, decode_labels
from seg_dist.pack.pairing import Pair

__all__ = ["SamplePool", "SampleStats", "check_pair", "encode_pair"]

# Field name by the format PIL detects (not the file name, which can lie).
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp"}
_MAX_SHOWN_VALUES = 8


class SampleStats(NamedTuple):
    """What the manifest records of one stored mask."""

    histogram: np.ndarray  # pixels per class id
    ignored: int  # pixels with the ignore index
    hw: tuple[int, int]  # stored (possibly downscaled) height, width


@dataclass
class _Loaded:
    image_bytes: bytes
    image: Image.Image
    ext: str
    labels: np.ndarray


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _hw(shape: Sequence[int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _target_hw(h: int, w: int, max_size: int | None) -> tuple[int, int] | None:
    if not max_size or max(h, w) <= max_size:
        return None
    scale = max_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize_nearest(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    # Sampling at output pixel centres keeps labels exact (no blending of class ids).
    rows = ((np.arange(hw[0]) + 0.5) * labels.shape[0] / hw[0]).astype(np.int64)
    cols = ((np.arange(hw[1]) + 0.5) * labels.shape[1] / hw[1]).astype(np.int64)
    return labels[rows[:, None], cols[None, :]]


def _load(pair: Pair, spec: LabelSpec) -> tuple[_Loaded | None, list[Problem]]:
    """Decode and check one pair; returns (loaded or None, [(path, problem), ...])."""
    problems: list[Problem] = []
    image = labels = None
    ext = ""
    try:
        image_bytes = Path(pair.image).read_bytes()
        image = Image.open(io.BytesIO(image_bytes))
        image.load()
        ext = _FORMAT_EXT.get(image.format or "", "")
        if not ext:
            problems.append((pair.image, f"unsupported image format {image.format}"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        problems.append((pair.image, f"cannot decode image ({_one_line(e)})"))
        image = None  # a header-only size would make a misleading size-mismatch line
    try:
        labels = decode_labels(Path(pair.mask).read_bytes(), spec)
    except MaskError as e:
        problems.append((pair.mask, str(e)))
    except Exception as e:
        problems.append((pair.mask, f"cannot decode mask ({_one_line(e)})"))
    if image is not None and labels is not None:
        img_hw = (image.height, image.width)
        if labels.shape != img_hw:
            problems.append(
                (pair.mask, f"mask size {_hw(labels.shape)} != image size {_hw(img_hw)} (HxW) of {pair.image}")
            )
        bad = (labels < 0) | (labels >= spec.num_classes)
        bad &= labels != spec.ignore_index
        if bad.any():
            values = np.unique(labels[bad])
            shown = ", ".join(str(v) for v in values[:_MAX_SHOWN_VALUES])
            more = f" (+{len(values) - _MAX_SHOWN_VALUES} more)" if len(values) > _MAX_SHOWN_VALUES else ""
            mapped = " after --label-map" if spec.lut is not None else ""
            problems.append(
                (
                    pair.mask,
                    f"label values {shown}{more}{mapped} outside [0, {spec.num_classes}) "
                    f"and not the ignore index {spec.ignore_index}",
                )
            )
    if problems or image is None or labels is None:
        return None, problems
    return _Loaded(image_bytes, image, ext, labels), []


_SPEC: LabelSpec | None = None


def _init_worker(spec: LabelSpec) -> None:
    # The spec (label-map tables can be large) is sent once per worker, not once per task.
    global _SPEC
    _SPEC = spec


def check_pair(pair: Pair) -> tuple[list[Problem], SampleStats | None]:
    """Validation pass: (problems, None), or ([], stats of the mask as it will be stored)."""
    assert _SPEC is not None, "run through SamplePool"
    loaded, problems = _load(pair, _SPEC)
    if loaded is None:
        return problems, None
    labels = loaded.labels
    target = _target_hw(*labels.shape, _SPEC.max_size)
    if target:
        labels = _resize_nearest(labels, target)
    valid = labels != _SPEC.ignore_index
    hist = np.bincount(labels[valid].ravel(), minlength=_SPEC.num_classes)
    return [], SampleStats(hist, int(labels.size - valid.sum()), (int(labels.shape[0]), int(labels.shape[1])))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def encode_pair(pair: Pair) -> list[tuple[str, bytes]]:
    """Writing pass: the tar members (name, bytes) of one sample."""
    assert _SPEC is not None, "run through SamplePool"
    loaded, problems = _load(pair, _SPEC)
    if loaded is None:
        # Validation passed moments ago, so the file changed under us.
        raise PackError("; ".join(f"{p}: {msg}" for p, msg in problems) + " (file changed while packing?)")
    image, labels, ext, image_bytes = loaded.image, loaded.labels, loaded.ext, loaded.image_bytes
    size_hw = [image.height, image.width]
    target = _target_hw(image.height, image.width, _SPEC.max_size)
    if target:
        resized = image.convert("RGB").resize((target[1], target[0]), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        if ext == "jpg":
            resized.save(buf, format="JPEG", quality=95)
        else:
            resized.save(buf, format="PNG")
            ext = "png"
        image_bytes = buf.getvalue()
        labels = _resize_nearest(labels, target)
    meta = {"source": pair.image_rel, "mask_source": pair.mask_rel, "size_hw": size_hw}
    return [
        (f"{pair.key}.{ext}", image_bytes),
        (f"{pair.key}.{shards.MASK_FIELD}", _png(labels.astype(_SPEC.mask_dtype))),
        (f"{pair.key}.{shards.META_FIELD}", json.dumps(meta, separators=(",", ":")).encode("utf-8")),
    ]


class SamplePool:
    """Ordered map of check_pair / encode_pair over a spawn pool (in this process for one worker)."""

    def __init__(self, workers: int, spec: LabelSpec) -> None:
        _init_worker(spec)
        self.pool = None
        if workers > 1:
            # spawn: no fork of a possibly multi-threaded parent (torch, tqdm's monitor thread).
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=(spec,))

    def imap(self, fn: Callable[[Pair], Any], items: Sequence[Pair]) -> Iterator[Any]:
        if self.pool is None:
            return map(fn, items)
        return self.pool.imap(fn, items, chunksize=max(1, min(16, len(items) // 64)))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def __enter__(self) -> SamplePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
