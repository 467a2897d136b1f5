"""Mixed precision with `torch.amp`: which dtype to autocast to, and whether fp16 needs a scaler."""

from __future__ import annotations

import contextlib

import torch


def cpu_supports_bf16() -> bool:
    # Without native bf16 instructions autocast emulates it and runs slower than fp32.
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check()) if check is not None else False


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """`auto`: bf16 where supported, else fp16 on CUDA and off on CPU. None means full fp32."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    if mode != "auto":
        raise ValueError(f"train.amp={mode!r}: expected off, bf16, fp16 or auto")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Only fp16 can underflow gradients; bf16 has fp32's range. A disabled scaler is a no-op."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def describe(mode: str, device: torch.device, dtype: torch.dtype | None) -> str:
    """The precision and why: a CPU run in fp32 is several times slower than one in bf16 on a CPU that has it."""
    if mode != "auto":
        return f"{name(dtype)} (train.amp={mode})"
    if device.type == "cpu":
        why = "this CPU has native bf16" if dtype is not None else \
            "this CPU has no native bf16, which autocast would emulate more slowly than fp32"
    else:
        why = "bf16 supported" if dtype == torch.bfloat16 else "no bf16 on this GPU: fp16 with loss scaling"
    return f"{name(dtype)} (train.amp=auto: {why})"


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, skip: torch.Tensor) -> None:
    """Step, unless `skip` (a 0-dim float tensor on the device, 1.0 = skip) says the gradients are not finite.

    No host sync: the fused optimisers read a `found_inf` tensor on the device and leave the
    parameters and moments untouched when it is 1. With fp16 the GradScaler passes its own
    `found_inf` and backs its scale off. An unfused optimiser has to ask the host.
    """
    if scaler.is_enabled():
        scaler.step(optimizer)
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf, optimizer.grad_scale = skip, None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif not bool(skip):
        optimizer.step()
    scaler.update()
