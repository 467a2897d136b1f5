"""Shards from object storage: training and validation over a real HTTP server and a real S3-compatible server
(moto in server mode, boto3) on 127.0.0.1, against the same shards read as local files."""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import REPO, child_env, spawn_train, tiny_overrides, torchrun

from seg_dist import checkpoint, distributed, shards
from seg_dist.config import load_config
from seg_dist.data import loaders, stream, val_loader
from seg_dist.errors import UserError
from seg_dist.trainer import train

DEFAULT = REPO / "configs" / "default.yaml"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files of the server's folder under three prefixes: /ok/ as they are, /flaky/ with every shard's first
    GET cut off halfway through (the connection closed), /broken/ with train-000001.tar failing every GET."""

    def translate_path(self, path: str) -> str:
        parts = path.split("?")[0].split("/")  # "", prefix, "synthetic", name
        if len(parts) != 4 or parts[2] != "synthetic":
            return os.path.join(self.server.folder, "no-such-file")  # type: ignore[attr-defined]
        return os.path.join(self.server.folder, parts[3])  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        server = self.server
        name = self.path.rsplit("/", 1)[-1]
        if self.path.startswith("/broken/") and name == "train-000001.tar":
            server.broken_gets += 1  # type: ignore[attr-defined]
            self.send_error(500, "shard store down")
            return
        if self.path.startswith("/flaky/") and name.endswith(".tar"):
            with server.lock:  # type: ignore[attr-defined]
                first = name not in server.dropped  # type: ignore[attr-defined]
                server.dropped.add(name)  # type: ignore[attr-defined]
            if first:
                data = Path(self.translate_path(self.path)).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
                return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_server(tiny_shards: Path) -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.folder, server.dropped, server.lock, server.broken_gets = str(tiny_shards), set(), threading.Lock(), 0
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _url(server: http.server.ThreadingHTTPServer, prefix: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/{prefix}/synthetic"


@pytest.fixture(scope="module")
def s3_root(tiny_shards: Path) -> Iterator[str]:
    """The shards in a bucket of a moto S3 server; the environment points boto3 (here and in spawned ranks)
    at it."""
    pytest.importorskip("boto3")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    env = pytest.MonkeyPatch()
    try:
        host, port = server.get_host_and_port()
        for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            env.setenv(key, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="shards")
        for f in sorted(tiny_shards.iterdir()):
            if f.is_file():
                s3.upload_file(str(f), "shards", f"data/synthetic/{f.name}")
        yield "s3://shards/data/synthetic"
    finally:
        env.undo()
        server.stop()


def _cfg(root: str | Path, *extra: str):
    return load_config(DEFAULT, [*tiny_overrides(Path("/unused"), Path("/unused"), *extra)[2:], f"data.root={root}"])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _local_steps(tiny_shards: Path, tmp_path: Path) -> int:
    ranks = spawn_train(2, tiny_overrides(tiny_shards, tmp_path / "local", "train.epochs=2"), tmp_path)
    return ranks[0]["step"]


@pytest.fixture(scope="module")
def local_steps(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> int:
    """Optimiser steps 2 gloo ranks take over 2 epochs of the local shards."""
    return _local_steps(tiny_shards, tmp_path_factory.mktemp("local"))


@pytest.mark.parametrize("store", ["http", "s3"])
def test_two_ranks_train_from_remote_shards_as_many_steps_as_from_local_files(
        store: str, request: pytest.FixtureRequest, tiny_shards: Path, local_steps: int, tmp_path: Path) -> None:
    root = (_url(request.getfixturevalue("http_server"), "ok") if store == "http"
            else request.getfixturevalue("s3_root"))
    run_dir = tmp_path / "run"
    ranks = spawn_train(2, tiny_overrides(tiny_shards, run_dir, "train.epochs=2", f"data.root={root}"), tmp_path)
    assert [r["step"] for r in ranks] == [local_steps, local_steps] == [2 * 8, 2 * 8]
    assert len(ranks[0]["history"]) == 2  # both epochs ran to their validation
    # Every validation saw the val split exactly once over both ranks.
    assert [m["samples"] for m in _metrics(run_dir)] == [16, 16]


def test_every_rank_streams_the_same_micro_batches_per_epoch_from_uneven_shards(http_server) -> None:
    root = _url(http_server, "ok")
    manifest = shards.load_manifest(root)
    assert shards.shard_counts(manifest, "train") == [12, 12, 12, 12, 12, 4]  # uneven: 3 + 3 shards would differ
    cfg = _cfg(root, "train.batch_size=4", "data.shuffle_buffer=8")
    for world in (2, 4):
        steps = -(-64 // (world * 4))
        for rank in range(world):
            batches = [b for b in loaders.train_loader(cfg, manifest, root, rank, world, epoch=0)]
            assert len(batches) == steps, (world, rank)
            assert all(images.shape == (4, 32, 32, 3) and images.dtype == torch.uint8 for images, _ in batches)


def test_validation_over_http_and_s3_reads_every_sample_once(http_server, s3_root: str, tiny_shards: Path) -> None:
    local = _keys(tiny_shards, 1, 0)
    assert len(local) == 16
    for root in (_url(http_server, "ok"), s3_root):
        keys = [k for rank in range(3) for k in _keys(root, 3, rank)]
        assert keys == local  # in order, no sample twice or missing


def _keys(root: str | Path, world: int, rank: int) -> list[str]:
    cfg = _cfg(root)
    manifest = shards.load_manifest(root)
    return [k for _, _, keys, _ in val_loader(cfg, manifest, str(root), rank, world) for k in keys]


def _take(batches: Iterator, n: int) -> list[torch.Tensor]:
    out = []
    for images, _ in batches:
        out.append(images)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_streams_a_reseeded_rest_then_the_next_epoch_as_uninterrupted(
        http_server, workers: int) -> None:
    root = _url(http_server, "ok")
    manifest = shards.load_manifest(root)
    cfg = _cfg(root, "train.batch_size=2", "train.accum_steps=1", f"data.workers={workers}", "data.shuffle_buffer=6")
    steps = 64 // (2 * 2)  # 16 micro-batches per epoch on each of 2 ranks
    run = loaders.train_loader(cfg, manifest, root, 1, 2, epoch=0, endless=True)
    whole = _take(iter(run), 2 * steps)
    resumed = _take(iter(loaders.train_loader(cfg, manifest, root, 1, 2, epoch=0, skip_steps=5, endless=True)),
                    (steps - 5) + steps)
    rest, next_epoch = resumed[: steps - 5], resumed[steps - 5:]
    # The rest of the interrupted epoch is reseeded (seed, epoch, step 5): not the interrupted run's batches.
    assert not all(torch.equal(a, b) for a, b in zip(rest, whole[5:steps], strict=True))
    # The epoch after it is exactly what the uninterrupted run streams.
    assert all(torch.equal(a, b) for a, b in zip(next_epoch, whole[steps:], strict=True))
    # And a run started again from the same point streams the same.
    again = _take(iter(loaders.train_loader(cfg, manifest, root, 1, 2, epoch=0, skip_steps=5, endless=True)),
                  steps - 5)
    assert all(torch.equal(a, b) for a, b in zip(again, rest, strict=True))


def _train_here(overrides: list[str], stop_at_once: bool = False) -> None:
    torch.set_num_threads(1)
    stop = distributed.StopRequest()
    if stop_at_once:
        stop.signal = signal.SIGUSR1  # as if preempted: the run stops at the first step it checks, mid-epoch
    with distributed.setup() as (denv, device):
        train(load_config(DEFAULT, overrides), denv, device, stop)


def test_a_run_over_http_stopped_mid_epoch_resumes_at_its_step_and_ends_with_the_same_schedule(
        http_server, tiny_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _url(http_server, "ok")
    straight, split = tmp_path / "straight", tmp_path / "split"
    extra = ("train.epochs=2", "schedule.warmup_iters=3", "train.resume=auto", f"data.root={root}")
    _train_here(tiny_overrides(tiny_shards, straight, *extra))
    _train_here(tiny_overrides(tiny_shards, split, *extra), stop_at_once=True)
    at = checkpoint.load(split / "checkpoints" / "last.pt")["global_step"]
    assert 0 < at < 16  # mid-epoch
    with caplog.at_level("INFO"):
        _train_here(tiny_overrides(tiny_shards, split, *extra))
    assert f"epoch 1 resumes at step {at}: its other {16 - at} steps stream a reseeded draw" in caplog.text
    a, b = (checkpoint.load(run / "checkpoints" / "last.pt") for run in (straight, split))
    assert a["global_step"] == b["global_step"] == 2 * 64 // 4
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert [m["samples"] for m in _metrics(split)] == [16, 16]


def test_a_connection_dropped_mid_shard_is_retried_and_the_run_completes(
        http_server, tiny_shards: Path, local_steps: int, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, run_dir, "train.epochs=2", "data.retries=3",
                               f"data.root={_url(http_server, 'flaky')}")
    ranks = spawn_train(2, overrides, tmp_path)
    assert [r["step"] for r in ranks] == [local_steps, local_steps]
    assert [m["samples"] for m in _metrics(run_dir)] == [16, 16]
    assert {f"train-00000{i}.tar" for i in range(6)} | {"val-000000.tar"} <= http_server.dropped


def test_a_shard_that_stays_broken_ends_the_run_with_one_line_naming_it(
        http_server, tiny_shards: Path, tmp_path: Path) -> None:
    root = _url(http_server, "broken")
    before = http_server.broken_gets
    out = torchrun(2, "seg_dist.train", "--config", str(DEFAULT),
                   *tiny_overrides(tiny_shards, tmp_path / "run", "data.retries=1", f"data.root={root}"),
                   timeout=240, check=False, env=child_env())
    assert out.returncode != 0
    url = f"{root}/train-000001.tar"
    # The failing rank's one line (the trainer logs it to stdout); its peer is ended by torchrun.
    lines = [line for line in (out.stdout + out.stderr).splitlines() if url in line and "cannot read" in line]
    assert lines, out.stdout[-3000:] + out.stderr[-3000:]
    assert lines[0].endswith(f"{url}: cannot read the shard after 2 attempts: HTTP 500 shard store down"), lines
    assert http_server.broken_gets - before >= 2  # the first read and its one retry


def test_remote_sizes_are_checked_by_head_requests(http_server, s3_root: str) -> None:
    for root in (_url(http_server, "ok"), s3_root):
        manifest = shards.load_manifest(root)
        shards.verify_shards(root, manifest, ["train", "val"])
        manifest["splits"]["train"]["shards"][2]["bytes"] += 1
        with pytest.raises(shards.ShardError, match=r"train-000002\.tar: \d+ bytes, the manifest lists"):
            shards.verify_shards(root, manifest, ["train"])
        manifest["splits"]["val"]["shards"][0]["name"] = "val-000009.tar"
        with pytest.raises(shards.ShardError, match=r"val-000009\.tar: missing"):
            shards.verify_shards(root, manifest, ["val"])


def test_pipe_commands_read_the_manifest_and_shards_and_cannot_be_sized(tiny_shards: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    root = f"pipe:cat {tiny_shards}/{{name}}"
    manifest = shards.load_manifest(root)
    urls = shards.shard_urls(root, manifest, "val")
    assert urls == [f"pipe:cat {tiny_shards}/val-000000.tar", f"pipe:cat {tiny_shards}/val-000001.tar"]
    with caplog.at_level("INFO"):
        shards.verify_shards(root, manifest, ["val"])
    assert "sizes are not checked" in caplog.text
    counts = shards.shard_counts(manifest, "val")
    assert [len(list(stream.shard_samples(u, c, retries=0))) for u, c in zip(urls, counts, strict=True)] == counts


def test_a_missing_remote_manifest_is_one_line_naming_its_url(http_server) -> None:
    root = f"http://127.0.0.1:{http_server.server_address[1]}/ok/elsewhere"
    with pytest.raises(UserError, match=r"^http://127\.0\.0\.1:\d+/ok/elsewhere/manifest\.json: cannot read the "
                                        r"shard manifest \(HTTP 404 File not found\); check data.root$"):
        shards.load_manifest(root)
