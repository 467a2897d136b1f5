import torch

from seg_dist import precision

CPU = torch.device("cpu")


def test_modes_on_cpu():
    assert precision.resolve_amp("off", CPU) is None
    assert precision.resolve_amp("bf16", CPU) is torch.bfloat16
    assert precision.resolve_amp("fp16", CPU) is torch.float16
    assert precision.resolve_amp("auto", CPU) in (torch.bfloat16, None)


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
