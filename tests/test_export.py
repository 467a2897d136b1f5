"""seg_dist.export / seg_dist.exporting: TorchScript and ONNX files that match the eager model on odd sizes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_checkpoint

from seg_dist import checkpoint, exporting
from seg_dist.config import DataConfig, ModelConfig
from seg_dist.data import preprocess
from seg_dist.export import main

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["background", "road", "car", "person"]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not the defaults, so a lost mean/std shows
SIZES = [(1, 45, 61), (2, 33, 83)]  # odd, and different in batch, height and width
# torch 2.13 deprecates torch.jit (script/load warn; 2.14's load with a FutureWarning); TorchScript still works
# and is one of the formats here.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")]
ONNX_MISSING = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A width-8, depth-3 U-Net saved with the keys the trainer writes (BatchNorm statistics not 0/1)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt", ModelConfig(width=8, depth=3),
                                CLASS_NAMES, MEAN, STD, global_step=12)


def _eager(ckpt: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised input, logits) of the checkpoint's own eager model for uint8 N x H x W x 3 images."""
    trained = checkpoint.load_model(ckpt, torch.device("cpu"))
    data_cfg = DataConfig(mean=MEAN, std=STD)
    x = torch.stack([preprocess(np.ascontiguousarray(im.numpy()), data_cfg) for im in images])
    with torch.inference_mode():
        return x, trained.model(x)


def _images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _nchw(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).contiguous()


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= exporting.ATOL
    assert torch.equal(got.argmax(1), want.argmax(1))


def _error_text(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> str:
    # cli.report prints to stderr, or logs where an earlier test left a seg_dist log handler installed.
    return capsys.readouterr().err + caplog.text


def test_torchscript_uint8_inside(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    assert main(["--checkpoint", str(tiny_checkpoint), "--format", "torchscript", "--out", str(out)]) == 0
    scripted = torch.jit.load(str(out))
    for seed, (n, h, w) in enumerate(SIZES):
        images = _images(n, h, w, seed)
        _, want = _eager(tiny_checkpoint, images)
        with torch.inference_mode():
            _assert_close(scripted(_nchw(images)), want)  # uint8 in
            _assert_close(scripted(_nchw(images).float()), want)  # float 0-255 in
    meta = json.loads(exporting.metadata_path(out).read_text())
    assert meta["normalize"] == "inside" and meta["input"]["dtype"] == meta["input"]["tensor_dtype"] == "uint8"
    assert meta["input"]["raw_mean"] == pytest.approx([255 * m for m in MEAN]) and meta["input"]["channels"] == 3
    assert meta["class_names"] == CLASS_NAMES and meta["num_classes"] == 4 and meta["ignore_index"] == 255
    assert meta["check"]["max_abs_diff"] <= meta["check"]["tolerance"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_json_mode_cli_subprocess(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "bare.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "seg_dist.export", "--checkpoint", str(tiny_checkpoint),
                           "--format", "torchscript", "--normalize", "json", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "max abs diff" in proc.stdout
    meta = json.loads((tmp_path / "bare.pt.json").read_text())
    # The images are 8-bit; the bare graph takes them normalised, as float32.
    assert meta["normalize"] == "json" and meta["input"]["dtype"] == "uint8"
    assert meta["input"]["tensor_dtype"] == "float32" and meta["input"]["channels"] == 3
    assert meta["mean"] == pytest.approx(MEAN) and meta["std"] == pytest.approx(STD)
    assert meta["scale"] == pytest.approx(1 / 255)
    assert meta["class_names"] == CLASS_NAMES and meta["ignore_index"] == 255
    assert meta["input"]["layout"] == "NCHW" and meta["input"]["min_size"] == 8
    # The bare model takes the caller-normalised input the JSON describes.
    images = _images(1, 45, 61, seed=3)
    x = (_nchw(images).float() * meta["scale"] - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(
        meta["std"]).view(1, 3, 1, 1)
    _, want = _eager(tiny_checkpoint, images)
    with torch.inference_mode():
        _assert_close(torch.jit.load(str(out))(x), want)


@pytest.mark.skipif(bool(ONNX_MISSING), reason=f"{', '.join(ONNX_MISSING)} not installed (pip install "
                                               "'seg_dist[export]'); CI installs only the dev extra")
def test_onnx_uint8_inside(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    assert main(["--checkpoint", str(tiny_checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    for seed, (n, h, w) in enumerate(SIZES):
        images = _images(n, h, w, seed)
        _, want = _eager(tiny_checkpoint, images)
        got = torch.from_numpy(session.run(None, {"image": _nchw(images).numpy()})[0])
        _assert_close(got, want)
    meta = json.loads((tmp_path / "model.onnx.json").read_text())
    assert meta["format"] == "onnx" and meta["opset"] >= 17 and meta["input"]["dtype"] == "uint8"
    assert meta["class_names"] == CLASS_NAMES

    # Without onnxruntime the check is skipped with the install hint (the export itself still works).
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    trained = checkpoint.load_model(tiny_checkpoint, torch.device("cpu"))
    module = exporting.ExportUNet(trained.model, MEAN, STD, normalize=True)
    check = exporting._check(trained.model, module, out, "onnx", torch.uint8, trained.input, seed=0)
    assert check.ok and check.skipped is not None
    assert "onnxruntime is not installed: pip install 'seg_dist[export]'" in check.summary()


def test_onnx_without_exporter_packages_is_one_line(tiny_checkpoint: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # find_spec (and import) then see no package
    out = tmp_path / "model.onnx"
    assert main(["--checkpoint", str(tiny_checkpoint), "--format", "onnx", "--out", str(out)]) == 2
    err = _error_text(capsys, caplog)
    assert "pip install 'seg_dist[export]'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_out_needs_overwrite(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "model.pt"
    out.write_bytes(b"keep me")
    args = ["--checkpoint", str(tiny_checkpoint), "--format", "torchscript", "--out", str(out)]
    assert main(args) == 2
    err = _error_text(capsys, caplog)
    assert str(out) in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"keep me" and not exporting.metadata_path(out).exists()
    assert main([*args, "--overwrite"]) == 0
    assert out.read_bytes() != b"keep me" and exporting.metadata_path(out).exists()


def test_failed_check_leaves_nothing(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(exporting, "ATOL", -1.0)  # no difference can pass: stands in for a wrong export
    out = tmp_path / "model.pt"
    assert main(["--checkpoint", str(tiny_checkpoint), "--format", "torchscript", "--out", str(out)]) == 1
    err = _error_text(capsys, caplog)
    assert "does not match the eager one" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # neither the file, its JSON nor a temporary


def test_missing_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        caplog: pytest.LogCaptureFixture) -> None:
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--format", "torchscript",
                 "--out", str(tmp_path / "m.pt")]) == 2
    assert "nope.pt: checkpoint not found" in _error_text(capsys, caplog)


def test_check_sizes_are_odd_and_pad_every_level() -> None:
    for depth in (1, 3, 4, 5):
        (n1, h1, w1), (n2, h2, w2) = exporting.check_sizes(depth)
        assert n1 != n2 and h1 != h2 and w1 != w2
        assert all(s % 2 == 1 and s >= 2**depth for s in (h1, w1, h2, w2))
        # every level's map is odd, so each Up must pad (the branch a trace would bake in)
        assert all((h1 >> level) % 2 == 1 for level in range(depth))


def test_cpu_predictor_masks_equal_the_torchscript_exports(tmp_path: Path) -> None:
    """The Predictor runs fp32 on the CPU whatever train.amp says (autocast only on CUDA), so its masks are
    the fp32 export's on every pixel."""
    from seg_dist.inference import Predictor

    ckpt = save_tiny_checkpoint(tmp_path / "bf16.pt", ModelConfig(width=8, depth=3), CLASS_NAMES, MEAN, STD,
                                global_step=1)
    state = checkpoint.load(ckpt)
    state["config"]["train"]["amp"] = "bf16"  # as a GPU run would have trained
    checkpoint.save(ckpt, state)
    out = tmp_path / "model.pt"
    assert main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
    scripted = torch.jit.load(str(out))
    predictor = Predictor.from_checkpoint(ckpt, "cpu")
    assert predictor.amp_dtype is None
    for seed, (n, h, w) in enumerate([(1, 45, 61), (1, 64, 64), (1, 33, 83)]):
        images = _images(n, h, w, seed)
        with torch.inference_mode():
            logits = scripted(_nchw(images))
        got = predictor(images[0].numpy())
        assert (got == logits.argmax(1)[0].numpy()).mean() == 1.0
        # Not by luck of the margins: the logits agree to fp32 rounding (bf16 autocast is 2e-3 off here).
        assert (predictor.logits_batch([images[0].numpy()])[0] - logits[0]).abs().max() <= exporting.ATOL


def test_export_json_holds_only_the_fields_of_its_model(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    assert main(["--checkpoint", str(tiny_checkpoint), "--format", "torchscript", "--out", str(out)]) == 0
    meta = json.loads(exporting.metadata_path(out).read_text())
    assert meta["model"] == {"name": "unet", "in_channels": 3, "width": 8, "depth": 3, "bilinear": False,
                             "norm": "batch"}  # no encoder, encoder_weights or freeze_encoder_epochs
    assert "opset" not in meta  # an ONNX figure
    assert "skipped" not in meta["check"] and meta["check"]["argmax_agreement"] == 1.0
    # From a checkpoint's config, as export builds it: model.in_channels=0 (from the data) resolved to 3.
    model_cfg = checkpoint.load_model(tiny_checkpoint, torch.device("cpu")).cfg.model
    assert dataclasses.replace(ModelConfig(), in_channels=0).in_channels == 0 and model_cfg.in_channels == 3
    assert exporting.model_fields(dataclasses.replace(model_cfg, name="smp_unet", encoder="resnet18")) == {
        "name": "smp_unet", "in_channels": 3, "encoder": "resnet18"}


def test_export_json_records_the_packing_scale(tmp_path: Path) -> None:
    """A deployment brings images to the scale the model trained at (pack --max-size) as predict does."""
    for max_size in (240, None):
        ckpt = save_tiny_checkpoint(tmp_path / f"m{max_size}.pt", ModelConfig(width=8, depth=3), CLASS_NAMES, MEAN,
                                    STD, global_step=1)
        state = checkpoint.load(ckpt)
        state["max_size"] = max_size
        checkpoint.save(ckpt, state)
        out = tmp_path / f"m{max_size}.ts"
        assert main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(out)]) == 0
        assert json.loads(exporting.metadata_path(out).read_text())["max_size"] == max_size
