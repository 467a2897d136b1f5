"""`python -m lab.bench index` on a tiny count: every figure is what it claims (the samples it wrote, the index's
arrays, the loader's first batch, one memory reading per worker), and the times fit inside the command's own."""

from __future__ import annotations

import json
import statistics
import time

import pytest

from lab import bench


def test_bench_index_counts_what_it_wrote_and_each_worker_it_measured(tmp_path, capsys):
    out = tmp_path / "index.json"
    t0 = time.perf_counter()
    assert bench.main(["index", "--samples", "600", "--per-shard", "100", "--workers", "1,2", "--batch", "8",
                       "--repeats", "2", "--json", str(out)]) == 0
    wall = time.perf_counter() - t0
    r, table = json.loads(out.read_text()), capsys.readouterr().out

    assert r["settings"]["samples_in_split"] == 600 and r["settings"]["shards"] == 6
    ix = r["index"]
    assert ix["samples"] == 600 and ix["shards"] == 6
    assert ix["nbytes"] == sum(n for _, n in ix["arrays"].values())
    assert r["index_mib"] == pytest.approx(ix["nbytes"] / 2**20)
    assert r["bytes_per_sample"] == pytest.approx(ix["nbytes"] / 600) and r["bytes_per_sample"] < 64 + 15
    assert len(ix["seconds"]) == 2 and r["index_load_s"] == pytest.approx(statistics.median(ix["seconds"]))
    # The tar headers give the same arrays as the file the writer wrote.
    assert r["headers"]["samples"] == 600 and r["headers"]["nbytes"] == ix["nbytes"]
    assert 0 < r["disk_bytes"]["index"] < r["disk_bytes"]["shards"]

    timed = r["write_seconds"] + sum(ix["seconds"]) + r["headers"]["seconds"]
    for w in (1, 2):
        first = r["first_batch"][str(w)]
        assert first["workers"] == w and first["batch_samples"] == 8
        assert len(first["memory"]["workers"]) == w  # one reading per loader worker, none of other processes
        assert 0 < first["seconds"] < first["process_seconds"]
        timed += first["seconds"]
        for m in [first["memory"]["main"], *first["memory"]["workers"]]:
            assert 0 < m["uss_mib"] <= m["rss_mib"] and 0 < m["pss_mib"] <= m["rss_mib"]
    assert timed < wall
    assert "index load (checked, mapped)" in table and "target <= 5" in table and "target <= 64" in table
    assert "first batch, 2 workers" in table and "worker 1" in table
