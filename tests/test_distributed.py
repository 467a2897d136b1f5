import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import as_rank, free_port

from seg_dist import distributed as D
from seg_dist.errors import UserError


def test_single_process_when_no_launcher():
    denv = D.read_env({})
    assert (denv.rank, denv.world_size, denv.launcher, denv.distributed) == (0, 1, "none", False)


def test_torchrun_env():
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
           "TORCHELASTIC_RESTART_COUNT": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    denv = D.read_env(env)
    # torchrun's variables win over SLURM's when torchrun runs inside a SLURM allocation.
    assert (denv.rank, denv.local_rank, denv.world_size, denv.launcher) == (5, 1, 8, "torchrun")
    assert denv.restart_count == 2


def test_slurm_srun_env():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2(x2)",
           "SLURM_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123", "SLURM_RESTART_COUNT": "1"}
    denv = D.read_env(env)
    assert (denv.rank, denv.local_rank, denv.world_size, denv.local_world_size) == (3, 1, 4, 2)
    assert denv.launcher == "slurm" and denv.restart_count == 1
    rdv = D.rendezvous_env(denv, env)
    assert rdv == {"MASTER_ADDR": "gpu007", "MASTER_PORT": str(15000 + 123)}
    # A single SLURM task (e.g. the batch shell running torchrun itself) is not a process group.
    assert D.read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).world_size == 1


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node1", "node1"), ("gpu[003-005,010]", "gpu003"), ("a[1,4],b2", "a1"), ("x-1,y", "x-1")],
)
def test_first_host(nodelist, host):
    assert D.first_host(nodelist) == host


def test_device_is_cpu_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert D.pick_device(0).type == "cpu" and D.backend_for(D.pick_device(0)) == "gloo"


def _worker(rank: int, port: int, out: str) -> None:
    as_rank(rank, 2, port)
    with D.setup() as (_, device):
        assert D.is_initialized() and D.world_size() == 2 and D.rank() == rank
        t = D.all_reduce_(torch.tensor([rank + 1.0]))
        agreed = D.any_rank(rank == 1)
        obj = D.broadcast_object({"from": rank})
        gathered = D.all_gather_objects(rank * 10)
        with open(f"{out}.{rank}", "w") as f:
            f.write(f"{t.item()} {agreed} {obj['from']} {gathered} {device.type}")
    assert not D.is_initialized()


def test_two_real_processes(tmp_path):
    out = str(tmp_path / "r")
    mp.spawn(_worker, args=(free_port(), out), nprocs=2)
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            assert f.read() == "3.0 True 0 [0, 10] cpu"


def test_cpu_share_splits_an_inherited_set_and_respects_a_binding():
    assert D.cpu_share([0, 1, 2, 3], [0, 1, 2, 3], 0, 2) == [0, 1]
    assert D.cpu_share([3, 2, 1, 0], [0, 1, 2, 3], 1, 2) == [2, 3]
    assert [D.cpu_share(range(5), range(5), r, 2) for r in (0, 1)] == [[0, 1], [2, 3, 4]]  # every core used
    assert D.cpu_share([4, 5], [0, 1, 2, 3, 4, 5, 6, 7], 1, 4) is None  # a launcher bound this rank already
    assert D.cpu_share([0, 1], [0, 1], 0, 4) is None  # fewer cores than ranks: nothing to split
    assert D.cpu_share([0, 1], [0, 1], 0, 1) is None  # one rank keeps everything it has
    assert D.cpu_share([0, 1], None, 0, 2) is None  # the parent's set is unknown: do not guess


def _pinning_worker(rank: int, port: int, out: str, bind_first: bool, pin: bool) -> None:
    as_rank(rank, 2, port)
    given = sorted(os.sched_getaffinity(0))
    if bind_first:  # as SLURM --cpu-bind or taskset would, before our code runs
        given = given[rank % len(given):][:1]
        os.sched_setaffinity(0, given)
    with D.setup() as (denv, device):
        D.share_cpu_threads(denv, device, pin=pin)
        Path(f"{out}.{rank}").write_text(json.dumps([given, sorted(os.sched_getaffinity(0)), torch.get_num_threads()]))


@pytest.mark.parametrize("bind_first,pin", [(False, True), (True, True), (False, False)])
def test_cpu_ranks_keep_their_own_cores_unless_bound(tmp_path, bind_first, pin):
    """Two real ranks on this machine's cores: each gets its own half when started alike, and a binding
    made before our code runs (or train.pin_cpu_ranks=false) is left as it was."""
    out = str(tmp_path / "r")
    mp.spawn(_pinning_worker, args=(free_port(), out, bind_first, pin), nprocs=2)
    (given0, own0, threads0), (given1, own1, threads1) = (json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1))
    cores = sorted(os.sched_getaffinity(0))
    if bind_first or not pin or len(cores) < 2:
        assert (own0, own1) == (given0, given1)
        assert threads0 == threads1 == max(1, len(given0) // 2)
    else:
        assert not set(own0) & set(own1) and sorted(own0 + own1) == cores
        assert (threads0, threads1) == (len(own0), len(own1))


class _Boom(Exception):
    """Raised only by the body below, so that nothing else (a rendezvous that never joined) passes for it."""


def _failing_worker(rank: int, port: int) -> None:
    as_rank(rank, 2, port)
    joined = False
    with pytest.raises(_Boom), D.setup():
        joined = D.is_initialized() and D.world_size() == 2
        raise _Boom
    # The group was joined, and torn down on the way out of the failing body.
    assert joined
    assert not D.is_initialized()


def test_group_destroyed_on_error():
    mp.spawn(_failing_worker, args=(free_port(),), nprocs=2)


def test_describe_names_the_launcher_and_slurm_restarts():
    env = {"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RESTART_COUNT": "1", "SLURM_JOB_ID": "42",
           "SLURM_RESTART_COUNT": "3"}
    assert D.read_env(env).describe() == "torchrun (restart 1), SLURM job 42 (SLURM_RESTART_COUNT=3)"
    assert D.read_env({}).describe() == "none"


def test_requeue_outside_slurm_or_without_scontrol_is_a_clear_line(monkeypatch, tmp_path):
    assert D.requeue_slurm_job({}) == (False, "not a SLURM job: nothing to requeue")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here
    done, message = D.requeue_slurm_job({"SLURM_JOB_ID": "77"})
    assert not done and message.startswith("cannot requeue SLURM job 77: scontrol is not on PATH")


def test_topology_checks_fail_fast_with_one_line():
    slurm = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "3", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_NODELIST": "n[1-2]"}
    with pytest.raises(UserError, match=r"SLURM_NTASKS=3 but 2 node\(s\) x --ntasks-per-node=2"):
        D.check_topology(D.read_env(slurm), slurm)
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "no-such-host.invalid"}
    with pytest.raises(UserError, match=r"MASTER_ADDR=no-such-host\.invalid does not resolve"):
        D.check_topology(D.read_env(env), env)
    env["MASTER_ADDR"] = "127.0.0.1"
    D.check_topology(D.read_env(env), env)  # a sound launch passes
    bad_local = {**env, "LOCAL_RANK": "2"}
    with pytest.raises(UserError, match="local rank 2 is outside the 2 processes"):
        D.check_topology(D.read_env(bad_local), bad_local)


def test_only_distributed_touches_process_groups():
    package = Path(D.__file__).parent
    others = [p for p in package.rglob("*.py") if p.name != "distributed.py"]
    assert [str(p.relative_to(package)) for p in others if "torch.distributed" in p.read_text()] == []


def test_single_process_group_is_a_real_group_left_on_exit():
    with D.single_process_group(torch.device("cpu")) as denv:
        assert D.is_initialized() and D.world_size() == 1 and (denv.world_size, denv.launcher) == (1, "local")
        assert D.all_reduce_(torch.ones(2)).tolist() == [1.0, 1.0]
        with pytest.raises(RuntimeError, match="already"), D.single_process_group(torch.device("cpu")):
            pass
    assert not D.is_initialized()


def _write_then_fail_on_rank_1(denv: D.DistEnv, device: torch.device, out: str) -> None:
    total = D.all_reduce_(torch.tensor([denv.rank + 1.0]))  # 1 + 2 only if both joined one group
    Path(f"{out}.{denv.rank}").write_text(f"{denv.local_rank} {denv.world_size} {total.item()} {device}")
    D.barrier()  # both have written before rank 1 fails
    if denv.rank == 1:
        raise _Boom("rank 1 gives up")


def test_spawn_local_group_runs_the_ranks_in_one_group_and_names_a_failing_rank(tmp_path):
    from seg_dist.errors import RunFailed

    out = str(tmp_path / "rank")
    with pytest.raises(RunFailed, match=r"rank 1 of 2 local processes failed: .*rank 1 gives up"):
        D.spawn_local_group(2, _write_then_fail_on_rank_1, (out,), device="cpu")
    assert [Path(f"{out}.{r}").read_text() for r in range(2)] == [f"{r} 2 3.0 cpu" for r in range(2)]
