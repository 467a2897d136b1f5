"""Check the training augmentation by eye: a PNG grid of samples from the real train pipeline.

Each sample is shown as "i image | i labels" (the mask over the image in the dataset's class colours,
ignored pixels in the ignore colour; the image's `data.display_bands`, 16-bit and float bands stretched
from their 2nd to 98th percentile), titled, with one legend of the classes shown below the grid, e.g.

    python -m seg_dist.preview --config configs/default.yaml --out preview.png --n 16 data.augment.rotate=30

An existing --out is replaced only with --overwrite, and never when it is the config or a data file.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from . import cli, data, outputs, shards
from .config import load_config
from .visualize import display_bands, palette_for, preview_grid, save_png


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg_dist.preview", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--out", default="preview.png", help="PNG to write (default: preview.png)")
    p.add_argument("--n", type=int, default=16, help="number of samples (default: 16)")
    p.add_argument("--split", help="split to draw from (default: data.train_split)")
    p.add_argument("--epoch", type=int, default=0, help="epoch whose augmentation seed to use (default: 0)")
    p.add_argument("--cols", type=int, default=0, help="samples per row (default: about sqrt(n))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. data.augment.rotate=30")
    return p.parse_args(argv)


def _preview(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    if args.n < 1:
        raise cli.UserError("--n must be at least 1")
    cfg = load_config(args.config, args.overrides)
    ins = outputs.shard_inputs(cfg.data.root, f"data.root {cfg.data.root}", "the data previewed")
    if args.config:
        ins.append(outputs.Input(Path(args.config), "the config", f"--config {args.config}"))
    outputs.check(ins, [outputs.Output(Path(args.out), "the preview picture", f"--out {args.out}")],
                  overwrite=args.overwrite)
    manifest = shards.load_manifest(cfg.data.root)
    display_bands(shards.image_spec(manifest).channels, cfg.data.display_bands)  # a bad index: before any work
    classes = data.resolve_classes(cfg.data, manifest)
    split = args.split or cfg.data.train_split
    samples = list(data.augmented_samples(cfg, manifest, args.n, split, args.epoch))
    cols = args.cols or math.ceil(math.sqrt(args.n))
    save_png(args.out, preview_grid(samples, classes.names, cols, classes.ignore_index,
                                    colours=palette_for(manifest, classes.num_classes),
                                    display_bands=cfg.data.display_bands))
    print(f"wrote {args.out} ({args.n} samples of split {split!r})")
    return cli.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_preview, argv)


if __name__ == "__main__":
    sys.exit(main())
