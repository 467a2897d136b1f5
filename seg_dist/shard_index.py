"""A split's sample index: where each sample's fields lie in its shards, as flat numpy arrays.

The packer writes it beside the shards (`index_name(split)`, recorded in the manifest with its size and
sha256); the training loader memory-maps it, so loader workers (forked or spawned) and the ranks of a node
share one copy in the page cache, with no Python object per sample. Shards packed before it existed are
indexed from their tar headers into the same arrays (`seg_dist.data.reader.index_split`).

The file is an ordinary `.npy` of bytes (`np.load(path, mmap_mode="r")` opens it): an 8-byte little-endian
length, a JSON table ({"format", "count", "layouts", "arrays": {name: [offset, dtype, shape]}}), then each
array at a 64-byte aligned offset:

| array | shape | what |
|---|---|---|
| `key_blob`, `key_start` | bytes, n + 1 | sample i's key is key_blob[key_start[i]:key_start[i + 1]] (UTF-8) |
| `layout` | n | sample i's field names are layouts[layout[i]] (e.g. ["jpg", "json", "mask.png"]) |
| `field_start` | n + 1 | sample i's fields are rows field_start[i]:field_start[i + 1] of `offset` and `size` |
| `offset`, `size` | fields | where each field's bytes start in its shard, and how many |
| `shard_start` | shards + 1 | sample i lies in shard s where shard_start[s] <= i < shard_start[s + 1] |
| `shard_bytes` | shards | each shard's size, as indexed |

Torch-free: the packer writes it without importing the training stack.
"""

from __future__ import annotations

import hashlib
import json
import re
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .shards import MANIFEST, ShardError

__all__ = [
    "INDEX_FORMAT",
    "IndexBuilder",
    "SampleIndex",
    "check_index",
    "file_digest",
    "index_name",
    "split_member_name",
]

INDEX_FORMAT = "seg_dist-index/1"
_ALIGN = 64
_ARRAYS = ("key_blob", "key_start", "layout", "field_start", "offset", "size", "shard_start", "shard_bytes")

Field = tuple[str, int, int]  # (field name, offset of its bytes in the shard, size)


def index_name(split: str) -> str:
    """The file name of `split`'s index inside the shard folder (never a shard name)."""
    return f"{split}.index.npy"


_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def split_member_name(name: str) -> tuple[str | None, str | None]:
    """A tar member's (key, field), as webdataset's `base_plus_ext` splits it: the key ends at the first dot
    of the last path part. (None, None) for a name without one."""
    match = _NAME.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


def _smallest_uint(values: np.ndarray) -> np.ndarray:
    top = int(values.max()) if values.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.int64)


class SampleIndex:
    """Where each sample of a split lies: its shard, key and (field, offset, size) of each of its fields.

    Only flat arrays (see the module's docstring) and the few distinct field layouts are held, so the index
    of N samples takes O(N) bytes (`nbytes`) and forked workers share it untouched. One opened from a file
    is a memory map, and pickles as its path (a spawned worker maps the same file).
    """

    def __init__(self, arrays: dict[str, np.ndarray], layouts: Sequence[Sequence[str]],
                 path: str | None = None) -> None:
        self.arrays = arrays
        self.layouts = tuple(tuple(fields) for fields in layouts)
        self.path = path
        for name in _ARRAYS:
            setattr(self, name, arrays[name])

    def __len__(self) -> int:
        return len(self.key_start) - 1

    def __reduce__(self) -> tuple[Any, ...]:
        if self.path is not None:
            return (SampleIndex.load, (self.path,))
        return (SampleIndex, (self.arrays, self.layouts))

    @property
    def num_shards(self) -> int:
        return len(self.shard_bytes)

    @property
    def shard_counts(self) -> list[int]:
        return [int(v) for v in np.diff(self.shard_start)]

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays: what one process holds (or maps) for the whole split."""
        return sum(a.nbytes for a in self.arrays.values())

    def shard_of(self, i: int) -> int:
        return int(np.searchsorted(self.shard_start, i, side="right")) - 1

    def key(self, i: int) -> str:
        return bytes(self.key_blob[self.key_start[i]:self.key_start[i + 1]]).decode("utf-8")

    def fields(self, i: int) -> tuple[Field, ...]:
        lo = int(self.field_start[i])
        names = self.layouts[self.layout[i]]
        return tuple((name, int(self.offset[lo + j]), int(self.size[lo + j])) for j, name in enumerate(names))

    # --- the file -----------------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The file's content as `save` writes it (deterministic: the same index gives the same bytes)."""
        table: dict[str, Any] = {"format": INDEX_FORMAT, "count": len(self), "layouts": self.layouts, "arrays": {}}
        offsets, at = {}, 0
        for name in _ARRAYS:  # offsets relative to the first array; the header's length is fixed below
            a = self.arrays[name]
            offsets[name] = at
            at += -(-a.nbytes // _ALIGN) * _ALIGN
        head = 0
        while True:  # the table holds its own length's consequences: iterate to a fixed point
            table["arrays"] = {n: [head + offsets[n], self.arrays[n].dtype.str, list(self.arrays[n].shape)]
                               for n in _ARRAYS}
            text = json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
            start = -(-(8 + len(text)) // _ALIGN) * _ALIGN
            if start == head:
                break
            head = start
        out = bytearray(head + at)
        out[:8] = len(text).to_bytes(8, "little")
        out[8:8 + len(text)] = text
        for name in _ARRAYS:
            a = np.ascontiguousarray(self.arrays[name])
            o = head + offsets[name]
            out[o:o + a.nbytes] = a.tobytes()
        return bytes(out)

    def save(self, file: str | Path | BinaryIO) -> None:
        """Write the index as a `.npy` of bytes (not atomically: the packer writes it under a temporary name)."""
        np.save(file, np.frombuffer(self.to_bytes(), np.uint8), allow_pickle=False)

    @classmethod
    def load(cls, path: str | Path) -> SampleIndex:
        """Memory-map an index file; a file that is not one raises `ShardError` naming it."""
        try:
            raw = np.load(path, mmap_mode="r", allow_pickle=False)
            if raw.dtype != np.uint8 or raw.ndim != 1:
                raise ValueError(f"a {raw.dtype} array of shape {raw.shape}, not bytes")
            length = int.from_bytes(bytes(raw[:8]), "little")
            table = json.loads(bytes(raw[8:8 + length]))
            if table.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {table.get('format')!r} is not {INDEX_FORMAT!r}")
            arrays = {}
            for name in _ARRAYS:
                offset, dtype, shape = table["arrays"][name]
                dt = np.dtype(dtype)
                n = int(np.prod(shape)) * dt.itemsize
                if offset + n > raw.size:
                    raise ValueError(f"array {name} ends past the file's end")
                arrays[name] = np.asarray(raw[offset:offset + n]).view(dt).reshape(shape)
            index = cls(arrays, table["layouts"], str(path))
            if len(index) != table["count"]:
                raise ValueError(f"{len(index)} samples, its table says {table['count']}")
        except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
            raise ShardError(f"{path}: not a readable sample index ({type(e).__name__}: {e}); "
                             f"{ShardError.HINT}") from e
        return index

    def same_as(self, other: SampleIndex) -> bool:
        """Both hold the same samples: keys, field names, offsets, sizes and shard layout (dtypes may differ)."""
        if len(self) != len(other) or self.num_shards != other.num_shards:
            return False
        names = [self.layouts[v] for v in self.layout]
        other_names = [other.layouts[v] for v in other.layout]
        return names == other_names and all(
            np.array_equal(self.arrays[n], other.arrays[n]) for n in _ARRAYS if n != "layout")


class IndexBuilder:
    """Collects samples shard by shard into a `SampleIndex`; compact typed arrays meanwhile (a million
    samples do not become a million Python objects here either)."""

    def __init__(self) -> None:
        self._keys = bytearray()
        self._key_start = array("q", [0])
        self._layout = array("q")
        self._layouts: dict[tuple[str, ...], int] = {}
        self._field_start = array("q", [0])
        self._offset = array("q")
        self._size = array("q")
        self._shard_start = array("q", [0])
        self._shard_bytes = array("q")

    def add(self, key: str, fields: Sequence[Field]) -> None:
        """One sample of the current shard: its key and (field, offset, size) of each field, in tar order."""
        self._keys += key.encode("utf-8")
        self._key_start.append(len(self._keys))
        names = tuple(name for name, _, _ in fields)
        self._layout.append(self._layouts.setdefault(names, len(self._layouts)))
        for _, offset, size in fields:
            self._offset.append(offset)
            self._size.append(size)
        self._field_start.append(len(self._offset))

    def end_shard(self, nbytes: int) -> None:
        """The current shard is complete and `nbytes` long."""
        self._shard_start.append(len(self._key_start) - 1)
        self._shard_bytes.append(nbytes)

    def build(self) -> SampleIndex:
        def ints(values: array) -> np.ndarray:
            return np.frombuffer(values, np.int64) if len(values) else np.zeros(0, np.int64)

        arrays = {
            "key_blob": np.frombuffer(bytes(self._keys), np.uint8),
            "key_start": _smallest_uint(ints(self._key_start)),
            "layout": _smallest_uint(ints(self._layout)),
            "field_start": _smallest_uint(ints(self._field_start)),
            "offset": ints(self._offset).copy(),  # shards may pass 4 GB
            "size": _smallest_uint(ints(self._size)),
            "shard_start": ints(self._shard_start).copy(),
            "shard_bytes": ints(self._shard_bytes).copy(),
        }
        return SampleIndex(arrays, list(self._layouts))


def file_digest(path: str | Path) -> tuple[int, str]:
    """(bytes, sha256) of a file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def check_index(root: str | Path, split: str, entry: dict[str, Any], shards: list[dict[str, Any]]) -> SampleIndex:
    """Open `split`'s index as the manifest records it (`entry`: name, bytes, sha256) and check that it is
    the one packed with these shards; anything else raises `ShardError` naming the file and what differs."""
    path = Path(root).resolve() / index_name(split)
    if entry.get("name") != index_name(split):
        raise ShardError(f"{path.parent / MANIFEST}: split {split!r} names index {entry.get('name')!r}, "
                         f"expected {index_name(split)!r}; re-pack the dataset")
    if not path.is_file():
        raise ShardError(f"{path}: missing (the manifest lists it); {ShardError.HINT}")
    size, sha = file_digest(path)
    if size != entry.get("bytes") or sha != entry.get("sha256"):
        what = f"{size} bytes, the manifest lists {entry.get('bytes')}" if size != entry.get("bytes") else \
            "sha256 differs from the manifest's"
        raise ShardError(f"{path}: {what} (stale or damaged index); {ShardError.HINT}")
    index = SampleIndex.load(path)
    counts = [int(s["num_samples"]) for s in shards]
    if index.shard_counts != counts:
        raise ShardError(f"{path}: indexes {index.num_shards} shards of {sum(index.shard_counts)} samples, the "
                         f"manifest lists {len(counts)} of {sum(counts)} (stale index); {ShardError.HINT}")
    for shard, nbytes in zip(shards, index.shard_bytes, strict=True):
        listed = shard.get("bytes", int(nbytes))
        on_disk = (path.parent / shard["name"]).stat().st_size if (path.parent / shard["name"]).is_file() else None
        if on_disk is None:
            raise ShardError(f"{path.parent / shard['name']}: cannot open (missing); {ShardError.HINT}")
        if not int(nbytes) == listed == on_disk:
            raise ShardError(f"{path}: indexes {shard['name']} at {int(nbytes)} bytes, the manifest lists {listed} "
                             f"and the file has {on_disk} (re-packed or replaced shard); {ShardError.HINT}")
    return index
