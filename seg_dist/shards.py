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
_SPLIT_KEYS = ("num_samples", "shards")
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


def load_manifest(root: str | Path) -> dict[str, Any]:
    """Read and sanity-check `root/manifest.json`; errors are one line naming the file."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest (pack a dataset with `python -m seg_dist.pack`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: manifest is not a JSON object")
    missing = [k for k in _TOP_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{path}: manifest lacks keys {missing}")
    if manifest["format"] != FORMAT:
        raise ValueError(f"{path}: format {manifest['format']!r} is not {FORMAT!r}")
    if not isinstance(manifest["splits"], dict):
        raise ValueError(f"{path}: 'splits' is not an object")
    for name, split in manifest["splits"].items():
        if not isinstance(split, dict) or any(k not in split for k in _SPLIT_KEYS):
            raise ValueError(f"{path}: split {name!r} lacks keys {list(_SPLIT_KEYS)}")
        for shard in split["shards"]:
            if not isinstance(shard, dict) or any(k not in shard for k in _SHARD_KEYS):
                raise ValueError(f"{path}: a shard entry of split {name!r} lacks keys {list(_SHARD_KEYS)}")
    return manifest


def _split(manifest: dict[str, Any], split: str, where: str = "manifest") -> dict[str, Any]:
    splits = manifest["splits"]
    if split not in splits:
        available = ", ".join(sorted(splits)) or "none"
        raise ValueError(f"split {split!r} not in {where}; available splits: {available}")
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
    h, w = _split(manifest, split)["image_size"]["mean_hw"]
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
