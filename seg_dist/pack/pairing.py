"""Find image and mask files and pair them by relative stem (path without extension)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from seg_dist.pack.errors import PackError, Problem

__all__ = ["IMAGE_SUFFIXES", "MASK_SUFFIXES", "Pair", "pair_files", "read_list", "sanitize_key"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".npy")
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Pair:
    """One image/mask pair; `image`/`mask` are paths as the user gave them, `*_rel` relative to the roots."""

    key: str
    stem: str
    image: str
    mask: str
    image_rel: str
    mask_rel: str


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
) -> tuple[list[Pair], list[Problem]]:
    """Pair images and masks by relative stem; returns (pairs sorted by key, [(path, problem), ...]).

    `stems` restricts the pairs to these (a --list); `list_name` names that list in problems.
    """
    images, masks = Path(images), Path(masks)
    for flag, d in (("--images", images), ("--masks", masks)):
        if not d.is_dir():
            raise PackError(f"{flag} {d}: not a directory")
    found_img = _scan(images, IMAGE_SUFFIXES, image_suffix, mask_suffix)
    found_mask = _scan(masks, MASK_SUFFIXES, mask_suffix, image_suffix)
    problems: list[Problem] = []
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


def read_list(path: str | Path) -> list[str]:
    """Stems of a --list file: one per line, blank lines and `#` comments skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PackError(f"--list {path}: cannot read ({e})") from e
    stems = [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]
    if not stems:
        raise PackError(f"--list {path}: no stems listed")
    return stems
