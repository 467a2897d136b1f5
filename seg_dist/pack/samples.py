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
from seg_dist.shards import DecodedImage

__all__ = ["SamplePool", "SampleStats", "check_pair", "encode_pair"]

# Field name by the format PIL detects (not the file name, which can lie).
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp"}
_MAX_SHOWN_VALUES = 8


class SampleStats(NamedTuple):
    """What the manifest records of one stored mask."""

    histogram: np.ndarray  # pixels per class id
    ignored: int  # pixels with the ignore index
    hw: tuple[int, int]  # stored (possibly downscaled) height, width
    original_hw: tuple[int, int]  # height, width of the original image as viewers show it


@dataclass
class _Loaded:
    image_bytes: bytes
    image: DecodedImage
    ext: str
    labels: np.ndarray


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _hw(shape: Sequence[int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _resize_nearest(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    # Sampling at output pixel centres keeps labels exact (no blending of class ids).
    rows = ((np.arange(hw[0]) + 0.5) * labels.shape[0] / hw[0]).astype(np.int64)
    cols = ((np.arange(hw[1]) + 0.5) * labels.shape[1] / hw[1]).astype(np.int64)
    return labels[rows[:, None], cols[None, :]]


def _load(pair: Pair, spec: LabelSpec) -> tuple[_Loaded | None, list[Problem]]:
    """Decode and check one pair; returns (loaded or None, [(path, problem), ...])."""
    problems: list[Problem] = []
    image: DecodedImage | None = None
    labels = None
    ext = ""
    try:
        image_bytes = Path(pair.image).read_bytes()
        image = shards.read_image(image_bytes)
        ext = _FORMAT_EXT.get(image.format, "")
        if not ext:
            problems.append((pair.image, f"unsupported image format {image.format}"))
    except shards.ImageError as e:
        problems.append((pair.image, str(e)))
    except OSError as e:
        problems.append((pair.image, f"cannot read ({_one_line(e)})"))
    try:
        mask_bytes = Path(pair.mask).read_bytes()
        if not mask_bytes:
            raise MaskError("empty file (0 bytes), not a mask")
        labels = decode_labels(mask_bytes, spec)
    except MaskError as e:
        problems.append((pair.mask, str(e)))
    except Image.UnidentifiedImageError:
        problems.append((pair.mask, "not a mask image seg_dist can read (PNG, TIFF or BMP), or damaged"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        problems.append((pair.mask, f"cannot decode mask ({_one_line(e)})"))
    if image is not None and labels is not None:
        img_hw = image.rgb.shape[:2]
        if labels.shape != img_hw:
            problems.append((pair.mask, _size_mismatch(pair, labels.shape, img_hw, image.orientation, mask_bytes)))
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


def _size_mismatch(
    pair: Pair, mask_hw: Sequence[int], img_hw: Sequence[int], img_orientation: int, mask_bytes: bytes
) -> str:
    text = f"mask size {_hw(mask_hw)} != image size {_hw(img_hw)} (HxW) of {pair.image}"
    if tuple(mask_hw) != tuple(img_hw)[::-1]:
        return text
    # The sizes match after a quarter turn: most likely one file carries an EXIF orientation that the tool
    # which drew (or exported) the other did not apply.
    mask_orientation = shards.exif_orientation(mask_bytes)
    turned = shards.TURNED_ORIENTATIONS
    if img_orientation in turned and mask_orientation not in turned:
        return (f"{text} as viewers show it: its {shards.orientation_text(img_orientation)} turns the stored "
                f"{_hw(img_hw[::-1])} pixels, and seg_dist applies it as viewers do; the mask fits the unturned "
                "pixels: draw the mask on the picture as shown, or remove the image's EXIF orientation tag")
    return (f"{text}: the sizes match after a 90-degree turn; seg_dist applies EXIF orientation as viewers do "
            f"(image: {shards.orientation_text(img_orientation)}, mask: {shards.orientation_text(mask_orientation)}); "
            "turn one of them so both show the same way")


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
    original = (int(labels.shape[0]), int(labels.shape[1]))
    target = shards.packed_size(*original, _SPEC.max_size)
    if target != original:
        labels = _resize_nearest(labels, target)
    valid = labels != _SPEC.ignore_index
    hist = np.bincount(labels[valid].ravel(), minlength=_SPEC.num_classes)
    return [], SampleStats(hist, int(labels.size - valid.sum()), target, original)


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
    h, w = image.rgb.shape[:2]
    size_hw = [h, w]
    target = shards.packed_size(h, w, _SPEC.max_size)
    if target != (h, w):
        # From the upright pixels: the re-encoded file carries no EXIF orientation, so it reads the same.
        resized = Image.fromarray(image.rgb).resize((target[1], target[0]), Image.Resampling.BILINEAR)
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
