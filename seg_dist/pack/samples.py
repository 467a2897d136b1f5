"""Per-sample work, run in worker processes: check a pair (validation pass), encode it (writing pass).

The pool is spawn-based, so what it runs must be importable top-level functions of this module; the
LabelSpec (and whether to keep alpha channels) reaches each worker once, through the pool initializer, and
lives in a module global there.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from seg_dist import shards, tiles
from seg_dist.pack.errors import PackError, Problem
from seg_dist.pack.labels import LabelSpec, MaskError, decode_labels
from seg_dist.pack.pairing import Pair
from seg_dist.shards import DecodedImage, ImageSpec

__all__ = ["PixelSums", "SamplePool", "SampleStats", "SceneStats", "Tiling", "check_pair", "check_scene", "encode_pair",
           "encode_scene", "sample_stats", "tile_key"]

# Field name by the format the decoder detects (not the file name, which can lie).
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp", "NPY": "npy"}
_MAX_SHOWN_VALUES = 8


class PixelSums(NamedTuple):
    """Per-channel sums of one or more images' pixels, merged exactly: integer images as Python integers
    (sum and sum of squares: no rounding at all until `finish`), float images as float64 (count, mean,
    sum of squared deviations), merged with Chan et al.'s pairwise update so no large sums cancel."""

    count: int  # pixels per channel
    first: tuple[float, ...]  # integers: sum of values; floats: mean
    second: tuple[float, ...]  # integers: sum of squared values; floats: sum of squared deviations from the mean
    exact: bool  # integer sums

    @classmethod
    def of(cls, pixels: np.ndarray) -> PixelSums:
        """The sums of one H x W x C image."""
        flat = pixels.reshape(-1, pixels.shape[2])
        n = int(flat.shape[0])
        if pixels.dtype.kind == "u":
            # Exact and fast: one histogram per channel, then integer dot products.
            levels = np.arange(256 if pixels.dtype == np.uint8 else 65536, dtype=np.int64)
            firsts, seconds = [], []
            for c in range(flat.shape[1]):
                hist = np.bincount(flat[:, c], minlength=levels.size).astype(np.int64)
                firsts.append(int(hist @ levels))
                if n * int(levels[-1]) ** 2 < 2**63:
                    seconds.append(int(hist @ (levels * levels)))
                else:  # an image so large the int64 dot product could overflow
                    nz = np.flatnonzero(hist)
                    seconds.append(sum(int(hist[v]) * int(v) * int(v) for v in nz))
            return cls(n, tuple(firsts), tuple(seconds), True)
        mean = flat.mean(axis=0, dtype=np.float64)
        m2 = ((flat - mean) ** 2).sum(axis=0, dtype=np.float64)
        return cls(n, tuple(float(v) for v in mean), tuple(float(v) for v in m2), False)

    def merge(self, other: PixelSums) -> PixelSums:
        if self.count == 0:
            return other
        if other.count == 0:
            return self
        n = self.count + other.count
        if self.exact:
            return PixelSums(n, tuple(a + b for a, b in zip(self.first, other.first, strict=True)),
                             tuple(a + b for a, b in zip(self.second, other.second, strict=True)), True)
        means, m2s = [], []
        for ma, mb, sa, sb in zip(self.first, other.first, self.second, other.second, strict=True):
            delta = mb - ma
            means.append(ma + delta * other.count / n)
            m2s.append(sa + sb + delta * delta * self.count * other.count / n)
        return PixelSums(n, tuple(means), tuple(m2s), False)

    def channels(self, picks: Sequence[int | None]) -> PixelSums:
        """The sums of an image made of these channels of this one (None: an opaque 8-bit alpha, 255)."""
        first = [255 * self.count if c is None else self.first[c] for c in picks]
        second = [255 * 255 * self.count if c is None else self.second[c] for c in picks]
        return PixelSums(self.count, tuple(first), tuple(second), self.exact)

    def finish(self) -> tuple[list[float], list[float]]:
        """(mean, population std) per channel, in raw pixel values."""
        if self.count == 0:
            raise ValueError("no pixels")
        n = self.count
        if self.exact:
            # Integer arithmetic until the one correctly rounded division.
            mean = [s / n for s in self.first]
            var = [(n * q - s * s) / (n * n) for s, q in zip(self.first, self.second, strict=True)]
        else:
            mean = list(self.first)
            var = [m2 / n for m2 in self.second]
        return mean, [math.sqrt(max(v, 0.0)) for v in var]


class SampleStats(NamedTuple):
    """What the manifest records of one stored sample."""

    histogram: np.ndarray  # pixels per class id
    ignored: int  # pixels with the ignore index
    hw: tuple[int, int]  # stored (possibly downscaled) height, width
    original_hw: tuple[int, int]  # height, width of the original image as viewers show it
    image: ImageSpec  # channels and type of the image as decoded
    pixels: PixelSums  # of the image as stored


class SceneStats(NamedTuple):
    """What the manifest records of one scene packed as tiles (`check_scene`): its kept tiles' statistics, each
    counting its own pixels (overlaps once per tile), and how many tiles `--drop-empty` left out. `image` and
    `pixels` (merged over the kept tiles) stand for the scene where the dataset's kind and statistics are
    settled, as a `SampleStats` does for an untiled sample."""

    tiles: list[SampleStats]
    dropped: int
    image: ImageSpec
    pixels: PixelSums


def sample_stats(stats: SampleStats | SceneStats) -> list[SampleStats]:
    """The stored samples a pair became: itself, or its scene's kept tiles."""
    return stats.tiles if isinstance(stats, SceneStats) else [stats]


@dataclass(frozen=True)
class Tiling:
    """`pack --tile SIZE --tile-overlap PX --drop-empty`: cut each scene into tiles (seg_dist/tiles.py)."""

    size: int
    overlap: int = 0
    drop_empty: bool = False  # leave out tiles whose mask is all ignore label

    def manifest(self) -> dict[str, Any]:
        """The manifest's `tiling` entry."""
        return {"size": self.size, "overlap": self.overlap, "drop_empty": self.drop_empty}


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
        image = shards.read_image(image_bytes, _KEEP_ALPHA)
        ext = _FORMAT_EXT.get(image.format, "")
        if not ext:
            problems.append((pair.image, f"unsupported image format {image.format}"))
    except shards.ImageError as e:
        bomb = e.__cause__ if isinstance(e.__cause__, Image.DecompressionBombError) else None
        problems.append((pair.image, shards.too_many_pixels(bomb) if bomb else str(e)))
    except OSError as e:
        problems.append((pair.image, f"cannot read ({_one_line(e)})"))
    try:
        mask_bytes = Path(pair.mask).read_bytes()
        if not mask_bytes:
            raise MaskError("empty file (0 bytes), not a mask")
        labels = decode_labels(mask_bytes, spec)
    except MaskError as e:
        problems.append((pair.mask, str(e)))
    except Image.DecompressionBombError as e:
        problems.append((pair.mask, shards.too_many_pixels(e)))
    except Image.UnidentifiedImageError:
        problems.append((pair.mask, "not a mask image seg_dist can read (PNG, TIFF or BMP), or damaged"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        problems.append((pair.mask, f"cannot decode mask ({_one_line(e)})"))
    if image is not None and labels is not None:
        img_hw = image.pixels.shape[:2]
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
_KEEP_ALPHA = False


def _init_worker(spec: LabelSpec, keep_alpha: bool = False, max_pixels: int | None = None) -> None:
    # The spec (label-map tables can be large) is sent once per worker, not once per task.
    global _SPEC, _KEEP_ALPHA
    _SPEC, _KEEP_ALPHA = spec, keep_alpha
    # Spawned workers start with Pillow's default; a caller who raised the limit meant it for them too.
    Image.MAX_IMAGE_PIXELS = max_pixels


def _stored_image(image: DecodedImage, ext: str, image_bytes: bytes, target: tuple[int, int]
                  ) -> tuple[str, bytes, np.ndarray]:
    """(field name, bytes, pixels) of the image as the shard stores it: the original file when it keeps
    its size; else resized to `target` from the upright pixels (the new file carries no EXIF orientation,
    so it reads the same). 8-bit grey, grey + alpha, RGB and RGBA are resized by PIL (bilinear) and stored
    as JPEG q95 for JPEG sources, PNG otherwise; other images by OpenCV (area averaging, any band count and
    type) and stored as .npy, losslessly."""
    pixels = image.pixels
    if target == pixels.shape[:2]:
        return ext, image_bytes, pixels
    modes = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
    buf = io.BytesIO()
    if pixels.dtype == np.uint8 and pixels.shape[2] in modes:
        mode = modes[pixels.shape[2]]
        small = shards.resize_image(pixels, *target)
        resized = Image.fromarray(small[:, :, 0] if mode == "L" else small, mode)
        if ext == "jpg" and mode in ("L", "RGB"):
            resized.save(buf, format="JPEG", quality=95)
        else:
            resized.save(buf, format="PNG")
            ext = "png"
        data = buf.getvalue()
        # The statistics describe the pixels as stored, JPEG's losses included.
        return ext, data, shards.decode_image(data, _KEEP_ALPHA)
    resized = shards.resize_image(pixels, *target)
    np.save(buf, resized, allow_pickle=False)
    return "npy", buf.getvalue(), resized


def check_pair(pair: Pair) -> tuple[list[Problem], SampleStats | None]:
    """Validation pass: (problems, None), or ([], stats of the sample as it will be stored)."""
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
    pixels = _stored_image(loaded.image, loaded.ext, loaded.image_bytes, target)[2]
    found = ImageSpec(pixels.shape[2], pixels.dtype.name, _KEEP_ALPHA)
    return [], SampleStats(hist, int(labels.size - valid.sum()), target, original, found, PixelSums.of(pixels))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def encode_pair(pair: Pair, image: ImageSpec = shards.RGB8) -> list[tuple[str, bytes]]:
    """Writing pass: the tar members (name, bytes) of one sample of a dataset of `image`s (the sample's JSON
    names them, so a sample decodes alone as the manifest says: `data.decode_sample`)."""
    assert _SPEC is not None, "run through SamplePool"
    loaded, problems = _load(pair, _SPEC)
    if loaded is None:
        # Validation passed moments ago, so the file changed under us.
        raise PackError("; ".join(f"{p}: {msg}" for p, msg in problems) + " (file changed while packing?)")
    labels = loaded.labels
    h, w = loaded.image.pixels.shape[:2]
    size_hw = [h, w]
    target = shards.packed_size(h, w, _SPEC.max_size)
    ext, image_bytes, _ = _stored_image(loaded.image, loaded.ext, loaded.image_bytes, target)
    if target != (h, w):
        labels = _resize_nearest(labels, target)
    meta: dict[str, Any] = {"source": pair.image_rel, "mask_source": pair.mask_rel, "size_hw": size_hw,
                            "image": {"channels": image.channels, "dtype": image.dtype}}
    if image.alpha:
        meta["image"]["alpha"] = True
    return [
        (f"{pair.key}.{ext}", image_bytes),
        (f"{pair.key}.{shards.MASK_FIELD}", _png(labels.astype(_SPEC.mask_dtype))),
        (f"{pair.key}.{shards.META_FIELD}", json.dumps(meta, separators=(",", ":")).encode("utf-8")),
    ]


def tile_key(scene: str, window: tiles.Window, scene_hw: tuple[int, int]) -> str:
    """The key of a scene's tile: `<scene>__y<top>_x<left>`, zero-padded to one width per scene, so a scene's
    tiles sort row by row and no two keys of distinct scenes or windows meet (the suffix parses back from
    the right: digits hold no `_`)."""
    digits = max(6, len(str(max(scene_hw))))
    return f"{scene}__y{window.y:0{digits}d}_x{window.x:0{digits}d}"


def _scene(pair: Pair, tiling: Tiling) -> tuple[_Loaded | None, list[Problem], np.ndarray, list[tiles.Window], int]:
    """(loaded, problems, labels in the mask's stored type, kept windows, tiles dropped as all ignore)."""
    assert _SPEC is not None, "run through SamplePool"
    loaded, problems = _load(pair, _SPEC)
    if loaded is None:
        return None, problems, np.zeros((0, 0)), [], 0
    # The stored type (8 or 16 bits) instead of int64: the scene's mask is the largest array held.
    labels = loaded.labels.astype(_SPEC.mask_dtype)
    loaded.labels = labels
    windows = tiles.grid(labels.shape[0], labels.shape[1], tiling.size, tiling.overlap)
    kept = windows
    if tiling.drop_empty:
        kept = [w for w in windows if not (tiles.cut(labels, w) == _SPEC.ignore_index).all()]
    return loaded, [], labels, kept, len(windows) - len(kept)


def check_scene(pair: Pair, tiling: Tiling) -> tuple[list[Problem], SceneStats | None]:
    """Validation pass of a scene packed as tiles: (problems, None), or ([], its kept tiles' statistics).
    Each tile counts its own pixels, so pixels in an overlap count once per tile that holds them."""
    loaded, problems, labels, kept, dropped = _scene(pair, tiling)
    if loaded is None:
        return problems, None
    assert _SPEC is not None
    pixels = loaded.image.pixels
    found = ImageSpec(pixels.shape[2], pixels.dtype.name, _KEEP_ALPHA)
    stats: list[SampleStats] = []
    total = PixelSums(0, (), (), pixels.dtype.kind == "u")
    for window in kept:
        tile = tiles.cut(labels, window)
        valid = tile != _SPEC.ignore_index
        hist = np.bincount(tile[valid].ravel(), minlength=_SPEC.num_classes)
        sums = PixelSums.of(tiles.cut(pixels, window))
        total = total.merge(sums)
        hw = (window.h, window.w)
        stats.append(SampleStats(hist, int(tile.size - valid.sum()), hw, hw, found, sums))
    return [], SceneStats(stats, dropped, found, total)


def _tile_image(pixels: np.ndarray) -> tuple[str, bytes]:
    """A tile's field name and bytes, lossless: PNG for 8-bit grey, grey + alpha, RGB and RGBA, `.npy` for
    other types and band counts."""
    buf = io.BytesIO()
    modes = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
    if pixels.dtype == np.uint8 and pixels.shape[2] in modes:
        mode = modes[pixels.shape[2]]
        Image.fromarray(pixels[:, :, 0] if mode == "L" else np.ascontiguousarray(pixels), mode).save(buf, format="PNG")
        return "png", buf.getvalue()
    np.save(buf, np.ascontiguousarray(pixels), allow_pickle=False)
    return "npy", buf.getvalue()


def encode_scene(pair: Pair, tiling: Tiling, image: ImageSpec = shards.RGB8) -> list[list[tuple[str, bytes]]]:
    """Writing pass of a scene packed as tiles: the tar members of each kept tile, row by row. A scene that
    is one tile keeps its original file; other tiles are cut from the upright pixels and stored losslessly
    (`_tile_image`). Each tile's JSON holds what `encode_pair` writes, its own size as `size_hw`, and
    `tile` (`seg_dist.tiles.tile_meta`: scene key, y, x, h, w, scene size)."""
    loaded, problems, labels, kept, _ = _scene(pair, tiling)
    if loaded is None:
        raise PackError("; ".join(f"{p}: {msg}" for p, msg in problems) + " (file changed while packing?)")
    assert _SPEC is not None
    pixels = loaded.image.pixels
    scene_hw = (int(labels.shape[0]), int(labels.shape[1]))
    samples = []
    for window in kept:
        if (window.h, window.w) == scene_hw:
            ext, image_bytes = loaded.ext, loaded.image_bytes
        else:
            ext, image_bytes = _tile_image(tiles.cut(pixels, window))
        meta: dict[str, Any] = {"source": pair.image_rel, "mask_source": pair.mask_rel, "size_hw": [window.h, window.w],
                                "image": {"channels": image.channels, "dtype": image.dtype},
                                tiles.TILE_META: tiles.tile_meta(pair.key, window, scene_hw)}
        if image.alpha:
            meta["image"]["alpha"] = True
        key = tile_key(pair.key, window, scene_hw)
        samples.append([
            (f"{key}.{ext}", image_bytes),
            (f"{key}.{shards.MASK_FIELD}", _png(np.ascontiguousarray(tiles.cut(labels, window)))),
            (f"{key}.{shards.META_FIELD}", json.dumps(meta, separators=(",", ":")).encode("utf-8")),
        ])
    return samples


class SamplePool:
    """Ordered map of check_pair / encode_pair over a spawn pool (in this process for one worker)."""

    def __init__(self, workers: int, spec: LabelSpec, keep_alpha: bool = False) -> None:
        max_pixels = Image.MAX_IMAGE_PIXELS
        _init_worker(spec, keep_alpha, max_pixels)
        self.workers = workers
        self.pool = None
        if workers > 1:
            # spawn: no fork of a possibly multi-threaded parent (torch, tqdm's monitor thread).
            ctx = multiprocessing.get_context("spawn")
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=(spec, keep_alpha, max_pixels))

    def imap(self, fn: Callable[[Pair], Any], items: Sequence[Pair], one_at_a_time: bool = False) -> Iterator[Any]:
        """`fn` over `items`, results in order. `one_at_a_time` (for scenes, each a whole image's worth of
        memory): each worker takes one item at a time, and at most workers + 1 results are computed ahead of
        the one the caller holds, so memory stays bounded by a few scenes whatever the consumer's pace."""
        if self.pool is None:
            return map(fn, items)
        if one_at_a_time:
            return self._bounded(fn, items)
        return self.pool.imap(fn, items, chunksize=max(1, min(16, len(items) // 64)))

    def _bounded(self, fn: Callable[[Pair], Any], items: Sequence[Pair]) -> Iterator[Any]:
        assert self.pool is not None
        pending: deque[Any] = deque()
        for item in items:
            pending.append(self.pool.apply_async(fn, (item,)))
            if len(pending) > self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def __enter__(self) -> SamplePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
