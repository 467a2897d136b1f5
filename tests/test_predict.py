"""Predict and evaluate on a trained checkpoint: the same masks, sizes kept, tiles without seams."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, child_env, png_bytes, tiny_overrides, torchrun
from PIL import Image

from seg_dist import data, distributed, shards
from seg_dist.config import load_config
from seg_dist.predict import Predictor
from seg_dist.trainer import train


@pytest.fixture(scope="module")
def trained(tiny_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("predict") / "run"
    cfg = load_config(REPO / "configs" / "default.yaml",
                      tiny_overrides(tiny_shards, run, "train.epochs=3", "optim.lr=1e-2", "train.amp=off"))
    train(cfg, distributed.DistEnv(), torch.device("cpu"))
    return run / "checkpoints" / "last.pt"


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=300)


def test_evaluate_equals_predicts_masks_counted_against_the_ground_truth(trained, tiny_shards, tmp_path):
    manifest = shards.load_manifest(tiny_shards)
    images, truth = tmp_path / "val", {}
    for s in data.iter_samples(shards.shard_urls(tiny_shards, manifest, "val")):
        (images / f"{s['key']}.png").parent.mkdir(parents=True, exist_ok=True)
        (images / f"{s['key']}.png").write_bytes(png_bytes(s["image"]))  # lossless: the same pixels
        truth[s["key"]] = s["mask"]
    out = _cli("seg_dist.predict", "--checkpoint", str(trained), "--input", str(images), "--out",
               str(tmp_path / "masks"), "--batch-size", "1")
    assert out.returncode == 0, out.stderr
    n = manifest["num_classes"]
    expected = np.zeros((n, n), np.int64)
    for key, gt in truth.items():
        pred = np.array(Image.open(tmp_path / "masks" / f"{key}.png"))
        assert pred.shape == gt.shape
        valid = gt != manifest["ignore_index"]
        expected += np.bincount(n * gt[valid] + pred[valid], minlength=n * n).reshape(n, n)

    report = tmp_path / "eval.json"
    ev = _cli("seg_dist.evaluate", "--checkpoint", str(trained), "--json", str(report), "--out",
              str(tmp_path / "pictures"))
    assert ev.returncode == 0, ev.stderr
    figures = json.loads(report.read_text())
    assert figures["confusion_matrix"] == expected.tolist()  # rows = ground truth, ignore excluded
    assert figures["samples"] == len(truth) == 16
    # The per-class table names every class with IoU, Dice, precision, recall and ground-truth share.
    assert "class" in ev.stdout and "recall" in ev.stdout and "GT share" in ev.stdout and "disc" in ev.stdout
    assert len(figures["per_class_precision"]) == n and sum(figures["per_class_gt_share"]) == pytest.approx(1)
    for picture in ("confusion_matrix.png", "iou_per_class.png"):
        with Image.open(tmp_path / "pictures" / picture) as im:
            assert min(im.size) > 50


def test_evaluate_progress_counts_the_whole_split_on_two_ranks(trained, tmp_path):
    out = torchrun(2, "seg_dist.evaluate", "--checkpoint", str(trained), "--json", str(tmp_path / "m.json"))
    lines = [line for line in out.stdout.splitlines() if "evaluate val:" in line]
    assert lines and all("[rank 0]" in line for line in lines)  # one bar, rank 0's
    assert "100% (16/16)" in lines[-1]  # all 16 samples, though rank 0 scores 8 of them
    assert json.loads((tmp_path / "m.json").read_text())["samples"] == 16


def test_evaluate_out_is_a_folder_not_the_json(trained, tmp_path, capsys):
    from seg_dist import evaluate

    assert evaluate.main(["--checkpoint", str(trained), "--out", str(tmp_path / "m.json")]) == 2
    assert "--out is the folder for the pictures; write the JSON report with --json" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()


def test_predict_keeps_sizes_grey_images_and_folder_structure(trained, tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    (src / "b").mkdir()
    Image.fromarray(rng.integers(0, 256, (45, 37, 3), dtype=np.uint8)).save(src / "a" / "x.jpg")
    Image.fromarray(rng.integers(0, 256, (33, 50), dtype=np.uint8)).save(src / "b" / "x.png")  # grey, same stem
    out = _cli("seg_dist.predict", "--checkpoint", str(trained), "--input", str(src), "--out", str(tmp_path / "o"),
               "--overlay")
    assert out.returncode == 0, out.stderr
    for name, hw in (("a/x", (45, 37)), ("b/x", (33, 50))):
        with Image.open(tmp_path / "o" / f"{name}.png") as im:
            assert im.mode == "P"
            mask = np.array(im)
        assert mask.shape == hw and mask.max() < 6
        with Image.open(tmp_path / "o" / f"{name}_overlay.png") as im:
            assert im.size[0] >= 3 * hw[1] and im.size[1] > max(160, hw[0])  # three panels and a legend strip
    # Again into the same folder: refused, nothing overwritten unless asked.
    again = _cli("seg_dist.predict", "--checkpoint", str(trained), "--input", str(src), "--out", str(tmp_path / "o"))
    assert again.returncode == 2 and "--overwrite" in again.stderr and again.stderr.count("\n") == 1


def test_a_corrupt_image_is_named_and_the_others_are_written(trained, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(src / f"ok{i}.png")
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = _cli("seg_dist.predict", "--checkpoint", str(trained), "--input", str(src), "--out", str(tmp_path / "o"))
    assert out.returncode == 1
    # The decoder's own words after the file name, no exception class in front.
    assert (f"error: {src / 'broken.jpg'}: not an image seg_dist can read (JPEG, PNG, TIFF or BMP), or damaged; "
            "skipped") in out.stderr
    assert "Error" not in out.stderr and "1 of 4 image(s) could not be read" in out.stderr
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["ok0.png", "ok1.png", "ok2.png"]


class _CountingModel(torch.nn.Module):
    """The real model, counting the windows it is called on."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


def test_tiled_inference_agrees_with_whole_images_and_runs_on_large_ones(trained):
    p = Predictor.from_checkpoint(trained, "cpu")
    small = np.random.default_rng(1).integers(0, 256, (30, 26, 3), np.uint8)
    image = np.array(Image.fromarray(small).resize((130, 97)))  # smooth enough to be image-like
    whole = p.logits_batch([image])[0]
    counting = _CountingModel(p.model)
    p.model, p.tile, p.overlap = counting, 64, 0.5
    tiled = p.logits_batch([image])[0]
    assert counting.calls == 3 * 4  # 97 x 130 px in 64 px windows 32 px apart: rows at 0, 32, 33; columns 0..66
    assert tiled.shape == whole.shape
    # Each tile sees less context near its borders; blending keeps the difference small and seam-free.
    assert (tiled.argmax(0) == whole.argmax(0)).float().mean() > 0.97
    assert (tiled - whole).abs().mean() < 0.05 * whole.abs().mean()

    counting.calls = 0
    p.tile, p.overlap = 512, 0.25
    big = np.random.default_rng(2).integers(0, 256, (1100, 1500, 3), dtype=np.uint8)
    mask = p(big)
    assert mask.shape == (1100, 1500) and counting.calls == 3 * 4  # windows 384 px apart


def test_python_api_like_the_seed(trained):
    p = Predictor.from_checkpoint(trained)
    image = np.random.default_rng(3).integers(0, 256, (41, 29, 3), dtype=np.uint8)
    mask = p(image)
    assert mask.shape == (41, 29) and mask.dtype == np.int64
    picture = p.overlay(image, mask)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[1] >= 3 * 29


def test_tiles_smaller_than_the_training_crop_are_warned_about(trained, caplog):
    crop = torch.load(trained, map_location="cpu", weights_only=True)["train_crop"]
    with caplog.at_level("WARNING", logger="seg_dist.inference"):
        Predictor.from_checkpoint(trained, "cpu", tile=max(crop))
    assert not caplog.records
    with caplog.at_level("WARNING", logger="seg_dist.inference"):
        Predictor.from_checkpoint(trained, "cpu", tile=max(crop) - 8)
    assert f"smaller than the {crop[0]} x {crop[1]} crops the model trained on" in caplog.text


def test_images_smaller_than_the_model_takes_are_padded_and_predicted(tmp_path):
    """A depth-4 U-Net needs 16 px a side; smaller images are padded (mean colour) and their masks cropped
    back, so every image of the folder gets its mask; a broken one is named, the rest written, exit 1."""
    from helpers import save_tiny_checkpoint

    from seg_dist import predict
    from seg_dist.config import ModelConfig

    ckpt = save_tiny_checkpoint(tmp_path / "d4.pt", ModelConfig(width=8, depth=4), ["a", "b", "c"],
                                (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), global_step=1)
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(4)
    sizes = {"a_tiny": (5, 7), "b_thin": (3, 40), "c_one": (1, 1), "d_ok": (20, 24)}
    for name, hw in sizes.items():
        Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(src / f"{name}.png")
    assert predict.main(["--checkpoint", str(ckpt), "--input", str(src), "--out", str(tmp_path / "o"),
                         "--batch-size", "2", "--tta", "flip"]) == 0
    for name, hw in sizes.items():
        assert np.array(Image.open(tmp_path / "o" / f"{name}.png")).shape == hw
    # The padded prediction is the model's on the zero-padded (mean-colour) normalised image, cropped back.
    p = Predictor.from_checkpoint(ckpt, "cpu")
    image = np.array(Image.open(src / "a_tiny.png"))
    x = F.pad(p._to_tensor(image)[None], [0, 16 - 7, 0, 16 - 5])
    with torch.no_grad():
        assert torch.equal(p.logits_batch([image])[0], p.model(x)[0, :, :5, :7])

    (src / "c_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = _cli("seg_dist.predict", "--checkpoint", str(ckpt), "--input", str(src), "--out", str(tmp_path / "o2"))
    assert out.returncode == 1
    assert f"{src / 'c_broken.jpg'}: not an image seg_dist can read" in out.stderr
    assert "wrote 4 of 5 mask(s)" in out.stdout and "1 image(s) skipped" in out.stdout
    assert sorted(p.name for p in (tmp_path / "o2").iterdir()) == [f"{n}.png" for n in sorted(sizes)]
