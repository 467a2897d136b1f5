"""Procedural multi-class segmentation dataset, for tests, demos and smoke training (the library).

`render(i)` draws sample i; `generate(dir, n)` writes dir/images/*.jpg and dir/masks/*.png, the masks as
palette ("P") PNGs whose index is the class id, coloured with the shared class palette so they can be
looked at. Classes are told apart mostly by hue (saturated objects on a low-saturation textured
background) and secondarily by shape, so a small U-Net learns them in minutes on a CPU, while occlusion,
texture, noise, JPEG artefacts and class imbalance keep the task non-trivial.

Two more kinds prove that images reach the model with every bit and band (`KINDS`, `kind=` of `generate`):
`grey16`, 16-bit grey PNGs whose classes differ only in the low byte of values 4096-4351 (converting to 8
bits, by `>> 8` or by clipping to 0-255, leaves one grey for every class), and `bands4`, 4-band 16-bit
TIFFs (RGB + near infrared) whose classes differ only in the fourth band.

Commands: `python -m seg_dist.synth` writes the files; `python -m seg_dist.pack --synthetic` packs them.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
from PIL import Image

from seg_dist.errors import UserError
from seg_dist.visualize import IGNORE_COLOUR, palette

__all__ = ["BAND_CLASS_NAMES", "CLASS_NAMES", "IGNORE_INDEX", "KINDS", "PALETTE", "class_names", "generate",
           "mask_image", "render", "render_bands"]

CLASS_NAMES = ("background", "disc", "square", "triangle", "ring", "blob")
# The kinds of dataset `generate` writes: the 8-bit RGB photos-like set, and the two that 8-bit RGB
# decoding would lose (16-bit grey, 4-band 16-bit).
KINDS = ("rgb", "grey16", "bands4")
BAND_CLASS_NAMES = ("background", "low", "high")
PALETTE = [tuple(int(v) for v in c) for c in palette(len(CLASS_NAMES))]
IGNORE_INDEX = 255

# Per object class: hue centre (jittered by _HUE_JITTER, so red discs and yellow rings overlap a little and
# shape has to break the tie) and how often an object is of that class (blob is the rare one).
_HUES = {1: 0.0, 2: 0.34, 3: 0.62, 4: 0.14, 5: 0.83}
_HUE_JITTER = 0.06
_CLASS_P = np.array([0.32, 0.27, 0.25, 0.10, 0.06])
# Pixels whose centre is this close (px) to an edge are partly covered: labelled ignore, like VOC's void band.
_IGNORE_BAND = 0.2


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    coarse = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _grating(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int, max_amp: float) -> np.ndarray:
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    freq = rng.uniform(1.5, 6.0) / size
    amp = rng.uniform(0, max_amp)
    return amp * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    hue, sat, val = rng.random(), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.75)
    c0 = _hsv(hue, sat, val)
    c1 = _hsv(hue + rng.uniform(-0.1, 0.1), sat + rng.uniform(-0.1, 0.1), val + rng.uniform(-0.25, 0.25))
    angle = rng.uniform(0, 2 * np.pi)
    t = ((xx - size / 2) * np.cos(angle) + (yy - size / 2) * np.sin(angle)) / size + 0.5
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img += _grating(rng, yy, xx, size, 0.12)[..., None]
    img += 0.05 * _smooth_noise(rng, size, 6)[..., None]
    return img


def _sdf(cls: int, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """Signed distance (px, negative inside) to a random shape of class `cls`; exact enough near edges."""
    cx, cy = rng.uniform(0.1, 0.9, size=2) * size
    dx, dy = xx - cx, yy - cy
    dist = np.hypot(dx, dy)
    theta = rng.uniform(0, 2 * np.pi)
    if cls == 1:  # disc
        return dist - rng.uniform(0.09, 0.2) * size
    if cls == 2:  # rotated square
        half = rng.uniform(0.08, 0.17) * size
        u = np.abs(dx * np.cos(theta) + dy * np.sin(theta)) - half
        v = np.abs(-dx * np.sin(theta) + dy * np.cos(theta)) - half
        return np.hypot(np.maximum(u, 0), np.maximum(v, 0)) + np.minimum(np.maximum(u, v), 0)
    if cls == 3:  # equilateral triangle: intersection of three half-planes at the inradius
        inradius = rng.uniform(0.06, 0.12) * size
        angles = theta + np.array([0, 2, 4]) * np.pi / 3
        sides = [dx * np.cos(a) + dy * np.sin(a) - inradius for a in angles]
        return np.maximum.reduce(sides)
    if cls == 4:  # ring, thick enough (>= 3 px at 64 px) to stay learnable
        mid, width = rng.uniform(0.13, 0.22) * size, rng.uniform(0.05, 0.08) * size
        return np.abs(dist - mid) - width / 2
    # blob: a disc whose radius wobbles with angle
    phi = np.arctan2(dy, dx)
    a1, a2 = rng.uniform(0.1, 0.25, size=2)
    p1, p2 = rng.uniform(0, 2 * np.pi, size=2)
    radius = rng.uniform(0.08, 0.16) * size * (1 + a1 * np.sin(2 * phi + p1) + a2 * np.sin(3 * phi + p2))
    return dist - radius


def render(index: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sample `index` of the dataset: (uint8 HxWx3 RGB image, uint8 HxW labels with IGNORE_INDEX)."""
    # Seeded per sample, so sample i is the same whatever n is.
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    img = _background(rng, yy, xx, size)
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 5)):
        cls = int(rng.choice(np.arange(1, 6), p=_CLASS_P))
        sdf = _sdf(cls, rng, yy, xx, size)
        colour = _hsv(
            _HUES[cls] + rng.uniform(-_HUE_JITTER, _HUE_JITTER), rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0)
        )
        shade = 1 + _grating(rng, yy, xx, size, 0.15) + rng.uniform(-0.004, 0.004) * (xx - size / 2)
        # Anti-aliased edge: coverage falls from 1 to 0 across one pixel.
        alpha = np.clip(0.5 - sdf, 0, 1)[..., None]
        img = img * (1 - alpha) + colour * shade[..., None] * alpha
        # Later objects are painted over earlier ones, labels included (occlusion).
        label[sdf < 0] = cls
        label[np.abs(sdf) < _IGNORE_BAND] = IGNORE_INDEX
    img += rng.normal(0, 0.025, img.shape)
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), label


def mask_image(label: np.ndarray) -> Image.Image:
    """Palette ("P") PIL image of `label`: index = class id, coloured with PALETTE."""
    im = Image.fromarray(label.astype(np.uint8))
    colours = np.zeros((256, 3), np.uint8)
    colours[: len(PALETTE)] = PALETTE
    colours[IGNORE_INDEX] = IGNORE_COLOUR
    im.putpalette(colours.tobytes())
    return im


# grey16: every value is 0x1000 + a low byte, so the high byte (what `>> 8` keeps) is 16 everywhere and
# clipping to 0-255 gives 255 everywhere. The classes' low bytes: background, "low" and "high" objects.
_GREY16_BASE = 0x1000
_GREY16_LEVELS = (40.0, 128.0, 216.0)
_GREY16_NOISE = 18.0
# bands4: red, green and blue are one texture for every class; near infrared tells them apart.
_NIR_LEVELS = (8000.0, 20000.0, 32000.0)
_NIR_NOISE = 2500.0


def class_names(kind: str = "rgb") -> tuple[str, ...]:
    """The class names of a kind of synthetic dataset."""
    return CLASS_NAMES if kind == "rgb" else BAND_CLASS_NAMES


def render_bands(index: int, size: int = 64, seed: int = 0, kind: str = "grey16") -> tuple[np.ndarray, np.ndarray]:
    """Sample `index` of a `grey16` (uint16 H x W) or `bands4` (uint16 H x W x 4) set: (image, uint8 labels
    of BAND_CLASS_NAMES). Discs and squares of class 1 or 2 on background 0, no ignored pixels."""
    if kind not in ("grey16", "bands4"):
        raise ValueError(f"kind={kind!r}: expected grey16 or bands4")
    rng = np.random.default_rng([seed, index, KINDS.index(kind)])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, 3))
        cx, cy = rng.uniform(0.15, 0.85, size=2) * size
        r = rng.uniform(0.1, 0.22) * size
        inside = np.hypot(xx - cx, yy - cy) < r if rng.random() < 0.5 else np.maximum(
            np.abs(xx - cx), np.abs(yy - cy)) < r * 0.85
        label[inside] = cls
    if kind == "grey16":
        low = np.asarray(_GREY16_LEVELS, np.float32)[label] + rng.normal(0, _GREY16_NOISE, label.shape)
        return (_GREY16_BASE + np.clip(np.rint(low), 0, 255)).astype(np.uint16), label
    texture = 12000 + 6000 * _smooth_noise(rng, size, 5)[..., None] + rng.normal(0, 1500, (size, size, 3))
    nir = np.asarray(_NIR_LEVELS, np.float32)[label] + rng.normal(0, _NIR_NOISE, label.shape)
    bands = np.concatenate([texture, nir[..., None]], axis=2)
    return np.clip(np.rint(bands), 0, 65535).astype(np.uint16), label


def _write_bands(path: Path, image: np.ndarray) -> None:
    if image.ndim == 2:  # 16-bit grey PNG
        Image.fromarray(image).save(path.with_suffix(".png"))
        return
    import tifffile  # only the multi-band set needs it

    tifffile.imwrite(path.with_suffix(".tif"), image, photometric="minisblack", planarconfig="contig")


def generate(out_dir: str | Path, n: int = 480, size: int = 64, seed: int = 0, overwrite: bool = False,
             kind: str = "rgb") -> Path:
    """Write `n` samples to out_dir/images/synth_NNNNN.jpg (`grey16`: .png, `bands4`: .tif) and
    out_dir/masks/synth_NNNNN.png."""
    if n < 1 or size < 8:
        raise UserError(f"--n {n} --size {size}: need n >= 1 samples of size >= 8 pixels")
    if kind not in KINDS:
        raise UserError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
    out = Path(out_dir)
    images, masks = out / "images", out / "masks"
    existing = [p for d in (images, masks) if d.is_dir() for p in d.iterdir()]
    if existing and not overwrite:
        raise UserError(f"{out}: images/ or masks/ already has files; pass overwrite (--overwrite)")
    for p in existing:
        # Only our own files go, so a mistyped --out cannot wipe someone's data.
        if p.name.startswith("synth_") and p.suffix in (".jpg", ".png", ".tif"):
            p.unlink()
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    if kind != "rgb":
        for i in range(n):
            image, label = render_bands(i, size, seed, kind)
            _write_bands(images / f"synth_{i:05d}", image)
            mask_image(label).save(masks / f"synth_{i:05d}.png")
        return out
    for i in range(n):
        img, label = render(i, size, seed)
        # 4:4:4 chroma: colour is the main cue, and 4:2:0 would smear it across small-object edges.
        Image.fromarray(img).save(images / f"synth_{i:05d}.jpg", quality=95, subsampling=0)
        mask_image(label).save(masks / f"synth_{i:05d}.png")
    return out
