"""Cell Tracking Challenge (CTC) 2D frames + instance masks -> the folders `seg_dist.pack` takes.

    python -m lab.convert_ctc --images SEQ/01 --seg SEQ/01_GT/SEG --out /work/data/ctc_hela --val 1

A CTC sequence has 16-bit (or 8-bit) frames `tNNN.tif` and, for a few frames, hand-drawn instance masks
`man_segNNN.tif` (uint16, 0 = background, 1..N = one nucleus each). The packer wants class ids, so this
writes one semantic mask per annotated frame, 0 = background and 1 = nucleus (every instance id > 0):

    OUT/images/tNNN.tif        the frame's original bytes (nothing re-encoded: the 16 bits reach the shards)
    OUT/masks/tNNN.png         single-channel PNG, 0 / 1
    OUT/splits/{train,val}.txt the annotated frames by number; the last --val of them go to val

Frames without a mask are left out. The data stays out of the repository.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from seg_dist import cli
from seg_dist.errors import UserError
from seg_dist.shards import decode_image

from .converting import claim_output, summary, write_mask, write_splits

SEG_NAME = re.compile(r"man_seg(\d+)\.tiff?$")


def convert(images: Path, seg: Path, out: Path, val: int = 1, overwrite: bool = False) -> dict[str, int]:
    """Write images, 0/1 masks and split lists; returns the sample count per split."""
    masks = sorted(
        (m for m in seg.glob("man_seg*.tif*") if SEG_NAME.search(m.name)),
        key=lambda m: int(SEG_NAME.search(m.name).group(1)),
    )
    if not masks:
        raise UserError(f"{seg}: no man_segNNN.tif files (is --seg a CTC SEG folder?)")
    if not 0 <= val < len(masks):
        raise UserError(f"--val {val}: needs 0 <= val < {len(masks)} annotated frames, so train keeps one")
    claim_output(out, overwrite)  # after the checks: a refused input leaves no folder behind
    stems = []
    for m in masks:
        digits = SEG_NAME.search(m.name).group(1)
        frame = next((p for p in (images / f"t{digits}.tif", images / f"t{digits}.tiff") if p.is_file()), None)
        if frame is None:
            raise UserError(f"{images / f't{digits}.tif'}: the frame of {m} is missing")
        labels = decode_image(m.read_bytes())  # the packer's own reader (PIL reads CTC's LZW TIFFs)
        if labels.ndim == 3 and labels.shape[2] == 1:
            labels = labels[:, :, 0]
        if labels.ndim != 2:
            raise UserError(f"{m}: a mask of shape {labels.shape}; only single-channel 2D masks are converted")
        shown = decode_image(frame.read_bytes()).shape[:2]  # as the packer will read it
        if shown != labels.shape:
            raise UserError(f"{m}: mask {labels.shape} and frame {shown} (H x W) differ in size")
        shutil.copyfile(frame, out / "images" / frame.name)
        write_mask(out / "masks" / f"{frame.stem}.png", (labels > 0).astype(np.uint8))
        stems.append(frame.stem)
    parts = {"train": stems[: len(stems) - val], "val": stems[len(stems) - val :]}
    return write_splits(out, parts)


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv)  # a UserError: one line, exit 2


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="a CTC sequence folder holding tNNN.tif")
    p.add_argument("--seg", required=True, help="its SEG folder holding man_segNNN.tif")
    p.add_argument("--out", required=True)
    p.add_argument("--val", type=int, default=1, help="annotated frames (the last ones) for the val split")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    counts = convert(Path(args.images), Path(args.seg), Path(args.out), args.val, args.overwrite)
    print(summary(args.out, counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
