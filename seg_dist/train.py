"""Train a segmentation model with DDP on WebDataset shards.

    torchrun --nproc_per_node=8 -m seg_dist.train --config configs/voc_unet_8gpu.yaml [key=value ...]
    python -m seg_dist.train --config configs/default.yaml          # one process, same code

Reads top to bottom: config and process group, data, model, loss, optimiser, resume, then the
loop. Every rank takes the same number of optimiser steps per epoch (the train loader guarantees
it), validates its exact-once share of the validation split, and joins one all-reduce for the
metrics. Rank 0 writes checkpoints, TensorBoard and metrics.jsonl. A stop request (SIGUSR1 or
SIGTERM, as SLURM sends before preemption) is honoured at a step boundary that all ranks agree on:
they write last.pt there and exit, and `train.resume=auto` continues from that exact step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import atomic, checkpoint, data, distributed, precision, shards
from .config import Config, ConfigError, load_config, to_dict
from .evaluate import Validation, validate
from .log import RunLog, setup_logging
from .losses import SegLoss, class_weights
from .metrics import confusion_matrix_figure
from .models import count_parameters, model_from_config
from .schedule import build_scheduler, is_per_iteration

log = logging.getLogger("seg_dist.train")

EXIT_STOPPED = 0  # a stop request was honoured and last.pt written; the launcher may requeue


class Diverged(RuntimeError):
    """Too many non-finite steps in a row; reported as one line, not a traceback."""


class StopRequest:
    """Set by a signal handler; read only at step boundaries, where ranks agree on it."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def install(self, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def describe(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "signalled on another rank"


def resolve_classes(cfg: Config, manifest: dict[str, Any]) -> tuple[int, int, list[str]]:
    """Class count, ignore index and names: the manifest's unless the config overrides them."""
    num_classes = cfg.data.num_classes or manifest["num_classes"]
    ignore_index = cfg.data.ignore_index if cfg.data.ignore_index is not None else manifest["ignore_index"]
    names = cfg.data.class_names or manifest.get("class_names") or []
    if len(names) != num_classes:
        names = [f"class_{i}" for i in range(num_classes)]
    return num_classes, ignore_index, names


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


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class TrainResult:
    model: nn.Module  # the bare trained model on this rank
    global_step: int
    stopped: bool  # True when a stop request ended the run early
    metrics: dict[str, Any]  # the last validation's (identical on every rank)
    history: list[dict[str, Any]]  # per validation: epoch, step, lr, val loss, mIoU, train loss


def train(
    cfg: Config, denv: distributed.DistEnv, device: torch.device, stop: StopRequest | None = None
) -> TrainResult:
    """The whole run on this rank."""
    stop = stop or StopRequest()
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / checkpoint.CHECKPOINT_DIR
    main = denv.is_main

    # ---- data ---------------------------------------------------------------------------------
    manifest = shards.load_manifest(cfg.data.root)
    num_classes, ignore_index, class_names = resolve_classes(cfg, manifest)
    micro_per_epoch = data.steps_per_epoch(manifest, cfg, denv.world_size)
    accum = cfg.train.accum_steps
    steps_per_epoch = max(1, micro_per_epoch // accum)  # optimiser steps
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    val_loader = data.val_loader(cfg, manifest, cfg.data.root, denv.rank, denv.world_size)
    val_expected = shards.split_count(manifest, cfg.data.val_split)
    manifest_digest = shards.manifest_digest(manifest)
    val_on_this_rank = data.val_share(manifest, cfg.data.val_split, denv.rank, denv.world_size)

    # ---- model, loss, optimiser ---------------------------------------------------------------
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    model: nn.Module = model_from_config(cfg.model, num_classes)
    if cfg.train.sync_bn and distributed.is_initialized():
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # DDP refuses SyncBatchNorm on CPU modules
            log.warning("train.sync_bn needs CUDA: keeping per-rank BatchNorm on %s", device.type)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    raw_model = model

    histogram = manifest["splits"][cfg.data.train_split]["class_histogram"]
    weights = class_weights(histogram, cfg.loss.class_weights)
    loss_fn = SegLoss(
        num_classes, ignore_index, cfg.loss.ce_weight, cfg.loss.dice_weight,
        weights.to(device) if weights is not None else None,
    )
    # Fused: it can skip a non-finite step on the device (`found_inf`), so no step waits on the host.
    optimizer = torch.optim.AdamW(
        raw_model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas,
        fused=True,
    )
    scheduler = build_scheduler(optimizer, cfg.schedule, total_steps)
    amp_dtype = precision.resolve_amp(cfg.train.amp, device)
    scaler = precision.grad_scaler(device, amp_dtype)

    # ---- resume -------------------------------------------------------------------------------
    epoch, epoch_step, global_step, best_miou = 0, 0, 0, -1.0
    resume_from = checkpoint.resume_path(cfg.train.resume, run_dir)
    if resume_from is None and cfg.train.resume == "never" and (ckpt_dir / checkpoint.LAST).exists():
        raise ConfigError(
            f"{ckpt_dir / checkpoint.LAST} exists and train.resume=never would overwrite it: "
            "choose another run.dir or resume"
        )
    if resume_from is not None:
        # On the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest to the device.
        state = checkpoint.load(resume_from, map_location="cpu")
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, epoch_step, global_step = state["epoch"], state["epoch_step"], state["global_step"]
        best_miou = state["best_miou"]
        rngs = state.get("rng", [])
        if len(rngs) == denv.world_size:
            set_rng_state(rngs[denv.rank])
        if state.get("manifest_digest") != manifest_digest:
            log.warning("the shards changed since %s was written", resume_from)
        log.info("resumed from %s at epoch %d, step %d (global step %d), lr %.6g, grad scale %s (growth tracker %s)",
                 resume_from, epoch, epoch_step, global_step, optimizer.param_groups[0]["lr"],
                 state["scaler"].get("scale", "off"), state["scaler"].get("_growth_tracker", "off"))

    if cfg.train.compile:
        model = torch.compile(model)  # before DDP, so DDP's bucketing sees the compiled graph
    if denv.distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    runlog = RunLog(run_dir, enabled=main, tensorboard=cfg.logging.tensorboard)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = to_dict(cfg)
        resolved["data"].update(num_classes=num_classes, ignore_index=ignore_index, class_names=class_names)
        atomic.write_text(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        runlog.text("config", "    " + json.dumps(resolved, indent=2).replace("\n", "\n    "), global_step)
        log.info(
            "%s: %s parameters, %d classes, %d ranks on %s, amp %s, %d steps/epoch x %d epochs, "
            "global batch %d",
            cfg.model.name, f"{count_parameters(raw_model):,}", num_classes, denv.world_size, device.type,
            precision.name(amp_dtype), steps_per_epoch, cfg.train.epochs,
            cfg.train.batch_size * accum * denv.world_size,
        )

    def save_checkpoint(is_best: bool = False, snapshot: bool = False) -> None:
        # Every rank contributes its RNG state (a collective), rank 0 writes.
        rngs = distributed.all_gather_objects(rng_state())
        if not main:
            return
        state = {
            "model": raw_model.state_dict(),  # the bare module: no `module.`/`_orig_mod.` prefixes
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "epoch_step": epoch_step,
            "global_step": global_step,
            "best_miou": best_miou,
            "rng": rngs,
            "config": to_dict(cfg),
            "num_classes": num_classes,
            "ignore_index": ignore_index,
            "class_names": class_names,
            "manifest_digest": manifest_digest,
            "versions": checkpoint.versions(),
        }
        checkpoint.save(ckpt_dir / checkpoint.LAST, state)
        if is_best:
            checkpoint.copy(ckpt_dir / checkpoint.LAST, ckpt_dir / checkpoint.BEST)
        if snapshot and cfg.checkpoint.keep_last > 0:
            checkpoint.copy(ckpt_dir / checkpoint.LAST, ckpt_dir / checkpoint.snapshot_name(epoch, global_step))
            checkpoint.prune_snapshots(ckpt_dir, cfg.checkpoint.keep_last)

    def run_validation() -> Validation:
        bar = tqdm(total=val_on_this_rank, desc="val", leave=False, disable=not (main and cfg.logging.progress))
        result = validate(
            raw_model, val_loader, num_classes, ignore_index, device, amp_dtype, cfg.train.channels_last,
            keep=cfg.logging.overlays if main else 0, progress=bar,
        )
        bar.close()
        if result.samples_seen != val_expected:
            raise RuntimeError(
                f"validation saw {result.samples_seen} samples over all ranks, the manifest lists "
                f"{val_expected} for split {cfg.data.val_split!r}"
            )
        return result

    # ---- the loop -----------------------------------------------------------------------------
    nonfinite_run = torch.zeros((), device=device)  # consecutive skipped steps
    metrics: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    sums = torch.zeros(6, device=device)  # loss, ce, dice, grad norm, steps taken, steps skipped since the last log
    logged_at, log_timer, data_wait = global_step, time.perf_counter(), 0.0
    stopped = global_step >= total_steps
    while epoch < cfg.train.epochs and not stopped:
        model.train()
        loader = data.train_loader(
            cfg, manifest, cfg.data.root, denv.rank, denv.world_size, epoch, skip_steps=epoch_step * accum
        )
        batches = iter(loader)
        bar = tqdm(total=steps_per_epoch, initial=epoch_step, desc=f"epoch {epoch}", leave=False,
                   disable=not (main and cfg.logging.progress))
        epoch_loss = torch.zeros(2, device=device)  # loss sum, steps
        while epoch_step < steps_per_epoch:
            for micro in range(accum):
                t0 = time.perf_counter()
                images, masks = next(batches)
                data_wait += time.perf_counter() - t0
                images = images.to(device, non_blocking=True)
                masks = masks.to(device, non_blocking=True)
                if cfg.train.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                # Only the last micro-step all-reduces gradients.
                sync = micro == accum - 1 or not denv.distributed
                with (contextlib.nullcontext() if sync else model.no_sync()), precision.autocast(device, amp_dtype):
                    logits = model(images)
                    loss, parts = loss_fn(logits, masks)
                scaler.scale(loss / accum).backward()
            scaler.unscale_(optimizer)
            max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), max_norm)
            # Gradients are already all-reduced, so every rank reaches the same verdict, on the device.
            skipped = (~torch.isfinite(grad_norm)).float()
            if scaler.is_enabled():
                scaler.step(optimizer)  # fp16: the scaler hands its own found_inf to the fused optimiser
            else:
                optimizer.found_inf, optimizer.grad_scale = skipped, None
                optimizer.step()
                del optimizer.found_inf, optimizer.grad_scale
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if is_per_iteration(scheduler):
                scheduler.step()
            epoch_step += 1
            global_step += 1
            bar.update(1)
            # Running sums stay on the device; a skipped step adds to the counts only.
            values = torch.stack([loss.detach(), parts["ce"], parts["dice"], grad_norm.detach()]).float()
            sums[:4] += torch.where(skipped.bool(), torch.zeros_like(values), values)
            sums[4:] += torch.stack([1 - skipped, skipped])
            nonfinite_run = (nonfinite_run + 1) * skipped
            epoch_loss += torch.where(skipped.bool(), torch.zeros(2, device=device),
                                      torch.stack([values[0], torch.ones((), device=device)]))

            at_log = global_step % cfg.logging.log_every == 0
            if at_log:
                *totals, n_ok, n_skipped, in_a_row = torch.cat([sums, nonfinite_run.view(1)]).tolist()  # one sync
                if n_skipped:
                    log.warning("%d non-finite step(s) skipped before step %d (%d in a row)", n_skipped,
                                global_step, in_a_row)
                if in_a_row >= cfg.train.max_nonfinite:
                    raise Diverged(
                        f"{int(in_a_row)} non-finite steps in a row at step {global_step}: the run "
                        "diverged; lower optim.lr, set train.grad_clip, or try train.amp=bf16/off"
                    )
                n = max(1, global_step - logged_at)
                loss_avg, ce_avg, dice_avg, norm_avg = (t / max(1.0, n_ok) for t in totals)
                elapsed = time.perf_counter() - log_timer
                images_per_s = n * accum * cfg.train.batch_size * denv.world_size / max(elapsed, 1e-9)
                runlog.scalars({
                    "train/loss": loss_avg, "train/ce": ce_avg, "train/dice": dice_avg,
                    "train/grad_norm": norm_avg, "train/lr": optimizer.param_groups[0]["lr"],
                    "train/images_per_s": images_per_s, "train/data_wait_fraction": data_wait / elapsed,
                    "train/memory_mb": memory_mb(device),
                    **({"train/grad_scale": scaler.get_scale()} if scaler.is_enabled() else {}),
                }, global_step)
                bar.set_postfix(loss=f"{loss_avg:.3f}", img_s=f"{images_per_s:.0f}")
                sums.zero_()
                logged_at, log_timer, data_wait = global_step, time.perf_counter(), 0.0

            if global_step >= total_steps:
                stopped = True
                break
            # Ranks agree on a stop at the same step: the check is a collective at a fixed cadence.
            if at_log and distributed.any_rank(stop.requested, device):
                log.info("stop requested (%s): checkpointing at global step %d", stop.describe(), global_step)
                distributed.sync_buffers(raw_model)
                save_checkpoint()
                bar.close()
                runlog.close()
                return TrainResult(raw_model, global_step, True, metrics, history)
            if cfg.checkpoint.every_steps and global_step % cfg.checkpoint.every_steps == 0:
                save_checkpoint(snapshot=True)
        bar.close()

        # ---- end of epoch: validate, schedule, checkpoint ------------------------------------
        distributed.sync_buffers(raw_model)  # the weights checkpointed and validated are rank 0's
        distributed.all_reduce_(epoch_loss)  # the train loss reported is over all ranks
        train_loss = (epoch_loss[0] / epoch_loss[1].clamp(min=1)).item()
        finished_epoch = epoch
        if epoch_step >= steps_per_epoch:
            epoch, epoch_step = epoch + 1, 0
        is_last = stopped or epoch >= cfg.train.epochs
        is_best = False
        if is_last or epoch % cfg.train.val_every == 0:
            result = run_validation()
            metrics = result.metrics
            if not is_per_iteration(scheduler):
                scheduler.step(metrics["loss"])  # all-reduced: every rank decides the same
            history.append({"epoch": finished_epoch, "step": global_step, "lr": optimizer.param_groups[0]["lr"],
                            "val_loss": metrics["loss"], "miou": metrics["miou"], "train_loss": train_loss})
            is_best = metrics["miou"] > best_miou
            best_miou = max(best_miou, metrics["miou"])
            log.info("Epoch %d: train loss=%.4f, val loss=%.4f, val mIoU=%.4f, pixel acc=%.4f (%d val samples)",
                     finished_epoch, train_loss, metrics["loss"], metrics["miou"], metrics["pixel_accuracy"],
                     result.samples_seen)
            if main:
                pictures = example_pictures(result, cfg, num_classes, ignore_index)
                write_validation_logs(runlog, result, class_names, pictures, finished_epoch, global_step, train_loss)
                if is_last:
                    save_overlays(run_dir / "overlays", pictures)
        else:
            log.info("Epoch %d: train loss=%.4f", finished_epoch, train_loss)
        save_checkpoint(is_best=is_best, snapshot=True)
        if not stopped and distributed.any_rank(stop.requested, device):
            log.info("stop requested (%s) at the end of an epoch, global step %d", stop.describe(), global_step)
            runlog.close()
            return TrainResult(raw_model, global_step, True, metrics, history)

    if main and metrics:
        log.info("done: best val mIoU %.4f; checkpoints in %s, TensorBoard in %s", best_miou, ckpt_dir,
                 run_dir / "tb")
    runlog.close()
    return TrainResult(raw_model, global_step, False, metrics, history)


def example_pictures(
    result: Validation, cfg: Config, num_classes: int, ignore_index: int
) -> list[np.ndarray]:
    """image | ground truth | prediction, side by side, for each kept validation example."""
    from .visualize import denormalize, enlarge, overlay_triptych

    return [
        enlarge(overlay_triptych(denormalize(image, cfg.data.mean, cfg.data.std), target.numpy(), pred.numpy(),
                                 num_classes, ignore_index))
        for image, target, pred in result.examples
    ]


def save_overlays(folder: Path, pictures: list[np.ndarray]) -> None:
    from .visualize import save_png

    folder.mkdir(parents=True, exist_ok=True)
    for i, picture in enumerate(pictures):
        save_png(folder / f"val_{i:03d}.png", picture)


def write_validation_logs(
    runlog: RunLog, result: Validation, class_names: list[str], pictures: list[np.ndarray], epoch: int, step: int,
    train_loss: float,
) -> None:
    m = result.metrics
    runlog.scalars({"val/loss": m["loss"], "val/miou": m["miou"], "val/pixel_accuracy": m["pixel_accuracy"],
                    "val/mean_dice": m["mean_dice"]}, step)
    runlog.scalars({f"val_iou/{name}": iou for name, iou in zip(class_names, m["per_class_iou"], strict=True)
                    if not math.isnan(iou)}, step)
    runlog.image("val/confusion_matrix", confusion_matrix_figure(result.matrix, class_names), step)
    for i, picture in enumerate(pictures):
        runlog.image(f"val_overlay/{i}", picture, step)
    runlog.jsonl({
        "epoch": epoch, "step": step, "train_loss": train_loss, "val_loss": m["loss"], "miou": m["miou"],
        "pixel_accuracy": m["pixel_accuracy"], "mean_dice": m["mean_dice"],
        "per_class_iou": dict(zip(class_names, m["per_class_iou"], strict=True)),
        "samples": result.samples_seen,
    })
    runlog.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m seg_dist.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="key.sub=value, e.g. train.epochs=5 model.width=32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = StopRequest()
    stop.install()
    with distributed.setup(cfg.train.device) as (denv, device):
        setup_logging(denv.rank)
        if device.type == "cpu":
            # N CPU ranks on one node would otherwise each start a thread per core and thrash.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // denv.local_world_size))
        try:
            result = train(cfg, denv, device, stop)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            log.error("%s", e)
            return 2
        except Diverged as e:
            log.error("%s", e)
            return 1
    return EXIT_STOPPED if result.stopped else 0


if __name__ == "__main__":
    sys.exit(main())
