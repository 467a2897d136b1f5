"""Activation checkpointing (`model.activation_checkpointing`): chosen blocks keep only their inputs during
the forward pass and run again in the backward pass, trading compute for the memory of large crops.

A block is switched on by giving it a subclass of its own class whose `forward` goes through
`torch.utils.checkpoint` (non-reentrant, which DDP and torch.compile accept) while training with gradients,
and is the plain forward otherwise (evaluation, inference). State-dict keys, parameters and the module tree
stay as they are, so checkpoints load either way and the switch is not part of the architecture. Export
turns it off (`disable`): TorchScript cannot script the checkpointed forward.

The recomputation would run BatchNorm's training forward a second time and move its running statistics
twice per step; the running buffers inside a block are saved before and restored after it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["blocks_of", "disable", "enable", "is_checkpointed"]

_SUBCLASSES: dict[type, type] = {}


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    plain = type(self)._plain_class.forward
    if not (self.training and torch.is_grad_enabled()):
        return plain(self, *args, **kwargs)
    if torch.compiler.is_compiling():  # the compiled backward recomputes without repeating buffer updates
        return checkpoint(plain, self, *args, use_reentrant=False, **kwargs)
    return checkpoint(plain, self, *args, use_reentrant=False,
                      context_fn=functools.partial(_contexts, self), **kwargs)


def _contexts(module: nn.Module) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _running_stats_kept(module)


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
             and m.training and m.track_running_stats and m.running_mean is not None]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
             for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in zip(norms, saved, strict=True):
                for own, kept in zip([b for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                                      if b is not None], buffers, strict=True):
                    own.copy_(kept)


def _subclass(cls: type) -> type:
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        sub = type(f"Checkpointed{cls.__name__}", (cls,),
                   {"forward": _checkpointed_forward, "_plain_class": cls, "__module__": __name__})
        _SUBCLASSES[cls] = sub
    return sub


def is_checkpointed(module: nn.Module) -> bool:
    return "_plain_class" in type(module).__dict__


def enable(blocks: Iterable[nn.Module]) -> int:
    """Checkpoint each of `blocks` (modules of the model, whole); returns how many were switched on."""
    count = 0
    for block in blocks:
        if not is_checkpointed(block):
            block.__class__ = _subclass(type(block))
            count += 1
    return count


def disable(model: nn.Module) -> int:
    """Every checkpointed block in `model` back to its plain class; returns how many there were."""
    count = 0
    for module in model.modules():
        if is_checkpointed(module):
            module.__class__ = type(module)._plain_class
            count += 1
    return count


def blocks_of(encoder: nn.Module, whole: bool = True) -> list[nn.Module]:
    """The blocks of an encoder worth checkpointing one by one: the elements of its outermost sequences of
    parameterised blocks (a ResNet's BasicBlocks in layer1..layer4, a ViT's or an EfficientNet's blocks, a
    ConvNeXt's stages), not of sequences that hold single layers (a stem's conv, norm, activation). A module
    without such sequences (a VGG: single layers in one Sequential) is one block itself with `whole`, else
    none."""
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                members = list(child)
                if members and all(_has_parameters(m) and not _is_layer(m) for m in members):
                    found.extend(members)
                    continue
            visit(child)

    visit(encoder)
    return found or ([encoder] if whole else [])


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_layer(module: nn.Module) -> bool:
    """A single layer (a convolution, a norm), not a block of them."""
    return not any(True for _ in module.children())
