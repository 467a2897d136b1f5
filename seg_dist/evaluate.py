"""Exact metrics of a checkpoint on a split, at any number of ranks, as predict would score.

    python -m seg_dist.evaluate --checkpoint runs/X/checkpoints/best.pt [--split val] [--json m.json] [--out DIR]
    torchrun --nproc_per_node=2 -m seg_dist.evaluate --checkpoint ... [--data shards/other] [key=value ...]

Every image of the split runs through the predict path (seg_dist.inference: the same normalisation, resizing,
tiling and TTA; images of any channel count and pixel type, as the checkpoint's model takes them: data of
another kind is refused before the first batch) and is scored at its mask's stored resolution; one int64
confusion matrix is summed over ranks, so 1 or N ranks give identical figures. Prints a per-class table;
--json writes the figures and the confusion matrix (rows = ground truth) as strict JSON (null where a figure
is undefined, e.g. the IoU of a class in neither prediction nor ground truth); --out DIR saves the confusion-
matrix picture and a per-class IoU bar chart. The checkpoint carries its config; overrides change it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import atomic, checkpoint, cli, data, distributed, outputs, shards
from .errors import RunFailed, UserError
from .inference import Predictor
from .runlog import progress, setup_logging
from .validation import evaluate_predictor, metrics_table
from .visualize import bar_chart, confusion_matrix_figure, save_png


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
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json and pictures")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.amp=off")
    args = p.parse_args(argv)
    if args.out and args.out.lower().endswith(".json"):  # a folder named *.json is surely a mix-up
        raise UserError(f"--out {args.out}: --out is the folder for the pictures; write the JSON report with --json")
    return args


PICTURES = {"confusion_matrix.png": "the confusion-matrix picture", "iou_per_class.png": "the IoU bar chart"}


def _check_paths(args: argparse.Namespace, root: str) -> None:
    """Nothing this command writes may be its checkpoint or data; existing outputs need --overwrite."""
    ins = [outputs.Input(Path(args.checkpoint), "the checkpoint being evaluated", f"--checkpoint {args.checkpoint}"),
           *outputs.shard_inputs(root, f"--data {root}" if args.data else f"data.root {root}",
                                 "the data being evaluated")]
    outs: list[outputs.Output | outputs.OutputFolder] = []
    if args.json:
        outs.append(outputs.Output(Path(args.json), "the JSON report", f"--json {args.json}"))
    if args.out:
        outs.append(outputs.OutputFolder(Path(args.out), "the pictures' folder", f"--out {args.out}"))
        outs += [outputs.Output(Path(args.out) / name, what, f"--out {args.out}") for name, what in PICTURES.items()]
    outputs.check(ins, outs, overwrite=args.overwrite)


def check_classes(trained: checkpoint.TrainedModel, checkpoint_path: str, manifest: dict[str, Any],
                  root: str) -> None:
    """The data's classes (its manifest, with any data.* override) must be the checkpoint's: a mask label
    beyond the model's classes, or an ignore label it counts as a class, would score wrongly or fail mid-run."""
    classes = data.resolve_classes(trained.cfg.data, manifest)
    packed_ignore = int(manifest["ignore_index"])
    if classes.num_classes == trained.num_classes and classes.ignore_index == packed_ignore == trained.ignore_index:
        return
    given = [f"data.{key}={value}" for key, value in (("num_classes", trained.cfg.data.num_classes),
                                                        ("ignore_index", trained.cfg.data.ignore_index))
             if value is not None]
    ignore = f"{packed_ignore}" if classes.ignore_index == packed_ignore else \
        f"{packed_ignore} in its masks ({classes.ignore_index} by override)"
    raise UserError(f"{Path(root) / shards.MANIFEST}: {classes.num_classes} classes with ignore index {ignore}"
                    f"{' (' + ', '.join(given) + ')' if given else ''}, but {checkpoint_path} was trained for "
                    f"{trained.num_classes} classes with ignore index {trained.ignore_index}: evaluate on data "
                    "of the checkpoint's classes")


def check_images(trained: checkpoint.TrainedModel, checkpoint_path: str, manifest: dict[str, Any],
                 root: str) -> None:
    """The data's images (the manifest's `image` entry) must be of the kind the checkpoint's model takes, or
    become it as `shards.conform_image` allows (8-bit grey into RGB): said before the first batch, not as
    a failure mid-split."""
    found = shards.image_spec(manifest)
    if not shards.promotable(found._replace(alpha=trained.image.alpha), trained.image):
        raise UserError(f"{Path(root) / shards.MANIFEST}: {found.text()} images, but {checkpoint_path} was trained "
                        f"on {trained.image.text()} images: evaluate on data of the checkpoint's kind")


def _evaluate(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    with distributed.setup() as (denv, device):
        setup_logging(denv.rank)
        overrides = [*args.overrides, *([f"data.root={args.data}"] if args.data else [])]
        trained = checkpoint.load_model(args.checkpoint, device, overrides)
        cfg = trained.cfg
        _check_paths(args, cfg.data.root)
        manifest = shards.load_manifest(cfg.data.root)
        check_classes(trained, args.checkpoint, manifest, cfg.data.root)
        check_images(trained, args.checkpoint, manifest, cfg.data.root)
        predictor = Predictor.from_trained(trained, tile=args.tile, tta_flip=args.tta == "flip")
        split = args.split or cfg.data.val_split
        expected = shards.split_count(manifest, split)
        share = data.val_share(manifest, split, denv.rank, denv.world_size)
        # The bar counts the whole split while rank 0 works through its share.
        with progress(expected, f"evaluate {split}", enabled=denv.is_main, share=share) as bar:
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
                atomic.write_text(args.json, outputs.json_text(report, indent=2) + "\n")
            if args.out:
                out = Path(args.out)
                save_png(out / "confusion_matrix.png", confusion_matrix_figure(result.matrix, trained.class_names))
                save_png(out / "iou_per_class.png", bar_chart(m["per_class_iou"], trained.class_names,
                                                              f"IoU per class, {split} (mIoU {m['miou']:.4f})"))
            print(outputs.json_text({k: report[k] for k in ("split", "samples", "miou", "pixel_accuracy", "loss")}))
    return cli.EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
