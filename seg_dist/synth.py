"""Write the procedural example dataset as image and mask files.

    python -m seg_dist.synth --out DIR [--n N] [--size PX] [--seed S] [--overwrite]

DIR/images/synth_NNNNN.jpg are the images, DIR/masks/synth_NNNNN.png the masks (palette PNGs whose index
is the class id). The dataset itself lives in `seg_dist.synthetic`; to train on it, pack it with
`python -m seg_dist.pack --synthetic`, which generates and packs in one go.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from seg_dist import cli, outputs, synthetic

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m seg_dist.synth", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder to create images/ and masks/ in")
    ap.add_argument("--n", type=int, default=480, help="number of samples (default 480)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kind", default="rgb", choices=synthetic.KINDS,
                    help="rgb (default, JPEG), grey16 (16-bit grey PNG) or bands4 (4-band 16-bit TIFF)")
    ap.add_argument("--overwrite", action="store_true", help="replace earlier synth_* files in --out")
    return ap


def _synth(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    outputs.check([], [outputs.OutputFolder(Path(args.out), "the dataset folder", f"--out {args.out}")],
                  overwrite=args.overwrite)
    out = synthetic.generate(args.out, args.n, args.size, args.seed, args.overwrite, kind=args.kind)
    print(f"wrote {args.n} samples ({len(synthetic.class_names(args.kind))} classes, {args.size}px) to {out}")
    return cli.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Command entry point; returns the exit code (0 written, 2 bad arguments or files in the way)."""
    return cli.run(_synth, argv)


if __name__ == "__main__":
    sys.exit(main())
