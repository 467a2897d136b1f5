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
from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError

__all__ = [
    "FORMAT",
    "IMAGE_EXTS",
    "LABEL_MODES",
    "MANIFEST",
    "MASK_FIELD",
    "META_FIELD",
    "ManifestError",
    "ShardError",
    "decode_image",
    "decode_mask",
    "existing_shards",
    "load_manifest",
    "manifest_digest",
    "shard_counts",
    "shard_name",
    "shard_name_pattern",
    "shard_urls",
    "split_count",
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
_IMAGE_SIZE_KEYS = ("min_hw", "max_hw", "mean_hw")
_SHARD_KEYS = ("name", "num_samples")

# Single-channel PIL modes whose pixel values are the labels themselves ("P": palette indices).
LABEL_MODES = ("P", "L", "I;16", "I;16L", "I;16B", "I", "1")


def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`: `train-000000.tar`, ... (sorts in shard order)."""
    return f"{split}-{index:06d}.tar"


def shard_name_pattern(split: str) -> re.Pattern[str]:
    """Matches (fullmatch) exactly the names `shard_name(split, i)` gives."""
    return re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")


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
    if not isinstance(manifest["splits"], dict):
        return "'splits' is not an object"
    for name, split in manifest["splits"].items():
        if not isinstance(split, dict) or any(k not in split for k in _SPLIT_KEYS):
            lacking = [k for k in _SPLIT_KEYS if not isinstance(split, dict) or k not in split]
            return f"split {name!r} lacks keys {lacking}"
        if not _is_int(split["num_samples"]) or not isinstance(split["shards"], list):
            return f"split {name!r}: num_samples must be an integer >= 0 and shards a list"
        for shard in split["shards"]:
            if not isinstance(shard, dict) or any(k not in shard for k in _SHARD_KEYS):
                return f"a shard entry of split {name!r} lacks keys {list(_SHARD_KEYS)}"
        hist = split["class_histogram"]
        if not isinstance(hist, list) or len(hist) != manifest["num_classes"] or not all(map(_is_int, hist)):
            return f"split {name!r}: class_histogram must list one pixel count per class"
        size = split["image_size"]
        # Each entry is optional (a split written by hand may carry none), but one that is there must be sound.
        if not isinstance(size, dict) or not all(_is_hw(size[k]) for k in _IMAGE_SIZE_KEYS if k in size):
            return f"split {name!r}: image_size must map {'/'.join(_IMAGE_SIZE_KEYS)} to [height, width]"
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


def decode_mask(data: bytes) -> np.ndarray:
    """Single-channel mask bytes -> writable int64 HxW labels (palette PNGs give their indices)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode not in LABEL_MODES:
            raise ValueError(f"mask has mode {im.mode!r} ({len(im.getbands())} channels); expected one channel")
        return np.array(im).astype(np.int64)


def decode_image(data: bytes) -> np.ndarray:
    """Image bytes -> writable uint8 HxWx3 RGB (grey, palette and alpha images are converted)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))
