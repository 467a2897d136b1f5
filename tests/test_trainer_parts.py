"""The trainer's small parts (state, meter) and the command layer, without a training run."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO

from seg_dist import cli
from seg_dist.config import load_config
from seg_dist.trainer import StepMeter, TrainState, global_batchnorm

CPU = torch.device("cpu")


def _step(meter: StepMeter, loss: float, skipped: bool) -> None:
    t = torch.tensor
    meter.update(t(loss), {"ce": t(loss / 2), "dice": t(loss / 4)}, t(2 * loss), t(float(skipped)))


def test_step_meter_averages_taken_steps_and_counts_skipped_ones():
    meter = StepMeter(CPU)
    _step(meter, 1.0, False)
    _step(meter, float("nan"), True)  # a skipped step's non-finite values must not poison the sums
    _step(meter, 3.0, False)
    stats = meter.flush()
    assert stats.means == {"loss": 2.0, "ce": 1.0, "dice": 0.5, "grad_norm": 4.0}
    assert (stats.steps, stats.skipped, stats.skipped_in_a_row) == (3, 1, 0)
    _step(meter, float("inf"), True)
    _step(meter, float("inf"), True)
    stats = meter.flush()
    assert (stats.steps, stats.skipped, stats.skipped_in_a_row) == (2, 2, 2)
    assert stats.means["loss"] == 0.0  # nothing taken since the last flush
    assert meter.epoch_loss() == 2.0  # the epoch's taken steps: (1 + 3) / 2
    assert meter.epoch_loss() == 0.0  # and the sum starts again


def test_train_state_round_trips_counters_and_rng():
    state = TrainState(epoch=3, epoch_step=5, global_step=29, best_miou=0.5)
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    saved = state.state_dict()
    expected = (torch.rand(2), np.random.rand(), random.random())
    torch.manual_seed(2)
    np.random.seed(2)
    random.seed(2)
    restored = TrainState()
    restored.load_state_dict(saved)
    assert restored == state
    assert torch.equal(torch.rand(2), expected[0]) and np.random.rand() == expected[1]
    assert random.random() == expected[2]


def test_command_table_and_help():
    out = subprocess.run([sys.executable, "-m", "seg_dist", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    assert all(name in out.stdout for name in cli.COMMANDS)
    out = subprocess.run([sys.executable, "-m", "seg_dist", "fly"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "unknown command 'fly'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "seg_dist", "train", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0 and "--config" in out.stdout


def test_library_imports_no_command_module():
    code = ("import sys, seg_dist.trainer, seg_dist.validation, seg_dist.pack\n"
            "cmds = {'seg_dist.cli', 'seg_dist.train', 'seg_dist.evaluate', 'seg_dist.preview', 'seg_dist.synth',"
            " 'seg_dist.pack.__main__'}\n"
            "print(sorted(cmds & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_errors_become_one_line_with_exit_codes(capsys):
    def bad_input(_argv):
        raise cli.UserError("data/x.png: no such file")

    def failed(_argv):
        raise cli.RunFailed("diverged at step 7")

    def bug(_argv):
        raise KeyError("a bug keeps its traceback")

    assert cli.run(bad_input) == cli.EXIT_USAGE
    assert capsys.readouterr().err == "error: data/x.png: no such file\n"
    assert cli.run(failed) == cli.EXIT_FAILED
    assert capsys.readouterr().err == "error: diverged at step 7\n"
    with pytest.raises(KeyError):
        cli.run(bug)
    with pytest.raises(FileNotFoundError):  # an unexpected missing file is a bug, not a user's mistake
        cli.run(lambda _argv: Path("/nonexistent/x").read_text())


def test_step_meter_leaves_paused_time_out_of_the_rate():
    import time

    meter = StepMeter(CPU)
    _step(meter, 1.0, False)
    with meter.pause():  # validation between two log lines
        time.sleep(0.3)
    stats = meter.flush()
    assert stats.seconds < 0.2 and stats.steps == 1
    with meter.pause():
        time.sleep(0.05)
    meter.flush()
    assert meter.paused == 0.0  # a flush starts the next interval afresh


@pytest.mark.parametrize(("sync_bn", "device", "world", "per_rank", "wanted"), [
    ("auto", "cuda", 8, 16, True),  # NCCL makes the exchange cheap
    ("auto", "cpu", 2, 4, False),  # gloo's exchanges cost more steps than 4 samples a rank lose
    ("auto", "cpu", 8, 1, True),  # one sample per rank is too few for statistics
    ("auto", "cpu", 1, 1, False),  # one rank: its batch is the global batch
    ("true", "cpu", 2, 4, True),  # a YAML boolean reads as on/off
    ("off", "cuda", 8, 2, False),
])
def test_batchnorm_statistics_are_global_where_sync_bn_says(sync_bn, device, world, per_rank, wanted):
    t = load_config(None, [f"train.sync_bn={sync_bn}", f"train.batch_size={per_rank}"]).train
    assert global_batchnorm(t, torch.device(device), world) is wanted
