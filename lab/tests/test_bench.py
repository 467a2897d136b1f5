"""`seg-dist bench` end to end on tiny sizes: every section runs, prints its table and writes its figures.

Correctness of the command only: the figures themselves are not asserted (speed belongs in benchmarks).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, child_env

from seg_dist import bench, cli

TINY_MODEL = ["--width", "8", "--depth", "3", "--size", "32", "--warmup", "1", "--steps", "2", "--repeats", "2"]


def _bench(capsys: pytest.CaptureFixture[str], tmp_path, *args: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    assert bench.main([*args, "--device", "cpu", "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _measured_where(section: dict) -> None:
    env = section["env"]
    assert env["device"].startswith("cpu") and env["torch"] and env["cores"] >= 1
    assert isinstance(env["load_average"], float) and isinstance(env["load_average_end"], float)


def test_bench_data_tiny(tiny_shards, tmp_path, capsys):
    report, table = _bench(capsys, tmp_path, "data", "--data", str(tiny_shards), "--size", "32", "--workers", "0,1",
                           "--samples", "32", "--batch", "4", "--repeats", "2")
    d = report["data"]
    for key in ("pipeline_vs_bound", "pipeline_vs_folder", "worker_scaling"):
        assert _number(d[key]), (key, d[key])
    assert set(d["rates"]["pipeline"]) == set(d["rates"]["folder"]) == {"0", "1"}
    for sample in (d["rates"]["decode"], d["rates"]["decode_augment"], *d["rates"]["pipeline"].values()):
        assert len(sample["values"]) == 2 and sample["min"] <= sample["median"] <= sample["max"]
    assert d["settings"]["size"] == 32 and d["settings"]["workers"] == [0, 1]
    _measured_where(d)
    assert "(c) shard pipeline, 1 workers" in table and "c/d" in table and "target >= 0.9" in table


def test_bench_train_tiny(tiny_shards, tmp_path, capsys):
    report, table = _bench(capsys, tmp_path, "train", "--data", str(tiny_shards), *TINY_MODEL, "--batch", "2")
    t = report["train"]
    for key in ("overhead_ratio", "mfu", "images_per_s"):
        assert _number(t[key]), (key, t[key])
    (case,) = t["cases"]
    assert _number(case["flops_per_step"])
    assert case["flops_per_image"] == case["flops_per_step"] / 2
    # MFU is the trainer's FLOP rate over the measured peak, from the same figures.
    peak = case["peak"]["rate"]
    assert case["peak"]["flops_per_s"] == peak["max"] and len(peak["values"]) == 6  # 3 blocks before, 3 after
    assert case["mfu"] == pytest.approx(case["images_per_s"] * case["flops_per_image"] / peak["max"])
    assert t["settings"]["width"] == 8 and t["settings"]["dtype"] in ("bf16", "fp32") and t["settings"]["ddp"]
    assert _number(case["trainer"]["memory"]["peak_mib"])
    _measured_where(t)
    assert "trainer / bare" in table and "MFU (trainer)" in table


def test_bench_scaling_tiny(tiny_shards, tmp_path, capsys):
    report, table = _bench(capsys, tmp_path, "scaling", "--data", str(tiny_shards), *TINY_MODEL, "--batch", "4",
                           "--procs", "2")
    s = report["scaling"]
    assert _number(s["efficiency"])
    assert set(s["runs"]) == {"1", "2"}
    assert s["runs"]["2"]["per_rank_batch"] == 2 and s["runs"]["1"]["per_rank_batch"] == 4
    assert s["settings"]["backend"] == "gloo"
    _measured_where(s)
    assert "efficiency" in table


def test_bench_errors_are_one_line(tiny_shards, tmp_path, capsys):
    assert bench.main(["scaling", "--device", "cpu", "--data", str(tiny_shards), "--procs", "2", "--batch",
                       "3"]) == cli.EXIT_USAGE
    assert "does not split over 2 processes" in capsys.readouterr().err
    assert bench.main(["data", "--device", "cpu", "--data", str(tmp_path / "missing")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest" in err
    with pytest.raises(SystemExit):
        bench.parse_args(["data", "--workers", "0,x"])


def test_bench_command_help_and_table():
    for cmd in ([sys.executable, "-m", "seg_dist.bench", "train", "--help"],
                [sys.executable, "-m", "seg_dist.cli", "bench", "all", "--help"]):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=child_env())
        assert out.returncode == 0, out.stderr
        assert "--json" in out.stdout
    assert "bench" in cli.COMMANDS
