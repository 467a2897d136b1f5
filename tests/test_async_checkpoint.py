"""Checkpoints written in the background: real processes, real SIGKILLs, a real full file system."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env, tiny_overrides

from seg_dist import atomic, checkpoint, distributed
from seg_dist.config import load_config
from seg_dist.trainer import finish_checkpoints, save_checkpoint, setup_run, train

CONFIG = REPO / "configs" / "default.yaml"
# 64 training samples in batches of 8: 8 steps an epoch, so the plain progress lines name every step.
EVERY_STEP = ("train.batch_size=8", "logging.progress=true")
PROGRESS = re.compile(r"epoch (\d+)/\d+: +\d+% \((\d+)/8\)")


def train_cmd(shards: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "seg_dist.train", "--config", str(CONFIG),
            *tiny_overrides(shards, run, *EVERY_STEP, *extra)]


def logged_step(log: Path) -> int:
    """The last global step the progress lines name (a line per step), 0 before the first."""
    steps = [(int(e) - 1) * 8 + int(n) for e, n in PROGRESS.findall(log.read_text(errors="replace"))]
    return max(steps, default=0)


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "checkpoint-writer"]


def test_kill_9_at_random_moments_leaves_a_loadable_last_pt_that_resumes(tiny_shards, tmp_path):
    # Width 32: a 31 MB state (model, weight average, both moments) written at every step, so the writer is
    # busy most of the time and the kills land during serialisation, write, fsync, rename and copies.
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    cmd = train_cmd(tiny_shards, run, "model.width=32", "train.epochs=40", "train.val_every=100",
                    "checkpoint.every_steps=1", "checkpoint.keep_last=2")
    rng = random.Random(0)
    saved, kills = 0, 0
    deadline = time.monotonic() + 240
    while kills < 5:
        assert time.monotonic() < deadline, f"only {kills} kills in 240 s"
        log = tmp_path / f"log{kills}"
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            while logged_step(log) < saved + 2 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0, 0.6))  # anywhere in the next steps and their writes
            assert proc.poll() is None, f"exited {proc.returncode} before the kill:\n{log.read_text()[-3000:]}"
        finally:
            proc.kill()
            proc.wait()
        kills += 1
        step = checkpoint.load(ckpts / checkpoint.LAST, require=checkpoint.RESUME_KEYS)["global_step"]
        assert saved <= step <= logged_step(log), (saved, step, logged_step(log))
        assert len(atomic.temporaries(ckpts)) <= 2  # at most the write and the copy that were cut short
        for snap in ckpts.glob("epoch*-step*.pt"):  # the snapshots the writer had finished load too
            checkpoint.load(snap)
        print(f"kill {kills}: logged step {logged_step(log)}, last.pt step {step}")
        saved = step
    assert saved < 40 * 8, "the run finished before it was killed"

    # The same command resumes from the last kill's checkpoint and finishes: 2 more epochs are enough here.
    out = subprocess.run([*cmd, "train.epochs=" + str(saved // 8 + 2)], cwd=REPO, env=child_env(),
                         capture_output=True, text=True, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert f"(global step {saved})" in text, text[-3000:]
    final = checkpoint.load(ckpts / checkpoint.LAST)
    assert final["global_step"] == (saved // 8 + 2) * 8
    assert atomic.temporaries(ckpts) == []  # the resumed run removed what the kills left


def test_end_of_run_waits_for_the_writer(tiny_shards, tmp_path):
    cfg = load_config(CONFIG, tiny_overrides(tiny_shards, tmp_path / "run", "model.width=32", "train.epochs=1",
                                             "train.batch_size=8", "checkpoint.every_steps=1"))
    result = train(cfg, distributed.DistEnv(), torch.device("cpu"))
    assert writer_threads() == []  # returned with nothing in flight
    last = checkpoint.load(tmp_path / "run" / "checkpoints" / checkpoint.LAST)
    assert last["global_step"] == result.global_step == 8
    trained = last.get("trained_model", last["model"])  # with a weight average, "model" is the average
    for k, v in result.model.state_dict().items():
        assert torch.equal(trained[k], v), k  # the final weights, not an earlier step's
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())[-1] == "last.pt"
    assert atomic.temporaries(tmp_path / "run" / "checkpoints") == []


def test_stop_request_waits_for_the_writer_before_exit_and_stopped(tiny_shards, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "log"
    cmd = train_cmd(tiny_shards, run, "model.width=32", "train.epochs=40", "logging.log_every=1")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while logged_step(log) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
        proc.wait()
    stopped = json.loads((run / "STOPPED").read_text())
    assert checkpoint.load(run / "checkpoints" / checkpoint.LAST)["global_step"] == stopped["global_step"] >= 3
    assert atomic.temporaries(run / "checkpoints") == []


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MB tmpfs: one tiny checkpoint (2 MB: width 8, its average and moments) fits, a second beside it
    (written under a temporary name before the rename) does not."""
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.parametrize("every_steps, raised_at", [(1, "the next save"), (4, "the wait at the end")])
def test_full_disk_in_the_writer_is_one_line_in_the_main_thread(tiny_shards, tmp_path, tiny_disk, every_steps,
                                                                 raised_at):
    # keep_last=0: a snapshot is a hard link to last.pt and would keep the old file's space taken.
    # every_steps=1: step 2's write fails, raised by step 3's save. every_steps=4 in one 8-step epoch: the
    # end-of-epoch write at step 8 fails, raised by the wait as the run ends.
    out = subprocess.run(train_cmd(tiny_shards, tmp_path / "run", "train.epochs=1", "checkpoint.keep_last=0",
                                   f"checkpoint.every_steps={every_steps}"),
                         cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if "no space left on the device" in line]
    assert len(errors) == 1 and "last.pt" in errors[0] and "is intact" in errors[0], text[-3000:]
    assert checkpoint.load(tiny_disk / checkpoint.LAST)["global_step"] == every_steps  # the first write's
    assert atomic.temporaries(tiny_disk) == []


def test_save_returns_before_the_write_and_training_may_mutate_the_weights(tiny_shards, tmp_path):
    # Width 48: a 69 MB state. The save costs the host copy; the writer serialises, writes and fsyncs it.
    cfg = load_config(CONFIG, tiny_overrides(tiny_shards, tmp_path / "run", "model.width=48"))
    run, state = setup_run(cfg, distributed.DistEnv(), torch.device("cpu"))
    try:
        expected = {k: v.detach().clone() for k, v in run.nets.bare.named_parameters()}
        save_checkpoint(run, state)  # warm-up: the first save also looks for stale temporaries
        finish_checkpoints(run)
        ratios = []
        for step in (1, 2, 3):
            state.global_step = step
            started = time.perf_counter()
            save_checkpoint(run, state)
            saved_in = time.perf_counter() - started
            in_flight = run.writer.busy
            at_save = {k: v.clone() for k, v in expected.items()}
            with torch.no_grad():  # what the next optimiser steps would do to the live weights
                for p in run.nets.bare.parameters():
                    p.add_(1.0)
            for v in expected.values():
                v.add_(1.0)
            finish_checkpoints(run)
            ratios.append(run.writer.last_write_seconds / saved_in)
            assert in_flight, "the write had already finished when save_checkpoint returned"
            written = checkpoint.load(run.ckpt_dir / checkpoint.LAST)
            assert written["global_step"] == step
            weights = written.get("trained_model", written["model"])
            for k, v in at_save.items():
                assert torch.equal(weights[k], v), k  # as at the save, not as mutated after it
        print(f"writer time / save_checkpoint time: {[f'{r:.1f}' for r in ratios]}")
        assert sorted(ratios)[1] > 3, ratios  # the median: one save may meet a busy disk or CPU
    finally:
        if run.lock is not None:
            run.lock.release()
