"""A run directory belongs to one run: a live run's lock, another dataset's or model's checkpoints, paths
that cannot hold a run; and what a run says about itself (its plan, its budget, overlays at its end)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_overrides

from seg_dist import checkpoint, distributed, pack
from seg_dist.config import load_config
from seg_dist.errors import UserError
from seg_dist.trainer import train

CPU = torch.device("cpu")


def _cfg(shards: Path, run: Path, *extra: str):
    return load_config(REPO / "configs" / "default.yaml", tiny_overrides(shards, run, "train.epochs=1", *extra))


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another synthetic dataset with the same 6 classes: only its manifest tells it apart."""
    out = tmp_path_factory.mktemp("other") / "other"
    pack.pack_synthetic(out, n=40, size=32, seed=7, samples_per_shard=12, workers=1)
    return out


def test_a_live_run_keeps_its_run_dir_until_it_dies(tiny_shards, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom seg_dist.rundir import RunDirLock\n"
         "lock = RunDirLock.claim(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(600)", str(run)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"run\.dir={run} is in use by a live run \(pid {holder.pid} on "):
            train(_cfg(tiny_shards, run), distributed.DistEnv(), CPU)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing of the refused run was written
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock with the process
        holder.wait()
    result = train(_cfg(tiny_shards, run), distributed.DistEnv(), CPU)
    assert result.global_step > 0 and (run / "checkpoints" / "last.pt").is_file()


def test_another_dataset_is_refused_before_any_weight_is_loaded(tiny_shards, other_shards, tmp_path):
    run = tmp_path / "run"
    first = train(_cfg(tiny_shards, run), distributed.DistEnv(), CPU)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(UserError, match=rf"run\.dir={run} holds a run on other data \({tiny_shards}, last\.pt\) "
                                        rf"than data\.root={other_shards}: choose another run\.dir"):
        train(_cfg(other_shards, run), distributed.DistEnv(), CPU)
    with pytest.raises(UserError, match=r"holds a run on other data"):  # the data, not the model, is the news
        train(_cfg(other_shards, run, "model.width=16"), distributed.DistEnv(), CPU)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before

    # Named explicitly, another run's checkpoint is where fine-tuning starts: its weights, step 0.
    tuned = train(_cfg(other_shards, tmp_path / "tuned", f"train.resume={run / 'checkpoints' / 'last.pt'}"),
                  distributed.DistEnv(), CPU)
    fresh = train(_cfg(other_shards, tmp_path / "fresh"), distributed.DistEnv(), CPU)
    assert tuned.global_step == fresh.global_step < first.global_step + fresh.global_step
    assert tuned.metrics["miou"] != fresh.metrics["miou"]  # it did start from other weights


def test_a_changed_model_is_one_line_naming_the_key(tiny_shards, tmp_path):
    run = tmp_path / "run"
    train(_cfg(tiny_shards, run), distributed.DistEnv(), CPU)
    with pytest.raises(UserError, match=r"last\.pt holds a model with model\.width=8, this run has model\.width=16"):
        train(_cfg(tiny_shards, run, "model.width=16"), distributed.DistEnv(), CPU)


def test_a_run_dir_that_cannot_hold_a_run_is_one_line(tiny_shards, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(UserError, match=rf"run\.dir={file} is a file, not a folder"):
        train(_cfg(tiny_shards, file), distributed.DistEnv(), CPU)
    with pytest.raises(UserError, match=rf"run\.dir={file / 'run'} cannot be written"):
        train(_cfg(tiny_shards, file / "run"), distributed.DistEnv(), CPU)
    assert file.read_text() == "mine"


def test_a_run_that_fails_before_writing_leaves_no_run_dir(tmp_path):
    missing = tmp_path / "shrads"  # a mistyped data.root
    with pytest.raises(UserError, match=str(missing)):
        train(_cfg(missing, tmp_path / "runs" / "new"), distributed.DistEnv(), CPU)
    assert not (tmp_path / "runs" / "new").exists()
    mine = tmp_path / "mine"  # a folder the user made stays, even empty
    mine.mkdir()
    with pytest.raises(UserError, match=str(missing)):
        train(_cfg(missing, mine), distributed.DistEnv(), CPU)
    assert [p.name for p in mine.iterdir()] == [".lock"]


def test_the_default_run_dir_is_the_datasets_own():
    assert load_config(None, ["data.root=shards/cityscapes"]).run.dir == "runs/cityscapes"
    assert load_config(None, ["data.root=/data/voc/", "run.dir=auto"]).run.dir == "runs/voc"
    assert load_config(None, ["run.dir=mine"]).run.dir == "mine"


def test_a_budget_run_says_so_and_leaves_its_last_overlays(tiny_shards, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = _cfg(tiny_shards, run, "train.epochs=200", "train.budget_minutes=0.03")
    with caplog.at_level(logging.INFO, logger="seg_dist"):
        result = train(cfg, distributed.DistEnv(), CPU)
    text = caplog.text
    assert f"run.dir {run}: " in text and "train.budget_minutes=0.03 rules" in text
    assert "Epoch 1/200: " in text
    assert result.history and result.global_step < 200 * 16  # the budget, not the epochs, ended it
    overlays = sorted((run / "overlays").glob("val_*.png"))
    assert len(overlays) == 2  # logging.overlays=2, written by the validation that turned out to be the last
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, len(result.history) + 1))
    assert checkpoint.load(run / "checkpoints" / "last.pt")["global_step"] == result.global_step


def test_epochs_count_from_one_with_the_time_left(tiny_shards, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="seg_dist"):
        train(_cfg(tiny_shards, tmp_path / "run", "train.epochs=2"), distributed.DistEnv(), CPU)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Epoch ")]
    assert [line.split(":")[0] for line in lines] == ["Epoch 1/2", "Epoch 2/2"]
    assert lines[0].endswith("s left") and not lines[1].endswith("left")
    assert checkpoint.snapshot_name(2, 32) in {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()}
