"""BatchNorm over the global batch on any device: what `train.sync_bn` uses where torch's SyncBatchNorm
does not run (CPU processes over gloo).

Per-rank BatchNorm normalises with the statistics of each rank's share of the batch, so the same global
batch trains differently on 1, 2 or 8 ranks. Here each layer sums (x, x^2, count) over the ranks with a
differentiable all-reduce: the forward uses the global batch's mean and variance, and the backward sums
the statistics' gradients over the ranks, which is what torch's SyncBatchNorm computes on CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

from seg_dist import distributed


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics are the global batch's over every rank (same parameters,
    buffers and state-dict keys, so its checkpoints load into a plain BatchNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or distributed.world_size() == 1:
            return super().forward(x)
        channels = x.shape[1]
        xf = x.float()  # the sums of squares need fp32 under bf16/fp16 autocast
        count = xf.new_tensor([x.numel() / channels])
        stats = distributed.all_reduce_with_grad(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels:2 * channels] / total - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (total / (total - 1).clamp_min(1.0))
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(unbiased.detach(), m)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            shift = self.bias - mean * scale * self.weight
            scale = scale * self.weight
        else:
            shift = -mean * scale
        return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


def convert_to_global_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d in `module` replaced by a GlobalBatchNorm2d holding the same tensors."""
    if type(module) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_to_global_batchnorm(child))
    return module
