"""`python -m lab.bench recipe` end to end: both recipes train, are scored on one split alike, the report
holds what the runs logged, and each beats the same U-Net at its initial weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lab import bench
from lab.bench_recipe import split_pairs
from seg_dist import cli, shards


def test_bench_recipe_reports_what_the_runs_logged_and_both_beat_the_untrained_floor(tiny_shards, tmp_path, capsys):
    out, runs = tmp_path / "recipe.json", tmp_path / "runs"
    # Epoch caps, not the clock, end both runs (a budget of minutes outlasts seconds of work even on a busy
    # machine, so the schedule's horizon is the cap too): the same 4 epochs of 16 steps each, every time.
    args = ["recipe", "--data", str(tiny_shards), "--minutes", "10", "--width", "4", "--batch", "4",
            "--test-split", "val", "--out", str(runs), "--json", str(out), "--seed-lr", "3e-3",
            "--seed-max-epochs", "4", "model.depth=2", "data.image_size=32", "logging.log_every=2", "train.epochs=4",
            "train.amp=off"]  # fp32 training validation, as the CPU Predictor that scores the run is
    assert bench.main(args) == 0
    report = json.loads(out.read_text())
    table = capsys.readouterr().out
    seed, ours = report["runs"]
    assert (seed["recipe"], ours["recipe"]) == ("seed", "seg_dist")
    assert seed["steps"] == ours["steps"] == 4 * 16 and seed["epochs"] == ours["epochs"] == 4
    # seg_dist's score is its run's own last validation (val is the scored split, all images 32 x 32, so
    # the trainer's padded batches and the predictor see the same pixels) at the checkpoint's step.
    logged = [json.loads(line) for line in (Path(ours["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == ours["steps"]
    assert ours["miou"] == pytest.approx(logged[-1]["miou"], abs=1e-9)
    assert ours["pixel_accuracy"] == pytest.approx(logged[-1]["pixel_accuracy"], abs=1e-9)
    # The same U-Net untrained predicts one class (background here, 86% of the pixels): trained models
    # score above it, a scorer that ignored the model would not.
    floor = report["untrained"]
    assert seed["miou"] > floor["miou"] + 0.1 and ours["miou"] > floor["miou"], (seed, ours, floor)
    assert report["means"]["seed"]["miou"] == seed["miou"]  # one seed: the mean is that run
    assert ours["setup"].startswith("2 process(es) x batch 2") and len(ours["per_class_iou"]) == 6
    assert "test mIoU" in table and "untrained" in table and "seg_dist" in table
    assert len(table.splitlines()) >= 2 + 3 + 1 + 1 + 6  # header, 2 recipes + floor, gap, class header, classes
    # The same --out again would overwrite the runs: refused before anything trains.
    assert bench.main(args) == cli.EXIT_USAGE
    assert "already there" in capsys.readouterr().err


def test_split_pairs_are_the_split_as_stored(tiny_shards):
    manifest = shards.load_manifest(tiny_shards)
    pairs = split_pairs(str(tiny_shards), manifest, "val")
    assert len(pairs) == shards.split_count(manifest, "val") == 16
    image, mask, key = pairs[0]
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3) and mask.dtype == np.int64 and key
    assert len({k for _, _, k in pairs}) == 16
