"""What a command may write: never one of its own inputs, not even with --overwrite, and an existing file
only with --overwrite. Every command (pack, synth, preview, evaluate, predict, export) names its inputs
and outputs and calls `check` before it reads a batch or writes a byte; the writes themselves go through
`seg_dist.atomic`, so a failure leaves no half-written file.

Paths are compared resolved (symlinks followed, `..` and relative parts gone): `ck.pt`, `./runs/../ck.pt`
and a symlink to it are one file. A refusal is one `UserError` line that names both sides and says what
each file is: `--json ck.pt is the checkpoint being evaluated (--checkpoint ck.pt); ...`.

Also here: `json_text`, strict JSON for every report a command writes or prints (NaN and infinities
become null: IoU of a class absent from both prediction and ground truth is undefined, not a number).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .shards import MANIFEST

__all__ = ["Input", "InputFolder", "Output", "OutputFolder", "check", "finite", "json_text", "resolved", "shard_inputs"]

NEVER_INPUT = "--overwrite never replaces an input"


@dataclass(frozen=True)
class Input:
    """A file the command reads. `what` is what it is to the user ("the checkpoint being evaluated"),
    `arg` how they named it ("--checkpoint ck.pt")."""

    path: Path
    what: str
    arg: str


@dataclass(frozen=True)
class InputFolder:
    """A folder the command reads; its existing files for which `holds(path)` is true are inputs too."""

    path: Path
    what: str
    arg: str
    holds: Callable[[Path], bool] = lambda _: True


@dataclass(frozen=True)
class Output:
    """A file the command writes (replaces with --overwrite). `what`: "the JSON report", "the mask of a.jpg"."""

    path: Path
    what: str
    arg: str


@dataclass(frozen=True)
class OutputFolder:
    """A folder the command writes into (creating it where missing) whose files it names only while it runs
    (pack's shards). `writes(name)`: whether a file of that name directly in the folder may be written or
    removed. Whether existing ones may be replaced is the command's own rule (pack adds splits to a folder)."""

    path: Path
    what: str
    arg: str
    writes: Callable[[str], bool] = lambda _: False


def resolved(path: str | Path) -> Path:
    """The absolute path with symlinks followed and `..` gone, for a path that need not exist yet."""
    return Path(os.path.realpath(os.path.abspath(path)))


def check(inputs: Iterable[Input | InputFolder], outputs: Iterable[Output | OutputFolder], *,
          overwrite: bool) -> None:
    """Refuse (UserError) an output that is an input, lies in an input folder over one of its files, is
    a folder where a file goes (or the reverse), or is also another output; then, unless `overwrite`, an
    output file that exists already."""
    inputs, outputs = list(inputs), list(outputs)
    files = {resolved(i.path): i for i in inputs if isinstance(i, Input)}
    folders = [(resolved(f.path), f) for f in inputs if isinstance(f, InputFolder)]
    seen: dict[Path, Output] = {}
    for out in outputs:
        real = resolved(out.path)
        if isinstance(out, OutputFolder):
            _check_folder(out, real, files, folders)
            continue
        if real in files:
            raise UserError(f"{_name(out)} is {_name(files[real])}; choose another {_flag(out)} ({NEVER_INPUT})")
        for root, folder in folders:
            if real == root:
                raise UserError(f"{_name(out)} is {folder.what} ({folder.arg}); choose another {_flag(out)}")
            if real.is_file() and real.is_relative_to(root) and folder.holds(real):
                raise UserError(f"{_name(out)} would write over {out.path}, a file of {folder.what} "
                                f"({folder.arg}); choose another {_flag(out)} ({NEVER_INPUT})")
        if real.is_dir():
            raise UserError(f"{_name(out)} is a folder; give a file name")
        if real in seen:
            raise UserError(f"{_name(out)} is also {_name(seen[real])}; give them different names")
        seen[real] = out
    if overwrite:
        return
    existing = [out for out in seen.values() if out.path.exists()]
    if existing:
        first, more = existing[0], len(existing) - 1
        others = f" (and {more} more of the {len(seen)} outputs)" if more else ""
        raise UserError(f"{first.path}: exists ({first.what}, {first.arg}){others}; pass --overwrite to replace "
                        f"{'them' if more else 'it'}, or choose another {_flag(first)}")


def _check_folder(out: OutputFolder, real: Path, files: dict[Path, Input],
                  folders: Sequence[tuple[Path, InputFolder]]) -> None:
    if real in files:
        raise UserError(f"{out.arg} is {_name(files[real])}; choose another {_flag(out)} ({NEVER_INPUT})")
    if real.exists() and not real.is_dir():
        raise UserError(f"{out.arg} is a file, not a folder ({out.what}); choose another {_flag(out)}")
    if not real.is_dir():
        return
    # Files the command will write or remove in the folder, against the inputs that live there.
    for path in sorted(real.iterdir()):
        if not out.writes(path.name):
            continue
        if path in files:
            raise UserError(f"{out.arg} would write over {_name(files[path])}; choose another {_flag(out)} "
                            f"({NEVER_INPUT})")
        for root, folder in folders:
            if path.is_relative_to(root) and path.is_file() and folder.holds(path):
                raise UserError(f"{out.arg} would write over {path}, a file of {folder.what} ({folder.arg}); "
                                f"choose another {_flag(out)} ({NEVER_INPUT})")


def _name(item: Input | Output) -> str:
    """`--json ck.pt` for a path the argument names itself, `--out o: o/a.png (the mask of a.jpg)` for a file
    derived from it; inputs as `the checkpoint being evaluated (--checkpoint ck.pt)`."""
    if isinstance(item, Input):
        return f"{item.what} ({item.arg})"
    if item.arg.endswith(f" {item.path}"):
        return item.arg
    return f"{item.arg}: {item.path} ({item.what})"


def _flag(item: Output | OutputFolder) -> str:
    return item.arg.split(" ", 1)[0]


def shard_inputs(root: str | Path, arg: str, what: str) -> list[Input | InputFolder]:
    """A shard folder as inputs: its manifest and its shard files (`what`: "the data being evaluated")."""
    root = Path(root)
    return [Input(root / MANIFEST, f"the manifest of {what}", arg),
            InputFolder(root, what, arg, holds=lambda p: p.name == MANIFEST or p.suffix == ".tar")]


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (numpy ones too) replaced by None, containers walked."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):  # numpy float64 is a float subclass
        return None
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy scalars and arrays
        return finite(value.tolist())
    return value


def json_text(value: Any, indent: int | None = None) -> str:
    """Strict JSON (RFC 8259): NaN and infinities become null; anything left that is not finite raises."""
    return json.dumps(finite(value), indent=indent, allow_nan=False)
