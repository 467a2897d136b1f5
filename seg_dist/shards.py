"""Shard-folder conventions shared by the packer (`seg_dist.pack`) and the data loader.

A packed dataset is a folder of WebDataset tar shards plus `manifest.json`; see shards/README.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
from PIL import Image, ImageOps

from . import remote
from .errors import UserError

__all__ = [
    "FORMAT",
    "FULL_SCALE",
    "IMAGE_DTYPES",
    "IMAGE_EXTS",
    "IMAGE_MODES",
    "LABEL_MODES",
    "MANIFEST",
    "MASK_FIELD",
    "META_FIELD",
    "RGB8",
    "TURNED_ORIENTATIONS",
    "DecodedImage",
    "ImageError",
    "ImageSpec",
    "ManifestError",
    "ShardError",
    "conform_image",
    "decode_image",
    "decode_mask",
    "exif_orientation",
    "existing_shards",
    "image_spec",
    "image_statistics",
    "load_manifest",
    "manifest_digest",
    "orientation_text",
    "packed_size",
    "promotable",
    "read_image",
    "rotation_invariant",
    "shard_counts",
    "shard_name",
    "shard_name_pattern",
    "shard_urls",
    "split_count",
    "upright_labels",
    "verify_shards",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "seg_dist-shards/1"
# Field names (WebDataset "extensions") an image may have inside a sample.
IMAGE_EXTS = ("jpg", "png", "tif", "bmp", "npy")
MASK_FIELD = "mask.png"
META_FIELD = "json"

_TOP_KEYS = ("format", "num_classes", "ignore_index", "class_names", "splits")
_SPLIT_KEYS = ("num_samples", "shards", "class_histogram", "image_size")
# As stored (after --max-size), and the mean size of the original images as viewers show them.
_IMAGE_SIZE_KEYS = ("min_hw", "max_hw", "mean_hw", "original_mean_hw")
_SHARD_KEYS = ("name", "num_samples")

# Single-channel PIL modes whose pixel values are the labels themselves ("P": palette indices).
LABEL_MODES = ("P", "L", "I;16", "I;16L", "I;16B", "I", "1")
# PIL modes of 8 (or 1) bits per channel, which convert("RGB") keeps as they are (alpha is dropped, CMYK and
# YCbCr are converted). Anything else (16-bit, 32-bit integer, float) it would clip to 0 or 255 without a
# word, so such images are refused until they are read faithfully.
IMAGE_MODES = ("1", "L", "P", "LA", "La", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`: `train-000000.tar`, ... (sorts in shard order)."""
    return f"{split}-{index:06d}.tar"


def shard_name_pattern(split: str) -> re.Pattern[str]:
    """Matches (fullmatch) exactly the names `shard_name(split, i)` gives."""
    return re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")


def packed_size(height: int, width: int, max_size: int | None) -> tuple[int, int]:
    """(height, width) an image of this size is stored at by `pack --max-size max_size`: scaled down so
    the longer side is `max_size`, each side rounded and at least 1; unchanged when it already fits or
    `max_size` is None. The one rule for the packing scale, so anything that must bring an image to the
    scale a model was trained at computes the same size."""
    if max_size is None or max(height, width) <= max_size:
        return height, width
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1 or None, got {max_size}")
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def too_many_pixels(error: BaseException) -> str:
    """A file Pillow refuses to decode for its size (its guard against decompression bombs), as one line with
    the size and what to do: the message pack and predict give."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(found.group(1)) / 1e6:.4g} Mpx" if found else "too many pixels"
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6
    return (f"{size}, more than the {limit:.4g} Mpx Pillow decodes (its guard against decompression bombs); cut "
            "or reduce it first (e.g. `magick IN -crop 8192x8192 OUT_%d.png` or `magick IN -resize 50% OUT.png`), "
            "or, from Python, raise PIL.Image.MAX_IMAGE_PIXELS first")


# 8-bit images PIL resizes (its bilinear filter; premultiplied alpha for RGBA).
_RESIZE_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """H x W x C `image` (uint8, uint16 or float32) at `height` x `width`, in its own type, by the filters
    pack --max-size uses: PIL's bilinear for 8-bit images of 1 to 4 channels; OpenCV for every other kind
    (any band count), area averaging to reduce and bilinear to enlarge."""
    h, w, c = image.shape
    if (h, w) == (height, width):
        return image
    if image.dtype == np.uint8 and c in _RESIZE_MODES:
        mode = _RESIZE_MODES[c]
        picture = Image.fromarray(np.ascontiguousarray(image[:, :, 0] if c == 1 else image), mode)
        return np.asarray(picture.resize((width, height), Image.Resampling.BILINEAR)).reshape(height, width, c)
    interpolation = cv2.INTER_AREA if height <= h and width <= w else cv2.INTER_LINEAR
    # OpenCV's area filter refuses more than 4 channels at whole-number factors: 4 at a time (each channel
    # is resized on its own anyway, so the values are the same).
    parts = [cv2.resize(np.ascontiguousarray(image[:, :, i : i + 4]), (width, height), interpolation=interpolation)
             .reshape(height, width, -1) for i in range(0, c, 4)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=2)


def existing_shards(root: str | Path, split: str) -> list[Path]:
    """Shard files of `split` in `root`, sorted, whether or not a manifest lists them."""
    root = Path(root)
    if not root.is_dir():
        return []
    pattern = shard_name_pattern(split)
    return sorted(p for p in root.iterdir() if pattern.fullmatch(p.name))


class ShardError(UserError):
    """A shard that cannot be read as the manifest describes it (truncated, replaced, damaged)."""

    HINT = "re-copy it from where it was packed, or re-pack the dataset"

    @classmethod
    def unreadable(cls, url: str, error: BaseException, opening: bool = False) -> ShardError:
        """A shard that cannot be opened, or whose tar structure or bytes end or break where they should not."""
        if opening or isinstance(error, FileNotFoundError):
            return cls(f"{url}: cannot open ({error}); {cls.HINT}")
        return cls(f"{url}: unreadable shard ({type(error).__name__}: {error}); {cls.HINT}")

    @classmethod
    def one_line(cls, error: BaseException) -> ShardError:
        """The original message of a ShardError that a DataLoader worker re-raised with its traceback."""
        lines = [line for line in str(error).strip().splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        return cls(last.split("ShardError: ", 1)[-1])


def verify_shards(root: str | Path, manifest: dict[str, Any], splits: Sequence[str], full: bool = False) -> None:
    """Every shard of `splits` exists with the manifest's byte size (and sha256 with `full`); one error
    listing every shard that does not."""
    if remote.is_remote(str(root)):
        _verify_remote(str(root), manifest, splits, full)
        return
    base = Path(root)
    problems = []
    for split in splits:
        for shard in _split(manifest, split)["shards"]:
            path = base / shard["name"]
            size = path.stat().st_size if path.is_file() else None
            if size is None:
                problems.append(f"{path}: missing")
            elif "bytes" in shard and size != shard["bytes"]:
                problems.append(f"{path}: {size} bytes, the manifest lists {shard['bytes']} (truncated or replaced)")
            elif full and "sha256" in shard and _sha256(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest's (damaged or replaced)")
    if problems:
        raise ShardError(f"{'; '.join(problems)}: {ShardError.HINT}")


def _verify_remote(root: str, manifest: dict[str, Any], splits: Sequence[str], full: bool) -> None:
    """`verify_shards` over a remote root: sizes by HEAD requests where the scheme has them (http, https, s3,
    gs with fsspec), sha256 by reading every shard."""
    problems = []
    unsized = 0
    for split in splits:
        for shard in _split(manifest, split)["shards"]:
            url = remote.join(root, shard["name"])
            try:
                size = remote.remote_size(url)
            except FileNotFoundError:
                problems.append(f"{url}: missing")
                continue
            except OSError as e:
                problems.append(f"{url}: cannot ask for its size ({e})")
                continue
            if size is None:
                unsized += 1
            elif "bytes" in shard and size != shard["bytes"]:
                problems.append(f"{url}: {size} bytes, the manifest lists {shard['bytes']} (truncated or replaced)")
                continue
            if full and "sha256" in shard:
                try:
                    digest = _sha256(url)
                except OSError as e:
                    problems.append(f"{url}: unreadable ({e})")
                    continue
                if digest != shard["sha256"]:
                    problems.append(f"{url}: sha256 differs from the manifest's (damaged or replaced)")
    if unsized:
        log.info("data.verify: %s shards have no size to ask for (%s:); their sizes are not checked",
                 unsized, remote.scheme(root))
    if problems:
        raise ShardError(f"{'; '.join(problems)}: {ShardError.HINT}")


def _sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with remote.open_url(str(path)) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ManifestError(UserError):
    """A manifest.json that is missing, unreadable or not of the shape the packer writes; the message names
    the file and the key."""


def load_manifest(root: str | Path) -> dict[str, Any]:
    """Read `root/manifest.json` and check its whole shape once, so that every later read of a key the
    packer writes is safe; errors are one line naming the file and the key."""
    if remote.is_remote(str(root)):
        return _load_remote_manifest(str(root))
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: no shard manifest (check data.root, or pack a dataset with "
                            "`python -m seg_dist.pack`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable manifest ({e})") from e
    problem = _manifest_problem(manifest)
    if problem:
        raise ManifestError(f"{path}: {problem}; re-pack the dataset with `python -m seg_dist.pack`")
    return manifest


def _load_remote_manifest(root: str) -> dict[str, Any]:
    url = remote.join(root, MANIFEST)
    try:
        text = remote.read_bytes(url).decode("utf-8")
    except OSError as e:
        raise ManifestError(f"{url}: cannot read the shard manifest ({e}); check data.root") from e
    try:
        manifest = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{url}: unreadable manifest ({e})") from e
    problem = _manifest_problem(manifest)
    if problem:
        raise ManifestError(f"{url}: {problem}; re-pack the dataset with `python -m seg_dist.pack`")
    return manifest


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_hw(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and x > 0 for x in v)


def _manifest_problem(manifest: Any) -> str | None:
    """What is wrong with a manifest's shape, naming the key; None for a sound one."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    missing = [k for k in _TOP_KEYS if k not in manifest]
    if missing:
        return f"manifest lacks keys {missing}"
    if manifest["format"] != FORMAT:
        return f"format {manifest['format']!r} is not {FORMAT!r}"
    if not _is_int(manifest["num_classes"], 1):
        return f"num_classes={manifest['num_classes']!r}: expected an integer >= 1"
    if not _is_int(manifest["ignore_index"]):
        return f"ignore_index={manifest['ignore_index']!r}: expected an integer >= 0"
    names = manifest["class_names"]
    if not isinstance(names, list) or len(names) != manifest["num_classes"]:
        return f"class_names: expected a list of num_classes={manifest['num_classes']} names"
    if "max_size" in manifest and manifest["max_size"] is not None and not _is_int(manifest["max_size"], 1):
        return f"max_size={manifest['max_size']!r}: expected an integer >= 1 or null"
    if not isinstance(manifest.get("rotation_invariant", False), bool):
        return f"rotation_invariant={manifest['rotation_invariant']!r}: expected true or false"
    if "image" in manifest:
        problem = _image_entry_problem(manifest["image"])
        if problem:
            return f"image: {problem}"
    if not isinstance(manifest["splits"], dict):
        return "'splits' is not an object"
    listed: dict[str, str] = {}  # shard name -> the split that lists it
    for name, split in manifest["splits"].items():
        if not isinstance(split, dict) or any(k not in split for k in _SPLIT_KEYS):
            lacking = [k for k in _SPLIT_KEYS if not isinstance(split, dict) or k not in split]
            return f"split {name!r} lacks keys {lacking}"
        if not _is_int(split["num_samples"]) or not isinstance(split["shards"], list):
            return f"split {name!r}: num_samples must be an integer >= 0 and shards a list"
        for shard in split["shards"]:
            if not isinstance(shard, dict) or any(k not in shard for k in _SHARD_KEYS):
                return f"a shard entry of split {name!r} lacks keys {list(_SHARD_KEYS)}"
            problem = _shard_name_problem(shard["name"])
            if problem:
                return f"split {name!r}: shard name {shard['name']!r} {problem}"
            if shard["name"] in listed:
                first = listed[shard["name"]]
                twice = f"twice in split {name!r}" if first == name else f"in splits {first!r} and {name!r}"
                return f"shard {shard['name']!r} is listed {twice} (each shard holds its samples once)"
            listed[shard["name"]] = name
        hist = split["class_histogram"]
        if not isinstance(hist, list) or len(hist) != manifest["num_classes"] or not all(map(_is_int, hist)):
            return f"split {name!r}: class_histogram must list one pixel count per class"
        size = split["image_size"]
        # Each entry is optional (a split written by hand may carry none), but one that is there must be sound.
        if not isinstance(size, dict) or not all(_is_hw(size[k]) for k in _IMAGE_SIZE_KEYS if k in size):
            return f"split {name!r}: image_size must map {'/'.join(_IMAGE_SIZE_KEYS)} to [height, width]"
    return None


def _image_entry_problem(entry: Any) -> str | None:
    """What is wrong with the manifest's `image` entry (channels, dtype, alpha, and the train split's
    per-channel mean and std when measured); None for a sound one."""
    if not isinstance(entry, dict) or not _is_int(entry.get("channels"), 1):
        return "expected an object with channels (an integer >= 1) and dtype"
    if entry.get("dtype") not in IMAGE_DTYPES:
        return f"dtype={entry.get('dtype')!r}: expected one of {', '.join(IMAGE_DTYPES)}"
    if not isinstance(entry.get("alpha", False), bool):
        return "alpha must be true or false"
    for key in ("mean", "std"):
        if key in entry:
            v = entry[key]
            if not (isinstance(v, list) and len(v) == entry["channels"]
                    and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
                return f"{key} must list one number per channel ({entry['channels']})"
    if ("mean" in entry) != ("std" in entry) or any(x < 0 for x in entry.get("std", [])):
        return "mean and std come together, std >= 0"
    return None


def _shard_name_problem(name: Any) -> str | None:
    """Why a manifest's shard name does not name a file inside the shard folder; None if it does. A
    manifest can come from anywhere, and a name that leads out would read (and verify) files elsewhere."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if "\\" in name or name.startswith("/") or re.match(r"[A-Za-z]:", name):
        return "is an absolute path or uses '\\'; shard names are relative to the shard folder"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "leads outside the shard folder or has an empty, '.' or '..' part; name a file inside it"
    return None


def _split(manifest: dict[str, Any], split: str, where: str = "manifest") -> dict[str, Any]:
    splits = manifest["splits"]
    if split not in splits:
        available = ", ".join(sorted(splits)) or "none"
        raise ManifestError(f"split {split!r} not in {where}; available splits: {available}")
    return splits[split]


def shard_urls(root: str | Path, manifest: dict[str, Any], split: str) -> list[str]:
    """Absolute paths (or, for a remote root, URLs) of `split`'s shards, in manifest order."""
    if remote.is_remote(str(root)):
        entry = _split(manifest, split, remote.join(str(root), MANIFEST))
        return [remote.join(str(root), shard["name"]) for shard in entry["shards"]]
    base = Path(root).resolve()
    entry = _split(manifest, split, str(base / MANIFEST))
    return [str(base / shard["name"]) for shard in entry["shards"]]


def split_count(manifest: dict[str, Any], split: str) -> int:
    """Number of samples in `split`."""
    return int(_split(manifest, split)["num_samples"])


def mean_image_size(manifest: dict[str, Any], split: str) -> tuple[float, float]:
    """The mean (height, width) of `split`'s images as packed."""
    size = _split(manifest, split)["image_size"]
    if "mean_hw" not in size:
        raise ManifestError(f"{MANIFEST}: split {split!r} has no image_size.mean_hw to derive data.image_size=0 "
                            "from; set data.image_size or re-pack the dataset")
    h, w = size["mean_hw"]
    return float(h), float(w)


def rotation_invariant(manifest: dict[str, Any]) -> bool:
    """Whether the labels do not depend on which way up an image is (overhead, microscopy, fundus), as the
    packer was told (`pack --rotation-invariant`); False for a manifest that does not say."""
    return bool(manifest.get("rotation_invariant", False))


def shard_counts(manifest: dict[str, Any], split: str) -> list[int]:
    """Samples per shard of `split`, in manifest order."""
    return [int(s["num_samples"]) for s in _split(manifest, split)["shards"]]


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON, so a checkpoint can tell whether its dataset changed."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ImageError(UserError):
    """Image bytes that seg_dist cannot read as what a viewer shows: empty, undecodable, or of a kind it does
    not read faithfully. The message says what the image is and what to do; callers prefix the file."""


# EXIF orientation -> what a viewer does to the stored pixels to show the picture.
_ORIENTATIONS = {
    1: "upright",
    2: "mirrored",
    3: "turned 180 degrees",
    4: "flipped upside down",
    5: "mirrored and turned 90 degrees",
    6: "turned 90 degrees clockwise",
    7: "mirrored and turned 90 degrees",
    8: "turned 90 degrees counter-clockwise",
}
# Orientations that swap height and width.
TURNED_ORIENTATIONS = (5, 6, 7, 8)
# The pixel types images are decoded to, and what one unit of `data.mean`/`data.std` is in each (the type's
# full scale: 8-bit values are fractions of 255 as ImageNet's constants are, 16-bit of 65535, floats as stored).
IMAGE_DTYPES = ("uint8", "uint16", "float32")
FULL_SCALE = {"uint8": 255.0, "uint16": 65535.0, "float32": 1.0}


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)  # 0x0112: the EXIF/TIFF Orientation tag
    except Exception:  # damaged EXIF: viewers show the stored pixels, and so does seg_dist
        return 1
    return value if isinstance(value, int) and value in _ORIENTATIONS else 1


def orientation_text(orientation: int) -> str:
    """'EXIF orientation 6 (turned 90 degrees clockwise)'."""
    return f"EXIF orientation {orientation} ({_ORIENTATIONS.get(orientation, 'unknown')})"


def _upright(im: Image.Image) -> tuple[Image.Image, int]:
    orientation = _orientation(im)
    return (ImageOps.exif_transpose(im) if orientation != 1 else im), orientation


def _upright_array(a: np.ndarray, orientation: int) -> np.ndarray:
    """`a` (H x W x C) turned as PIL's `exif_transpose` turns an image of that orientation."""
    if orientation in (2, 3, 4):
        a = a[:, ::-1] if orientation == 2 else a[::-1, ::-1] if orientation == 3 else a[::-1]
    elif orientation in TURNED_ORIENTATIONS:
        a = a.swapaxes(0, 1)  # 5: transpose
        if orientation == 6:
            a = a[:, ::-1]
        elif orientation == 7:
            a = a[::-1, ::-1]
        elif orientation == 8:
            a = a[::-1]
    return np.ascontiguousarray(a)


def _open(data: bytes) -> Image.Image:
    """Opened and loaded PIL image; ImageError for empty or undecodable bytes."""
    if not data:
        raise ImageError("empty file (0 bytes), not an image")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError as e:
        raise ImageError("not an image seg_dist can read (JPEG, PNG, TIFF or BMP), or damaged") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... for broken files
        raise ImageError(f"cannot decode the image ({_text(e)})") from e
    try:
        im.load()
    except Exception as e:
        im.close()
        raise ImageError(f"cannot decode the image ({_text(e)}; truncated or damaged?)") from e
    return im


def _text(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8; 1 when there is none) of image bytes, as `read_image` applies it."""
    if _is_npy(data):
        return 1
    if _is_tiff(data):
        return _tiff_orientation(data)
    return _orientation(_open(data))


class DecodedImage(NamedTuple):
    """An image as a viewer shows it, with what the decoder found."""

    pixels: np.ndarray  # writable H x W x C (uint8, uint16 or float32), EXIF orientation applied
    format: str  # the detected format ("JPEG", "PNG", "TIFF", "BMP", "NPY", ...), whatever the file name says
    orientation: int  # the EXIF orientation applied (1: none)


# PIL modes read through PIL, and the mode each becomes (without, with the alpha channel kept). 8-bit colour
# (palette, CMYK, YCbCr) becomes RGB as viewers show it; grey stays one channel.
_PIL_MODES = {
    "1": ("L", "L"), "L": ("L", "L"), "LA": ("L", "LA"), "La": ("L", "LA"),
    "P": ("RGB", "RGBA"), "PA": ("RGB", "RGBA"), "RGB": ("RGB", "RGB"), "RGBX": ("RGB", "RGB"),
    "RGBA": ("RGB", "RGBA"), "RGBa": ("RGB", "RGBA"), "CMYK": ("RGB", "RGB"), "YCbCr": ("RGB", "RGB"),
    "I;16": ("I;16", "I;16"), "I;16L": ("I;16", "I;16"), "I;16B": ("I;16", "I;16"), "I;16N": ("I;16", "I;16"),
    "F": ("F", "F"),
}
# Every PIL mode seg_dist reads (the rest are refused, naming the mode).
IMAGE_MODES = tuple(_PIL_MODES)
_NPY_MAGIC = b"\x93NUMPY"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_npy(data: bytes) -> bool:
    return data[:6] == _NPY_MAGIC


def _is_tiff(data: bytes) -> bool:
    return data[:4] in _TIFF_MAGICS


def _png_16bit_colour(data: bytes) -> bool:
    """A PNG of 16-bit grey+alpha, RGB or RGBA, which PIL reads as 8 bits (losing the low byte)."""
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6)


def _checked(a: np.ndarray, what: str) -> np.ndarray:
    """`a` as H x W x C of a dtype seg_dist reads, or an ImageError saying what it is."""
    if a.dtype.name not in IMAGE_DTYPES:
        convert = ("as float32 (exact for 16-bit integers)" if a.dtype.kind in "iu" and a.dtype.itemsize <= 2
                   else "to uint16 or float32")
        raise ImageError(f"{what} of {a.dtype.name} pixels: seg_dist reads uint8, uint16 and float32 images; "
                         f"convert it {convert}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or min(a.shape) < 1:
        raise ImageError(f"{what} of shape {a.shape}: expected H x W or H x W x C (bands last)")
    if a.dtype == np.float32 and not np.isfinite(a).all():
        raise ImageError(f"{what} holds NaN or infinite values: replace them (e.g. by 0, or a no-data class in "
                         "the mask) first")
    a = a.astype(a.dtype.newbyteorder("="), copy=False)
    return a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C")


def _read_npy(data: bytes) -> DecodedImage:
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # ValueError for object arrays and bad headers, EOFError for truncated data
        raise ImageError(f"cannot read the .npy array ({_text(e)})") from e
    return DecodedImage(_checked(a, ".npy array"), "NPY", 1)


def _tiff_orientation(data: bytes) -> int:
    import tifffile  # imported here: only TIFF needs it

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            tag = tif.pages.first.tags.get(274)  # 274: Orientation
            value = int(tag.value) if tag is not None else 1
    except Exception:
        return 1
    return value if value in _ORIENTATIONS else 1


def _read_tiff(data: bytes, keep_alpha: bool) -> DecodedImage | None:
    """A TIFF of 16-bit or float colour, or of bands beyond grey/RGB/RGBA, read with tifffile; None for the
    TIFFs PIL reads faithfully (8-bit grey, RGB, RGBA, palette, CMYK, YCbCr, JPEG-compressed, bilevel)."""
    import tifffile

    photometric = tifffile.PHOTOMETRIC
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            page = tif.pages.first
            axes, dtype = series.axes, np.dtype(series.dtype)
            samples = int(page.samplesperpixel)
            alpha = (page.photometric == photometric.RGB and samples == 4
                     and any(int(e) in (1, 2) for e in page.extrasamples))
            pil_reads = dtype.name == "bool" or (dtype == np.uint8 and (
                page.photometric in (photometric.PALETTE, photometric.YCBCR, photometric.SEPARATED)
                or page.compression == tifffile.COMPRESSION.JPEG or samples == 1
                or (page.photometric == photometric.RGB and (samples == 3 or alpha))))
            if pil_reads:
                return None
            # PIL reads these faithfully too, should tifffile lack the codec.
            pil_fallback = samples == 1 and dtype.name in ("uint16", "float32") and series.ndim == 2
            tag = page.tags.get(274)  # Orientation
            orientation = int(tag.value) if tag is not None and int(tag.value) in _ORIENTATIONS else 1
            try:
                a = series.asarray()
            except Exception as e:  # a compression tifffile decodes only with imagecodecs, or damaged data
                if pil_fallback:
                    return None
                raise ImageError(f"cannot decode the TIFF ({_text(e)}; compressed TIFFs may need "
                                 "`pip install imagecodecs`)") from e
    except ImageError:
        raise
    except Exception as e:  # tifffile raises TiffFileError, ValueError, IndexError ... for broken files
        raise ImageError(f"cannot decode the TIFF ({_text(e)})") from e
    kept = [i for i, n in enumerate(a.shape) if n != 1 or axes[i] in "YX"]
    a, axes = a.reshape([a.shape[i] for i in kept]), "".join(axes[i] for i in kept)
    if len(axes) > 3 or "Y" not in axes or "X" not in axes:
        raise ImageError(f"TIFF of shape {series.shape} (axes {series.axes}): seg_dist reads one image of H x W "
                         "or H x W x bands per file")
    order = [axes.index("Y"), axes.index("X")] + [i for i, c in enumerate(axes) if c not in "YX"]
    a = _checked(a.transpose(order), "TIFF")
    if alpha and not keep_alpha:
        a = np.ascontiguousarray(a[:, :, :3])
    return DecodedImage(_upright_array(a, orientation), "TIFF", orientation)


def _read_png_16bit_colour(data: bytes, keep_alpha: bool) -> DecodedImage:
    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if a is None:
        raise ImageError("cannot decode the 16-bit PNG (truncated or damaged?)")
    if data[25] == 4:  # grey + alpha, which OpenCV gives as B = G = R = grey, A
        a = a[:, :, [0, 3]] if keep_alpha else a[:, :, :1]
    else:
        a = a[:, :, [2, 1, 0, 3]] if a.shape[2] == 4 and keep_alpha else a[:, :, [2, 1, 0]]
    with _open(data) as im:
        orientation = _orientation(im)
    return DecodedImage(_upright_array(_checked(a, "16-bit PNG"), orientation), "PNG", orientation)


def read_image(data: bytes, keep_alpha: bool = False) -> DecodedImage:
    """Image bytes -> the picture as a viewer shows it, every value as stored: H x W x C in the file's own
    type (uint8, uint16 or float32), EXIF orientation applied (JPEG, PNG, TIFF).

    Grey is one channel; 8-bit palette, CMYK and YCbCr images become RGB as viewers show them; the alpha
    channel of RGBA, LA and PA images (and of RGB TIFFs whose extra sample is alpha) is dropped unless
    `keep_alpha`. PNG and JPEG go through PIL (16-bit colour PNGs, which PIL reads as 8 bits, through
    OpenCV); TIFFs of 16-bit, float or more than four bands through tifffile; `.npy` arrays (H x W or
    H x W x C) as saved. ImageError, saying what the image is, for empty or undecodable bytes and for what
    cannot be read faithfully (32-bit integer or float64 pixels, NaN, more than one image per file).
    """
    if not data:
        raise ImageError("empty file (0 bytes), not an image")
    if _is_npy(data):
        return _read_npy(data)
    if _is_tiff(data):
        decoded = _read_tiff(data, keep_alpha)
        if decoded is not None:
            return decoded
    if _png_16bit_colour(data):
        return _read_png_16bit_colour(data, keep_alpha)
    with _open(data) as im:
        if im.mode == "I" and im.format == "PNG":  # some Pillow versions open 16-bit grey PNGs as 32-bit "I"
            mode = "I;16"
        elif im.mode not in _PIL_MODES:
            fmt = im.format or "image"
            raise ImageError(f"{fmt} in PIL mode {im.mode} ({len(im.getbands())} bands): seg_dist reads 8-bit and "
                             "16-bit grey, 8-bit colour and 32-bit float images (and TIFF/.npy of any band count "
                             "in uint8, uint16 or float32); convert it to one of those")
        else:
            mode = _PIL_MODES[im.mode][keep_alpha]
        upright, orientation = _upright(im)
        if mode == "I;16":
            a = np.array(upright).astype(np.uint16, copy=False) if upright.mode == "I" else np.array(upright)
        else:
            a = np.array(upright if upright.mode == mode else upright.convert(mode))
        return DecodedImage(_checked(a, f"{im.format or 'image'} (PIL mode {im.mode})"), im.format or "", orientation)


def decode_image(data: bytes, keep_alpha: bool = False) -> np.ndarray:
    """Image bytes -> writable H x W x C pixels as a viewer shows them, in the file's own type (see
    `read_image`). The one image decoder: pack, the loaders, evaluate and predict all read images through it,
    so they see alike; `conform_image` then brings an image to its dataset's channel count."""
    return read_image(data, keep_alpha).pixels


class ImageSpec(NamedTuple):
    """What every image of a dataset is once decoded: the manifest's `image` entry without its statistics."""

    channels: int
    dtype: str  # one of IMAGE_DTYPES
    alpha: bool = False  # packed with --keep-alpha: decode with the alpha channel

    def text(self) -> str:
        """'4-channel uint16'."""
        return f"{self.channels}-channel {self.dtype}"


# What manifests without an `image` entry hold (packed before it was recorded): 8-bit RGB.
RGB8 = ImageSpec(3, "uint8")


def image_spec(manifest: dict[str, Any]) -> ImageSpec:
    """The dataset's image channels and type from its manifest (8-bit RGB for manifests without `image`)."""
    entry = manifest.get("image")
    if entry is None:
        return RGB8
    return ImageSpec(int(entry["channels"]), str(entry["dtype"]), bool(entry.get("alpha", False)))


def image_statistics(manifest: dict[str, Any]) -> tuple[list[float], list[float]] | None:
    """(mean, std) per channel of the train split's pixels, in raw pixel values, as the packer measured
    them; None when the manifest has none (packed before they were recorded, or without a train split)."""
    entry = manifest.get("image")
    if entry is None or "mean" not in entry:
        return None
    return [float(v) for v in entry["mean"]], [float(v) for v in entry["std"]]


def promotable(found: ImageSpec, spec: ImageSpec) -> bool:
    """Whether `conform_image` turns `found` images into `spec` ones without losing anything: 8-bit grey
    into RGB, and with the alpha channel kept, grey, grey + alpha or RGB into RGBA (opaque where none)."""
    if found == spec:
        return True
    if found.dtype != "uint8" or spec.dtype != "uint8":
        return False
    return (found.channels, spec.channels) in ((1, 3),) or (spec.alpha and (found.channels, spec.channels) in (
        (1, 4), (2, 4), (3, 4)))


def conform_image(pixels: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """`pixels` (as `decode_image` gives them) as an image of `spec`: the same array when it already is one;
    8-bit grey expanded to RGB (and RGBA) as `promotable` allows; else an ImageError naming both."""
    found = ImageSpec(pixels.shape[2], pixels.dtype.name, spec.alpha)
    if found == spec:
        return pixels
    if not promotable(found, spec):
        raise ImageError(f"a {found.text()} image, the dataset's images are {spec.text()}")
    colour = pixels[:, :, :1].repeat(3, axis=2) if found.channels <= 2 else pixels[:, :, :3]
    if spec.channels == 3:
        return colour
    alpha = pixels[:, :, 1:2] if found.channels == 2 else np.full((*pixels.shape[:2], 1), 255, np.uint8)
    return np.concatenate([colour, alpha], axis=2)


def decode_mask(data: bytes) -> np.ndarray:
    """Single-channel mask bytes -> writable int64 HxW labels (palette PNGs give their indices), EXIF
    orientation applied as for images."""
    with _open(data) as im:
        if im.mode not in LABEL_MODES:
            raise ValueError(f"mask has mode {im.mode!r} ({len(im.getbands())} channels); expected one channel")
        upright, _ = _upright(im)
        return np.array(upright).astype(np.int64)


def upright_labels(im: Image.Image) -> Image.Image:
    """A loaded mask image turned by its EXIF orientation, as `decode_mask` and images are."""
    return _upright(im)[0]
