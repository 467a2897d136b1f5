"""Pretrained 3-channel weights on images of other channel counts: the first convolution adapted by one
documented rule (`models.smp.adapt_first_conv`), for local files and timm checkpoints, trained on the synthetic
1-band (16-bit grey) and 4-band sets; and the normalisation a pretrained encoder brings, per channel.

The rule itself and the normalisation need nothing extra; the rest needs segmentation_models_pytorch (the smp
environment: `../smp-venv/bin/python -m pytest tests/test_smp*.py`).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import REPO, tiny_overrides
from smp_env import needs_smp

from seg_dist import data, distributed, pack, shards, synthetic
from seg_dist.config import ModelConfig, load_config
from seg_dist.models import adapt_first_conv, build_model
from seg_dist.trainer import train


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 13])
def test_adapted_kernel_sees_alike_bands_as_the_rgb_kernel_sees_grey(channels: int) -> None:
    torch.manual_seed(0)
    rgb = torch.randn(8, 3, 3, 3)
    kernel = adapt_first_conv(rgb, channels)
    assert kernel.shape == (8, channels, 3, 3)
    grey = torch.randn(2, 1, 11, 9)
    want = torch.nn.functional.conv2d(grey.expand(-1, 3, -1, -1), rgb)
    got = torch.nn.functional.conv2d(grey.expand(-1, channels, -1, -1), kernel)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if channels == 1:
        torch.testing.assert_close(kernel, rgb.sum(1, keepdim=True))  # one band: the sum
    if channels > 3:  # RGB kept, scaled; extra bands the mean of the RGB kernels, scaled alike
        torch.testing.assert_close(kernel[:, :3], rgb * 3 / channels)
        torch.testing.assert_close(kernel[:, 3:], rgb.mean(1, keepdim=True).expand(-1, channels - 3, -1, -1)
                                   * 3 / channels)


def _manifest(channels: int, dtype: str) -> dict:
    mean = [10.0 * (i + 1) for i in range(channels)]
    return {"image": {"channels": channels, "dtype": dtype, "mean": mean, "std": [5.0] * channels}}


def test_pretrained_normalisation_covers_rgb_and_the_manifest_the_rest() -> None:
    cfg = load_config(None, ["model.name=smp", "model.encoder_weights=weights/r18.pth"])
    rgbn = data.resolve_normalization(cfg, _manifest(4, "uint8"))
    assert rgbn.mean == pytest.approx((*data.transforms.IMAGENET_MEAN, 40 / 255))
    assert rgbn.std == pytest.approx((*data.transforms.IMAGENET_STD, 5 / 255))
    assert rgbn.source == "imagenet for channels 1-3, manifest for 4-4"
    assert data.resolve_normalization(cfg, _manifest(3, "uint8")).source == "imagenet"
    # Grey, 16-bit or float bands are not the photos the weights saw: the data's own statistics.
    for channels, dtype in ((1, "uint8"), (4, "uint16"), (2, "float32")):
        assert data.resolve_normalization(cfg, _manifest(channels, dtype)).source == "manifest"
    # The alias of before: the same rule.
    alias = load_config(None, ["model.name=smp_unet", "model.encoder_weights=w.pt"])
    assert data.resolve_normalization(alias, _manifest(3, "uint8")).source == "imagenet"


def _rgb_file(path: Path, encoder: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    state = build_model(ModelConfig(name="smp", encoder=encoder), 2).smp.encoder.state_dict()
    torch.save(state, path)
    return state


@needs_smp
@pytest.mark.parametrize("channels", [1, 4])
def test_a_local_rgb_file_loads_into_other_channel_counts(channels: int, tmp_path: Path, caplog) -> None:
    weights = tmp_path / "r18.pth"
    rgb = _rgb_file(weights, "resnet18")
    with caplog.at_level("INFO", logger="seg_dist.models"):
        model = build_model(ModelConfig(name="smp", arch="FPN", encoder="resnet18", in_channels=channels,
                                        encoder_weights=str(weights)), 3)
    assert f"conv1.weight adapted from 3 to {channels} input channels" in caplog.text
    own = model.smp.encoder.state_dict()
    assert torch.equal(own["conv1.weight"], adapt_first_conv(rgb["conv1.weight"], channels))
    assert all(torch.equal(own[k], v) for k, v in rgb.items() if k != "conv1.weight")
    assert model(torch.randn(2, channels, 45, 67)).shape == (2, 3, 45, 67)


@needs_smp
def test_a_timm_checkpoint_file_loads_through_timm(tmp_path: Path) -> None:
    """A timm model's own state dict (its keys, its classifier) for a tu- encoder, on one band."""
    import timm

    torch.manual_seed(5)
    full = timm.create_model("test_resnet").state_dict()
    path = tmp_path / "test_resnet.pth"
    torch.save(full, path)
    model = build_model(ModelConfig(name="smp", arch="Linknet", encoder="tu-test_resnet", in_channels=1,
                                    encoder_weights=str(path)), 3)
    own = model.smp.encoder.state_dict()
    torch.testing.assert_close(own["model.conv1.0.weight"], full["conv1.0.weight"].sum(1, keepdim=True))
    assert torch.equal(own["model.layer4.0.conv2.weight"], full["layer4.0.conv2.weight"])


@pytest.fixture(scope="module", params=["grey16", "bands4"])
def band_shards(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp(request.param)
    files = synthetic.generate(root / "files", 48, 32, seed=3, kind=request.param)
    pack.pack(pack.PackOptions(images=files / "images", masks=files / "masks", out=root / "shards",
                               num_classes=len(synthetic.BAND_CLASS_NAMES), val_fraction=0.25, workers=1,
                               samples_per_shard=12))
    return root / "shards"


@needs_smp
def test_pretrained_rgb_encoder_trains_on_one_and_four_bands(band_shards: Path, tmp_path: Path) -> None:
    weights = tmp_path / "tiny.pth"
    import timm

    torch.manual_seed(5)
    full = timm.create_model("test_resnet").state_dict()
    torch.save(full, weights)
    run = tmp_path / "run"
    overrides = tiny_overrides(band_shards, run, "model.name=smp", "model.arch=Unet", "model.encoder=tu-test_resnet",
                               f"model.encoder_weights={weights}", "train.epochs=4", "optim.lr=1e-2",
                               "train.amp=off", "logging.tensorboard=false", "logging.overlays=0", "train.ema_decay=0")
    cfg = load_config(REPO / "configs" / "default.yaml", overrides)
    channels = 1 if "grey16" in str(band_shards) else 4
    # The model the run starts from: the file's stem convolution adapted to the data's bands.
    resolved = data.resolve_inputs(cfg, shards.load_manifest(band_shards))
    assert resolved.model.in_channels == channels
    initial = build_model(resolved.model, len(synthetic.BAND_CLASS_NAMES)).smp.encoder.state_dict()
    assert torch.equal(initial["model.conv1.0.weight"], adapt_first_conv(full["conv1.0.weight"], channels))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(cfg, distributed.DistEnv(), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    assert result.model.smp.encoder.state_dict()["model.conv1.0.weight"].shape[1] == channels
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert saved["input"]["channels"] == channels and saved["input"]["source"] == "manifest"  # 16-bit bands
