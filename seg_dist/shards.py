"""Shard-folder conventions shared by the packer (`seg_dist.pack`) and the data loader.

A packed dataset is a folder of WebDataset tar shards plus `manifest.json`; see shards/README.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from .errors import UserError

__all__ = [
    "FORMAT",
    "IMAGE_EXTS",
    "IMAGE_MODES",
    "LABEL_MODES",
    "MANIFEST",
    "MASK_FIELD",
    "META_FIELD",
    "TURNED_ORIENTATIONS",
    "DecodedImage",
    "ImageError",
    "ManifestError",
    "ShardError",
    "decode_image",
    "decode_mask",
    "exif_orientation",
    "existing_shards",
    "load_manifest",
    "manifest_digest",
    "orientation_text",
    "packed_size",
    "read_image",
    "shard_counts",
    "shard_name",
    "shard_name_pattern",
    "shard_urls",
    "split_count",
    "upright_labels",
    "verify_shards",
]

MANIFEST = "manifest.json"
FORMAT = "seg_dist-shards/1"
# Field names (WebDataset "extensions") an image may have inside a sample.
IMAGE_EXTS = ("jpg", "png", "tif", "bmp")
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ManifestError(UserError):
    """A manifest.json that is missing, unreadable or not of the shape the packer writes; the message names
    the file and the key."""


def load_manifest(root: str | Path) -> dict[str, Any]:
    """Read `root/manifest.json` and check its whole shape once, so that every later read of a key the
    packer writes is safe; errors are one line naming the file and the key."""
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
    """Absolute paths of `split`'s shards, in manifest order."""
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


def shard_counts(manifest: dict[str, Any], split: str) -> list[int]:
    """Samples per shard of `split`, in manifest order."""
    return [int(s["num_samples"]) for s in _split(manifest, split)["shards"]]


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the canonical JSON, so a checkpoint can tell whether its dataset changed."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ImageError(UserError):
    """Image bytes that seg_dist cannot read as what a viewer shows: empty, undecodable, or of a mode it does
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
# What a mode holds, for the refusal message.
_MODE_KINDS = {
    "I;16": "16-bit grey", "I;16L": "16-bit grey", "I;16B": "16-bit grey", "I;16N": "16-bit grey",
    "I": "32-bit integer grey", "F": "32-bit float grey",
}


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
    return _orientation(_open(data))


class DecodedImage(NamedTuple):
    """An image as a viewer shows it, with what the decoder found."""

    rgb: np.ndarray  # writable uint8 H x W x 3, EXIF orientation applied
    format: str  # PIL's detected format ("JPEG", "PNG", "TIFF", "BMP", ...), whatever the file name says
    orientation: int  # the EXIF orientation applied (1: none)


def read_image(data: bytes) -> DecodedImage:
    """Image bytes -> the picture as a viewer shows it: EXIF orientation applied, 8-bit RGB (grey and palette
    images are expanded, alpha is dropped). ImageError for empty or undecodable bytes and for images of more
    than 8 bits per channel, which converting would clip."""
    with _open(data) as im:
        if im.mode not in IMAGE_MODES:
            fmt = f" {im.format}" if im.format else ""
            kind = _MODE_KINDS.get(im.mode)
            if kind is None:
                raise ImageError(f"{fmt.strip() or 'image'} in PIL mode {im.mode}: seg_dist reads 8-bit grey, "
                                 "palette, RGB(A), CMYK and YCbCr images; convert it to 8-bit RGB")
            if im.mode == "F":
                how = "scale it to 0-255 and save 8 bits per channel, e.g. `magick IN -auto-level -depth 8 OUT.png`"
            else:
                how = "convert it to 8 bits per channel, e.g. `magick IN -depth 8 OUT.png` (scales 0-65535 to 0-255)"
            raise ImageError(f"{kind}{fmt} image (PIL mode {im.mode}): seg_dist reads 8-bit images for now; {how}")
        upright, orientation = _upright(im)
        return DecodedImage(np.array(upright.convert("RGB")), im.format or "", orientation)


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes -> writable uint8 H x W x 3 RGB as a viewer shows it (see `read_image`). The one image
    decoder: pack, the loaders, evaluate and predict all read images through it, so they see alike."""
    return read_image(data).rgb


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
