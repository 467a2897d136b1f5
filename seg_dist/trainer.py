"""The training loop: `train()` runs a whole run on one rank.

Reads top to bottom: `setup_run` builds a `Run` from named parts (the run's data, the networks, the
optimisation), resuming from a checkpoint if there is one; `train_one_epoch` takes optimiser steps, `end_of_epoch`
validates, steps a plateau schedule and checkpoints. Every rank takes the same number of steps per
epoch (the train loader guarantees it), validates its exact-once share of the validation split and
joins one all-reduce for the metrics. Rank 0 writes checkpoints, TensorBoard and metrics.jsonl. A
stop request (SIGUSR1 or SIGTERM, as SLURM sends before preemption) is honoured at a step all ranks
agree on: they write last.pt there and return, and `train.resume=auto` continues from that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import random
import resource
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import atomic, checkpoint, data, distributed, precision, shards
from .config import AUTO_VAL_SHARE, SMALL_RANK_BATCH, Config, ConfigError, TrainConfig, parse_every, to_dict
from .ema import WeightAverage
from .errors import RunFailed, UserError
from .losses import SegLoss, class_weights
from .models import build_model, count_parameters, encoder_of, freeze_encoder_batchnorm
from .models.norms import GlobalBatchNorm2d, convert_to_global_batchnorm, convert_to_grouped_batchnorm
from .rundir import RunDirLock
from .runlog import RunLog, StartClock, TimeLedger, clear_stop_marker, goodput, goodput_line, progress
from .schedule import build_scheduler, is_per_iteration, param_groups
from .validation import Cadence, Validation, validate
from .visualize import display_bands, palette_for, validation_pictures

log = logging.getLogger("seg_dist.train")


class Diverged(RunFailed):
    """Too many non-finite steps in a row."""


# --- state that a checkpoint carries ---------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class TrainState:
    """Where the run is; saved in and restored from every checkpoint."""

    epoch: int = 0
    epoch_step: int = 0  # optimiser steps taken in `epoch`
    global_step: int = 0
    best_miou: float = -1.0
    train_seconds: float = 0.0  # wall-clock time spent in the run so far, over every resume (train.budget_minutes)

    def state_dict(self) -> dict[str, Any]:
        """The counters and every rank's RNG states: a collective, call it on every rank."""
        return {**dataclasses.asdict(self), "rng": distributed.all_gather_objects(rng_state())}

    def load_state_dict(self, state: dict[str, Any], seed: int = 0) -> None:
        """Counters, and this rank's RNG states; saved with another number of ranks, the states are
        re-derived from `seed`, the step and the rank instead (the same on every resume)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, state.get(f.name, f.default))  # a counter newer than the checkpoint: its default
        rngs, rank = state.get("rng", []), distributed.rank()
        if len(rngs) == distributed.world_size():
            set_rng_state(rngs[rank])
        else:
            derived = int(np.random.SeedSequence([seed, self.global_step, rank]).generate_state(1)[0])
            torch.manual_seed(derived)
            np.random.seed(derived)
            random.seed(derived)
            log.info("RNG states saved by %d rank(s), resuming on %d: re-derived from seed %d and step %d",
                     len(rngs), distributed.world_size(), seed, self.global_step)


# --- running statistics ----------------------------------------------------------------------------


@dataclass
class StepStats:
    means: dict[str, float]  # over the steps taken (not skipped) since the last flush
    steps: int  # optimiser steps since the last flush, skipped ones included
    skipped: int
    skipped_in_a_row: int
    seconds: float
    data_wait: float  # seconds spent waiting for batches


class StepMeter:
    """Training figures summed on the device, so a step never waits for the host; `flush()` syncs once.

    It also keeps this process's time ledger for the end-of-run goodput: seconds inside steps (data waits
    excluded), waiting for data, and in the parts `pause` names (validation, checkpoints). The first step is
    start-up (compile, the loader's start, the first batch). On a GPU the host runs ahead of the device, so
    the waits for it (`flush`, `settle`) count as steps too.
    """

    NAMES = ("loss", "ce", "dice", "grad_norm")

    def __init__(self, device: torch.device, clock: StartClock | None = None) -> None:
        self.device = device
        self.sums = torch.zeros(len(self.NAMES), device=device)
        self.counts = torch.zeros(2, device=device)  # steps taken, steps skipped
        self.in_a_row = torch.zeros((), device=device)  # consecutive skipped steps
        self.epoch_sums = torch.zeros(2, device=device)  # loss sum and steps taken this epoch
        self.clock = clock or StartClock.now()
        self.ledger = TimeLedger()
        self.steps_run = 0  # optimiser steps this process took
        self.first_step_ended: float | None = None  # seconds after clock.origin
        self.before_first_step = 0.0  # seconds the ledger booked before the first step (a resume's validation)
        self._pausing = 0
        self._restart()

    def _restart(self) -> None:
        self.steps, self.data_wait, self.started, self.paused = 0, 0.0, time.perf_counter(), 0.0

    @contextlib.contextmanager
    def pause(self, part: str | None = None) -> Iterator[None]:
        """Time that is not training (validation, checkpoints) does not count against images/s; a named
        `part` is booked in the ledger (an inner part's time is its own, not the outer one's)."""
        t0 = time.perf_counter()
        self._pausing += 1
        try:
            with self.ledger.part(part) if part else contextlib.nullcontext():
                yield
        finally:
            self._pausing -= 1
            if not self._pausing:
                self.paused += time.perf_counter() - t0

    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        """One optimiser step. The first ends with the device's work done, so none of it lands in later steps."""
        first = self.steps_run == 0
        if first:
            self.before_first_step = self.ledger.total()
        with self.ledger.part("first_step" if first else "steps"):
            yield
            if first:
                self._sync_device()
        self.steps_run += 1
        if first:
            self.first_step_ended = time.perf_counter() - self.clock.origin

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        t0 = time.perf_counter()
        with self.ledger.part("first_step" if self.steps_run == 0 else "data_wait"):
            yield
        self.data_wait += time.perf_counter() - t0

    def settle(self) -> None:
        """Wait for the steps the device still runs (before validation or a checkpoint), booked as steps."""
        if self.device.type == "cuda":
            with self.ledger.part("steps"):
                self._sync_device()

    def _sync_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def update(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], grad_norm: torch.Tensor,
               skipped: torch.Tensor) -> None:
        """Add one optimiser step; `skipped` (0-dim float, 1 = skipped) adds to the counts only."""
        values = torch.stack([loss.detach(), parts["ce"], parts["dice"], grad_norm.detach()]).float()
        skip = skipped.bool()
        self.sums += torch.where(skip, torch.zeros_like(values), values)
        self.counts += torch.stack([1 - skipped, skipped])
        self.in_a_row = (self.in_a_row + 1) * skipped
        loss_and_one = torch.stack([values[0], torch.ones_like(values[0])])
        self.epoch_sums += torch.where(skip, torch.zeros_like(loss_and_one), loss_and_one)
        self.steps += 1

    def flush(self) -> StepStats:
        with self.ledger.part("steps"):  # waits for the device to finish the steps it was given
            *totals, taken, skipped, in_a_row = torch.cat([self.sums, self.counts, self.in_a_row.view(1)]).tolist()
        stats = StepStats({k: t / max(1.0, taken) for k, t in zip(self.NAMES, totals, strict=True)}, self.steps,
                          int(skipped), int(in_a_row), time.perf_counter() - self.started - self.paused,
                          self.data_wait)
        self.sums.zero_()
        self.counts.zero_()
        self._restart()
        return stats

    def epoch_loss(self, reset: bool = True) -> float:
        """Mean train loss of the epoch so far over all ranks (a collective); `reset`: starts the next epoch's."""
        sums = distributed.all_reduce_(self.epoch_sums if reset else self.epoch_sums.clone())
        loss = (sums[0] / sums[1].clamp(min=1)).item()
        if reset:
            self.epoch_sums.zero_()
        return loss


# --- the run -----------------------------------------------------------------------------------------


@dataclass
class Horizon:
    """The number of optimiser steps the run will take; mutable, so the schedule follows a time budget."""

    steps: int
    cap: int  # train.epochs x steps per epoch, and train.max_steps

    @classmethod
    def for_run(cls, t: TrainConfig, steps_per_epoch: int) -> Horizon:
        steps = steps_per_epoch * t.epochs
        if t.max_steps:
            steps = min(steps, t.max_steps)
        return cls(steps, steps)


@dataclass(kw_only=True)
class RunData:
    """What the run reads: the shards' manifest and what follows from it on this world size."""

    manifest: dict[str, Any]
    manifest_digest: str  # stored in checkpoints, so a resume can tell that the shards changed
    inputs: data.Normalization  # channels, pixel type and normalisation: what inference must feed the model
    classes: data.ClassInfo
    batches: data.BatchPlan
    steps_per_epoch: int
    train_crop: tuple[int, int]  # what data.image_size=0 (auto) became
    train_mean_hw: list[float] | None  # the train split's mean frame as packed (None: the manifest lacks it)
    val_loader: data.ValBatches


@dataclass(kw_only=True)
class Nets:
    """The network in the guises a run needs."""

    step: nn.Module  # what a training step calls: compiled and/or DDP-wrapped
    bare: nn.Module  # the module itself: trained, and resumed from
    ema: WeightAverage | None = None

    @property
    def evaluated(self) -> nn.Module:
        """What is validated and saved as the checkpoint's `model`: the weight average when there is one."""
        return self.ema.module if self.ema is not None else self.bare


@dataclass(kw_only=True)
class Optimisation:
    loss_fn: nn.Module  # SegLoss, compiled with the model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None


@dataclass
class Validations:
    """The run's validations so far, and when the next is due."""

    cadence: Cadence
    history: list[dict[str, Any]] = field(default_factory=list)  # per validation: epoch, step, lr, losses, mIoU
    last: dict[str, Any] = field(default_factory=dict)  # the last validation's metrics
    ended: float = field(default_factory=time.perf_counter)  # when the last one ended (or the run started)


@dataclass(kw_only=True)
class Run:
    """Everything a run is made of on this rank; built once by `setup_run`."""

    cfg: Config  # as run: train.batch_size and accum_steps are the batch plan's
    # The config as given, saved in checkpoints: a resume on another world size plans its batches afresh.
    given_config: dict[str, Any]
    denv: distributed.DistEnv
    device: torch.device
    data: RunData
    nets: Nets
    opt: Optimisation
    horizon: Horizon  # the run's step count: the schedule reads it, train.budget_minutes moves it
    validations: Validations
    runlog: RunLog = field(repr=False)
    # (time.perf_counter() at this process's start, seconds earlier processes of the run spent before it)
    clock: tuple[float, float] = (0.0, 0.0)
    # (time.perf_counter(), global step) at the end of this process's first step: the pace of the steps after
    # it (validation and checkpoints included) predicts the rest; start-up and compile do not recur.
    pace: tuple[float, int] | None = None
    # The training batches from the first epoch this process trains to the end of the run: one loader, so
    # its workers start once, not at every epoch (see data.train_loader's endless=True).
    train_stream: Generator[tuple[torch.Tensor, torch.Tensor], None, None] | None = field(default=None, repr=False)
    lock: RunDirLock | None = field(default=None, repr=False)  # rank 0's hold on run.dir
    # Rank 0's checkpoint writes, off the critical path; `train` waits for it before the run ends.
    writer: checkpoint.AsyncWriter = field(default_factory=checkpoint.AsyncWriter, repr=False)

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.run.dir) / checkpoint.CHECKPOINT_DIR

    @property
    def cudagraphs(self) -> bool:
        """The step is compiled with CUDA graphs, so each step must mark its start."""
        t = self.cfg.train
        return t.compile and compile_mode(t.compile_mode, self.device, self.denv.world_size) in CUDA_GRAPH_MODES

    def elapsed(self) -> float:
        started, before = self.clock
        return before + time.perf_counter() - started

    def finished(self, state: TrainState) -> bool:
        return state.epoch >= self.cfg.train.epochs or state.global_step >= self.horizon.steps


@dataclass
class TrainResult:
    model: nn.Module  # the bare trained model on this rank
    global_step: int
    stopped: bool  # True when a stop request ended the run early
    stop_signal: str  # the signal(s) any rank received, e.g. "SIGUSR1" ("" when not stopped)
    metrics: dict[str, Any]  # the last validation's (identical on every rank)
    history: list[dict[str, Any]]  # per validation: epoch, step, lr, val loss, mIoU, train loss


def train(
    cfg: Config, denv: distributed.DistEnv, device: torch.device, stop: distributed.StopRequest | None = None,
    clock: StartClock | None = None,
) -> TrainResult:
    """The whole run on this rank. `clock`: where its wall time starts (the command's process start, with the
    start-up's stages marked); by default this call. The run ends with its goodput (`report_goodput`)."""
    stop = stop or distributed.StopRequest()
    clock = clock or StartClock.now()
    run, state = setup_run(cfg, denv, device)
    run.clock = (clock.origin, state.train_seconds)  # train.budget_minutes counts the start-up too
    clock.mark("setup (manifest, model, optimiser, resume)")
    meter = StepMeter(device, clock)
    stopped = False
    resumed_at = state.global_step
    failure: BaseException | None = None
    with run.runlog:
        try:
            try:
                while not (stopped or run.finished(state)):
                    stopped = train_one_epoch(run, state, meter, stop)
                    meter.settle()
                    if stopped:
                        distributed.sync_buffers(run.nets.bare)
                        with meter.pause("checkpoints"):
                            save_checkpoint(run, state)
                    else:
                        with meter.pause():
                            end_of_epoch(run, state, meter)
                        stopped = not run.finished(state) and stop.agreed(device)
                        if stopped:
                            log.info("stop requested (%s) at the end of an epoch, global step %d", stop.describe(),
                                     state.global_step)
                if run.validations.history and not stopped:
                    log.info("done: best val mIoU %.4f; checkpoints in %s, TensorBoard in %s", state.best_miou,
                             run.ckpt_dir, Path(cfg.run.dir) / "tb")
            except BaseException as e:
                failure = e
                raise
            finally:
                if run.train_stream is not None:
                    run.train_stream.close()  # stops the loader's workers now, also when the run failed
                with meter.pause("checkpoints"):
                    finish_checkpoints(run)  # before the lock goes, and before a stop marker names the step
                report_goodput(run, state, meter, resumed_at, failure)
        finally:
            if run.lock is not None:
                run.lock.release()
    run.nets.step = run.nets.bare  # let go of the DDP wrapper (and its hold on the process group) now
    return TrainResult(run.nets.bare, state.global_step, stopped, ",".join(stop.signals_seen),
                       run.validations.last, run.validations.history)


def report_goodput(run: Run, state: TrainState, meter: StepMeter, resumed_at: int,
                   failure: BaseException | None = None) -> dict[str, Any] | None:
    """This process's goodput, from its start to now: one line on rank 0, TensorBoard's `goodput/` scalars
    and RUN_DIR/goodput.json. A resumed run's figures cover this process's steps only. A failed run reports
    too, up to its failure (`failed` names it); reporting then never hides the failure itself."""
    if failure is None:
        return _report_goodput(run, state, meter, resumed_at, None)
    try:
        return _report_goodput(run, state, meter, resumed_at, failure)
    except Exception as e:  # the run's own error is what the user must see
        log.warning("no goodput for the failed run (%s: %s)", type(e).__name__, e)
        return None


def _report_goodput(run: Run, state: TrainState, meter: StepMeter, resumed_at: int,
                    failure: BaseException | None) -> dict[str, Any]:
    seconds = meter.ledger.seconds
    g = goodput(time.perf_counter() - meter.clock.origin, meter.steps_run, run.data.batches.global_batch,
                seconds["steps"], seconds["first_step"], meter.first_step_ended or 0.0, meter.before_first_step,
                dict(seconds))
    covers = (f"this process only: steps {resumed_at + 1}-{state.global_step} of a run resumed at step {resumed_at}"
              if resumed_at else f"steps 1-{state.global_step}")
    failed = None
    if failure is not None:
        failed = f"{type(failure).__name__}: {str(failure).splitlines()[0][:200]}" if str(failure) else \
            type(failure).__name__
        covers += f", up to the failure ({type(failure).__name__})"  # its message is the run's own last line
    g.update(covers=covers, failed=failed, wall_from=meter.clock.source, first_step=resumed_at + 1,
             last_step=state.global_step, resumed_at=resumed_at, ranks=run.denv.world_size,
             startup_stages=dict(startup_stages(meter)))
    if run.denv.is_main:
        log.info("%s; wall time from %s", goodput_line(g, covers), meter.clock.source)
        run.runlog.goodput(g, state.global_step)
    return g


def startup_stages(meter: StepMeter) -> list[tuple[str, float]]:
    """The start-up's marked stages and the first step, in seconds (the first step's end is start-up's)."""
    stages = meter.clock.stages()
    if meter.first_step_ended is not None:
        marked = sum(t for _, t in stages)
        stages.append(("first step (compile, loader start, first batch)", meter.first_step_ended - marked))
    return stages


def setup_run(cfg: Config, denv: distributed.DistEnv, device: torch.device) -> tuple[Run, TrainState]:
    """Data, model, loss, optimiser, schedule and scaler, resumed from a checkpoint if there is one."""
    lock = claim_run_dir(cfg, denv)
    try:
        return _setup_run(cfg, denv, device, lock)
    except BaseException:
        if lock is not None:
            lock.abandon()
        raise


def _setup_run(cfg: Config, denv: distributed.DistEnv, device: torch.device,
               lock: RunDirLock | None) -> tuple[Run, TrainState]:
    manifest = load_manifest(cfg)
    found = saved_checkpoint(cfg)
    cfg, saved_inputs = continued_inputs(cfg, manifest, found)
    inputs = saved_inputs or data.resolve_normalization(cfg, manifest)  # what the images are, and whence
    cfg = data.resolve_inputs(cfg, manifest)  # normalisation and model.in_channels from the data, as saved
    display_bands(inputs.channels, cfg.data.display_bands)  # a bad index stops the run now, on every rank
    resume = find_resume(cfg, manifest, found)
    batches = resolve_batch_plan(cfg, denv.world_size, resume.state if resume and resume.full else None)
    run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batches.per_rank,
                                                                 accum_steps=batches.accum_steps))
    run_data = run_data_for(run_cfg, manifest, denv, batches, inputs)
    horizon = Horizon.for_run(run_cfg.train, run_data.steps_per_epoch)
    # A run that continues its own checkpoint takes every weight from it: pretrained ones are not read again.
    model_cfg = dataclasses.replace(run_cfg, model=run_cfg.model.without_pretrained()) if saved_inputs else run_cfg
    model = build_train_model(model_cfg, run_data.classes.num_classes, device)
    opt = build_optimisation(run_cfg, model, run_data, horizon, device, distributed_loss=denv.distributed)
    state = TrainState()
    if resume is not None:
        restore(resume, model, opt, state, run_cfg.train.seed)
    ema = weight_average(run_cfg.train, model, resume.state if resume and resume.full else None)
    step_model = model
    if run_cfg.train.compile:
        step_model, opt.loss_fn = compile_step_parts(
            model, opt.loss_fn, compile_mode(run_cfg.train.compile_mode, device, denv.world_size))
    if distributed.is_initialized():  # also a 1-process group: DDP's per-step work is then measurable
        step_model = wrap_ddp(step_model, model, device)
    resumed = resume is not None and resume.full
    cadence = Cadence(parse_every(run_cfg.train.val_every), epoch=state.epoch, step=state.global_step,
                      elapsed=state.train_seconds)
    run = Run(cfg=run_cfg, given_config=to_dict(cfg), denv=denv, device=device, data=run_data,
              nets=Nets(step=step_model, bare=model, ema=ema), opt=opt, horizon=horizon,
              validations=Validations(cadence),
              runlog=RunLog(Path(cfg.run.dir), enabled=denv.is_main, tensorboard=cfg.logging.tensorboard,
                            resumed_at=state.global_step if resumed else None),
              clock=(time.perf_counter(), state.train_seconds), lock=lock)
    announce(run, state)
    return run, state


def claim_run_dir(cfg: Config, denv: distributed.DistEnv) -> RunDirLock | None:
    """Rank 0 locks run.dir for this run; every rank raises the same one-line error if it cannot."""
    lock, error = None, None
    if denv.is_main:
        try:
            lock = RunDirLock.claim(cfg.run.dir)
        except UserError as e:
            error = str(e)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise UserError(error)
    return lock


def load_manifest(cfg: Config) -> dict[str, Any]:
    """The shards' manifest, the shards checked as data.verify says."""
    manifest = shards.load_manifest(cfg.data.root)
    if cfg.data.verify != "off":
        shards.verify_shards(cfg.data.root, manifest, [cfg.data.train_split, cfg.data.val_split],
                             full=cfg.data.verify == "full")
    return manifest


@dataclass(frozen=True, kw_only=True)
class Resume:
    path: Path
    state: dict[str, Any]
    full: bool  # False: only the weights, to fine-tune on other data (optimiser, schedule and counters afresh)


# Model settings a resumed run may change: they decide how the weights start or are trained, not their shapes.
_NOT_ARCHITECTURE = ("encoder_weights", "freeze_encoder_epochs", "activation_checkpointing")


def saved_checkpoint(cfg: Config) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint `train.resume` names, loaded on the CPU (RNG states must stay there); None for a fresh
    start. Not yet checked against this run: `find_resume` does that."""
    last = Path(cfg.run.dir) / checkpoint.CHECKPOINT_DIR / checkpoint.LAST
    if cfg.train.resume == "never" and last.exists():
        raise ConfigError(f"{last} exists and train.resume=never would overwrite it: choose another run.dir or resume")
    return checkpoint.load_for_resume(cfg.train.resume, cfg.run.dir)


def continued_inputs(cfg: Config, manifest: dict[str, Any], found: tuple[Path, dict[str, Any]] | None
                     ) -> tuple[Config, data.Normalization | None]:
    """For a run that continues its own checkpoint (same data) and names pretrained encoder weights: `cfg`
    with the normalisation the checkpoint trained with, and that normalisation. Neither it nor the weights
    then need the weights file or the network again (a requeued job on an offline node without the cache).
    Otherwise `cfg` as it is and None."""
    if found is None or not cfg.model.encoder_weights:
        return cfg, None
    path, state = found
    entry = state.get("input")
    if state.get("manifest_digest") != shards.manifest_digest(manifest) or not isinstance(entry, dict):
        return cfg, None
    saved = checkpoint.input_contract(state, cfg, path)
    log.info("continuing %s: its weights and normalisation (%s) stand for model.encoder_weights=%s", path,
             saved.source, cfg.model.encoder_weights)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mean=list(saved.mean), std=list(saved.std)))
    return cfg, saved


def find_resume(cfg: Config, manifest: dict[str, Any], found: tuple[Path, dict[str, Any]] | None) -> Resume | None:
    """The checkpoint `saved_checkpoint` loaded, checked against this run's model and data before any weight
    is loaded; None for a fresh start."""
    if found is None:
        return None
    run_dir = Path(cfg.run.dir)
    path, state = found
    same_data = state.get("manifest_digest") == shards.manifest_digest(manifest)
    trained_on = state["config"].get("data", {}).get("root", "?")
    if not same_data and cfg.train.resume == "auto":  # first: another dataset explains any other difference
        raise UserError(f"run.dir={run_dir} holds a run on other data ({trained_on}, {path.name}) than data.root="
                        f"{cfg.data.root}: choose another run.dir, or train.resume={path} to fine-tune from its "
                        "weights")
    saved_model = state["config"].get("model", {})
    for key, value in to_dict(cfg)["model"].items():
        if key in _NOT_ARCHITECTURE or (key == "encoder" and cfg.model.name == "unet"):
            continue
        if key in saved_model and saved_model[key] != value:
            raise UserError(f"{path} holds a model with model.{key}={saved_model[key]}, this run has "
                            f"model.{key}={value}: set it back to resume, or choose another run.dir")
    classes = data.resolve_classes(cfg.data, manifest)
    if int(state["num_classes"]) != classes.num_classes:
        raise UserError(f"{path} was trained for {state['num_classes']} classes, data.root={cfg.data.root} has "
                        f"{classes.num_classes}: choose another run.dir")
    if same_data:
        return Resume(path=path, state=state, full=True)
    log.info("fine-tuning from the weights of %s (trained on %s); optimiser, schedule and step start afresh",
             path, trained_on)
    return Resume(path=path, state=state, full=False)


def run_data_for(cfg: Config, manifest: dict[str, Any], denv: distributed.DistEnv, batches: data.BatchPlan,
                 inputs: data.Normalization) -> RunData:
    """What the run reads on this rank: classes, steps, the training crop, the validation loader."""
    return RunData(
        manifest=manifest,
        manifest_digest=shards.manifest_digest(manifest),
        inputs=inputs,
        classes=data.resolve_classes(cfg.data, manifest),
        batches=batches,
        steps_per_epoch=data.steps_per_epoch(manifest, cfg, denv.world_size),
        train_crop=data.training_crop(cfg.data, manifest),
        train_mean_hw=_mean_frame(manifest, cfg.data.train_split),
        val_loader=data.val_loader(cfg, manifest, cfg.data.root, denv.rank, denv.world_size),
    )


def _mean_frame(manifest: dict[str, Any], split: str) -> list[float] | None:
    try:
        return list(shards.mean_image_size(manifest, split))
    except shards.ManifestError:
        return None


def build_optimisation(cfg: Config, model: nn.Module, run_data: RunData, horizon: Horizon, device: torch.device,
                       distributed_loss: bool) -> Optimisation:
    """Loss, fused AdamW, the schedule over `horizon`, AMP dtype and scaler."""
    classes = run_data.classes
    histogram = run_data.manifest["splits"][cfg.data.train_split]["class_histogram"]
    weights = class_weights(histogram, cfg.loss.class_weights)
    loss_fn = SegLoss(classes.num_classes, classes.ignore_index, cfg.loss.ce_weight, cfg.loss.dice_weight,
                      weights.to(device) if weights is not None else None,
                      global_batch=cfg.loss.global_batch and distributed_loss,
                      label_smoothing=cfg.loss.label_smoothing)
    # Fused: it can skip a non-finite step on the device (see precision.optimizer_step). The encoder gets a
    # param group of its own only when a fine-tuning knob asks for it (frozen = lr factor 0, see schedule.py).
    fine_tune = cfg.model.freeze_encoder_epochs > 0 or cfg.optim.encoder_lr_mult != 1.0
    groups = param_groups(model, cfg.optim.lr, encoder_of(model), cfg.optim.encoder_lr_mult, separate=fine_tune)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=cfg.optim.betas, fused=True)
    scheduler = build_scheduler(optimizer, cfg.schedule, lambda: horizon.steps,
                                freeze_steps=cfg.model.freeze_encoder_epochs * run_data.steps_per_epoch)
    amp_dtype = precision.resolve_amp(cfg.train.amp, device)
    return Optimisation(loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
                        scaler=precision.grad_scaler(device, amp_dtype), amp_dtype=amp_dtype)


def restore(resume: Resume, model: nn.Module, opt: Optimisation, state: TrainState, seed: int) -> None:
    """Weights, and for a full resume also optimiser, schedule, scaler and counters, from a checkpoint."""
    ck = resume.state
    # With a weight average, `model` holds the average and `trained_model` the weights that train on.
    model.load_state_dict(ck.get("trained_model", ck["model"]))
    if not resume.full:
        return
    for part, target in (("optimizer", opt.optimizer), ("scheduler", opt.scheduler), ("scaler", opt.scaler)):
        target.load_state_dict(ck[part])
    state.load_state_dict(ck, seed=seed)
    log.info("resumed from %s at epoch %d, step %d (global step %d), lr %.6g, grad scale %s (growth tracker %s)",
             resume.path, state.epoch + 1, state.epoch_step, state.global_step, opt.optimizer.param_groups[0]["lr"],
             ck["scaler"].get("scale", "off"), ck["scaler"].get("_growth_tracker", "off"))


def weight_average(t: TrainConfig, model: nn.Module, saved: dict[str, Any] | None) -> WeightAverage | None:
    """The checkpoint's weight average, or a fresh one of `model` as it is now (initial or resumed)."""
    if t.ema_decay <= 0:
        return None
    ema = WeightAverage(model, t.ema_decay)
    if saved is not None and "ema" in saved:
        ema.module.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
    return ema


def announce(run: Run, state: TrainState) -> None:
    """The resolved config (run.dir/config.yaml and TensorBoard) and a one-line summary of the run."""
    cfg, d, denv = run.cfg, run.data, run.denv
    resolved = to_dict(cfg)
    resolved["train"]["global_batch_size"] = d.batches.global_batch
    resolved["data"].update(num_classes=d.classes.num_classes, ignore_index=d.classes.ignore_index,
                            class_names=d.classes.names, image_size=list(d.train_crop))
    vflip, rot90 = data.turns(cfg.data.augment, d.manifest, d.train_crop)
    resolved["data"]["augment"].update(vflip=vflip, rot90=rot90)
    if denv.is_main:
        run_dir = Path(cfg.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        clear_stop_marker(run_dir)
        atomic.write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        log.info("%s: %s parameters, %d classes, %d ranks on %s, started by %s, amp %s, global batch %s",
                 cfg.model.name, f"{count_parameters(run.nets.bare):,}", d.classes.num_classes, denv.world_size,
                 run.device.type, denv.describe(), precision.describe(cfg.train.amp, run.device, run.opt.amp_dtype),
                 d.batches.describe())
        log.info("run.dir %s: %s", run_dir, plan_text(run, state))
        if shards.rotation_invariant(d.manifest):
            unturned = rot90 == 0 and cfg.data.augment.rot90 is None
            log.info("the manifest says the data is rotation-invariant: data.augment.vflip=%g, rot90=%g%s", vflip,
                     rot90, f" (no quarter turns: the {d.train_crop[0]} x {d.train_crop[1]} crop is not square)"
                     if unturned else "")
    run.runlog.text("config", "    " + json.dumps(resolved, indent=2).replace("\n", "\n    "), state.global_step)


def plan_text(run: Run, state: TrainState) -> str:
    """How long the run will be: steps, epochs, the budget that may end it first, and where it starts."""
    t, per_epoch = run.cfg.train, run.data.steps_per_epoch
    text = f"{run.horizon.steps} steps ({t.epochs} epochs x {per_epoch} steps"
    text += f", capped by train.max_steps={t.max_steps})" if t.max_steps and t.max_steps < t.epochs * per_epoch else ")"
    text += f"; validation {validation_text(run.validations.cadence)}"
    if t.budget_minutes:
        text += (f"; train.budget_minutes={t.budget_minutes:g} rules: the step count is re-planned from the measured "
                 "rate, so the run ends when the budget is spent")
    if state.global_step:
        text += f"; resuming at step {state.global_step}"
    return text


def validation_text(cadence: Cadence) -> str:
    unit, amount = cadence.every.unit, cadence.every.amount
    if unit == "auto":
        return (f"after epoch 1, then as often as keeps it to about {AUTO_VAL_SHARE:.0%} of the time "
                "(train.val_every=auto)")
    return f"every {amount:g} {unit[:-1] if amount == 1 else unit} and at the end"


def eta_text(run: Run, state: TrainState) -> str:
    """`, about 3m20s left`: the pace since the first step (validation and checkpoints included) over the
    steps left."""
    if state.global_step == 0 or run.finished(state):
        return ""
    elapsed = run.elapsed()
    since, step = run.pace or (run.clock[0], 0)
    if state.global_step <= step:
        return ""
    left = (time.perf_counter() - since) / (state.global_step - step) * (run.horizon.steps - state.global_step)
    if run.cfg.train.budget_minutes:
        left = min(left, max(0.0, run.cfg.train.budget_minutes * 60 - elapsed))
    minutes, seconds = divmod(round(left), 60)
    return f", about {minutes}m{seconds:02d}s left" if minutes else f", about {seconds}s left"


def wrap_ddp(model: nn.Module, raw_model: nn.Module, device: torch.device) -> DDP:
    """DDP over `model`. Buffers are broadcast from rank 0 before every forward only where the ranks' own
    BatchNorm statistics would drift apart: with global (synchronised) BatchNorm or none they are equal
    already, and the broadcast is a collective and a dozen host-side launches per step for nothing."""
    local_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, (nn.SyncBatchNorm,
                   GlobalBatchNorm2d)) for m in raw_model.modules())
    sync = local_bn and distributed.world_size() > 1
    # torch 2.13 renamed the switch (and deprecated the old name); 2.4-2.12 know only broadcast_buffers.
    name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **{name: sync})


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


def compile_mode(mode: str, device: torch.device, world_size: int) -> str:
    """train.compile_mode with auto resolved: CUDA graphs on one GPU, where they were measured to pay (a step's
    hundreds of kernel launches become one graph replay); torch's default mode under DDP, where they never ran."""
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" and world_size == 1 else "default"
    return mode


def compile_step_parts(model: nn.Module, loss_fn: nn.Module, mode: str) -> tuple[nn.Module, nn.Module]:
    """`torch.compile` the model (before DDP wraps it, so DDP's bucketing sees the compiled graph) and the
    loss, whose eager softmax, one-hot and reductions would each be a kernel launch per step.

    Static shapes: training batches all have one shape, so a different one (a last, short batch) gets a
    graph of its own instead of turning every kernel into a slower dynamic-shape one.
    """
    return torch.compile(model, **compile_options(mode)), torch.compile(loss_fn, **compile_options(mode))


def compile_options(mode: str) -> dict[str, Any]:
    """torch.compile's arguments for a resolved train.compile_mode (see compile_step_parts)."""
    return {"mode": None if mode == "default" else mode, "dynamic": False}


def global_batchnorm(t: TrainConfig, device: torch.device, world_size: int) -> bool:
    """Whether BatchNorm takes its statistics over the global batch (`train.sync_bn`).

    `auto`: on GPUs, where NCCL makes the exchange cheap, and on CPU ranks of fewer than SMALL_RANK_BATCH
    samples each: over gloo the two exchanges per layer per step each wait for the slowest rank, which costs
    more steps than larger ranks gain from global statistics (lab/recipe.md).
    """
    if world_size == 1 or t.sync_bn == "off":
        return False
    return t.sync_bn == "on" or device.type == "cuda" or t.batch_size < SMALL_RANK_BATCH


def batchnorm_group(t: TrainConfig, device: torch.device) -> int:
    """Samples per BatchNorm statistic where BatchNorm is per rank (0: the rank's whole micro-batch).

    `train.bn_group` unset: SMALL_RANK_BATCH on CPU under `sync_bn=auto`, whose ranks of that many samples
    each keep their own statistics: then 1 process x 8 trains as 2 x 4 (lab/README.md, 1 x 8 against 2 x 4),
    and a run resumed on fewer ranks keeps normalising as it did. On GPUs `auto` is global, so 0.
    """
    if t.bn_group is not None:
        return t.bn_group
    return SMALL_RANK_BATCH if device.type == "cpu" and t.sync_bn == "auto" else 0


def build_train_model(cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
    """The bare model on `device`: the same initial weights on every rank, SyncBatchNorm where it works."""
    torch.manual_seed(cfg.train.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    model = build_model(cfg.model, num_classes)
    world = distributed.world_size()
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and global_batchnorm(cfg.train, device, world):
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # torch's SyncBatchNorm runs on CUDA only; the same statistics through the process group
            model = convert_to_global_batchnorm(model)
        log.info("BatchNorm statistics over the global batch (train.sync_bn=%s)", cfg.train.sync_bn)
    elif has_bn and 0 < (group := batchnorm_group(cfg.train, device)) < cfg.train.batch_size:
        model = convert_to_grouped_batchnorm(model, group)
        how = "unset: as ranks of that many do on CPU" if cfg.train.bn_group is None else group
        log.info("BatchNorm statistics over each group of %d of a rank's %d samples (train.bn_group=%s)",
                 group, cfg.train.batch_size, how)
    elif has_bn and world > 1:
        log.info("BatchNorm statistics over each rank's %d samples (train.sync_bn=%s; 'on' for the global "
                 "batch's)", cfg.train.batch_size, cfg.train.sync_bn)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def resolve_batch_plan(cfg: Config, world_size: int, saved: dict[str, Any] | None) -> data.BatchPlan:
    """Per-rank batch and accumulation for this world size.

    The global batch is `train.global_batch_size` if set, else the resumed run's (so a run checkpointed
    on N ranks continues on M with the same optimisation), else batch_size x accum_steps x ranks.
    """
    t = cfg.train
    as_given = data.BatchPlan(t.batch_size, t.accum_steps, world_size)
    saved_global = int(saved.get("global_batch", 0)) if saved else 0
    target = t.global_batch_size or saved_global or as_given.global_batch
    if target == as_given.global_batch and not t.global_batch_size:
        return as_given
    try:
        plan = data.plan_batches(target, world_size, max_per_rank=t.batch_size)
    except UserError:
        if not t.allow_batch_change:
            raise
        log.warning("global batch %d cannot be made on %d ranks; train.allow_batch_change: using %s",
                    target, world_size, as_given.describe())
        return as_given
    if (plan.per_rank, plan.accum_steps) != (t.batch_size, t.accum_steps):
        why = "train.global_batch_size" if t.global_batch_size else f"the resumed run's global batch ({saved_global})"
        log.info("batch per rank %d x accumulation %d (configured %d x %d) to keep %s on %d ranks: %s",
                 plan.per_rank, plan.accum_steps, t.batch_size, t.accum_steps, why, world_size, plan.describe())
    return plan


def train_one_epoch(run: Run, state: TrainState, meter: StepMeter, stop: distributed.StopRequest) -> bool:
    """Optimiser steps to the end of the epoch or of the step budget; True if the ranks agreed to stop."""
    cfg = run.cfg
    training_mode(run, state, announce=True)
    if run.train_stream is None:
        run.train_stream = iter(data.train_loader(cfg, run.data.manifest, cfg.data.root, run.denv.rank,
                                                  run.denv.world_size, state.epoch,
                                                  skip_steps=state.epoch_step, endless=True))
        meter.clock.mark("train loader (index)")
    batches = run.train_stream
    label = f"epoch {state.epoch + 1}/{cfg.train.epochs}"
    with progress(run.data.steps_per_epoch, label, run.denv.is_main and cfg.logging.progress,
                  initial=state.epoch_step) as bar:
        while state.epoch_step < run.data.steps_per_epoch:
            with meter.stepping():
                train_step(run, batches, meter)
            if meter.steps_run == 1:
                run.pace = (time.perf_counter(), state.global_step + 1)
            if meter.steps_run == 1 and run.denv.is_main:
                stages = startup_stages(meter)
                log.info("first step after %.1f s: %s", sum(t for _, t in stages),
                         ", ".join(f"{name} {t:.1f} s" for name, t in stages))
            state.epoch_step += 1
            state.global_step += 1
            bar.update(1)
            at_log = state.global_step % cfg.logging.log_every == 0
            if at_log:
                log_train_step(run, meter.flush(), state.global_step, bar)
                fit_budget(run, state)
            if state.global_step >= run.horizon.steps:
                break
            # Ranks agree on a stop at the same step: the check is a collective at steps every rank picks alike
            # (log steps, and often enough to stop within a launcher's grace period: StopRequest.due).
            if stop.due(state.global_step, cfg.logging.log_every) and stop.agreed(run.device, state.global_step):
                log.info("stop requested (%s): checkpointing at global step %d", stop.describe(), state.global_step)
                return True
            if state.epoch_step < run.data.steps_per_epoch and due_mid_epoch(run, state, at_log):
                meter.settle()
                with meter.pause():
                    validation_point(run, state, meter, f"Step {state.global_step} (epoch {state.epoch + 1}/"
                                     f"{cfg.train.epochs}, {state.epoch_step}/{run.data.steps_per_epoch})",
                                     meter.epoch_loss(reset=False), checkpoint_after=True)
                training_mode(run, state)
            elif cfg.checkpoint.every_steps and state.global_step % cfg.checkpoint.every_steps == 0:
                meter.settle()
                with meter.pause("checkpoints"):
                    save_checkpoint(run, state, snapshot=True)
    return False


def training_mode(run: Run, state: TrainState, announce: bool = False) -> None:
    """The stepped model in training mode, with a frozen encoder's BatchNorm statistics kept."""
    run.nets.step.train()
    if state.epoch < run.cfg.model.freeze_encoder_epochs:
        norms = freeze_encoder_batchnorm(run.nets.step)
        if announce:
            log.info("epoch %d: encoder frozen (learning rate 0, %d BatchNorm layers in eval mode)", state.epoch + 1,
                     norms)


def due_mid_epoch(run: Run, state: TrainState, at_log: bool) -> bool:
    """Whether a steps or minutes cadence asks for a validation at this step; minutes are read at log steps,
    where the ranks agree on the clock (a collective)."""
    cadence = run.validations.cadence
    if cadence.every.unit == "steps":
        return cadence.due(state.epoch, state.global_step, 0.0, epoch_end=False)
    if cadence.every.unit == "minutes" and at_log:
        return cadence.due(state.epoch, state.global_step, agreed_elapsed(run), epoch_end=False)
    return False


def agreed_elapsed(run: Run) -> float:
    """The run's wall time so far, the same on every rank (the slowest clock's): a collective. On the run's
    device: NCCL reduces CUDA tensors only."""
    return distributed.all_reduce_(torch.tensor([run.elapsed()], dtype=torch.float64, device=run.device),
                                   "max").item()


def train_step(run: Run, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], meter: StepMeter) -> None:
    """One optimiser step over `train.accum_steps` micro-batches; gradients all-reduce on the last one."""
    accum, device, nets, opt = run.cfg.train.accum_steps, run.device, run.nets, run.opt
    if run.cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are free to be overwritten
    for micro in range(accum):
        with meter.waiting_for_data():
            images, masks = next(batches)
        # uint8 over the bus, normalised and cast on the device.
        images = data.normalize(images.to(device, non_blocking=True), run.cfg.data.mean, run.cfg.data.std,
                                run.cfg.train.channels_last)
        masks = masks.to(device, non_blocking=True).long()
        sync = micro == accum - 1 or not run.denv.distributed
        with (contextlib.nullcontext() if sync else nets.step.no_sync()), precision.autocast(device, opt.amp_dtype):
            loss, parts = opt.loss_fn(nets.step(images), masks)
        opt.scaler.scale(loss / accum).backward()
    opt.scaler.unscale_(opt.optimizer)
    grad_norm = gradient_norm(nets.bare, run.cfg.train.grad_clip)
    # The gradients are all-reduced, so every rank reaches the same verdict, on the device.
    skipped = (~torch.isfinite(grad_norm)).float()
    precision.optimizer_step(opt.optimizer, opt.scaler, skipped)
    opt.optimizer.zero_grad(set_to_none=True)
    if is_per_iteration(opt.scheduler):
        opt.scheduler.step()
    if nets.ema is not None:
        nets.ema.update(nets.bare)
    meter.update(loss, parts, grad_norm, skipped)


def gradient_norm(model: nn.Module, clip: float) -> torch.Tensor:
    """The gradients' total L2 norm (logged, and non-finite means skip the step), clipped to `clip` if > 0.
    Without clipping nothing is rescaled: clip_grad_norm_ with an infinite bound still multiplies every
    gradient by 1."""
    if clip > 0 or not hasattr(torch.nn.utils, "get_total_norm"):  # get_total_norm: torch >= 2.6
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def log_train_step(run: Run, stats: StepStats, step: int, bar: Any) -> None:
    """Train scalars every `logging.log_every` steps; too many non-finite steps in a row end the run."""
    if stats.skipped:
        log.warning("%d non-finite step(s) skipped before step %d (%d in a row)", stats.skipped, step,
                    stats.skipped_in_a_row)
    if stats.skipped_in_a_row >= run.cfg.train.max_nonfinite:
        raise Diverged(f"{stats.skipped_in_a_row} non-finite steps in a row at step {step}: the run diverged; "
                       "lower optim.lr, set train.grad_clip, or try train.amp=bf16/off")
    cfg = run.cfg
    seconds = max(stats.seconds, 1e-9)
    images_per_s = stats.steps * cfg.train.accum_steps * cfg.train.batch_size * run.denv.world_size / seconds
    m = stats.means
    run.runlog.scalars({
        "train/loss": m["loss"], "train/ce": m["ce"], "train/dice": m["dice"], "train/grad_norm": m["grad_norm"],
        "train/lr": run.opt.optimizer.param_groups[0]["lr"], "train/images_per_s": images_per_s,
        "train/data_wait_fraction": stats.data_wait / seconds, "train/memory_mb": memory_mb(run.device),
        **({"train/grad_scale": run.opt.scaler.get_scale()} if run.opt.scaler.is_enabled() else {}),
    }, step)
    bar.set_postfix(loss=f"{m['loss']:.3f}", img_s=f"{images_per_s:.0f}")


def end_of_epoch(run: Run, state: TrainState, meter: StepMeter) -> None:
    """Validate (as `train.val_every` says, and at the end), step a plateau schedule, checkpoint."""
    cfg = run.cfg
    sync_weights(run)
    train_loss = meter.epoch_loss()
    number = state.epoch + 1  # epochs count from 1 wherever a user reads them
    if state.epoch_step >= run.data.steps_per_epoch:
        state.epoch, state.epoch_step = state.epoch + 1, 0
    fit_budget(run, state)  # before deciding whether this validation is the last, so its overlays are kept
    cadence = run.validations.cadence
    elapsed = agreed_elapsed(run) if cadence.every.unit == "minutes" else 0.0
    is_best = False
    if run.finished(state) or cadence.due(state.epoch, state.global_step, elapsed, epoch_end=True):
        is_best = validation_point(run, state, meter, f"Epoch {number}/{cfg.train.epochs}", train_loss)
    else:
        log.info("Epoch %d/%d: train loss=%.4f%s", number, cfg.train.epochs, train_loss, eta_text(run, state))
    with meter.pause("checkpoints"):
        save_checkpoint(run, state, is_best=is_best, snapshot=True)


def sync_weights(run: Run) -> None:
    """Every rank's buffers (BatchNorm statistics) as rank 0's: the weights validated and checkpointed."""
    distributed.sync_buffers(run.nets.bare)
    if run.nets.ema is not None:
        distributed.sync_buffers(run.nets.ema.module)


def validation_point(run: Run, state: TrainState, meter: StepMeter, label: str, train_loss: float,
                     checkpoint_after: bool = False) -> bool:
    """Validate the weights as they are now: metrics, the log line, pictures, a plateau schedule's step, the
    next validation's time. Returns whether this is the best mIoU so far; `checkpoint_after`: then write a
    checkpoint (epoch ends write theirs anyway)."""
    record = run.validations
    started = time.perf_counter()
    if state.epoch_step:  # mid-epoch (an epoch's end syncs anyway)
        sync_weights(run)
    with meter.pause("validation"):  # the metrics, pictures and logs it leaves too
        result = run_validation(run)
        m = result.metrics
        if not is_per_iteration(run.opt.scheduler):
            run.opt.scheduler.step(m["loss"])  # all-reduced: every rank decides the same
        number = state.epoch + 1 if state.epoch_step else state.epoch
        record.history.append({"epoch": number, "step": state.global_step,
                               "lr": run.opt.optimizer.param_groups[0]["lr"], "val_loss": m["loss"],
                               "miou": m["miou"], "train_loss": train_loss})
        record.last = m
        is_best = m["miou"] > state.best_miou
        state.best_miou = max(state.best_miou, m["miou"])
        log.info("%s: train loss=%.4f, val loss=%.4f, val mIoU=%.4f, pixel acc=%.4f (%d val samples)%s", label,
                 train_loss, m["loss"], m["miou"], m["pixel_accuracy"], result.samples_seen, eta_text(run, state))
        if run.denv.is_main:  # drawn and written beside the next steps
            run.runlog.later(log_validation, run, result, number, state.global_step, train_loss)
        # The next one's time, from figures every rank shares (the slowest rank's), so all decide alike.
        took, trained, elapsed = distributed.all_reduce_(torch.tensor(
            [time.perf_counter() - started, started - record.ended, run.elapsed()], dtype=torch.float64,
            device=run.device), "max").tolist()
        change = record.cadence.validated(state.epoch, state.global_step, elapsed, took, trained)
        if change and not run.finished(state):
            log.info("%s", change)
    if checkpoint_after:
        with meter.pause("checkpoints"):
            save_checkpoint(run, state, is_best=is_best, snapshot=True)
    record.ended = time.perf_counter()
    return is_best


def log_validation(run: Run, result: Validation, epoch: int, step: int, train_loss: float) -> None:
    """What one validation leaves on rank 0: TensorBoard, metrics.jsonl and the overlays (every validation's:
    a run may end at any one of them)."""
    cfg, classes = run.cfg, run.data.classes
    pictures = validation_pictures(result.examples, cfg.data.mean, cfg.data.std, classes.num_classes,
                                   classes.ignore_index, class_names=classes.names,
                                   colours=palette_for(run.data.manifest, classes.num_classes),
                                   keys=result.example_keys, display_bands=cfg.data.display_bands,
                                   raw=True, dtype=run.data.inputs.dtype)
    run.runlog.validation(result.metrics, result.matrix, result.samples_seen, classes.names, pictures, epoch,
                          step, train_loss)
    run.runlog.overlays(pictures)


def run_validation(run: Run) -> Validation:
    cfg, denv = run.cfg, run.denv
    share = data.val_share(run.data.manifest, cfg.data.val_split, denv.rank, denv.world_size)
    expected = shards.split_count(run.data.manifest, cfg.data.val_split)
    # The bar counts the whole split; the overlays are the split's first samples, wherever they were validated.
    with progress(expected, "val", denv.is_main and cfg.logging.progress, share=share) as bar:
        classes = run.data.classes
        result = validate(run.nets.evaluated, run.data.val_loader, classes.num_classes, classes.ignore_index,
                          run.device, cfg.data, run.opt.amp_dtype, cfg.train.channels_last,
                          keep=cfg.logging.overlays, progress=bar)
    if result.samples_seen != expected:
        raise RunFailed(f"validation saw {result.samples_seen} samples over all ranks, the manifest lists "
                        f"{expected} for split {cfg.data.val_split!r}")
    return result


def save_checkpoint(run: Run, state: TrainState, is_best: bool = False, snapshot: bool = False) -> None:
    """Every rank contributes its RNG state (a collective); rank 0 copies the state to host memory and hands
    it to its background writer, which writes last.pt, then best.pt and snapshots. Returns once the copy is
    taken (and the previous write is done: one in flight); a previous write's error is raised here."""
    state.train_seconds = run.elapsed()
    counters = state.state_dict()
    if not run.denv.is_main:
        return
    run.writer.wait()  # before the copy: one state in host memory at a time
    if run.writer.submitted == 0:  # rank 0 holds run.dir's lock: a temporary file there is a dead writer's
        checkpoint.remove_temporaries(run.ckpt_dir)
    classes = run.data.classes
    nets = run.nets
    averaged = {} if nets.ema is None else {"trained_model": nets.bare.state_dict(), "ema": nets.ema.state_dict()}
    host = checkpoint.to_host({
        "model": run.nets.evaluated.state_dict(),  # the bare module: no `module.`/`_orig_mod.` prefixes
        **averaged,
        "optimizer": run.opt.optimizer.state_dict(),
        "scheduler": run.opt.scheduler.state_dict(),
        "scaler": run.opt.scaler.state_dict(),
        **counters,
        "config": run.given_config,
        "global_batch": run.data.batches.global_batch,
        "world_size": run.data.batches.world_size,
        "num_classes": classes.num_classes,
        "ignore_index": classes.ignore_index,
        "class_names": classes.names,
        "train_crop": list(run.data.train_crop),  # what data.image_size=0 became
        # The packing scale (pack --max-size): inference brings inputs to it, as pack did to the training images.
        "max_size": run.data.manifest.get("max_size"),
        "tiling": run.data.manifest.get("tiling"),  # pack --tile: the tiles a scene was cut into
        "train_mean_hw": run.data.train_mean_hw,  # the frames it learnt from: inference warns far from them
        # What inference must feed the model: channels, pixel type, normalisation, and whether alpha is a band.
        "input": {**run.data.inputs.to_dict(), "alpha": shards.image_spec(run.data.manifest).alpha},
        "palette": palette_for(run.data.manifest, classes.num_classes).tolist(),  # the pictures' class colours
        "manifest_digest": run.data.manifest_digest,
        "versions": checkpoint.versions(),
    })
    folder, keep_last = run.ckpt_dir, run.cfg.checkpoint.keep_last
    name = checkpoint.snapshot_name(state.epoch, state.global_step) if snapshot and keep_last > 0 else None

    def copies() -> None:  # in the writer thread, once last.pt is in place
        if is_best:
            checkpoint.copy(folder / checkpoint.LAST, folder / checkpoint.BEST)
        if name is not None:
            checkpoint.copy(folder / checkpoint.LAST, folder / name)
            checkpoint.prune_snapshots(folder, keep_last)

    run.writer.submit(folder / checkpoint.LAST, host, copies)


def finish_checkpoints(run: Run) -> None:
    """Wait for the checkpoint write in flight. Its error is raised unless another exception is already
    leaving `train`, which it must not hide: then it is logged."""
    leaving = sys.exc_info()[1]  # called from a `finally`: the exception on its way out, if any
    try:
        run.writer.wait()
    except Exception as e:
        if leaving is None:
            raise
        log.error("the last checkpoint write failed too: %s", e)


def fit_budget(run: Run, state: TrainState) -> None:
    """With train.budget_minutes: set the run's step count to what fits in the budget at the rate so far
    (validation and checkpoints included). A collective: the ranks take the slowest clock, so they agree."""
    budget = run.cfg.train.budget_minutes * 60
    if budget <= 0:
        return
    elapsed = agreed_elapsed(run)  # called at log steps, which sync the host anyway
    if elapsed >= budget:
        run.horizon.steps = state.global_step  # spent: this step is the last
        return
    if state.global_step == 0:
        return
    per_step = elapsed / state.global_step  # start-up included: pessimistic early, exact by the end
    fits = max(state.global_step + int((budget - elapsed) / per_step), state.global_step + 1)
    # Rounded up to a log step, where the clock is read again before the run may end: while time is left it
    # goes on, so a pessimistic estimate (start-up counts in the rate) cannot end it before its budget.
    every = run.cfg.logging.log_every
    run.horizon.steps = min(-(-fits // every) * every, run.horizon.cap)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
