"""`bench index`: the training loader's sample index at a million samples.

Writes a synthetic train split of `samples` tiny samples (one 16 x 16 PNG image, its mask and JSON, the same
bytes under every key: the index does not care what the bytes are) through the packer's own writer
(`seg_dist.pack.writer.ShardWriter`, which also writes the index), and a manifest as `seg_dist.pack` writes
it. Then, each in a fresh process so that its memory is its own:

- **index load**: `data.split_index` (the manifest's check of size and sha256, the check against the shards,
  the memory map), and the memory it adds to the process, untouched and with every page of it touched;
- **first batch** at each worker count: `data.train_loader` from nothing to its first batch (the index load,
  the epoch's permutation, the workers' start, one batch decoded), then RSS, PSS and USS (private pages) of
  the process and each loader worker from /proc/PID/smaps_rollup while the loader is alive;
- **old shards**: the same index read from the tar headers (a manifest without its index entry), as shards
  packed before the index existed are read.

Targets (printed, never asserted): index load under 5 s, the index under 64 MB per process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from seg_dist import atomic, shards
from seg_dist.pack import DEFAULT_SAMPLES_PER_SHARD
from seg_dist.pack.writer import ShardWriter

from . import measure
from .measure import Progress, quiet

TARGETS = {"index_load_s": ("<=", 5.0), "index_mib": ("<=", 64.0)}
REPO = Path(__file__).resolve().parents[1]
SIZE, CLASSES = 16, 4  # the smallest crop the default U-Net (depth 4) takes


@dataclass
class IndexSettings:
    samples: int = 1_000_000
    per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    workers: tuple[int, ...] = field(default_factory=lambda: (1, max(2, measure.cores())))
    batch: int = 64
    repeats: int = 3  # index loads timed
    headers: bool = True  # also time the index read from the tar headers (old shards)
    data: str | None = None  # an existing folder written by this bench (skips writing)


# --- the data set ------------------------------------------------------------------------------


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def write_split(root: str | Path, n: int, per_shard: int, progress: Progress = quiet) -> dict[str, Any]:
    """`n` tiny samples as a train split in `root` through the packer's writer; returns the manifest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = _png(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    labels = (np.arange(SIZE)[:, None] * CLASSES // SIZE).repeat(SIZE, 1).astype(np.uint8)
    mask = _png(labels)
    meta = json.dumps({"source": "synthetic", "size_hw": [SIZE, SIZE]}).encode()
    writer = ShardWriter(root, "train", per_shard)
    t0 = time.perf_counter()
    try:
        for i in range(n):
            key = f"sample_{i:08d}"
            writer.add([(f"{key}.png", image), (f"{key}.mask.png", mask), (f"{key}.json", meta)])
            if (i + 1) % 100_000 == 0:
                progress(f"  {i + 1:,} samples written ({time.perf_counter() - t0:.0f} s)")
        entries = writer.close()
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    manifest = {
        "format": shards.FORMAT, "packer_version": "lab.bench_index", "num_classes": CLASSES, "ignore_index": 255,
        "class_names": [f"class_{c}" for c in range(CLASSES)], "max_size": None,
        "splits": {"train": {
            "num_samples": n, "shards": entries,
            "class_histogram": [int(v) * n for v in np.bincount(labels.ravel(), minlength=CLASSES)],
            "ignored_pixels": 0,
            "image_size": {k: [SIZE, SIZE] for k in ("min_hw", "max_hw", "mean_hw", "original_mean_hw")},
            "rejects": [], "index": writer.index,
        }},
    }
    atomic.write_text(root / shards.MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


# --- one process's memory ------------------------------------------------------------------------------


def _mib(kb: dict[str, int]) -> dict[str, float]:
    return {"rss_mib": kb.get("Rss", 0) / 1024, "pss_mib": kb.get("Pss", 0) / 1024,
            "uss_mib": (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) / 1024}


def smaps(pid: int | str = "self") -> dict[str, Any]:
    """RSS, PSS and USS (private clean + dirty) of a process in MiB, from /proc/PID/smaps_rollup, and the same
    for its mappings of index files alone (`index`: what of the index this process holds, from /proc/PID/smaps)."""
    whole: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            whole[name] = int(rest.split()[0])
    index: dict[str, int] = {}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line: range perms offset ... path
            inside = head[-1].endswith(".index.npy")
        elif inside and line.rstrip().endswith("kB"):
            name = line.split(":")[0]
            index[name] = index.get(name, 0) + int(line.split()[1])
    return {**_mib(whole), "index": _mib(index)}


def children() -> list[int]:
    """Process ids of this process's children (its DataLoader workers while a loader runs)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        pids += [int(p) for p in (task / "children").read_text().split()]
    return sorted(set(pids))


def _probe(root: str, what: str, workers: int, batch: int, repeats: int) -> dict[str, Any]:
    """Runs in a fresh process (`python -m lab.bench_index --probe ...`)."""
    import logging

    from seg_dist import data  # late: the parent process does not need torch

    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    manifest = shards.load_manifest(root)
    before = smaps()
    if what == "headers":
        manifest["splits"]["train"].pop("index")  # as shards packed before the index existed
        t0 = time.perf_counter()
        index = data.split_index(root, manifest, "train")
        return {"seconds": time.perf_counter() - t0, "samples": len(index), "nbytes": index.nbytes,
                "memory": {"before": before, "loaded": smaps()}}
    if what == "index":
        seconds = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            index = data.split_index(root, manifest, "train")
            seconds.append(time.perf_counter() - t0)
        loaded = smaps()
        touched = sum(int(a.sum(dtype=np.int64)) & 1 for a in index.arrays.values())  # every page read
        return {"seconds": seconds, "samples": len(index), "shards": index.num_shards, "nbytes": index.nbytes,
                "arrays": {k: [str(a.dtype), a.nbytes] for k, a in index.arrays.items()},
                "memory": {"before": before, "loaded": loaded, "touched": smaps()}, "checksum": touched}
    cfg = measure.base_config(root, manifest, data={"image_size": SIZE, "workers": workers},
                              train={"batch_size": batch})
    t0 = time.perf_counter()
    it = iter(data.train_loader(cfg, manifest, root, 0, 1, 0))
    images, _ = next(it)
    first = time.perf_counter() - t0
    memory = {"main": smaps(), "workers": [smaps(pid) for pid in children()]}
    it.close()
    return {"seconds": first, "batch_samples": int(images.shape[0]), "workers": workers, "memory": memory}


def _run_probe(root: str, what: str, s: IndexSettings, progress: Progress, workers: int = 0) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "lab.bench_index", "--probe", what, "--root", root, "--workers", str(workers),
           "--batch", str(s.batch), "--repeats", str(s.repeats)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in out.stderr.splitlines():
        if line.startswith("  "):
            progress(line.strip())
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    return result


def measure_index(s: IndexSettings, progress: Progress = quiet) -> dict[str, Any]:
    """Every figure of `bench index` with its settings and environment."""
    import torch  # only for `measure.environment`

    env = measure.environment(torch.device("cpu"))
    with tempfile.TemporaryDirectory(prefix="seg_dist_index_") as tmp:
        root = s.data or str(Path(tmp) / "index")
        written = None
        if s.data is None:
            progress(f"writing {s.samples:,} samples ({s.per_shard} per shard) into {root}")
            t0 = time.perf_counter()
            write_split(root, s.samples, s.per_shard, progress)
            written = time.perf_counter() - t0
        manifest = shards.load_manifest(root)
        split = manifest["splits"]["train"]
        disk = {"shards": sum(e["bytes"] for e in split["shards"]), "index": split["index"]["bytes"]}
        progress("timing the index load")
        index = _run_probe(root, "index", s, progress)
        first = {}
        for w in s.workers:
            progress(f"time to the first batch, {w} workers")
            first[str(w)] = _run_probe(root, "first", s, progress, workers=w)
        headers = None
        if s.headers:
            progress("reading the same index from the tar headers (shards without an index file)")
            headers = _run_probe(root, "headers", s, progress)
    env["load_average_end"] = measure.load_average()
    load_s = float(np.median(index["seconds"]))
    return {
        "settings": {**asdict(s), "samples_in_split": split["num_samples"], "shards": len(split["shards"])},
        "env": env, "write_seconds": written, "disk_bytes": disk,
        "index": index, "index_load_s": load_s, "index_mib": index["nbytes"] / 2**20,
        "bytes_per_sample": index["nbytes"] / max(1, index["samples"]),
        "first_batch": first, "headers": headers,
    }


def _target(key: str, value: float) -> str:
    op, bound = TARGETS[key]
    return f"target {op} {bound:g}: {'met' if value <= bound else 'NOT met'}"


def render(r: dict[str, Any]) -> str:
    """The console table."""
    s, ix = r["settings"], r["index"]
    mem = ix["memory"]
    lines = [f"bench index: {s['samples_in_split']:,} samples in {s['shards']:,} shards, batch {s['batch']}",
             measure.env_line(r["env"])]
    if r["write_seconds"] is not None:
        lines.append(f"  written through ShardWriter in {r['write_seconds']:.1f} s: shards "
                     f"{r['disk_bytes']['shards'] / 2**20:,.0f} MiB, index {r['disk_bytes']['index'] / 2**20:.1f} MiB")
    secs = ", ".join(f"{v:.2f}" for v in ix["seconds"])
    lines += [
        f"  index load (checked, mapped)    {r['index_load_s']:8.2f} s   median of {secs}   "
        + _target("index_load_s", r["index_load_s"]),
        f"  index arrays                    {r['index_mib']:8.1f} MiB ({r['bytes_per_sample']:.1f} bytes/sample)   "
        + _target("index_mib", r["index_mib"]),
        "  memory (MiB)                   process: RSS      PSS      USS   index file: RSS      PSS      USS",
    ]

    def row(name: str, m: dict[str, Any]) -> str:
        i = m["index"]
        return (f"    {name:<28}{m['rss_mib']:9.1f}{m['pss_mib']:9.1f}{m['uss_mib']:9.1f}"
                f"{i['rss_mib']:13.1f}{i['pss_mib']:9.1f}{i['uss_mib']:9.1f}")

    lines += [row("before the index", mem["before"]), row("index mapped", mem["loaded"]),
              row("every index page touched", mem["touched"])]
    for w, f in r["first_batch"].items():
        lines.append(f"  first batch, {w} workers          {f['seconds']:8.2f} s   ({f['batch_samples']} samples)")
        lines.append(row("main process", f["memory"]["main"]))
        for i, m in enumerate(f["memory"]["workers"]):
            lines.append(row(f"worker {i}", m))
    if r["headers"]:
        h = r["headers"]
        lines.append(f"  old shards: index read from the tar headers   {h['seconds']:8.2f} s, "
                     f"RSS +{h['memory']['loaded']['rss_mib'] - h['memory']['before']['rss_mib']:.1f} MiB")
    return "\n".join(lines)


def _main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="one measurement of bench index in this process (used by the bench)")
    p.add_argument("--probe", choices=["index", "first", "headers"], required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    print(json.dumps(_probe(a.root, a.probe, a.workers, a.batch, a.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
