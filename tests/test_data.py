import json
import multiprocessing
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from helpers import jpeg_bytes, png_bytes

from seg_dist import data
from seg_dist.config import DataConfig, load_config
from seg_dist.errors import UserError
from seg_dist.shards import ShardError

NUM_CLASSES, IGNORE = 6, 255


def make_shards(root: Path, splits: dict[str, list[int]], seed: int = 0, size: tuple[int, int] = (32, 48)) -> dict:
    """Tiny shards of random images (32-48 px, mixed sizes, png and jpg) and a manifest."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": "seg_dist-shards/1",
        "num_classes": NUM_CLASSES,
        "ignore_index": IGNORE,
        "class_names": [f"c{i}" for i in range(NUM_CLASSES)],
        "splits": {},
    }
    for split, counts in splits.items():
        entries = []
        for s, count in enumerate(counts):
            name = f"{split}-{s:06d}.tar"
            with wds.TarWriter(str(root / name)) as sink:
                for i in range(count):
                    h, w = (int(v) for v in rng.integers(size[0], size[1] + 1, 2))
                    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                    mask = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
                    mask[0, :] = IGNORE
                    key = f"{split}_{s}_{i:04d}"
                    ext = "png" if i % 2 else "jpg"
                    sink.write(
                        {
                            "__key__": key,
                            ext: png_bytes(image) if ext == "png" else jpeg_bytes(image),
                            "mask.png": png_bytes(mask, palette_mode=i % 3 == 0),
                            "json": json.dumps({"key": key, "h": h, "w": w}).encode(),
                        }
                    )
            entries.append(
                {"name": name, "num_samples": count, "bytes": (root / name).stat().st_size, "sha256": "0" * 64}
            )
        manifest["splits"][split] = {
            "num_samples": sum(counts),
            "shards": entries,
            "class_histogram": [0] * NUM_CLASSES,
            "ignored_pixels": 0,
            "image_size": {},
            "rejects": [],
        }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _cfg(root: Path, *overrides: str):
    base = [
        f"data.root={root}",
        "data.image_size=32",
        "train.batch_size=2",
        "data.augment.scale=[0.75, 1.5]",
        "data.augment.affine=0.5",
        "data.augment.vflip=0.5",
    ]
    return load_config(None, [*base, *overrides])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    manifest = make_shards(root, {"train": [5, 1, 7], "val": [5, 1, 7], "one": [9]})
    return root, manifest


def _val_keys(cfg, manifest, root, split, world, **kw) -> list[list[str]]:
    return [
        [k for _, _, keys, _ in data.val_loader(cfg, manifest, str(root), r, world, split=split, **kw) for k in keys]
        for r in range(world)
    ]


def _all_keys(manifest, split: str) -> set[str]:
    counts = [s["num_samples"] for s in manifest["splits"][split]["shards"]]
    return {f"{split}_{s}_{i:04d}" for s, c in enumerate(counts) for i in range(c)}


# --- reader ------------------------------------------------------------------------------------


def test_read_shard_gives_raw_fields_and_decode_sample_turns_them_into_arrays(dataset):
    root, _ = dataset
    url = str(root / "val-000000.tar")
    raws = list(data.read_shard(url))
    assert [r["__key__"] for r in raws] == [f"val_0_{i:04d}" for i in range(5)]
    first = raws[0]
    assert first["__url__"] == url and {"jpg", "mask.png", "json"} <= set(first)
    assert all(isinstance(first[k], bytes) for k in ("jpg", "mask.png", "json"))
    decoded = data.decode_sample(first)
    assert decoded["key"] == "val_0_0000" and decoded["url"] == url and decoded["meta"]["key"] == "val_0_0000"
    assert decoded["image"].dtype == np.uint8 and decoded["image"].shape[:2] == decoded["mask"].shape
    # iter_samples is read_shard then decode_sample, shard after shard.
    keys = [s["key"] for s in data.iter_samples([url, str(root / "val-000001.tar")])]
    assert keys == [r["__key__"] for r in raws] + ["val_1_0000"]
    with pytest.raises(ShardError, match=r"needs an image .* and mask\.png"):
        data.decode_sample({"__key__": "k", "__url__": url, "mask.png": first["mask.png"]})
    with pytest.raises(ShardError, match=r"nowhere\.tar: cannot open"):
        list(data.read_shard(str(root / "nowhere.tar")))


# --- classes -----------------------------------------------------------------------------------


def test_classes_come_from_the_manifest_unless_the_config_overrides_them(dataset):
    root, manifest = dataset
    assert data.resolve_classes(DataConfig(root=str(root)), manifest) == data.ClassInfo(
        NUM_CLASSES, IGNORE, [f"c{i}" for i in range(NUM_CLASSES)])
    # More classes than packed, and an ignore index no class uses, fit the shards.
    more = data.resolve_classes(DataConfig(root=str(root), num_classes=8, ignore_index=-1), manifest)
    assert more == data.ClassInfo(8, -1, [f"class_{i}" for i in range(8)])
    names = [f"n{i}" for i in range(NUM_CLASSES)]
    assert data.resolve_classes(DataConfig(root=str(root), class_names=names), manifest).names == names


def test_fewer_classes_than_the_shards_hold_is_a_user_error(dataset):
    root, manifest = dataset
    with pytest.raises(UserError, match=rf"data\.num_classes=4 is less than the 6 classes of .*{root.name}/manifest"
                                        r"\.json \(its shards hold labels up to 5\)"):
        data.resolve_classes(DataConfig(root=str(root), num_classes=4), manifest)


def test_an_ignore_index_that_is_a_class_is_a_user_error(dataset):
    root, manifest = dataset
    with pytest.raises(UserError, match=r"data\.ignore_index=0 is class 0 of 6 .*ignore index of .*manifest\.json "
                                        r"is 255"):
        data.resolve_classes(DataConfig(root=str(root), ignore_index=0), manifest)
    # The manifest's own ignore index stays allowed wherever it lies.
    assert data.resolve_classes(DataConfig(root=str(root), ignore_index=IGNORE), manifest).ignore_index == IGNORE


def test_class_names_of_the_wrong_length_are_a_user_error(dataset):
    root, manifest = dataset
    with pytest.raises(UserError, match=r"data\.class_names has 2 names for 6 classes"):
        data.resolve_classes(DataConfig(root=str(root), class_names=["a", "b"]), manifest)
    with pytest.raises(UserError, match=r"data\.class_names has 6 names for 7 classes"):
        data.resolve_classes(DataConfig(root=str(root), num_classes=7, class_names=[str(i) for i in range(6)]),
                             manifest)


# --- transforms --------------------------------------------------------------------------------


def test_train_transforms_leave_out_p0_and_use_affine(dataset):
    root, _ = dataset
    cfg = _cfg(root, "data.augment.vflip=0", "data.augment.brightness_contrast=0")
    names = [type(t).__name__ for t in data.build_transforms(cfg.data, True, IGNORE).transforms]
    # Normalisation is not among them: batches leave the workers as uint8 and are normalised on the device.
    assert names == ["RandomScale", "PadIfNeeded", "RandomCrop", "HorizontalFlip", "Affine"]
    val = [type(t).__name__ for t in data.build_transforms(cfg.data, False, IGNORE).transforms]
    assert val == []


def test_quarter_turns_keep_image_and_mask_together_and_need_a_square_crop():
    cfg = load_config(None, ["data.image_size=16", "data.augment.rot90=1", "data.augment.hflip=0",
                             "data.augment.scale=[1, 1]", "data.augment.affine=0",
                             "data.augment.brightness_contrast=0"]).data
    transform = data.build_transforms(cfg, True, IGNORE)
    where = np.arange(256, dtype=np.uint8).reshape(16, 16)  # each pixel says where it started
    image = np.repeat(where[..., None], 3, axis=2)
    corners = set()
    for _ in range(200):  # four turns all seen within 200 draws but for odds of 1e-24
        out = transform(image=image, mask=where.astype(np.int64))
        assert np.array_equal(out["image"][..., 0], out["mask"])  # image and mask turned together
        corners.add(int(out["mask"][0, 0]))
        if len(corners) == 4:
            break
    assert corners == {0, 15, 240, 255}  # every quarter turn puts another corner first
    with pytest.raises(UserError, match=r"data.augment.rot90=1.0 turns square crops only, .* 16 x 24"):
        data.build_transforms(DataConfig(image_size=(16, 24), augment=cfg.augment), True, IGNORE)


def test_a_rotation_invariant_set_is_flipped_and_turned_every_way_unless_the_config_says_otherwise(tmp_path):
    aug = DataConfig().augment  # vflip and rot90 unset: from the data
    free = {"rotation_invariant": True}
    assert data.turns(aug, free, (16, 16)) == (0.5, 1.0)
    assert data.turns(aug, free, (16, 24)) == (0.5, 0.0)  # a quarter turn would reshape the crop
    assert data.turns(aug, {}, (16, 16)) == (0.0, 0.0)  # a manifest that does not say: the images have an up
    told = load_config(None, ["data.augment.vflip=0", "data.augment.rot90=0.25"]).data.augment
    assert data.turns(told, free, (16, 16)) == (0.0, 0.25)
    # Training's own loader: whole 32 x 32 frames, nothing else random; each mask's first row is ignore, so
    # where that row ends up shows how the sample was turned.
    root = tmp_path / "shards"
    manifest = make_shards(root, {"train": [8]}, size=(32, 32))
    cfg = load_config(None, [f"data.root={root}", "data.image_size=32", "data.augment.hflip=0",
                             "data.augment.scale=[1, 1]", "data.augment.affine=0", "data.cache_mb=0",
                             "data.augment.brightness_contrast=0"])

    def ignored_sides(manifest):
        sides = set()
        for _, mask in data.augmented_samples(cfg, manifest, 16, "train"):
            ignored = mask == IGNORE
            sides.update(side for side, line in enumerate((ignored[0], ignored[-1], ignored[:, 0], ignored[:, -1]))
                         if line.all())
        return sides

    assert ignored_sides(manifest) == {0}
    assert ignored_sides(manifest | free) == {0, 1, 2, 3}


def test_device_normalisation_equals_the_albumentations_float_path():
    import albumentations as A

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    image = np.random.default_rng(0).integers(0, 256, (37, 29, 3), dtype=np.uint8)
    image[0, :3] = [[0, 0, 0], [255, 255, 255], [128, 64, 32]]
    reference = A.Normalize(mean=mean, std=std, max_pixel_value=255.0)(image=image)["image"]  # H x W x 3 float32
    ours = data.normalize(torch.from_numpy(image)[None], mean, std)[0]
    torch.testing.assert_close(ours, torch.from_numpy(reference).permute(2, 0, 1), rtol=0, atol=2e-6)
    # A batch in channels-last memory gives the same numbers as a contiguous one.
    batch = torch.from_numpy(np.stack([image, image[::-1].copy()]))
    cl = data.normalize(batch, mean, std, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, data.normalize(batch, mean, std))
    with pytest.raises(ValueError, match="expected uint8, uint16 or float32"):
        data.normalize(batch.double(), mean, std)


def test_masks_travel_in_the_smallest_type():
    assert data.mask_dtype(21, 255) == torch.uint8
    assert data.mask_dtype(300, 255) == torch.int16 and data.mask_dtype(19, -1) == torch.int16
    assert data.mask_dtype(70_000, 255) == torch.int32


def test_padding_and_affine_fill_mask_with_ignore(dataset):
    root, _ = dataset
    # Shrink a 32 px image to 16 px inside a 48 px crop and rotate it: most pixels are new.
    cfg = _cfg(
        root,
        "data.image_size=48",
        "data.augment.scale=[0.5, 0.5]",
        "data.augment.affine=1.0",
        "data.augment.rotate=45",
        "data.augment.brightness_contrast=0",
    )
    t = data.build_transforms(cfg.data, True, IGNORE)
    t.set_random_seed(0)
    for _ in range(5):
        out = t(image=np.full((32, 32, 3), 200, np.uint8), mask=np.ones((32, 32), np.int64))
        mask = torch.from_numpy(out["mask"]).long()
        assert out["image"].shape == (48, 48, 3) and out["image"].dtype == np.uint8
        values = set(mask.unique().tolist())
        assert values == {1, IGNORE}, values  # 0 would be a real class invented by padding
        assert (mask == IGNORE).sum() > 48 * 48 // 2


def test_val_resize_keeps_labels_and_preprocess_matches_val(dataset):
    root, _ = dataset
    cfg = data.resolve_inputs(_cfg(root), json.loads((root / "manifest.json").read_text()))
    sample = next(data.iter_samples([str(root / "val-000000.tar")]))
    assert sample["image"].dtype == np.uint8 and sample["mask"].dtype == np.int64
    assert sample["meta"]["key"] == sample["key"]
    val = data.build_transforms(cfg.data, False, IGNORE)(image=sample["image"], mask=sample["mask"])
    assert torch.equal(data.preprocess(sample["image"], cfg.data),
                       data.normalize(torch.from_numpy(val["image"]), cfg.data.mean, cfg.data.std))
    assert torch.equal(torch.from_numpy(val["mask"]).long(), torch.from_numpy(sample["mask"]))
    resized = data.build_transforms(_cfg(root, "data.val_size=40").data, False, IGNORE)(
        image=sample["image"], mask=sample["mask"]
    )
    assert resized["image"].shape == (40, 40, 3)
    assert set(np.unique(resized["mask"]).tolist()) <= set(np.unique(sample["mask"]).tolist())


def test_batch_plan_keeps_the_global_batch_on_any_world_size():
    assert data.plan_batches(8, 1, max_per_rank=4) == data.BatchPlan(4, 2, 1)
    assert data.plan_batches(8, 2, max_per_rank=4) == data.BatchPlan(4, 1, 2)
    assert data.plan_batches(12, 2, max_per_rank=4) == data.BatchPlan(3, 2, 2)  # largest batch dividing 6
    assert data.plan_batches(16, 8, max_per_rank=64).global_batch == 16
    with pytest.raises(UserError, match=r"global batch of 8 cannot be split over 3 ranks.*e\.g\. 9.*1, 2, 4, 8 ranks"):
        data.plan_batches(8, 3, max_per_rank=4)


def test_steps_per_epoch_counts_whole_optimiser_steps(dataset):
    root, manifest = dataset
    # 13 samples, global batch 8: 2 optimiser steps on 1 rank x 4 x 2 and on 2 ranks x 4 x 1.
    accumulated = _cfg(root, "train.batch_size=4", "train.accum_steps=2")
    assert data.steps_per_epoch(manifest, accumulated, 1) == 2
    assert data.steps_per_epoch(manifest, _cfg(root, "train.batch_size=4"), 2) == 2
    # The loader yields micro-batches: accum_steps of them per optimiser step.
    assert len(data.train_loader(accumulated, manifest, str(root), 0, 1, 0)) == 2 * 2
    assert len(data.train_loader(_cfg(root, "train.batch_size=4"), manifest, str(root), 1, 2, 0)) == 2


def test_steps_per_epoch(dataset):
    root, manifest = dataset
    assert data.steps_per_epoch(manifest, _cfg(root), 2) == 4  # ceil(13 / (2 * 2))
    assert data.steps_per_epoch(manifest, _cfg(root, "train.batch_size=64"), 2) == 1
    assert data.steps_per_epoch(manifest, _cfg(root, "train.steps_per_epoch=7"), 2) == 7


# --- training ----------------------------------------------------------------------------------


def _batches(cfg, manifest, root, rank, epoch, skip=0, world=2):
    return list(data.train_loader(cfg, manifest, str(root), rank, world, epoch, skip_steps=skip))


def _same(x, y):
    if len(x) != len(y):
        return False
    return all(torch.equal(i, j) and torch.equal(m, n) for (i, m), (j, n) in zip(x, y, strict=True))


def test_train_batches_shapes_and_determinism(dataset):
    root, manifest = dataset
    cfg = _cfg(root, "train.steps_per_epoch=3")
    a = _batches(cfg, manifest, root, 0, 0)
    assert len(a) == 3
    for images, masks in a:
        assert images.shape == (2, 32, 32, 3) and images.dtype == torch.uint8  # normalised on the device
        assert masks.shape == (2, 32, 32) and masks.dtype == torch.uint8  # 6 classes and 255 fit a byte
        assert set(masks.unique().tolist()) <= {*range(NUM_CLASSES), IGNORE}
    assert _same(a, _batches(cfg, manifest, root, 0, 0))
    loader = data.train_loader(cfg, manifest, str(root), 0, 2, 0)
    assert _same(list(loader), list(loader))  # re-iterating repeats the epoch
    assert not _same(a, _batches(cfg, manifest, root, 1, 0))
    assert not _same(a, _batches(cfg, manifest, root, 0, 1))
    assert not _same(a, _batches(_cfg(root, "train.steps_per_epoch=3", "train.seed=1"), manifest, root, 0, 0))
    # A resumed epoch goes on exactly where it stopped.
    assert _same(_batches(cfg, manifest, root, 0, 0, skip=2), a[2:])
    assert _batches(cfg, manifest, root, 0, 0, skip=5) == []


def test_an_epoch_is_a_fresh_permutation_of_the_split(dataset):
    root, manifest = dataset
    cfg = _cfg(root)  # 13 samples, 2 ranks x 2: 4 steps of 4, so the last 3 places repeat the epoch's first 3
    seen = {}
    for epoch in (0, 1):
        loaders = [data.train_loader(cfg, manifest, str(root), r, 2, epoch) for r in range(2)]
        positions = sorted(p for loader in loaders for batch in loader.sampler for p in batch)
        assert positions == list(range(16 * epoch, 16 * (epoch + 1)))
        seen[epoch] = [loaders[0].dataset.sample_of(p) for p in positions]
        assert sorted(seen[epoch][:13]) == list(range(13)) and seen[epoch][13:] == seen[epoch][:3]
    assert seen[0] != seen[1]


def _global_batches(cfg, manifest, root, world, accum):
    """Each optimiser step's samples on all ranks together, in the order of their positions."""
    per_rank = [_batches(cfg, manifest, root, r, 1, world=world) for r in range(world)]
    steps = []
    for k in range(len(per_rank[0]) // accum):
        parts = [per_rank[r][k * accum + m] for m in range(accum) for r in range(world)]
        steps.append((torch.cat([i for i, _ in parts]), torch.cat([m for _, m in parts])))
    return steps


@pytest.mark.parametrize("workers", [0, 2])
def test_a_global_batch_is_the_same_on_any_number_of_ranks(dataset, workers):
    root, manifest = dataset
    # Global batch 4, as 1 rank x 4, 2 ranks x 2, 4 ranks x 1 and 1 rank x 2 x 2 accumulation.
    def make(world, per_rank, accum):
        cfg = _cfg(root, f"train.batch_size={per_rank}", f"train.accum_steps={accum}", f"data.workers={workers}")
        return _global_batches(cfg, manifest, root, world, accum)

    one = make(1, 4, 1)
    assert len(one) == 4  # ceil(13 / 4)
    for world, per_rank, accum in ((2, 2, 1), (4, 1, 1), (1, 2, 2)):
        assert _same(make(world, per_rank, accum), one), (world, per_rank, accum)
    assert not _same(make(1, 4, 1)[:1], make(1, 4, 1)[1:2])


@pytest.mark.parametrize("workers", [0, 2])
def test_endless_train_batches_are_the_epochs_one_after_the_other(dataset, workers):
    root, manifest = dataset
    # 3 batches per epoch over 2 workers: each epoch starts on the other worker.
    cfg = _cfg(root, "train.steps_per_epoch=3", f"data.workers={workers}")
    # Resumed one batch into epoch 1: the rest of epoch 1, then epochs 2 and 3 whole.
    stream = iter(data.train_loader(cfg, manifest, str(root), 0, 2, 1, skip_steps=1, endless=True))
    got = [next(stream) for _ in range(2 + 3 + 3)]
    stream.close()
    assert _same(got[:2], _batches(cfg, manifest, root, 0, 1, skip=1))
    assert _same(got[2:5], _batches(cfg, manifest, root, 0, 2))
    assert _same(got[5:], _batches(cfg, manifest, root, 0, 3))
    assert not _same(got[2:5], got[5:])


def test_endless_train_batches_follow_the_trainers_epoch_of_whole_optimiser_steps(dataset):
    root, manifest = dataset
    # train.steps_per_epoch counts optimiser steps: 2 steps of 2 micro-batches each, and the next epoch
    # starts after the 4th micro-batch.
    cfg = _cfg(root, "train.steps_per_epoch=2", "train.accum_steps=2")
    assert data.steps_per_epoch(manifest, cfg, 2) == 2
    epochs = [_batches(cfg, manifest, root, 0, epoch) for epoch in (0, 1)]
    assert [len(e) for e in epochs] == [4, 4]
    stream = iter(data.train_loader(cfg, manifest, str(root), 0, 2, 0, endless=True))
    got = [next(stream) for _ in range(8)]
    stream.close()
    for part, epoch in ((got[:4], 0), (got[4:], 1)):
        assert _same(part, epochs[epoch])
    # skip_steps counts optimiser steps too: skipping one skips its 2 micro-batches, endless or not.
    assert _same(_batches(cfg, manifest, root, 0, 0, skip=1), epochs[0][2:])
    stream = iter(data.train_loader(cfg, manifest, str(root), 0, 2, 0, skip_steps=1, endless=True))
    got = [next(stream) for _ in range(2 + 4)]
    stream.close()
    assert _same(got, epochs[0][2:] + epochs[1])


def test_negative_skip_steps_is_a_bug_not_a_user_error(dataset):
    root, manifest = dataset
    with pytest.raises(ValueError, match="skip_steps=-1") as caught:
        data.train_loader(_cfg(root), manifest, str(root), 0, 1, 0, skip_steps=-1)
    assert not isinstance(caught.value, UserError)


def test_workers_do_not_change_the_batches(dataset):
    root, manifest = dataset
    a = _batches(_cfg(root, "train.steps_per_epoch=4", "data.workers=2"), manifest, root, 0, 0)
    assert len(a) == 4
    assert _same(a, _batches(_cfg(root, "train.steps_per_epoch=4"), manifest, root, 0, 0))


def test_train_loader_leaves_global_rng_alone(dataset):
    root, manifest = dataset
    torch.manual_seed(3)
    before = torch.get_rng_state()
    list(data.train_loader(_cfg(root, "train.steps_per_epoch=1"), manifest, str(root), 0, 1, 0))
    assert torch.equal(before, torch.get_rng_state())


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(("split", "world", "workers"), [("val", 3, 0), ("one", 4, 0), ("val", 1, 2)])
def test_val_sees_every_sample_once(dataset, split, world, workers):
    root, manifest = dataset
    cfg = _cfg(root, f"data.workers={workers}", "data.val_batch_size=3")
    per_rank = _val_keys(cfg, manifest, root, split, world)
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)) and set(flat) == _all_keys(manifest, split)
    assert [len(k) for k in per_rank] == [data.val_share(manifest, split, r, world) for r in range(world)]


def test_val_collate_pads_with_ignore_and_loader_restarts(dataset):
    root, manifest = dataset
    cfg = data.resolve_inputs(_cfg(root, "data.val_batch_size=4"), manifest)
    loader = data.val_loader(cfg, manifest, str(root), 0, 1)
    batches = list(loader)
    assert len(batches) == len(loader) == 4 and loader.num_samples == 13
    originals = {s["key"]: s for s in data.iter_samples([str(root / f"val-{i:06d}.tar") for i in range(3)])}
    padded = 0
    for images, masks, keys, sizes in batches:
        assert masks.dtype == torch.uint8 and images.shape[0] == masks.shape[0] == len(keys) == len(sizes)
        images = data.normalize_padded(images, sizes, cfg.data.mean, cfg.data.std)
        for img, mask, key, size in zip(images, masks, keys, sizes, strict=True):
            s = originals[key]
            h, w = s["mask"].shape
            assert size == (h, w)
            assert torch.equal(mask[:h, :w].long(), torch.from_numpy(s["mask"]))
            assert torch.equal(img[:, :h, :w], data.preprocess(s["image"], cfg.data))
            assert (mask[h:] == IGNORE).all() and (mask[:, w:] == IGNORE).all()
            assert (img[:, h:] == 0).all() and (img[:, :, w:] == 0).all()
            padded += int(mask.shape[0] > h or mask.shape[1] > w)
    assert padded > 0
    again = [keys for _, _, keys, _ in loader]
    assert again == [keys for _, _, keys, _ in batches]


def test_shard_disagreeing_with_manifest_is_an_error(dataset, tmp_path):
    root, manifest = dataset
    bad = json.loads(json.dumps(manifest))
    bad["splits"]["val"]["shards"][2]["num_samples"] = 8  # the shard holds 7
    bad["splits"]["val"]["num_samples"] = 14
    with pytest.raises(ShardError, match="7 samples, the manifest lists 8"):
        _val_keys(_cfg(root), bad, root, "val", 1)
    bad["splits"]["val"]["shards"][2]["num_samples"] = 6
    with pytest.raises(ShardError, match="more samples than the manifest"):
        _val_keys(_cfg(root), bad, root, "val", 1)


def test_empty_train_shard_is_an_error_not_a_hang(tmp_path):
    manifest = make_shards(tmp_path, {"train": [3]})
    tarfile.open(tmp_path / "train-000000.tar", "w").close()
    with pytest.raises(ShardError, match=r"train-000000\.tar: 0 samples, the manifest lists 3"):
        list(data.train_loader(_cfg(tmp_path), manifest, str(tmp_path), 0, 1, 0))


def test_a_train_split_without_samples_is_a_user_error(tmp_path):
    manifest = make_shards(tmp_path, {"train": []})
    with pytest.raises(UserError, match=r"data\.train_split='train': the split has no samples in .*manifest\.json"):
        data.train_loader(_cfg(tmp_path), manifest, str(tmp_path), 0, 1, 0)


# --- two real processes ------------------------------------------------------------------------


def _rank_main(rank: int, tmp: str, root: str) -> None:
    # mp.spawn children default to spawning their own DataLoader workers (seconds of imports each);
    # torchrun's ranks fork them, so do that here too.
    multiprocessing.set_start_method("fork", force=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)
    try:
        cfg = _cfg(Path(root), "data.workers=2", "data.val_batch_size=2")
        manifest = json.loads(Path(root, "manifest.json").read_text())
        steps, batches = 0, []
        for images, masks in data.train_loader(cfg, manifest, root, rank, 2, epoch=0):
            # Like DDP's gradient all-reduce: a rank with fewer batches would hang the other.
            t = images.sum().reshape(1).float()
            dist.all_reduce(t)
            steps += 1
            batches.append((images, masks))
        torch.save(batches, Path(tmp, f"batches{rank}.pt"))
        resumed = len(list(data.train_loader(cfg, manifest, root, rank, 2, epoch=0, skip_steps=3)))
        loader = data.val_loader(cfg, manifest, root, rank, 2)
        keys = [[k for _, _, ks, _ in loader for k in ks] for _ in range(2)]  # twice: persistent workers
        Path(tmp, f"rank{rank}.json").write_text(
            json.dumps(
                {"steps": steps, "resumed": resumed, "keys": keys, "share": data.val_share(manifest, "val", rank, 2)}
            )
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_two_workers_uneven_shards(dataset, tmp_path):
    root, manifest = dataset
    mp.spawn(_rank_main, args=(str(tmp_path), str(root)), nprocs=2)
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [o["steps"] for o in out] == [4, 4]  # ceil(13 / (2 ranks * 2)) on both ranks
    assert [o["resumed"] for o in out] == [1, 1]
    # Together the two ranks' batches are the batches of one process with both ranks' samples.
    ranks = [torch.load(tmp_path / f"batches{r}.pt", weights_only=True) for r in range(2)]
    together = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*ranks, strict=True)]
    assert _same(together, _batches(_cfg(root, "train.batch_size=4"), manifest, root, 0, 0, world=1))
    for o in out:
        assert o["keys"][0] == o["keys"][1] and len(o["keys"][0]) == o["share"]
    flat = out[0]["keys"][0] + out[1]["keys"][0]
    assert len(flat) == len(set(flat)) == 13 and set(flat) == _all_keys(manifest, "val")


@pytest.mark.parametrize(("mean_hw", "crop"), [
    ([200.0, 132.8], (200, 136)),  # CCP packed at 200 px: the whole frame, padded to a multiple of 8
    ([120.0, 160.0], (120, 160)),
    ([1024.0, 2048.0], (512, 512)),  # large frames are cropped
    ([3.0, 900.0], (8, 512)),
])
def test_auto_training_crop_is_the_mean_frame(mean_hw, crop):
    manifest = {"splits": {"train": {"image_size": {"mean_hw": mean_hw}}}}
    assert data.training_crop(load_config(None, []).data, manifest) == crop
    assert data.training_crop(load_config(None, ["data.image_size=[64,32]"]).data, manifest) == (64, 32)


def test_missing_or_cut_train_shard_is_one_error_naming_it(tmp_path):
    manifest = make_shards(tmp_path, {"train": [3, 3]})
    victim = tmp_path / "train-000001.tar"
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])  # cut inside a member
    with pytest.raises(ShardError, match=r"train-000001\.tar: (unreadable shard|\d samples, the manifest)"):
        data.train_loader(_cfg(tmp_path), manifest, str(tmp_path), 0, 1, 0)
    victim.unlink()
    with pytest.raises(ShardError, match=r"train-000001\.tar: cannot open"):
        data.train_loader(_cfg(tmp_path), manifest, str(tmp_path), 0, 1, 0)
