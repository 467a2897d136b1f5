"""Dubai aerial imagery (Humans in the Loop / MBRSC) -> the folders `seg_dist.pack` takes, split by tile.

    python -m lab.convert_dubai --src DATA --out /work/data/dubai --scale 0.5

"Semantic segmentation of aerial imagery" (Humans in the Loop with the Mohammed Bin Rashid Space Centre;
Kaggle gives it as CC0 1.0): 72 satellite images of Dubai in 8 tiles, each tile one area cut into 9
parts, `Tile N/images/image_part_NNN.jpg` with RGB colour masks `Tile N/masks/image_part_NNN.png`. The
parts of a tile share borders, so the split is by tile and no test area touches a training one:

    train  tiles 3, 4, 5, 6, 7   (45 images, about 64% of the pixels)
    val    tile 1                (9 images, 5%: small, but it holds all five classes)
    test   tiles 2, 8            (18 images, 31%: every class at 5% or more)

The tiles differ in size (509 x 544 to 2149 x 1479) but not in ground resolution, so `--scale` resizes
every image by the same factor (image bilinear, mask nearest) and keeps objects the same size in every
tile, where the packer's `--max-size` would shrink the large tiles more; pack the result with `--tile`.
Writes

    OUT/images/tileN_NNN.png   scaled, lossless (with --scale 1, the original JPEG bytes)
    OUT/masks/tileN_NNN.png    single-channel PNG of class ids; unlabelled -> 255 (the ignore index)
    OUT/splits/{train,val,test}.txt
    OUT/class_names.txt

The data stays out of the repository.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from seg_dist import cli
from seg_dist.errors import UserError
from seg_dist.shards import decode_image

from .converting import claim_output, summary, write_mask, write_splits

CLASS_NAMES = ("building", "land", "road", "vegetation", "water")
IGNORE = 255
# The dataset's own description of its colours. Its classes.json names other colours than the masks use
# (and copies of it in the wild swap names); these match the photos: #E2A929 covers the darkest pixels
# (sea), #8429F6 the brightest (bare sand).
COLOURS = {
    (0x3C, 0x10, 0x98): 0,  # building
    (0x84, 0x29, 0xF6): 1,  # land (unpaved area)
    (0x6E, 0xC1, 0xE4): 2,  # road
    (0xFE, 0xDD, 0x3A): 3,  # vegetation
    (0xE2, 0xA9, 0x29): 4,  # water
    (0x9B, 0x9B, 0x9B): IGNORE,  # "Unlabeled" in the dataset
    # Not among the dataset's colours: strips along some borders and an unannotated area of
    # Tile 8 part 003 (17% of it), where no class was drawn.
    (0x00, 0x00, 0x00): IGNORE,
}
SPLIT = {"train": (3, 4, 5, 6, 7), "val": (1,), "test": (2, 8)}
TILE = re.compile(r"Tile (\d+)$")


def class_ids(mask: Path) -> np.ndarray:
    """A colour mask as class ids; a colour outside COLOURS is an error naming the file and the colour."""
    rgb = np.asarray(Image.open(mask).convert("RGB"), dtype=np.uint32)
    key = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    lut = {(r << 16) | (g << 8) | b: c for (r, g, b), c in COLOURS.items()}
    found = np.unique(key)
    unknown = [int(k) for k in found if int(k) not in lut]
    if unknown:
        k = unknown[0]
        raise UserError(f"{mask}: colour #{k:06X} ({k >> 16},{(k >> 8) & 255},{k & 255}) is not a Dubai class colour")
    ids = np.empty(key.shape, dtype=np.uint8)
    for k in found:
        ids[key == k] = lut[int(k)]
    return ids


def convert(src: Path, out: Path, scale: float = 0.5, overwrite: bool = False) -> dict[str, int]:
    """Write images, masks, split lists and class names; returns the sample count per split."""
    if not 0 < scale <= 1:
        raise UserError(f"--scale {scale}: must be in (0, 1]")
    tiles = {int(TILE.search(d.name).group(1)): d for d in src.iterdir() if d.is_dir() and TILE.search(d.name)}
    if not tiles:
        raise UserError(f"{src}: no 'Tile N' folders (is --src the dataset's folder?)")
    split_of = {t: s for s, ts in SPLIT.items() for t in ts}
    stray = sorted(set(tiles) - set(split_of))
    if stray:
        raise UserError(f"{tiles[stray[0]]}: tile {stray[0]} is not one of the dataset's tiles 1-8")
    claim_output(out, overwrite)
    parts: dict[str, list[str]] = {s: [] for s in SPLIT}
    for t, folder in sorted(tiles.items()):
        for photo in sorted((folder / "images").glob("*.jpg")):
            mask = folder / "masks" / f"{photo.stem}.png"
            if not mask.is_file():
                raise UserError(f"{mask}: the mask of {photo} is missing")
            ids = class_ids(mask)
            pixels = decode_image(photo.read_bytes())  # as the packer will read it
            shown = pixels.shape[:2]
            if shown != ids.shape:
                raise UserError(f"{mask}: mask {ids.shape} and image {shown} (H x W) differ in size")
            stem = f"tile{t}_{photo.stem.rsplit('_', 1)[-1]}"
            if scale == 1:
                shutil.copyfile(photo, out / "images" / f"{stem}.jpg")
            else:
                h, w = (max(1, round(n * scale)) for n in shown)
                Image.fromarray(pixels).resize((w, h), Image.Resampling.BILINEAR).save(out / "images" / f"{stem}.png")
                ids = np.asarray(Image.fromarray(ids, mode="L").resize((w, h), Image.Resampling.NEAREST))
            write_mask(out / "masks" / f"{stem}.png", ids)
            parts[split_of[t]].append(stem)
    return write_splits(out, parts, CLASS_NAMES)


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)  # a UserError: one line, exit 2


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="the folder holding 'Tile 1' ... 'Tile 8'")
    p.add_argument("--out", required=True)
    p.add_argument("--scale", type=float, default=0.5, help="resize factor for every image (default 0.5)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    counts = convert(Path(args.src), Path(args.out), args.scale, args.overwrite)
    print(summary(args.out, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
