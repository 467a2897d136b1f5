"""Clothing Co-Parsing (CCP) -> the image/mask folders `seg_dist.pack` takes, with a fixed split.

    python -m lab.convert_ccp --src clothing-co-parsing --out data/ccp      # from the repository root

CCP (Yang et al., CVPR 2014; github.com/bearpaw/clothing-co-parsing, Apache-2.0): 1,004 street-fashion
photos have pixel labels (`annotations/pixel-level/NNNN.mat`, variable `groundtruth`, uint8 class ids) and
59 classes named in `label_list.mat` (0 = background, long-tailed). Writes

    OUT/images/NNNN.jpg        the original photo bytes (nothing re-encoded)
    OUT/masks/NNNN.png         single-channel PNG of class ids
    OUT/splits/{train,val,test}.txt   a fixed split by stem order: first 804 / next 100 / last 100
    OUT/class_names.txt        the 59 names, comma-separated (for --class-names)

then pack it as shards/README.md ("Clothing Co-Parsing") shows. Needs scipy (`loadmat`), which
albumentations already brings. The data stays out of the repository.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from seg_dist import cli
from seg_dist.errors import UserError
from seg_dist.shards import decode_image

from .converting import claim_output, summary, write_mask, write_splits

SPLIT = (("train", 804), ("val", 100), ("test", 100))


def class_names(src: Path) -> list[str]:
    from scipy.io import loadmat

    raw = loadmat(src / "label_list.mat")["label_list"][0]
    names = [str(x[0]) if len(x) else "" for x in raw]
    names[0] = "background"  # CCP calls it "null"
    return [n.replace(",", " ") for n in names]


def convert(src: Path, out: Path, overwrite: bool = False) -> dict[str, int]:
    """Write images, masks, split lists and class names; returns the sample count per split."""
    from scipy.io import loadmat

    annotations = sorted((src / "annotations" / "pixel-level").glob("*.mat"))
    if not annotations:
        raise UserError(f"{src / 'annotations' / 'pixel-level'}: no .mat files (is --src a CCP checkout?)")
    claim_output(out, overwrite)
    names = class_names(src)
    stems = []
    for mat in annotations:
        photo = src / "photos" / f"{mat.stem}.jpg"
        if not photo.is_file():
            raise UserError(f"{photo}: the photo of {mat} is missing")
        labels = np.asarray(loadmat(mat)["groundtruth"], dtype=np.uint8)
        if labels.max() >= len(names):
            raise UserError(f"{mat}: class id {labels.max()} but only {len(names)} classes")
        # As the packer will read it: EXIF orientation applied.
        shown = decode_image(photo.read_bytes()).shape[:2]
        if shown != labels.shape:
            raise UserError(f"{mat}: mask {labels.shape} and photo {shown} (H x W) differ in size")
        shutil.copyfile(photo, out / "images" / photo.name)
        write_mask(out / "masks" / f"{mat.stem}.png", labels)
        stems.append(mat.stem)
    parts, start = {}, 0
    for split, n in SPLIT:
        parts[split] = stems[start : start + n] if split != "test" else stems[start:]
        start += n
    return write_splits(out, parts, names)


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)  # a UserError: one line, exit 2


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="a checkout of github.com/bearpaw/clothing-co-parsing")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    counts = convert(Path(args.src), Path(args.out), args.overwrite)
    print(summary(args.out, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
