"""The error taxonomy: a user's mistake is one line naming the key or file, exit 2, no traceback; anything
else is a bug and keeps its traceback. Each case goes through a real command and fails before training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import REPO, child_env, save_tiny_checkpoint
from torch import nn

from seg_dist import cli, distributed, export, preview, train
from seg_dist.config import ModelConfig
from seg_dist.errors import UserError


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The command's stderr, checked to be a single `error: ...` line without a traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          env=child_env(), timeout=120, check=False)


def test_a_config_value_out_of_range_is_one_line_from_the_real_command(tmp_path):
    done = run_module("seg_dist.train", "--config", "configs/default.yaml", "train.epochs=0",
                      f"run.dir={tmp_path / 'run'}")
    assert done.returncode == cli.EXIT_USAGE, done.stderr
    assert done.stderr == "error: train.epochs=0: must be at least 1\n"
    assert not (tmp_path / "run").exists()  # refused before anything was set up


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epochs=-3"], "train.epochs=-3: must be at least 1"),
        (["train.max_nonfinite=0"], "train.max_nonfinite=0: must be at least 1"),
        (["loss.ce_weight=0", "loss.dice_weight=0"], "at least one must be greater than 0"),
        (["loss.ce_weight=-1"], "loss.ce_weight=-1.0: must be at least 0"),
        (["optim.lr=0"], "optim.lr=0.0: must be greater than 0"),
        (["data.workers=-1"], "data.workers=-1: must be at least 0"),
        (["logging.log_every=0"], "logging.log_every=0: must be at least 1"),
        (["train.max_steps=-1"], "train.max_steps=-1: 0 (no limit) or at least 1"),
        (["checkpoint.keep_last=-2"], "checkpoint.keep_last=-2: must be at least 0"),
        (["data.prefetch_factor=0"], "data.prefetch_factor=0: must be at least 1"),
        (["train.val_every='2 weeks'"], "train.val_every='2 weeks': expected auto, N (epochs)"),
        (["schedule.power=-1"], "schedule.power=-1.0: must be greater than 0"),
        (["optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5]: each beta must be in [0, 1)"),
        (["data.augment.vflip=2"],
         "data.augment.vflip=2.0: unset (from the data: pack --rotation-invariant) or a probability in [0, 1]"),
        (["data.augment.scale=[1.5,0.5]"], "data.augment.scale=[1.5, 0.5]: [low, high] with 0 < low <= high"),
        (["data.std=[0.2,-0.1,0.2]"], "data.std=[0.2, -0.1, 0.2]: unset (from the manifest) or one number greater "
                                     "than 0 per channel"),
        (["train.dist_timeout_minutes=0"], "train.dist_timeout_minutes=0.0: must be greater than 0"),
        (["data.shuffle_buffer=0"], "data.shuffle_buffer=0: at least 1"),
        (["data.shufle_buffer=1000"], "unknown config key 'data.shufle_buffer' (did you mean data.shuffle_buffer?)"),
    ],
)
def test_config_values_are_checked_at_load(overrides, message, capsys):
    assert train.main(overrides) == cli.EXIT_USAGE
    assert message in one_line(capsys)


def test_cuda_asked_for_where_there_is_none_names_train_device(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    done = run_module("seg_dist.train", "train.device=cuda", f"run.dir={tmp_path / 'run'}")
    assert done.returncode == cli.EXIT_USAGE, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "train.device=cuda: CUDA is not available here" in done.stderr


def test_a_device_that_is_not_there_is_a_user_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(UserError, match=r"train\.device=cuda"):
        distributed.pick_device(0, "cuda")
    with pytest.raises(UserError, match=r"--device 'gpu': not a device"):
        distributed.named_device("gpu")


class Pickled:
    """An object only full unpickling would rebuild."""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda: nn.Linear(2, 2).state_dict(), "a plain state_dict (parameter name -> tensor), lacks model, config"),
        (lambda: {"step": 3, "weights": [1, 2]}, "not a seg_dist checkpoint, lacks model, config"),
        (lambda: [torch.zeros(2)], "not a seg_dist checkpoint (holds a list, not a dict)"),
        # Never the advice of torch's refusal, to unpickle it anyway.
        (lambda: {"model": Pickled()}, "holds Python objects besides tensors and plain data, which seg_dist does "
                                       "not load"),
    ],
)
def test_a_checkpoint_seg_dist_did_not_write_names_the_file_and_what_it_lacks(tmp_path, capsys, content, message):
    foreign = tmp_path / "foreign.pt"
    torch.save(content(), foreign)
    out = tmp_path / "m.pt"
    assert export.main(["--checkpoint", str(foreign), "--format", "torchscript", "--out", str(out)]) == 2
    err = one_line(capsys)
    assert f"{foreign}: {message}" in err and "weights_only=False" not in err
    assert not out.exists()


def test_a_checkpoint_whose_config_is_out_of_range_names_the_file_and_key(tmp_path, capsys):
    path = save_tiny_checkpoint(tmp_path / "ck.pt", ModelConfig(width=4, depth=2), ["a", "b"], (0.5,) * 3,
                                (0.25,) * 3, global_step=1)
    state = torch.load(path, weights_only=True)
    state["config"]["train"]["epochs"] = 0
    torch.save(state, path)
    assert export.main(["--checkpoint", str(path), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 2
    assert f"{path}: train.epochs=0: must be at least 1" in one_line(capsys)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: m["splits"]["train"].pop("image_size"), "split 'train' lacks keys ['image_size']"),
        (lambda m: m.pop("num_classes"), "manifest lacks keys ['num_classes']"),
        (lambda m: m.pop("splits"), "manifest lacks keys ['splits']"),
        (lambda m: m["splits"]["val"].update(class_histogram=[1]), "split 'val': class_histogram must list"),
    ],
)
def test_a_manifest_missing_a_key_names_the_file_and_key(tiny_shards, tmp_path, capsys, damage, message):
    root = tmp_path / "shards"
    shutil.copytree(tiny_shards, root)
    manifest = json.loads((root / "manifest.json").read_text())
    damage(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert preview.main(["--out", str(tmp_path / "p.png"), f"data.root={root}"]) == cli.EXIT_USAGE
    err = one_line(capsys)
    assert f"{root / 'manifest.json'}: " in err and message in err


def test_a_missing_file_is_a_user_error_naming_it(tmp_path, capsys):
    assert export.main(["--checkpoint", str(tmp_path / "nope.pt"), "--format", "torchscript",
                        "--out", str(tmp_path / "m.pt")]) == cli.EXIT_USAGE
    assert f"{tmp_path / 'nope.pt'}: checkpoint not found" in one_line(capsys)
    assert preview.main(["--out", str(tmp_path / "p.png"), f"data.root={tmp_path}"]) == cli.EXIT_USAGE
    assert f"{tmp_path / 'manifest.json'}: no shard manifest" in one_line(capsys)


def test_a_bug_keeps_its_traceback_in_process():
    def buggy(_argv):
        raise ValueError("an internal contract broken")

    def missing_internal_file(_argv):
        raise FileNotFoundError("seg_dist/some_table.json")

    with pytest.raises(ValueError, match="an internal contract broken"):
        cli.run(buggy, [])
    with pytest.raises(FileNotFoundError):
        cli.run(missing_internal_file, [])


def test_a_bug_keeps_its_traceback_from_a_command_process():
    code = ("import sys\nfrom seg_dist import cli\n"
            "def command(argv):\n    raise ValueError('a bug, not bad input')\n"
            "sys.exit(cli.run(command, []))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=child_env(),
                          timeout=60, check=False)
    assert done.returncode not in (0, cli.EXIT_USAGE)
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.rstrip().endswith("ValueError: a bug, not bad input")
    assert "error: a bug" not in done.stderr


def test_user_error_is_not_a_value_error():
    assert not issubclass(UserError, ValueError)
