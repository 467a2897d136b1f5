import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seg_dist.metrics import ConfusionMatrix

IGNORE = 255
N_CLASSES = 5


def test_hand_made_exact() -> None:
    # Class 2 occurs only in the prediction, class 3 only at an ignored pixel, 5 is out of range.
    target = torch.tensor([[[0, 0, 0, 1], [1, IGNORE, IGNORE, 1]], [[5, 5, 5, 5], [5, 5, 5, 5]]])
    pred = torch.tensor([[[0, 0, 1, 1], [2, 3, 0, 1]], [[0, 1, 2, 3], [0, 1, 2, 3]]])
    cm = ConfusionMatrix(num_classes=4, ignore_index=IGNORE)
    cm.update(pred, target)
    expected = torch.tensor([[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert cm.mat.dtype == torch.int64
    assert torch.equal(cm.mat, expected)

    res = cm.compute()
    iou = res["per_class_iou"]
    assert iou[:3] == pytest.approx([2 / 3, 1 / 2, 0.0]) and math.isnan(iou[3])
    assert res["miou"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    dice = res["per_class_dice"]
    assert dice[:3] == pytest.approx([4 / 5, 4 / 6, 0.0]) and math.isnan(dice[3])
    assert res["mean_dice"] == pytest.approx((4 / 5 + 4 / 6) / 3)
    assert res["pixel_accuracy"] == pytest.approx(4 / 6)
    assert math.isnan(res["loss"])

    cm.update_loss(torch.tensor(0.5), 10)
    cm.update_loss(1.0, torch.tensor(30))
    assert cm.compute()["loss"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)

    cm.reset()
    assert cm.mat.sum() == 0
    empty = cm.compute()
    assert math.isnan(empty["miou"]) and math.isnan(empty["pixel_accuracy"])


def test_reduce_is_noop_without_process_group() -> None:
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]))
    before = cm.mat.clone()
    cm.reduce_from_all_processes()
    assert torch.equal(cm.mat, before)


def make_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor, float, int]]:
    g = torch.Generator().manual_seed(1234)
    batches = []
    for i in range(n):
        target = torch.randint(0, N_CLASSES, (2, 16, 16), generator=g)
        target[torch.rand(2, 16, 16, generator=g) < 0.1] = IGNORE
        # Mostly right, so the matrix is far from uniform.
        noise = torch.randint(0, N_CLASSES, (2, 16, 16), generator=g)
        pred = torch.where(torch.rand(2, 16, 16, generator=g) < 0.7, target, noise).clamp_max(N_CLASSES - 1)
        batches.append((pred, target, 0.25 * (i + 1), int((target != IGNORE).sum())))
    return batches


def accumulate(cm: ConfusionMatrix, batches: list) -> None:
    for pred, target, loss, weight in batches:
        cm.update(pred, target)
        cm.update_loss(loss, weight)


def _worker(rank: int, world_size: int, tmp: str, split: list[list[int]]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world_size)
    try:
        batches = make_batches(sum(len(s) for s in split))
        cm = ConfusionMatrix(N_CLASSES, IGNORE)
        accumulate(cm, [batches[i] for i in split[rank]])
        cm.reduce_from_all_processes()
        try:
            cm.reduce_from_all_processes()
        except RuntimeError:
            double_reduce_raised = True
        else:
            double_reduce_raised = False
        torch.save(
            {"mat": cm.mat, "res": cm.compute(), "double": double_reduce_raised}, f"{tmp}/rank{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "split",
    [pytest.param([[0, 1], [2, 3]], id="halves"), pytest.param([[0, 1, 2], [3]], id="unequal_batches")],
)
def test_distributed_reduce_equals_single_process(tmp_path: Path, split: list[list[int]]) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path), split), nprocs=2, join=True)
    single = ConfusionMatrix(N_CLASSES, IGNORE)
    accumulate(single, make_batches(4))
    expected = single.compute()
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["mat"].dtype == torch.int64
        assert torch.equal(out["mat"], single.mat)
        assert out["res"] == expected  # exact, not approximately
        assert out["double"]
