"""Pictures: the class palette, colourised masks, overlays, grids, the confusion matrix, PNG writes.

The one home of class colours: training overlays, previews, the synthetic dataset's palette PNGs
and predictions all draw with `palette()` and paint ignored pixels `IGNORE_COLOUR`. No matplotlib.
"""

from __future__ import annotations

import colorsys
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import atomic

__all__ = [
    "IGNORE_COLOUR", "bar_chart", "colorize", "confusion_matrix_figure", "denormalize", "enlarge", "grid",
    "legend", "overlay", "overlay_triptych", "overlay_with_legend", "palette", "save_mask_png", "save_png",
    "validation_pictures",
]

IGNORE_COLOUR = (255, 255, 255)

# Fixed first colours, chosen to be far apart; the synthetic dataset's classes use the first six.
_BASE_COLOURS = (
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (240, 50, 230),
    (70, 240, 240), (245, 130, 48), (145, 30, 180), (210, 245, 60), (250, 190, 212), (0, 128, 128),
    (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0),
    (255, 215, 180), (0, 0, 128), (128, 128, 128),
)  # fmt: skip


def palette(num_classes: int) -> np.ndarray:
    """`num_classes` x 3 uint8 colours: ~20 fixed distinct ones first (class 0 black), then golden-ratio hues.

    Deterministic, so the same class has the same colour everywhere; the ignore index is not
    included (it is drawn in `IGNORE_COLOUR`).
    """
    colours = list(_BASE_COLOURS[:num_classes])
    i = 0
    while len(colours) < num_classes:
        # Golden-ratio hue steps spread hues evenly; cycling value/saturation separates near-equal hues.
        hue = (i * 0.618033988749895) % 1.0
        sat = (0.9, 0.6, 0.75)[i % 3]
        val = (0.95, 0.7, 0.5)[(i // 3) % 3]
        colours.append(tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)))
        i += 1
    return np.array(colours, dtype=np.uint8).reshape(num_classes, 3)


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def colorize(mask: np.ndarray | torch.Tensor, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8; the ignore index (and any id outside the classes) is white."""
    mask = _as_numpy(mask).astype(np.int64, copy=False)
    if mask.ndim != 2:
        raise ValueError(f"expected an HxW mask, got shape {mask.shape}")
    # One extra row for everything that is not a class, so a single lookup colours all pixels.
    table = np.concatenate([palette(num_classes), np.array([IGNORE_COLOUR], np.uint8)])
    valid = (mask >= 0) & (mask < num_classes)
    return table[np.where(valid, mask, num_classes)]


def overlay(image: np.ndarray, mask: np.ndarray | torch.Tensor, num_classes: int, ignore_index: int = 255,
            alpha: float = 0.5) -> np.ndarray:
    """Blend the mask's colours over a uint8 HxWx3 image (alpha = weight of the colours)."""
    image = _as_numpy(image)
    colours = colorize(mask, num_classes, ignore_index)
    if image.shape != colours.shape:
        raise ValueError(f"image {image.shape} and mask {colours.shape[:2]} differ in size")
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def denormalize(tensor: torch.Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised 3xHxW image back to HxWx3 uint8 (inverse of albumentations' Normalize)."""
    x = _as_numpy(tensor).astype(np.float32)
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a 3xHxW tensor, got shape {x.shape}")
    m = np.asarray(mean, np.float32).reshape(3, 1, 1)
    s = np.asarray(std, np.float32).reshape(3, 1, 1)
    x = (x * s + m) * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8).transpose(1, 2, 0).copy()


def _rgb(a: np.ndarray) -> np.ndarray:
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
    """image | target overlay | prediction overlay, side by side (validation examples)."""
    return grid([_rgb(image), overlay(image, target, num_classes, ignore_index, alpha),
                 overlay(image, pred, num_classes, ignore_index, alpha)], cols=3)


def validation_pictures(examples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], mean: Sequence[float],
                        std: Sequence[float], num_classes: int, ignore_index: int = 255) -> list[np.ndarray]:
    """image | ground truth | prediction, enlarged, for each (normalised image, target, prediction)."""
    return [enlarge(overlay_triptych(denormalize(image, mean, std), target, pred, num_classes, ignore_index))
            for image, target, pred in examples]


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


def legend(names: Sequence[str], colours: np.ndarray, width: int, swatch: int = 12) -> np.ndarray:
    """Rows of (colour swatch, name) packed left to right into a white strip `width` px wide."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sizes = [probe.textbbox((0, 0), name)[2] for name in names]
    row_h, gap = swatch + 6, 14
    rows, x = 1, 4
    for size in sizes:  # first pass: how many rows
        if x + swatch + 4 + size > width and x > 4:
            rows, x = rows + 1, 4
        x += swatch + 4 + size + gap
    img = Image.new("RGB", (max(width, 1), rows * row_h + 4), "white")
    draw = ImageDraw.Draw(img)
    row, x = 0, 4
    for name, colour, size in zip(names, colours, sizes, strict=True):
        if x + swatch + 4 + size > width and x > 4:
            row, x = row + 1, 4
        y = 4 + row * row_h
        draw.rectangle([x, y, x + swatch, y + swatch], fill=tuple(int(c) for c in colour), outline=(90, 90, 90))
        draw.text((x + swatch + 4, y), name, fill="black")
        x += swatch + 4 + size + gap
    return np.asarray(img, dtype=np.uint8)


def overlay_with_legend(image: np.ndarray, mask: np.ndarray | torch.Tensor, class_names: Sequence[str],
                        alpha: float = 0.5, min_side: int = 160) -> np.ndarray:
    """The seed's picture: image | prediction | blend, and below it the colours of the classes present."""
    mask = _as_numpy(mask)
    n = len(class_names)
    picture = grid([_rgb(image), colorize(mask, n), overlay(image, mask, n, alpha=alpha)], cols=3)
    picture = enlarge(picture, min_side)
    present = [int(c) for c in np.unique(mask) if 0 <= c < n]
    colours = palette(n)
    strip = legend([class_names[c] for c in present], colours[present], picture.shape[1])
    return np.concatenate([picture, strip], axis=0)


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
        colour = tuple(int(c) for c in colours[i]) if i else (90, 90, 90)  # class 0 is black: grey bar
        draw.rectangle([label_w, y + 2, label_w + max(1, round(bar_w * value)), y + row_h - 3], fill=colour)
        draw.text((label_w + round(bar_w * value) + 4, y + 2), f"{value:.3f}", fill="black")
    return np.asarray(img, dtype=np.uint8)


def save_mask_png(path: str | Path, mask: np.ndarray, num_classes: int) -> None:
    """Class ids as a palette PNG: `np.array(Image.open(path))` gives the ids back, viewers show colours.
    More than 256 classes do not fit a palette: a 16-bit grey PNG then."""
    mask = _as_numpy(mask)
    if num_classes <= 256:
        im = Image.fromarray(mask.astype(np.uint8), mode="P")
        colours = np.zeros((256, 3), np.uint8)
        colours[:num_classes] = palette(num_classes)
        im.putpalette(colours.tobytes())
    else:
        im = Image.fromarray(mask.astype(np.uint16))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    atomic.write_bytes(path, buf.getvalue())
