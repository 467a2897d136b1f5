"""An exponential moving average of a model's weights, the copy that is validated and exported.

Short runs end while the learning rate is still shaking the weights; their average over the last few
hundred steps generalises better than the last step's. The decay warms up as (1 + t) / (10 + t), so the
average does not drag the random initialisation along for the first thousand steps of a short run.
Buffers (BatchNorm statistics) are copied, not averaged: they already are running averages.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightAverage:
    """`update(model)` after each optimiser step; `module` is the averaged model (eval it, save it)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def rate(self) -> float:
        """The weight of the newest step in the average at this update."""
        return 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        # Multi-tensor ops: a handful of kernels per step on a GPU instead of two per tensor.
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], self.rate())
        buffers = list(self.module.buffers())
        if buffers:  # GroupNorm models have none, and the foreach ops refuse empty lists
            torch._foreach_copy_(buffers, list(model.buffers()))
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
