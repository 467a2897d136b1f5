"""The packing pipeline: options -> pairs -> checked samples -> shards -> manifest.

Every pair is decoded and checked before anything is written; all problems are reported at once
unless `skip_bad` packs the good pairs and records the rest in the manifest.
"""

from __future__ import annotations

import functools
import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

import seg_dist
from seg_dist import atomic, shards, synthetic
from seg_dist.errors import UserError
from seg_dist.pack.errors import PackError, Problem
from seg_dist.pack.labels import LabelSpec, class_colours, load_label_map, load_palette
from seg_dist.pack.pairing import Pair, pair_files, read_list
from seg_dist.pack.samples import (
    PixelSums,
    SamplePool,
    SampleStats,
    SceneStats,
    Tiling,
    check_pair,
    check_scene,
    encode_pair,
    encode_scene,
    sample_stats,
)
from seg_dist.pack.writer import ShardWriter
from seg_dist.shards import ImageSpec

__all__ = [
    "DEFAULT_SAMPLES_PER_SHARD",
    "DEFAULT_WORKERS",
    "SPLITS",
    "SYNTH_SAMPLES_PER_SHARD",
    "SYNTH_VAL_FRACTION",
    "PackOptions",
    "PackResult",
    "pack",
    "pack_synthetic",
]

SPLITS = ("train", "val", "test")  # also the order of splits in the manifest
# ~30 MB shards for VOC-sized JPEGs; enough shards for a few ranks x workers on mid-sized datasets.
DEFAULT_SAMPLES_PER_SHARD = 256
# The synthetic set is tiny: smaller shards so 2 ranks x 2 loader workers each still get whole shards.
SYNTH_SAMPLES_PER_SHARD = 64
SYNTH_VAL_FRACTION = 0.2
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

# The good pairs of a split and their statistics (a scene's tiles' with --tile).
_Checked = tuple[list[Pair], list[SampleStats | SceneStats]]


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


@dataclass(frozen=True)
class PackOptions:
    """Everything `pack` needs; one field per command-line option (`list_file` is --list)."""

    images: Path  # image folder, searched recursively
    masks: Path  # mask folder, same relative layout and stems as `images`
    out: Path  # output folder, e.g. shards/voc
    num_classes: int  # labels must be in [0, num_classes) or the ignore index
    split: str = "train"  # one of SPLITS
    val_fraction: float | None = None  # also carve a seeded 'val' split of this fraction out of `split`
    ignore_index: int = 255
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    max_size: int | None = None  # downscale so the longer side is at most this
    class_names: tuple[str, ...] | None = None  # default class_0..class_{N-1} (or what `out` already has)
    workers: int = DEFAULT_WORKERS  # decode processes
    list_file: Path | None = None  # stems to pack, one per line
    image_suffix: str = ""  # stripped from image stems (files without it are skipped)
    mask_suffix: str = ""  # stripped from mask stems (files without it are skipped)
    label_map: Path | None = None  # YAML source_id: class_id
    palette: Path | None = None  # YAML colour -> class, for RGB-coded masks
    skip_bad: bool = False  # pack the good pairs, record bad ones as manifest rejects
    overwrite: bool = False  # replace splits already in `out`
    seed: int = 0  # for the val_fraction shuffle
    keep_alpha: bool = False  # keep the alpha channel of RGBA, LA and PA images (default: dropped)
    tile: int | None = None  # cut each scene into tiles of this side (seg_dist/tiles.py)
    tile_overlap: int = 0  # pixels a tile shares with each neighbour
    drop_empty: bool = False  # leave out tiles whose mask is all ignore label
    rotation_invariant: bool = False  # labels do not depend on which way up an image is (recorded for training)

    def __post_init__(self) -> None:
        # Accept str paths and any sequence of names from Python callers; store one canonical type.
        for name in ("images", "masks", "out", "list_file", "label_map", "palette"):
            object.__setattr__(self, name, _path(getattr(self, name)))
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))

    @property
    def tiling(self) -> Tiling | None:
        """How scenes are cut into tiles; None: each pair is one sample."""
        return None if self.tile is None else Tiling(self.tile, self.tile_overlap, self.drop_empty)

    @property
    def split_names(self) -> tuple[str, ...]:
        """The splits this pack writes."""
        return (self.split, "val") if self.val_fraction is not None else (self.split,)


@dataclass(frozen=True)
class PackResult:
    """What `pack` wrote: the output folder, its new manifest, and which of its splits this call wrote."""

    out: Path
    manifest: dict[str, Any]
    splits: tuple[str, ...]
    rejects: list[Problem] = field(default_factory=list)  # (path, error) left out by skip_bad, sorted


def _check_options(o: PackOptions) -> list[str]:
    """Validate options; returns the class names."""
    n, ignore = o.num_classes, o.ignore_index
    if o.split not in SPLITS:
        raise PackError(f"--split must be one of {', '.join(SPLITS)}, got {o.split!r}")
    if n < 1:
        raise PackError(f"--num-classes must be >= 1, got {n}")
    if not (n <= ignore <= 65535):
        raise PackError(f"--ignore-index {ignore} must be in [num_classes={n}, 65535] (not a real class)")
    if o.val_fraction is not None and not 0 < o.val_fraction < 1:
        raise PackError(f"--val-fraction must be in (0, 1), got {o.val_fraction}")
    if o.val_fraction is not None and o.split == "val":
        raise PackError("--val-fraction carves 'val' out of --split; use --split train or test with it")
    if o.samples_per_shard < 1:
        raise PackError(f"--samples-per-shard must be >= 1, got {o.samples_per_shard}")
    if o.max_size is not None and o.max_size < 1:
        raise PackError(f"--max-size must be >= 1, got {o.max_size}")
    if o.label_map and o.palette:
        raise PackError("give --label-map or --palette, not both")
    if o.workers < 1:
        raise PackError(f"--workers must be >= 1, got {o.workers}")
    if o.tile is None and (o.tile_overlap or o.drop_empty):
        raise PackError("--tile-overlap and --drop-empty apply to tiles: give --tile SIZE too")
    if o.tile is not None and o.tile < 1:
        raise PackError(f"--tile must be >= 1, got {o.tile}")
    if o.tile is not None and not 0 <= o.tile_overlap < o.tile:
        raise PackError(f"--tile-overlap must be in [0, --tile={o.tile}), got {o.tile_overlap}")
    if o.tile is not None and o.max_size is not None:
        # Tiles exist to keep the scene's resolution; a scene shrunk to --max-size a side needs no tiles.
        raise PackError("give --tile or --max-size, not both (tiles keep the scenes' own resolution)")
    if o.class_names is None:
        return [f"class_{i}" for i in range(n)]
    names = [s.strip() for s in o.class_names]
    if len(names) != n or not all(names):
        raise PackError(f"--class-names has {len(names)} names (empty ones count), --num-classes is {n}")
    return names


def _load_existing(out: Path, o: PackOptions, names: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(manifest already in `out` or {}, class names), after checking the new splits may join it."""
    if out.exists() and not out.is_dir():
        raise PackError(f"--out {out}: exists and is not a directory")
    old: dict[str, Any] = {}
    if (out / shards.MANIFEST).exists():
        try:
            old = shards.load_manifest(out)
        except shards.ManifestError as e:
            raise PackError(f"{e}; or remove it") from e
    old_splits = old.get("splits", {})
    for split in o.split_names:
        stray = shards.existing_shards(out, split)
        if (split in old_splits or stray) and not o.overwrite:
            what = "is in the manifest" if split in old_splits else f"has {len(stray)} shard files"
            raise PackError(f"--out {out}: split {split!r} {what}; pass --overwrite to replace it")
    kept = [s for s in old_splits if s not in o.split_names]
    if kept and o.class_names is None and old["num_classes"] == o.num_classes:
        names = old["class_names"]  # adding a split: keep the names the first one was packed with
    if kept:
        if "max_size" not in old:
            raise PackError(
                f"{out / shards.MANIFEST}: splits {kept} were packed before seg_dist recorded --max-size, so "
                "whether this pack's scale matches theirs is unknown; re-pack them (--overwrite) or use another --out"
            )
        # One scale for every split: a model trained on one split is validated and used at that scale.
        mine = {"num_classes": o.num_classes, "ignore_index": o.ignore_index, "class_names": names,
                "max_size": o.max_size, "tiling": o.tiling.manifest() if o.tiling else None,
                "rotation_invariant": o.rotation_invariant}
        for key, value in mine.items():
            # Folders packed before a key existed lack it: untiled, and not known to be rotation-invariant.
            if old.get(key, False if key == "rotation_invariant" else None) != value:
                raise PackError(
                    f"{out / shards.MANIFEST}: {key} is {old.get(key)!r} for splits {kept}, "
                    f"this pack has {value!r}; use another --out"
                )
    return old, names


def _label_spec(o: PackOptions) -> LabelSpec:
    lut = load_label_map(o.label_map, o.num_classes, o.ignore_index) if o.label_map else None
    colours = colour_classes = None
    if o.palette:
        colours, colour_classes = load_palette(o.palette, o.num_classes, o.ignore_index)
    return LabelSpec(o.num_classes, o.ignore_index, o.max_size, lut, colours, colour_classes)


def _assign_splits(pairs: list[Pair], split: str, val_fraction: float | None, seed: int) -> dict[str, list[Pair]]:
    if val_fraction is None:
        return {split: pairs}
    keys = [p.key for p in pairs]  # already sorted, so the shuffle only depends on the set and the seed
    random.Random(seed).shuffle(keys)
    n_val = min(max(1, round(len(keys) * val_fraction)), len(keys) - 1)
    val = set(keys[:n_val])
    return {split: [p for p in pairs if p.key not in val], "val": [p for p in pairs if p.key in val]}


def _check_all(
    assigned: dict[str, list[Pair]], pool: SamplePool, rejects: dict[str, list[Problem]], tiling: Tiling | None = None
) -> dict[str, _Checked]:
    """Validation pass over every pair; bad ones go to `rejects` of their split."""
    check = check_pair if tiling is None else functools.partial(check_scene, tiling=tiling)
    checked: dict[str, _Checked] = {}
    with tqdm(total=sum(map(len, assigned.values())), desc="validate", unit="img", disable=None) as bar:
        for split, members in assigned.items():
            good: list[Pair] = []
            good_stats: list[SampleStats | SceneStats] = []
            for pair, (bad, stats) in zip(members, pool.imap(check, members, tiling is not None), strict=True):
                bar.update()
                if bad:
                    rejects[split].extend(bad)
                else:
                    good.append(pair)
                    good_stats.append(stats)
            checked[split] = (good, good_stats)
    return checked


def pack(options: PackOptions) -> PackResult:
    """Pack `options.images`/`options.masks` into shards + manifest.json in `options.out`.

    Raises PackError (with `.problems` when pairs were bad) and leaves `out` untouched if anything is wrong.
    """
    o = options
    names = _check_options(o)
    out = o.out
    old, names = _load_existing(out, o, names)
    spec = _label_spec(o)
    stems = read_list(o.list_file) if o.list_file else None
    pairs, problems = pair_files(o.images, o.masks, o.image_suffix, o.mask_suffix, stems, f"--list {o.list_file}")
    assigned = _assign_splits(pairs, o.split, o.val_fraction, o.seed)
    rejects: dict[str, list[Problem]] = {s: [] for s in o.split_names}
    rejects[o.split].extend(problems)
    with SamplePool(min(o.workers, max(1, len(pairs))), spec, o.keep_alpha) as pool:
        checked = _check_all(assigned, pool, rejects, o.tiling)
        image = _dataset_image(checked, old, o, rejects)
        all_problems = sorted(p for split in o.split_names for p in rejects[split])
        if all_problems and not o.skip_bad:
            raise PackError(
                f"{len(all_problems)} problem(s); nothing written to {out} (--skip-bad packs the good pairs)",
                all_problems,
            )
        empty = [s for s in o.split_names if not checked.get(s, ([], []))[0]]
        if empty:
            raise PackError(f"no good pairs for split(s) {empty}; nothing written to {out}", all_problems)
        no_tiles = [s for s in o.split_names if not any(sample_stats(st) for st in checked[s][1])]
        if no_tiles:
            raise PackError(f"every tile of split(s) {no_tiles} is all ignore label and --drop-empty left them out; "
                            f"nothing written to {out}")
        manifest = _write(out, old, names, o, checked, rejects, pool, _image_entry(image, checked, old))
    return PackResult(out, manifest, o.split_names, all_problems)


def _write(
    out: Path,
    old: dict[str, Any],
    names: list[str],
    o: PackOptions,
    checked: dict[str, _Checked],
    rejects: dict[str, list[Problem]],
    pool: SamplePool,
    image: dict[str, Any],
) -> dict[str, Any]:
    image_spec = shards.image_spec({"image": image})
    """Writing pass: shards of every split, then the manifest, then removal of replaced shards."""
    out.mkdir(parents=True, exist_ok=True)
    writers: list[ShardWriter] = []
    new_splits: dict[str, Any] = {}
    try:
        total = sum(len(checked[s][0]) for s in o.split_names)
        tiling = o.tiling
        with tqdm(total=total, desc="write", unit="scene" if tiling else "img", disable=None) as bar:
            for split in o.split_names:
                good, good_stats = checked[split]
                writer = ShardWriter(out, split, o.samples_per_shard)
                writers.append(writer)
                if tiling is None:
                    for members in pool.imap(functools.partial(encode_pair, image=image_spec), good):
                        writer.add(members)
                        bar.update()
                else:
                    encode = functools.partial(encode_scene, tiling=tiling, image=image_spec)
                    for scene in pool.imap(encode, good, True):
                        for members in scene:
                            writer.add(members)
                        bar.update()
                new_splits[split] = _split_entry(writer.close(), good_stats, rejects[split], o.num_classes)
                new_splits[split]["index"] = writer.index  # the loader checks the index file against this
        # Everything is on disk: only now replace old shards, then publish the manifest.
        for writer in writers:
            writer.commit()
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    old_splits = old.get("splits", {})
    splits = {k: v for k, v in old_splits.items() if k not in new_splits} | new_splits
    manifest = {
        "format": shards.FORMAT,
        "packer_version": seg_dist.__version__,
        "num_classes": o.num_classes,
        "ignore_index": o.ignore_index,
        "class_names": names,
        # The packing scale (null: original sizes), so a model can be fed images at the scale it learnt.
        "max_size": o.max_size,
        # What every image decodes to, and the train split's pixel statistics (the default normalisation).
        "image": image,
        # How scenes were cut into tiles (null: one sample per image), so predict can tell a tiled set.
        "tiling": o.tiling.manifest() if o.tiling else None,
        # Told by the user (pack --rotation-invariant): training then flips and turns images every way.
        "rotation_invariant": o.rotation_invariant,
        "splits": _ordered_splits(splits),
    }
    if o.palette:  # the dataset's own colours, so pictures show classes as its masks do
        manifest["palette"] = class_colours(o.palette, o.num_classes, o.ignore_index)
    atomic.write_text(out / shards.MANIFEST, json.dumps(manifest, indent=2) + "\n")
    for split in o.split_names:
        # Shards of the replaced split that the new one did not overwrite (it has fewer now).
        current = {s["name"] for s in new_splits[split]["shards"]}
        for path in shards.existing_shards(out, split):
            if path.name not in current:
                path.unlink()
    return manifest


_STATS_SPLIT = "train"


def _dataset_image(checked: dict[str, _Checked], old: dict[str, Any], o: PackOptions,
                   rejects: dict[str, list[Problem]]) -> ImageSpec:
    """The channels and type every image of the dataset decodes to: the folder's own when it keeps splits
    packed before, else the kind most of this pack's images are or become (8-bit grey among RGB images is
    expanded, `shards.promotable`). Images of another kind become problems of their split and leave
    `checked`, so they are reported (or with --skip-bad left out) like any bad pair."""
    kept = [s for s in old.get("splits", {}) if s not in o.split_names]
    kinds: dict[ImageSpec, int] = {}
    for split in o.split_names:
        for stats in checked[split][1]:
            kinds[stats.image] = kinds.get(stats.image, 0) + 1
    if kept:
        target = shards.image_spec(old)
        if target.alpha != o.keep_alpha:
            how = "with" if target.alpha else "without"
            raise PackError(f"{o.out / shards.MANIFEST}: splits {kept} were packed {how} --keep-alpha; pack this "
                            f"split {how} it too, or use another --out")
        why = f"splits {kept} in {o.out / shards.MANIFEST} hold {target.text()} images"
    elif kinds:
        def reach(candidate: ImageSpec) -> tuple[int, int]:
            return sum(n for kind, n in kinds.items() if shards.promotable(kind, candidate)), candidate.channels

        target = max(kinds, key=reach)
        why = f"{reach(target)[0]} of this pack's images are (or become) {target.text()}"
    else:
        return ImageSpec(3, "uint8", o.keep_alpha)
    for split in o.split_names:
        good, good_stats = checked[split]
        keep = [shards.promotable(stats.image, target) for stats in good_stats]
        if all(keep):
            continue
        for pair, stats, ok in zip(good, good_stats, keep, strict=True):
            if not ok:
                rejects[split].append((pair.image, f"a {stats.image.text()} image; every image of a dataset has "
                                                   f"the same channels and type, and {why}"))
        checked[split] = ([p for p, ok in zip(good, keep, strict=True) if ok],
                          [st for st, ok in zip(good_stats, keep, strict=True) if ok])
    return target


# The channels of a promoted image, by the kinds `shards.conform_image` turns into one another (None: the
# opaque alpha it adds).
_PROMOTED_CHANNELS: dict[tuple[int, int], list[int | None]] = {
    (1, 3): [0, 0, 0], (1, 4): [0, 0, 0, None], (2, 4): [0, 0, 0, 1], (3, 4): [0, 1, 2, None],
}


def _image_entry(image: ImageSpec, checked: dict[str, _Checked], old: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `image` entry: channels, dtype (alpha when kept) and, measured over every pixel of the
    train split as stored (exact sums merged from the worker processes' per-image sums), mean and std per
    channel in raw pixel values. A pack without a train split keeps the folder's earlier statistics."""
    entry: dict[str, Any] = {"channels": image.channels, "dtype": image.dtype}
    if image.alpha:
        entry["alpha"] = True
    if _STATS_SPLIT in checked and checked[_STATS_SPLIT][1]:
        total: PixelSums | None = None
        for stats in checked[_STATS_SPLIT][1]:
            sums = stats.pixels
            if stats.image.channels != image.channels:
                sums = sums.channels(_PROMOTED_CHANNELS[(stats.image.channels, image.channels)])
            total = sums if total is None else total.merge(sums)
        assert total is not None
        entry["mean"], entry["std"] = total.finish()
    elif (measured := shards.image_statistics(old)) is not None:
        entry["mean"], entry["std"] = measured
    return entry


def _ordered_splits(splits: dict[str, Any]) -> dict[str, Any]:
    rank = {name: i for i, name in enumerate(SPLITS)}
    return {k: splits[k] for k in sorted(splits, key=lambda s: (rank.get(s, len(rank)), s))}


def _split_entry(
    shard_entries: list[dict[str, Any]], checked_stats: list[SampleStats | SceneStats], rejects: list[Problem],
    num_classes: int
) -> dict[str, Any]:
    good_stats = [t for s in checked_stats for t in sample_stats(s)]  # one per stored sample
    hist = np.zeros(num_classes, np.int64)
    ignored = 0
    hws = np.array([s.hw for s in good_stats], np.int64).reshape(-1, 2)
    originals = np.array([s.original_hw for s in good_stats], np.int64).reshape(-1, 2)
    for s in good_stats:
        hist += s.histogram
        ignored += s.ignored
    entry: dict[str, Any] = {
        "num_samples": len(good_stats),
        "shards": shard_entries,
        "class_histogram": [int(v) for v in hist],
        "ignored_pixels": int(ignored),
        "image_size": {
            "min_hw": [int(v) for v in hws.min(0)],
            "max_hw": [int(v) for v in hws.max(0)],
            "mean_hw": [round(float(v), 1) for v in hws.mean(0)],
            "original_mean_hw": [round(float(v), 1) for v in originals.mean(0)],
        },
        "rejects": [{"path": p, "error": e} for p, e in sorted(rejects)],
    }
    scenes = [s for s in checked_stats if isinstance(s, SceneStats)]
    if scenes:
        entry["tiling"] = {"scenes": len(scenes), "tiles": len(good_stats),
                           "dropped_empty": sum(s.dropped for s in scenes)}
    return entry


def pack_synthetic(
    out: str | Path = "shards/synth",
    *,
    n: int = 480,
    size: int = 64,
    seed: int = 0,
    samples_per_shard: int = SYNTH_SAMPLES_PER_SHARD,
    workers: int = DEFAULT_WORKERS,
    overwrite: bool = False,
    split: str = "train",
    val_fraction: float | None = SYNTH_VAL_FRACTION,
    class_names: tuple[str, ...] | None = None,
    max_size: int | None = None,
    kind: str = "rgb",
    rotation_invariant: bool = False,
) -> PackResult:
    """Generate `n` samples of `seg_dist.synthetic` of `kind` (seeded by `seed`) and pack them into `out`."""
    with tempfile.TemporaryDirectory(prefix="seg_dist_synth_") as tmp:
        options = PackOptions(
            images=Path(tmp, "images"),
            masks=Path(tmp, "masks"),
            out=Path(out),
            num_classes=len(synthetic.class_names(kind)),
            split=split,
            val_fraction=val_fraction,
            ignore_index=synthetic.IGNORE_INDEX,
            samples_per_shard=samples_per_shard,
            max_size=max_size,
            class_names=class_names or synthetic.class_names(kind),
            workers=workers,
            overwrite=overwrite,
            seed=seed,
            rotation_invariant=rotation_invariant,
        )
        _check_options(options)  # before spending time on generating
        try:
            synthetic.generate(tmp, n, size, seed, kind=kind)
        except UserError as e:  # pack's callers catch PackError
            raise PackError(str(e)) from e
        return pack(options)
