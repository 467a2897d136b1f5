"""Check the training augmentation by eye: a PNG grid of samples from the real train pipeline.

Each sample is shown as image | mask overlay (ignored pixels white), e.g.

    python -m seg_dist.preview --config configs/synthetic.yaml --out preview.png --n 16 data.augment.rotate=30
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

from . import data, shards
from .config import ConfigError, load_config
from .visualize import denormalize, grid, overlay, save_png


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg_dist.preview", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("--out", default="preview.png", help="PNG to write (default: preview.png)")
    p.add_argument("--n", type=int, default=16, help="number of samples (default: 16)")
    p.add_argument("--split", help="split to draw from (default: data.train_split)")
    p.add_argument("--epoch", type=int, default=0, help="epoch whose augmentation seed to use (default: 0)")
    p.add_argument("--cols", type=int, default=0, help="samples per row (default: about sqrt(n))")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. data.augment.rotate=30")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.n < 1:
        print("error: --n must be at least 1", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        manifest = shards.load_manifest(cfg.data.root)
        num_classes = cfg.data.num_classes or int(manifest["num_classes"])
        ignore = cfg.data.ignore_index if cfg.data.ignore_index is not None else int(manifest["ignore_index"])
        # The trainer's own loader, one sample per batch and in-process, so what is shown is what trains.
        cfg = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, train_split=args.split or cfg.data.train_split, workers=0),
            train=dataclasses.replace(cfg.train, batch_size=1, steps_per_epoch=args.n),
        )
        shards.split_count(manifest, cfg.data.train_split)  # a one-line error for an unknown split
        tiles = []
        for images, masks in data.train_loader(cfg, manifest, cfg.data.root, 0, 1, args.epoch):
            rgb = denormalize(images[0], cfg.data.mean, cfg.data.std)
            tiles += [rgb, overlay(rgb, masks[0].numpy(), num_classes, ignore)]
        cols = args.cols or math.ceil(math.sqrt(args.n))
        save_png(args.out, grid(tiles, cols=2 * cols))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.n} samples of split {cfg.data.train_split!r})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
