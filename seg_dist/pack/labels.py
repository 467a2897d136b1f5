"""How mask pixels become class ids: label-map and RGB-palette files, and decoding one mask."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from seg_dist import shards
from seg_dist.pack.errors import PackError

__all__ = ["LabelSpec", "MaskError", "class_colours", "decode_labels", "load_label_map", "load_palette"]


class MaskError(Exception):
    """A mask that decodes but cannot be read as class ids; reported against the mask file."""


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


def _load_yaml_mapping(path: str | Path, flag: str) -> dict[Any, Any]:
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


def load_label_map(path: str | Path, num_classes: int, ignore_index: int) -> np.ndarray:
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


def load_palette(path: str | Path, num_classes: int, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """YAML colour -> class for RGB-coded masks; returns (sorted 0xRRGGBB codes, class ids).

    Entries are either `"R,G,B": class` / `"#rrggbb": class`, or `class: [R, G, B]` (or a list of colours).
    """
    table = _palette_table(path, num_classes, ignore_index)
    codes = np.array(sorted(table), np.int64)
    return codes, np.array([table[c] for c in codes], np.int64)


def class_colours(path: str | Path, num_classes: int, ignore_index: int) -> list[list[int]]:
    """[r, g, b] of classes 0, 1, ... as the palette file first gives them, up to the first class it leaves
    out: the dataset's own colours, for pictures (the manifest's `palette`)."""
    first: dict[int, int] = {}
    for code, cls in _palette_table(path, num_classes, ignore_index).items():
        first.setdefault(cls, code)
    colours = []
    while len(colours) in first:
        code = first[len(colours)]
        colours.append([code >> 16 & 255, code >> 8 & 255, code & 255])
    return colours


def _palette_table(path: str | Path, num_classes: int, ignore_index: int) -> dict[int, int]:
    """0xRRGGBB -> class id, in the file's order."""
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
    return table


def decode_labels(data: bytes, spec: LabelSpec) -> np.ndarray:
    """Mask bytes -> int64 class ids with the palette or label map applied; MaskError for user errors."""
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        # Turned as viewers show it, as images are (seg_dist.shards.read_image), so the two line up.
        im = shards.upright_labels(opened)
        if spec.colours is not None:
            rgb = np.array(im.convert("RGB")).astype(np.int64)
            code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
            idx = np.clip(np.searchsorted(spec.colours, code), 0, len(spec.colours) - 1)
            assert spec.colour_classes is not None
            return np.where(spec.colours[idx] == code, spec.colour_classes[idx], spec.ignore_index)
        if im.mode not in shards.LABEL_MODES:
            raise MaskError(
                f"mask has {len(im.getbands())} channels (mode {im.mode}); colour-coded masks need --palette"
            )
        labels = np.array(im).astype(np.int64)
    if spec.lut is not None:
        known = (labels >= 0) & (labels < len(spec.lut))
        labels = np.where(known, spec.lut[np.clip(labels, 0, len(spec.lut) - 1)], spec.ignore_index)
    return labels
