"""The recipe's levers: a wall-clock budget, a weight average, GroupNorm, rectangular crops, square-root
class weights, BatchNorm over the global batch. (The comparison with the seed tutorial is the lab's:
lab/tests/test_bench_recipe.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import REPO, as_rank, free_port, spawn_train, tiny_overrides

from seg_dist import checkpoint
from seg_dist.config import ConfigError, DataConfig, ModelConfig, load_config
from seg_dist.data import build_transforms
from seg_dist.ema import WeightAverage
from seg_dist.losses import class_weights
from seg_dist.models import build_model


def test_budget_ends_the_run_on_every_rank_at_one_step_with_the_schedule_run_down(tiny_shards, tmp_path):
    run = tmp_path / "run"
    # 300 epochs would take minutes; 0.1 min of budget must end it, the learning rate having decayed to ~0.
    ranks = spawn_train(2, tiny_overrides(tiny_shards, run, "train.epochs=300", "train.budget_minutes=0.1",
                                          "train.val_every=5"), tmp_path)
    saved = checkpoint.load(run / "checkpoints" / "last.pt")
    assert ranks[0]["step"] == ranks[1]["step"] == saved["global_step"]
    assert 0 < saved["global_step"] < 300 * 8
    # The run ends at the first log step (or epoch end) after the budget is spent, never before it.
    assert 0.95 * 6.0 <= saved["train_seconds"] < 6.0 + 90
    assert saved["optimizer"]["param_groups"][0]["lr"] < 0.25 * 3e-3  # poly reached (near) the horizon


def test_weight_average_warms_up_and_resumes_exactly(tiny_shards, tmp_path):
    model = build_model(ModelConfig(width=4, depth=2), 3)
    avg = WeightAverage(model, 0.99)
    assert avg.rate() == pytest.approx(1 - 1 / 10)  # early steps count a lot: the random init fades fast
    avg.updates = 10_000
    assert avg.rate() == pytest.approx(0.01)

    straight, split = tmp_path / "straight", tmp_path / "split"
    # A constant rate, so that the 1-epoch first half follows the same schedule as the 2-epoch run.
    extra = ("train.ema_decay=0.9", "train.amp=off", "schedule.name=constant")
    spawn_train(1, tiny_overrides(tiny_shards, straight, "train.epochs=2", *extra), tmp_path)
    spawn_train(1, tiny_overrides(tiny_shards, split, "train.epochs=1", *extra), tmp_path)
    spawn_train(1, tiny_overrides(tiny_shards, split, "train.epochs=2", *extra), tmp_path)
    a = checkpoint.load(straight / "checkpoints" / "last.pt")
    b = checkpoint.load(split / "checkpoints" / "last.pt")
    assert a["ema"]["updates"] == b["ema"]["updates"] == a["global_step"]
    for key in a["model"]:
        torch.testing.assert_close(a["trained_model"][key], b["trained_model"][key])
        torch.testing.assert_close(a["model"][key], b["model"][key])  # the average survived the resume
    differs = [k for k in a["model"] if a["model"][k].is_floating_point()
               and not torch.equal(a["model"][k], a["trained_model"][k])]
    assert differs, "the checkpoint's model should be the average, not the trained weights"
    trained = checkpoint.load_model(straight / "checkpoints" / "last.pt", torch.device("cpu"))
    torch.testing.assert_close(trained.model.state_dict()["head.weight"], a["model"]["head.weight"])


def test_group_norm_output_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 24, 20)
    outputs = {}
    for norm in ("batch", "group"):
        model = build_model(ModelConfig(width=8, depth=2, norm=norm), 3).train()
        alone = model(images[:1])
        together = model(images)[:1]
        outputs[norm] = torch.allclose(alone, together, atol=1e-5)
    assert outputs == {"batch": False, "group": True}
    assert any(isinstance(m, torch.nn.GroupNorm) for m in build_model(ModelConfig(width=16, norm="group"), 3).modules())
    with pytest.raises(ConfigError, match=r"model\.norm"):
        load_config(REPO / "configs" / "default.yaml", ["model.norm=layer"])


def test_weight_average_of_a_group_norm_model_without_buffers():
    """GroupNorm leaves the U-Net with no buffers; the default EMA must still update (it crashed)."""
    model = build_model(ModelConfig(width=4, depth=2, norm="group"), 3)
    assert not list(model.buffers())
    avg = WeightAverage(model, 0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    avg.update(model)  # the first update weighs the new weights 0.9
    for mine, theirs in zip(avg.module.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(mine - theirs, torch.full_like(mine, -0.1))


def test_rectangular_crop_pads_with_the_ignore_label():
    cfg = DataConfig(image_size=(40, 24))
    cfg.augment.scale = (1.0, 1.0)
    image = np.full((30, 30, 3), 200, np.uint8)
    out = build_transforms(cfg, train=True, ignore_index=255)(image=image, mask=np.ones((30, 30), np.uint8))
    assert out["image"].shape == (40, 24, 3) and out["mask"].shape == (40, 24)
    assert (out["mask"] == 255).any() and set(np.unique(out["mask"])) <= {1, 255}


def test_square_root_inverse_weights_sit_between_none_and_inverse():
    hist = [900, 100, 25, 0]
    sqrt = class_weights(hist, "sqrt_inverse").numpy()
    inverse = class_weights(hist, "inverse").numpy()
    assert sqrt[3] == 0 and sqrt[:3].mean() == pytest.approx(1.0)
    assert sqrt[0] < sqrt[1] < sqrt[2]
    assert sqrt[2] / sqrt[0] == pytest.approx(6.0)  # sqrt(900 / 25)
    assert inverse[2] / inverse[0] > sqrt[2] / sqrt[0]


# Each case: the samples on rank 0 (the rest are rank 1's), the activations' dtype and memory format.
GLOBAL_BN_CASES = {"fp32": (2, torch.float32, False), "uneven": (3, torch.float32, False),
                   "bf16-channels-last": (2, torch.bfloat16, True)}


def _global_bn_rank(rank: int, world: int, port: int, out: str) -> None:
    from seg_dist import distributed
    from seg_dist.models.norms import GlobalBatchNorm2d

    as_rank(rank, world, port)
    with distributed.setup(device="cpu"):
        for name, (split, dtype, channels_last) in GLOBAL_BN_CASES.items():
            x, w_out, bn = _global_bn_case()
            norm = GlobalBatchNorm2d(3)
            norm.load_state_dict(bn.state_dict())
            mine = slice(0, split) if rank == 0 else slice(split, None)
            xr = x[mine].to(dtype)
            if channels_last:
                xr = xr.contiguous(memory_format=torch.channels_last)
            xr.requires_grad_(True)
            y = norm(xr)
            assert y.dtype == dtype
            (y.float() * w_out[mine]).sum().backward()
            torch.save({"y": y.detach().float(), "dx": xr.grad.float(), "dw": norm.weight.grad,
                        "db": norm.bias.grad, "running_var": norm.running_var}, f"{out}.{name}.{rank}")


def _global_bn_case() -> tuple[torch.Tensor, torch.Tensor, torch.nn.BatchNorm2d]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=g) * 3 + 1
    w_out = torch.randn(4, 3, 5, 6, generator=g)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return x, w_out, bn


@pytest.mark.parametrize(("dtype", "channels_last"), [(torch.float32, False), (torch.bfloat16, True)])
def test_grouped_batchnorm_of_8_in_fours_normalises_as_two_ranks_of_4(dtype, channels_last):
    from seg_dist.models.norms import convert_to_grouped_batchnorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 3, 5, 6, generator=g) * 3 + 1).to(dtype)
    w_out = torch.randn(8, 3, 5, 6, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _, _, bn = _global_bn_case()
    grouped = convert_to_grouped_batchnorm(torch.nn.Sequential(bn), 4)
    xg = x.clone().requires_grad_(True)
    y = grouped(xg)
    (y.float() * w_out).sum().backward()
    # Two "ranks", each its own BatchNorm over its 4 samples; DDP would sum (then average) their gradients.
    ranks = []
    for part in (slice(0, 4), slice(4, 8)):
        _, _, own = _global_bn_case()
        xr = x[part].clone().requires_grad_(True)
        yr = own(xr)
        (yr.float() * w_out[part]).sum().backward()
        ranks.append((yr, xr.grad, own))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.03, "rtol": 0.02}
    torch.testing.assert_close(y, torch.cat([r[0] for r in ranks]), **tol)
    torch.testing.assert_close(xg.grad, torch.cat([r[1] for r in ranks]), **tol)
    torch.testing.assert_close(grouped[0].weight.grad, ranks[0][2].weight.grad + ranks[1][2].weight.grad, **tol)
    # Running statistics: the first group's, as DDP keeps rank 0's; evaluation uses them, as a plain layer does.
    torch.testing.assert_close(grouped[0].running_var, ranks[0][2].running_var)
    assert int(grouped[0].num_batches_tracked) == 1
    grouped.eval()
    ranks[0][2].eval()
    torch.testing.assert_close(grouped(x), ranks[0][2](x))
    assert y.is_contiguous(memory_format=torch.channels_last) is channels_last


def test_bn_group_converts_the_models_batchnorm_only_where_it_splits_a_ranks_batch():
    from seg_dist.models.norms import GroupedBatchNorm2d
    from seg_dist.trainer import build_train_model

    for batch, group, wanted in ((8, "4", True), (4, "4", False), (8, "0", False), (8, "null", True),
                                 (4, "null", False)):
        cfg = load_config(None, ["model.width=4", "model.depth=2", f"train.batch_size={batch}",
                                 f"train.bn_group={group}"])
        model = build_train_model(cfg, 3, torch.device("cpu"))
        assert any(isinstance(m, GroupedBatchNorm2d) for m in model.modules()) is wanted, (batch, group)


@pytest.mark.parametrize(("overrides", "device", "wanted"), [
    ([], "cpu", 4),  # one CPU process of 8 normalises as two ranks of 4 do
    (["train.sync_bn=off"], "cpu", 0),  # each rank's own batch, as asked
    (["train.sync_bn=on"], "cpu", 0),  # global statistics: on one process, its whole batch
    ([], "cuda", 0),  # auto is global on GPUs: one GPU's batch is the global batch
    (["train.bn_group=2"], "cuda", 2),  # an explicit group wins everywhere
])
def test_unset_bn_group_groups_by_four_on_cpu_under_auto_only(overrides, device, wanted):
    from seg_dist.trainer import batchnorm_group

    assert batchnorm_group(load_config(None, overrides).train, torch.device(device)) == wanted


def test_global_batchnorm_on_two_cpu_ranks_equals_batchnorm_over_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "bn")
    mp.spawn(_global_bn_rank, args=(2, free_port(), out), nprocs=2)
    for name, (_, dtype, _) in GLOBAL_BN_CASES.items():
        ranks = [torch.load(f"{out}.{name}.{r}", weights_only=True) for r in range(2)]
        x, w_out, bn = _global_bn_case()
        # The reference sees the same (rounded) inputs, in fp32, over the whole batch at once.
        x = x.to(dtype).float().requires_grad_(True)
        y = bn(x)
        (y * w_out).sum().backward()
        tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.03, "rtol": 0.02}
        torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), **tol, msg=name)
        torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), x.grad, **tol, msg=name)
        # Parameter gradients are per rank (DDP then averages them): their sum is the whole batch's.
        torch.testing.assert_close(ranks[0]["dw"] + ranks[1]["dw"], bn.weight.grad, **tol, msg=name)
        torch.testing.assert_close(ranks[0]["db"] + ranks[1]["db"], bn.bias.grad, **tol, msg=name)
        for r in ranks:
            torch.testing.assert_close(r["running_var"], bn.running_var, atol=1e-5, rtol=1e-5, msg=name)
