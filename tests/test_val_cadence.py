"""train.val_every: validation by epochs, steps or minutes, or auto (as often as keeps it to a small share of
the time), always at the end; every rank decides alike."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, tiny_overrides, torchrun

from seg_dist import distributed
from seg_dist.config import ConfigError, Every, load_config, parse_every
from seg_dist.trainer import train
from seg_dist.validation import Cadence


@pytest.mark.parametrize("text, every", [
    ("auto", Every("auto")), ("3", Every("epochs", 3)), ("1 epoch", Every("epochs", 1)),
    ("500 steps", Every("steps", 500)), ("2.5 minutes", Every("minutes", 2.5)), ("10 min", Every("minutes", 10)),
    (" 4  Epochs ", Every("epochs", 4)),
])
def test_val_every_reads_epochs_steps_minutes_or_auto(text, every):
    assert parse_every(text) == every


@pytest.mark.parametrize("text", ["0", "-1 steps", "1.5 steps", "2.5", "3 weeks", "steps", "", "auto 3", "nan minutes"])
def test_val_every_refuses_anything_else(text):
    with pytest.raises(ValueError):
        parse_every(text)


def test_a_bad_val_every_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"train.val_every='1.5 steps': expected auto, N \(epochs\)"):
        load_config(None, ["train.val_every=1.5 steps"])


def test_epochs_and_steps_cadences_validate_at_their_multiples_and_minutes_count_from_the_last():
    epochs = Cadence(Every("epochs", 3), epoch=4)  # resumed after epoch 4: at multiples, as before the resume
    assert [e for e in range(1, 13) if epochs.due(e, 0, 0.0, epoch_end=True)] == [6, 9, 12]
    assert not epochs.due(6, 0, 0.0, epoch_end=False)  # never mid-epoch
    steps = Cadence(Every("steps", 50), step=120)
    assert not steps.due(0, 149, 0.0, epoch_end=False) and steps.due(0, 150, 0.0, epoch_end=False)
    steps.validated(0, 150, 0.0, 1.0, 10.0)
    assert not steps.due(0, 150, 0.0, epoch_end=True) and steps.due(0, 200, 0.0, epoch_end=True)
    minutes = Cadence(Every("minutes", 0.5))
    assert not minutes.due(0, 10, 29.9, epoch_end=False) and minutes.due(0, 10, 30.0, epoch_end=False)


def test_auto_validates_after_epoch_1_then_keeps_validation_to_its_share():
    c = Cadence(Every("auto"), share=0.05)
    assert c.due(1, 0, 0.0, epoch_end=True)
    # One validation of 0.4 s against epochs of 3 s: 0.4 / (0.05 x 3) = 2.7, so every 3 epochs.
    note = c.validated(1, 24, 5.0, val_seconds=0.4, train_seconds=3.0)
    assert c.epochs == 3 and "every 3 epochs" in note and "5%" in note
    assert [e for e in range(2, 5) if c.due(e, 0, 0.0, epoch_end=True)] == [4]
    # Validation became cheap (or epochs long): every epoch again, said once.
    assert "every epoch" in c.validated(4, 96, 20.0, val_seconds=0.1, train_seconds=9.0)
    assert c.validated(5, 120, 24.0, val_seconds=0.1, train_seconds=3.0) is None
    assert c.epochs == 1
    # Near a boundary it does not flip back and forth: up at once, down only with a margin.
    assert "every 2 epochs" in c.validated(6, 144, 28.0, val_seconds=0.16, train_seconds=3.0)  # needs 1.07
    assert c.validated(8, 192, 35.0, val_seconds=0.14, train_seconds=6.0) is None and c.epochs == 2  # 0.93
    assert "every epoch" in c.validated(10, 240, 42.0, val_seconds=0.11, train_seconds=6.0)  # 0.73
    # Fixed cadences never move.
    fixed = Cadence(Every("epochs", 2))
    assert fixed.validated(2, 48, 5.0, val_seconds=100.0, train_seconds=1.0) is None and fixed.epochs == 2


def _train(overrides: list[str]):
    return train(load_config(REPO / "configs" / "default.yaml", overrides), distributed.DistEnv(), torch.device("cpu"))


def test_a_steps_cadence_validates_mid_epoch_and_the_run_resumes_from_there(tiny_shards, tmp_path):
    run = tmp_path / "run"
    # 64 samples in batches of 8: 8 steps an epoch, 2 epochs.
    overrides = tiny_overrides(tiny_shards, run, "train.batch_size=8", "train.epochs=2", "train.val_every=5 steps")
    result = _train(overrides)
    assert [(h["epoch"], h["step"]) for h in result.history] == [(1, 5), (2, 10), (2, 15), (2, 16)]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "miou" in line] == [5, 10, 15, 16]
    # The best weights were saved at a validation, wherever in the epoch it fell.
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True, map_location="cpu")
    assert best["global_step"] in (5, 10, 15, 16)
    assert best["best_miou"] == pytest.approx(max(h["miou"] for h in result.history))
    # Two more epochs: at the same multiples as without the stop.
    resumed = _train([*overrides, "train.epochs=4"])
    assert [h["step"] for h in resumed.history] == [20, 25, 30, 32]


def test_auto_says_its_cadence_and_validates_first_and_last_epochs(tiny_shards, tmp_path, caplog):
    caplog.set_level("INFO", logger="seg_dist")
    result = _train(tiny_overrides(tiny_shards, tmp_path / "run", "train.batch_size=8", "train.epochs=6",
                                   "train.val_every=auto"))
    epochs = [h["epoch"] for h in result.history]
    assert epochs[0] == 1 and epochs[-1] == 6
    plan = [r.getMessage() for r in caplog.records if "validation after epoch 1" in r.getMessage()]
    assert len(plan) == 1 and "train.val_every=auto" in plan[0]
    # Between them, the cadence the log announced (or every epoch, if it never changed).
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validating every")]
    if not chosen:
        assert epochs == [1, 2, 3, 4, 5, 6]
    else:
        n = 1 if chosen[0].startswith("validating every epoch") else int(chosen[0].split()[2])
        assert epochs[1] == min(1 + n, 6)


def test_two_ranks_agree_on_a_minutes_cadence(tiny_shards, tmp_path):
    run = tmp_path / "run"
    # 0.005 minutes: due at most log steps; the ranks' clocks differ, the agreed one decides.
    torchrun(2, "seg_dist.train", *tiny_overrides(tiny_shards, run, "train.epochs=2", "train.val_every=0.005 minutes"))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if "miou" in line]
    assert len(steps) >= 3 and steps[-1] == 16 and steps == sorted(set(steps)), steps
    assert all(step % 2 == 0 for step in steps)  # read at log steps (logging.log_every=2) and the end
