import subprocess
import sys

import pytest
import torch
from torch import nn

from seg_dist import checkpoint


def test_unwrap_strips_compile_and_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    bare = nn.Linear(2, 2)
    compiled = torch.compile(bare)  # wraps at once; compiles only when called
    assert list(compiled.state_dict()) == ["_orig_mod.weight", "_orig_mod.bias"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = DDP(compiled)
        assert list(wrapped.state_dict()) == ["module._orig_mod.weight", "module._orig_mod.bias"]
        assert checkpoint.unwrap(wrapped) is bare
        assert checkpoint.unwrap(DDP(bare)) is bare
    finally:
        dist.destroy_process_group()
    assert checkpoint.unwrap(compiled) is bare and checkpoint.unwrap(bare) is bare
    assert list(checkpoint.unwrap(compiled).state_dict()) == ["weight", "bias"]


def test_save_is_atomic_and_loads_weights_only_in_a_fresh_process(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    state = {"model": nn.Linear(3, 2).state_dict(), "step": 7, "config": {"a": [1, 2]}, "rng": [torch.get_rng_state()]}
    checkpoint.save(path, state)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary left behind
    code = (
        "import torch, sys; s = torch.load(sys.argv[1], weights_only=True); "
        "assert s['step'] == 7 and s['config'] == {'a': [1, 2]}; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(path, {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        checkpoint.save(path, {"step": 2, "bad": Unpicklable()})
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_resume_path_and_pruning(tmp_path):
    assert checkpoint.resume_path("auto", tmp_path) is None
    assert checkpoint.resume_path("never", tmp_path) is None
    with pytest.raises(checkpoint.CheckpointError, match=r"train\.resume=.*missing\.pt: checkpoint not found"):
        checkpoint.resume_path(str(tmp_path / "missing.pt"), tmp_path)
    ck = tmp_path / checkpoint.CHECKPOINT_DIR
    checkpoint.save(ck / checkpoint.LAST, {"step": 3})
    assert checkpoint.resume_path("auto", tmp_path) == ck / checkpoint.LAST
    for step in (5, 10, 15, 20):
        checkpoint.copy(ck / checkpoint.LAST, ck / checkpoint.snapshot_name(1, step))
    checkpoint.prune_snapshots(ck, keep_last=2)
    assert sorted(p.name for p in ck.iterdir()) == [
        "epoch0001-step00000015.pt", "epoch0001-step00000020.pt", "last.pt"]


def test_load_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"bad\.pt"):
        checkpoint.load(bad)


@pytest.fixture()
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs), where mounting is allowed."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_keeps_the_previous_checkpoint_and_says_how_much(small_disk):
    path = small_disk / "checkpoints" / "last.pt"
    checkpoint.save(path, {"step": 1, "w": torch.zeros(1000)})
    with pytest.raises(OSError, match=r"last\.pt: no space left on the device: needs 1\.\d MB, 0\.\d MB free in .*"
                                      r"any earlier last\.pt is intact"):
        checkpoint.save(path, {"step": 2, "w": torch.zeros(400_000)})  # 1.6 MB
    assert checkpoint.load(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left behind
    # A writer that runs out midway (size unknown up front) cleans up and says so too.
    from seg_dist import atomic

    full = pytest.raises(OSError, match=r"big\.bin: no space left on the device: ran out after")
    with full, atomic.writer(small_disk / "big.bin") as f:
        for _ in range(64):
            f.write(b"\0" * 16384)
    assert not (small_disk / "big.bin").exists() and sorted(p.name for p in small_disk.iterdir()) == ["checkpoints"]
