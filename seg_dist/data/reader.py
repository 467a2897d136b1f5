"""The one tar reader of seg_dist: a shard's samples in order, a shard's tar-header index, one sample's bytes
read where the index says they lie, and the decoding of a sample's bytes into arrays.

The index of a split is flat numpy arrays (`seg_dist.shard_index.SampleIndex`): the file the packer wrote,
memory-mapped, or for older shards the same arrays read from the tar headers.

Everything that reads shards goes through here (the loaders, and outside this package `read_shard` and
`iter_samples`), so webdataset's key convention, the skipped metadata members and the one-line errors for
damaged shards hold everywhere alike.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from ..shard_index import IndexBuilder, SampleIndex, check_index
from ..shards import (
    IMAGE_EXTS,
    MANIFEST,
    MASK_FIELD,
    META_FIELD,
    ShardError,
    conform_image,
    decode_image,
    decode_mask,
    image_spec,
    shard_counts,
    shard_urls,
)

__all__ = [
    "Entry",
    "SampleIndex",
    "SampleReader",
    "decode_sample",
    "index_entry",
    "index_shard",
    "index_split",
    "iter_samples",
    "read_shard",
    "split_index",
]

log = logging.getLogger(__name__)


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one shard in order, undecoded: dicts of each file's bytes by extension (e.g. "jpg",
    "mask.png", "json"), plus "__key__" (the sample's key) and "__url__" (`url`).

    A shard that cannot be opened or whose tar structure breaks raises `ShardError` naming it. The file is
    closed when the iterator is exhausted or closed, also when a reader stops mid-shard.
    """
    # webdataset's tarfile_samples leaves the file open when a reader stops mid-shard; closing it
    # here also covers abandoned train streams and validation readers that stop at their range end.
    try:
        stream = gopen(url, "rb")
    except OSError as e:
        raise ShardError.unreadable(url, e, opening=True) from e
    try:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError.unreadable(url, e) from e
    finally:
        stream.close()


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw sample (as `read_shard` gives it) -> dict of key, image (H x W x C of the dataset's channels and
    type: the sample's JSON names them, as the manifest's `image` does; 8-bit RGB for shards packed before
    that), mask (int64 H x W), meta (the sample's JSON, or {}) and url. A sample without an image and a
    mask, with bytes that do not decode, or with image and mask of different sizes raises `ShardError`."""
    key, url = raw["__key__"], raw.get("__url__", "?")
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None or MASK_FIELD not in raw:
        fields = sorted(k for k in raw if not k.startswith("__"))
        raise ShardError(f"{url}: sample {key!r} needs an image ({'/'.join(IMAGE_EXTS)}) and {MASK_FIELD}; "
                         f"has {fields}")
    try:
        meta = json.loads(raw[META_FIELD]) if META_FIELD in raw else {}
        spec = image_spec(meta)
        image = conform_image(decode_image(raw[ext], keep_alpha=spec.alpha), spec)
        mask = decode_mask(raw[MASK_FIELD])
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... for damaged bytes
        raise ShardError(f"{url}: sample {key!r} does not decode ({type(e).__name__}: {e}); {ShardError.HINT}") from e
    if image.shape[:2] != mask.shape:
        raise ShardError(f"{url}: sample {key!r}: image {image.shape[:2]} and mask {mask.shape} differ in size")
    return {"key": key, "image": image, "mask": mask, "meta": meta, "url": url}


def iter_samples(urls: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Decoded samples of `urls` in shard order, no augmentation: dicts of key, image (uint8 H x W x 3),
    mask (int64 H x W), meta (dict) and url (see `decode_sample`)."""
    for url in urls:
        for raw in read_shard(url):
            yield decode_sample(raw)


# --- the index: where each sample's bytes lie ---------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """Where one sample's files lie in its shard: (field, offset, size) of each field's bytes. Made for one
    read from the split's `SampleIndex` (`index_entry`), never held for a whole split."""

    shard: int  # the shard's place in its split's list of urls
    key: str
    fields: tuple[tuple[str, int, int], ...]


def index_entry(index: SampleIndex, i: int) -> Entry:
    """Sample `i` of a split's index as an `Entry` for `SampleReader.read`."""
    return Entry(index.shard_of(i), index.key(i), index.fields(i))


_WDS_META = re.compile(r"__[^/]*__($|/)")


def _shard_headers(url: str) -> Iterator[tuple[str, list[tuple[str, int, int]]]]:
    """Key and (field, offset, size) of each sample of a shard in order, from the tar headers without the
    files' bytes, with webdataset's key convention (`base_plus_ext`)."""
    key: str | None = None
    fields: list[tuple[str, int, int]] = []
    try:
        with tarfile.open(url, "r:") as tar:
            for member in tar:
                # webdataset's tar_file_iterator skips these: not a file, or metadata named __*__
                if not member.isreg() or _WDS_META.match(member.name) or (
                        "/" not in member.name and member.name.startswith("__") and member.name.endswith("__")):
                    continue
                name, ext = base_plus_ext(member.name)
                if name is None:
                    continue
                if name != key:
                    if key is not None:
                        yield key, fields
                    key, fields = name, []
                fields.append((ext.lower(), member.offset_data, member.size))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError.unreadable(url, e) from e
    if key is not None:
        yield key, fields


def index_shard(url: str, count: int) -> list[tuple[str, tuple[tuple[str, int, int], ...]]]:
    """The samples of one shard in order: key and (field, offset, size) of each file, read from the tar
    headers without the files' bytes, with webdataset's key convention (`base_plus_ext`). A shard that does not
    hold the `count` samples its manifest lists raises `ShardError`."""
    samples = [(key, tuple(fields)) for key, fields in _shard_headers(url)]
    if len(samples) != count:
        raise ShardError(f"{url}: {len(samples)} samples, the manifest lists {count}; {ShardError.HINT}")
    return samples


def index_split(urls: list[str], counts: list[int]) -> SampleIndex:
    """Every sample of a split's shards (`counts` from its manifest), in shard order, read from the tar
    headers into the arrays of the index the packer writes."""
    builder = IndexBuilder()
    for url, count in zip(urls, counts, strict=True):
        n = 0
        for key, fields in _shard_headers(url):
            builder.add(key, fields)
            n += 1
        if n != count:
            raise ShardError(f"{url}: {n} samples, the manifest lists {count}; {ShardError.HINT}")
        builder.end_shard(os.path.getsize(url))
    return builder.build()


def split_index(root: str, manifest: dict[str, Any], split: str) -> SampleIndex:
    """`split`'s sample index: the file the packer wrote, checked against the manifest and the shards (a stale
    or damaged one raises `ShardError` naming it), else read from the shards' tar headers."""
    urls = shard_urls(root, manifest, split)  # a one-line error for an unknown split
    entry = manifest["splits"][split]
    if "index" in entry:
        return check_index(root, split, entry["index"], entry["shards"])
    start = time.perf_counter()
    index = index_split(urls, shard_counts(manifest, split))
    log.info("%s: split %r has no sample index (packed before seg_dist wrote one); read %d samples from the tar "
             "headers of %d shards in %.1f s; packing the split again writes the index, which loads at once",
             os.path.join(root, MANIFEST), split, len(index), index.num_shards, time.perf_counter() - start)
    return index


def _check_header(info: tarfile.TarInfo, url: str, key: str, field: str, offset: int, size: int) -> None:
    """The member whose bytes start at `offset` is the one the index names (its name where the header holds it
    whole: a 100-byte name field may hold a long name cut short)."""
    name_key, ext = base_plus_ext(info.name)
    whole = len(info.name.encode("utf-8", "surrogateescape")) < 100
    if info.size != size or (whole and (name_key != key or (ext or "").lower() != field)):
        raise ShardError(f"{url}: at offset {offset} lies {info.name!r} of {info.size} bytes, the index says {field} "
                         f"of {key!r}, {size} bytes (the shard was re-packed or replaced after its index was "
                         f"written); {ShardError.HINT}")


class SampleReader:
    """Raw samples (as `read_shard` gives them) by their `Entry` (`index_entry`), each field's bytes read at its
    offset together with the tar header just before them, which must be intact and name the field and size
    the index gives: a damaged header, or a shard re-packed or replaced after its index was written, is one
    `ShardError` naming the shard, not wrong bytes.

    A shard stays open for the next sample; open files stay with their process (a pickled reader, as a
    DataLoader worker gets it, starts with none) until `close`.
    """

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self._files: dict[int, IO[bytes]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_files": {}}

    def read(self, entry: Entry) -> dict[str, Any]:
        url = self.urls[entry.shard]
        f = self._files.get(entry.shard)
        block = tarfile.BLOCKSIZE
        try:
            if f is None:
                f = self._files[entry.shard] = open(url, "rb")  # noqa: SIM115 (kept open for the next sample)
            raw: dict[str, Any] = {"__key__": entry.key, "__url__": url}
            for field, offset, size in entry.fields:
                f.seek(offset - block)
                data = f.read(block + size)
                if len(data) != block + size:
                    raise EOFError(f"{field} of {entry.key!r} ends early")
                _check_header(tarfile.TarInfo.frombuf(data[:block], "utf-8", "surrogateescape"), url, entry.key,
                              field, offset, size)
                raw[field] = data[block:]
        except (OSError, EOFError, tarfile.HeaderError) as e:
            raise ShardError.unreadable(url, e) from e
        return raw

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
