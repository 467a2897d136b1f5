"""The sample index: written at pack time beside the shards, equal to what the tar headers say, memory-mapped as
flat arrays, checked against the manifest and the shards, and read from the headers for shards without one."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from seg_dist import shards
from seg_dist.config import load_config
from seg_dist.data import SampleIndex, read_shard, split_index, train_loader
from seg_dist.data.reader import SampleReader, index_entry, index_shard, index_split
from seg_dist.shard_index import IndexBuilder, index_name
from seg_dist.shards import ShardError


def _copy(tiny_shards: Path, tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "copy"
    shutil.copytree(tiny_shards, root)
    return root, shards.load_manifest(root)


def _without_index(root: Path) -> dict:
    """The folder as shards packed before the index existed: no index files, no manifest entries."""
    manifest = shards.load_manifest(root)
    for name, split in manifest["splits"].items():
        del split["index"]
        (root / index_name(name)).unlink()
    (root / shards.MANIFEST).write_text(json.dumps(manifest))
    return manifest


@pytest.mark.parametrize("split", ["train", "val"])
def test_the_packed_index_is_what_the_tar_headers_say(tiny_shards, split):
    manifest = shards.load_manifest(tiny_shards)
    urls = shards.shard_urls(tiny_shards, manifest, split)
    packed = split_index(str(tiny_shards), manifest, split)
    assert packed.path == str((tiny_shards / index_name(split)).resolve())  # the file, mapped
    assert manifest["splits"][split]["index"]["name"] == index_name(split)
    headers = index_split(urls, shards.shard_counts(manifest, split))
    assert headers.path is None and packed.same_as(headers)
    # Sample by sample: shard, key, and (field, offset, size) of each field, as the tar headers give them.
    expected = [(s, key, fields) for s, (url, count) in enumerate(zip(urls, shards.shard_counts(manifest, split),
                                                                      strict=True))
                for key, fields in index_shard(url, count)]
    assert [(e.shard, e.key, e.fields) for e in (index_entry(packed, i) for i in range(len(packed)))] == expected
    assert len(packed) == manifest["splits"][split]["num_samples"]
    assert packed.shard_counts == shards.shard_counts(manifest, split)


def test_a_sample_read_at_its_indexed_offsets_is_the_sample_in_the_shard(tiny_shards):
    manifest = shards.load_manifest(tiny_shards)
    urls = shards.shard_urls(tiny_shards, manifest, "train")
    index = split_index(str(tiny_shards), manifest, "train")
    reader = SampleReader(urls)
    streamed = [raw for url in urls for raw in read_shard(url)]
    try:
        assert [reader.read(index_entry(index, i)) for i in range(len(index))] == streamed
    finally:
        reader.close()


def test_the_index_is_flat_arrays_of_a_few_dozen_bytes_per_sample(tiny_shards):
    manifest = shards.load_manifest(tiny_shards)
    index = split_index(str(tiny_shards), manifest, "train")
    keys = sum(len(index.key(i)) for i in range(len(index)))
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in index.arrays.values())
    assert index.nbytes < 64 * len(index) + keys + 8 * 64  # + a few shard-level entries
    # A spawned worker gets the file's path, not the arrays: pickling a mapped index is a few bytes.
    assert len(pickle.dumps(index)) < 500 and pickle.loads(pickle.dumps(index)).same_as(index)

    # At scale too: 200,000 samples of 3 fields and 14-character keys, in 800 shards.
    builder = IndexBuilder()
    for s in range(800):
        for i in range(250):
            at = 1536 * i
            builder.add(f"sample_{s * 250 + i:07d}", [("jpg", at + 512, 900), ("mask.png", at + 1536, 100),
                                                      ("json", at + 2048, 60)])
        builder.end_shard(1536 * 250 + 1024)
    big = builder.build()
    assert len(big) == 200_000 and big.num_shards == 800
    assert big.nbytes / len(big) < 64 + 14
    assert big.key(123_456) == "sample_0123456" and big.shard_of(123_456) == 493
    assert big.fields(250) == (("jpg", 512, 900), ("mask.png", 1536, 100), ("json", 2048, 60))


@pytest.mark.parametrize("damage, message", [
    ("flip", r"train\.index\.npy: sha256 differs from the manifest's \(stale or damaged index\)"),
    ("truncate", r"train\.index\.npy: \d+ bytes, the manifest lists \d+ \(stale or damaged index\)"),
    ("remove", r"train\.index\.npy: missing \(the manifest lists it\)"),
    ("old index", r"train\.index\.npy: \d+ bytes, the manifest lists \d+ \(stale or damaged index\)"),
    ("replaced shard", r"train\.index\.npy: indexes train-000001\.tar at \d+ bytes, the manifest lists \d+ and the "
                       r"file has \d+ \(re-packed or replaced shard\)"),
    ("manifest counts", r"train\.index\.npy: indexes 6 shards of 64 samples, the manifest lists 6 of 65 "
                        r"\(stale index\)"),
])
def test_a_stale_or_damaged_index_is_one_line_naming_it(tiny_shards, tmp_path, damage, message):
    root, manifest = _copy(tiny_shards, tmp_path)
    path = root / index_name("train")
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-64])
    elif damage == "remove":
        path.unlink()
    elif damage == "old index":  # an index of other shards left in the folder (e.g. by a partial copy)
        shutil.copy(root / index_name("val"), path)
    elif damage == "replaced shard":  # the manifest and the index agree; the shard on disk is another one
        shutil.copy(root / "train-000005.tar", root / "train-000001.tar")
    elif damage == "manifest counts":
        manifest["splits"]["train"]["shards"][0]["num_samples"] += 1
        manifest["splits"]["train"]["num_samples"] += 1
    cfg = load_config(None, [f"data.root={root}", "data.image_size=32", "train.batch_size=4"])
    with pytest.raises(ShardError, match=message) as e:
        train_loader(cfg, manifest, str(root), 0, 1, 0)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_a_file_that_is_not_an_index_names_itself(tmp_path):
    path = tmp_path / "train.index.npy"
    np.save(path, np.zeros(4, np.float32))
    with pytest.raises(ShardError, match=r"train\.index\.npy: not a readable sample index"):
        SampleIndex.load(path)


def _batches(root: Path, manifest: dict, workers: int, epoch: int = 1) -> list[tuple]:
    cfg = load_config(None, [f"data.root={root}", "data.image_size=32", "train.batch_size=4",
                             f"data.workers={workers}", "train.accum_steps=2"])
    return [(img.clone(), mask.clone()) for img, mask in train_loader(cfg, manifest, str(root), 0, 2, epoch,
                                                                      skip_steps=1)]


def test_shards_without_an_index_train_on_the_same_batches_with_a_note(tiny_shards, tmp_path, caplog):
    manifest = shards.load_manifest(tiny_shards)
    with_index = _batches(tiny_shards, manifest, workers=1)
    root, _ = _copy(tiny_shards, tmp_path)
    old = _without_index(root)
    with caplog.at_level(logging.INFO, logger="seg_dist.data.reader"):
        without = _batches(root, old, workers=0)
    assert len(without) == len(with_index) > 0
    for (a, m), (b, n) in zip(with_index, without, strict=True):
        assert a.equal(b) and m.equal(n)
    note = [r.getMessage() for r in caplog.records if "no sample index" in r.getMessage()]
    assert len(note) == 1 and "packing the split again writes the index" in note[0]
    assert "64 samples from the tar headers of 6 shards" in note[0]


def test_reading_by_offset_checks_the_tar_header_before_the_bytes(tiny_shards, tmp_path):
    root, manifest = _copy(tiny_shards, tmp_path)
    index = split_index(str(root), manifest, "train")
    reader = SampleReader(shards.shard_urls(root, manifest, "train"))
    entry = index_entry(index, 13)
    try:
        # Bytes at the right offsets under another sample's name: a shard that is not the one indexed.
        with pytest.raises(ShardError, match=r"train-000001\.tar: at offset \d+ lies 'synth_\d+\.jpg' of \d+ bytes, "
                                             r"the index says jpg of 'other', \d+ bytes \(the shard was re-packed"):
            reader.read(dataclasses.replace(entry, key="other"))
        field, offset, _ = entry.fields[1]
        with pytest.raises(ShardError, match=r"the index says mask\.png of 'synth_\d+', 7 bytes"):
            reader.read(dataclasses.replace(entry, fields=((field, offset, 7),)))
        reader.close()
        shard = root / "train-000001.tar"
        data = bytearray(shard.read_bytes())
        data[offset - 512] ^= 0xFF  # the mask's header, its bytes intact
        shard.write_bytes(bytes(data))
        with pytest.raises(ShardError, match=r"train-000001\.tar: unreadable shard \(InvalidHeaderError: bad checksum"):
            reader.read(entry)
        assert reader.read(index_entry(index, 12))["__key__"] == index.key(12)  # its neighbour reads as before
    finally:
        reader.close()
