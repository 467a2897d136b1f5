"""Whole scenes from a tiled split (`predict --shards`): real scenes packed with `pack --tile`, a checkpoint
that records the tiling, and the masks checked against the Predictor's own tiled prediction of each scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_checkpoint
from PIL import Image

from seg_dist import checkpoint, predict, shards, tiles
from seg_dist.config import ModelConfig
from seg_dist.data import iter_samples
from seg_dist.inference import Predictor
from seg_dist.pack.__main__ import main as pack_main

IGNORE = 255
CLASSES = ["a", "b", "c", "d"]
TILE, OVERLAP = 16, 4
# Neither side a multiple of the tile; b/scene_b's top-left corner is all ignore label (dropped tiles).
SCENES = {"scene_a": (45, 61), "b/scene_b": (37, 29)}
EMPTY = (slice(0, 22), slice(0, 16))
# Where two paths' blended logits may differ by rounding alone (batches of another size), the top two classes
# of the reference lie this close: masks must agree everywhere else.
TIE = 1e-4


def _write_scenes(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    written = {}
    for i, (stem, hw) in enumerate(SCENES.items()):
        small = rng.integers(0, 256, (hw[0] // 4 + 1, hw[1] // 4 + 1, 3), dtype=np.uint8)
        image = np.array(Image.fromarray(small).resize((hw[1], hw[0]), Image.BILINEAR))  # smooth, image-like
        labels = rng.integers(0, len(CLASSES), hw).astype(np.uint8)
        if i == 1:
            labels[EMPTY] = IGNORE
        for kind, array in (("images", image), ("masks", labels)):
            (root / kind / stem).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / kind / f"{stem}.png")
        written[stem.replace("/", "__")] = (image, labels)
    return written


def _pack(root: Path, out: Path, *extra: str) -> dict:
    assert pack_main(["--images", str(root / "images"), "--masks", str(root / "masks"), "--out", str(out),
                      "--num-classes", str(len(CLASSES)), "--split", "val", "--workers", "1", *extra]) == 0
    return shards.load_manifest(out)


def _checkpoint(path: Path, tiling: dict | None) -> Path:
    # A random model's classes hardly vary over a scene: a narrow std and a loud head give masks of several
    # classes whose borders move where a tile's context ends.
    save_tiny_checkpoint(path, ModelConfig(width=8, depth=2), CLASSES, (0.5, 0.5, 0.5), (0.02, 0.02, 0.02),
                         global_step=1)
    state = checkpoint.load(path)
    state["model"]["head.weight"] *= 50
    state["model"]["head.bias"].zero_()
    # As the trainer writes them: the manifest's tiling, and the train split's mean frame (the tiles').
    checkpoint.save(path, {**state, "tiling": tiling, "train_mean_hw": [float(TILE), float(TILE)]})
    return path


@pytest.fixture(scope="module")
def tiled(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("scenes")
    scenes = _write_scenes(root)
    manifest = _pack(root, root / "shards", "--tile", str(TILE), "--tile-overlap", str(OVERLAP), "--drop-empty")
    kept: dict[str, list[tiles.Window]] = {}
    for s in iter_samples(shards.shard_urls(str(root / "shards"), manifest, "val")):
        scene, window, _ = tiles.window_of(s["meta"])
        kept.setdefault(scene, []).append(window)
    ck = _checkpoint(root / "tiled.pt", manifest["tiling"])
    return {"root": root, "shards": root / "shards", "scenes": scenes, "kept": kept, "checkpoint": ck,
            "manifest": manifest}


def _predict(tiled: dict, out: Path, *extra: str) -> int:
    return predict.main(["--checkpoint", str(tiled["checkpoint"]), "--shards", str(tiled["shards"]), "--out",
                         str(out), "--device", "cpu", *extra])


def test_predict_shards_writes_each_scene_as_the_predictor_tiles_it(tiled, tmp_path, capsys) -> None:
    assert tiled["manifest"]["splits"]["val"]["tiling"]["dropped_empty"] >= 1
    out = tmp_path / "masks"
    assert _predict(tiled, out, "--overlay", "--batch-size", "3") == 0
    assert sorted(p.name for p in out.iterdir()) == ["b__scene_b.png", "b__scene_b_overlay.png", "scene_a.png",
                                                    "scene_a_overlay.png"]
    p = Predictor.from_checkpoint(tiled["checkpoint"], "cpu")
    assert (p.tile, p.overlap_px(TILE)) == (TILE, OVERLAP)  # the checkpoint's tiling is the default
    for scene, (image, labels) in tiled["scenes"].items():
        with Image.open(out / f"{scene}.png") as im:
            assert im.mode == "P"
            mask = np.array(im)
        assert mask.shape == labels.shape
        # The Predictor's own tiled prediction of the whole scene file: the same windows, blended alike.
        logits = p.logits_batch([image])[0]
        reference = p(image)
        assert np.array_equal(reference, logits.argmax(0).numpy())
        assert len(np.unique(reference)) >= 3
        # Not the whole-image mask: tile borders show, so agreeing below says the windows are the same.
        assert (Predictor.from_checkpoint(tiled["checkpoint"], "cpu", tile=1000)(image) != reference).sum() > 5
        top2 = logits.topk(2, dim=0).values
        near_tie = (top2[0] - top2[1]).numpy() < TIE
        windows = tiles.grid(*labels.shape, TILE, OVERLAP)
        kept = tiled["kept"][scene]
        dropped = [w for w in windows if w not in kept]
        assert sorted(kept) == sorted(w for w in windows if not (tiles.cut(labels, w) == IGNORE).all())
        covered, touched = np.zeros(labels.shape, bool), np.zeros(labels.shape, bool)
        for w in kept:
            covered[w.slices] = True
        for w in dropped:
            touched[w.slices] = True
        # Pixels no dropped tile reaches are blends of the same tiles in both paths.
        same = covered & ~touched
        assert same.mean() > 0.5
        assert np.array_equal(mask[same & ~near_tie], reference[same & ~near_tie])
        # Pixels no kept tile covers are the ignore index; where a dropped tile overlapped a kept one, the
        # kept tiles alone give the class.
        assert (mask[~covered] == IGNORE).all() and (mask[covered] < len(CLASSES)).all()
        assert (not dropped) == covered.all() == (scene == "scene_a")
        with Image.open(out / f"{scene}_overlay.png") as im:
            assert im.size[0] >= 3 * labels.shape[1]
    assert "wrote 2 scene mask(s) and overlays of split 'val'" in capsys.readouterr().out

    # Existing masks are not replaced without --overwrite.
    assert _predict(tiled, out) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_scenes_beyond_the_memory_bound_are_blended_in_a_file_beside_the_masks(tiled, tmp_path, monkeypatch) -> None:
    assert _predict(tiled, tmp_path / "in_memory") == 0
    monkeypatch.setattr(predict, "SCENE_MEMORY_BYTES", 0)
    made: list[str] = []
    real_memmap = np.memmap

    def memmap(name, *args, **kwargs):
        if Path(name).name.startswith(".seg_dist-scene-"):  # not the split's index, memory-mapped too
            made.append(str(name))
        return real_memmap(name, *args, **kwargs)

    monkeypatch.setattr(np, "memmap", memmap)
    assert _predict(tiled, tmp_path / "on_disk", "--overlay") == 0
    assert len(made) == 4 and all(Path(m).parent == tmp_path / "on_disk" for m in made)  # logits + image, 2 scenes
    assert sorted(p.name for p in (tmp_path / "on_disk").iterdir()) == [  # the working files are gone
        "b__scene_b.png", "b__scene_b_overlay.png", "scene_a.png", "scene_a_overlay.png"]
    for scene in tiled["scenes"]:
        assert np.array_equal(np.array(Image.open(tmp_path / "on_disk" / f"{scene}.png")),
                              np.array(Image.open(tmp_path / "in_memory" / f"{scene}.png")))


def test_an_untiled_set_and_tile_flags_are_refused_in_one_line(tiled, tmp_path, capsys) -> None:
    untiled = _pack(tiled["root"], tmp_path / "untiled")
    assert untiled["tiling"] is None
    out = tmp_path / "masks"
    assert predict.main(["--checkpoint", str(tiled["checkpoint"]), "--shards", str(tmp_path / "untiled"),
                         "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--shards {tmp_path / 'untiled'}: not packed with --tile" in err and err.count("\n") == 1
    assert _predict(tiled, out, "--tile", "32") == 2
    err = capsys.readouterr().err
    assert "--tile do not apply to --shards: its tiles (16 px, 4 px overlap)" in err and err.count("\n") == 1
    assert _predict(tiled, out, "--split", "test") == 2
    assert "test" in capsys.readouterr().err
    assert not out.exists()


def test_a_tiled_checkpoint_tiles_large_images_at_its_tiles_without_a_scale_warning(tiled, tmp_path, caplog) -> None:
    image, _ = tiled["scenes"]["scene_a"]  # 61 px a side against 16 px training tiles
    untiled = _checkpoint(tmp_path / "untiled.pt", None)
    with caplog.at_level("WARNING", logger="seg_dist.inference"):
        plain = Predictor.from_checkpoint(untiled, "cpu")
        assert plain.tile == 0 and plain.check_scale(*image.shape[:2])
    assert "the scale of the frames the model trained on" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="seg_dist.inference"):
        p = Predictor.from_checkpoint(tiled["checkpoint"], "cpu")
        assert not p.check_scale(*image.shape[:2])
        counted = []
        forward = p.model.forward
        p.model.forward = lambda x: counted.append(tuple(x.shape[-2:])) or forward(x)  # type: ignore[method-assign]
        assert p(image).shape == image.shape[:2]
    assert not caplog.records
    assert counted == [(TILE, TILE)] * len(tiles.grid(45, 61, TILE, OVERLAP))
    # A tile given explicitly takes the overlap as a fraction of it, as before.
    explicit = Predictor.from_checkpoint(tiled["checkpoint"], "cpu", tile=32)
    assert (explicit.tile, explicit.tile_overlap, explicit.overlap_px(32)) == (32, None, 8)
    assert torch.equal(torch.tensor(explicit.overlap_px(97)), torch.tensor(97 - int(97 * 0.75)))
