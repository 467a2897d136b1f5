"""Stopping a run from outside: signals to torchrun, to its process group, to a single process, and a launcher
that dies without cleaning up. Every way ends with the ranks gone and a checkpoint at one agreed step."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO, child_env, descendants, kill_tree, last_step, tiny_overrides, torchrun_cmd

from seg_dist import checkpoint, distributed

# Each rank's last line about a stop (rank 0's says it wrote the checkpoint).
_STOPPED = re.compile(r"\[rank (\d)\] stopped at global step (\d+) \((.+?)\)")


def _alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie has exited: only its parent's wait is missing)."""
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def _train_until_first_checkpoint(cmd: list[str], run: Path,
                                  env: dict[str, str] | None = None) -> tuple[subprocess.Popen, list[int]]:
    """Start `cmd` in a process group of its own (as a shell starts a foreground job); return it once it
    has saved a mid-run checkpoint, with the pids of every process under it (ranks and loader processes)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 90
    while last_step(run / "checkpoints" / "last.pt") < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it was signalled"
    return proc, descendants(proc.pid)


def _args(tiny_shards: Path, run: Path, workers: int = 1) -> list[str]:
    # A loader process per rank, forked into the rank's process group: it must outlive what is sent there.
    return ["--config", "configs/default.yaml",
            *tiny_overrides(tiny_shards, run, "train.epochs=30", "train.val_every=10", "checkpoint.every_steps=2",
                            f"data.workers={workers}")]


def _assert_stopped_at_one_step(out: str, run: Path, ranks: int, name: str, steps_per_epoch: int = 8) -> int:
    """Every rank logged the stop at the same step, and last.pt and STOPPED are from that step."""
    stops = _STOPPED.findall(out)
    assert sorted(int(r) for r, _, _ in stops) == list(range(ranks)), out[-4000:]
    assert {seen for _, _, seen in stops} == {name}, stops
    steps = {int(step) for _, step, _ in stops}
    assert len(steps) == 1, stops
    step = steps.pop()
    assert 2 <= step < 30 * 8, "stopped at the start or the end, not mid-run"
    saved = checkpoint.load(run / "checkpoints" / "last.pt")  # readable, and the agreed step's
    assert saved["global_step"] == step and saved["epoch"] * steps_per_epoch + saved["epoch_step"] == step
    assert json.loads((run / "STOPPED").read_text()) == {"global_step": step, "signal": name, "requeued": False}
    assert "DataLoader worker" not in out, out[-4000:]  # the loader processes outlived the signal
    return step


def test_workers_whose_torchrun_is_killed_checkpoint_at_one_step_and_exit(tiny_shards, tmp_path):
    run = tmp_path / "run"
    proc, pids = _train_until_first_checkpoint(torchrun_cmd(2, "seg_dist.train", *_args(tiny_shards, run)), run)
    try:
        assert len(pids) == 4, pids  # 2 ranks, each with its loader process
        os.kill(proc.pid, signal.SIGKILL)  # the launcher dies without passing anything on
        proc.wait()
        # The ranks and their loader processes still hold the output pipe: it closes when the last one exits.
        out, _ = proc.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while _alive(pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pids), f"orphans: {_alive(pids)}\n{out[-3000:]}"
    finally:
        for pid in _alive(pids):
            os.kill(pid, signal.SIGKILL)
        kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    _assert_stopped_at_one_step(out, run, 2, distributed.PARENT_EXITED)
    assert f"stop requested ({distributed.PARENT_EXITED}: launcher pid {proc.pid})" in out


def _signal_torchrun(cmd: list[str], run: Path, sig: signal.Signals, group: bool = False,
                     env: dict[str, str] | None = None) -> tuple[int, str]:
    """Signal torchrun running `cmd` (or its process group) mid-run; its exit code and output, once its
    workers and their loader processes are all gone."""
    proc, pids = _train_until_first_checkpoint(cmd, run, env)
    try:
        (os.killpg if group else os.kill)(proc.pid, sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        kill_tree(proc)
    assert not _alive(pids), out[-3000:]
    return proc.returncode, out


def test_sigterm_to_torchrun_checkpoints_at_one_step_and_torchrun_exits_1(tiny_shards, tmp_path):
    run = tmp_path / "run"
    # With loader processes: torchrun's SIGTERM to each rank's process group would kill them mid-batch unless
    # the loader starts them with distributed.loader_worker_init.
    code, out = _signal_torchrun(torchrun_cmd(2, "seg_dist.train", *_args(tiny_shards, run)), run, signal.SIGTERM)
    _assert_stopped_at_one_step(out, run, 2, "SIGTERM")
    # torchrun passed SIGTERM on, the workers exited 0 within its grace period (no SIGKILL), and torchrun
    # still ends with its own SignalException: exit 1, as the README says.
    assert "Sending process" in out and "closing signal SIGTERM" in out
    assert "Unable to shutdown process" not in out, out[-3000:]
    assert code == 1 and "SignalException: Process" in out and "got signal: 15" in out, out[-3000:]


def test_ctrl_c_to_torchrun_checkpoints_at_one_step_and_torchrun_exits_1(tiny_shards, tmp_path):
    run = tmp_path / "run"
    # What Ctrl-C does: SIGINT to the terminal's foreground process group, which holds torchrun (its
    # workers have sessions of their own).
    code, out = _signal_torchrun(torchrun_cmd(2, "seg_dist.train", *_args(tiny_shards, run)), run, signal.SIGINT,
                                 group=True)
    _assert_stopped_at_one_step(out, run, 2, "SIGINT")
    assert "closing signal SIGINT" in out and "Unable to shutdown process" not in out, out[-3000:]
    assert code == 1 and "got signal: 2" in out, out[-3000:]
    assert "KeyboardInterrupt" not in out


def test_ctrl_c_to_a_single_process_stops_it_with_a_checkpoint_and_exit_0(tiny_shards, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "seg_dist.train", *_args(tiny_shards, run)]
    proc, pids = _train_until_first_checkpoint(cmd, run)
    try:
        assert len(pids) == 1, pids  # its loader process, in the same process group: Ctrl-C reaches it too
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, out[-3000:]
    _assert_stopped_at_one_step(out, run, 1, "SIGINT")
    assert not _alive(pids)


# A process whose parent is `sys.argv[1]` seconds of sleep: it watches its parent and reports when it hears
# of its death. The parent is a shell that starts it and then sleeps (or exits at once).
_WATCHER = r"""
import os, sys, time
from seg_dist import distributed
stop = distributed.StopRequest()
stop.install(parent=int(sys.argv[1]))
print("watching", flush=True)
deadline = time.monotonic() + 20
while not stop.requested and time.monotonic() < deadline:
    time.sleep(0.05)
print(stop.describe() if stop.requested else "not requested", flush=True)
"""


def test_a_parent_that_died_before_or_after_the_watch_began_requests_a_stop(tmp_path):
    watcher = shlex.join([sys.executable, "-c", _WATCHER])
    for parent_sleeps in ("0", "8"):
        # `$$`: the shell's own pid, the watcher's parent. Killed at once, it is gone before the watcher has
        # imported torch; after 8 s, the watcher is watching.
        script = f"{watcher} $$ > {shlex.quote(str(tmp_path / 'out'))} & sleep {parent_sleeps}; kill -KILL $$"
        shell = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=child_env())
        shell.wait(timeout=30)
        deadline = time.monotonic() + 30
        while "\n" not in (tmp_path / "out").read_text().partition("watching\n")[2] and time.monotonic() < deadline:
            time.sleep(0.1)
        text = (tmp_path / "out").read_text()
        assert f"{distributed.PARENT_EXITED}: launcher pid {shell.pid}" in text, (parent_sleeps, text)


def _cadence_rank(denv: distributed.DistEnv, device, out: str) -> None:
    # Steps of 10 ms on rank 0 and 30 ms on rank 1, log steps too far apart to matter, a check every 0.15 s.
    stop = distributed.StopRequest(check_seconds=0.15)
    checks, stopped = [], None
    for step in range(1, 200):
        time.sleep(0.01 if denv.rank == 0 else 0.03)
        if denv.rank == 0 and step == 40:
            stop.signal = signal.SIGUSR1  # as if signalled, on one rank only
        if stop.due(step, log_every=1000):
            checks.append(step)
            if stop.agreed(device, step):
                stopped = step
                break
    Path(f"{out}.{denv.rank}").write_text(json.dumps({"checks": checks, "stopped": stopped,
                                                      "seen": stop.signals_seen}))


def test_stop_checks_come_every_few_seconds_and_at_the_same_steps_on_every_rank(tmp_path):
    distributed.spawn_local_group(2, _cadence_rank, (str(tmp_path / "rank"),), device="cpu")
    ranks = [json.loads((tmp_path / f"rank.{r}").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1], ranks  # the same check steps, the same stop step
    checks, stopped = ranks[0]["checks"], ranks[0]["stopped"]
    assert ranks[0]["seen"] == ["SIGUSR1"]
    # The slowest rank's 30 ms steps make about 5 steps a check, not the log steps' 1000 (nor every step);
    # the bounds leave room for a loaded machine, where sleeps run long.
    gaps = [b - a for a, b in itertools.pairwise(checks[3:])]
    assert gaps and all(2 <= g <= 15 for g in gaps), checks
    assert 40 <= stopped <= 40 + max(gaps), checks


def test_a_stop_comes_within_torchruns_grace_period_however_far_apart_log_steps_are(tiny_shards, tmp_path):
    # Log steps 1000 steps apart in one long epoch: only the ranks' own cadence (StopRequest.due, a check
    # every ~2 s) stops them before torchrun's SIGKILL, here 15 s after its SIGTERM.
    run = tmp_path / "run"
    args = ["--config", "configs/default.yaml",
            *tiny_overrides(tiny_shards, run, "train.epochs=1", "train.steps_per_epoch=2000", "logging.log_every=1000",
                            "checkpoint.every_steps=2")]
    env = {**child_env(), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "15"}
    code, out = _signal_torchrun(torchrun_cmd(2, "seg_dist.train", *args), run, signal.SIGTERM, env=env)
    assert "Unable to shutdown process" not in out, out[-3000:]
    step = _assert_stopped_at_one_step(out, run, 2, "SIGTERM", steps_per_epoch=2000)
    assert step % 1000 != 0 and code == 1
