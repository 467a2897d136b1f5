"""BatchNorm over the global batch on any device: what `train.sync_bn` uses where torch's SyncBatchNorm
does not run (CPU processes over gloo).

Per-rank BatchNorm normalises with the statistics of each rank's share of the batch, so the same global
batch trains differently on 1, 2 or 8 ranks. Here each layer sums (x, x^2, count) over the ranks: the
forward uses the global batch's mean and variance, and the backward sums the two per-channel reductions
of the gradient over the ranks, which is what torch's SyncBatchNorm computes on CUDA.

Every pass over the activations is one of torch's native BatchNorm kernels (bf16 in, fp32 inside), so a
layer costs about 1.5x a plain BatchNorm2d. Written as a composite of tensor ops with a differentiable
all-reduce, the same maths made 2 CPU processes 1.6x slower per step than 1 (the fp32 copies and
reductions over (N, H, W) dominate).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from seg_dist import distributed


class _GlobalBatchNormFn(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with the global batch's mean and var (computed by the caller);
    the backward adds what flows through those statistics, summed over the ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                var: torch.Tensor, eps: float, total: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.total = eps, total
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, var = ctx.saved_tensors
        # Eval-mode backward: dx without the statistics' terms, and the local sums of dy and dy * x_hat.
        dx, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            dy, x, weight, mean, var, None, None, False, ctx.eps, [True, True, True])
        sums = distributed.sum_small(torch.cat([grad_bias, grad_weight]))
        channels = grad_bias.numel()
        mean_dy, mean_dy_xhat = sums[:channels] / ctx.total, sums[channels:] / ctx.total
        invstd = torch.rsqrt(var + ctx.eps)
        # The statistics' terms, -w * invstd * (mean_dy + x_hat * mean_dy_xhat), are a per-channel affine
        # map of x: a BatchNorm kernel with mean 0 and variance 1 applies it in one pass.
        slope = -weight * invstd * invstd * mean_dy_xhat
        offset = weight * invstd * (invstd * mean_dy_xhat * mean - mean_dy)
        unit = torch.ones_like(var)
        dx = dx + torch.batch_norm(x, slope, offset, torch.zeros_like(mean), unit - ctx.eps, False, 0.0,
                                   ctx.eps, False)
        return dx, grad_weight, grad_bias, None, None, None, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics are the global batch's over every rank (same parameters,
    buffers and state-dict keys, so its checkpoints load into a plain BatchNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or distributed.world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        count = x.numel() / channels
        with torch.no_grad():
            # fp32 (biased) statistics even for bf16 x: the kernel follows the dtype of the running buffers
            # it is handed, here throwaway ones.
            scratch = torch.zeros(channels, device=x.device)
            local_mean, local_var = torch.batch_norm_update_stats(x, scratch, torch.ones_like(scratch), 0.0)
            stats = distributed.sum_small(torch.cat([
                local_mean * count, (local_var + local_mean * local_mean) * count, local_mean.new_tensor([count])]))
            total = float(stats[-1])
            mean = stats[:channels] / total
            var = (stats[channels:2 * channels] / total - mean * mean).clamp_min(0.0)
            if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var * (total / max(total - 1.0, 1.0)), m)
        weight = self.weight if self.weight is not None else torch.ones_like(mean)
        bias = self.bias if self.bias is not None else torch.zeros_like(mean)
        return _GlobalBatchNormFn.apply(x, weight, bias, mean, var, self.eps, total)


class GroupedBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics are those of each group of `group` consecutive samples of
    the batch (the last group may be smaller), as ghost batch norm: 1 rank x 8 in groups of 4 normalises as
    2 ranks x 4 with per-rank statistics do. The running statistics follow the first group's, as DDP keeps
    rank 0's. Same parameters, buffers and state-dict keys as a plain BatchNorm2d."""

    def __init__(self, *args: Any, group: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.group:
            return super().forward(x)
        first, *rest = x.split(self.group)
        return torch.cat([super().forward(first), *(
            torch.batch_norm(part, self.weight, self.bias, None, None, True, 0.0, self.eps, False) for part in rest)])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}"


def _convert(module: nn.Module, make: Callable[[nn.BatchNorm2d], nn.BatchNorm2d]) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        new = make(module)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, _convert(child, make))
    return module


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d in `module` replaced by a GlobalBatchNorm2d holding the same tensors."""
    return _convert(module, lambda m: GlobalBatchNorm2d(m.num_features, m.eps, m.momentum, m.affine,
                                                        m.track_running_stats))


def convert_to_grouped_batchnorm(module: nn.Module, group: int) -> nn.Module:
    """Every BatchNorm2d in `module` replaced by a GroupedBatchNorm2d of `group` holding the same tensors."""
    return _convert(module, lambda m: GroupedBatchNorm2d(m.num_features, m.eps, m.momentum, m.affine,
                                                         m.track_running_stats, group=group))
