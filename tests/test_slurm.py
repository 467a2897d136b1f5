"""launch/slurm.sbatch on a real SLURM cluster: a run to completion, and preemption with requeue and resume.

Needs a cluster that answers (CI starts a single-node one with `.ci/slurm.sh up`); otherwise every test here
skips with the reason. Jobs run 2 CPU processes (NPROC_PER_NODE=2) on the tiny dataset. No accounting:
job state comes from `scontrol show job` (the cluster keeps finished jobs visible for a while).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, tiny_overrides

pytestmark = pytest.mark.slurm

READY_STATES = ("idle", "mix", "alloc", "completing")
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
STEPS_PER_EPOCH = 8  # 64 train samples, 2 ranks x batch 4: what the manifest gives, set explicitly


def cluster_problem() -> str | None:
    """Why no job can run here, or None."""
    hint = os.environ.get("SEG_DIST_SLURM_DOWN")  # set by .ci/run when `.ci/slurm.sh up` failed
    prefix = f"{hint}; " if hint else ""
    for tool in ("sinfo", "sbatch", "scontrol", "scancel"):
        if shutil.which(tool) is None:
            return f"{prefix}{tool} is not on PATH (start a cluster with `.ci/slurm.sh up`)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{prefix}sinfo -h failed: {e}"
    if out.returncode != 0:
        return f"{prefix}sinfo -h failed: {(out.stderr or out.stdout).strip()[-300:]}"
    nodes = [line.split() for line in out.stdout.splitlines() if line.strip()]
    if not any(len(n) > 1 and n[1].lower().startswith(READY_STATES) for n in nodes):
        return f"{prefix}no SLURM node is idle/mixed/allocated: {out.stdout.strip() or 'no nodes'}"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    problem = cluster_problem()
    if problem:
        pytest.skip(f"no SLURM cluster: {problem}")


def job_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this python and torchrun
    env["NPROC_PER_NODE"] = "2"
    env["OMP_NUM_THREADS"] = "1"
    return env


class Job:
    """One sbatch job of launch/slurm.sbatch; cancelled at the end of the test if it still runs."""

    def __init__(self, tmp: Path, overrides: list[str]) -> None:
        self.log = tmp / "job.log"
        cmd = ["sbatch", "--parsable", "--export=ALL", "--job-name=seg_dist_test", f"--output={self.log}",
               "launch/slurm.sbatch", "configs/default.yaml", *overrides]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=REPO, env=job_env())
        assert out.returncode == 0, f"{' '.join(cmd)}: {out.stderr}"
        self.id = out.stdout.strip().split(";")[0]

    def info(self) -> dict[str, str]:
        out = subprocess.run(["scontrol", "-o", "show", "job", self.id], capture_output=True, text=True, timeout=15)
        assert out.returncode == 0, f"scontrol show job {self.id}: {out.stderr.strip()}"
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self) -> str:
        return f"\n--- job {self.id} log ---\n{self.text()[-4000:]}"

    def wait_end(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.info()
            if info.get("JobState") in ENDED:
                return info
            time.sleep(1)
        state = self.info().get("JobState")
        raise AssertionError(f"job {self.id} did not end in {timeout:.0f} s: {state}{self.tail()}")

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], capture_output=True, timeout=30)


@pytest.fixture
def submit(slurm: None):
    jobs: list[Job] = []

    def _submit(tmp: Path, overrides: list[str]) -> Job:
        jobs.append(Job(tmp, overrides))
        return jobs[-1]

    yield _submit
    for job in jobs:
        job.cancel()


def global_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def validated_epochs(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["epoch"] for line in lines if line.strip()]


def test_sbatch_runs_to_completion(submit, tiny_shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job = submit(tmp_path, tiny_overrides(tiny_shards, run_dir, "train.epochs=2"))
    info = job.wait_end(timeout=180)
    assert info["JobState"] == "COMPLETED", f"{info['JobState']} (exit {info.get('ExitCode')}){job.tail()}"
    assert info["Restarts"] == "0"
    log = job.text()
    assert "SLURM_RESTART_COUNT=0" in log and "finished" in log, job.tail()
    assert global_step(run_dir / "checkpoints" / "last.pt") == 2 * STEPS_PER_EPOCH
    assert list((run_dir / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event files"
    assert validated_epochs(run_dir) == [1, 2]


# How SIGUSR1 reaches the job: the batch shell only (as --signal=B:USR1@T does), the job steps only (as
# --signal=USR1@T does), or both. Whichever way, all ranks stop with a checkpoint and the job is requeued.
DELIVERIES = {"batch-shell": ["--batch"], "steps": [], "both": ["--full"]}


@pytest.mark.parametrize("delivery", list(DELIVERIES))
def test_preemption_requeues_and_resumes(submit, tiny_shards: Path, tmp_path: Path, delivery: str) -> None:
    epochs = 8
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    job = submit(tmp_path, tiny_overrides(
        tiny_shards, run_dir, f"train.epochs={epochs}", f"train.steps_per_epoch={STEPS_PER_EPOCH}",
        "checkpoint.every_steps=2", "logging.log_every=2"))

    # Signal once the run is under way: a checkpoint at step >= 4 exists.
    deadline = time.monotonic() + 120
    while not (last.exists() and global_step(last) >= 4):
        state = job.info().get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job.id} {state} before the signal{job.tail()}"
        assert time.monotonic() < deadline, f"no checkpoint at step >= 4 after 120 s{job.tail()}"
        time.sleep(0.3)
    sig = subprocess.run(["scancel", *DELIVERIES[delivery], "--signal=USR1", job.id],
                         capture_output=True, text=True, timeout=30)
    assert sig.returncode == 0, sig.stderr

    info = job.wait_end(timeout=300)
    log = job.text()
    assert info["JobState"] == "COMPLETED", f"{info['JobState']} (exit {info.get('ExitCode')}){job.tail()}"
    assert info["Restarts"] == "1", f"Restarts={info['Restarts']}: not requeued once{job.tail()}"
    assert "stop requested" in log, job.tail()
    stopped = re.findall(r"stopped at step (\d+) \(signal (\S+)\), requeued: (\w+)", log)
    assert len(stopped) == 1 and stopped[0][2] == "yes", f"batch script's stop line: {stopped}{job.tail()}"
    step = int(stopped[0][0])
    assert 4 <= step < epochs * STEPS_PER_EPOCH
    assert "SLURM_RESTART_COUNT=1" in log, job.tail()
    resumed = re.findall(r"resumed from \S+ at epoch \d+, step \d+ \(global step (\d+)\)", log)
    assert resumed == [str(step)], f"resumed at {resumed}, stopped at {step}{job.tail()}"
    assert "] finished" in log.split("SLURM_RESTART_COUNT=1", 1)[1], job.tail()

    assert global_step(last) == epochs * STEPS_PER_EPOCH
    assert validated_epochs(run_dir) == list(range(1, epochs + 1)), "every epoch validated exactly once"
    assert not (run_dir / "STOPPED").exists()
