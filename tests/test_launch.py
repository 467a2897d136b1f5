"""Launching at scale: torchrun restarting dead workers, hosts meeting by rendezvous, collective timeouts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch.distributed as dist
from helpers import (
    REPO,
    child_env,
    free_port,
    kill_tree,
    last_step,
    rank_pid,
    tiny_overrides,
    torchrun_cmd,
)

from seg_dist import checkpoint

# A worker that joins the process group through distributed.setup, all-reduces its rank and leaves without
# cleaning up (like a killed process): prints "rank R gen G sum S".
_WORKER = r"""
import os, sys, time, torch
from seg_dist import distributed
time.sleep(float(sys.argv[1]))
with distributed.setup(timeout_minutes=float(sys.argv[2])) as (denv, _):
    t = distributed.all_reduce_(torch.tensor([float(denv.rank)]))
    print(f"rank {denv.rank} gen {os.environ['GEN']} sum {t.item():g}", flush=True)
    os._exit(0)
"""


def _rank_env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    return {**child_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **extra}


def test_restarted_workers_do_not_read_the_dead_generations_keys():
    # torchrun's agent keeps one store for the whole job and gives each worker generation its address. Keys a
    # generation wrote outlive it: with env://, a restarted rank that comes up before its peers reads the dead
    # peers' gloo addresses and fails with "Connection refused" (torch 2.13; pytorch/pytorch#135712). Here the
    # test is the agent: generation 1's rank 0 comes up 3 s late, as on a loaded machine.
    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, multi_tenant=True, wait_for_workers=False)
    for gen, delays in ((0, (0, 0)), (1, (3, 0))):
        procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(delay), "1"], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=_rank_env(rank, 2, agent.port, GEN=str(gen), TORCHELASTIC_USE_AGENT_STORE="True",
                                                TORCHELASTIC_RESTART_COUNT=str(gen)))
                 for rank, delay in enumerate(delays)]
        try:
            outs = [p.communicate(timeout=90)[0] for p in procs]
        finally:
            for p in procs:
                p.kill()
        for rank, (p, out) in enumerate(zip(procs, outs, strict=True)):
            assert p.returncode == 0 and f"rank {rank} gen {gen} sum 1" in out, out[-2000:]


def test_a_rank_whose_peer_stopped_answering_fails_after_the_timeout():
    # A peer that is alive but silent (stopped, wedged, cut off) sends no reset: only the process-group timeout
    # (setup's timeout_minutes, train.dist_timeout_minutes) ends the wait in the collective.
    code = r"""
import os, signal, time, torch
from seg_dist import distributed
with distributed.setup(timeout_minutes=0.05) as (denv, _):
    distributed.barrier()
    if denv.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        distributed.all_reduce_(torch.ones(1))
    except RuntimeError as e:
        print(f"raised after {time.monotonic() - t0:.1f} s: {e}", flush=True)
"""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_rank_env(rank, 2, port), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(2)]
    try:
        out = procs[0].communicate(timeout=60)[0]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    m = re.search(r"raised after ([\d.]+) s: .*(timed out|timeout)", out, re.IGNORECASE)
    assert m, out[-2000:]
    assert 2.5 <= float(m.group(1)) < 20  # 3 s, not forever


@contextlib.contextmanager
def _busy_machine():
    """A process spinning on a core for the duration: restarts then come up slowly and out of order."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


def test_a_killed_worker_is_restarted_and_the_run_finishes_at_the_full_step_count(tiny_shards, tmp_path):
    run = tmp_path / "run"
    epochs, steps_per_epoch = 6, 64 // (2 * 4)
    args = ["--config", "configs/default.yaml",
            *tiny_overrides(tiny_shards, run, f"train.epochs={epochs}", "train.val_every=3",
                            "checkpoint.every_steps=2")]
    cmd = torchrun_cmd(2, "seg_dist.train", *args)
    cmd.insert(cmd.index("--standalone") + 1, "--max-restarts=1")
    last = run / "checkpoints" / "last.pt"
    with _busy_machine():
        proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        try:
            deadline = time.monotonic() + 120
            while last_step(last) < 6 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            pid = rank_pid(proc.pid, 1)
            assert pid is not None, "rank 1 not found"
            killed_after = last_step(last)
            os.kill(pid, signal.SIGKILL)  # no chance to clean up
            out, _ = proc.communicate(timeout=240)
        finally:
            kill_tree(proc)
    assert proc.returncode == 0, out[-4000:]
    total = epochs * steps_per_epoch
    assert 6 <= killed_after < total, "the run finished before it could be killed"
    # The restarted group resumed from a mid-run checkpoint (once), not from the start or the end.
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at epoch \d+, step \d+ \(global step (\d+)\)", out)]
    assert len(resumed) == 1 and killed_after <= resumed[0] < total, out[-4000:]
    final = checkpoint.load(last)
    assert final["global_step"] == total and final["epoch"] == epochs  # same as an uninterrupted run


def test_two_hosts_simulated_on_one_machine_train_to_the_end_and_agree(tiny_shards, tmp_path):
    # Two launch/multinode.sh, one process each, meeting by c10d rendezvous on 127.0.0.1: one world of 2.
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, run, "train.epochs=2", "train.amp=off")
    env = {**child_env(), "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "NPROC_PER_NODE": "1", "RDZV_ID": uuid.uuid4().hex[:8], "MAX_RESTARTS": "0", "LOCAL_ADDR": "127.0.0.1",
           "PYTHON": sys.executable}
    hosts = [subprocess.Popen(["bash", "launch/multinode.sh", "configs/default.yaml", *overrides], cwd=REPO,
                              env={**env, "NODE_RANK": str(node)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for node in (1, 0)]  # host 1 first: it waits for host 0's rendezvous
    try:
        outs = [h.communicate(timeout=240)[0] for h in hosts]
    finally:
        for h in hosts:
            kill_tree(h)
    for h, out in zip(hosts, outs, strict=True):
        assert h.returncode == 0, out[-4000:]
        assert "2 host(s) x 1 process(es)" in out
    log = "".join(outs)
    assert " 2 ranks on cpu" in log  # one world of 2, not two worlds of 1
    assert checkpoint.load(run / "checkpoints" / "last.pt")["global_step"] == 2 * 64 // (2 * 4)

    # The hosts validated half of the split each and agreed on one all-reduced result: exactly what one
    # process computes from the final weights over the whole split.
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and lines[-1]["samples"] == 16
    report = tmp_path / "eval.json"
    subprocess.run([sys.executable, "-m", "seg_dist.evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"),
                    "--json", str(report), "train.amp=off"], cwd=REPO, env=child_env(), check=True, capture_output=True)
    single = json.loads(report.read_text())
    assert single["samples"] == 16
    assert single["miou"] == lines[-1]["miou"] and single["pixel_accuracy"] == lines[-1]["pixel_accuracy"]
    assert single["loss"] == pytest.approx(lines[-1]["val_loss"], rel=1e-6)


def test_multinode_script_refuses_a_bad_node_rank():
    out = subprocess.run(["bash", "launch/multinode.sh", "configs/default.yaml"], cwd=REPO, capture_output=True,
                         text=True, env={**child_env(), "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h0"})
    assert out.returncode == 2 and "NODE_RANK=2 must be in 0..1" in out.stderr
    out = subprocess.run(["bash", "launch/multinode.sh"], cwd=REPO, capture_output=True, text=True, env=child_env())
    assert out.returncode == 2 and "NNODES=2 NODE_RANK=0 MASTER_ADDR=host0" in out.stderr
