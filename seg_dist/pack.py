"""Pack image/mask folders into deterministic WebDataset tar shards plus manifest.json.

    python -m seg_dist.pack --images DIR --masks DIR --out shards/NAME --num-classes N [options]
    python -m seg_dist.pack --synthetic --out shards/synth

Every pair is decoded and checked before anything is written; all problems are reported at once
(exit code 2) unless --skip-bad packs the good pairs and records the rest in the manifest. The shard
and manifest format is described in shards/README.md and seg_dist/shards.py.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

import seg_dist
from seg_dist import atomic, shards

__all__ = [
    "DEFAULT_SAMPLES_PER_SHARD",
    "IMAGE_SUFFIXES",
    "MASK_SUFFIXES",
    "LabelSpec",
    "PackError",
    "Pair",
    "load_label_map",
    "load_palette",
    "main",
    "pair_files",
    "sanitize_key",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
# ~30 MB shards for VOC-sized JPEGs; enough shards for a few ranks x workers on mid-sized datasets.
DEFAULT_SAMPLES_PER_SHARD = 256
# The synthetic set is tiny: smaller shards so 2 ranks x 2 loader workers each still get whole shards.
SYNTH_SAMPLES_PER_SHARD = 64
SYNTH_VAL_FRACTION = 0.2
# Field name by the format PIL detects (not the file name, which can lie).
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp"}
_SPLIT_ORDER = ("train", "val", "test")
_MAX_SHOWN_VALUES = 8


class PackError(Exception):
    """A user-facing problem: printed as one line, exit code 2."""


class _BadSample(Exception):
    pass


@dataclass(frozen=True)
class Pair:
    """One image/mask pair; `image`/`mask` are paths as the user gave them, `*_rel` relative to the roots."""

    key: str
    stem: str
    image: str
    mask: str
    image_rel: str
    mask_rel: str


@dataclass(frozen=True)
class LabelSpec:
    """How mask pixels become class ids, shared with the worker processes."""

    num_classes: int
    ignore_index: int = 255
    max_size: int | None = None
    lut: np.ndarray | None = None  # --label-map: source value -> class id
    colours: np.ndarray | None = None  # --palette: sorted 0xRRGGBB codes ...
    colour_classes: np.ndarray | None = None  # ... and their class ids

    @property
    def mask_dtype(self) -> type:
        return np.uint8 if max(self.num_classes - 1, self.ignore_index) <= 255 else np.uint16


# ---------------------------------------------------------------------------------------------------------
# Pairing


def sanitize_key(stem: str) -> str:
    """WebDataset splits a name at its first dot, so keys keep only [A-Za-z0-9_-] ('/' becomes '__')."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem.replace("/", "__"))


def _scan(root: Path, suffixes: Sequence[str], keep: str, drop: str) -> dict[str, list[str]]:
    """Relative stem -> relative paths under root; `keep` (if set) must end the stem and is stripped."""
    found: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            # Dotfiles are editor/OS debris (e.g. macOS "._x.jpg"), never data.
            if name.startswith(".") or Path(name).suffix.lower() not in suffixes:
                continue
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            stem = rel[: -len(Path(name).suffix)]
            if keep:
                if not stem.endswith(keep):
                    continue  # e.g. Cityscapes *_gtFine_color.png next to *_gtFine_labelIds.png
                stem = stem[: -len(keep)]
            elif drop and stem.endswith(drop):
                continue  # the other side's files, when images and masks share a folder
            found.setdefault(stem, []).append(rel)
    return found


def pair_files(
    images: str | Path,
    masks: str | Path,
    image_suffix: str = "",
    mask_suffix: str = "",
    stems: Iterable[str] | None = None,
    list_name: str = "--list",
) -> tuple[list[Pair], list[tuple[str, str]]]:
    """Pair images and masks by relative stem; returns (pairs sorted by key, [(path, problem), ...])."""
    images, masks = Path(images), Path(masks)
    for flag, d in (("--images", images), ("--masks", masks)):
        if not d.is_dir():
            raise PackError(f"{flag} {d}: not a directory")
    found_img = _scan(images, IMAGE_SUFFIXES, image_suffix, mask_suffix)
    found_mask = _scan(masks, MASK_SUFFIXES, mask_suffix, image_suffix)
    problems: list[tuple[str, str]] = []
    if stems is None:
        wanted = sorted(set(found_img) | set(found_mask))
        if not found_img:
            raise PackError(f"--images {images}: no {'/'.join(IMAGE_SUFFIXES)} files{_suffix_note(image_suffix)}")
    else:
        wanted = sorted(set(stems))
    pairs: list[Pair] = []
    keys: dict[str, str] = {}
    for stem in wanted:
        imgs, msks = found_img.get(stem, []), found_mask.get(stem, [])
        bad = False
        for kind, root, hits in (("image", images, imgs), ("mask", masks, msks)):
            if len(hits) > 1:
                others = ", ".join(str(root / h) for h in hits[1:])
                problems.append((str(root / hits[0]), f"duplicate {kind} stem {stem!r} (also {others})"))
                bad = True
        if stems is not None and not (imgs and msks):
            missing = "image" if not imgs else "mask"
            root = images if not imgs else masks
            problems.append((list_name, f"listed stem {stem!r} has no {missing} in {root}"))
            continue
        if not msks:
            problems.append((str(images / imgs[0]), f"no mask with stem {stem!r} in {masks}"))
            continue
        if not imgs:
            problems.append((str(masks / msks[0]), f"no image with stem {stem!r} in {images}"))
            continue
        key = sanitize_key(stem)
        if key in keys:
            problems.append((str(images / imgs[0]), f"duplicate stem: key {key!r} also made from {keys[key]!r}"))
            bad = True
        keys.setdefault(key, stem)
        if not bad:
            pairs.append(Pair(key, stem, str(images / imgs[0]), str(masks / msks[0]), imgs[0], msks[0]))
    pairs.sort(key=lambda p: p.key)
    return pairs, problems


def _suffix_note(suffix: str) -> str:
    return f" whose stem ends with {suffix!r}" if suffix else ""


def _read_list(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PackError(f"--list {path}: cannot read ({e})") from e
    stems = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not stems:
        raise PackError(f"--list {path}: no stems listed")
    return stems


# ---------------------------------------------------------------------------------------------------------
# Label maps and palettes


def _load_yaml_mapping(path: str, flag: str) -> dict[Any, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise PackError(f"{flag} {path}: cannot read ({' '.join(str(e).split())})") from e
    if not isinstance(data, dict) or not data:
        raise PackError(f"{flag} {path}: expected a non-empty YAML mapping")
    return data


def _class_id(value: Any, num_classes: int, ignore_index: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (0 <= value < num_classes or value == ignore_index):
        raise PackError(f"{where}: class {value!r} is not in [0, {num_classes}) nor the ignore index {ignore_index}")
    return value


def load_label_map(path: str, num_classes: int, ignore_index: int) -> np.ndarray:
    """YAML `source_id: class_id` -> lookup table; unmapped source ids map to the ignore index."""
    data = _load_yaml_mapping(path, "--label-map")
    table: dict[int, int] = {}
    for src, dst in data.items():
        if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < 1 << 24:
            raise PackError(f"--label-map {path}: source id {src!r} is not an integer in [0, 2**24)")
        table[src] = _class_id(dst, num_classes, ignore_index, f"--label-map {path}: {src}")
    lut = np.full(max(table) + 1, ignore_index, np.int64)
    lut[list(table)] = list(table.values())
    return lut


def _parse_colour(value: Any, where: str) -> int:
    """'R,G,B', '#rrggbb' or [R, G, B] -> 0xRRGGBB."""
    rgb: Any = value
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"#[0-9A-Fa-f]{6}", text):
            return int(text[1:], 16)
        rgb = [p.strip() for p in text.split(",")]
        rgb = [int(p) if p.isdigit() else p for p in rgb]
    if (
        isinstance(rgb, (list, tuple))
        and len(rgb) == 3
        and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in rgb)
    ):
        return (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
    raise PackError(f"{where}: {value!r} is not a colour ('R,G,B', '#rrggbb' or [R, G, B], 0-255)")


def load_palette(path: str, num_classes: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """YAML colour -> class for RGB-coded masks; returns (sorted 0xRRGGBB codes, class ids).

    Entries are either `"R,G,B": class` / `"#rrggbb": class`, or `class: [R, G, B]` (or a list of colours).
    """
    data = _load_yaml_mapping(path, "--palette")
    where = f"--palette {path}"
    table: dict[int, int] = {}

    def add(colour: Any, cls: Any) -> None:
        code = _parse_colour(colour, where)
        cls = _class_id(cls, num_classes, ignore_index, f"{where}: {colour!r}")
        if table.get(code, cls) != cls:
            raise PackError(f"{where}: colour {colour!r} mapped to both {table[code]} and {cls}")
        table[code] = cls

    for k, v in data.items():
        if isinstance(k, int) and not isinstance(k, bool):
            nested = isinstance(v, list) and v and all(isinstance(c, (list, str)) for c in v)
            for colour in v if nested else [v]:
                add(colour, k)
        else:
            add(k, v)
    codes = np.array(sorted(table), np.int64)
    return codes, np.array([table[c] for c in codes], np.int64)


# ---------------------------------------------------------------------------------------------------------
# Per-sample work (runs in worker processes)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _labels(data: bytes, spec: LabelSpec) -> np.ndarray:
    """Mask bytes -> int64 class ids (palette/label-map applied); _BadSample for user errors."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if spec.colours is not None:
            rgb = np.array(im.convert("RGB")).astype(np.int64)
            code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            idx = np.clip(np.searchsorted(spec.colours, code), 0, len(spec.colours) - 1)
            assert spec.colour_classes is not None
            return np.where(spec.colours[idx] == code, spec.colour_classes[idx], spec.ignore_index)
        if im.mode not in shards.LABEL_MODES:
            raise _BadSample(
                f"mask has {len(im.getbands())} channels (mode {im.mode}); colour-coded masks need --palette"
            )
        labels = np.array(im).astype(np.int64)
    if spec.lut is not None:
        known = (labels >= 0) & (labels < len(spec.lut))
        labels = np.where(known, spec.lut[np.clip(labels, 0, len(spec.lut) - 1)], spec.ignore_index)
    return labels


def _target_hw(h: int, w: int, max_size: int | None) -> tuple[int, int] | None:
    if not max_size or max(h, w) <= max_size:
        return None
    scale = max_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize_nearest(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    # Sampling at output pixel centres keeps labels exact (no blending of class ids).
    rows = ((np.arange(hw[0]) + 0.5) * labels.shape[0] / hw[0]).astype(np.int64)
    cols = ((np.arange(hw[1]) + 0.5) * labels.shape[1] / hw[1]).astype(np.int64)
    return labels[rows[:, None], cols[None, :]]


@dataclass
class _Loaded:
    image_bytes: bytes
    image: Image.Image
    ext: str
    labels: np.ndarray


def _load(pair: Pair, spec: LabelSpec) -> tuple[_Loaded | None, list[tuple[str, str]]]:
    """Decode and check one pair; returns (loaded or None, [(path, problem), ...])."""
    problems: list[tuple[str, str]] = []
    image = labels = None
    ext = ""
    try:
        image_bytes = Path(pair.image).read_bytes()
        image = Image.open(io.BytesIO(image_bytes))
        image.load()
        ext = _FORMAT_EXT.get(image.format or "", "")
        if not ext:
            problems.append((pair.image, f"unsupported image format {image.format}"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        problems.append((pair.image, f"cannot decode image ({_one_line(e)})"))
        image = None  # a header-only size would make a misleading size-mismatch line
    try:
        labels = _labels(Path(pair.mask).read_bytes(), spec)
    except _BadSample as e:
        problems.append((pair.mask, str(e)))
    except Exception as e:
        problems.append((pair.mask, f"cannot decode mask ({_one_line(e)})"))
    if image is not None and labels is not None:
        img_hw = (image.height, image.width)
        if labels.shape != img_hw:
            problems.append(
                (pair.mask, f"mask size {_hw(labels.shape)} != image size {_hw(img_hw)} (HxW) of {pair.image}")
            )
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


def _hw(shape: Sequence[int]) -> str:
    return f"{shape[0]}x{shape[1]}"


_SPEC: LabelSpec | None = None


def _init_worker(spec: LabelSpec) -> None:
    # The spec (label-map tables can be large) is sent once per worker, not once per task.
    global _SPEC
    _SPEC = spec


def _inspect(pair: Pair) -> tuple[list[tuple[str, str]], tuple[np.ndarray, int, tuple[int, int]] | None]:
    """Validation pass: problems, or (class histogram, ignored pixels, stored HxW) of the stored mask."""
    assert _SPEC is not None
    loaded, problems = _load(pair, _SPEC)
    if loaded is None:
        return problems, None
    labels = loaded.labels
    target = _target_hw(*labels.shape, _SPEC.max_size)
    if target:
        labels = _resize_nearest(labels, target)
    valid = labels != _SPEC.ignore_index
    hist = np.bincount(labels[valid].ravel(), minlength=_SPEC.num_classes)
    return [], (hist, int(labels.size - valid.sum()), (int(labels.shape[0]), int(labels.shape[1])))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _encode(pair: Pair) -> list[tuple[str, bytes]]:
    """Writing pass: the tar members of one sample."""
    assert _SPEC is not None
    loaded, problems = _load(pair, _SPEC)
    if loaded is None:
        # Validation passed moments ago, so the file changed under us.
        raise PackError("; ".join(f"{p}: {msg}" for p, msg in problems) + " (file changed while packing?)")
    image, labels, ext, image_bytes = loaded.image, loaded.labels, loaded.ext, loaded.image_bytes
    size_hw = [image.height, image.width]
    target = _target_hw(image.height, image.width, _SPEC.max_size)
    if target:
        resized = image.convert("RGB").resize((target[1], target[0]), Image.Resampling.BILINEAR)
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


class _Runner:
    """Ordered map over a spawn pool (or in-process for one worker)."""

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


# ---------------------------------------------------------------------------------------------------------
# Writing


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: same input -> byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _ShardWriter:
    """Writes {split}-NNNNNN.tar under temporary names; `commit` happens later, for all splits at once."""

    def __init__(self, out: Path, split: str, per_shard: int) -> None:
        self.out, self.split, self.per_shard = out, split, per_shard
        self.entries: list[dict[str, Any]] = []
        self.temps: list[tuple[Path, Path]] = []
        self._file: Any = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None:
            final = self.out / f"{self.split}-{len(self.entries):06d}.tar"
            tmp = atomic.temp_path(final)
            self.temps.append((tmp, final))
            # Both stay open across add() calls; closed in _finish_shard.
            self._file = open(tmp, "xb")  # noqa: SIM115
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115
        for name, data in members:
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
        self._count += 1
        if self._count == self.per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp, final = self.temps[-1]
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        self.entries.append(
            {"name": final.name, "num_samples": self._count, "bytes": tmp.stat().st_size, "sha256": digest.hexdigest()}
        )
        self._tar, self._file, self._count = None, None, 0

    def close(self) -> list[dict[str, Any]]:
        if self._tar is not None:
            self._finish_shard()
        return self.entries

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        for tmp, _ in self.temps:
            tmp.unlink(missing_ok=True)


def _split_pattern(split: str) -> re.Pattern[str]:
    return re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")


def _existing_shards(out: Path, split: str) -> list[Path]:
    if not out.is_dir():
        return []
    pattern = _split_pattern(split)
    return sorted(p for p in out.iterdir() if pattern.fullmatch(p.name))


def _ordered_splits(splits: dict[str, Any]) -> dict[str, Any]:
    rank = {name: i for i, name in enumerate(_SPLIT_ORDER)}
    return {k: splits[k] for k in sorted(splits, key=lambda s: (rank.get(s, len(rank)), s))}


# ---------------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m seg_dist.pack",
        description="Pack image/mask folders into WebDataset shards + manifest.json (see shards/README.md).",
    )
    ap.add_argument("--images", help="image folder (searched recursively)")
    ap.add_argument("--masks", help="mask folder, same relative layout/stems as --images")
    ap.add_argument("--out", help="output folder, e.g. shards/voc (default for --synthetic: shards/synth)")
    ap.add_argument("--num-classes", type=int, help="number of classes N; labels must be in [0, N) or ignore")
    ap.add_argument("--split", default="train", choices=_SPLIT_ORDER, help="split to write (default train)")
    ap.add_argument("--val-fraction", type=float, help="also carve a 'val' split of this fraction (seeded)")
    ap.add_argument("--ignore-index", type=int, default=255, help="label ignored by loss/metrics (default 255)")
    ap.add_argument(
        "--samples-per-shard",
        type=int,
        help=f"default {DEFAULT_SAMPLES_PER_SHARD} ({SYNTH_SAMPLES_PER_SHARD} synthetic)",
    )
    ap.add_argument("--max-size", type=int, help="downscale so the longer side is <= this many pixels")
    ap.add_argument("--class-names", help="comma-separated, N names (default class_0..class_{N-1})")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decode processes")
    ap.add_argument("--list", help="file of stems to pack, one per line (e.g. VOC ImageSets/Segmentation)")
    ap.add_argument("--image-suffix", default="", help="stripped from image stems, e.g. _leftImg8bit")
    ap.add_argument("--mask-suffix", default="", help="stripped from mask stems, e.g. _gtFine_labelIds")
    ap.add_argument("--label-map", help="YAML source_id: class_id; unmapped ids -> ignore (e.g. Cityscapes)")
    ap.add_argument("--palette", help="YAML colour -> class for RGB-coded masks (e.g. CamVid)")
    ap.add_argument("--skip-bad", action="store_true", help="pack good pairs, record bad ones as manifest rejects")
    ap.add_argument("--overwrite", action="store_true", help="replace split(s) already in --out")
    ap.add_argument("--seed", type=int, default=0, help="for --val-fraction and --synthetic (default 0)")
    ap.add_argument("--synthetic", action="store_true", help="generate and pack the seg_dist.synth dataset")
    ap.add_argument("--n", type=int, default=480, help="--synthetic: number of samples (default 480)")
    ap.add_argument("--size", type=int, default=64, help="--synthetic: image side (default 64)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 2 bad input or refused)."""
    args = _parser().parse_args(argv)
    try:
        if args.synthetic:
            return _pack_synthetic(args)
        missing = [f for f, v in (("--images", args.images), ("--masks", args.masks), ("--out", args.out)) if not v]
        if args.num_classes is None:
            missing.append("--num-classes")
        if missing:
            raise PackError(f"missing {', '.join(missing)} (or use --synthetic)")
        return _pack(args)
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _pack_synthetic(args: argparse.Namespace) -> int:
    from seg_dist import synth  # only needed here

    if args.images or args.masks or args.list:
        raise PackError("--synthetic generates its own images; drop --images/--masks/--list")
    if args.num_classes not in (None, len(synth.CLASS_NAMES)):
        raise PackError(f"--synthetic has {len(synth.CLASS_NAMES)} classes, not --num-classes {args.num_classes}")
    args.out = args.out or "shards/synth"
    args.num_classes = len(synth.CLASS_NAMES)
    args.class_names = args.class_names or ",".join(synth.CLASS_NAMES)
    args.ignore_index = synth.IGNORE_INDEX
    if args.val_fraction is None:
        args.val_fraction = SYNTH_VAL_FRACTION
    if args.samples_per_shard is None:
        args.samples_per_shard = SYNTH_SAMPLES_PER_SHARD
    with tempfile.TemporaryDirectory(prefix="seg_dist_synth_") as tmp:
        try:
            synth.generate(tmp, args.n, args.size, args.seed)
        except ValueError as e:
            raise PackError(str(e)) from e
        args.images, args.masks = f"{tmp}/images", f"{tmp}/masks"
        return _pack(args)


def _check_args(args: argparse.Namespace) -> list[str]:
    """Validate options; returns the class names."""
    n, ignore = args.num_classes, args.ignore_index
    if n < 1:
        raise PackError(f"--num-classes must be >= 1, got {n}")
    if not (n <= ignore <= 65535):
        raise PackError(f"--ignore-index {ignore} must be in [num_classes={n}, 65535] (not a real class)")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise PackError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.val_fraction is not None and args.split == "val":
        raise PackError("--val-fraction carves 'val' out of --split; use --split train or test with it")
    if args.samples_per_shard is not None and args.samples_per_shard < 1:
        raise PackError(f"--samples-per-shard must be >= 1, got {args.samples_per_shard}")
    if args.max_size is not None and args.max_size < 1:
        raise PackError(f"--max-size must be >= 1, got {args.max_size}")
    if args.label_map and args.palette:
        raise PackError("give --label-map or --palette, not both")
    if args.workers < 1:
        raise PackError(f"--workers must be >= 1, got {args.workers}")
    if args.class_names is None:
        return [f"class_{i}" for i in range(n)]
    names = [s.strip() for s in args.class_names.split(",")]
    if len(names) != n or not all(names):
        raise PackError(f"--class-names has {len(names)} names (empty ones count), --num-classes is {n}")
    return names


def _load_existing(
    out: Path, splits: list[str], args: argparse.Namespace, names: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """(manifest already in --out or {}, class names), after checking the new splits may join it."""
    if out.exists() and not out.is_dir():
        raise PackError(f"--out {out}: exists and is not a directory")
    old: dict[str, Any] = {}
    if (out / shards.MANIFEST).exists():
        try:
            old = shards.load_manifest(out)
        except (ValueError, FileNotFoundError) as e:
            raise PackError(f"{e}; fix or remove it") from e
    old_splits = old.get("splits", {})
    for split in splits:
        stray = _existing_shards(out, split)
        if (split in old_splits or stray) and not args.overwrite:
            what = "is in the manifest" if split in old_splits else f"has {len(stray)} shard files"
            raise PackError(f"--out {out}: split {split!r} {what}; pass --overwrite to replace it")
    kept = [s for s in old_splits if s not in splits]
    if kept and args.class_names is None and old["num_classes"] == args.num_classes:
        names = old["class_names"]  # adding a split: keep the names the first one was packed with
    if kept:
        mine = {"num_classes": args.num_classes, "ignore_index": args.ignore_index, "class_names": names}
        for field, value in mine.items():
            if old[field] != value:
                raise PackError(
                    f"{out / shards.MANIFEST}: {field} is {old[field]!r} for splits {kept}, "
                    f"this pack has {value!r}; use another --out"
                )
    return old, names


def _assign_splits(pairs: list[Pair], args: argparse.Namespace) -> dict[str, list[Pair]]:
    if args.val_fraction is None:
        return {args.split: pairs}
    keys = [p.key for p in pairs]  # already sorted, so the shuffle only depends on the set and the seed
    random.Random(args.seed).shuffle(keys)
    n_val = min(max(1, round(len(keys) * args.val_fraction)), len(keys) - 1)
    val = set(keys[:n_val])
    return {args.split: [p for p in pairs if p.key not in val], "val": [p for p in pairs if p.key in val]}


def _pack(args: argparse.Namespace) -> int:
    names = _check_args(args)
    out = Path(args.out)
    split_names = [args.split] + (["val"] if args.val_fraction is not None else [])
    old, names = _load_existing(out, split_names, args, names)
    lut = load_label_map(args.label_map, args.num_classes, args.ignore_index) if args.label_map else None
    colours = colour_classes = None
    if args.palette:
        colours, colour_classes = load_palette(args.palette, args.num_classes, args.ignore_index)
    spec = LabelSpec(args.num_classes, args.ignore_index, args.max_size, lut, colours, colour_classes)

    stems = _read_list(args.list) if args.list else None
    pairs, problems = pair_files(
        args.images, args.masks, args.image_suffix, args.mask_suffix, stems, f"--list {args.list}"
    )
    assigned = _assign_splits(pairs, args)
    runner = _Runner(min(args.workers, max(1, len(pairs))), spec)
    try:
        stats: dict[str, tuple[list[Pair], list[tuple[np.ndarray, int, tuple[int, int]]]]] = {}
        rejects: dict[str, list[tuple[str, str]]] = {s: [] for s in split_names}
        rejects[args.split].extend(problems)
        with tqdm(total=len(pairs), desc="validate", unit="img", disable=None) as bar:
            for split, members in assigned.items():
                good: list[Pair] = []
                good_stats = []
                for pair, (bad, st) in zip(members, runner.imap(_inspect, members), strict=True):
                    bar.update()
                    if bad:
                        rejects[split].extend(bad)
                    else:
                        good.append(pair)
                        good_stats.append(st)
                stats[split] = (good, good_stats)
        all_problems = [p for split in split_names for p in rejects[split]]
        if all_problems and not args.skip_bad:
            for path, msg in sorted(all_problems):
                print(f"{path}: {msg}", file=sys.stderr)
            raise PackError(
                f"{len(all_problems)} problem(s); nothing written to {out} (--skip-bad packs the good pairs)"
            )
        for path, msg in sorted(all_problems):
            print(f"skipped {path}: {msg}", file=sys.stderr)
        empty = [s for s in split_names if not stats.get(s, ([], []))[0]]
        if empty:
            raise PackError(f"no good pairs for split(s) {empty}; nothing written to {out}")
        per_shard = args.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD
        _write(out, old, names, args, split_names, stats, rejects, runner, per_shard)
    finally:
        runner.close()
    return 0


def _write(
    out: Path,
    old: dict[str, Any],
    names: list[str],
    args: argparse.Namespace,
    split_names: list[str],
    stats: dict[str, tuple[list[Pair], list[tuple[np.ndarray, int, tuple[int, int]]]]],
    rejects: dict[str, list[tuple[str, str]]],
    runner: _Runner,
    per_shard: int,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    writers: list[_ShardWriter] = []
    new_splits: dict[str, Any] = {}
    try:
        with tqdm(total=sum(len(stats[s][0]) for s in split_names), desc="write", unit="img", disable=None) as bar:
            for split in split_names:
                good, good_stats = stats[split]
                writer = _ShardWriter(out, split, per_shard)
                writers.append(writer)
                for members in runner.imap(_encode, good):
                    writer.add(members)
                    bar.update()
                new_splits[split] = _split_entry(writer.close(), good_stats, rejects[split], args.num_classes)
        # Everything is on disk: only now replace old shards, then publish the manifest.
        for writer in writers:
            for tmp, final in writer.temps:
                os.replace(tmp, final)
        atomic.fsync_dir(out)
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    old_splits = old.get("splits", {})
    splits = {k: v for k, v in old_splits.items() if k not in new_splits} | new_splits
    manifest = {
        "format": shards.FORMAT,
        "packer_version": seg_dist.__version__,
        "num_classes": args.num_classes,
        "ignore_index": args.ignore_index,
        "class_names": names,
        "splits": _ordered_splits(splits),
    }
    atomic.write_text(out / shards.MANIFEST, json.dumps(manifest, indent=2) + "\n")
    for split in split_names:
        # Shards of the replaced split that the new one did not overwrite (it has fewer now).
        current = {s["name"] for s in new_splits[split]["shards"]}
        for path in _existing_shards(out, split):
            if path.name not in current:
                path.unlink()
    for split in split_names:
        entry = new_splits[split]
        size = sum(s["bytes"] for s in entry["shards"]) / 1e6
        print(f"{split}: {entry['num_samples']} samples in {len(entry['shards'])} shard(s), {size:.1f} MB")
    print(f"wrote {out / shards.MANIFEST}")


def _split_entry(
    shard_entries: list[dict[str, Any]],
    good_stats: list[tuple[np.ndarray, int, tuple[int, int]]],
    rejects: list[tuple[str, str]],
    num_classes: int,
) -> dict[str, Any]:
    hist = np.zeros(num_classes, np.int64)
    ignored = 0
    hws = np.array([hw for _, _, hw in good_stats], np.int64).reshape(-1, 2)
    for h, ign, _ in good_stats:
        hist += h
        ignored += ign
    return {
        "num_samples": len(good_stats),
        "shards": shard_entries,
        "class_histogram": [int(v) for v in hist],
        "ignored_pixels": int(ignored),
        "image_size": {
            "min_hw": [int(v) for v in hws.min(0)],
            "max_hw": [int(v) for v in hws.max(0)],
            "mean_hw": [round(float(v), 1) for v in hws.mean(0)],
        },
        "rejects": [{"path": p, "error": e} for p, e in sorted(rejects)],
    }


if __name__ == "__main__":
    sys.exit(main())
