"""Pretrained encoders: `model.name=smp_unet`, `model.encoder_weights`, `model.freeze_encoder_epochs` and
`optim.encoder_lr_mult`.

The first part (our U-Net's contracting path as the encoder, frozen with 2 DDP ranks) needs nothing extra
and runs everywhere. The rest needs segmentation_models_pytorch, which the project venv does not have:
it is skipped there and runs in the smp environment (README, "Architectures and pretrained encoders"):
`../smp-venv/bin/python -m pytest tests/test_smp*.py`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, child_env, save_tiny_checkpoint, spawn_train, tiny_overrides
from smp_env import SMP_MISSING, needs_smp

from seg_dist import checkpoint, distributed, exporting, pack
from seg_dist.config import DataConfig, ModelConfig, load_config
from seg_dist.data import preprocess
from seg_dist.errors import UserError
from seg_dist.models import build_model, encoder_of
from seg_dist.trainer import train


@pytest.fixture
def one_thread() -> Iterator[None]:
    """In-process training on a loaded 2-core machine: one intra-op thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _snapshots(run: Path) -> list[dict]:
    """The end-of-epoch checkpoints, oldest first."""
    paths = sorted((run / checkpoint.CHECKPOINT_DIR).glob("epoch*-step*.pt"))
    return [torch.load(p, weights_only=True) for p in paths]


def _encoder_keys(state: dict[str, torch.Tensor], model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """Keys of `state` (a whole-model state dict) inside and outside the model's encoder."""
    encoder_tensors = {id(t) for t in encoder_of(model).state_dict(keep_vars=True).values()}
    own = model.state_dict(keep_vars=True)
    inside = [k for k in state if id(own[k]) in encoder_tensors]
    return inside, [k for k in state if k not in inside]


def _initial_weights(cfg_overrides: list[str], num_classes: int = 6) -> tuple[torch.nn.Module, dict]:
    """The weights a run starts from: `setup_run` seeds with train.seed right before building the model."""
    cfg = load_config(REPO / "configs" / "default.yaml", cfg_overrides)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, num_classes)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def _check_frozen_then_trained(snapshots: list[dict], model: torch.nn.Module, initial: dict) -> None:
    """Epoch 0 left the encoder (weights and BatchNorm statistics) exactly as it started and trained the
    rest; epoch 1 trained the encoder too."""
    inside, outside = _encoder_keys(initial, model)
    assert any(k.endswith("running_mean") for k in inside), inside
    after0, after1 = snapshots[0]["model"], snapshots[1]["model"]
    for k in inside:
        assert torch.equal(after0[k], initial[k]), f"{k} changed while the encoder was frozen"
    assert any(not torch.equal(after0[k], initial[k]) for k in outside if after0[k].is_floating_point())
    changed = [k for k in inside if not torch.equal(after1[k], after0[k])]
    assert any(k.endswith("weight") for k in changed) and any(k.endswith("running_mean") for k in changed)
    # The groups' rates in the checkpoint: encoder at 0 in epoch 0, then encoder_lr_mult x the main rate.
    main0, enc0 = (g["lr"] for g in snapshots[0]["optimizer"]["param_groups"])
    main1, enc1 = (g["lr"] for g in snapshots[1]["optimizer"]["param_groups"])
    assert enc0 > 0 and enc0 == pytest.approx(0.5 * main0)  # the rate of the first unfrozen step
    assert enc1 == pytest.approx(0.5 * main1)


# --- without smp: our U-Net's contracting path is the encoder ----------------------------------------


def test_frozen_unet_encoder_with_two_ddp_ranks(tiny_shards, tmp_path):
    """Frozen by learning rate, not requires_grad: DDP runs unchanged, the ranks agree, and the contracting
    path (with its BatchNorm statistics) is untouched for exactly the frozen epoch."""
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, run, "train.epochs=2", "model.freeze_encoder_epochs=1",
                               "optim.encoder_lr_mult=0.5", "logging.tensorboard=false", "train.amp=off")
    ranks = spawn_train(2, overrides, tmp_path)
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
    model, initial = _initial_weights(overrides)
    _check_frozen_then_trained(_snapshots(run), model, initial)


# --- with smp --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 px samples (32 train, 8 val): neither crops nor validation images are multiples of 32."""
    out = tmp_path_factory.mktemp("shards") / "synthetic40"
    pack.pack_synthetic(out, n=40, size=40, samples_per_shard=12, workers=1)
    return out


def _smp_overrides(shards: Path, run: Path, *extra: str) -> list[str]:
    return tiny_overrides(shards, run, "model.name=smp_unet", "model.encoder=resnet18", "train.amp=off",
                          "logging.tensorboard=false", *extra)


def _resnet18_encoder_file(path: Path, with_head: bool = True, encoder: str = "resnet18") -> dict:
    """A local encoder checkpoint (no downloads): a seeded smp encoder's state dict, plus a torchvision-style
    `fc.*` classifier head."""
    torch.manual_seed(123)
    state = build_model(ModelConfig(name="smp_unet", encoder=encoder), 2).encoder.state_dict()
    if with_head:
        state = {**state, "fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)}
    torch.save(state, path)
    return state


@needs_smp
def test_smp_takes_any_size_and_keeps_its_own_keys():
    model = build_model(ModelConfig(name="smp_unet", encoder="resnet18"), 5)
    assert model.stride == 32 and encoder_of(model) is model.smp.encoder
    assert {k.split(".")[1] for k in model.state_dict()} == {"encoder", "decoder", "segmentation_head"}
    assert all(k.startswith("smp.") for k in model.state_dict())
    model.eval()
    x = torch.randn(2, 3, 40, 33)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 5, 40, 33)
        # The pad is at the bottom/right and cropped away: the same as smp on the padded input.
        padded = model.smp(torch.nn.functional.pad(x, [0, 31, 0, 24]))
    assert torch.equal(out, padded[..., :40, :33])


@needs_smp
def test_smp_unet_learns_and_evaluate_agrees(odd_shards, tmp_path, one_thread):
    run = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "default.yaml", _smp_overrides(odd_shards, run, "data.image_size=40"))
    result = train(cfg, distributed.DistEnv(), torch.device("cpu"))
    mious = [h["miou"] for h in result.history]
    assert len(mious) == 3 and mious[-1] > mious[0] + 0.1, mious
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]

    best = run / checkpoint.CHECKPOINT_DIR / checkpoint.BEST
    out = subprocess.run([sys.executable, "-m", "seg_dist.evaluate", "--checkpoint", str(best)],
                         capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["samples"] == 8 and report["miou"] == pytest.approx(max(mious), abs=1e-6)


@needs_smp
def test_encoder_weights_load_and_a_mismatch_is_one_line(tiny_shards, tmp_path, caplog):
    weights = tmp_path / "resnet18.pth"
    state = _resnet18_encoder_file(weights)
    with caplog.at_level(logging.INFO, logger="seg_dist.models"):
        model = build_model(ModelConfig(name="smp_unet", encoder="resnet18", encoder_weights=str(weights)), 3)
    assert "ignoring the classifier head (fc.bias, fc.weight)" in caplog.text
    for k, v in model.smp.encoder.state_dict().items():
        assert torch.equal(v, state[k]), k

    wrong = tmp_path / "resnet34.pth"
    _resnet18_encoder_file(wrong, with_head=False, encoder="resnet34")
    with pytest.raises(UserError, match=r"resnet34\.pth does not fit the resnet18 encoder: \d+ unexpected keys"):
        build_model(ModelConfig(name="smp_unet", encoder="resnet18", encoder_weights=str(wrong)), 3)
    # A 3-channel file fits any channel count (the first convolution is adapted: test_smp_channels.py); a
    # 4-channel one does not fit a 3-channel model.
    four = tmp_path / "four.pth"
    torch.save(build_model(ModelConfig(name="smp_unet", encoder="resnet18", in_channels=4), 2).encoder.state_dict(),
               four)
    with pytest.raises(UserError, match=r"four\.pth does not fit .* shape mismatches, file vs model "
                                        r"\(conv1\.weight \(64, 4, 7, 7\) vs \(64, 3, 7, 7\)\)"):
        build_model(ModelConfig(name="smp_unet", encoder="resnet18", encoder_weights=str(four)), 3)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError, match=r"junk\.pth: not a readable torch state dict"):
        build_model(ModelConfig(name="smp_unet", encoder="resnet18", encoder_weights=str(junk)), 3)

    # Through the command: one line naming the file, exit 2, no traceback.
    cmd = [sys.executable, "-m", "seg_dist.train", "--config", "configs/default.yaml", "model.name=smp_unet",
           "model.encoder=resnet18", f"model.encoder_weights={wrong}", f"run.dir={tmp_path / 'run'}",
           f"data.root={tiny_shards}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600)
    text = out.stdout + out.stderr  # the error line goes through the run's rank-prefixed logging
    assert out.returncode == 2, text[-3000:]
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if "does not fit" in line]
    assert len(errors) == 1 and f"model.encoder_weights={wrong} does not fit the resnet18 encoder" in errors[0]


@needs_smp
def test_frozen_pretrained_encoder_then_fine_tuned(tiny_shards, tmp_path, one_thread):
    weights = tmp_path / "resnet18.pth"
    _resnet18_encoder_file(weights)
    run = tmp_path / "run"
    overrides = _smp_overrides(tiny_shards, run, "train.epochs=2", f"model.encoder_weights={weights}",
                               "model.freeze_encoder_epochs=1", "optim.encoder_lr_mult=0.5")
    train(load_config(REPO / "configs" / "default.yaml", overrides), distributed.DistEnv(), torch.device("cpu"))
    model, initial = _initial_weights(overrides)
    loaded = torch.load(weights, weights_only=True)
    assert torch.equal(initial["smp.encoder.layer4.1.conv2.weight"], loaded["layer4.1.conv2.weight"])
    _check_frozen_then_trained(_snapshots(run), model, initial)


# --- exporting and predicting an smp checkpoint -------------------------------------------------------------

SMP_CLASSES = ["background", "road", "car", "person"]
SMP_MEAN, SMP_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # not the defaults, so a lost mean/std shows
SMP_SIZES = [(1, 37, 53), (2, 71, 33)]  # odd, not multiples of 32, and not the exporter's own check sizes


@pytest.fixture(scope="module")
def smp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An smp resnet18 U-Net (random weights) saved with the keys the trainer writes (BatchNorm statistics
    not 0/1)."""
    if SMP_MISSING:
        pytest.skip("segmentation_models_pytorch is not importable")
    return save_tiny_checkpoint(tmp_path_factory.mktemp("smp_ckpt") / "best.pt",
                                ModelConfig(name="smp_unet", encoder="resnet18"), SMP_CLASSES, SMP_MEAN, SMP_STD,
                                global_step=7)


def _smp_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _smp_eager(ckpt: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised NCHW input, logits) of the checkpoint's eager SmpSegmenter for uint8 N x H x W x 3 images."""
    model = checkpoint.load_model(ckpt, torch.device("cpu")).model
    data_cfg = DataConfig(mean=SMP_MEAN, std=SMP_STD)
    x = torch.stack([preprocess(np.ascontiguousarray(im.numpy()), data_cfg) for im in images])
    with torch.inference_mode():
        return x, model(x)


def _assert_matches(got: torch.Tensor, want: torch.Tensor) -> float:
    """The exporter's own criterion: max abs diff within ATOL + RTOL * max |eager|, argmax agreeing."""
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff <= exporting.ATOL + exporting.RTOL * want.abs().max().item(), diff
    agree = (got.argmax(1) == want.argmax(1)).float().mean().item()
    assert agree >= exporting.MIN_ARGMAX_AGREEMENT, agree
    return diff


@needs_smp
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning", "ignore:`torch.jit:FutureWarning")
def test_smp_export_torchscript_and_onnx(smp_checkpoint: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from seg_dist.export import main as export_main

    ts, onnx_out = tmp_path / "smp.pt", tmp_path / "smp.onnx"
    assert export_main(["--checkpoint", str(smp_checkpoint), "--format", "torchscript", "--out", str(ts)]) == 0
    assert export_main(["--checkpoint", str(smp_checkpoint), "--format", "onnx", "--out", str(onnx_out)]) == 0
    scripted = torch.jit.load(str(ts))
    session = ort.InferenceSession(str(onnx_out), providers=["CPUExecutionProvider"])
    for seed, (n, h, w) in enumerate(SMP_SIZES):
        images = _smp_images(n, h, w, seed)
        raw = images.permute(0, 3, 1, 2).contiguous()
        _, want = _smp_eager(smp_checkpoint, images)
        with torch.inference_mode():
            _assert_matches(scripted(raw), want)  # uint8 in
            _assert_matches(scripted(raw.float()), want)
        _assert_matches(torch.from_numpy(session.run(None, {"image": raw.numpy()})[0]), want)
    for out, fmt in ((ts, "torchscript"), (onnx_out, "onnx")):
        meta = json.loads(exporting.metadata_path(out).read_text())
        assert meta["format"] == fmt and meta["normalize"] == "inside" and meta["input"]["min_size"] == 32
        assert meta["model"]["name"] == "smp_unet" and meta["model"]["encoder"] == "resnet18"
        assert meta["class_names"] == SMP_CLASSES and meta["mean"] == pytest.approx(SMP_MEAN)
        assert meta["check"]["shapes"] == [[1, 3, 95, 127], [2, 3, 161, 65]]  # check_sizes(5): stride 32
        assert meta["check"]["max_abs_diff"] <= meta["check"]["tolerance"]
    # Below the stride the graph refuses (the JSON's min_size), as the U-Net's does below 2**depth.
    with pytest.raises(Exception, match="at least the encoder stride"):
        scripted(torch.zeros(1, 3, 31, 40, dtype=torch.uint8))


@needs_smp
def test_smp_export_json_mode_onnx(smp_checkpoint: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    out = tmp_path / "bare.onnx"
    exporting.export(smp_checkpoint, out, "onnx", "json")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = json.loads(exporting.metadata_path(out).read_text())
    # The bare model takes normalised floats; input.dtype stays the training pixels' type.
    assert meta["normalize"] == "json" and meta["input"]["tensor_dtype"] == "float32"
    assert meta["input"]["dtype"] == "uint8"
    images = _smp_images(1, 45, 61, seed=3)
    x, want = _smp_eager(smp_checkpoint, images)
    _assert_matches(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), want)


@needs_smp
def test_smp_predictor_and_predict_command_keep_the_image_size(smp_checkpoint: Path, tmp_path: Path) -> None:
    from PIL import Image

    from seg_dist.predict import Predictor

    image = _smp_images(1, 37, 53, seed=5)[0].numpy()
    predictor = Predictor.from_checkpoint(smp_checkpoint, device="cpu")
    mask = predictor(image)
    assert mask.shape == (37, 53) and mask.min() >= 0 and mask.max() < len(SMP_CLASSES)

    Image.fromarray(image).save(tmp_path / "odd.png")
    out = tmp_path / "masks"
    proc = subprocess.run([sys.executable, "-m", "seg_dist.predict", "--checkpoint", str(smp_checkpoint),
                           "--input", str(tmp_path / "odd.png"), "--out", str(out), "--device", "cpu"],
                          capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = np.array(Image.open(out / "odd.png"))
    assert written.shape == (37, 53)
    assert np.array_equal(written, mask)
