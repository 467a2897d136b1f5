import importlib.util

import pytest
import torch

from seg_dist.config import ModelConfig
from seg_dist.errors import UserError
from seg_dist.models import MODEL_NAMES, UNet, build_model, count_parameters


def test_classic_unet_parameter_count() -> None:
    model = build_model(ModelConfig(name="unet", in_channels=3, width=64, depth=4, bilinear=False), num_classes=21)
    assert count_parameters(model) == 31_038_933
    # Classic transposed-conv variant: the bottleneck has width * 16 channels.
    assert model.downs[-1][1][-2].num_features == 1024


def test_bilinear_halves_bottleneck() -> None:
    model = UNet(3, 21, width=64, depth=4, bilinear=True)
    assert model.downs[-1][1][-2].num_features == 512
    assert count_parameters(model) < 31_038_933


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize(("h", "w", "depth"), [(32, 64, 4), (33, 47, 4), (37, 53, 3), (16, 17, 4), (5, 9, 2)])
def test_output_matches_input_size(h: int, w: int, depth: int, bilinear: bool) -> None:
    torch.manual_seed(0)
    model = UNet(in_channels=3, num_classes=5, width=4, depth=depth, bilinear=bilinear)
    x = torch.randn(2, 3, h, w)
    out = model(x)
    assert out.shape == (2, 5, h, w)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_too_small_input_is_clear_error() -> None:
    model = UNet(3, 2, width=4, depth=4).eval()
    with pytest.raises(ValueError, match="2\\*\\*depth=16"):
        model(torch.randn(1, 3, 15, 40))


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    model = UNet(3, 4, width=8, depth=3).eval()
    x = torch.randn(2, 3, 33, 47)
    ref = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.contiguous(memory_format=torch.channels_last))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_count_parameters_trainable_only() -> None:
    model = UNet(3, 2, width=4, depth=2)
    total = count_parameters(model)
    model.head.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - (4 * 2 + 2)


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="valid names: unet, smp_unet") as info:
        build_model(ModelConfig(name="resnet_fcn"), num_classes=3)
    assert all(name in str(info.value) for name in MODEL_NAMES)


def test_smp_missing_encoder_weights_file(tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(UserError, match=r"model\.encoder_weights='.*nope\.pth' is not a file"):
        build_model(ModelConfig(name="smp_unet", encoder_weights=str(missing)), num_classes=3)


@pytest.mark.skipif(
    importlib.util.find_spec("segmentation_models_pytorch") is not None, reason="smp is installed"
)
def test_smp_missing_extra_message() -> None:
    expected = r"model\.name=smp_unet needs the smp extra: pip install 'seg_dist\[smp\]'"
    with pytest.raises(ImportError, match=expected):
        build_model(ModelConfig(name="smp_unet"), num_classes=3)
