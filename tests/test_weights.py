"""Pretrained weights by name (`model.encoder_weights=imagenet`): fetched from a real HTTP server on
127.0.0.1 (the mirror `SEG_DIST_WEIGHTS_URL` names, serving the paths huggingface.co serves) into the cache
`SEG_DIST_CACHE`, once per node while the other rank waits; offline, one line saying which file to put where;
the normalisation the weights were trained with, recorded in the checkpoint and the export JSON.

`distributed.node_first` needs nothing extra; the rest needs segmentation_models_pytorch (the smp
environment: `../smp-venv/bin/python -m pytest tests/test_weights.py tests/test_smp*.py`).
"""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import REPO, free_port, spawn_train, tiny_overrides
from smp_env import SMP_MISSING, needs_smp

from seg_dist import distributed, exporting
from seg_dist.config import ModelConfig, load_config
from seg_dist.errors import UserError

if not SMP_MISSING:
    import segmentation_models_pytorch as smp
    from safetensors.torch import save


# --- one rank per node first ----------------------------------------------------------------------------------


def _node_first_rank(denv, device, out: str) -> None:
    order = Path(out + ".order")

    def work() -> int:
        with open(order, "a") as f:  # who ran when: the first rank's line comes before the other's
            f.write(f"{denv.rank}\n")
        return denv.rank

    got = distributed.node_first(work, "the test's work")

    def fail() -> None:
        raise UserError("offline: put the file there")

    try:
        distributed.node_first(fail, "the test's failing work")
        failed = None
    except UserError as e:
        failed = str(e)
    torch.save({"got": got, "failed": failed}, f"{out}.{denv.rank}")


def test_node_first_runs_one_rank_first_and_shares_its_failure(tmp_path: Path) -> None:
    out = str(tmp_path / "rank")
    distributed.spawn_local_group(2, _node_first_rank, (out,), device="cpu")
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert [r["got"] for r in results] == [0, 1]  # each rank's own result
    assert Path(out + ".order").read_text().split() == ["0", "1"]  # rank 0 (the node's first) before rank 1
    # Rank 0 failed; rank 1 never ran the work and raised the same one line.
    assert [r["failed"] for r in results] == ["offline: put the file there"] * 2


# --- a real HTTP server -------------------------------------------------------------------------------------


class _Server:
    """Files by URL path on 127.0.0.1, counting GET requests per path."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.gets: Counter[str] = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.gets[self.path] += 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator:
    """Start a server for some files; the weights mirror points at it and the cache is the test's own."""
    servers: list[_Server] = []
    monkeypatch.setenv("SEG_DIST_CACHE", str(tmp_path / "cache"))

    def start(files: dict[str, bytes]) -> _Server:
        server = _Server(files)
        servers.append(server)
        monkeypatch.setenv("SEG_DIST_WEIGHTS_URL", server.url)
        return server

    yield start
    for server in servers:
        server.close()


ENCODER = "mobilenet_v2"  # 2.2 M parameters: the smallest of smp's own encoders
SERVED_MEAN, SERVED_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]  # not ImageNet's, so a lost mean shows


def _smp_hub_files(encoder: str = ENCODER) -> tuple[dict[str, bytes], dict[str, torch.Tensor], str]:
    """What huggingface.co serves for smp's `imagenet` weights of `encoder` (random tensors here), by path."""
    settings = smp.encoders.encoders[encoder]["pretrained_settings"]["imagenet"]
    base = f"/{settings['repo_id']}/resolve/{settings['revision']}"
    torch.manual_seed(7)
    state = smp.encoders.get_encoder(encoder, weights=None).state_dict()
    state = {k: v.clone() for k, v in state.items() if not k.endswith("num_batches_tracked")}
    config = {"mean": SERVED_MEAN, "std": SERVED_STD, "input_range": [0, 1], "input_space": "RGB"}
    return ({f"{base}/model.safetensors": save(state), f"{base}/config.json": json.dumps(config).encode()},
            state, f"huggingface.co{base}")


@needs_smp
def test_two_ranks_fetch_once_train_and_record_the_weights_normalisation(serve, monkeypatch: pytest.MonkeyPatch,
                                                                          tiny_shards: Path, tmp_path: Path) -> None:
    files, state, cached = _smp_hub_files()
    server = serve(files)
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_shards, run, "model.name=smp", "model.arch=FPN", f"model.encoder={ENCODER}",
                               "model.encoder_weights=imagenet", "train.epochs=1", "train.amp=off",
                               "logging.tensorboard=false")
    ranks = spawn_train(2, overrides, tmp_path)
    assert dict(server.gets) == dict.fromkeys(files, 1)  # one download of each file for the node's two ranks
    for key, value in ranks[0]["model"].items():
        assert torch.equal(value, ranks[1]["model"][key]), key
    cache = tmp_path / "cache" / "weights" / cached
    assert sorted(p.name for p in cache.iterdir()) == ["config.json", "model.safetensors"]  # no temporaries

    # The run normalised as the weights were trained, and says so in the checkpoint and the export JSON.
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert saved["input"]["mean"] == pytest.approx(SERVED_MEAN) and saved["input"]["std"] == pytest.approx(SERVED_STD)
    assert saved["input"]["source"].startswith(f"{ENCODER} imagenet weights (smp-hub/{ENCODER}.imagenet@")
    out = tmp_path / "model.pt"
    exporting.export(run / "checkpoints" / "last.pt", out, "torchscript")
    meta = json.loads(exporting.metadata_path(out).read_text())
    assert meta["mean"] == pytest.approx(SERVED_MEAN) and meta["input"]["source"] == saved["input"]["source"]

    # The run started from the served weights (built again now: from the cache, no more requests).
    cfg = load_config(REPO / "configs" / "default.yaml", overrides)
    torch.manual_seed(0)
    from seg_dist.models import build_model

    model = build_model(cfg.model, 6)
    for k, v in state.items():
        assert torch.equal(model.smp.encoder.state_dict()[k], v), k
    assert sum(server.gets.values()) == 2

    # Continued on a node without the cache and offline (a requeued job): weights and normalisation come from
    # the checkpoint, nothing is fetched.
    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setenv("SEG_DIST_WEIGHTS_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    continued = spawn_train(2, [*overrides, "train.epochs=2"], tmp_path)
    assert continued[0]["step"] > saved["global_step"]
    after = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert after["input"] == saved["input"]
    assert not (tmp_path / "cache").exists() and sum(server.gets.values()) == 2


@needs_smp
def test_offline_is_one_line_naming_the_file_and_a_copy_there_works(serve, monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    files, state, cached = _smp_hub_files()
    monkeypatch.setenv("SEG_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SEG_DIST_WEIGHTS_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    cfg = ModelConfig(name="smp", arch="Unet", encoder=ENCODER, encoder_weights="imagenet")
    from seg_dist.models import build_model

    with pytest.raises(UserError) as info:
        build_model(cfg, 3)
    message = str(info.value)
    dest = tmp_path / "cache" / "weights" / cached / "model.safetensors"
    assert "\n" not in message
    assert f"cannot download https://{cached}/model.safetensors" in message
    assert f"without a network, put that file at {dest}" in message
    # The file put there by hand (as from another machine) is used without a network.
    for path, body in files.items():
        target = tmp_path / "cache" / "weights" / "huggingface.co" / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    model = build_model(cfg, 3)
    assert torch.equal(model.smp.encoder.state_dict()["features.0.0.weight"], state["features.0.0.weight"])

    # A server that answers 404: one line with the status, nothing left in the cache.
    server = serve({})
    with pytest.raises(UserError, match=r"cannot download .*resnet18\.imagenet.* HTTP 404"):
        build_model(ModelConfig(name="smp", encoder="resnet18", encoder_weights="imagenet"), 3)
    hub = tmp_path / "cache" / "weights" / "huggingface.co"
    assert server.gets and not list(hub.glob("smp-hub/resnet18*/**/*.*"))


@needs_smp
def test_timm_weights_by_name_on_four_bands(serve) -> None:
    """A tu- encoder's `imagenet`: timm's weights for the name's tag, its classifier dropped by timm, the first
    convolution adapted to 4 bands; the mean and std are timm's (no config.json)."""
    import timm

    from seg_dist.models import adapt_first_conv, build_model
    from seg_dist.models.smp import pretrained_normalization

    torch.manual_seed(3)
    full = timm.create_model("test_resnet").state_dict()  # the classifier model timm publishes
    pretrained = timm.models.get_pretrained_cfg("test_resnet")
    server = serve({f"/{pretrained.hf_hub_id}/resolve/main/model.safetensors": save(full)})
    cfg = ModelConfig(name="smp", arch="FPN", encoder="tu-test_resnet", encoder_weights="imagenet", in_channels=4)
    model = build_model(cfg, 3)
    assert sum(server.gets.values()) == 1
    encoder = model.smp.encoder.state_dict()
    first = "model.conv1.0.weight"
    assert torch.equal(encoder[first], adapt_first_conv(full["conv1.0.weight"], 4))
    for k, v in full.items():
        if f"model.{k}" in encoder and k != "conv1.0.weight":
            assert torch.equal(encoder[f"model.{k}"], v), k
    mean, std, label = pretrained_normalization(cfg)
    assert (mean, std) == (tuple(pretrained.mean), tuple(pretrained.std)) and pretrained.hf_hub_id in label
