"""Inputs at the training scale: the Predictor brings an image to the packing scale (pack --max-size), runs it
and brings the mask back; far scales are warned about once by name; slow tiles show progress; predict uses the
checkpoint's colours and handles Pillow's size limits on purpose."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from helpers import REPO, child_env, save_tiny_checkpoint
from PIL import Image

from seg_dist import checkpoint, predict, shards
from seg_dist.config import ModelConfig
from seg_dist.inference import Predictor, upsampled_argmax
from seg_dist.visualize import palette

CLASSES = ["sky", "road", "car"]
OWN_COLOURS = [[10, 20, 30], [250, 250, 0], [0, 120, 250]]


def _checkpoint(path: Path, **keys: object) -> Path:
    """A tiny depth-3 U-Net checkpoint with extra keys as the trainer writes them (max_size, train_crop, palette)."""
    save_tiny_checkpoint(path, ModelConfig(width=8, depth=3), CLASSES, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 1)
    state = checkpoint.load(path)
    state.update(keys)
    checkpoint.save(path, state)
    return path


class _Shapes(torch.nn.Module):
    """The real model, recording the height and width of every batch it runs on."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[-2:]))
        return self.model(x)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    small = np.random.default_rng(seed).integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), np.uint8)
    return np.array(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))  # smooth, image-like


def test_inputs_run_at_the_packing_scale_and_masks_come_back_at_their_size(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt", max_size=32, train_crop=[24, 32])
    p = Predictor.from_checkpoint(ckpt, "cpu")
    p.model = shapes = _Shapes(p.model)
    big = _image(48, 64)  # the original frame, twice the packing scale
    mask = p(big)
    assert shapes.seen == [shards.packed_size(48, 64, 32)] == [(24, 32)] and mask.shape == (48, 64)
    # Exactly the frame as pack stored it (PIL bilinear to 32 px), predicted, its logits resized back.
    packed = np.array(Image.fromarray(big).resize((32, 24), Image.Resampling.BILINEAR))
    at_scale = p.logits_batch([packed])[0]
    assert np.array_equal(mask, upsampled_argmax(at_scale, 48, 64).numpy())
    assert torch.equal(p.logits_batch([big])[0],
                       F.interpolate(at_scale[None], size=(48, 64), mode="bilinear", align_corners=False)[0])
    # Images within the packing scale run as they are; --native-scale runs every image as it is.
    shapes.seen.clear()
    p(_image(20, 30))
    p.native_scale = True
    p(big)
    assert shapes.seen == [(20, 30), (48, 64)]


def test_upsampled_argmax_is_interpolate_then_argmax_in_bands():
    logits = torch.randn(5, 7, 9, generator=torch.Generator().manual_seed(0))
    want = F.interpolate(logits[None], size=(50, 61), mode="bilinear", align_corners=False)[0].argmax(0)
    for band_values in (1, 5 * 61 * 3, 1 << 24):  # one row per band, 3 rows, all at once
        assert torch.equal(upsampled_argmax(logits, 50, 61, band_values), want)
    assert torch.equal(upsampled_argmax(logits, 7, 9), logits.argmax(0))


def test_far_scales_are_warned_about_once_naming_the_first_file(tmp_path, caplog, capsys):
    # Trained on 32 px frames (data.image_size=0: the crop is the mean frame), packed without --max-size.
    ckpt = _checkpoint(tmp_path / "m.pt", train_crop=[32, 32])
    src = tmp_path / "in"
    src.mkdir()
    for name, side in (("a_near", 40), ("b_large", 160), ("c_large", 200), ("d_small", 12)):
        Image.fromarray(_image(side, side)).save(src / f"{name}.png")
    with caplog.at_level("WARNING"):
        assert predict.main(["--checkpoint", str(ckpt), "--input", str(src), "--out", str(tmp_path / "o")]) == 0
    warnings = [r.getMessage() for r in caplog.records if "trained on" in r.getMessage()]
    assert warnings == [f"{src / 'b_large.png'}: 160 x 160 px is 5x the scale of the frames the model trained on "
                        "(longer side 32 px): objects look larger than in training, so the mask may be poor; "
                        "reduce it to a longer side of about 32 px first"]
    assert "3 image(s) far from the training scale" in capsys.readouterr().out

    # Packed at --max-size 32: the same large images run at 32 px, and only the small one is far.
    state = checkpoint.load(ckpt)
    state["max_size"] = 32
    checkpoint.save(ckpt, state)
    p = Predictor.from_checkpoint(ckpt, "cpu")
    assert [p.scale_problem(s, s) is None for s in (40, 160, 200, 12)] == [True, True, True, False]
    assert "drop --native-scale" in Predictor.from_checkpoint(ckpt, "cpu", native_scale=True).scale_problem(160, 160)
    # Where the checkpoint records the train split's mean frame, that is the training scale, not the crop.
    framed = _checkpoint(tmp_path / "framed.pt", train_mean_hw=[30.0, 40.0], train_crop=[16, 16])
    p = Predictor.from_checkpoint(framed, "cpu")
    assert p.train_side == 40 and p.scale_problem(60, 80) is None and p.scale_problem(100, 100) is not None


def test_predict_cli_native_scale_and_its_warning_on_stderr(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt", max_size=32, train_crop=[32, 32])
    image = tmp_path / "frame.png"
    Image.fromarray(_image(96, 128)).save(image)

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "seg_dist.predict", "--checkpoint", str(ckpt), "--input",
                               str(image), "--out", str(tmp_path / "o"), "--overwrite", *extra], cwd=REPO,
                              env=child_env(), capture_output=True, text=True, timeout=300)

    scaled = run()
    assert scaled.returncode == 0, scaled.stderr
    assert "trained on" not in scaled.stderr
    at_scale = np.array(Image.open(tmp_path / "o" / "frame.png"))
    native = run("--native-scale")
    assert native.returncode == 0, native.stderr
    assert f"{image}: 128 x 96 px is 4x the scale" in native.stderr and "drop --native-scale" in native.stderr
    assert native.stderr.count("trained on") == 1
    full = np.array(Image.open(tmp_path / "o" / "frame.png"))
    assert at_scale.shape == full.shape == (96, 128)
    rgb = np.array(Image.open(image))
    assert np.array_equal(at_scale, Predictor.from_checkpoint(ckpt, "cpu")(rgb))
    assert np.array_equal(full, Predictor.from_checkpoint(ckpt, "cpu", native_scale=True)(rgb))


def test_slow_tiles_show_progress(tmp_path, caplog):
    p = Predictor.from_checkpoint(_checkpoint(tmp_path / "m.pt"), "cpu", tile=32, overlap=0.5)
    image = _image(80, 100)
    with caplog.at_level("INFO", logger="seg_dist.progress"):
        p.predict_batch([image], ["scan.tif"])
    assert not caplog.records  # fast tiles: no bar
    p.tile_progress_after = 0.0
    with caplog.at_level("INFO", logger="seg_dist.progress"):
        p.predict_batch([image], ["scan.tif"])
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(line.startswith("scan.tif: 24 tiles of 32 x 32 px:") for line in lines)
    assert "100% (24/24)" in lines[-1]  # 80 x 100 px: 4 rows x 6 columns of windows 16 px apart


def test_predict_uses_the_checkpoint_colours(tmp_path):
    src = tmp_path / "in.png"
    Image.fromarray(_image(40, 48)).save(src)
    for name, own in (("own", OWN_COLOURS), ("generated", None)):
        ckpt = _checkpoint(tmp_path / f"{name}.pt", **({"palette": own} if own else {}))
        out = tmp_path / name
        assert predict.main(["--checkpoint", str(ckpt), "--input", str(src), "--out", str(out), "--overlay"]) == 0
        colours = np.array(own if own else palette(3), np.uint8)
        with Image.open(out / "in.png") as im:
            assert np.array_equal(np.array(im.getpalette()[:9], np.uint8).reshape(3, 3), colours)
            mask = np.array(im)
        with Image.open(out / "in_overlay.png") as im:
            picture = np.array(im.convert("RGB"))
        shown = {tuple(c) for c in picture.reshape(-1, 3)}
        assert all(tuple(colours[c]) in shown for c in np.unique(mask))  # the prediction panel and legend


def test_pillow_size_limits_are_one_line_each(tmp_path, monkeypatch, caplog, capsys):
    """Pillow warns above Image.MAX_IMAGE_PIXELS and refuses above twice that (a guard against decompression
    bombs); its limit is lowered here so that small files cross both."""
    ckpt = _checkpoint(tmp_path / "m.pt")
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_image(40, 40)).save(src / "large.png")  # 1600 px: above 1000, warned
    Image.fromarray(_image(50, 50)).save(src / "huge.png")  # 2500 px: above 2000, refused
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with caplog.at_level("WARNING"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = predict.main(["--checkpoint", str(ckpt), "--input", str(src), "--out", str(tmp_path / "o")])
    assert rc == 1
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]  # no Pillow text
    err = capsys.readouterr().err
    assert err.count("\n") == 2  # the skipped file, then the run's one-line failure
    assert (f"error: {src / 'huge.png'}: 0.0025 Mpx, more than the 0.002 Mpx Pillow decodes (its guard against "
            "decompression bombs); cut or reduce it first") in err
    assert [r.getMessage() for r in caplog.records if "Mpx" in r.getMessage()] == [
        f"{src / 'large.png'}: 40 x 40 px (0.0016 Mpx) is above Pillow's 0.001 Mpx decompression-bomb warning "
        "size; read as asked for"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["large.png"]
