"""Ranks, devices and process groups: the only module that reads launcher environment variables.

Understands torchrun (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE), tasks started directly by
SLURM's `srun` (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, with MASTER_ADDR taken from the first
host of SLURM_NODELIST), and neither (a single process).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import RunFailed, UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    launcher: str = "none"  # torchrun | slurm | local (spawn_local_group, single_process_group) | none
    restart_count: int = 0  # torchrun --max-restarts or a SLURM requeue
    job_id: str = ""
    slurm_job_id: str = ""  # set inside any SLURM allocation, whatever started the processes
    slurm_restart_count: int = 0  # how often SLURM requeued the job

    def describe(self) -> str:
        """`torchrun (restart 1), SLURM job 42 (SLURM_RESTART_COUNT=1)`: how this process was started."""
        text = self.launcher + (f" (restart {self.restart_count})" if self.launcher == "torchrun" else "")
        if self.slurm_job_id:
            text += f", SLURM job {self.slurm_job_id} (SLURM_RESTART_COUNT={self.slurm_restart_count})"
        return text

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# What ends a run early with a checkpoint: a scheduler's warning before preemption (SIGUSR1, SIGTERM), torchrun
# passing on its own SIGTERM, SIGINT (Ctrl-C) or SIGHUP to its workers, Ctrl-C or a closed terminal.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What the kernel sends when this process's launcher exits (prctl PR_SET_PDEATHSIG): a signal nobody else
# sends, so that its handler can check that the parent really is gone. The kernel sends it when the *thread*
# that started this process exits, which for a launcher that starts processes from short-lived threads is
# not the launcher's end. None where there is no prctl.
PARENT_DEATH_SIGNAL: int | None = (int(signal.SIGRTMIN) + 3 if sys.platform.startswith("linux")
                                   and hasattr(signal, "SIGRTMIN") else None)
# Signals that the process group's threads must leave to the main thread (see setup).
_HANDLED = (*STOP_SIGNALS, *((PARENT_DEATH_SIGNAL,) if PARENT_DEATH_SIGNAL is not None else ()))
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PARENT_EXITED = "parent exited"  # the stop's name in logs and RUN_DIR/STOPPED when the launcher died
# Longest time between two stop checks, whatever the logging cadence: torchrun kills its workers 30 s (its
# --shutdown-timeout) after it passed on a SIGTERM or Ctrl-C, and a stop needs a step and a checkpoint too.
STOP_CHECK_SECONDS = 2.0


class StopRequest:
    """Set by a stop signal or the launcher's death; read only at steps that every rank picks alike.

    A signal may reach one rank only: `agreed`, a collective at the steps `due` names, makes every rank
    stop at the same step. Ctrl-C asks for a stop; Ctrl-C after that raises KeyboardInterrupt at once.
    """

    def __init__(self, check_seconds: float = STOP_CHECK_SECONDS) -> None:
        self.signal: int | None = None
        self.signals_seen: list[str] = []  # over all ranks, once `agreed` said yes
        self.check_seconds = check_seconds
        self.parent: int | None = None  # the launcher's pid, when its death is watched
        self._every = 1  # steps between checks when log steps are further apart than check_seconds
        self._last_check: tuple[int, float] | None = None  # (step, time.monotonic()) of the last check

    def install(self, signals: tuple[int, ...] = STOP_SIGNALS, parent: int | None = None) -> None:
        """Handle `signals`; with `parent` (this process's parent pid when it started), also its death."""
        for sig in signals:
            if sig in (signal.SIGINT, signal.SIGHUP) and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # started under nohup or as a background job: whoever started it wants these ignored
            signal.signal(sig, self._handle)
            # Restart system calls the signal interrupts (SA_RESTART), in whatever thread it lands on:
            # native code (gloo, NCCL, the loader) need not expect EINTR from a mere stop request.
            signal.siginterrupt(sig, False)
        if parent is not None:
            self.watch_parent(parent)

    def watch_parent(self, parent: int) -> bool:
        """Request a stop when process `parent` (this one's parent at start) exits; False where not possible.

        torchrun starts its workers in sessions of their own: a launcher killed without cleaning up (SIGKILL,
        the OOM killer, SIGUSR1, which torchrun does not handle) would leave them training on, orphaned.
        """
        if PARENT_DEATH_SIGNAL is None:
            return False
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            signal.signal(PARENT_DEATH_SIGNAL, self._parent_signal)
            signal.siginterrupt(PARENT_DEATH_SIGNAL, False)
            if libc.prctl(_PR_SET_PDEATHSIG, PARENT_DEATH_SIGNAL, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        except (OSError, AttributeError) as e:
            log.warning("cannot watch the launcher (pid %d): %s; a worker whose launcher dies keeps running", parent, e)
            return False
        self.parent = parent
        # The kernel sends nothing for a parent that died before prctl: this process was re-parented already.
        self._parent_signal(PARENT_DEATH_SIGNAL, None)
        return True

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is None:
            self.signal = signum
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C after a stop request: do not wait for the next check step

    def _parent_signal(self, signum: int, _frame: Any) -> None:
        if self.parent is not None and os.getppid() != self.parent and self.signal is None:
            self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def parent_exited(self) -> bool:
        return self.signal is not None and self.signal == PARENT_DEATH_SIGNAL

    def _name(self) -> str | None:
        if self.signal is None:
            return None
        return PARENT_EXITED if self.parent_exited else signal.Signals(self.signal).name

    def describe(self) -> str:
        if self.parent_exited:
            return f"{PARENT_EXITED}: launcher pid {self.parent}"
        return self._name() or "signalled on another rank"

    def due(self, step: int, log_every: int) -> bool:
        """Whether the ranks check for a stop after optimiser step `step`: the same answer on every rank.

        At every log step (which reads the device anyway), and where log steps are more than `check_seconds`
        apart, also at every multiple of a step count that takes about `check_seconds`, measured by `agreed`.
        """
        return step % log_every == 0 or (self._every < log_every and step % self._every == 0)

    def agreed(self, device: torch.device | str = "cpu", step: int | None = None) -> bool:
        """A collective: True on every rank when any rank was asked to stop (and then by what).

        With `step`, it also times the steps since the last check (the slowest rank's clock, so every rank
        gets the same cadence for `due`).
        """
        now = time.monotonic()
        last = self._last_check if step is not None else None
        flag = torch.tensor([1.0 if self.requested else 0.0, now - last[1] if last else 0.0], dtype=torch.float64,
                            device=device)
        requested, seconds = all_reduce_(flag, "max").tolist()
        if step is not None:
            if last is not None and step > last[0] and seconds > 0:
                self._every = max(1, int(self.check_seconds / (seconds / (step - last[0]))))
            self._last_check = (step, now)
        if not requested:
            return False
        self.signals_seen = sorted({n for n in all_gather_objects(self._name()) if n})
        return True


def loader_worker_init(_worker_id: int = 0) -> None:
    """A DataLoader `worker_init_fn`: a loader process leaves stopping to its rank, which closes it.

    torchrun signals each worker's whole process group, and torch's loader processes die of SIGTERM (it
    installs a handler that re-raises it); the rank then fails with "DataLoader worker ... is killed by
    signal" before it can save the checkpoint the signal asked for. In a session of its own, a loader process
    gets none of the signals sent to its rank's process group or terminal (Ctrl-C, SIGHUP), while SIGTERM
    to its pid, how the loader ends a worker that does not finish, still ends it. SIGUSR1, SIGINT and
    SIGHUP sent to every process (SLURM signals every process of a job step) are ignored. A loader process
    still ends with its rank: when the rank closes the loader, or within seconds of the rank's death.
    """
    with contextlib.suppress(OSError):  # already a session leader: nothing to leave
        os.setsid()
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM:
            signal.signal(sig, signal.SIG_IGN)


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: `gpu[003-005,010],cpu1` -> `gpu003`."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise UserError(f"SLURM_NODELIST={nodelist!r}: not a hostlist; set MASTER_ADDR to the first host of the job")
    prefix, ranges = m.group(1), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The process's place in the job, from whichever launcher started it."""
    env = os.environ if environ is None else environ
    slurm = {"slurm_job_id": env.get("SLURM_JOB_ID", ""),
             "slurm_restart_count": int(env.get("SLURM_RESTART_COUNT", 0) or 0)}
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=int(env["WORLD_SIZE"]),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
            launcher="torchrun",
            restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
            job_id=env.get("TORCHELASTIC_RUN_ID", env.get("SLURM_JOB_ID", "")),
            **slurm,
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env["SLURM_NTASKS"]),
            local_world_size=int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
            launcher="slurm",
            restart_count=int(env.get("SLURM_RESTART_COUNT", 0)),
            job_id=env.get("SLURM_JOB_ID", ""),
            **slurm,
        )
    return DistEnv(restart_count=int(env.get("SLURM_RESTART_COUNT", 0)), job_id=env.get("SLURM_JOB_ID", ""), **slurm)


def rendezvous_env(denv: DistEnv, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """MASTER_ADDR/PORT that env:// needs but `srun` does not set (torchrun always does)."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    if denv.launcher == "slurm":
        if "MASTER_ADDR" not in env:
            out["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST", env.get("SLURM_NODELIST", "")))
        if "MASTER_PORT" not in env:
            # Derived from the job id so concurrent jobs on one node do not collide.
            out["MASTER_PORT"] = str(15000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
    return out


def requeue_slurm_job(environ: Mapping[str, str] | None = None) -> tuple[bool, str]:
    """Put this SLURM job back in the queue (`scontrol requeue`); (done, a line saying what happened).

    SLURM then ends the running job and starts it again, with the same job id and SLURM_RESTART_COUNT
    one higher, so the run directory derived from the job id is found again and training resumes.
    """
    env = os.environ if environ is None else environ
    job = env.get("SLURM_JOB_ID")
    if not job:
        return False, "not a SLURM job: nothing to requeue"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return False, f"cannot requeue SLURM job {job}: scontrol is not on PATH; resubmit the job to continue"
    try:
        out = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot requeue SLURM job {job}: {e}; resubmit the job to continue"
    if out.returncode != 0:
        why = (out.stderr or out.stdout).strip().splitlines()
        return False, (f"cannot requeue SLURM job {job}: scontrol said {why[-1] if why else out.returncode!r} "
                       "(is the job submitted with sbatch --requeue?); resubmit the job to continue")
    return True, f"requeued SLURM job {job}: it will resume from the checkpoint when it starts again"


def check_topology(denv: DistEnv, environ: Mapping[str, str] | None = None) -> None:
    """Fail fast, with one UserError line, on a launch that would otherwise hang in the rendezvous or share a GPU."""
    env = os.environ if environ is None else environ
    if denv.launcher == "slurm":
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        if per_node.isdigit() and int(per_node) * nodes != denv.world_size:
            raise UserError(f"SLURM_NTASKS={denv.world_size} but {nodes} node(s) x --ntasks-per-node={per_node}: "
                             "ask for one task per GPU on every node")
    told = "LOCAL_WORLD_SIZE" in env or (denv.launcher == "slurm" and "SLURM_NTASKS_PER_NODE" in env)
    if told and denv.local_rank >= denv.local_world_size:
        raise UserError(f"local rank {denv.local_rank} is outside the {denv.local_world_size} processes of this node")
    if torch.cuda.is_available() and denv.local_world_size > torch.cuda.device_count() > 0:
        raise UserError(f"{denv.local_world_size} processes on a node with {torch.cuda.device_count()} visible "
                         "GPU(s): two ranks would share a GPU; start one process per GPU (--nproc_per_node)")
    addr = env.get("MASTER_ADDR")
    if denv.distributed and addr:
        try:
            socket.getaddrinfo(addr, None)
        except OSError as e:
            raise UserError(f"MASTER_ADDR={addr} does not resolve ({e}); use the first host of the job") from e


def pick_device(local_rank: int, kind: str = "auto") -> torch.device:
    """`cuda:LOCAL_RANK` (never the global rank: ranks on other nodes have their own GPUs) or cpu."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda: CUDA is not available here; use train.device=cpu or auto")
    if kind in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(f"train.device={kind}: local rank {local_rank} has no GPU, only {count} visible on this "
                            "node; start one process per GPU (--nproc_per_node)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def named_device(name: str | torch.device, key: str = "--device") -> torch.device:
    """The device a user named (auto: the first GPU if there is one, else cpu; cpu; cuda; cuda:N), or a
    UserError naming `key` when it is not a device or not on this machine."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key} {name!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key} {name}: CUDA is not available here; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{key} {name}: only {torch.cuda.device_count()} GPU(s) visible here")
    return device


def cpu_share(own: Sequence[int], parent: Sequence[int] | None, local_rank: int,
              local_world_size: int) -> list[int] | None:
    """The CPUs this rank keeps when a node's ranks split the CPUs they were all given; None: leave as is.

    A rank whose CPUs differ from its parent's was bound by whoever started it (SLURM `--cpu-bind`,
    `taskset`, torchrun's NUMA binding): that choice stands. Ranks started alike (torchrun, an unbound
    `srun`) all inherit their parent's set, so contiguous slices of it by local rank are disjoint.
    """
    cpus = sorted(own)
    if parent is None or set(cpus) != set(parent) or not 1 < local_world_size <= len(cpus):
        return None
    return cpus[local_rank * len(cpus) // local_world_size:(local_rank + 1) * len(cpus) // local_world_size]


def share_cpu_threads(denv: DistEnv, device: torch.device, pin: bool = True) -> None:
    """CPU ranks split the node's cores, and with `pin` each keeps its own.

    N ranks would otherwise each start a thread per core and thrash. Ranks that float drift apart
    between their many small collectives (global BatchNorm exchanges twice per layer), and every
    exchange waits for the slowest: one core each took a 2 x 4 step from ~400 ms to ~340 ms.
    """
    if device.type != "cpu":
        return
    own = sorted(os.sched_getaffinity(0))
    try:
        parent: list[int] | None = sorted(os.sched_getaffinity(os.getppid()))
    except OSError:  # the parent is gone or not ours to ask: do not guess
        parent = None
    share = cpu_share(own, parent, denv.local_rank, denv.local_world_size) if pin else None
    if share is not None:
        os.sched_setaffinity(0, share)
        log.info("rank %d runs on CPU(s) %s of %s", denv.rank, _cpu_list(share), _cpu_list(own))
    torch.set_num_threads(len(share) if share is not None else max(1, len(own) // denv.local_world_size))


def _cpu_list(cpus: Sequence[int]) -> str:
    """`0-3,8`: a CPU set as taskset and SLURM print it."""
    runs: list[list[int]] = []
    for c in sorted(cpus):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


_GENERATION_KEY = "seg_dist/generation_store"  # in torchrun's store: "host port nonce" of this generation's store


def _torchrun_shares_its_store(environ: Mapping[str, str] | None = None) -> bool:
    """torchrun's c10d rendezvous hosts one store for the whole job and points every worker generation at it."""
    env = os.environ if environ is None else environ
    return env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _store_answers(host: str, port: int, nonce: str) -> dist.Store | None:
    """A client of the store at host:port if it is up and carries `nonce`; None for a dead generation's."""
    try:  # a plain connect first: refused at once for a dead store, and quiet (a TCPStore client logs every retry)
        socket.create_connection((host, port), timeout=5).close()
        store = dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=10))
        return store if store.get("nonce").decode() == nonce else None
    except (OSError, RuntimeError):  # refused, reset, timed out; torch's DistError is a RuntimeError
        return None


def _generation_store(denv: DistEnv, timeout: datetime.timedelta) -> dist.Store:
    """A store of this generation of workers' own: rank 0 hosts it, torchrun's store says where.

    torchrun (c10d rendezvous, the default since torch 2.5) keeps one TCPStore for the whole job and
    gives every worker generation the same MASTER_ADDR:MASTER_PORT. Keys outlive the generation that
    wrote them: after `--max-restarts` restarts the group, a restarted rank that gets there before its
    peers reads the dead generation's gloo addresses (or NCCL id) and fails with `Gloo connectFullMesh
    failed ... Connection refused`, which uses up the restart. TORCHELASTIC_RESTART_COUNT cannot tell
    the generations apart: each node's agent counts its own restarts (pytorch/pytorch#135712, #108158).
    So rank 0 starts a store on a free port and publishes "host port nonce" in torchrun's store; the
    others use a published address only once a store answers there with that nonce. A dead
    generation's address is refused (torchrun stops all old workers before it starts new ones), so a
    stale entry costs a retry, never a wrong group.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    shared = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    if denv.rank == 0:
        own = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timeout)
        nonce = uuid.uuid4().hex
        own.set("nonce", nonce)
        shared.set(_GENERATION_KEY, f"{host} {own.port} {nonce}")
        log.info("process group store for torchrun generation %d at %s:%d", denv.restart_count, host, own.port)
        return own
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        addr, own_port, nonce = shared.get(_GENERATION_KEY).decode().split()  # waits for the first publication
        store = _store_answers(addr, int(own_port), nonce)
        if store is not None:
            store.set_timeout(timeout)
            return store
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {denv.rank}: no store from rank 0 within {timeout} (last published "
                               f"{addr}:{own_port}); torchrun store {host}:{port}")
        time.sleep(0.2)  # a previous generation's entry: rank 0 of this one has not published yet


@contextlib.contextmanager
def _signals_blocked(signals: tuple[int, ...]) -> Iterator[None]:
    """Block `signals` in this thread (and so in every thread started meanwhile) for the block."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def setup(device: str = "auto", timeout_minutes: float = 30.0) -> Iterator[tuple[DistEnv, torch.device]]:
    """Join the process group (if there is more than one process) and pick this rank's device.

    The group is destroyed on exit, also when the body raises, so a failing rank does not leave
    the others blocked on a half-torn-down group.
    """
    denv = read_env()
    check_topology(denv)
    dev = pick_device(denv.local_rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if denv.distributed and not dist.is_initialized():
        os.environ.update(rendezvous_env(denv))
        # The timeout bounds the rendezvous and every collective: a rank whose peer stopped answering
        # inside a collective raises after it instead of hanging (gloo and NCCL both honour it).
        timeout = datetime.timedelta(minutes=timeout_minutes)
        # The stop signals must reach the main thread only: landing on one of the threads the process
        # group and its stores start, they interrupt a blocking call there (EINTR), which can abort the
        # process (seen once: "terminate called without an active exception" after a SIGUSR1). Threads
        # inherit the signal mask of the thread that starts them, so they start with the signals blocked.
        with _signals_blocked(_HANDLED):
            kwargs: dict[str, Any] = {}
            if _torchrun_shares_its_store():
                kwargs["store"] = _generation_store(denv, timeout)  # not env://: see _generation_store
            else:
                kwargs["init_method"] = "env://"
            if dev.type == "cuda":
                kwargs["device_id"] = dev  # binds NCCL to this GPU and avoids a guess at the first collective
            dist.init_process_group(
                backend=backend_for(dev),
                rank=denv.rank,
                world_size=denv.world_size,
                timeout=timeout,
                **kwargs,
            )
    try:
        yield denv, dev
    finally:
        if dist.is_available() and dist.is_initialized():
            # Objects that hold the group (a DDP wrapper in a reference cycle, say) go first, here in the
            # main thread: destroyed later, during interpreter exit, the group's native threads can take the
            # process down with "terminate called without an active exception".
            gc.collect()
            dist.destroy_process_group()


# --- collectives that are no-ops in a single process -----------------------------------------------


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, max or min); returns the tensor for chaining."""
    if is_initialized():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def sum_packed(parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor of `parts` summed over ranks, in ONE all-reduce: they travel packed in a float64 vector
    (integer counts stay exact up to 2**53) and come back float64, in `parts`' shapes. On one process:
    the parts as float64. The tensors must live on a device that suits the backend (CUDA for nccl)."""
    packed = all_reduce_(torch.cat([p.detach().reshape(-1).double() for p in parts]))
    return [chunk.reshape(p.shape) for chunk, p in zip(packed.split([p.numel() for p in parts]), parts, strict=True)]


def sum_small(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a small tensor (per-channel statistics), the same bits on every rank.

    gloo's all-reduce splits even a few dozen floats into ring chunks: on a 2-core machine it took
    1.3 ms where an all-gather of the same tensor took 0.35 ms, and BatchNorm over the global batch
    makes 2 such calls per layer per step. Summing the gathered rows in rank order is also deterministic.
    """
    if not is_initialized():
        return tensor
    if dist.get_backend() != "gloo":
        return all_reduce_(tensor.clone())
    rows = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, tensor.contiguous())
    return torch.stack(rows).sum(0)


def _sum_with_local_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of small per-rank sums, differentiable in this rank's own term only.

    The other ranks' terms are constants here; their own backward passes carry their share of the
    gradient, and DDP's all-reduce adds those up.
    """
    local = tensor.detach()
    return tensor + (sum_small(local) - local)


def __getattr__(name: str) -> Any:
    # A collective, so a compiled loss must run it eagerly, between its graphs: `torch.compiler.disable`.
    # Applied on first use because it imports torch._dynamo, a second of every command's start-up otherwise.
    if name == "sum_with_local_grad":
        fn = torch.compiler.disable(_sum_with_local_grad)
        globals()[name] = fn
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when it is true on any rank: how ranks agree to stop at the same step."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    return bool(all_reduce_(t, "max").item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def node_first(fn: Callable[[], Any], what: str) -> Any:
    """`fn()` on one rank per node first (the lowest rank on each host), then on the other ranks: what `fn`
    puts into a node's cache (a download) is done once per node, and the others find it there.

    Every rank calls this. The other ranks wait in a collective while the first ones work, so the wait is
    bounded by the process group's timeout (`train.dist_timeout_minutes`). If a first rank fails, every rank
    raises: the same UserError where it was one (a download that cannot happen offline), else a RunFailed
    naming the rank and `what`. One process: just `fn()`.
    """
    if not is_initialized() or dist.get_world_size() == 1:
        return fn()
    # GROUP_RANK (torchrun) or SLURM_NODEID tells nodes apart where containers share one host name.
    node = (socket.gethostname(), os.environ.get("GROUP_RANK", os.environ.get("SLURM_NODEID", "")))
    nodes = all_gather_objects(node)
    me = dist.get_rank()
    first = nodes.index(node) == me
    result: Any = None
    failure: BaseException | None = None
    report = None
    if first:
        try:
            result = fn()
        except Exception as e:
            failure = e
            report = ("user" if isinstance(e, UserError) else "bug", f"{type(e).__name__}: {e}", str(e))
    reports = all_gather_objects(report)
    if failure is not None:
        raise failure
    for rank_, found in enumerate(reports):
        if found is not None:
            kind, described, message = found
            if kind == "user":
                raise UserError(message)
            raise RunFailed(f"{what} failed on rank {rank_}: {described}")
    return result if first else fn()


def sync_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy `src`'s buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last training step each rank
    holds statistics from its own last batch. Validation and checkpoints must all see rank 0's.
    """
    if not is_initialized():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)


# --- process groups on this machine, without a launcher (benchmarks, tests) ---------------------------


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[DistEnv]:
    """A real process group of this one process on `device` (gloo on CPU, NCCL on a GPU), destroyed on exit.

    What a multi-rank run has around its model (DDP, its hooks, real collectives), in one process and with
    no launcher or environment variables. Raises RuntimeError if this process is in a group already.
    """
    if is_initialized():
        raise RuntimeError("single_process_group: this process is already in a process group")
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    with _signals_blocked(_HANDLED):  # as in setup(): the group's threads must not take the stop signals
        dist.init_process_group(backend_for(device), store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    try:
        yield DistEnv(launcher="local")
    finally:
        gc.collect()  # as in setup(): objects holding the group go before it
        dist.destroy_process_group()


def spawn_local_group(world_size: int, fn: Callable[..., None], args: tuple[Any, ...] = (), device: str = "auto",
                      timeout_minutes: float = 10.0) -> None:
    """Run `fn(denv, device, *args)` in `world_size` new processes on this machine, each one rank of one
    process group (rendezvous on 127.0.0.1; gloo on CPU, NCCL and `cuda:rank` with GPUs); returns when all
    have finished. `fn` and `args` must pickle (`fn` a module-level function). A rank that raises ends the
    others, and RunFailed names it, chained to its traceback.
    """
    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free port for rank 0's store
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        mp.spawn(_local_rank, args=(world_size, port, fn, args, device, timeout_minutes), nprocs=world_size)
    except mp.ProcessRaisedException as e:
        last = [line for line in str(e).strip().splitlines() if line.strip()][-1:]
        raise RunFailed(f"rank {e.error_index} of {world_size} local processes failed: "
                        f"{last[0] if last else e}") from e
    except mp.ProcessExitedException as e:
        raise RunFailed(f"rank {e.error_index} of {world_size} local processes died: {e}") from e


def _local_rank(rank: int, world_size: int, port: int, fn: Callable[..., None], args: tuple[Any, ...],
                device: str, timeout_minutes: float) -> None:
    """One process of `spawn_local_group`: join the group, run `fn`, leave the group."""
    denv = DistEnv(rank=rank, local_rank=rank, world_size=world_size, local_world_size=world_size,
                   launcher="local")
    dev = pick_device(rank, device)
    kwargs: dict[str, Any] = {}
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        kwargs["device_id"] = dev
    with _signals_blocked(_HANDLED):
        dist.init_process_group(backend_for(dev), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(minutes=timeout_minutes),
                                **kwargs)
    try:
        fn(denv, dev, *args)
    finally:
        gc.collect()
        dist.destroy_process_group()
