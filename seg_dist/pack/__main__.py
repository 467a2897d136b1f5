"""Pack image/mask folders into deterministic WebDataset tar shards plus manifest.json.

    python -m seg_dist.pack --images DIR --masks DIR --out shards/NAME --num-classes N [options]
    python -m seg_dist.pack --synthetic --out shards/synth

(also `seg-dist pack ...`). Every pair is decoded and checked before anything is written; all problems are
reported at once (exit code 2) unless --skip-bad packs the good pairs and records the rest in the manifest.
The shard and manifest format is described in shards/README.md and seg_dist/shards.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seg_dist import cli, outputs, shards, synthetic
from seg_dist.pack.errors import PackError
from seg_dist.pack.pipeline import (
    DEFAULT_SAMPLES_PER_SHARD,
    DEFAULT_WORKERS,
    SPLITS,
    SYNTH_SAMPLES_PER_SHARD,
    SYNTH_VAL_FRACTION,
    PackOptions,
    PackResult,
    pack,
    pack_synthetic,
)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m seg_dist.pack",
        description="Pack image/mask folders into WebDataset shards + manifest.json (see shards/README.md).",
    )
    ap.add_argument("--images", help="image folder (searched recursively)")
    ap.add_argument("--masks", help="mask folder, same relative layout/stems as --images")
    ap.add_argument("--out", help="output folder, e.g. shards/voc (default for --synthetic: shards/synth)")
    ap.add_argument("--num-classes", type=int, help="number of classes N; labels must be in [0, N) or ignore")
    ap.add_argument("--split", default="train", choices=SPLITS, help="split to write (default train)")
    ap.add_argument("--val-fraction", type=float, help="also carve a 'val' split of this fraction (seeded)")
    ap.add_argument("--ignore-index", type=int, default=255, help="label ignored by loss/metrics (default 255)")
    ap.add_argument(
        "--samples-per-shard",
        type=int,
        help=f"default {DEFAULT_SAMPLES_PER_SHARD} ({SYNTH_SAMPLES_PER_SHARD} synthetic)",
    )
    ap.add_argument("--max-size", type=int, help="downscale so the longer side is <= this many pixels")
    ap.add_argument("--class-names", help="comma-separated, N names (default class_0..class_{N-1})")
    ap.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="decode processes")
    ap.add_argument("--list", help="file of stems to pack, one per line (e.g. VOC ImageSets/Segmentation)")
    ap.add_argument("--image-suffix", default="", help="stripped from image stems, e.g. _leftImg8bit")
    ap.add_argument("--mask-suffix", default="", help="stripped from mask stems, e.g. _gtFine_labelIds")
    ap.add_argument("--label-map", help="YAML source_id: class_id; unmapped ids -> ignore (e.g. Cityscapes)")
    ap.add_argument("--palette", help="YAML colour -> class for RGB-coded masks (e.g. CamVid)")
    ap.add_argument("--skip-bad", action="store_true", help="pack good pairs, record bad ones as manifest rejects")
    ap.add_argument("--keep-alpha", action="store_true", help="keep the alpha channel of RGBA/LA/PA images "
                    "(default: dropped)")
    ap.add_argument("--tile", type=int, metavar="SIZE", help="cut each image and mask into SIZE x SIZE tiles, each "
                    "a sample recording its scene and position (for scenes too large to load whole)")
    ap.add_argument("--tile-overlap", type=int, default=0, metavar="PX",
                    help="--tile: pixels a tile shares with each neighbour (default 0)")
    ap.add_argument("--drop-empty", action="store_true", help="--tile: leave out tiles whose mask is all ignore label")
    ap.add_argument("--rotation-invariant", action="store_true",
                    help="the labels do not depend on which way up an image is (overhead, microscopy, fundus "
                         "images): recorded in the manifest, so training flips and turns images every way")
    ap.add_argument("--overwrite", action="store_true", help="replace split(s) already in --out")
    ap.add_argument("--seed", type=int, default=0, help="for --val-fraction and --synthetic (default 0)")
    ap.add_argument("--synthetic", action="store_true", help="generate and pack the seg_dist.synthetic dataset")
    ap.add_argument("--n", type=int, default=480, help="--synthetic: number of samples (default 480)")
    ap.add_argument("--size", type=int, default=64, help="--synthetic: image side (default 64)")
    ap.add_argument("--kind", default="rgb", choices=synthetic.KINDS,
                    help="--synthetic: rgb (default), grey16 (16-bit grey) or bands4 (4-band 16-bit TIFF)")
    return ap


def _class_names(text: str | None) -> tuple[str, ...] | None:
    # Empty names are kept, so that the count check in `pack` reports them.
    return None if text is None else tuple(s.strip() for s in text.split(","))


def _value(args: argparse.Namespace, flag: str) -> Any:
    """What `--image-suffix` (say) was given: argparse's `image_suffix`."""
    return getattr(args, flag.lstrip("-").replace("-", "_"))


def _given(args: argparse.Namespace, *flags: str) -> list[str]:
    return [f for f in flags if _value(args, f)]


def _same_names(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The arguments that the library takes as they are, under the same names."""
    return {name: getattr(args, name) for name in names}


def _options(args: argparse.Namespace) -> PackOptions:
    missing = [f for f in ("--images", "--masks", "--out", "--num-classes") if _value(args, f) in (None, "")]
    if missing:
        raise PackError(f"missing {', '.join(missing)} (or use --synthetic)")
    return PackOptions(
        **_same_names(args, "images", "masks", "out", "num_classes", "split", "val_fraction", "ignore_index",
                      "max_size", "workers", "image_suffix", "mask_suffix", "label_map", "palette", "skip_bad",
                      "overwrite", "seed", "keep_alpha", "tile", "tile_overlap", "drop_empty", "rotation_invariant"),
        samples_per_shard=args.samples_per_shard or DEFAULT_SAMPLES_PER_SHARD,
        class_names=_class_names(args.class_names),
        list_file=args.list,
    )


def _synthetic(args: argparse.Namespace) -> PackResult:
    if _given(args, "--images", "--masks", "--list"):
        raise PackError("--synthetic generates its own images; drop --images/--masks/--list")
    # Flags that would be silently meaningless for the generated masks.
    given = _given(args, "--label-map", "--palette", "--image-suffix", "--mask-suffix", "--tile", "--tile-overlap",
                   "--drop-empty")
    if given:
        raise PackError(f"--synthetic generates its own masks; drop {'/'.join(given)}")
    n_classes = len(synthetic.class_names(args.kind))
    if args.num_classes not in (None, n_classes):
        raise PackError(f"--synthetic has {n_classes} classes, not --num-classes {args.num_classes}")
    if args.ignore_index != synthetic.IGNORE_INDEX:
        raise PackError(f"--synthetic uses ignore index {synthetic.IGNORE_INDEX}, not {args.ignore_index}")
    return pack_synthetic(
        args.out or "shards/synth",
        **_same_names(args, "n", "size", "seed", "workers", "overwrite", "split", "max_size", "kind",
                      "rotation_invariant"),
        samples_per_shard=args.samples_per_shard or SYNTH_SAMPLES_PER_SHARD,
        val_fraction=SYNTH_VAL_FRACTION if args.val_fraction is None else args.val_fraction,
        class_names=_class_names(args.class_names),
    )


def _writes(name: str) -> bool:
    """Whether pack may write (or, replacing a split, remove) a file of this name in --out."""
    return name == shards.MANIFEST or any(shards.shard_name_pattern(split).fullmatch(name) for split in SPLITS)


def _check_paths(args: argparse.Namespace) -> None:
    """The shards and manifest may replace none of the files pack reads (seg_dist/outputs.py)."""
    ins: list[outputs.Input | outputs.InputFolder] = []
    for flag, what in (("--images", "the image folder"), ("--masks", "the mask folder")):
        if _value(args, flag):
            ins.append(outputs.InputFolder(Path(_value(args, flag)), what, f"{flag} {_value(args, flag)}"))
    for flag, what in (("--list", "the stem list"), ("--label-map", "the label map"), ("--palette", "the palette")):
        if _value(args, flag):
            ins.append(outputs.Input(Path(_value(args, flag)), what, f"{flag} {_value(args, flag)}"))
    out = args.out or ("shards/synth" if args.synthetic else None)
    if out:
        # Whether an existing split may be replaced is pack's own rule (--overwrite; other splits are kept).
        outputs.check(ins, [outputs.OutputFolder(Path(out), "the shard folder", f"--out {out}", _writes)],
                      overwrite=True)


def _pack_command(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    _check_paths(args)
    try:
        result = _synthetic(args) if args.synthetic else pack(_options(args))
    except PackError as e:
        # The per-file lines first; cli.run then prints the one-line summary and picks the exit code.
        for path, msg in e.problems:
            print(f"{path}: {msg}", file=sys.stderr)
        raise
    for path, msg in result.rejects:
        print(f"skipped {path}: {msg}", file=sys.stderr)
    for split in result.splits:
        entry = result.manifest["splits"][split]
        size = sum(s["bytes"] for s in entry["shards"]) / 1e6
        tiled, tiling = entry.get("tiling"), result.manifest.get("tiling")
        what = f"{tiled['tiles']} tiles of {tiled['scenes']} scenes" if tiled else f"{entry['num_samples']} samples"
        dropped = f"; {tiled['dropped_empty']} all-ignore tiles dropped" if tiled and tiling["drop_empty"] else ""
        print(f"{split}: {what} in {len(entry['shards'])} shard(s), {size:.1f} MB{dropped}")
    print(f"wrote {result.out / shards.MANIFEST}")
    return cli.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Command entry point; returns the exit code (0 packed, 2 bad input or refused)."""
    return cli.run(_pack_command, argv)


if __name__ == "__main__":
    sys.exit(main())
