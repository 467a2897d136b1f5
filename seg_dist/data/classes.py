"""The label space of a run: class count, ignore index and class names, from the manifest unless the config
overrides them, and checked against what the shards hold."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..config import DataConfig
from ..errors import UserError
from ..shards import MANIFEST

__all__ = ["ClassInfo", "resolve_classes"]


@dataclass(frozen=True)
class ClassInfo:
    num_classes: int
    ignore_index: int
    names: list[str]


def resolve_classes(data_cfg: DataConfig, manifest: dict[str, Any]) -> ClassInfo:
    """Class count, ignore index and names: the manifest's unless the config overrides them.

    An override must fit the shards: `data.num_classes` at least the manifest's (its shards hold labels up to
    num_classes - 1), a `data.ignore_index` other than the manifest's outside [0, num_classes) (inside, it
    would make a real class ignored), and `data.class_names` one name per class; otherwise a `UserError`.
    """
    where = os.path.join(data_cfg.root, MANIFEST)
    packed = int(manifest["num_classes"])
    num_classes = int(data_cfg.num_classes or packed)
    if num_classes < packed:
        raise UserError(f"data.num_classes={num_classes} is less than the {packed} classes of {where} (its "
                        f"shards hold labels up to {packed - 1}): set data.num_classes to at least {packed}, "
                        "or leave it unset")
    packed_ignore = int(manifest["ignore_index"])
    ignore_index = int(data_cfg.ignore_index if data_cfg.ignore_index is not None else packed_ignore)
    if ignore_index != packed_ignore and 0 <= ignore_index < num_classes:
        raise UserError(f"data.ignore_index={ignore_index} is class {ignore_index} of {num_classes} (the ignore "
                        f"index of {where} is {packed_ignore}): it would ignore that class's pixels; leave "
                        f"data.ignore_index unset, or use a value outside 0..{num_classes - 1}")
    if data_cfg.class_names and len(data_cfg.class_names) != num_classes:
        raise UserError(f"data.class_names has {len(data_cfg.class_names)} names for {num_classes} classes "
                        f"(data.num_classes, else {where}): give one name per class, or leave it unset")
    names = list(data_cfg.class_names or manifest.get("class_names") or [])
    if len(names) != num_classes:
        names = [f"class_{i}" for i in range(num_classes)]
    return ClassInfo(num_classes, ignore_index, names)
