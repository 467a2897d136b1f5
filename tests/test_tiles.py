"""seg_dist.tiles (grid, cut, assemble) and `pack --tile`: real image files packed into tiles, read back from
the shards and put together again."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from seg_dist import shards, tiles
from seg_dist.data import iter_samples
from seg_dist.pack import PackError, PackOptions, pack
from seg_dist.pack.__main__ import main as pack_main
from seg_dist.tiles import Window

IGNORE = 255
NUM_CLASSES = 4


# --- geometry ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [0, 3])
def test_grid_covers_the_scene_with_full_size_tiles_the_last_flush_with_the_border(overlap: int) -> None:
    windows = tiles.grid(37, 53, 16, overlap)
    assert {(w.h, w.w) for w in windows} == {(16, 16)}
    ys, xs = sorted({w.y for w in windows}), sorted({w.x for w in windows})
    assert ys[-1] + 16 == 37 and xs[-1] + 16 == 53  # shifted inward, not padded past the border
    assert all(b - a == 16 - overlap for a, b in itertools.pairwise(ys[:-1]))  # the last pair may share more
    assert len(windows) == len(ys) * len(xs) and windows == sorted(windows)  # row by row
    covered = np.zeros((37, 53), int)
    for w in windows:
        covered[w.slices] += 1
    assert covered.min() >= 1
    assert (covered.max() > 1) == (overlap > 0 or 53 % 16 != 0)


def test_a_scene_smaller_than_a_tile_is_one_window_of_its_own_size() -> None:
    assert tiles.grid(10, 40, 16) == [Window(0, 0, 10, 16), Window(0, 16, 10, 16), Window(0, 24, 10, 16)]
    assert tiles.grid(7, 9, 16, 4) == [Window(0, 0, 7, 9)]
    with pytest.raises(ValueError, match="overlap"):
        tiles.grid(40, 40, 16, 16)


@pytest.mark.parametrize("overlap", [0, 5])
def test_assemble_gives_back_the_array_the_tiles_were_cut_from(overlap: int) -> None:
    scene = np.random.default_rng(0).integers(0, 65535, (41, 30, 4), dtype=np.uint16)
    windows = tiles.grid(41, 30, 16, overlap)
    out = tiles.assemble([tiles.cut(scene, w) for w in windows], windows, (41, 30))
    assert out.dtype == np.uint16 and np.array_equal(out, scene)


def test_assemble_cuts_disagreeing_overlaps_midway_and_fills_what_no_tile_covers(tmp_path: Path) -> None:
    windows = [Window(0, 0, 4, 10), Window(0, 6, 4, 10), Window(6, 0, 2, 2)]
    parts = [np.full((4, 10), 1, np.uint8), np.full((4, 10), 2, np.uint8), np.full((2, 2), 3, np.uint8)]
    out = tiles.assemble(parts, windows, (8, 16), fill=IGNORE)
    assert out[0].tolist() == [1] * 8 + [2] * 8  # the 4 shared columns split 2 / 2
    assert (out[4:6] == IGNORE).all() and (out[6:, :2] == 3).all() and (out[6:, 2:] == IGNORE).all()
    # One tile at a time, into a file-backed array as a scene larger than memory would be.
    assembler = tiles.Assembler((8, 16), fill=IGNORE, out=np.lib.format.open_memmap(
        tmp_path / "scene.npy", "w+", np.uint8, (8, 16)))
    for part, window in zip(parts, windows, strict=True):
        assembler.add(part, window)
    assert np.array_equal(assembler.result(), out) and np.array_equal(np.load(tmp_path / "scene.npy"), out)
    assert np.array_equal(assembler.covered(), out != IGNORE)


def test_assemble_blends_logits_without_seams() -> None:
    windows = tiles.grid(8, 24, 16, 8)
    logits = [np.zeros((8, 16, 2), np.float32), np.zeros((8, 16, 2), np.float32)]
    logits[0][..., 0] = 1.0  # the left tile says class 0, the right tile class 1
    logits[1][..., 1] = 1.0
    out = tiles.assemble(logits, windows, (8, 24), blend=True)
    row = out[0, :, 1]
    assert out.dtype == np.float32 and np.allclose(out.sum(-1), 1.0)
    assert (row[:8] == 0).all() and (row[16:] == 1).all()  # only one tile there
    assert (np.diff(row[7:17]) > 0).all()  # shared columns: a smooth ramp from one tile to the other
    assert out.argmax(-1)[0].tolist() == [0] * 12 + [1] * 12


# --- pack --tile --------------------------------------------------------------------------------------


def _scene(hw: tuple[int, int], seed: int, empty: tuple[slice, slice] | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, hw).astype(np.uint8)
    labels[rng.random(hw) < 0.05] = IGNORE
    if empty is not None:
        labels[empty] = IGNORE
    return rng.integers(0, 256, (*hw, 3), dtype=np.uint8), labels


def _write(root: Path, stem: str, image: np.ndarray, labels: np.ndarray) -> None:
    (root / "images" / stem).parent.mkdir(parents=True, exist_ok=True)
    (root / "masks" / stem).parent.mkdir(parents=True, exist_ok=True)
    if image.dtype == np.uint8:
        Image.fromarray(image).save(root / "images" / f"{stem}.png")
    else:
        tifffile.imwrite(root / "images" / f"{stem}.tif", image, photometric="minisblack", planarconfig="contig")
    Image.fromarray(labels).save(root / "masks" / f"{stem}.png")


def _pack(root: Path, *extra: str) -> dict:
    argv = ["--images", str(root / "images"), "--masks", str(root / "masks"), "--out", str(root / "out"),
            "--num-classes", str(NUM_CLASSES), "--workers", "1", *extra]
    assert pack_main(argv) == 0
    return shards.load_manifest(root / "out")


def _scenes(root: Path, manifest: dict, split: str) -> dict[str, list[dict]]:
    """The split's samples by scene, read back from the shards."""
    by_scene: dict[str, list[dict]] = defaultdict(list)
    for sample in iter_samples(shards.shard_urls(str(root / "out"), manifest, split)):
        scene, _, _ = tiles.window_of(sample["meta"])
        by_scene[scene].append(sample)
    return by_scene


def _put_together(samples: list[dict], what: str, fill: int) -> np.ndarray:
    placed = [tiles.window_of(s["meta"]) for s in samples]
    return tiles.assemble([s[what] for s in samples], [w for _, w, _ in placed], placed[0][2], fill=fill)


@pytest.mark.parametrize("overlap", [0, 5])
def test_tiles_read_back_from_the_shards_put_together_equal_the_scene(tmp_path: Path, overlap: int) -> None:
    image, labels = _scene((37, 53), 0)  # neither side a multiple of the tile
    _write(tmp_path, "area/scene_a", image, labels)
    small_image, small_labels = _scene((9, 12), 1)  # smaller than a tile: one tile, the file as it was
    _write(tmp_path, "small", small_image, small_labels)
    manifest = _pack(tmp_path, "--tile", "16", "--tile-overlap", str(overlap))

    windows = tiles.grid(37, 53, 16, overlap)
    by_scene = _scenes(tmp_path, manifest, "train")
    assert sorted(by_scene) == ["area__scene_a", "small"]
    big = by_scene["area__scene_a"]
    assert [tiles.window_of(s["meta"])[1] for s in big] == windows
    assert all(s["meta"]["source"] == "area/scene_a.png" and s["meta"]["tile"]["scene_hw"] == [37, 53] for s in big)
    assert np.array_equal(_put_together(big, "mask", IGNORE), labels)
    assert np.array_equal(_put_together(big, "image", 0), image)
    [small] = by_scene["small"]
    assert tiles.window_of(small["meta"])[1] == Window(0, 0, 9, 12)
    assert np.array_equal(small["image"], small_image) and np.array_equal(small["mask"], small_labels)

    assert manifest["tiling"] == {"size": 16, "overlap": overlap, "drop_empty": False}
    entry = manifest["splits"]["train"]
    assert entry["tiling"] == {"scenes": 2, "tiles": len(windows) + 1, "dropped_empty": 0}
    assert entry["num_samples"] == len(windows) + 1
    # Statistics count each pixel once per tile that holds it: overlaps count twice (or four times).
    per_tile = sum(np.bincount(tiles.cut(labels, w)[tiles.cut(labels, w) != IGNORE], minlength=NUM_CLASSES)
                   for w in windows) + np.bincount(small_labels[small_labels != IGNORE], minlength=NUM_CLASSES)
    assert entry["class_histogram"] == per_tile.tolist()
    pixels = [tiles.cut(image, w).reshape(-1, 3) for w in windows] + [small_image.reshape(-1, 3)]
    assert np.allclose(manifest["image"]["mean"], np.concatenate(pixels).mean(0), rtol=0, atol=1e-9)
    assert entry["image_size"]["max_hw"] == [16, 16] and entry["image_size"]["min_hw"] == [9, 12]


def test_deep_multiband_tiles_keep_every_bit_and_band(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    image = rng.integers(0, 65536, (30, 21, 4), dtype=np.uint16)
    labels = rng.integers(0, NUM_CLASSES, (30, 21)).astype(np.uint8)
    _write(tmp_path, "bands", image, labels)
    manifest = _pack(tmp_path, "--tile", "8", "--tile-overlap", "2")
    [samples] = _scenes(tmp_path, manifest, "train").values()
    assert manifest["image"]["channels"] == 4 and manifest["image"]["dtype"] == "uint16"
    assert np.array_equal(_put_together(samples, "image", 0), image)
    assert np.array_equal(_put_together(samples, "mask", IGNORE), labels)


def test_drop_empty_leaves_holes_only_where_the_scene_was_all_ignore(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    image, labels = _scene((37, 53), 0, empty=(slice(0, 20), slice(0, 35)))
    _write(tmp_path, "scene", image, labels)
    manifest = _pack(tmp_path, "--tile", "16", "--tile-overlap", "4", "--drop-empty")
    windows = tiles.grid(37, 53, 16, 4)
    empty = [w for w in windows if (tiles.cut(labels, w) == IGNORE).all()]
    assert len(empty) >= 2
    assert manifest["splits"]["train"]["tiling"] == {"scenes": 1, "tiles": len(windows) - len(empty),
                                                     "dropped_empty": len(empty)}
    assert f"{len(empty)} all-ignore tiles dropped" in capsys.readouterr().out

    [samples] = _scenes(tmp_path, manifest, "train").values()
    assert {tiles.window_of(s["meta"])[1] for s in samples} == set(windows) - set(empty)
    # The dropped tiles held nothing but the ignore label, so filling holes with it gives the mask back.
    assert np.array_equal(_put_together(samples, "mask", IGNORE), labels)
    hole = np.ones(labels.shape, bool)
    for s in samples:
        hole[tiles.window_of(s["meta"])[1].slices] = False
    assert hole.any() and (labels[hole] == IGNORE).all()
    put = _put_together(samples, "image", 0)
    assert np.array_equal(put[~hole], image[~hole])


def test_tiles_of_a_scene_stay_in_one_split(tmp_path: Path) -> None:
    for i in range(4):
        _write(tmp_path, f"s{i}", *_scene((20, 30), i))
    manifest = _pack(tmp_path, "--tile", "8", "--val-fraction", "0.5", "--workers", "2")  # scenes in parallel
    train, val = _scenes(tmp_path, manifest, "train"), _scenes(tmp_path, manifest, "val")
    assert len(train) == len(val) == 2 and not set(train) & set(val)
    n = len(tiles.grid(20, 30, 8))
    assert all(len(v) == n for v in [*train.values(), *val.values()])
    assert manifest["splits"]["val"]["tiling"] == {"scenes": 2, "tiles": 2 * n, "dropped_empty": 0}


def test_tile_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path, "scene", *_scene((20, 20), 0))
    base = ["--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"), "--out",
            str(tmp_path / "out"), "--num-classes", str(NUM_CLASSES)]
    for extra, said in ((["--tile", "8", "--tile-overlap", "8"], "--tile-overlap must be in [0, --tile=8)"),
                        (["--drop-empty"], "give --tile SIZE too"),
                        (["--tile", "8", "--max-size", "10"], "give --tile or --max-size, not both")):
        assert pack_main(base + extra) == 2
        assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # A folder's splits are cut alike: an untiled split joins no tiled folder.
    _pack(tmp_path, "--tile", "8")
    assert pack_main([*base, "--split", "val"]) == 2
    assert "tiling is {'size': 8" in capsys.readouterr().err
    # A folder packed before tiles existed was not tiled: a tiled split does not join it.
    _pack(tmp_path, "--overwrite")
    manifest = json.loads((tmp_path / "out" / shards.MANIFEST).read_text())
    del manifest["tiling"]
    (tmp_path / "out" / shards.MANIFEST).write_text(json.dumps(manifest))
    assert pack_main([*base, "--split", "val", "--tile", "8"]) == 2
    assert "tiling is None for splits ['train'], this pack has {'size': 8" in capsys.readouterr().err


def test_a_scene_beyond_the_decoders_pixel_limit_is_one_line_naming_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for stem in ("huge", "fits"):
        _write(tmp_path, stem, *_scene((40, 40) if stem == "huge" else (20, 20), 0))
    # 1600 px against a limit of 2 x 300: Pillow refuses it as it would a 100,000 x 100,000 scene by default.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    options = PackOptions(images=tmp_path / "images", masks=tmp_path / "masks", out=tmp_path / "out",
                          num_classes=NUM_CLASSES, tile=16, workers=2)  # the limit reaches the worker processes
    with pytest.raises(PackError) as raised:
        pack(options)
    found = dict(raised.value.problems)
    image, mask = str(tmp_path / "images" / "huge.png"), str(tmp_path / "masks" / "huge.png")
    assert set(found) == {image, mask}  # 400 px of the other scene is under the limit
    assert all(m.startswith("0.0016 Mpx, more than the 0.0006 Mpx Pillow decodes") and "\n" not in m
               for m in found.values())


def test_tile_meta_is_json_the_reader_hands_on(tmp_path: Path) -> None:
    meta = tiles.tile_meta("a__b", Window(8, 16, 8, 8), (20, 30))
    assert tiles.window_of(json.loads(json.dumps({"tile": meta}))) == ("a__b", Window(8, 16, 8, 8), (20, 30))
    assert tiles.window_of({"source": "x.png"}) is None
