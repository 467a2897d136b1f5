"""Pretrained encoder weights by name (`model.encoder_weights=imagenet`): where they come from, the node's
cache they are fetched into, and the normalisation they were trained with.

Names are smp's own: an smp encoder's `pretrained_settings` (resnet34: imagenet, ssl, swsl; ...) name a
Hugging Face repository and revision holding `model.safetensors` and a `config.json` with the mean and std;
a timm encoder (`tu-<model>[.<tag>]`) takes `imagenet`, meaning timm's pretrained weights for that model and
tag, whose mean and std timm knows without a download.

Files are cached under `$SEG_DIST_CACHE/weights` (default `~/.cache/seg_dist/weights`) at the path of their
URL (`huggingface.co/smp-hub/resnet34.imagenet/resolve/<revision>/model.safetensors`), so a machine without
a network takes a file copied there by hand. One rank per node downloads while the others wait
(`distributed.node_first`); files are written under a temporary name and renamed (`atomic.writer`).
`SEG_DIST_WEIGHTS_URL=http://host:port` fetches the same paths from a mirror instead of the file's own host.
Nothing is downloaded at import, nor for a checkpoint (its weights are all in it).
"""

from __future__ import annotations

import difflib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from seg_dist import atomic, distributed
from seg_dist.errors import UserError

if TYPE_CHECKING:
    from seg_dist.config import ModelConfig

__all__ = [
    "CACHE_ENV", "HF", "TIMM_NAME", "URL_ENV", "NamedWeights", "cache_root", "cached_path", "fetch",
    "is_local_file_name", "named_weights", "read_state_dict", "source_url",
]

log = logging.getLogger("seg_dist.models")

CACHE_ENV = "SEG_DIST_CACHE"
URL_ENV = "SEG_DIST_WEIGHTS_URL"
HF = "https://huggingface.co"
TIMM_NAME = "imagenet"  # what model.encoder_weights says for a tu- encoder's timm weights
_STATE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors", ".tar")
_CHUNK = 1 << 20
_RETRIES = 3


@dataclass(frozen=True)
class NamedWeights:
    """Pretrained weights named by `model.encoder_weights`: the files to fetch (canonical URLs, the state dict
    first) and, for timm encoders, the mean and std (smp encoders keep theirs in the config.json file)."""

    encoder: str
    name: str
    urls: tuple[str, ...]
    label: str  # where they come from, as the log and the checkpoint's normalisation source say
    timm_mean: tuple[float, ...] | None = None
    timm_std: tuple[float, ...] | None = None

    @property
    def timm(self) -> bool:
        return self.encoder.startswith("tu-")


def cache_root() -> Path:
    """`$SEG_DIST_CACHE/weights`, default `~/.cache/seg_dist/weights`."""
    base = os.environ.get(CACHE_ENV)
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "seg_dist") / "weights"


def cached_path(url: str) -> Path:
    """Where the file of `url` lives in the cache: its host and path under `cache_root()`."""
    parts = urllib.parse.urlsplit(url)
    return cache_root() / parts.netloc / parts.path.lstrip("/")


def source_url(url: str) -> str:
    """`url`, or the same path on the mirror `$SEG_DIST_WEIGHTS_URL` names."""
    mirror = os.environ.get(URL_ENV)
    if not mirror:
        return url
    return mirror.rstrip("/") + urllib.parse.urlsplit(url).path


def is_local_file_name(value: str) -> bool:
    """A value of model.encoder_weights that means a file: an existing path, or one that looks like a path
    (a folder separator or a state-dict suffix). Anything else is a weights name."""
    return (Path(value).expanduser().is_file() or "/" in value or os.sep in value
            or value.lower().endswith(_STATE_SUFFIXES))


def named_weights(cfg: ModelConfig) -> NamedWeights | None:
    """The named weights `cfg.encoder_weights` asks for, checked against smp's and timm's lists (UserError with
    a did-you-mean); None for no weights or a local file. Imports smp (SmpMissing where it cannot)."""
    value = cfg.encoder_weights
    if value is None or is_local_file_name(value):
        return None
    from seg_dist.models.smp import import_smp

    smp = import_smp()
    if cfg.encoder.startswith("tu-"):
        return _timm_weights(cfg.encoder, value)
    settings = smp.encoders.encoders.get(cfg.encoder, {}).get("pretrained_settings", {})
    if value not in settings:
        raise UserError(f"model.encoder_weights={value!r}: not a weights name of encoder {cfg.encoder} "
                        f"({_choices(value, list(settings))}) nor a local state-dict file")
    repo, revision = settings[value]["repo_id"], settings[value]["revision"]
    urls = tuple(f"{HF}/{repo}/resolve/{revision}/{name}" for name in ("model.safetensors", "config.json"))
    return NamedWeights(cfg.encoder, value, urls, f"{repo}@{revision[:8]}")


def _timm_weights(encoder: str, value: str) -> NamedWeights:
    import timm

    model = encoder[3:]
    if value != TIMM_NAME:
        raise UserError(f"model.encoder_weights={value!r}: a timm encoder ({encoder}) takes {TIMM_NAME} (timm's "
                        f"pretrained weights for the model and tag in its name) or a local state-dict file")
    try:
        pretrained = timm.models.get_pretrained_cfg(model)
    except RuntimeError as e:  # a tag the model does not have
        tags = [n for n in timm.list_pretrained(model.split(".")[0] + ".*")]
        raise UserError(f"model.encoder={encoder}: {e} ({_choices(model, tags)})") from None
    if pretrained is None or not (pretrained.hf_hub_id or pretrained.url):
        raise UserError(f"model.encoder={encoder}: timm has no pretrained weights for {model}; "
                        "unset model.encoder_weights or give a local state-dict file")
    if pretrained.hf_hub_id:
        filename = pretrained.hf_hub_filename or "model.safetensors"
        url = f"{HF}/{pretrained.hf_hub_id}/resolve/main/{filename}"
        label = pretrained.hf_hub_id
    else:
        url = label = pretrained.url
    return NamedWeights(encoder, value, (url,), label, tuple(pretrained.mean), tuple(pretrained.std))


def _choices(value: str, names: list[str]) -> str:
    close = difflib.get_close_matches(value, names, n=3, cutoff=0.5)
    if close:
        return f"did you mean {', '.join(close)}?"
    return f"its names: {', '.join(names)}" if names else "it has none"


def fetch(weights: NamedWeights) -> list[Path]:
    """The cached files of `weights`, downloaded first where missing: by one rank per node while the others
    wait; offline, a UserError that says which file to put where."""

    def download_missing() -> list[Path]:
        return [_download(url) for url in weights.urls]

    return distributed.node_first(download_missing, f"fetching model.encoder_weights={weights.name}")


def _download(url: str) -> Path:
    dest = cached_path(url)
    if dest.is_file():
        return dest
    source = source_url(url)
    log.info("model.encoder_weights: downloading %s to %s", source, dest)
    started = time.monotonic()
    for attempt in range(_RETRIES):
        try:
            with urllib.request.urlopen(source, timeout=60) as response, atomic.writer(dest) as out:
                size = 0
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    size += len(chunk)
            break
        except urllib.error.HTTPError as e:  # the server answered: another try would get the same answer
            raise _offline(url, dest, f"HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
            if attempt == _RETRIES - 1:
                reason = getattr(e, "reason", e)
                raise _offline(url, dest, f"{type(e).__name__}: {reason}") from None
            time.sleep(2**attempt)
    log.info("model.encoder_weights: %s, %.1f MB in %.1f s", dest.name, size / 1e6, time.monotonic() - started)
    return dest


def _offline(url: str, dest: Path, reason: str) -> UserError:
    mirror = f" (from {source_url(url)})" if source_url(url) != url else ""
    return UserError(f"model.encoder_weights: cannot download {url}{mirror}: {reason}; without a network, put "
                     f"that file at {dest} ({CACHE_ENV} moves the cache), or give model.encoder_weights a "
                     "local state-dict file")


def read_state_dict(path: str | Path, key: str = "model.encoder_weights") -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch file (`weights_only=True`), a checkpoint's
    `state_dict` entry unwrapped; UserError naming `key` and the file otherwise."""
    path = Path(path)
    try:
        if _is_safetensors(path):
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{key}={path}: not a readable torch state dict or safetensors file "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                        "a damaged download in the cache can be deleted to fetch it again") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{key}={path}: expected a state dict (parameter name -> tensor), got {type(state).__name__}")
    return dict(state)


def _is_safetensors(path: Path) -> bool:
    """By suffix, or by content: an 8-byte header length followed by a JSON header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 28)


def config_normalization(path: Path, weights: NamedWeights) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std, in fractions of 255, from an smp weights `config.json` (`input_range` [0, 255] scaled
    down); RGB channel order (`input_space` BGR reversed, as the first convolution is on loading)."""
    try:
        config = json.loads(path.read_text())
        mean, std = [float(v) for v in config["mean"]], [float(v) for v in config["std"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"model.encoder_weights={weights.name}: {path} is not the weights' config.json with a mean "
                        f"and std ({type(e).__name__}: {e}); delete it to fetch it again") from None
    scale = float(max(config.get("input_range", [0, 1])))
    if scale > 1:
        mean, std = [m / scale for m in mean], [s / scale for s in std]
    if config.get("input_space", "RGB") == "BGR":
        mean, std = mean[::-1], std[::-1]
    return tuple(mean), tuple(std)


def input_space(weights: NamedWeights, files: list[Path]) -> str:
    """RGB or BGR: the channel order the weights' first convolution expects."""
    if weights.timm or len(files) < 2:
        return "RGB"
    try:
        return str(json.loads(files[1].read_text()).get("input_space", "RGB"))
    except (OSError, ValueError):
        return "RGB"
