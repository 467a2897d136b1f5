"""Resuming a run somewhere else: on another number of ranks, or past an unreadable last.pt."""

from __future__ import annotations

import logging
import signal

import pytest
import torch
import torch.multiprocessing as mp
from helpers import REPO, as_rank, free_port, tiny_overrides

from seg_dist import checkpoint, distributed
from seg_dist.config import load_config
from seg_dist.errors import UserError
from seg_dist.shards import ShardError
from seg_dist.trainer import train

STEPS_PER_EPOCH = 64 // 8  # 64 train samples, global batch 8 (2 ranks x 4, or 1 rank x 4 x 2)


def _run(overrides: list[str], world: int, rank: int = 0, port: int = 0, stop_at_once: bool = False) -> None:
    if world > 1:
        as_rank(rank, world, port)
    torch.set_num_threads(1)
    stop = distributed.StopRequest()
    if stop_at_once:
        stop.signal = signal.SIGUSR1  # as if preempted: all ranks stop at the first step they check, mid-epoch
    with distributed.setup() as (denv, device):
        train(load_config(REPO / "configs" / "default.yaml", overrides), denv, device, stop)


def _rank(rank: int, world: int, port: int, overrides: list[str], stop_at_once: bool) -> None:
    _run(overrides, world, rank, port, stop_at_once)


def _train(overrides: list[str], world: int, stop_at_once: bool = False) -> None:
    if world == 1:
        _run(overrides, 1, stop_at_once=stop_at_once)
    else:
        mp.spawn(_rank, args=(world, free_port(), overrides, stop_at_once), nprocs=world)


@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size_keeps_global_batch_and_schedule(tiny_shards, tmp_path, caplog, first, then):
    run = tmp_path / "run"
    # batch_size is the per-rank maximum; the global batch of 8 is what must survive the move.
    overrides = tiny_overrides(tiny_shards, run, "train.epochs=2", "train.global_batch_size=8",
                               "schedule.warmup_iters=3", "train.resume=auto")
    _train(overrides, first, stop_at_once=True)
    stopped = checkpoint.load(run / "checkpoints" / "last.pt")
    at = stopped["global_step"]
    assert 0 < at < STEPS_PER_EPOCH and stopped["global_batch"] == 8 and stopped["world_size"] == first
    lr_at_stop = stopped["optimizer"]["param_groups"][0]["lr"]

    # The other world size, resumed in this process (rank 0's log is captured).
    with caplog.at_level(logging.INFO):
        if then == 1:
            _train(overrides, 1)
        else:
            _train(overrides, 2)
            caplog.clear()
    final = checkpoint.load(run / "checkpoints" / "last.pt")
    assert final["global_step"] == 2 * STEPS_PER_EPOCH  # the same schedule length as on `first` ranks
    assert final["global_batch"] == 8 and final["world_size"] == then
    if then == 1:
        log = caplog.text
        assert "batch per rank 4 x accumulation 2 (configured 4 x 1)" in log
        assert f"(global step {at}), lr {lr_at_stop:.6g}" in log  # same schedule position
        assert "RNG states saved by 2 rank(s), resuming on 1" in log


def test_resume_from_another_world_size_without_a_fitting_batch_is_an_error(tiny_shards, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, run, "train.epochs=1", "train.batch_size=3")
    _train(overrides, 2, stop_at_once=True)  # a global batch of 6
    assert checkpoint.load(run / "checkpoints" / "last.pt")["global_batch"] == 6
    cfg = load_config(REPO / "configs" / "default.yaml", [*overrides, "train.batch_size=4"])
    # On 4 ranks 6 cannot be made; on 1 rank it can (4 is the maximum: 3 x 2).
    with pytest.raises(UserError, match="global batch of 6 cannot be split over 4 ranks"):
        from seg_dist.trainer import resolve_batch_plan

        resolve_batch_plan(cfg, 4, checkpoint.load(run / "checkpoints" / "last.pt"))
    cfg.train.allow_batch_change = True
    assert resolve_batch_plan(cfg, 4, checkpoint.load(run / "checkpoints" / "last.pt")).global_batch == 16


def test_run_stopped_mid_epoch_goes_on_with_the_batches_it_would_have_had(tiny_shards, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    extra = ("train.epochs=1", "train.amp=off", "train.ema_decay=0.9", "train.resume=auto")
    _train(tiny_overrides(tiny_shards, straight, *extra), 1)
    _train(tiny_overrides(tiny_shards, split, *extra), 1, stop_at_once=True)
    assert 0 < checkpoint.load(split / "checkpoints" / "last.pt")["global_step"] < 16  # mid-epoch
    _train(tiny_overrides(tiny_shards, split, *extra), 1)
    a, b = (checkpoint.load(run / "checkpoints" / "last.pt") for run in (straight, split))
    assert a["global_step"] == b["global_step"] == 64 // 4
    for key in a["model"]:  # a resumed epoch that drew other samples would end elsewhere
        torch.testing.assert_close(b["trained_model"][key], a["trained_model"][key])
        torch.testing.assert_close(b["model"][key], a["model"][key])


def test_unreadable_last_falls_back_to_the_newest_snapshot(tiny_shards, tmp_path, caplog):
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, run, "train.epochs=2", "train.batch_size=8")
    _train([*overrides, "train.epochs=1"], 1)
    ck = run / "checkpoints"
    snapshot = ck / checkpoint.snapshot_name(1, STEPS_PER_EPOCH)
    assert snapshot.is_file()
    (ck / "last.pt").unlink()  # a new file, not the snapshot's hard-linked content
    (ck / "last.pt").write_bytes(b"cut short by a full quota")
    with caplog.at_level(logging.WARNING):
        _train(overrides, 1)
    assert f"resuming from {snapshot} instead: {ck / 'last.pt'}: cannot load checkpoint" in caplog.text
    assert checkpoint.load(ck / "last.pt")["global_step"] == 2 * STEPS_PER_EPOCH
    # An explicit path stays an error: the user named that file.
    (ck / "bad.pt").write_bytes(b"junk")
    cfg = load_config(REPO / "configs" / "default.yaml", [*overrides, f"train.resume={ck / 'bad.pt'}"])
    with pytest.raises(RuntimeError, match=r"bad\.pt: cannot load checkpoint"):
        train(cfg, distributed.DistEnv(), torch.device("cpu"))



def _copy_shards(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_is_caught_at_start_naming_it(tiny_shards, tmp_path):
    shards_dir = _copy_shards(tiny_shards, tmp_path / "shards")
    victim = sorted(shards_dir.glob("train-*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:5000])  # a copy cut short
    cfg = load_config(REPO / "configs" / "default.yaml", tiny_overrides(shards_dir, tmp_path / "run"))
    with pytest.raises(ShardError, match=rf"{victim}: 5000 bytes, the manifest lists \d+ \(truncated or replaced\)"):
        train(cfg, distributed.DistEnv(), torch.device("cpu"))


def test_damaged_shard_mid_run_is_one_line_and_keeps_the_checkpoint(tiny_shards, tmp_path):
    import subprocess
    import sys

    from helpers import child_env

    shards_dir = _copy_shards(tiny_shards, tmp_path / "shards")
    run = tmp_path / "run"
    args = ["--config", "configs/default.yaml", *tiny_overrides(shards_dir, run, "train.epochs=1", "data.workers=1")]
    subprocess.run([sys.executable, "-m", "seg_dist.train", *args], cwd=REPO, env=child_env(), check=True,
                   capture_output=True)
    before = (run / "checkpoints" / "last.pt").read_bytes()
    for shard in shards_dir.glob("train-*.tar"):  # same size, so only reading can tell: a bad header
        data = bytearray(shard.read_bytes())
        data[:512] = b"\xff" * 512
        shard.write_bytes(bytes(data))
    out = subprocess.run([sys.executable, "-m", "seg_dist.train", *args, "train.epochs=2"], cwd=REPO,
                         env=child_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "unreadable shard" in line]
    assert len(errors) == 1 and "Traceback" not in out.stdout + out.stderr, out.stdout[-3000:]
    assert "train-0000" in errors[0] and "re-copy it" in errors[0]
    assert (run / "checkpoints" / "last.pt").read_bytes() == before  # the last checkpoint is intact
    # With data.verify=full the same damage is found before training starts.
    full = subprocess.run([sys.executable, "-m", "seg_dist.train", *args, "train.epochs=2", "data.verify=full"],
                          cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    assert full.returncode == 2 and "sha256 differs from the manifest's" in full.stdout + full.stderr
