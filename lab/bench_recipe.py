"""Recipe comparison: the seed tutorial's recipe against seg_dist's at the same wall-clock budget.

`python -m lab.bench recipe --data SHARDS --minutes 12` trains, on this machine and one after the
other, (a) the tutorial's recipe (`lab.seed_recipe.train_seed`: one process, full frames resized to the
split's mean size, Affine, AdamW at its learning rate, plateau schedule, batch 8) and (b) seg_dist's
default recipe (`seg_dist.train` under torchrun on `--ranks` processes, the same global batch, with
`train.budget_minutes`), then scores both on the test split with the same exact confusion matrix
(`validation.evaluate_predictor`, every image at its own size) and prints one table. Both budgets
include the recipe's own validation; neither includes process start-up or the final test scoring. The
tutorial's U-Net at its initial weights is scored alike, as the floor any training must clear.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seg_dist import checkpoint, data, shards
from seg_dist.config import DataConfig, load_config_dict
from seg_dist.errors import RunFailed, UserError
from seg_dist.predict import Predictor
from seg_dist.validation import evaluate_predictor

from .seed_recipe import IMAGENET_MEAN, IMAGENET_STD, train_seed

Progress = Callable[[str], None]
RECIPES = ("seed", "seg_dist")


@dataclass
class RecipeSettings:
    data: str  # shard folder with train, val and test splits
    minutes: float = 12.0  # training budget per run
    width: int = 16  # U-Net base channels, the same for both recipes
    global_batch: int = 8  # the tutorial's batch; seg_dist splits it over its ranks
    ranks: int = 2  # seg_dist's processes
    seeds: tuple[int, ...] = (0,)
    recipes: tuple[str, ...] = RECIPES
    seed_lr: float = 1e-4  # the tutorial's AdamW learning rate
    seed_size: tuple[int, int] | None = None  # the tutorial's Resize; default: the train split's mean size
    seed_max_epochs: int = 10_000  # the tutorial's cap (seg_dist's: train.epochs=N among the overrides)
    config: str | None = None  # seg_dist's recipe; default: the built-in defaults
    overrides: tuple[str, ...] = ()  # key=value for seg_dist's recipe
    out: str = "runs/recipe"  # one run folder per recipe and seed
    test_split: str = "test"
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))


def split_pairs(root: str, manifest: dict[str, Any], split: str) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Every (uint8 image, int64 mask, key) of `split` as stored, in shard order."""
    urls = shards.shard_urls(root, manifest, split)
    return [(s["image"], s["mask"].astype(np.int64, copy=False), s["key"]) for s in data.iter_samples(urls)]


def mean_size(manifest: dict[str, Any], split: str = "train") -> tuple[int, int]:
    h, w = shards.mean_image_size(manifest, split)
    return round(h), round(w)


def score(predictor: Predictor, samples: Sequence[tuple[np.ndarray, np.ndarray, str]], ignore_index: int
          ) -> dict[str, Any]:
    return evaluate_predictor(predictor, samples, ignore_index).metrics


def run_seed(s: RecipeSettings, seed: int, manifest: dict[str, Any], splits: dict[str, list[Any]],
             progress: Progress, minutes: float | None = None) -> dict[str, Any]:
    """The tutorial's recipe for `minutes` (default: the settings'; 0: its model at the initial weights)."""
    minutes = s.minutes if minutes is None else minutes
    classes = data.resolve_classes(DataConfig(root=s.data), manifest)
    size = s.seed_size or mean_size(manifest)
    torch.set_num_threads(s.threads)
    t0 = time.perf_counter()
    result = train_seed([(i, m) for i, m, _ in splits["train"]], [(i, m) for i, m, _ in splits["val"]],
                        classes.num_classes, minutes=minutes, size_hw=size, width=s.width, lr=s.seed_lr,
                        batch_size=s.global_batch, seed=seed, ignore_index=classes.ignore_index,
                        max_epochs=s.seed_max_epochs,
                        progress=lambda line: progress(f"seed recipe, seed {seed}: {line}"))
    wall = time.perf_counter() - t0
    predictor = Predictor(result.model, DataConfig(mean=IMAGENET_MEAN, std=IMAGENET_STD), classes.num_classes,
                          classes.names, torch.device("cpu"))
    metrics = score(predictor, splits[s.test_split], classes.ignore_index)
    return {"recipe": "seed", "seed": seed, "epochs": result.epochs, "steps": result.steps,
            "train_minutes": result.train_seconds / 60, "wall_minutes": wall / 60,
            "setup": f"1 process x batch {s.global_batch}, {size[0]}x{size[1]} frames, lr {s.seed_lr:g}",
            **_figures(metrics)}


def seg_dist_command(s: RecipeSettings, seed: int, run_dir: Path) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={s.ranks}"]
    if s.ranks == 1:
        launcher = [sys.executable]
    return [
        *launcher, "-m", "seg_dist.train", *(["--config", s.config] if s.config else []),
        f"data.root={s.data}", f"model.width={s.width}", f"train.budget_minutes={s.minutes}",
        "train.epochs=100000", f"train.seed={seed}", f"train.global_batch_size={s.global_batch}",
        f"train.batch_size={s.global_batch}", f"run.dir={run_dir}", "train.resume=never", "logging.progress=false",
        *s.overrides,
    ]


def seg_dist_dir(s: RecipeSettings, seed: int) -> Path:
    return Path(s.out) / f"seg_dist-{s.ranks}ranks-seed{seed}"


def run_seg_dist(s: RecipeSettings, seed: int, manifest: dict[str, Any], splits: dict[str, list[Any]],
                 progress: Progress) -> dict[str, Any]:
    run_dir = seg_dist_dir(s, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, s.threads // s.ranks))}
    command = seg_dist_command(s, seed, run_dir)
    progress(f"seg_dist recipe, seed {seed}: {' '.join(command[1:])} (log: {run_dir / 'train.log'})")
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as logfile:
        code = subprocess.run(command, env=env, stdout=logfile, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if code != 0:
        raise RunFailed(f"{run_dir / 'train.log'}: seg_dist.train exited with {code}")
    last = run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.LAST
    state = checkpoint.load(last)
    torch.set_num_threads(s.threads)
    predictor = Predictor.from_checkpoint(last, device="cpu")
    metrics = score(predictor, splits[s.test_split], state["ignore_index"])
    per_rank = s.global_batch // s.ranks
    as_run = load_config_dict({"data": {"root": s.data}, "train": {"batch_size": per_rank}})
    steps_per_epoch = data.steps_per_epoch(manifest, as_run, s.ranks)
    return {"recipe": "seg_dist", "seed": seed, "epochs": state["global_step"] / steps_per_epoch,
            "steps": state["global_step"], "train_minutes": state.get("train_seconds", math.nan) / 60,
            "wall_minutes": wall / 60, "setup": f"{s.ranks} process(es) x batch {per_rank}", "run_dir": str(run_dir),
            **_figures(metrics)}


def _mean_over_runs(rows: list[list[float]]) -> list[float]:
    """Per-class means over runs, ignoring NaN (a class absent from target and prediction in a run); NaN
    where every run has NaN."""
    values = np.array(rows, dtype=float)
    seen = ~np.isnan(values)
    sums = np.where(seen, values, 0.0).sum(axis=0)
    counts = seen.sum(axis=0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).tolist()


def _figures(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"miou": metrics["miou"], "pixel_accuracy": metrics["pixel_accuracy"],
            "per_class_iou": metrics["per_class_iou"]}


def compare(s: RecipeSettings, progress: Progress) -> dict[str, Any]:
    """Every recipe x seed, then the means per recipe; the report `render` prints."""
    unknown = [r for r in s.recipes if r not in RECIPES]
    if unknown:
        raise UserError(f"unknown recipe(s) {', '.join(unknown)}: expected {', '.join(RECIPES)}")
    if s.global_batch % s.ranks:
        raise UserError(f"--batch {s.global_batch} cannot be split over --ranks {s.ranks}")
    if "seg_dist" in s.recipes:
        for seed in s.seeds:
            if (seg_dist_dir(s, seed) / checkpoint.CHECKPOINT_DIR).exists():
                raise UserError(f"{seg_dist_dir(s, seed)}: a run is already there; choose another --out or remove it")
    manifest = shards.load_manifest(s.data)
    for split in ("train", "val", s.test_split):
        shards.split_count(manifest, split)  # a one-line error when the folder lacks a split
    classes = data.resolve_classes(DataConfig(root=s.data), manifest)
    progress(f"reading {s.data} (train, val, {s.test_split})")
    splits = {name: split_pairs(s.data, manifest, name) for name in ("train", "val", s.test_split)}
    progress(f"the tutorial's U-Net at its initial weights (seed {s.seeds[0]}), the floor")
    untrained = run_seed(s, s.seeds[0], manifest, splits, progress, minutes=0.0)
    runs = []
    for seed in s.seeds:
        for recipe in s.recipes:
            run = run_seed if recipe == "seed" else run_seg_dist
            runs.append(run(s, seed, manifest, splits, progress))
            progress(f"{recipe}, seed {seed}: test mIoU {runs[-1]['miou']:.4f}, pixel accuracy "
                     f"{runs[-1]['pixel_accuracy']:.4f}, {runs[-1]['epochs']:.1f} epochs")
    means = {}
    for recipe in s.recipes:
        mine = [r for r in runs if r["recipe"] == recipe]
        means[recipe] = {
            "miou": statistics.fmean(r["miou"] for r in mine),
            "miou_spread": (min(r["miou"] for r in mine), max(r["miou"] for r in mine)),
            "pixel_accuracy": statistics.fmean(r["pixel_accuracy"] for r in mine),
            "epochs": statistics.fmean(r["epochs"] for r in mine),
            "per_class_iou": _mean_over_runs([r["per_class_iou"] for r in mine]),
            "setup": mine[0]["setup"],
        }
    floor = {"miou": untrained["miou"], "pixel_accuracy": untrained["pixel_accuracy"],
             "setup": f"the tutorial's U-Net at its initial weights, seed {s.seeds[0]}"}
    return {"settings": dataclasses.asdict(s), "class_names": classes.names, "runs": runs, "means": means,
            "untrained": floor, "torch": torch.__version__, "machine": f"{s.threads} CPU threads"}


def render(report: dict[str, Any]) -> str:
    """The comparison: one line per recipe (means over seeds), then the per-class IoU side by side."""
    means, names = report["means"], report["class_names"]
    recipes = list(means)
    s = report["settings"]
    seeds = len(s["seeds"])
    lines = [f"recipes at {s['minutes']:g} min of training each on {report['machine']}, U-Net width {s['width']}, "
             f"global batch {s['global_batch']}, scored on {s['test_split']!r} ({seeds} seed(s), means)",
             f"{'recipe':<10} {'setup':<48} {'test mIoU':>9} {'(min-max)':>13} {'pixel acc':>9} {'epochs':>7}"]
    for r in recipes:
        m = means[r]
        lo, hi = m["miou_spread"]
        lines.append(f"{r:<10} {m['setup']:<48} {100 * m['miou']:>9.1f} {f'{100 * lo:.1f}-{100 * hi:.1f}':>13} "
                     f"{100 * m['pixel_accuracy']:>9.1f} {m['epochs']:>7.1f}")
    floor = report["untrained"]
    lines.append(f"{'untrained':<10} {floor['setup']:<48} {100 * floor['miou']:>9.1f} {'':>13} "
                 f"{100 * floor['pixel_accuracy']:>9.1f} {0:>7.1f}")
    width = max(len(n) for n in names)
    lines.append("")
    lines.append(f"{'class':<{width}} " + " ".join(f"{r:>9}" for r in recipes) + "   (test IoU, %)")
    for i, name in enumerate(names):
        cells = []
        for r in recipes:
            v = means[r]["per_class_iou"][i]
            cells.append(f"{'-':>9}" if v is None or math.isnan(v) else f"{100 * v:>9.1f}")
        lines.append(f"{name:<{width}} " + " ".join(cells))
    return "\n".join(lines)
