"""Pack image/mask folders into deterministic WebDataset tar shards plus manifest.json.

The library: build a `PackOptions` and call `pack(options)`, or `pack_synthetic(out, n=...)` for the
procedural dataset; both raise `PackError` (a `seg_dist.errors.UserError`) for anything the user can fix.
The command is `python -m seg_dist.pack` / `seg-dist pack` (seg_dist/pack/__main__.py). The shard and
manifest format is described in shards/README.md and seg_dist/shards.py.

Modules: `pairing` (finding and pairing files), `labels` (label maps, RGB palettes, mask decoding),
`samples` (per-sample checking and encoding in worker processes), `writer` (tar shards), `pipeline`.
"""

from __future__ import annotations

from seg_dist.pack.errors import PackError, Problem
from seg_dist.pack.labels import LabelSpec, load_label_map, load_palette
from seg_dist.pack.pairing import IMAGE_SUFFIXES, MASK_SUFFIXES, Pair, pair_files, sanitize_key
from seg_dist.pack.pipeline import (
    DEFAULT_SAMPLES_PER_SHARD,
    SPLITS,
    SYNTH_SAMPLES_PER_SHARD,
    PackOptions,
    PackResult,
    pack,
    pack_synthetic,
)

__all__ = [
    "DEFAULT_SAMPLES_PER_SHARD",
    "IMAGE_SUFFIXES",
    "MASK_SUFFIXES",
    "SPLITS",
    "SYNTH_SAMPLES_PER_SHARD",
    "LabelSpec",
    "PackError",
    "PackOptions",
    "PackResult",
    "Pair",
    "Problem",
    "load_label_map",
    "load_palette",
    "pack",
    "pack_synthetic",
    "pair_files",
    "sanitize_key",
]

