"""Tile geometry, the one home for it: the grid of windows that covers a scene, cutting a scene into tiles,
putting tiles back into a scene, and the `tile` entry that a tiled sample's JSON carries.

A grid steps `size - overlap` pixels along each side; its last row and column are shifted inward to end at
the scene's border, so every window is `size` x `size` where the scene is at least `size` on that side
(a side shorter than `size` is one window of that side's length: nothing is padded). Windows are listed row
by row, top to bottom, left to right.

Used by `pack --tile` (seg_dist/pack/samples.py) to cut scenes into samples, and by whatever puts per-tile
arrays back together: label masks (each pixel from the tile it lies deepest in) or logits (a weighted mean,
weights falling towards each tile's inner borders, so no seams).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

__all__ = ["TILE_META", "Assembler", "Window", "assemble", "cut", "grid", "starts", "tile_meta", "window_of"]

# The key of a tiled sample's JSON that says where in which scene the tile lies.
TILE_META = "tile"


class Window(NamedTuple):
    """A rectangle of a scene: top row, left column, height, width (pixels)."""

    y: int
    x: int
    h: int
    w: int

    @property
    def slices(self) -> tuple[slice, slice]:
        """`array[window.slices]` is the window's part of an H x W (x C) array."""
        return slice(self.y, self.y + self.h), slice(self.x, self.x + self.w)


def _check(size: int, overlap: int) -> None:
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"tile size {size} and overlap {overlap}: need size >= 1 and 0 <= overlap < size")


def starts(length: int, size: int, overlap: int = 0) -> list[int]:
    """Window offsets along one side of `length`: `size - overlap` apart, the last one flush with the end
    (so the last two may share more than `overlap`); [0] when `length <= size`."""
    _check(size, overlap)
    if length <= size:
        return [0]
    return [*range(0, length - size, size - overlap), length - size]


def grid(height: int, width: int, size: int, overlap: int = 0) -> list[Window]:
    """The windows that cover a `height` x `width` scene with tiles of `size` sharing `overlap` pixels with
    their neighbours, row by row."""
    if height < 1 or width < 1:
        raise ValueError(f"scene of {height} x {width} px: both sides must be >= 1")
    h, w = min(size, height), min(size, width)
    return [Window(y, x, h, w) for y in starts(height, size, overlap) for x in starts(width, size, overlap)]


def cut(array: np.ndarray, window: Window) -> np.ndarray:
    """The window's part of an H x W (x C) array, as a view."""
    if window.y + window.h > array.shape[0] or window.x + window.w > array.shape[1]:
        raise ValueError(f"window {tuple(window)} reaches beyond the {array.shape[0]} x {array.shape[1]} array")
    return array[window.slices]


def _depth(start: int, n: int, scene: int, inner_only: bool) -> np.ndarray:
    """Per pixel along one side of a window: how far it lies inside the window, counted to the nearer
    edge (1 at the edge). With `inner_only`, an edge on the scene's border does not count (no tile lies beyond
    it to take over), so where tiles overlap the pixel goes to the tile it is deeper in."""
    pos = np.arange(n, dtype=np.float32)
    lo = pos + 1 if not (inner_only and start == 0) else np.full(n, np.inf)
    hi = n - pos if not (inner_only and start + n == scene) else np.full(n, np.inf)
    return np.minimum(lo, hi)


class Assembler:
    """Tiles put back into a `scene_hw` scene one at a time (`add`), so a caller that predicts tile by tile
    never holds every tile at once; `result()` is the scene. See `assemble` for what `blend`, `fill` and
    `out` mean; the result's type and channels come from `out` or else from the first tile."""

    def __init__(self, scene_hw: tuple[int, int], *, blend: bool = False, fill: float = 0,
                 out: np.ndarray | None = None) -> None:
        self.height, self.width = int(scene_hw[0]), int(scene_hw[1])
        self.blend, self.fill = blend, fill
        self.out = out
        if out is not None:
            self._start(out.shape[2:], out.dtype)
        # Per pixel: the summed weights (blend), or how deep it lies in the tile it was taken from; 0: no tile.
        self._score = np.zeros((self.height, self.width), np.float32)

    def _start(self, extra: tuple[int, ...], dtype: np.dtype) -> None:
        shape = (self.height, self.width, *extra)
        if self.out is None:
            self.out = np.empty(shape, np.float32 if self.blend else dtype)
        elif self.out.shape != shape:
            raise ValueError(f"out has shape {self.out.shape}, the scene needs {shape}")
        self.out[...] = 0 if self.blend else self.fill
        self._extra = extra

    def add(self, tile: np.ndarray, window: Window) -> None:
        """Put one H x W (x C) tile at its window."""
        if self.out is None:
            self._start(tile.shape[2:], tile.dtype)
        assert self.out is not None
        if tile.shape[:2] != (window.h, window.w) or tile.shape[2:] != self._extra:
            raise ValueError(f"a tile of shape {tile.shape} for window {tuple(window)} (the scene: H x W x "
                             f"{self._extra})")
        if window.y < 0 or window.x < 0 or window.y + window.h > self.height or window.x + window.w > self.width:
            raise ValueError(f"window {tuple(window)} reaches beyond the {self.height} x {self.width} scene")
        sl = window.slices
        if self.blend:
            ramp_y = _depth(window.y, window.h, self.height, False) / np.ceil(window.h / 2)
            ramp_x = _depth(window.x, window.w, self.width, False) / np.ceil(window.w / 2)
            weight = ramp_y[:, None] * ramp_x[None, :]
            self.out[sl] += tile * weight.reshape(weight.shape + (1,) * len(self._extra))
            self._score[sl] += weight
            return
        depth = np.minimum(_depth(window.y, window.h, self.height, True)[:, None],
                           _depth(window.x, window.w, self.width, True)[None, :])
        take = depth > self._score[sl]
        self.out[sl][take] = tile[take]
        self._score[sl][take] = depth[take]

    def covered(self) -> np.ndarray:
        """H x W booleans: the pixels some tile covers (False in the holes of dropped tiles)."""
        return self._score > 0

    def result(self) -> np.ndarray:
        """The scene; pixels no tile covers are `fill`."""
        if self.out is None:
            raise ValueError("no tiles: give `out` to say the result's type and channels")
        if self.blend:
            # In bands of rows: boolean indexing copies what it selects, and `out` may be a memmap larger
            # than memory.
            rows = max(1, (1 << 24) // (self.width * max(1, int(np.prod(self._extra)))))
            for top in range(0, self.height, rows):
                out, score = self.out[top : top + rows], self._score[top : top + rows]
                covered = score > 0
                out[covered] /= score[covered].reshape(-1, *(1,) * len(self._extra))
                out[~covered] = self.fill
        return self.out


def assemble(
    tiles: Iterable[np.ndarray],
    windows: Iterable[Window],
    scene_hw: tuple[int, int],
    *,
    blend: bool = False,
    fill: float = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Put `tiles` (H x W or H x W x C arrays, one per window) back into a `scene_hw` scene.

    Without `blend` (masks, images, class ids): each pixel is taken whole from the tile it lies deepest in,
    counting depth from the tile's edges inside the scene, so where tiles overlap the seam runs midway
    between them; tiles cut from one array give it back exactly. The result has the tiles' type.

    With `blend` (logits, probabilities): each pixel is the mean of the tiles that cover it, weighted by
    how deep it lies in each (weights rising linearly from 1/ceil(side/2) at a tile's edge to 1 in its
    middle, as predict blends its tiles), in float32; `result.argmax(-1)` is then a mask without seams.

    Pixels no tile covers (tiles dropped by `pack --drop-empty`) are `fill`. `out` (of the result's shape
    and type, for instance a `np.memmap` for a scene larger than memory) receives the scene instead of a new
    array. Besides the result, one float32 H x W array is held; `tiles` may be a generator (`Assembler` takes
    them one at a time).
    """
    assembler = Assembler(scene_hw, blend=blend, fill=fill, out=out)
    for tile, window in zip(tiles, windows, strict=True):
        assembler.add(tile, window)
    return assembler.result()


def tile_meta(scene: str, window: Window, scene_hw: tuple[int, int]) -> dict[str, Any]:
    """The `tile` entry of a tiled sample's JSON: its scene's key, its window and the scene's size."""
    return {"scene": scene, "y": window.y, "x": window.x, "h": window.h, "w": window.w,
            "scene_hw": [int(scene_hw[0]), int(scene_hw[1])]}


def window_of(meta: dict[str, Any]) -> tuple[str, Window, tuple[int, int]] | None:
    """(scene key, window, scene size) from a sample's JSON (`seg_dist.data.iter_samples` gives it as
    `meta`); None for a sample that is not a tile."""
    entry = meta.get(TILE_META)
    if entry is None:
        return None
    h, w = entry["scene_hw"]
    return entry["scene"], Window(int(entry["y"]), int(entry["x"]), int(entry["h"]), int(entry["w"])), (int(h), int(w))
