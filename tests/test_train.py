"""The trainer end to end, with 2 real gloo processes where ranks matter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import (
    REPO,
    child_env,
    kill_tree,
    last_step,
    rank_pid,
    spawn_train,
    tiny_overrides,
    torchrun,
    torchrun_cmd,
)

from seg_dist import checkpoint, distributed, pack
from seg_dist.config import load_config
from seg_dist.errors import UserError
from seg_dist.trainer import train


def test_two_ranks_converge_agree_and_leave_artifacts(tiny_shards, tmp_path):
    run = tmp_path / "run"
    ranks = spawn_train(2, tiny_overrides(tiny_shards, run, "train.epochs=8", "optim.lr=1e-2", "train.grad_clip=5.0"),
                         tmp_path)

    # All ranks hold identical weights after training (DDP kept them in step).
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
    # Validation metrics are all-reduced, so every rank reports the same numbers.
    assert [h["miou"] for h in ranks[0]["history"]] == [h["miou"] for h in ranks[1]["history"]]

    history = ranks[0]["history"]
    assert len(history) == 8
    assert history[-1]["miou"] > history[0]["miou"] + 0.15, history
    assert history[-1]["miou"] > 0.45, history
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 9))  # epochs count from 1
    assert lines[-1]["samples"] == 16 and set(lines[-1]["per_class_iou"]) >= {"background", "disc"}
    ck = run / "checkpoints"
    assert (ck / "last.pt").is_file() and (ck / "best.pt").is_file()
    assert len(list(ck.glob("epoch*-step*.pt"))) == 3  # keep_last
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert len(list((run / "overlays").glob("*.png"))) == 2
    assert load_config(run / "config.yaml").data.num_classes == 6  # the resolved config

    best = checkpoint.load(ck / "best.pt")
    assert best["best_miou"] == pytest.approx(max(h["miou"] for h in history))


def test_loader_workers_start_once_per_run_not_per_epoch(tiny_shards, tmp_path):
    run = tmp_path / "run"
    out = torchrun(2, "seg_dist.train", *tiny_overrides(tiny_shards, run, "train.epochs=3", "data.workers=1"))
    text = out.stdout + out.stderr
    # Rank 0 logs at info level (the other ranks only warnings); per epoch it would say so 3 times.
    assert text.count("train loader: 1 worker process(es) started") == 1, text[-3000:]
    assert checkpoint.load(run / "checkpoints" / "last.pt")["epoch"] == 3


def test_plateau_scheduler_stays_in_step_across_ranks(tiny_shards, tmp_path):
    # A tiny lr keeps the validation loss flat, so the plateau rule fires; it is fed the all-reduced
    # validation loss, so both ranks cut the rate at the same epochs although their batches differ.
    overrides = tiny_overrides(tiny_shards, tmp_path / "run", "train.epochs=4", "schedule.name=plateau",
                               "schedule.plateau_patience=0", "optim.lr=1e-7")
    ranks = spawn_train(2, overrides, tmp_path)
    lrs = [[h["lr"] for h in r["history"]] for r in ranks]
    assert lrs[0] == lrs[1]
    assert lrs[0][-1] < lrs[0][0]  # it did fire


def test_killed_run_resumes_at_the_saved_step(tiny_shards, tmp_path):
    run = tmp_path / "run"
    # fp16 so the GradScaler's state is part of what must survive.
    args = ["--config", "configs/default.yaml",
            *tiny_overrides(tiny_shards, run, "train.epochs=30", "train.val_every=10", "train.amp=fp16",
                            "checkpoint.every_steps=3", "schedule.warmup_iters=5")]
    proc = subprocess.Popen(torchrun_cmd(2, "seg_dist.train", *args), cwd=REPO, env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "last.pt"
    try:
        deadline = time.monotonic() + 120
        while last_step(last) < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        kill_tree(proc)  # no chance to clean up: like a node failure
    saved = checkpoint.load(last)
    total = 30 * (64 // (2 * 4))
    assert 6 <= saved["global_step"] < total, "the run finished before it could be killed"

    out = torchrun(2, "seg_dist.train", *args)
    log = out.stdout + out.stderr
    lr = saved["optimizer"]["param_groups"][0]["lr"]
    assert f"(global step {saved['global_step']}), lr {lr:.6g}" in log, log[-2000:]
    assert f"grad scale {saved['scaler']['scale']} (growth tracker {saved['scaler']['_growth_tracker']})" in log
    assert saved["scaler"]["_growth_tracker"] > 0 or saved["scaler"]["scale"] != 65536.0
    final = checkpoint.load(last)
    assert final["global_step"] == total  # it continued, it did not start over or overshoot
    assert final["epoch"] == 30


def test_validation_is_identical_for_one_and_two_ranks(tiny_shards, tmp_path):
    run = tmp_path / "run"
    assert torchrun(1, "seg_dist.train", "--config", "configs/default.yaml",
                    *tiny_overrides(tiny_shards, run, "train.epochs=2")).returncode == 0
    ck = run / "checkpoints" / "last.pt"
    reports = []
    # fp32, so that the batch composition cannot flip an argmax through bf16 rounding: what is
    # under test is the reduction, not the convolution's numerics.
    for nproc, extra in ((1, []), (2, []), (2, ["data.val_batch_size=3", "data.workers=2"])):
        out = tmp_path / f"eval{nproc}-{len(extra)}.json"
        torchrun(nproc, "seg_dist.evaluate", "--checkpoint", str(ck), "--json", str(out), "train.amp=off", *extra)
        reports.append(json.loads(out.read_text()))
    for other in reports[1:]:
        assert other["samples"] == reports[0]["samples"] == 16
        assert other["confusion_matrix"] == reports[0]["confusion_matrix"]
        assert other["miou"] == reports[0]["miou"] and other["pixel_accuracy"] == reports[0]["pixel_accuracy"]
        # Summation order differs with the split, so the float loss agrees to rounding only.
        assert other["loss"] == pytest.approx(reports[0]["loss"], rel=1e-6)


def test_checkpoint_is_plain_and_loads_weights_only_in_a_fresh_process(tiny_shards, tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "seg_dist.train", "--config", "configs/default.yaml",
                    *tiny_overrides(tiny_shards, run, "train.epochs=1")],
                   cwd=REPO, env=child_env(), check=True, capture_output=True)
    code = (
        "import sys, torch\n"
        "s = torch.load(sys.argv[1], weights_only=True)\n"
        "assert not any(k.startswith(('module.', '_orig_mod.')) for k in s['model'])\n"
        "assert s['config']['model']['width'] == 8 and s['global_step'] == 16 and s['epoch'] == 1\n"
        "assert {'optimizer', 'scheduler', 'scaler', 'rng', 'manifest_digest', 'versions'} <= set(s)\n"
        "assert s['max_size'] is None and len(s['palette']) == 6 and [0, 0, 0] not in s['palette']\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(run / "checkpoints" / "last.pt")],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_odd_image_sizes_train_and_validate(tmp_path):
    shards = tmp_path / "odd"
    pack.pack_synthetic(shards, n=20, size=45, workers=1)
    run = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "default.yaml",
                      tiny_overrides(shards, run, "train.epochs=1", "data.image_size=37", "model.depth=4",
                                     "train.accum_steps=2"))
    result = train(cfg, distributed.DistEnv(), torch.device("cpu"))
    assert result.history and result.metrics["miou"] >= 0  # validated at the original 45 x 45
    assert result.global_step == 16 // 4 // 2  # 4 micro-batches, 2 optimiser steps


def test_diverging_run_stops_with_a_clear_message_and_says_where_its_time_went(tiny_shards, tmp_path):
    cfg = load_config(REPO / "configs" / "default.yaml",
                      tiny_overrides(tiny_shards, tmp_path / "run", "optim.lr=1e30", "train.max_nonfinite=3",
                                     "train.amp=off"))
    with pytest.raises(RuntimeError, match="non-finite steps in a row"):
        train(cfg, distributed.DistEnv(), torch.device("cpu"))
    # A failed run still explains its wall time, up to the failure it names.
    g = json.loads((tmp_path / "run" / "goodput.json").read_text())
    assert g["failed"].startswith("Diverged: 3 non-finite steps in a row")
    assert "up to the failure (Diverged" in g["covers"] and g["steps"] >= 3 and g["wall_s"] > 0


def test_fresh_run_refuses_to_overwrite_checkpoints(tiny_shards, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "default.yaml", tiny_overrides(tiny_shards, run, "train.epochs=1"))
    train(cfg, distributed.DistEnv(), torch.device("cpu"))
    cfg.train.resume = "never"
    with pytest.raises(UserError, match="would overwrite"):
        train(cfg, distributed.DistEnv(), torch.device("cpu"))


def test_stop_signal_to_one_rank_stops_all_at_the_same_step(tiny_shards, tmp_path):
    run = tmp_path / "run"
    args = ["--config", "configs/default.yaml",
            *tiny_overrides(tiny_shards, run, "train.epochs=30", "train.val_every=10", "checkpoint.every_steps=2")]
    # Inside a (pretend) SLURM job: the stopped run tries to requeue it and says why it could not.
    env = {**child_env(), "SLURM_JOB_ID": "999999"}
    proc = subprocess.Popen(torchrun_cmd(2, "seg_dist.train", *args), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run / "checkpoints" / "last.pt"
    try:
        deadline = time.monotonic() + 120
        while last_step(last) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = rank_pid(proc.pid, 1)
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGUSR1)  # only rank 1 hears it, as when SLURM signals one node first
        out, _ = proc.communicate(timeout=120)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, out[-3000:]
    # Rank 0 never got the signal; it stopped because rank 1 did.
    # (Mid-epoch, or at an epoch's end when the signal lands between the last step's check and that one.)
    assert "stop requested (signalled on another rank)" in out, out[-3000:]
    saved = checkpoint.load(last)
    stopped_at = saved["global_step"]
    assert stopped_at < 30 * 8 and stopped_at % 2 == 0  # at an agreed logging step, not the end
    # A stop on an epoch's last step is saved before that epoch's validation: (epoch, 8), not (epoch + 1, 0).
    assert saved["epoch"] * 8 + saved["epoch_step"] == stopped_at
    # A job script can tell a stop from a finish; the requeue attempt is one clear line, not a crash.
    assert "cannot requeue SLURM job 999999" in out, out[-3000:]
    marker = json.loads((run / "STOPPED").read_text())
    assert marker == {"global_step": stopped_at, "signal": "SIGUSR1", "requeued": False}
    assert "SLURM job 999999 (SLURM_RESTART_COUNT=0)" in out

    resumed = torchrun(2, "seg_dist.train", *args)
    assert f"(global step {stopped_at})" in resumed.stdout + resumed.stderr
    assert checkpoint.load(last)["global_step"] == 30 * 8
    assert not (run / "STOPPED").exists()  # finished now


def test_progress_is_plain_lines_when_not_on_a_terminal(tiny_shards, tmp_path):
    # A batch job's log is a file: no carriage-return bar updates, a line every 10% instead.
    out = subprocess.run([sys.executable, "-m", "seg_dist.train", "--config", "configs/default.yaml",
                          *tiny_overrides(tiny_shards, tmp_path / "run", "train.epochs=1", "logging.progress=true")],
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "\r" not in text
    lines = [line for line in text.splitlines() if "] epoch 1/1: " in line]
    assert 8 <= len(lines) <= 16, lines  # 16 steps: every 10% is every 2nd step
    assert lines[-1].split("] ")[1].startswith("epoch 1/1: 100% (16/16)")


def test_compiled_step_trains_like_the_eager_one(tiny_shards, tmp_path):
    """train.compile compiles the model and the loss; the optimisation is the same up to float reordering."""
    results = {}
    for compiled in (False, True):
        cfg = load_config(REPO / "configs" / "default.yaml",
                          tiny_overrides(tiny_shards, tmp_path / f"run{compiled}", "train.max_steps=3", "train.amp=off",
                                         f"train.compile={str(compiled).lower()}", "train.ema_decay=0"))
        results[compiled] = train(cfg, distributed.DistEnv(), torch.device("cpu"))
    assert results[True].global_step == 3
    (eager_epoch,), (compiled_epoch,) = results[False].history, results[True].history
    for key in ("train_loss", "val_loss", "miou"):
        assert compiled_epoch[key] == pytest.approx(eager_epoch[key], rel=1e-4), key
    eager = checkpoint.load(tmp_path / "runFalse" / "checkpoints" / "last.pt")["model"]
    compiled = checkpoint.load(tmp_path / "runTrue" / "checkpoints" / "last.pt")["model"]
    assert list(compiled) == list(eager)  # a plain state dict, no _orig_mod.
    # Adam's first steps move a weight by about lr whatever the gradient's size, so a gradient near 0 that
    # rounds differently can move it by up to 2 lr per step: bound the difference by that.
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=0, atol=2 * 3e-3 * 3, msg=key)


@pytest.mark.parametrize("batchnorm", [
    "train.sync_bn=on",  # statistics over the global batch of 8 on both
    "train.sync_bn=auto",  # the CPU default: each rank's 4 on two ranks, groups of 4 on one process
])
def test_two_ranks_take_one_process_steps(tiny_shards, tmp_path, batchnorm):
    # The same global batches on any number of ranks (the loader), the same BatchNorm statistics and the loss
    # over the global batch: 2 ranks x 4 must train as 1 process x 8 does, up to float rounding.
    exact = ("train.epochs=1", "train.amp=off", batchnorm, "loss.global_batch=true")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    two = spawn_train(2, tiny_overrides(tiny_shards, tmp_path / "two", *exact), tmp_path / "a")
    one = spawn_train(1, tiny_overrides(tiny_shards, tmp_path / "one", *exact, "train.batch_size=8"), tmp_path / "b")
    gap = max((two[0]["model"][k] - v).abs().max().item() for k, v in one[0]["model"].items() if v.is_floating_point())
    # AdamW turns rounding in tiny gradients into visible steps: 8 steps apart by 0.016 at most. With BatchNorm
    # over each rank's 4 on two ranks and over all 8 on one (train.bn_group=0) the gap is 0.36.
    assert gap < 0.05, gap
