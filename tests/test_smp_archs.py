"""Every smp architecture through `model.name=smp`: built by configuration, padded to the multiple it needs,
forward and backward at an odd size, a real 2-rank gloo DDP step, training through the trainer, export to
TorchScript and ONNX with the exporter's numeric check, and load-time checks with a did-you-mean.

Needs segmentation_models_pytorch: skipped in the project venv, run in the smp environment (README,
"Architectures and pretrained encoders"): `../smp-venv/bin/python -m pytest tests/test_smp*.py`. Tiny
encoders keep it fast: timm's `test_resnet` (0.1-7 M parameters per architecture) and `test_vit` for DPT.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env, save_tiny_checkpoint, spawn_train, tiny_overrides
from smp_env import SMP_MISSING, needs_smp

from seg_dist import checkpoint, distributed, exporting, pack
from seg_dist.config import ConfigError, ModelConfig, load_config
from seg_dist.errors import UserError
from seg_dist.models import build_model, checkpointing, encoder_of

if not SMP_MISSING:
    import segmentation_models_pytorch as smp

pytestmark = needs_smp

# smp 0.6.0's architectures and the side multiple each needs over a tiny encoder (stride 32; PSPNet and
# DeepLabV3 dilate to 8, DeepLabV3Plus to 16; PAN's pyramid attention needs 8 x 16; DPT an even token grid).
MULTIPLE = {"Unet": 32, "UnetPlusPlus": 32, "MAnet": 32, "Linknet": 32, "FPN": 32, "PSPNet": 8, "DeepLabV3": 8,
            "DeepLabV3Plus": 16, "PAN": 128, "UPerNet": 32, "Segformer": 32, "DPT": 32}
TINY = "tu-test_resnet"
GRID_POOLING = ("PSPNet", "UPerNet")  # pyramid pooling to 2x2, 3x3, 6x6 grids: TorchScript only


def _encoder(arch: str) -> str:
    return "tu-test_vit" if arch == "DPT" else TINY


def _cfg(arch: str, **kw) -> ModelConfig:
    return ModelConfig(name="smp", arch=arch, encoder=kw.pop("encoder", _encoder(arch)), **kw)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_table_lists_what_smp_offers():
    assert sorted(MULTIPLE) == sorted(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values())


@pytest.mark.parametrize("arch", list(MULTIPLE))
def test_forward_and_backward_at_an_odd_size(arch: str, one_thread) -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(arch), 3)
    assert model.stride == MULTIPLE[arch] and encoder_of(model) is model.smp.encoder
    assert all(k.startswith("smp.") for k in model.state_dict())
    x = torch.randn(2, 3, 67, 45)
    out = model(x)
    assert out.shape == (2, 3, 67, 45)
    out.square().mean().backward()
    first_conv = next(m for m in model.smp.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    head = [p for n, p in model.named_parameters() if n.startswith("smp.segmentation_head")]
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    # Every trainable parameter has a gradient, as DDP needs (DPT's unused ViT norm and head are not trained).
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # Evaluation: the pad is at the bottom/right and cropped away, the same as smp on the padded input.
    model.eval()
    s = model.stride
    with torch.no_grad():
        ph, pw = -67 % s, -45 % s
        padded = model.smp(torch.nn.functional.pad(x, [0, pw, 0, ph]))
        assert torch.equal(model(x), padded[..., :67, :45])


@pytest.mark.parametrize("arch", ["PAN", "DPT"])
def test_the_encoder_stride_alone_is_not_enough_where_the_decoder_needs_more(arch: str) -> None:
    """Why `_EXTRA_MULTIPLE` exists: at a multiple of the encoder's own stride smp fails inside."""
    model = build_model(_cfg(arch), 3).eval()
    stride = model.smp.encoder.output_stride
    side = 3 * stride
    assert side % model.stride  # not a multiple of what the wrapper pads to
    with pytest.raises(RuntimeError), torch.no_grad():
        model.smp(torch.randn(1, 3, side, side))
    with torch.no_grad():
        assert model(torch.randn(1, 3, side, side)).shape[-2:] == (side, side)


def test_pooled_decoders_refuse_one_sample_per_rank_in_one_line() -> None:
    model = build_model(_cfg("DeepLabV3Plus"), 3).train()
    with pytest.raises(UserError, match=r"model.arch=DeepLabV3Plus pools .* set train.batch_size to 2 or more"):
        model(torch.randn(1, 3, 40, 40))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 40)).shape == (1, 3, 40, 40)  # evaluation takes one image


# --- 2 real ranks --------------------------------------------------------------------------------------------


def _ddp_step_every_arch(denv, device, out: str) -> None:
    """One DDP step of every architecture (activation checkpointing on: DDP's hooks see recomputed blocks) on
    this rank's own batch; the weights each rank ends with."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    result = {}
    for arch in MULTIPLE:
        torch.manual_seed(0)  # the same initial weights on both ranks, as the trainer builds them
        model = build_model(_cfg(arch, activation_checkpointing=True), 3)
        ddp = DDP(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(100 + denv.rank)  # different data per rank
        x = torch.randn(2, 3, 37, 29, generator=gen)
        y = torch.randint(0, 3, (2, 37, 29), generator=gen)
        before = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        result[arch] = {"after": after, "moved": float((after - before).abs().max())}
    torch.save(result, f"{out}.{denv.rank}")


def test_two_gloo_ranks_step_every_architecture_alike(tmp_path: Path) -> None:
    out = str(tmp_path / "rank")
    distributed.spawn_local_group(2, _ddp_step_every_arch, (out,), device="cpu")
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for arch in MULTIPLE:
        assert ranks[0][arch]["moved"] > 0, arch
        # Each rank saw other data; DDP's all-reduced gradients left both with the same weights.
        assert torch.equal(ranks[0][arch]["after"], ranks[1][arch]["after"]), arch


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 px samples (32 train, 8 val): neither crops nor validation images are multiples of 32."""
    out = tmp_path_factory.mktemp("shards") / "synthetic40"
    pack.pack_synthetic(out, n=40, size=40, samples_per_shard=12, workers=1)
    return out


def test_fpn_trains_on_two_ranks_and_evaluates(odd_shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = tiny_overrides(odd_shards, run, "model.name=smp", "model.arch=FPN", f"model.encoder={TINY}",
                               "data.image_size=40", "train.epochs=2", "train.amp=off", "logging.tensorboard=false",
                               "train.batch_size=2", "model.activation_checkpointing=true")
    ranks = spawn_train(2, overrides, tmp_path)
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
    assert ranks[0]["history"][-1]["train_loss"] < ranks[0]["history"][0]["train_loss"]
    best = run / checkpoint.CHECKPOINT_DIR / checkpoint.BEST
    saved = torch.load(best, weights_only=True)
    assert saved["config"]["model"]["arch"] == "FPN" and saved["config"]["model"]["name"] == "smp"
    proc = subprocess.run([sys.executable, "-m", "seg_dist.evaluate", "--checkpoint", str(best)],
                          capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["samples"] == 8 and 0 <= report["miou"] <= 1


# --- export ------------------------------------------------------------------------------------------------

CLASSES = ["a", "b", "c"]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


# One architecture of each family: U-Net-like, feature pyramids, pyramid pooling, atrous, transformer decoders.
@pytest.mark.parametrize("arch", ["Linknet", "PAN", "PSPNet", "DeepLabV3Plus", "Segformer", "UPerNet"])
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning", "ignore:`torch.jit:FutureWarning")
def test_export_torchscript_and_onnx_pass_the_numeric_check(arch: str, tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "best.pt", _cfg(arch, activation_checkpointing=True), CLASSES, MEAN, STD,
                                global_step=3)
    for fmt, suffix in (("torchscript", ".pt"), ("onnx", ".onnx")):
        out = tmp_path / f"model{suffix}"
        if fmt == "onnx" and arch in GRID_POOLING:
            with pytest.raises(UserError, match=rf"model.arch={arch} pools to fixed grids \(2x2, 3x3, 6x6\), which "
                                                r"ONNX cannot follow at dynamic sizes; use --format torchscript"):
                exporting.export(ckpt, out, fmt)
            assert not out.exists()
            continue
        result = exporting.export(ckpt, out, fmt)
        meta = json.loads(exporting.metadata_path(out).read_text())
        assert result.check.skipped is None and result.check.ok, result.check.summary()
        assert meta["check"]["max_abs_diff"] <= meta["check"]["tolerance"]
        assert meta["input"]["min_size"] == MULTIPLE[arch]
        assert meta["model"] == {"name": "smp", "arch": arch, "in_channels": 3, "encoder": TINY}


def test_a_graph_that_fails_at_another_size_is_one_line_and_nothing_is_written(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The check runs the file at two other sizes: PSPNet's ONNX graph, exported anyway, fails there."""
    from seg_dist.errors import RunFailed

    monkeypatch.setattr(exporting, "_smp_cannot", lambda segmenter, fmt: None)
    ckpt = save_tiny_checkpoint(tmp_path / "best.pt", _cfg("PSPNet"), CLASSES, MEAN, STD, global_step=3)
    out = tmp_path / "m.onnx"
    with pytest.raises(RunFailed, match=r"does not match the eager one: check .*: the exported file failed to run: "
                                        r"at \dx3x\d+x\d+: InvalidArgument"):
        exporting.export(ckpt, out, "onnx")
    assert not out.exists() and not exporting.metadata_path(out).exists()


@pytest.mark.parametrize("arch", ["UnetPlusPlus", "DPT"])
def test_unscriptable_architectures_export_to_onnx_and_refuse_torchscript_in_one_line(arch: str,
                                                                                       tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "best.pt", _cfg(arch), CLASSES, MEAN, STD, global_step=3)
    with pytest.raises(UserError, match=r"--format torchscript: smp marks .* as not scriptable; try --format onnx"):
        exporting.export(ckpt, tmp_path / "m.pt", "torchscript")
    assert not (tmp_path / "m.pt").exists()
    result = exporting.export(ckpt, tmp_path / "m.onnx", "onnx")
    assert result.check.ok and result.check.skipped is None, result.check.summary()


# --- activation checkpointing on smp encoders -----------------------------------------------------------------


@pytest.mark.parametrize(("arch", "encoder", "encoder_blocks"),
                         [(arch, _encoder(arch), {"DPT": 6, "PSPNet": 2}.get(arch, 4)) for arch in MULTIPLE]
                         + [("Unet", "resnet18", 8)])
def test_activation_checkpointing_gives_the_same_step(arch: str, encoder: str, encoder_blocks: int) -> None:
    """The same gradients and BatchNorm statistics with and without, and the same state-dict keys: the
    encoder's blocks (a ResNet's 8 BasicBlocks, test_resnet's 4 stages, 2 of them at PSPNet's depth 3, a ViT's
    6 blocks) and the decoder's."""
    models = []
    for on in (False, True):
        torch.manual_seed(0)
        models.append(build_model(_cfg(arch, encoder=encoder, activation_checkpointing=on), 3).train())
    plain, ckpt = models
    in_encoder = [m for m in ckpt.smp.encoder.modules() if checkpointing.is_checkpointed(m)]
    in_decoder = [m for m in ckpt.smp.decoder.modules() if checkpointing.is_checkpointed(m)]
    assert len(in_encoder) == encoder_blocks and (in_decoder or arch == "UnetPlusPlus"), (in_encoder, in_decoder)
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for model in models:
        torch.manual_seed(2)  # the same dropout and drop-path draws (the recomputation replays them)
        model(x).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        if a.grad is None:  # not trained (DPT's unused ViT head)
            assert b.grad is None and not a.requires_grad, name
            continue
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        assert torch.equal(a, b), f"{name}: the recomputation moved the running statistics again"


# --- checked when the config is loaded ------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "message"), [
    ("model.arch=Unnet", r"model.arch='Unnet' is not an smp architecture \(did you mean Unet"),
    ("model.arch=deeplabv3+", r"model.arch='deeplabv3\+' is not an smp architecture \(did you mean DeepLabV3"),
    ("model.encoder=resnet81", r"model.encoder='resnet81' is not an smp encoder \(did you mean resnet18"),
    ("model.encoder=tu-resnt18", r"model.encoder='tu-resnt18' is not a timm model \(did you mean tu-resnet18"),
    ("model.encoder_weights=imagenett", r"model.encoder_weights='imagenett': not a weights name of encoder "
                                        r"resnet34 \(did you mean imagenet\?\) nor a local state-dict file"),
    ("model.norm=group", r"model.norm=group: smp models keep their encoder's BatchNorm"),
])
def test_config_load_names_the_key_with_a_did_you_mean(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.name=smp", override])


def test_config_load_checks_the_pairs_too() -> None:
    with pytest.raises(ConfigError, match=r"model.arch=FPN: model.name=smp_unet is smp's Unet; use model.name=smp"):
        load_config(None, ["model.name=smp_unet", "model.arch=FPN"])
    with pytest.raises(ConfigError, match=r"model.encoder=resnet18: model.arch=DPT takes a timm vision transformer"):
        load_config(None, ["model.name=smp", "model.arch=DPT", "model.encoder=resnet18"])
    # Case does not matter; a weights path is not checked at load (a checkpoint's config loads anywhere).
    cfg = load_config(None, ["model.name=smp", "model.arch=deeplabv3plus", "model.encoder_weights=/no/such.pth"])
    assert cfg.model.arch == "deeplabv3plus"


def test_a_bad_arch_through_the_command_is_one_line(tiny_shards: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "seg_dist.train", "--config", "configs/default.yaml", "model.name=smp",
           "model.arch=Segformr", f"run.dir={tmp_path / 'run'}", f"data.root={tiny_shards}"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=child_env(), timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 2 and "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if "model.arch" in line]
    assert len(lines) == 1 and "did you mean Segformer?" in lines[0]
