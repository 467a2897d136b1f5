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
    cfg = ScheduleConfig(name="cosine", min_lr=0.1, warmup_iters=0)
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


# --- fine-tuning: the encoder's own param group ---------------------------------------------------------


def _unet_groups(mult: float = 0.1, separate: bool = True) -> tuple[torch.nn.Module, list[dict]]:
    from seg_dist.models import UNet, encoder_of
    from seg_dist.schedule import param_groups

    model = UNet(3, 4, width=4, depth=2)
    return model, param_groups(model, 1.0, encoder_of(model), mult, separate=separate)


def test_unet_encoder_group_is_the_contracting_path():
    model, groups = _unet_groups()
    assert [g["name"] for g in groups] == ["main", "encoder"]
    assert [g["lr"] for g in groups] == pytest.approx([1.0, 0.1])
    contracting = {id(p) for m in (model.inc, model.downs) for p in m.parameters()}
    assert {id(p) for p in groups[1]["params"]} == contracting
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.parameters()} - contracting
    # Without a fine-tuning knob it stays one group, as checkpoints written before the knobs expect.
    _, single = _unet_groups(1.0, separate=False)
    assert len(single) == 1 and len(single[0]["params"]) == len(list(model.parameters()))


def test_encoder_group_is_frozen_for_its_steps_then_follows_the_main_rate():
    _, groups = _unet_groups(mult=0.1)
    opt = torch.optim.AdamW(groups, lr=1.0)
    cfg = ScheduleConfig(name="poly", power=1.0, warmup_iters=2, min_lr=0.05)
    sched = build_scheduler(opt, cfg, total_steps=10, freeze_steps=4)
    main, enc = [], []
    for _ in range(10):
        main.append(opt.param_groups[0]["lr"])
        enc.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert main == pytest.approx([lr_factor(s, 10, cfg, 1.0) for s in range(10)])
    assert enc[:4] == [0.0] * 4
    assert enc[4:] == pytest.approx([0.1 * m for m in main[4:]])  # min_lr scales with the multiplier too
    # A pure function of the step: a fresh optimiser and schedule resumed from the state land on the same rates.
    _, groups2 = _unet_groups(mult=0.1)
    opt2 = torch.optim.AdamW(groups2, lr=1.0)
    sched2 = build_scheduler(opt2, cfg, total_steps=10, freeze_steps=4)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    sched.step()
    sched2.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_at_lr_zero_neither_steps_nor_decays(fused):
    """AdamW's decay is decoupled (param *= 1 - lr * weight_decay): a group at lr 0 stays bit-identical."""
    frozen, live = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(8))
    opt = torch.optim.AdamW([{"params": [frozen], "lr": 0.0}, {"params": [live], "lr": 1e-2}], weight_decay=0.5,
                            fused=fused)
    for _ in range(3):
        (frozen * torch.arange(8.0)).sum().add((live * torch.arange(8.0)).sum()).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(frozen.detach(), torch.ones(8))
    assert not torch.equal(live.detach(), torch.ones(8))


def test_plateau_scales_groups_together_and_refuses_a_freeze():
    from seg_dist.config import ConfigError

    _, groups = _unet_groups(mult=0.1)
    opt = torch.optim.AdamW(groups, lr=1.0)
    sched = build_scheduler(opt, ScheduleConfig(name="plateau", plateau_patience=0, min_lr=0.2), 100)
    for loss in (1.0, 2.0, 3.0):  # two worse validations with patience 0: two halvings
        sched.step(loss)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.25, 0.025])
    sched.step(4.0)  # min_lr is per group, scaled like the rate: the ratio survives the floor
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.02])
    with pytest.raises(ConfigError, match="freeze_encoder_epochs needs a per-iteration schedule"):
        build_scheduler(torch.optim.AdamW(_unet_groups()[1], lr=1.0), ScheduleConfig(name="plateau"), 100,
                        freeze_steps=5)
