"""Exact metrics of a checkpoint on a split, at any number of ranks, as predict would score.

    python -m seg_dist.evaluate --checkpoint runs/X/checkpoints/best.pt [--split val] [--json m.json] [--out DIR]
    torchrun --nproc_per_node=2 -m seg_dist.evaluate --checkpoint ... [--data shards/other] [key=value ...]

Every image of the split runs through the predict path (seg_dist.inference: the same normalisation,
resizing, tiling and TTA) and is scored at its mask's stored resolution; one int64 confusion matrix is
summed over ranks, so 1 or N ranks give identical figures. Prints a per-class table; --json writes the
figures and the confusion matrix (rows = ground truth); --out DIR saves the confusion-matrix picture and a
per-class IoU bar chart. The checkpoint carries its config; overrides change it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from . import atomic, checkpoint, cli, data, distributed, shards
from .errors import RunFailed, UserError
from .inference import Predictor
from .runlog import progress, setup_logging
from .validation import evaluate_predictor, metrics_table
from .visualize import bar_chart, confusion_matrix_figure, save_png

log = logging.getLogger("seg_dist.evaluate")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg_dist.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default=None, help="shard folder (default: the run's data.root)")
    p.add_argument("--split", default=None, help="default: the run's data.val_split")
    p.add_argument("--json", default=None, help="write the figures and the confusion matrix here")
    p.add_argument("--out", default=None, help="folder for the confusion-matrix picture and the IoU bar chart")
    p.add_argument("--batch-size", type=int, default=1, help="images of one size run together (default 1)")
    p.add_argument("--tile", type=int, default=0, help="as predict's --tile")
    p.add_argument("--tta", choices=["none", "flip"], default="none", help="as predict's --tta")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.amp=off")
    args = p.parse_args(argv)
    if args.out and args.out.endswith(".json"):
        # --out used to name the JSON report; keep that working, and say what it is now.
        log.warning("--out %s: --out now takes a folder for pictures; writing the JSON as with --json", args.out)
        args.json, args.out = args.json or args.out, None
    return args


def _evaluate(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    with distributed.setup() as (denv, device):
        setup_logging(denv.rank)
        overrides = [*args.overrides, *([f"data.root={args.data}"] if args.data else [])]
        trained = checkpoint.load_model(args.checkpoint, device, overrides)
        cfg = trained.cfg
        predictor = Predictor.from_trained(trained, tile=args.tile, tta_flip=args.tta == "flip")
        manifest = shards.load_manifest(cfg.data.root)
        if cfg.data.num_classes is None and manifest["num_classes"] != trained.num_classes:
            raise UserError(f"{Path(cfg.data.root) / shards.MANIFEST}: num_classes={manifest['num_classes']}, but "
                            f"{args.checkpoint} was trained for {trained.num_classes}: evaluate on its own dataset")
        split = args.split or cfg.data.val_split
        expected = shards.split_count(manifest, split)
        share = data.val_share(manifest, split, denv.rank, denv.world_size)
        with progress(share, f"evaluate {split}", enabled=denv.is_main) as bar:
            samples = data.split_samples(cfg, manifest, cfg.data.root, denv.rank, denv.world_size, split)
            result = evaluate_predictor(predictor, samples, trained.ignore_index, args.batch_size, progress=bar)
        if result.samples_seen != expected:
            raise RunFailed(f"saw {result.samples_seen} samples of split {split!r}, the manifest lists {expected}")
        if denv.is_main:
            m = result.metrics
            print(metrics_table(m, trained.class_names, result.samples_seen))
            report = {"checkpoint": str(args.checkpoint), "data": cfg.data.root, "split": split,
                      "samples": result.samples_seen, "global_step": trained.global_step, **m,
                      "class_names": trained.class_names, "confusion_matrix": result.matrix.tolist()}
            if args.json:
                atomic.write_text(args.json, json.dumps(report, indent=2) + "\n")
            if args.out:
                out = Path(args.out)
                save_png(out / "confusion_matrix.png", confusion_matrix_figure(result.matrix, trained.class_names))
                save_png(out / "iou_per_class.png", bar_chart(m["per_class_iou"], trained.class_names,
                                                              f"IoU per class, {split} (mIoU {m['miou']:.4f})"))
            print(json.dumps({k: report[k] for k in ("split", "samples", "miou", "pixel_accuracy", "loss")}))
    return cli.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
