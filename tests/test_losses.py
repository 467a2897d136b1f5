import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seg_dist.errors import UserError
from seg_dist.losses import SegLoss, class_weights, dice_loss

IGNORE = 255


def hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    # 4 classes, class 3 absent from the target, one ignored pixel.
    logits = torch.tensor(
        [[[[2.0, -1.0], [0.5, 0.0]],
          [[0.1, 0.3], [3.0, 1.5]],
          [[-0.5, 2.5], [1.0, 0.2]],
          [[0.0, 0.4], [-2.0, 0.9]]]]
    )  # fmt: skip
    target = torch.tensor([[[0, 2], [IGNORE, 1]]])
    return logits, target


def reference(
    logits: torch.Tensor, target: torch.Tensor, weights: list[float] | None = None
) -> tuple[float, float]:
    """CE and Dice by explicit loops over pixels and classes."""
    lg = logits.double().numpy()
    tg = target.numpy()
    n, c, h, w = lg.shape
    ce_num = ce_den = 0.0
    inter, psum, gsum = np.zeros(c), np.zeros(c), np.zeros(c)
    for b in range(n):
        for y in range(h):
            for x in range(w):
                t = int(tg[b, y, x])
                if t == IGNORE:
                    continue
                z = lg[b, :, y, x]
                p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
                wt = 1.0 if weights is None else weights[t]
                ce_num += -wt * math.log(p[t])
                ce_den += wt
                for k in range(c):
                    inter[k] += p[k] * (k == t)
                    psum[k] += p[k]
                    gsum[k] += k == t
    dice_terms = [1 - (2 * inter[k] + 1) / (psum[k] + gsum[k] + 1) for k in range(c) if gsum[k] > 0]
    return ce_num / ce_den, sum(dice_terms) / len(dice_terms)


def test_matches_hand_computation() -> None:
    logits, target = hand_case()
    ce_ref, dice_ref = reference(logits, target)
    loss_fn = SegLoss(num_classes=4, ce_weight=0.7, dice_weight=0.3)
    total, parts = loss_fn(logits, target)
    assert parts["ce"].item() == pytest.approx(ce_ref, rel=1e-6)
    assert parts["dice"].item() == pytest.approx(dice_ref, rel=1e-6)
    assert total.item() == pytest.approx(0.7 * ce_ref + 0.3 * dice_ref, rel=1e-6)
    assert not parts["ce"].requires_grad and not parts["dice"].requires_grad
    assert dice_loss(logits, target, IGNORE).item() == pytest.approx(dice_ref, rel=1e-6)


def test_weighted_ce_matches_hand_computation_and_torch() -> None:
    logits, target = hand_case()
    weights = [2.0, 0.5, 1.5, 1.0]
    ce_ref, _ = reference(logits, target, weights)
    w = torch.tensor(weights)
    _, parts = SegLoss(4, class_weights=w)(logits, target)
    assert parts["ce"].item() == pytest.approx(ce_ref, rel=1e-6)
    torch.manual_seed(0)
    lg, tg = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    tg[0, :3] = IGNORE
    expected = F.cross_entropy(lg, tg, weight=w, ignore_index=IGNORE)
    torch.testing.assert_close(SegLoss(4, class_weights=w)(lg, tg)[1]["ce"], expected)


def test_label_smoothing_spreads_the_target_and_keeps_ignored_pixels_out() -> None:
    torch.manual_seed(0)
    lg, tg = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    tg[0, :3] = IGNORE
    s = 0.2
    logp = lg.log_softmax(1).permute(0, 2, 3, 1)[tg != IGNORE]  # (valid pixels, C)
    hard = -logp.gather(1, tg[tg != IGNORE].unsqueeze(1)).squeeze(1)
    expected = ((1 - s) * hard + s * -logp.mean(1)).mean()
    _, parts = SegLoss(4, label_smoothing=s)(lg, tg)
    torch.testing.assert_close(parts["ce"], expected)
    torch.testing.assert_close(parts["dice"], SegLoss(4)(lg, tg)[1]["dice"])  # Dice keeps the hard target


def test_ignored_pixels_change_nothing() -> None:
    logits, target = hand_case()
    loss_fn = SegLoss(4)
    grads, totals = [], []
    for value in (0.0, 50.0):
        lg = logits.clone()
        lg[0, :, 1, 0] = value  # the ignored pixel
        lg.requires_grad_(True)
        total, _ = loss_fn(lg, target)
        total.backward()
        grads.append(lg.grad)
        totals.append(total.item())
    assert totals[0] == totals[1]
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert torch.all(grads[0][0, :, 1, 0] == 0)


def test_uint8_target_accepted() -> None:
    logits, target = hand_case()
    ref, _ = SegLoss(4)(logits, target)
    out, _ = SegLoss(4)(logits, target.to(torch.uint8))
    assert out.item() == ref.item()


def test_absent_class_and_all_ignored_are_finite() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 6, 6, requires_grad=True)
    target = torch.zeros(2, 6, 6, dtype=torch.long)  # only class 0 present
    total, parts = SegLoss(5)(logits, target)
    assert torch.isfinite(total) and torch.isfinite(parts["dice"])
    total.backward()
    assert torch.isfinite(logits.grad).all()

    logits.grad = None
    all_ignored = torch.full((2, 6, 6), IGNORE, dtype=torch.long)
    weights = torch.tensor([1.0, 2.0, 0.0, 1.0, 1.0])
    for loss_fn in (SegLoss(5), SegLoss(5, class_weights=weights)):
        total, parts = loss_fn(logits, all_ignored)
        assert total.item() == 0.0 and parts["ce"].item() == 0.0 and parts["dice"].item() == 0.0
        # Scaled like GradScaler does: the backward must stay finite (and the graph connected).
        (total * 65536.0).backward()
        assert logits.grad is not None and torch.all(logits.grad == 0)
        logits.grad = None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_close_to_fp32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 32, 32)
    target = torch.randint(0, 4, (2, 32, 32))
    target[:, :4] = IGNORE
    loss_fn = SegLoss(4, class_weights=torch.tensor([0.5, 1.0, 1.5, 1.0]))
    ref, ref_parts = loss_fn(conv(x), target)
    with torch.autocast("cpu", dtype=dtype):
        logits = conv(x)
        assert logits.dtype == dtype
        out, parts = loss_fn(logits, target)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert out.item() == pytest.approx(ref.item(), rel=2e-2)
    assert parts["dice"].item() == pytest.approx(ref_parts["dice"].item(), rel=2e-2)


def test_class_weights_modes() -> None:
    hist = [10, 30, 0, 60]
    assert class_weights(hist, "none") is None
    inv = class_weights(np.array(hist), "inverse")
    # 1/freq = [10, 10/3, -, 10/6], mean over present 5 -> [2, 2/3, 0, 1/3]
    torch.testing.assert_close(inv, torch.tensor([2.0, 2 / 3, 0.0, 1 / 3]))
    assert inv.dtype == torch.float32
    med = class_weights(hist, "median")
    # median freq 0.3 over present classes -> [3, 1, 0, 0.5]
    torch.testing.assert_close(med, torch.tensor([3.0, 1.0, 0.0, 0.5]))
    with pytest.raises(ValueError, match="unknown class-weight mode"):
        class_weights(hist, "sqrt")
    with pytest.raises(UserError, match=r"loss\.class_weights=median: .* has no labelled pixels"):
        class_weights([0, 0], "median")
    with pytest.raises(ValueError, match="class_weights has 3 entries"):
        SegLoss(4, class_weights=torch.ones(3))


def _global_batch_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 images for 2 ranks x 4 whose halves differ: class 4 only in the first half, the second half
    mostly ignored. Means over each half then differ from the mean over all 8."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, 6, 7, generator=g)
    target = torch.randint(0, 4, (8, 6, 7), generator=g)
    target[0, :2] = 4
    target[4:, :, 1:] = IGNORE
    return logits, target, torch.tensor([0.5, 1.0, 2.0, 1.0, 3.0])


def _global_batch_rank(rank: int, port: int, out: str) -> None:
    from helpers import as_rank

    from seg_dist import distributed

    as_rank(rank, 2, port)
    logits, target, weights = _global_batch_case()
    with distributed.setup():
        results = []
        for w in (None, weights):
            local = logits[rank * 4:(rank + 1) * 4].clone().requires_grad_()
            loss, parts = SegLoss(5, IGNORE, 0.7, 0.3, w, global_batch=True)(local, target[rank * 4:(rank + 1) * 4])
            loss.backward()
            results.append((loss.detach(), parts, local.grad / 2))  # DDP's all-reduce averages over 2 ranks
        torch.save(results, f"{out}.{rank}")


def test_loss_over_ranks_is_the_global_batch_loss(tmp_path):
    """2 real gloo ranks x 4 images: the same loss and per-image gradients as 1 process on all 8."""
    import torch.multiprocessing as mp
    from helpers import free_port

    out = str(tmp_path / "r")
    mp.spawn(_global_batch_rank, args=(free_port(), out), nprocs=2)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    logits, target, weights = _global_batch_case()
    for case, w in enumerate((None, weights)):
        whole = logits.clone().requires_grad_()
        loss_fn = SegLoss(5, IGNORE, 0.7, 0.3, w)
        expected, parts = loss_fn(whole, target)
        expected.backward()
        halves = sum(loss_fn(logits[r * 4:(r + 1) * 4], target[r * 4:(r + 1) * 4])[0] for r in (0, 1)) / 2
        assert abs(halves.item() - expected.item()) > 2e-3  # the case tells a mean of ranks' losses apart
        for r, results in enumerate(ranks):
            loss, rank_parts, grad = results[case]
            torch.testing.assert_close(loss, expected.detach())
            torch.testing.assert_close(rank_parts["dice"], parts["dice"])
            torch.testing.assert_close(grad, whole.grad[r * 4:(r + 1) * 4])
