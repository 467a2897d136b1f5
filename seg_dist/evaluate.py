"""Exact metrics of a checkpoint on a split, at any number of ranks.

    python -m seg_dist.evaluate --checkpoint runs/X/checkpoints/best.pt [--split val] [--out metrics.json]
    torchrun --nproc_per_node=2 -m seg_dist.evaluate --checkpoint ... [key=value ...]

The checkpoint carries its config; overrides change it (e.g. data.root=shards/other). The
validation is the trainer's own (`seg_dist.validation.validate`), so the figures agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from tqdm import tqdm

from . import atomic, checkpoint, cli, data, distributed, precision, shards
from .errors import RunFailed
from .runlog import setup_logging
from .validation import validate


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg_dist.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--split", default=None, help="default: the run's data.val_split")
    p.add_argument("--out", default=None, help="also write the metrics as JSON here")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. data.root=shards/other")
    return p.parse_args(argv)


def _evaluate(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    with distributed.setup() as (denv, device):
        setup_logging(denv.rank)
        trained = checkpoint.load_model(args.checkpoint, device, args.overrides)
        cfg = trained.cfg
        manifest = shards.load_manifest(cfg.data.root)
        split = args.split or cfg.data.val_split
        loader = data.val_loader(cfg, manifest, cfg.data.root, denv.rank, denv.world_size, split=split)
        expected = shards.split_count(manifest, split)
        amp_dtype = precision.resolve_amp(cfg.train.amp, device)
        with tqdm(total=data.val_share(manifest, split, denv.rank, denv.world_size), desc=f"evaluate {split}",
                  disable=not denv.is_main) as bar:
            result = validate(trained.model, loader, trained.num_classes, trained.ignore_index, device, amp_dtype,
                              cfg.train.channels_last, progress=bar)
        if result.samples_seen != expected:
            raise RunFailed(f"saw {result.samples_seen} samples of split {split!r}, the manifest lists {expected}")
        if denv.is_main:
            report = {"checkpoint": str(args.checkpoint), "split": split, "samples": result.samples_seen,
                      "global_step": trained.global_step, **result.metrics,
                      "class_names": trained.class_names, "confusion_matrix": result.matrix.tolist()}
            if args.out:
                atomic.write_text(args.out, json.dumps(report, indent=2) + "\n")
            print(json.dumps({k: report[k] for k in ("split", "samples", "miou", "pixel_accuracy", "loss")}))
    return cli.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
