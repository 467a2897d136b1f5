import pytest
import torch

from seg_dist.config import ScheduleConfig
from seg_dist.schedule import build_scheduler, is_per_iteration, lr_factor


def _lrs(cfg: ScheduleConfig, total: int, lr: float = 1.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_poly_with_warmup():
    lrs = _lrs(ScheduleConfig(name="poly", warmup_iters=4, power=1.0), total=14)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # Linear decay after warmup (power 1): 10 steps from 1 towards 0.
    assert lrs[4:] == pytest.approx([1 - i / 10 for i in range(10)])


def test_cosine_reaches_min_lr():
    cfg = ScheduleConfig(name="cosine", min_lr=0.1)
    lrs = _lrs(cfg, total=10)
    assert lrs[0] == pytest.approx(1.0) and lrs[5] == pytest.approx(0.55)
    assert lr_factor(10, 10, cfg, 1.0) == pytest.approx(0.1)
    assert min(lrs) >= 0.1 - 1e-9


def test_plateau_is_stepped_by_validation_only():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, ScheduleConfig(name="plateau", plateau_patience=0, plateau_factor=0.5), 100)
    assert not is_per_iteration(sched)
    sched.step(1.0)
    sched.step(2.0)  # worse: with patience 0 the rate halves
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    # Its state round-trips, so a resumed run keeps the plateau counters.
    fresh = build_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                            ScheduleConfig(name="plateau"), 100)
    fresh.load_state_dict(sched.state_dict())
    assert fresh.best == 1.0
