"""Train a segmentation model with DDP on WebDataset shards.

    torchrun --nproc_per_node=8 -m seg_dist.train --config configs/voc_unet_8gpu.yaml [key=value ...]
    python -m seg_dist.train --config configs/default.yaml          # one process, same code
    seg-dist train --config configs/default.yaml

The command: arguments, config, signals and the process group. The loop is `seg_dist.trainer`.
Exit 0 when the run finished or stopped on request with a checkpoint, 1 when it failed (e.g. diverged),
2 for bad input. A stop is requested by SIGUSR1, SIGTERM, SIGINT (Ctrl-C; a second one interrupts at
once, exit 130) or SIGHUP, or by the death of the launcher (torchrun, srun) that started this process; the
run then leaves RUN_DIR/STOPPED (JSON: global_step, signal, requeued) so a job script can tell it from a
finished one; under SLURM it requeues its job.

Rank 0 logs the start-up at the first step and ends with the run's goodput: the steps' share of the wall time
from this process's start, and where the rest went (start-up, validation, checkpoints, data waits, the rest),
also as TensorBoard's `goodput/` scalars and RUN_DIR/goodput.json (a resumed run's: this process's only).
"""

from __future__ import annotations

import os
import time

# Read before the imports below, which take seconds (torch): a launcher that dies meanwhile is noticed too.
STARTED_BY = os.getppid()
# Where the run's wall time starts where /proc cannot tell when this process started (see StartClock.for_command).
IMPORTED_AT: float | None = time.perf_counter()

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from . import cli, distributed  # noqa: E402
from .config import Config, load_config  # noqa: E402
from .errors import RunFailed  # noqa: E402
from .runlog import StartClock, setup_logging, write_stop_marker  # noqa: E402
from .trainer import TrainResult, train  # noqa: E402

log = logging.getLogger("seg_dist.train")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg_dist.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.epochs=5 model.width=32")
    return p.parse_args(argv)


def _train(argv: Sequence[str] | None) -> int:
    global IMPORTED_AT
    # The wall time the run's goodput counts starts at this process's start (torchrun's workers: each its
    # own, after the launcher's start-up); a second run in one process counts from its call.
    clock = StartClock.for_command(IMPORTED_AT)
    IMPORTED_AT = None
    clock.mark("interpreter and imports")
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    clock.mark("config")
    stop = distributed.StopRequest()
    # A launcher (torchrun, srun) outlives its workers, so its death ends the run. A shell does not: a run
    # started with nohup or disowned goes on after its shell has exited (and a terminal's SIGHUP is a stop).
    stop.install(parent=STARTED_BY if distributed.read_env().launcher != "none" else None)
    if stop.parent_exited:  # the launcher died while this process started: nothing to save, no one to train with
        raise RunFailed(f"not started: {stop.describe()} before training began")
    with distributed.setup(cfg.train.device, timeout_minutes=cfg.train.dist_timeout_minutes) as (denv, device):
        clock.mark("rendezvous")
        setup_logging(denv.rank)
        distributed.share_cpu_threads(denv, device, pin=cfg.train.pin_cpu_ranks)
        result = train(cfg, denv, device, stop, clock)
    if result.stopped and denv.is_main:
        after_stop(cfg, denv, result)
    elif result.stopped:  # a warning: what other ranks log; each node's log then shows its ranks stopped in order
        log.warning("stopped at global step %d (%s) with rank 0, which saved the checkpoint", result.global_step,
                    result.stop_signal)
    return cli.EXIT_OK


def after_stop(cfg: Config, denv: distributed.DistEnv, result: TrainResult) -> None:
    """Requeue a SLURM job that stopped on request, and leave RUN_DIR/STOPPED for the job script to read.

    Runs after every rank has left the process group: the checkpoint is complete, and SLURM may end the
    job as soon as it is requeued.
    """
    requeued = False
    if cfg.train.requeue and denv.slurm_job_id:
        requeued, message = distributed.requeue_slurm_job()
        (log.info if requeued else log.warning)("%s", message)
    write_stop_marker(cfg.run.dir, {"global_step": result.global_step, "signal": result.stop_signal,
                                    "requeued": requeued})
    log.info("stopped at global step %d (%s); `train.resume=auto` continues from there", result.global_step,
             result.stop_signal)


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(_train, argv)


if __name__ == "__main__":
    sys.exit(main())
