import pytest
import torch

from seg_dist import precision

CPU = torch.device("cpu")


def test_modes_on_cpu():
    assert precision.resolve_amp("off", CPU) is None
    assert precision.resolve_amp("bf16", CPU) is torch.bfloat16
    assert precision.resolve_amp("fp16", CPU) is torch.float16
    # auto: bf16 only where the CPU has native bf16 (emulated bf16 is slower than fp32).
    expected = torch.bfloat16 if precision.cpu_supports_bf16() else None
    assert precision.resolve_amp("auto", CPU) is expected
    with pytest.raises(ValueError, match=r"train\.amp='half'"):
        precision.resolve_amp("half", CPU)


def test_the_start_line_says_why():
    assert precision.describe("off", CPU, None) == "fp32 (train.amp=off)"
    assert precision.describe("bf16", CPU, torch.bfloat16) == "bf16 (train.amp=bf16)"
    assert "no native bf16" in precision.describe("auto", CPU, None)
    assert precision.describe("auto", CPU, torch.bfloat16).startswith("bf16 (train.amp=auto: this CPU has")
    cuda = torch.device("cuda")
    assert "fp16 with loss scaling" in precision.describe("auto", cuda, torch.float16)


def test_scaler_only_for_fp16():
    assert precision.grad_scaler(CPU, torch.float16).is_enabled()
    assert not precision.grad_scaler(CPU, torch.bfloat16).is_enabled()
    assert not precision.grad_scaler(CPU, None).is_enabled()


def test_fp16_scaler_skips_an_overflowing_step_on_cpu():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = precision.grad_scaler(CPU, torch.float16)
    with precision.autocast(CPU, torch.float16):
        loss = (p * torch.tensor([float("inf"), 1.0])).sum()
    scaler.scale(loss).backward()
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(2))  # skipped
    assert scaler.get_scale() < scale  # and backed off


def _one_adamw_step(fused: bool, skip: float) -> tuple[torch.Tensor, dict]:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, fused=fused)
    (p * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    precision.optimizer_step(opt, precision.grad_scaler(CPU, None), torch.tensor(skip))
    return p.detach().clone(), opt.state[p]


@pytest.mark.parametrize("fused", [True, False])
def test_optimizer_step_skips_on_request_and_steps_otherwise(fused):
    skipped, state = _one_adamw_step(fused, 1.0)
    assert torch.equal(skipped, torch.ones(3))  # parameters untouched
    assert not state or torch.equal(state["exp_avg"], torch.zeros(3))  # and no moment moved
    taken, _ = _one_adamw_step(fused, 0.0)
    assert (taken < 1).all()


def test_optimizer_step_with_fp16_scaler_backs_off_on_overflow():
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    scaler = precision.grad_scaler(CPU, torch.float16)
    scaler.scale((p * torch.tensor([float("inf"), 1.0])).sum()).backward()
    scale = scaler.get_scale()
    scaler.unscale_(opt)
    precision.optimizer_step(opt, scaler, torch.tensor(1.0))
    assert torch.equal(p.detach(), torch.ones(2)) and scaler.get_scale() < scale
