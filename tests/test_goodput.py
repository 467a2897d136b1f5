"""Goodput: every run ends with where its wall time went (one line on rank 0, TensorBoard, goodput.json)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_overrides, torchrun

from seg_dist import distributed
from seg_dist.config import load_config
from seg_dist.runlog import GOODPUT_FILE, GOODPUT_PARTS, goodput
from seg_dist.trainer import train

EPOCHS = 4
GLOBAL_BATCH = 8  # 2 ranks x train.batch_size 4
STEPS = EPOCHS * 8  # 64 train samples / 8


def _check_adds_up(g: dict) -> None:
    """The parts and the steps' share add up to the wall time, and no part is negative (none double-counted)."""
    assert 0 < g["goodput"] <= 1
    assert g["steps_s"] + sum(g["seconds"].values()) == pytest.approx(g["wall_s"], abs=1e-6)
    assert g["goodput"] + sum(g["fractions"].values()) == pytest.approx(1.0, abs=1e-9)
    assert set(g["seconds"]) == set(GOODPUT_PARTS)
    assert min(g["seconds"].values()) >= -1e-6, g["seconds"]
    assert g["goodput"] == pytest.approx(g["images"] / g["wall_s"] / g["step_images_per_s"])


@pytest.fixture(scope="module")
def two_rank_runs(tiny_shards, tmp_path_factory) -> dict[str, tuple[dict, str, float, Path]]:
    """The same 2-rank run validating every epoch, and only at its end: goodput.json, the output, the seconds
    torchrun took, run.dir."""
    runs = {}
    for name, val_every in (("every_epoch", 1), ("at_end", 100)):
        run = tmp_path_factory.mktemp("goodput") / name
        t0 = time.perf_counter()
        out = torchrun(2, "seg_dist.train", *tiny_overrides(tiny_shards, run, f"train.epochs={EPOCHS}",
                                                             f"train.val_every={val_every}"))
        outer = time.perf_counter() - t0
        runs[name] = (json.loads((run / GOODPUT_FILE).read_text()), out.stdout + out.stderr, outer, run)
    return runs


def test_a_two_rank_run_ends_with_its_goodput_on_rank_0_only(two_rank_runs):
    g, output, outer, run = two_rank_runs["every_epoch"]
    lines = [line for line in output.splitlines() if "] goodput " in line]
    assert len(lines) == 1 and "[rank 0]" in lines[0], lines
    assert f"goodput {g['goodput']:.3f} (steps 1-{STEPS})" in lines[0]
    assert "wall time from process start (/proc/self/stat)" in lines[0]
    first = [line for line in output.splitlines() if "first step after" in line]
    assert len(first) == 1 and "[rank 0]" in first[0] and "rendezvous" in first[0], first

    assert g["steps"] == STEPS and g["images"] == STEPS * GLOBAL_BATCH and g["ranks"] == 2
    assert g["covers"] == f"steps 1-{STEPS}" and g["resumed_at"] == 0 and g["failed"] is None
    _check_adds_up(g)
    # The wall time starts at the worker's own start and ends before it exits: inside the launcher's time.
    assert 0 < g["wall_s"] < outer
    # Start-up: all that came before the first step, and at most the time up to the first step's end.
    stages = g["startup_stages"]
    first_step = stages.pop("first step (compile, loader start, first batch)")
    assert list(stages) == ["interpreter and imports", "config", "rendezvous",
                            "setup (manifest, model, optimiser, resume)", "train loader (index)"]
    assert sum(stages.values()) <= g["seconds"]["startup"] <= sum(stages.values()) + first_step

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"goodput/goodput", "goodput/step_images_per_s"} <= tags
    assert {f"goodput/{part}_fraction" for part in GOODPUT_PARTS} <= tags
    (logged,) = events.Scalars("goodput/goodput")
    assert logged.step == STEPS and logged.value == pytest.approx(g["goodput"], rel=1e-6)


def test_validation_every_epoch_takes_more_of_the_wall_time_than_at_the_end_only(two_rank_runs):
    every, at_end = two_rank_runs["every_epoch"][0], two_rank_runs["at_end"][0]
    _check_adds_up(at_end)
    assert every["fractions"]["validation"] > at_end["fractions"]["validation"], (every["seconds"],
                                                                                   at_end["seconds"])


def test_a_resumed_run_reports_what_this_process_trained(tiny_shards, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, run, "train.batch_size=8")  # 8 steps an epoch on one process
    for epochs in (1, 2):
        cfg = load_config(REPO / "configs" / "default.yaml", [*overrides, f"train.epochs={epochs}"])
        train(cfg, distributed.DistEnv(), torch.device("cpu"))
    g = json.loads((run / GOODPUT_FILE).read_text())
    assert g["covers"] == "this process only: steps 9-16 of a run resumed at step 8"
    assert (g["first_step"], g["last_step"], g["steps"], g["images"]) == (9, 16, 8, 64)
    assert g["wall_from"] == "the call of train()"
    _check_adds_up(g)


def test_goodput_is_the_steps_share_of_the_wall_time():
    # 11 steps of 4 images; the 10 after the first took 2 s inside the steps, the first 0.9 s (0.7 s beyond
    # the others' 0.2 s: start-up), so the 44 images are 2.2 s of steps (20 images/s) in a 10 s wall. The
    # first step ended 3.2 s in, 0.5 s of which was a validation before it.
    g = goodput(10.0, 11, 4, 2.0, 0.9, 3.2, 0.5, {"validation": 2.5, "checkpoints": 1.0, "data_wait": 0.3})
    assert g["step_images_per_s"] == pytest.approx(20.0)
    assert g["goodput"] == pytest.approx(0.22)
    assert g["seconds"]["startup"] == pytest.approx(3.2 - 0.5 - 0.2)
    assert g["seconds"]["rest"] == pytest.approx(10.0 - 2.2 - 2.5 - 2.5 - 1.0 - 0.3)
    _check_adds_up(g)
    # A first step faster than the others' mean is one step at its own pace: no negative start-up.
    fast = goodput(3.0, 11, 4, 2.0, 0.1, 0.15, 0.0, {})
    assert fast["step_images_per_s"] == pytest.approx(44 / 2.1) and fast["seconds"]["startup"] == pytest.approx(0.05)
    _check_adds_up(fast)


def test_a_process_that_took_no_step_spent_its_wall_time_getting_there():
    g = goodput(5.0, 0, 4, 0.0, 0.0, 0.0, 0.0, {"validation": 1.0})
    assert (g["goodput"], g["images"], g["step_images_per_s"]) == (0.0, 0, 0.0)
    assert g["seconds"] == {"startup": 4.0, "validation": 1.0, "checkpoints": 0.0, "data_wait": 0.0, "rest": 0.0}


def test_the_run_log_writes_in_order_beside_the_caller_and_raises_what_failed_there(tmp_path):
    import threading

    from seg_dist.runlog import RunLog

    runlog = RunLog(tmp_path, enabled=True, tensorboard=False)
    release, threads = threading.Event(), []

    def write(n: int) -> None:
        threads.append(threading.current_thread().name)
        release.wait(10)
        runlog.jsonl({"n": n})

    for n in range(3):
        runlog.later(write, n)
    assert not (tmp_path / "metrics.jsonl").exists()  # the caller went on while the writer waits
    release.set()
    runlog.wait()
    assert [json.loads(line)["n"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert set(threads) == {threads[0]} and threads[0] != threading.current_thread().name

    def fail() -> None:
        raise OSError(28, "No space left on device")

    runlog.later(fail)
    with pytest.raises(OSError, match="No space left"):
        runlog.close()
    assert runlog._writer is None  # closed all the same
    RunLog(tmp_path, enabled=False).later(fail)  # off rank 0: nothing runs
