"""Pictures: the class palette, colourised masks, titled overlays with legends, grids, the confusion
matrix, PNG writes.

The one home of class colours: training overlays, previews, the synthetic dataset's palette PNGs and
predictions all draw with `palette()` (or a dataset's own colours, `palette_for`), and paint ignored
pixels `IGNORE_COLOUR`, a colour no generated class gets. No matplotlib: PIL draws the text.

Images of any channel count and pixel type are shown through `display_image`: the bands `data.display_bands`
names (one shown as grey, three as RGB; by default the first three of 3+ channels, else the first), 8-bit
pixels as they are, 16-bit and float ones stretched per shown band and per image from their 2nd to their 98th
percentile, so a 16-bit picture whose values sit in a narrow range is not all black.
"""

from __future__ import annotations

import colorsys
import functools
import io
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import atomic
from .errors import UserError
from .shards import FULL_SCALE

__all__ = [
    "DEFAULT_MAX_SIDE", "IGNORE_COLOUR", "STRETCH_PERCENTILES", "bar_chart", "colorize", "confusion_matrix_figure",
    "delta_e", "denormalize", "display_bands", "display_image", "enlarge", "grid", "ignore_colour", "legend",
    "overlay", "overlay_triptych", "overlay_with_legend", "palette", "palette_for", "preview_grid", "save_mask_png",
    "save_png", "srgb_to_lab", "titled_panels", "validation_pictures",
]

log = logging.getLogger(__name__)

# Ignored pixels and padding: black, never a class colour (generated colours keep away from black, mid
# grey and white, see `_candidates`), so "no label" cannot be mistaken for a class.
IGNORE_COLOUR = (0, 0, 0)
_RESERVED = ((0, 0, 0), (128, 128, 128), (255, 255, 255))
# Long side of any composite picture (validation overlays, predict overlays, previews), in px.
DEFAULT_MAX_SIDE = 2048
# 16-bit and float bands are shown stretched between these percentiles of the band in the image: a few
# outliers (a specular glint, a saturated pixel) would otherwise leave the rest of the picture one grey.
STRETCH_PERCENTILES = (2.0, 98.0)

# The first 20 class colours: the greedy farthest-point sequence of `_generated` (CIEDE2000, away from
# black, grey and white), written out so that they never move; more classes continue the same walk.
_BASE_COLOURS = (
    (30, 0, 240), (0, 210, 0), (150, 0, 0), (255, 165, 0), (255, 0, 255), (0, 90, 0), (255, 150, 150),
    (0, 195, 255), (165, 15, 105), (105, 75, 0), (0, 255, 225), (45, 120, 255), (195, 180, 255),
    (0, 150, 120), (150, 150, 0), (225, 90, 15), (225, 240, 0), (135, 105, 165), (240, 0, 75), (0, 75, 120),
)  # fmt: skip
# Beyond this many classes colours cannot stay far apart anyway: a cheap golden-ratio hue walk instead.
_GREEDY_LIMIT = 1024


def srgb_to_lab(rgb: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """... x 3 sRGB values in 0..255 -> CIELAB (D65), float64."""
    c = np.asarray(rgb, np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = c @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def delta_e(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference of CIELAB values (broadcast over leading axes). About 2 is just
    noticeable side by side; plain Euclidean CIELAB distance overstates saturated yellows and greens."""
    L1, a1, b1 = np.moveaxis(np.asarray(lab1, np.float64), -1, 0)
    L2, a2, b2 = np.moveaxis(np.asarray(lab2, np.float64), -1, 0)
    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_mean**7 / (c_mean**7 + 25.0**7)))
    a1, a2 = (1 + g) * a1, (1 + g) * a2
    c1, c2 = np.hypot(a1, b1), np.hypot(a2, b2)
    h1, h2 = np.degrees(np.arctan2(b1, a1)) % 360, np.degrees(np.arctan2(b2, a2)) % 360
    achromatic = c1 * c2 == 0
    dh = h2 - h1
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(achromatic, 0, dh)
    d_big_h = 2 * np.sqrt(c1 * c2) * np.sin(np.radians(dh) / 2)
    l_mean, c_mean = (L1 + L2) / 2, (c1 + c2) / 2
    hs = h1 + h2
    h_mean = np.where(np.abs(h1 - h2) > 180, np.where(hs < 360, (hs + 360) / 2, (hs - 360) / 2), hs / 2)
    h_mean = np.where(achromatic, hs, h_mean)
    t = (1 - 0.17 * np.cos(np.radians(h_mean - 30)) + 0.24 * np.cos(np.radians(2 * h_mean))
         + 0.32 * np.cos(np.radians(3 * h_mean + 6)) - 0.20 * np.cos(np.radians(4 * h_mean - 63)))
    d_theta = 30 * np.exp(-(((h_mean - 275) / 25) ** 2))
    r_c = 2 * np.sqrt(c_mean**7 / (c_mean**7 + 25.0**7))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / np.sqrt(20 + (l_mean - 50) ** 2)
    s_c, s_h = 1 + 0.045 * c_mean, 1 + 0.015 * c_mean * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    dl, dc, dh_ = (L2 - L1) / s_l, (c2 - c1) / s_c, d_big_h / s_h
    return np.sqrt(dl**2 + dc**2 + dh_**2 + r_t * dc * dh_)


@functools.lru_cache(maxsize=1)
def _candidates() -> tuple[np.ndarray, np.ndarray]:
    """sRGB colours on a 15-step grid that suit a class: neither too dark (black is the ignore colour)
    nor too light (washes out in an overlay), and clearly chromatic (grey reads as "no colour")."""
    steps = np.arange(0, 256, 15)
    rgb = np.array(list(itertools.product(steps, steps, steps)))
    lab = srgb_to_lab(rgb)
    keep = (lab[:, 0] >= 30) & (lab[:, 0] <= 92) & (np.hypot(lab[:, 1], lab[:, 2]) >= 30)
    return rgb[keep], lab[keep]


@functools.lru_cache(maxsize=4)
def _generated(n: int) -> np.ndarray:
    """The first `n` class colours. The greedy farthest-point walk: each next colour is the candidate whose
    smallest CIEDE2000 difference to the colours taken so far (and to black, grey and white) is largest;
    greedy farthest-point selection is within a factor 2 of the best possible minimum distance. Its first
    20 steps are `_BASE_COLOURS`. Past `_GREEDY_LIMIT`, a golden-ratio hue walk."""
    rgb, lab = _candidates()
    nearest = np.min(delta_e(lab[:, None], srgb_to_lab(_RESERVED)[None]), axis=1)
    out = [list(c) for c in _BASE_COLOURS[:n]]
    for c in out:
        nearest = np.minimum(nearest, delta_e(lab, srgb_to_lab(c)))
    while len(out) < min(n, _GREEDY_LIMIT):
        j = int(np.argmax(nearest))
        out.append(rgb[j].tolist())
        nearest = np.minimum(nearest, delta_e(lab, lab[j]))
    i = 0
    while len(out) < n:
        # Golden-ratio hue steps; saturation and value cycle, and stay off black and grey.
        hue = (i * 0.618033988749895) % 1.0
        sat, val = (0.9, 0.65, 0.8)[i % 3], (0.95, 0.75, 0.6)[(i // 3) % 3]
        out.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)])
        i += 1
    return np.array(out, dtype=np.uint8).reshape(n, 3)


def _sequence(n: int) -> np.ndarray:
    """The first `n` colours of the walk, computed in chunks of powers of two so the cache serves all n."""
    return _generated(max(64, 1 << max(0, n - 1).bit_length()))[:n]


def palette(num_classes: int, given: Sequence[Sequence[int]] | np.ndarray | None = None) -> np.ndarray:
    """`num_classes` x 3 uint8 colours; class i has the same colour whatever the class count.

    The first 20 are a fixed table, more continue the same farthest-point walk (see `_generated`); none is
    black (`IGNORE_COLOUR`), grey or white. `given` (a dataset's own colours, one [r, g, b] per class,
    possibly for fewer classes) wins for its classes; the others take the walk's colours, skipping those
    close to a given one (CIEDE2000 < 10).
    """
    if num_classes < 0:
        raise ValueError(f"num_classes={num_classes} must be >= 0")
    own = np.zeros((0, 3), np.int64) if given is None else np.asarray(given, dtype=np.int64)
    if own.ndim != 2 or own.shape[1] != 3 or (own.size and (own.min() < 0 or own.max() > 255)):
        raise ValueError("palette colours must be [r, g, b] in 0..255, one per class")
    own = own[:num_classes].astype(np.uint8)
    missing = num_classes - len(own)
    if not len(own):
        return _sequence(num_classes).copy()
    own_lab = srgb_to_lab(own)
    size = missing + len(own)
    while True:
        pool = _sequence(size)
        pool = pool[np.min(delta_e(srgb_to_lab(pool)[:, None], own_lab[None]), axis=1) >= 10]
        if len(pool) >= missing:
            return np.concatenate([own, pool[:missing]]).astype(np.uint8)
        size *= 2


def ignore_colour(colours: np.ndarray) -> tuple[int, int, int]:
    """`IGNORE_COLOUR`, unless a class colour (a dataset's own palette) is close to it: then whichever of
    black, grey and white is farthest from every class colour."""
    if not len(colours):
        return IGNORE_COLOUR
    reserved = srgb_to_lab(_RESERVED)
    nearest = np.min(delta_e(reserved[:, None], srgb_to_lab(np.asarray(colours))[None]), axis=1)
    return IGNORE_COLOUR if nearest[0] >= 10 else _RESERVED[int(np.argmax(nearest))]


def palette_for(manifest: Mapping[str, Any] | None, num_classes: int) -> np.ndarray:
    """The class colours of a dataset: the manifest's `palette` (a list of [r, g, b], one per class) where
    it has one, generated colours for the rest. A malformed `palette` is logged and ignored: pictures
    must not stop a run."""
    given = None if manifest is None else manifest.get("palette")
    if given is not None:
        try:
            return palette(num_classes, given)
        except (ValueError, TypeError) as e:
            log.warning("manifest palette ignored (expected a list of [r, g, b] in 0..255 per class): %s", e)
    return palette(num_classes)


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def colorize(mask: np.ndarray | torch.Tensor, num_classes: int, ignore_index: int = 255,
             colours: np.ndarray | None = None) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 in `colours` (default `palette(num_classes)`); the ignore index and any id
    outside the classes take `ignore_colour(colours)`."""
    mask = _as_numpy(mask).astype(np.int64, copy=False)
    if mask.ndim != 2:
        raise ValueError(f"expected an HxW mask, got shape {mask.shape}")
    colours = palette(num_classes) if colours is None else np.asarray(colours, np.uint8)[:num_classes]
    # One extra row for everything that is not a class, so a single lookup colours all pixels.
    table = np.concatenate([colours, np.array([ignore_colour(colours)], np.uint8)])
    valid = (mask >= 0) & (mask < num_classes)
    return table[np.where(valid, mask, num_classes)]


def overlay(image: np.ndarray, mask: np.ndarray | torch.Tensor, num_classes: int, ignore_index: int = 255,
            alpha: float = 0.5, colours: np.ndarray | None = None) -> np.ndarray:
    """Blend the mask's colours over a uint8 HxWx3 image (alpha = weight of the colours)."""
    image = _as_numpy(image)
    painted = colorize(mask, num_classes, ignore_index, colours)
    if image.shape != painted.shape:
        raise ValueError(f"image {image.shape} and mask {painted.shape[:2]} differ in size")
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * painted.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def denormalize(tensor: torch.Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float],
                dtype: str = "uint8") -> np.ndarray:
    """A normalised C x H x W image back to H x W x C pixels of `dtype` (the inverse of `data.normalize`):
    (x std + mean) times the type's full scale (`shards.FULL_SCALE`: 255, 65535, or 1 for float32), rounded
    and clipped to the type's range for integer types."""
    x = _as_numpy(tensor).astype(np.float32)
    c = len(mean)
    if x.ndim != 3 or x.shape[0] != c or len(std) != c:
        raise ValueError(f"expected a {c} x H x W tensor (one channel per mean), got shape {x.shape}")
    if dtype not in FULL_SCALE:
        raise ValueError(f"dtype={dtype!r}: expected one of {', '.join(FULL_SCALE)}")
    m = np.asarray(mean, np.float32).reshape(c, 1, 1)
    s = np.asarray(std, np.float32).reshape(c, 1, 1)
    x = (x * s + m) * np.float32(FULL_SCALE[dtype])
    if dtype != "float32":
        x = np.clip(np.rint(x), 0, FULL_SCALE[dtype])
    return x.astype(dtype).transpose(1, 2, 0).copy()


def display_bands(channels: int, bands: Sequence[int] | None = None) -> list[int]:
    """The channels a picture of a `channels`-channel image shows: `bands` (`data.display_bands`, one index
    for grey or three for RGB) where given, else the first three of 3+ channels, else the first. A UserError
    naming `data.display_bands` where an index is not one of the image's channels."""
    if bands is None:
        return [0, 1, 2] if channels >= 3 else [0]
    chosen = [int(b) for b in bands]
    if len(chosen) not in (1, 3) or any(not 0 <= b < channels for b in chosen):
        raise UserError(f"data.display_bands={chosen}: the images have {channels} channel(s), so give 1 or 3 "
                        f"indices in 0..{channels - 1} (or unset it: the first three, or the first)")
    return chosen


def display_image(image: np.ndarray | torch.Tensor, bands: Sequence[int] | None = None) -> np.ndarray:
    """An H x W or H x W x C image of uint8, uint16 or float32 pixels as loaded -> the uint8 H x W x 3 picture
    of it: the `display_bands` chosen (one band shown as grey), 8-bit values as they are, 16-bit and float
    values stretched linearly per shown band from its 2nd to its 98th percentile in this image to 0-255
    (a band that is flat there shows mid grey)."""
    a = _as_numpy(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.dtype.name not in FULL_SCALE:
        raise ValueError(f"expected an H x W x C image of {', '.join(FULL_SCALE)}, got {a.dtype} {a.shape}")
    chosen = display_bands(a.shape[2], bands)
    if a.dtype == np.uint8:
        shown = a if chosen == [0, 1, 2] and a.shape[2] == 3 else a[:, :, chosen]
    else:
        shown = np.stack([_stretch(a[:, :, b]) for b in chosen], axis=2)
    if shown.shape[2] == 1:
        shown = np.repeat(shown, 3, axis=2)
    return np.ascontiguousarray(shown)


def _stretch(band: np.ndarray) -> np.ndarray:
    """One H x W band of 16-bit or float values -> uint8, its 2-98 percentile range mapped to 0-255."""
    values = band.astype(np.float64)
    lo, hi = np.percentile(values, STRETCH_PERCENTILES)
    if hi <= lo:  # most of the band one value: stretch whatever else there is
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.full(band.shape, 128, np.uint8)
    return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _rgb(a: np.ndarray | torch.Tensor) -> np.ndarray:
    a = _as_numpy(a)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise ValueError(f"expected uint8 HxW or HxWx3 images, got {a.dtype} {a.shape}")
    return a


def grid(images: Sequence[np.ndarray], cols: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile uint8 images row by row, `cols` per row, in cells of the largest size, `pad` px apart."""
    if not images:
        raise ValueError("grid needs at least one image")
    if cols < 1 or pad < 0:
        raise ValueError(f"cols={cols} must be >= 1 and pad={pad} >= 0")
    tiles = [_rgb(a) for a in images]
    cols = min(cols, len(tiles))
    rows = -(-len(tiles) // cols)
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    out = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, 3), fill, np.uint8)
    for i, t in enumerate(tiles):
        y = pad + (i // cols) * (h + pad)
        x = pad + (i % cols) * (w + pad)
        out[y : y + t.shape[0], x : x + t.shape[1]] = t
    return out


def overlay_triptych(image: np.ndarray, target: np.ndarray | torch.Tensor, pred: np.ndarray | torch.Tensor,
                     num_classes: int, ignore_index: int = 255, alpha: float = 0.5) -> np.ndarray:
    """image | target overlay | prediction overlay, side by side, untitled (see `validation_pictures`)."""
    return grid([_rgb(image), overlay(image, target, num_classes, ignore_index, alpha),
                 overlay(image, pred, num_classes, ignore_index, alpha)], cols=3)


# --- text, legends and titled composites ------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own TrueType font at `px` px (Pillow >= 10.1 with FreeType), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def text_px(width: int) -> int:
    """Text height for a picture `width` px wide: readable at thumbnail size, in proportion when large."""
    return int(min(40, max(12, round(width / 55))))


def _text_width(text: str, px: int) -> int:
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=_font(px))
    return right - left


def _legend_layout(names: Sequence[str], width: int, px: int) -> tuple[list[tuple[int, int]], int]:
    """Top-left corner of each (swatch, name) entry, packed left to right in rows, and the strip's height."""
    swatch, gap, row_h = px, px, round(px * 1.5)
    spots, x, y = [], px // 2, px // 3
    for name in names:
        w = swatch + px // 3 + _text_width(name, px)
        if x + w > width and x > px // 2:
            x, y = px // 2, y + row_h
        spots.append((x, y))
        x += w + gap
    return spots, (y + row_h if names else 0)


def legend(names: Sequence[str], colours: np.ndarray, width: int, size: int | None = None) -> np.ndarray:
    """Rows of (colour swatch, name) packed left to right into a white strip `width` px wide; text and swatches
    `size` px high (default `text_px(width)`)."""
    px = size or text_px(width)
    spots, height = _legend_layout(names, width, px)
    img = Image.new("RGB", (max(width, 1), max(height, 1)), "white")
    draw = ImageDraw.Draw(img)
    for name, colour, (x, y) in zip(names, colours, spots, strict=True):
        draw.rectangle([x, y, x + px, y + px], fill=tuple(int(c) for c in colour), outline=(90, 90, 90))
        draw.text((x + px + px // 3, y + px / 2), name, fill="black", font=_font(px), anchor="lm")
    return np.asarray(img, dtype=np.uint8)


def _legend_entries(masks: Sequence[np.ndarray], class_names: Sequence[str], colours: np.ndarray,
                    ignore_index: int) -> tuple[list[str], np.ndarray]:
    """The classes present in any of `masks` (in class order), then "ignored" where a pixel is no class."""
    n = len(class_names)
    found: set[int] = set()
    for m in masks:
        found.update(int(v) for v in np.unique(m))
    present = sorted(c for c in found if 0 <= c < n)
    names = [str(class_names[c]) for c in present]
    rows = [colours[c] for c in present]
    if any(c < 0 or c >= n for c in found):
        label = "ignored" if ignore_index in found else "no class"
        names.append(label)
        rows.append(np.array(ignore_colour(colours), np.uint8))
    return names, np.array(rows, np.uint8).reshape(-1, 3)


def titled_panels(panels: Sequence[np.ndarray], titles: Sequence[str], cols: int,
                  legend_names: Sequence[str] = (), legend_colours: np.ndarray | None = None,
                  heading: str = "", max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """Panels in a grid, `cols` per row, each under its title, an optional heading on top and a legend
    below, all in text sized to the picture (`text_px`). If the whole is longer than `max_side` on either
    side, it is shrunk (box filter) to fit; callers shrink big panels first so the text stays readable."""
    if len(panels) != len(titles):
        raise ValueError(f"{len(panels)} panels but {len(titles)} titles")
    tiles = [_rgb(p) for p in panels]
    cols = max(1, min(cols, len(tiles)))
    rows = -(-len(tiles) // cols)
    h, w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    pad = max(2, w // 100)
    width = cols * w + (cols + 1) * pad
    px = text_px(width)
    title_h = round(px * 1.5)
    head_h = title_h if heading else 0
    height = head_h + rows * (title_h + h) + (rows + 1) * pad
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    if heading:
        draw.text((pad, head_h / 2 + pad / 2), heading, fill="black", font=_font(px), anchor="lm")
    for i, (tile, title) in enumerate(zip(tiles, titles, strict=True)):
        x = pad + (i % cols) * (w + pad)
        y = head_h + pad + (i // cols) * (title_h + h + pad)
        draw.text((x + w / 2, y + title_h / 2), _fit_text(title, w, px), fill="black", font=_font(px), anchor="mm")
        img.paste(Image.fromarray(np.ascontiguousarray(tile)), (x, y + title_h))
    out = np.asarray(img, dtype=np.uint8)
    if len(legend_names):
        colours = np.zeros((0, 3), np.uint8) if legend_colours is None else legend_colours
        out = np.concatenate([out, legend(legend_names, colours, width, px)], axis=0)
    return _shrink_to(out, max_side)


def _fit_text(text: str, width: int, px: int) -> str:
    """`text`, cut with an ellipsis to fit `width` px."""
    if _text_width(text, px) <= width:
        return text
    while len(text) > 1 and _text_width(text + "…", px) > width:
        text = text[:-1]
    return text + "…"


def _shrink_to(image: np.ndarray, max_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    size = (max(1, min(max_side, round(w * s))), max(1, min(max_side, round(h * s))))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX), dtype=np.uint8)


def _panel_scale(h: int, w: int, cols: int, rows: int, max_side: int, min_side: int) -> float:
    """Scale for h x w panels in a `cols` x `rows` grid: an integer enlargement for small ones (up to
    `min_side` on the shorter side), a reduction so the grid fits `max_side` with room for text."""
    fit = min(max_side / (cols * w * 1.02), 0.8 * max_side / (rows * h * 1.05))
    if min(h, w) < min_side:
        return float(max(1, min(-(-min_side // max(1, min(h, w))), math.floor(fit))))
    return min(1.0, fit)


def _resized(image: np.ndarray, masks: Sequence[np.ndarray], scale: float) -> tuple[np.ndarray, list[np.ndarray]]:
    """The image (box filter when reducing, pixel repeats when enlarging) and its label masks (nearest,
    so every pixel keeps a real class id) at `scale`."""
    if scale == 1.0:
        return image, list(masks)
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BOX
    small = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, resample), dtype=np.uint8)
    out = []
    for m in masks:
        m = np.asarray(m)
        # PIL resizes int32 ("I") images with NEAREST exactly; ids fit in int32.
        im = Image.fromarray(np.ascontiguousarray(m.astype(np.int32)))
        out.append(np.asarray(im.resize(size, Image.Resampling.NEAREST), dtype=np.int64))
    return small, out


def validation_pictures(examples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], mean: Sequence[float],
                        std: Sequence[float], num_classes: int, ignore_index: int = 255,
                        class_names: Sequence[str] | None = None, colours: np.ndarray | None = None,
                        keys: Sequence[str] | None = None, max_side: int = DEFAULT_MAX_SIDE,
                        alpha: float = 0.5, min_side: int = 160, display_bands: Sequence[int] | None = None,
                        raw: bool | None = None, dtype: str = "uint8") -> list[np.ndarray]:
    """One picture per (image, target, prediction): panels "image | ground truth | prediction" titled, the
    sample's key on top (where `keys` are given), and a legend of the classes in the truth or the prediction.

    An image is either as loaded, H x W x C in its own type (what `validate` keeps), or a normalised
    C x H x W float tensor, undone with `mean`/`std` in `dtype`'s full scale (`denormalize`). `raw`: True
    for images as loaded (a float32 dataset's too), False for normalised ones; None: uint8 and uint16
    images are as loaded, float ones normalised. The image panel shows `display_bands` (`display_image`).
    Small images are enlarged (pixel repeats) to `min_side`, large ones reduced so that no picture exceeds
    `max_side` px on either side.
    """
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(num_classes)]
    colours = palette(num_classes) if colours is None else np.asarray(colours, np.uint8)
    pictures = []
    for i, (image, target, pred) in enumerate(examples):
        image = _as_numpy(image)
        loaded = raw if raw is not None else image.dtype in (np.uint8, np.uint16)
        rgb = display_image(image if loaded else denormalize(image, mean, std, dtype), display_bands)
        t, p = _as_numpy(target), _as_numpy(pred)
        scale = _panel_scale(*rgb.shape[:2], cols=3, rows=1, max_side=max_side, min_side=min_side)
        rgb, (t, p) = _resized(rgb, [t, p], scale)
        panels = [rgb, overlay(rgb, t, num_classes, ignore_index, alpha, colours),
                  overlay(rgb, p, num_classes, ignore_index, alpha, colours)]
        entries, swatches = _legend_entries([t, p], names, colours, ignore_index)
        heading = f"{keys[i]}" if keys is not None else ""
        pictures.append(titled_panels(panels, ["image", "ground truth", "prediction"], 3, entries, swatches,
                                      heading=heading, max_side=max_side))
    return pictures


def overlay_with_legend(image: np.ndarray, mask: np.ndarray | torch.Tensor, class_names: Sequence[str],
                        alpha: float = 0.5, min_side: int = 160, max_side: int = DEFAULT_MAX_SIDE,
                        colours: np.ndarray | None = None, ignore_index: int = 255,
                        display_bands: Sequence[int] | None = None) -> np.ndarray:
    """Predict's picture: "image | prediction | blend" titled, a legend of the classes present below, at
    most `max_side` px on either side (a large image is reduced for viewing; the mask itself is not). The
    image is H x W (x C) in its own type, shown through `display_image` with `display_bands`."""
    n = len(class_names)
    colours = palette(n) if colours is None else np.asarray(colours, np.uint8)
    rgb, m = display_image(image, display_bands), _as_numpy(mask)
    scale = _panel_scale(*rgb.shape[:2], cols=3, rows=1, max_side=max_side, min_side=min_side)
    rgb, (m,) = _resized(rgb, [m], scale)
    panels = [rgb, colorize(m, n, ignore_index, colours), overlay(rgb, m, n, ignore_index, alpha, colours)]
    entries, swatches = _legend_entries([m], class_names, colours, ignore_index)
    return titled_panels(panels, ["image", "prediction", "blend"], 3, entries, swatches, max_side=max_side)


def preview_grid(samples: Sequence[tuple[np.ndarray, np.ndarray]], class_names: Sequence[str], cols: int,
                 ignore_index: int = 255, colours: np.ndarray | None = None, heading: str = "",
                 max_side: int = DEFAULT_MAX_SIDE, alpha: float = 0.5, min_side: int = 96,
                 display_bands: Sequence[int] | None = None) -> np.ndarray:
    """The augmentation preview: `cols` samples per row, each as "i image | i labels" titled, one legend of
    the classes in any sample below; at most `max_side` px on either side. Images are H x W (x C) in their
    own type, shown through `display_image` with `display_bands`."""
    if not samples:
        raise ValueError("preview_grid needs at least one sample")
    n = len(class_names)
    colours = palette(n) if colours is None else np.asarray(colours, np.uint8)
    cols = max(1, min(cols, len(samples)))
    h = max(np.asarray(img).shape[0] for img, _ in samples)
    w = max(np.asarray(img).shape[1] for img, _ in samples)
    scale = _panel_scale(h, w, cols=2 * cols, rows=-(-len(samples) // cols), max_side=max_side, min_side=min_side)
    panels, titles, masks = [], [], []
    for i, (image, mask) in enumerate(samples):
        rgb, (m,) = _resized(display_image(image, display_bands), [_as_numpy(mask)], scale)
        panels += [rgb, overlay(rgb, m, n, ignore_index, alpha, colours)]
        titles += [f"{i} image", f"{i} labels"]
        masks.append(m)
    entries, swatches = _legend_entries(masks, class_names, colours, ignore_index)
    return titled_panels(panels, titles, 2 * cols, entries, swatches, heading=heading, max_side=max_side)


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 HxW or HxWx3 array as PNG; readers never see a half-written file."""
    a = _as_numpy(array)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"expected a uint8 HxW or HxWx3 array, got {a.dtype} {a.shape}")
    path = Path(path)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, buf.getvalue())


def enlarge(image: np.ndarray, min_side: int = 160) -> np.ndarray:
    """Repeat pixels (nearest, so label edges stay sharp) until the shorter side is >= min_side."""
    factor = max(1, -(-min_side // max(1, min(image.shape[:2]))))
    if factor == 1:
        return image
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def _shade(v: float) -> tuple[int, int, int]:
    """White (0) to dark blue (1)."""
    return (round(255 - 247 * v), round(255 - 207 * v), round(255 - 148 * v))


def confusion_matrix_figure(
    mat: torch.Tensor | np.ndarray, class_names: Sequence[str] | None = None, max_size: int = 1024
) -> np.ndarray:
    """Heatmap of the row-normalised confusion matrix (rows: target, columns: prediction).

    Returns an HxWx3 uint8 image (for `SummaryWriter.add_image(..., dataformats="HWC")`), drawn
    with PIL only. Rows with no target pixels stay white. Cell values (percent of the row) are
    written when cells are large enough; columns are labelled by class index.
    """
    m = np.asarray(mat.detach().cpu() if isinstance(mat, torch.Tensor) else mat, dtype=np.float64)
    n = m.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n or m.shape != (n, n):
        raise ValueError(f"expected a square {len(names)}x{len(names)} matrix, got {m.shape}")
    rows = m.sum(axis=1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(s: str) -> tuple[int, int]:
        left, top, right, bottom = probe.textbbox((0, 0), s)
        return right - left, bottom - top

    labels = [f"{i} {name}" for i, name in enumerate(names)]
    label_w = max(text_size(s)[0] for s in labels) + 8
    char_h = text_size("0")[1]
    cell = max(2, min(28, (max_size - label_w) // max(n, 1)))
    top = char_h + 8 + (char_h + 6 if cell >= 14 else 0)
    img = Image.new("RGB", (label_w + n * cell + 1, top + n * cell + 1), "white")
    draw = ImageDraw.Draw(img)
    draw.text((label_w, 2), "target \\ pred", fill="black")

    for i in range(n):
        y = top + i * cell
        if cell >= char_h:
            draw.text((2, y + (cell - char_h) // 2), labels[i], fill="black")
        if cell >= 14:
            w, _ = text_size(str(i))
            draw.text((label_w + i * cell + (cell - w) // 2, top - char_h - 4), str(i), fill="black")
        for j in range(n):
            x = label_w + j * cell
            v = float(norm[i, j])
            draw.rectangle([x, y, x + cell, y + cell], fill=_shade(v), outline=(200, 200, 200))
            if cell >= 24 and rows[i, 0] > 0:
                s = f"{100 * v:.0f}"
                w, h = text_size(s)
                fg = "white" if v > 0.5 else "black"
                draw.text((x + (cell - w) // 2, y + (cell - h) // 2), s, fill=fg)
    return np.asarray(img, dtype=np.uint8)


def bar_chart(values: Sequence[float], names: Sequence[str], title: str, width: int = 640) -> np.ndarray:
    """Horizontal bars of values in [0, 1] (e.g. IoU per class), one row per name, value written beside."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([probe.textbbox((0, 0), s)[2] for s in names] + [0]) + 10
    row_h = 16
    img = Image.new("RGB", (width, 24 + row_h * len(names) + 6), "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title, fill="black")
    bar_w = width - label_w - 50
    colours = palette(len(names))
    for i, (name, value) in enumerate(zip(names, values, strict=True)):
        y = 24 + i * row_h
        draw.text((4, y + 2), name, fill="black")
        if value is None or math.isnan(value):
            draw.text((label_w, y + 2), "absent", fill=(120, 120, 120))
            continue
        colour = tuple(int(c) for c in colours[i])
        draw.rectangle([label_w, y + 2, label_w + max(1, round(bar_w * value)), y + row_h - 3], fill=colour)
        draw.text((label_w + round(bar_w * value) + 4, y + 2), f"{value:.3f}", fill="black")
    return np.asarray(img, dtype=np.uint8)


def save_mask_png(path: str | Path, mask: np.ndarray, num_classes: int, colours: np.ndarray | None = None) -> None:
    """Class ids as a palette PNG: `np.array(Image.open(path))` gives the ids back, viewers show the class
    colours (`colours`, default `palette(num_classes)`) and any other id in the ignore colour. More than 256
    classes do not fit a palette: a 16-bit grey PNG then. Always the mask's full size."""
    mask = _as_numpy(mask)
    if num_classes <= 256:
        im = Image.fromarray(mask.astype(np.uint8), mode="P")
        own = palette(num_classes) if colours is None else np.asarray(colours, np.uint8)[:num_classes]
        table = np.tile(np.array(ignore_colour(own), np.uint8), (256, 1))
        table[:num_classes] = own
        im.putpalette(table.tobytes())
    else:
        im = Image.fromarray(mask.astype(np.uint16))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic.write_bytes(path, buf.getvalue())
