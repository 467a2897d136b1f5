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
    with pytest.raises(ValueError, match="valid names: unet, smp_unet, smp") as info:
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
    expected = r"model\.name=smp needs the smp extra: pip install 'seg_dist\[smp\]'"
    for name in ("smp", "smp_unet"):
        with pytest.raises(ImportError, match=expected):
            build_model(ModelConfig(name=name), num_classes=3)


# --- activation checkpointing -------------------------------------------------------------------------------


def _unet_pair(norm: str = "batch") -> tuple[torch.nn.Module, torch.nn.Module]:
    models = []
    for on in (False, True):
        torch.manual_seed(0)
        models.append(build_model(ModelConfig(name="unet", width=4, depth=3, norm=norm,
                                              activation_checkpointing=on), num_classes=3).train())
    return models[0], models[1]


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_activation_checkpointing_keeps_the_step_and_the_keys(norm: str) -> None:
    """Gradients as without it; BatchNorm statistics moved once per step, not again by the recomputation."""
    from seg_dist.models import checkpointing

    plain, ckpt = _unet_pair(norm)
    assert sum(checkpointing.is_checkpointed(m) for m in ckpt.modules()) == 1 + 3 + 3  # inc, downs, ups
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    x = torch.randn(2, 3, 37, 29, generator=torch.Generator().manual_seed(1))
    for model in (plain, ckpt):
        for _ in range(2):
            model(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        assert torch.equal(a, b), name
    # Evaluation and no-grad inference run the plain forward: the same logits.
    plain.eval()
    ckpt.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), ckpt(x))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning", "ignore:`torch.jit:FutureWarning")
def test_activation_checkpointing_is_off_in_an_export(tmp_path) -> None:
    from helpers import save_tiny_checkpoint

    from seg_dist import exporting

    ckpt = save_tiny_checkpoint(tmp_path / "best.pt", ModelConfig(name="unet", width=4, depth=2,
                                                                   activation_checkpointing=True),
                                ["a", "b"], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), global_step=1)
    result = exporting.export(ckpt, tmp_path / "m.pt", "torchscript")
    assert result.check.ok and result.check.max_abs_diff is not None


def test_activation_checkpointing_trains_two_ranks_as_without(tiny_shards, tmp_path) -> None:
    """2 gloo ranks with BatchNorm over the global batch (collectives in the recomputation too): the same
    weights as the same run without checkpointing."""
    from helpers import spawn_train, tiny_overrides

    finals = []
    for on in ("false", "true"):
        overrides = tiny_overrides(tiny_shards, tmp_path / f"run_{on}", "train.epochs=1", "train.amp=off",
                                   "logging.tensorboard=false", "train.sync_bn=on",
                                   f"model.activation_checkpointing={on}")
        (tmp_path / on).mkdir()
        ranks = spawn_train(2, overrides, tmp_path / on)
        for key, value in ranks[0]["model"].items():
            assert torch.equal(value, ranks[1]["model"][key]), key
        finals.append(ranks[0]["model"])
    for key, value in finals[0].items():
        torch.testing.assert_close(finals[1][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_run_resumes_with_activation_checkpointing_switched_on(tiny_shards, tmp_path) -> None:
    """The weights' keys and shapes are the same with it, so the switch is no reason to refuse a resume."""
    from helpers import REPO, tiny_overrides

    from seg_dist import distributed
    from seg_dist.config import load_config
    from seg_dist.trainer import train

    run = tmp_path / "run"
    first = tiny_overrides(tiny_shards, run, "train.epochs=1", "train.batch_size=8")
    done = train(load_config(REPO / "configs" / "default.yaml", first), distributed.DistEnv(), torch.device("cpu"))
    resumed = train(load_config(REPO / "configs" / "default.yaml",
                                [*first, "train.epochs=2", "model.activation_checkpointing=true"]),
                    distributed.DistEnv(), torch.device("cpu"))
    assert resumed.global_step == 2 * done.global_step
