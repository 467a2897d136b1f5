"""Deterministic tar shards and their sample index, written under temporary names and put in place only when
all are done."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any, BinaryIO

from seg_dist import atomic, shards
from seg_dist.shard_index import IndexBuilder, file_digest, index_name, split_member_name

__all__ = ["ShardWriter"]


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: same input -> byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Streams the samples of one split into `shards.shard_name(split, i)` files of `per_shard` samples.

    Shards go to hidden temporary siblings; `commit()` renames them into place. It is a separate step so
    that the caller can finish every split before replacing any old shard (a failed pack changes nothing).
    Beside the shards goes the split's sample index (`seg_dist.shard_index`), built from the offsets the
    writer itself gave each member, so training never reads the tar headers; `index` is its manifest entry.
    """

    def __init__(self, out: Path, split: str, per_shard: int) -> None:
        self.out, self.split, self.per_shard = out, split, per_shard
        self.entries: list[dict[str, Any]] = []  # manifest entries of the finished shards
        self.temps: list[tuple[Path, Path]] = []  # (temporary, final) paths
        self._file: BinaryIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._index = IndexBuilder()
        self.index: dict[str, Any] | None = None  # the index's manifest entry, once `close` wrote it

    def add(self, members: list[tuple[str, bytes]]) -> None:
        """Append one sample's tar members."""
        if self._tar is None:
            final = self.out / shards.shard_name(self.split, len(self.entries))
            tmp = atomic.temp_path(final)
            self.temps.append((tmp, final))
            # A streaming file, not atomic.writer: it stays open across add() calls and is renamed by commit().
            self._file = open(tmp, "xb")  # noqa: SIM115
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)  # noqa: SIM115
        key = split_member_name(members[0][0])[0]
        fields = []
        for name, data in members:
            own, field = split_member_name(name)
            if key is None or own != key or field is None:
                raise ValueError(f"tar member {name!r} is not a field of sample {key!r}")
            self._tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
            # The data ends the member, padded to whole 512-byte blocks: where it starts follows.
            fields.append((field.lower(), self._tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE,
                           len(data)))
        self._index.add(key, fields)
        self._count += 1
        if self._count == self.per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        tmp, final = self.temps[-1]
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        self.entries.append(
            {"name": final.name, "num_samples": self._count, "bytes": tmp.stat().st_size, "sha256": digest.hexdigest()}
        )
        self._index.end_shard(self.entries[-1]["bytes"])
        self._tar, self._file, self._count = None, None, 0

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard and write the index; returns the manifest entries of all shards, in order."""
        if self._tar is not None:
            self._finish_shard()
        if self.index is None:
            final = self.out / index_name(self.split)
            tmp = atomic.temp_path(final)
            self.temps.append((tmp, final))
            with open(tmp, "xb") as f:
                self._index.build().save(f)
                f.flush()
                os.fsync(f.fileno())
            size, sha = file_digest(tmp)
            self.index = {"name": final.name, "bytes": size, "sha256": sha}
        return self.entries

    def commit(self) -> None:
        """Rename the finished shards into place (replacing same-named old ones) and persist the renames."""
        for tmp, final in self.temps:
            os.replace(tmp, final)
        atomic.fsync_dir(self.out)

    def abort(self) -> None:
        """Remove what this writer wrote that has not been committed."""
        if self._file is not None:
            self._file.close()
        for tmp, _ in self.temps:
            tmp.unlink(missing_ok=True)
