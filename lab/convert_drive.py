"""DRIVE retinal fundus photographs + vessel labels -> the folders `seg_dist.pack` takes, its own split kept.

    python -m lab.convert_drive --src DRIVE --out /work/data/drive --val 4

DRIVE (Staal et al., IEEE TMI 2004): 40 colour fundus photographs, 565 x 584, from a diabetic-retinopathy
screening in the Netherlands, each with a hand-drawn vessel map (`1st_manual/NN_manual1.gif`, 0 / 255) and a
field-of-view mask (`mask/NN_{training,test}_mask.gif`): `training/` holds photos 21-40, `test/` 01-20. Writes

    OUT/images/NN.tif          the original photo bytes (nothing re-encoded)
    OUT/masks/NN.png           single-channel PNG: 0 background, 1 vessel, 255 (ignore) outside the field of view
    OUT/splits/{train,val,test}.txt
    OUT/class_names.txt

test is DRIVE's own test set (01-20); val is the last --val training photos (by number), train the rest.
Each photo is a separate screening photograph; DRIVE gives no subject ids, so that no subject appears on
both sides rests on the authors' random draw of 40 photographs, not on a recorded id. Vessels are one to a
few pixels wide: pack at full size (tile, do not downscale). The data stays out of the repository.
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

CLASS_NAMES = ("background", "vessel")
IGNORE = 255
PHOTO = re.compile(r"^(\d+)_(training|test)\.tif$")


def _binary(path: Path) -> np.ndarray:
    """A 0/255 GIF as a boolean array; any other value is an error naming the file."""
    a = np.asarray(Image.open(path).convert("L"))
    values = np.unique(a)
    if not set(values.tolist()) <= {0, 255}:
        raise UserError(f"{path}: values {values.tolist()[:6]}; DRIVE's label and FOV masks hold 0 and 255 only")
    return a == 255


def convert(src: Path, out: Path, val: int = 4, overwrite: bool = False) -> dict[str, int]:
    """Write images, masks, split lists and class names; returns the sample count per split."""
    photos = {
        folder: sorted(p for p in (src / folder / "images").glob("*.tif") if PHOTO.match(p.name))
        for folder in ("training", "test")
    }
    if not photos["training"] or not photos["test"]:
        raise UserError(f"{src}: no training/images/NN_training.tif and test/images/NN_test.tif (is --src DRIVE?)")
    if not 0 <= val < len(photos["training"]):
        raise UserError(f"--val {val}: needs 0 <= val < {len(photos['training'])} training photos, so train keeps one")
    claim_output(out, overwrite)
    stems: dict[str, list[str]] = {"training": [], "test": []}
    for folder, paths in photos.items():
        for photo in paths:
            number, kind = PHOTO.match(photo.name).groups()
            manual = src / folder / "1st_manual" / f"{number}_manual1.gif"
            fov = src / folder / "mask" / f"{number}_{kind}_mask.gif"
            for needed in (manual, fov):
                if not needed.is_file():
                    raise UserError(f"{needed}: missing for {photo}")
            vessel, inside = _binary(manual), _binary(fov)
            shown = decode_image(photo.read_bytes()).shape[:2]  # as the packer will read it
            for name, a in ((manual, vessel), (fov, inside)):
                if a.shape != shown:
                    raise UserError(f"{name}: mask {a.shape} and photo {shown} (H x W) differ in size")
            labels = np.where(inside, vessel.astype(np.uint8), IGNORE).astype(np.uint8)
            shutil.copyfile(photo, out / "images" / f"{number}.tif")
            write_mask(out / "masks" / f"{number}.png", labels)
            stems[folder].append(number)
    cut = len(stems["training"]) - val
    parts = {"train": stems["training"][:cut], "val": stems["training"][cut:], "test": stems["test"]}
    return write_splits(out, parts, CLASS_NAMES)


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)  # a UserError: one line, exit 2


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="the DRIVE folder holding training/ and test/")
    p.add_argument("--out", required=True)
    p.add_argument("--val", type=int, default=4, help="training photos (the highest numbers) for the val split")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    counts = convert(Path(args.src), Path(args.out), args.val, args.overwrite)
    print(summary(args.out, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
