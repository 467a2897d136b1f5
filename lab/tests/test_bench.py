"""`python -m lab.bench` end to end on tiny sizes: every section runs, prints its table, and each figure is
what its blocks counted over the time they took, in the units a block is known to hold.

Speed itself is never asserted (targets are printed by the bench): a rate is checked against what its
block did (samples, images, FLOPs, the trainer's own count of steps), and against the wall clock of the
command that measured it.
"""

from __future__ import annotations

import json
import statistics
import time

import pytest

from lab import bench
from seg_dist import cli

WARMUP, STEPS, REPEATS = 1, 2, 2
TINY_MODEL = ["--width", "8", "--depth", "3", "--size", "32", "--warmup", str(WARMUP), "--steps", str(STEPS),
              "--repeats", str(REPEATS)]


def _bench(capsys: pytest.CaptureFixture[str], tmp_path, *args: str) -> tuple[dict, str, float]:
    out = tmp_path / "bench.json"
    t0 = time.perf_counter()
    assert bench.main([*args, "--device", "cpu", "--json", str(out)]) == 0
    wall = time.perf_counter() - t0
    return json.loads(out.read_text()), capsys.readouterr().out, wall


def _blocks(sample: dict, per_block: float, repeats: int = REPEATS) -> float:
    """Each block did `per_block` units and its rate is that over its time; returns the blocks' seconds."""
    assert sample["counts"] == [per_block] * repeats
    assert sample["values"] == pytest.approx([c / s for c, s in zip(sample["counts"], sample["seconds"],
                                                                       strict=True)])
    assert sample["median"] == pytest.approx(statistics.median(sample["values"]))
    assert all(s > 0 for s in sample["seconds"])
    return sum(sample["seconds"])


def _measured_where(section: dict) -> None:
    env = section["env"]
    assert env["device"].startswith("cpu") and env["torch"] and env["cores"] >= 1
    assert isinstance(env["load_average"], float) and isinstance(env["load_average_end"], float)


def test_bench_data_rates_count_the_samples_each_loader_delivered(tiny_shards, tmp_path, capsys):
    samples, batch = 32, 4
    report, table, wall = _bench(capsys, tmp_path, "data", "--data", str(tiny_shards), "--size", "32",
                                 "--workers", "0,1", "--samples", str(samples), "--batch", str(batch),
                                 "--repeats", str(REPEATS))
    d, rates = report["data"], report["data"]["rates"]
    timed = _blocks(rates["decode"], samples) + _blocks(rates["decode_augment"], samples)
    for w in ("0", "1"):  # whole batches of `batch`, as many as make `samples`: what the loaders shipped
        timed += _blocks(rates["pipeline"][w], samples) + _blocks(rates["folder"][w], samples)
    assert timed < wall  # the blocks are parts of the command's own time
    med = {k: {w: rates[k][w]["median"] for w in ("0", "1")} for k in ("pipeline", "folder")}
    bound = rates["decode_augment"]["median"]
    assert d["pipeline_vs_bound"] == pytest.approx(med["pipeline"]["0"] / bound)
    assert d["pipeline_vs_bound_by_workers"]["1"] == pytest.approx(med["pipeline"]["1"] / bound)
    assert d["pipeline_vs_folder"] == pytest.approx(max(med["pipeline"].values()) / max(med["folder"].values()))
    assert d["worker_scaling"] == 1.0 and d["worker_scaling_workers"] == 1  # 1 worker against itself
    assert d["settings"]["samples_in_split"] == 64 and d["settings"]["image_shape"] == [32, 32, 3]
    _measured_where(d)
    assert "(c) shard pipeline, 1 workers" in table and "c/d" in table and "target >= 0.9" in table


def test_bench_train_rates_count_the_steps_the_trainer_took(tiny_shards, tmp_path, capsys):
    batch = 2
    report, table, wall = _bench(capsys, tmp_path, "train", "--data", str(tiny_shards), *TINY_MODEL,
                                 "--batch", str(batch))
    (case,) = report["train"]["cases"]
    timed = _blocks(case["trainer"]["rate"], STEPS * batch) + _blocks(case["bare"]["rate"], STEPS * batch)
    # The trainer's own meter counted every step the bench timed, warm-up included.
    assert case["trainer"]["metered_steps"] == WARMUP + STEPS * REPEATS
    conv = 2 * 2 * 256 * 256 * 9 * 64 * 64  # the CPU peak's convolution: 5 of them per block, 3 blocks twice
    timed += _blocks(case["peak"]["rate"], 5 * conv, repeats=6)
    assert timed < wall
    assert case["peak"]["flops_per_s"] == max(case["peak"]["rate"]["values"])
    assert case["flops_per_image"] == case["flops_per_step"] / batch
    # A width-8 U-Net step at 32^2 (forward and backward, 2 images) is some MFLOPs: not 0, not the peak's.
    assert 1e6 < case["flops_per_step"] < conv
    assert case["mfu"] == pytest.approx(case["images_per_s"] * case["flops_per_image"] / case["peak"]["flops_per_s"])
    assert case["overhead_ratio"] == pytest.approx(case["trainer"]["rate"]["median"] / case["bare"]["rate"]["median"])
    assert case["settings"]["width"] == 8 and case["settings"]["dtype"] in ("bf16", "fp32") and case["settings"]["ddp"]
    assert case["trainer"]["memory"]["peak_mib"] > 0
    _measured_where(case)
    assert "trainer / bare" in table and "MFU (trainer)" in table


def test_bench_scaling_rates_count_the_global_batch_on_every_world_size(tiny_shards, tmp_path, capsys):
    report, table, wall = _bench(capsys, tmp_path, "scaling", "--data", str(tiny_shards), *TINY_MODEL,
                                 "--batch", "4", "--procs", "2")
    s = report["scaling"]
    assert set(s["runs"]) == {"1", "2"}
    timed = 0.0
    for world, run in s["runs"].items():
        timed += _blocks(run["rate"], STEPS * 4)  # global images: per-rank batch x ranks
        assert run["per_rank_batch"] * int(world) == 4
        assert run["metered_steps"] == WARMUP + STEPS * REPEATS
    assert timed < wall
    assert s["efficiency"] == pytest.approx(s["runs"]["2"]["rate"]["median"] / s["runs"]["1"]["rate"]["median"])
    assert s["settings"]["backend"] == "gloo"
    _measured_where(s)
    assert "efficiency" in table


def test_bench_errors_are_one_line(tiny_shards, tmp_path, capsys):
    assert bench.main(["scaling", "--device", "cpu", "--data", str(tiny_shards), "--procs", "2", "--batch",
                       "3"]) == cli.EXIT_USAGE
    assert "does not split over 2 processes" in capsys.readouterr().err
    assert bench.main(["data", "--device", "cpu", "--data", str(tmp_path / "missing")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest" in err
    with pytest.raises(SystemExit):
        bench.parse_args(["data", "--workers", "0,x"])


def test_bench_help_names_every_section(capsys):
    for section in ("data", "train", "scaling", "all", "recipe"):
        with pytest.raises(SystemExit) as exit_:
            bench.parse_args([section, "--help"])
        assert exit_.value.code == 0 and "--json" in capsys.readouterr().out
    assert "bench" not in cli.COMMANDS  # the lab is no command of the product
