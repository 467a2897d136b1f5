"""Atomic file writes: readers see the old file or the complete new one, never a torn one.

Every file seg_dist writes that someone may read while it is being written (manifests, shards,
checkpoints, PNGs, JSON reports) goes through here: a unique temporary sibling, fsync, rename,
then an fsync of the directory so the rename itself survives a crash.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["DiskFull", "copy", "fsync_dir", "temp_path", "temporaries", "write_bytes", "write_text", "writer"]

_TEMP = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp$")


def temp_path(path: str | Path) -> Path:
    """A unique hidden sibling of `path` (same directory, so os.replace is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def temporaries(folder: str | Path) -> list[Path]:
    """The temporary files `temp_path` names in `folder`: what writers killed mid-write left behind."""
    return sorted(p for p in Path(folder).glob(".*.tmp") if _TEMP.match(p.name))


def fsync_dir(path: str | Path) -> None:
    """Persist renames in `path`; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DiskFull(OSError):
    """No room for a file; the message says where and how much, and that the old file is intact."""

    def __init__(self, path: Path, written: int, needed: int | None = None) -> None:
        free = shutil.disk_usage(path.parent).free
        amount = f"needs {needed / 1e6:.1f} MB" if needed else f"ran out after {written / 1e6:.1f} MB"
        super().__init__(errno.ENOSPC, f"{path}: no space left on the device: {amount}, {free / 1e6:.1f} MB free "
                                       f"in {path.parent}; any earlier {path.name} is intact")

    def __str__(self) -> str:
        return self.strerror or super().__str__()


@contextlib.contextmanager
def writer(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces `path` when the block ends without an exception.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    # os.open with 0o666 honours the umask (mkstemp would leave the final file 0600).
    written = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            try:
                yield f
                f.flush()
                os.fsync(f.fileno())
            finally:
                written = f.tell()
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(path, written) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes | memoryview) -> None:
    """Atomic write of `data`; refused up front, leaving `path` as it was, when it cannot fit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if len(data) > shutil.disk_usage(path.parent).free:
        raise DiskFull(path, 0, needed=len(data))
    with writer(path) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    """UTF-8 text version of `write_bytes`."""
    write_bytes(path, text.encode("utf-8"))


def copy(src: str | Path, dst: str | Path) -> None:
    """`dst` becomes a whole copy of `src` (a hard link where the file system allows)."""
    src, dst = Path(src), Path(dst)
    tmp = temp_path(dst)
    try:
        try:
            os.link(src, tmp)  # files we replace by rename keep the linked content, so a link is a copy
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)
