"""data.cache_mb: decoded samples kept in a rank's memory, and the cached validation share batched by size."""

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import png_bytes

from seg_dist import data, shards
from seg_dist.config import load_config
from seg_dist.data.cache import MIB, SampleCache, size_order
from seg_dist.models import build_model
from seg_dist.pack import PackOptions, pack
from seg_dist.validation import validate

NUM_CLASSES = 3
SIZES = [(128, 128), (128, 96), (96, 128)]  # (h, w); 30 samples of these decode to ~1.6 MiB, past 1 MiB


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 train and 30 val samples of three sizes, interleaved in key order (sample i has SIZES[i % 3])."""
    tmp = tmp_path_factory.mktemp("mixed")
    out = tmp / "shards"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        images, masks = tmp / split / "images", tmp / split / "masks"
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(30):
            h, w = SIZES[i % 3]
            (images / f"s{i:03d}.png").write_bytes(png_bytes(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
            (masks / f"s{i:03d}.png").write_bytes(png_bytes(rng.integers(0, NUM_CLASSES, (h, w), dtype=np.uint8)))
        pack(PackOptions(images, masks, out, NUM_CLASSES, split=split, samples_per_shard=7, workers=1))
    return out


def _cfg(root: Path, *overrides: str):
    cfg = load_config(None, [f"data.root={root}", "data.image_size=32", "train.batch_size=4", "data.workers=0",
                             "data.augment.scale=[0.75, 1.5]", "data.augment.affine=0.5", "data.augment.vflip=0.5",
                             "model.width=8", "model.depth=3", *overrides])
    return data.resolve_inputs(cfg, shards.load_manifest(root))


def _epochs(cfg, manifest, root, epochs: int, between=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = data.train_loader(cfg, manifest, str(root), 0, 1, 0, endless=True)
    stream, out = iter(loader), []
    steps = data.steps_per_epoch(manifest, cfg, 1)
    for epoch in range(epochs):
        if epoch and between is not None:
            between(loader)
        out += [tuple(t.clone() for t in next(stream)) for _ in range(steps)]
    stream.close()
    return out


def _same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (ia, ma), (ib, mb) in zip(a, b, strict=True):
        assert ia.dtype == ib.dtype and ma.dtype == mb.dtype
        assert torch.equal(ia, ib) and torch.equal(ma, mb)


def _spoil(root: Path) -> None:
    """Zero every shard of `root` in place: a sample read from them now fails, open files included."""
    for tar in root.glob("*.tar"):
        with open(tar, "r+b") as f:
            f.write(bytes(tar.stat().st_size))


def test_cached_epochs_are_the_uncached_ones_bit_for_bit_and_read_once(tiny_shards, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(tiny_shards, root)
    manifest = shards.load_manifest(root)
    cfg = _cfg(root)
    reference = _epochs(_cfg(root, "data.cache_mb=0"), manifest, root, 2)

    def after_first_epoch(loader) -> None:
        cache = loader.dataset.cache
        assert len(cache) == 64 and 0 < cache.nbytes <= cfg.data.cache_mb * MIB and not cache.full
        _spoil(root)  # the second epoch reads nothing: any read would now fail

    _same_batches(_epochs(cfg, manifest, root, 2, after_first_epoch), reference)


def test_cache_mb_0_and_loader_workers_cache_nothing(tiny_shards, caplog):
    manifest = shards.load_manifest(tiny_shards)
    with caplog.at_level(logging.INFO, logger="seg_dist.data.cache"):
        for setting, why in (("data.cache_mb=0", "data.cache_mb=0"), ("data.workers=1", "data.workers=1")):
            cfg = _cfg(tiny_shards, setting)
            assert data.train_loader(cfg, manifest, str(tiny_shards), 0, 1, 0).dataset.cache is None
            val = data.val_loader(cfg, manifest, str(tiny_shards), 0, 1)
            assert type(val.loader.dataset).__name__ == "_ValStream"
            lines = [r.getMessage() for r in caplog.records if why in r.getMessage()]
            assert [line.split(" not cached")[0] for line in lines] == [
                "train split", "val split (this rank's 16 of 16 samples)"]
            caplog.clear()
        cfg = _cfg(tiny_shards)
        data.train_loader(cfg, manifest, str(tiny_shards), 0, 1, 0)
    # 64 samples of 32 x 32 RGB + uint8 mask, and what each held sample costs besides
    assert caplog.messages == ["train split cached in memory after its first read: 0.3 MiB (data.cache_mb=1024)"]


def test_a_split_past_the_budget_is_not_cached(mixed, caplog):
    manifest = shards.load_manifest(mixed)
    with caplog.at_level(logging.INFO, logger="seg_dist.data.cache"):
        assert data.train_loader(_cfg(mixed, "data.cache_mb=1"), manifest, str(mixed), 0, 1, 0).dataset.cache is None
    assert caplog.messages == ["train split not cached in memory: 1.6 MiB decoded, more than data.cache_mb=1"]


def test_a_manifest_that_under_counts_cannot_grow_the_cache_past_the_budget(mixed):
    manifest = shards.load_manifest(mixed)
    lying = {**manifest, "splits": {k: {**v, "class_histogram": [1] * NUM_CLASSES} for k, v in
                                    manifest["splits"].items()}}
    cfg = _cfg(mixed, "data.cache_mb=1", "train.steps_per_epoch=8")  # 32 reads: every sample at least once
    reference = _epochs(_cfg(mixed, "data.cache_mb=0", "train.steps_per_epoch=8"), manifest, mixed, 2)
    held: list[SampleCache] = []
    _same_batches(_epochs(cfg, lying, mixed, 2, lambda loader: held.append(loader.dataset.cache)), reference)
    cache = held[0]
    assert cache.full and 0 < len(cache) < 30 and cache.nbytes <= MIB

    # Validation gives up and reads as without a cache, at every pass.
    cfg = _cfg(mixed, "data.cache_mb=1", "data.val_batch_size=4")
    val = data.val_loader(cfg, lying, str(mixed), 0, 1)
    plain = [keys for _, _, keys, _ in data.val_loader(_cfg(mixed, "data.cache_mb=0", "data.val_batch_size=4"),
                                                       manifest, str(mixed), 0, 1)]
    assert [keys for _, _, keys, _ in val] == plain == [keys for _, _, keys, _ in val]
    assert val.loader.dataset.gave_up and val.loader.dataset.cache.samples == []


def test_size_order_fills_batches_of_one_size_first():
    sizes = [(2, 2), (1, 1), (2, 2), (1, 1), (2, 2), (3, 3), (1, 1), (2, 2)]
    assert size_order(sizes, 2) == [1, 3, 0, 2, 4, 7, 6, 5]  # leftovers (1, 1) and (3, 3) share the last batch
    assert size_order([(5, 5)] * 5, 2) == list(range(5))  # one size: the order as read


def _val(cfg, manifest, root, rank: int = 0, world: int = 1) -> list:
    return list(data.val_loader(cfg, manifest, str(root), rank, world))


def test_cached_validation_batches_by_size_and_keeps_exact_once_over_ranks(mixed):
    manifest = shards.load_manifest(mixed)
    keys = set()
    for rank in range(2):
        cfg = _cfg(mixed, "data.val_batch_size=5")
        loader = data.val_loader(cfg, manifest, str(mixed), rank, 2)
        batches = list(loader)
        assert len(batches) == len(loader) == 3
        for images, masks, batch_keys, sizes in batches:
            assert len(set(sizes)) == 1 and images.shape[1:3] == masks.shape[1:] == sizes[0]
            keys.update(batch_keys)
        assert [b[2] for b in loader] == [b[2] for b in batches]  # every pass the same batches
        plain = _val(_cfg(mixed, "data.val_batch_size=5", "data.cache_mb=0"), manifest, mixed, rank, 2)
        assert sorted(k for b in plain for k in b[2]) == sorted(k for b in batches for k in b[2])
    assert len(keys) == 30

    # Batches that cannot all be of one size: as many as in the shards' order, with less padding.
    def padding(batches) -> int:
        return sum(i.shape[0] * i.shape[1] * i.shape[2] - sum(h * w for h, w in s) for i, _, _, s in batches)

    for rank in range(2):
        cached = _val(_cfg(mixed, "data.val_batch_size=4"), manifest, mixed, rank, 2)
        plain = _val(_cfg(mixed, "data.val_batch_size=4", "data.cache_mb=0"), manifest, mixed, rank, 2)
        assert len(cached) == len(plain) == 4 and padding(cached) < padding(plain) / 3


def _metrics(cfg, manifest, root) -> dict:
    classes = data.resolve_classes(cfg.data, manifest)
    torch.manual_seed(0)
    model = build_model(cfg.model, classes.num_classes)
    loader = data.val_loader(cfg, manifest, str(root), 0, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only wait on each other on a busy machine
    try:
        result = validate(model, loader, classes.num_classes, classes.ignore_index, torch.device("cpu"), cfg.data)
    finally:
        torch.set_num_threads(threads)
    return {"matrix": result.matrix, "seen": result.samples_seen, **result.metrics}


def test_validation_metrics_are_those_without_the_cache(tiny_shards, mixed):
    # One size: the very same batches, so the very same numbers.
    manifest = shards.load_manifest(tiny_shards)
    cached = _metrics(_cfg(tiny_shards), manifest, tiny_shards)
    plain = _metrics(_cfg(tiny_shards, "data.cache_mb=0"), manifest, tiny_shards)
    assert torch.equal(cached.pop("matrix"), plain.pop("matrix"))
    np.testing.assert_equal(cached, plain)  # NaN (a class never predicted) equal to NaN

    # Mixed sizes in batches of one size each: every image seen at its own size, as one at a time sees it
    # (a padded image is not: the network's later layers see the padding).
    manifest = shards.load_manifest(mixed)
    cached = _metrics(_cfg(mixed, "data.val_batch_size=5"), manifest, mixed)
    alone = _metrics(_cfg(mixed, "data.val_batch_size=1", "data.cache_mb=0"), manifest, mixed)
    assert torch.equal(cached.pop("matrix"), alone.pop("matrix")) and cached["seen"] == alone["seen"] == 30
    assert cached.keys() == alone.keys()
    for k in cached:  # the loss sums in another order
        np.testing.assert_allclose(cached[k], alone[k], rtol=1e-5, err_msg=k)


def test_a_validation_pass_broken_off_by_a_damaged_shard_caches_nothing_twice(tiny_shards, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(tiny_shards, root)
    manifest = shards.load_manifest(root)
    loader = data.val_loader(_cfg(root), manifest, str(root), 0, 1)
    last = sorted(root.glob("val-*.tar"))[-1]  # the samples of the shards before it are held by then
    last.write_bytes(bytes(last.stat().st_size))
    with pytest.raises(shards.ShardError, match=last.name):
        list(loader)
    shutil.copy(tiny_shards / last.name, last)
    keys = [k for b in loader for k in b[2]]
    assert len(keys) == len(set(keys)) == 16 and loader.loader.dataset.cache.complete
