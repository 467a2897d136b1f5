"""Shard folders that are not local folders: `http(s)://`, `s3://` and `gs://` URLs and `pipe:` commands.

One place knows how each scheme is opened, sized and joined, so the manifest, the size check, validation and
the streaming training loader read remote shards alike:

- `http://`, `https://`: the standard library (urllib); sizes from HEAD requests.
- `s3://bucket/prefix`: boto3 (`pip install 'seg_dist[s3]'`), with its usual configuration: credentials,
  region and `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` for S3-compatible servers (MinIO, Ceph, moto);
  sizes from HEAD requests.
- `gs://bucket/prefix`: fsspec with gcsfs when installed, else `gsutil cat` in a pipe; sizes only through
  fsspec.
- `pipe:COMMAND`: webdataset's convention, the command's standard output is the file. A shard's command is
  the root's with `{name}` replaced by the shard's name, or with `/NAME` appended when there is no `{name}`
  (`pipe:curl -sf https://host/data` reads `https://host/data/train-000000.tar`). Sizes cannot be checked.

Errors of every scheme surface as `OSError` (`RemoteError`), so callers retry and report them alike.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from typing import IO, Any

__all__ = ["SCHEMES", "RemoteError", "is_remote", "join", "open_url", "read_bytes", "remote_size", "scheme"]

SCHEMES = ("http://", "https://", "s3://", "gs://", "pipe:")
# Seconds a connection or a read may stall before it counts as broken (and is retried by the readers).
TIMEOUT = 60.0


class RemoteError(OSError):
    """A remote read that failed: the message names the URL and what went wrong."""


def is_remote(root: str | os.PathLike[str]) -> bool:
    """True for a URL or `pipe:` command, False for a local path."""
    return isinstance(root, str) and root.startswith(SCHEMES)


def scheme(url: str) -> str:
    """'http', 'https', 's3', 'gs' or 'pipe' ('file' for a local path)."""
    for s in SCHEMES:
        if url.startswith(s):
            return s.rstrip(":/")
    return "file"


def join(root: str, name: str) -> str:
    """The URL of file `name` inside the remote folder `root`."""
    if root.startswith("pipe:") and "{name}" in root:
        return root.replace("{name}", name)
    return f"{root.rstrip('/')}/{name}"


def open_url(url: str) -> IO[bytes]:
    """A binary stream of `url`'s bytes. A stream that ends before the size the server announced raises
    `RemoteError` instead of ending quietly, so a dropped connection never passes for a short file."""
    kind = scheme(url)
    if kind in ("http", "https"):
        try:
            response = urllib.request.urlopen(url, timeout=TIMEOUT)
        except urllib.error.HTTPError as e:
            raise RemoteError(f"HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise RemoteError(f"cannot connect ({_reason(e)})") from e
        length = response.headers.get("Content-Length")
        return _Checked(response, int(length) if length and length.isdigit() else None)
    if kind == "s3":
        bucket, key = _bucket_key(url)
        try:
            response = _s3().get_object(Bucket=bucket, Key=key)
        except Exception as e:  # botocore: ClientError (NoSuchKey, AccessDenied), EndpointConnectionError, ...
            raise RemoteError(_s3_reason(e)) from e
        length = response.get("ContentLength")
        return _Checked(response["Body"], int(length) if length is not None else None)
    if kind == "gs":
        fs = _gcsfs()
        if fs is not None:
            try:
                return fs.open(url, "rb")
            except Exception as e:
                raise RemoteError(f"cannot open ({_reason(e)})") from e
        return _pipe(f"pipe:gsutil cat {url}")
    if kind == "pipe":
        return _pipe(url)
    return open(url, "rb")


def read_bytes(url: str) -> bytes:
    """All of `url`'s bytes (a manifest)."""
    with open_url(url) as f:
        return f.read()


def remote_size(url: str) -> int | None:
    """`url`'s size in bytes from a HEAD request (http, https, s3; gs with fsspec); None where the scheme has
    no size to ask for (pipe:, gs without fsspec). A missing file raises `FileNotFoundError`."""
    kind = scheme(url)
    if kind in ("http", "https"):
        request = urllib.request.Request(url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                length = response.headers.get("Content-Length")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise FileNotFoundError(url) from e
            raise RemoteError(f"HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise RemoteError(f"cannot connect ({_reason(e)})") from e
        return int(length) if length and length.isdigit() else None
    if kind == "s3":
        bucket, key = _bucket_key(url)
        try:
            return int(_s3().head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception as e:
            if _s3_code(e) in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(url) from e
            raise RemoteError(_s3_reason(e)) from e
    if kind == "gs" and (fs := _gcsfs()) is not None:
        try:
            return int(fs.size(url))
        except FileNotFoundError:
            raise
        except Exception as e:
            raise RemoteError(f"cannot ask for the size ({_reason(e)})") from e
    return None


class _Checked:
    """A stream that raises `RemoteError` when it ends before `length` bytes (None: unknown, not checked).
    http.client's read(n) returns b"" on a connection closed early, as if the file had ended."""

    def __init__(self, raw: Any, length: int | None) -> None:
        self.raw, self.length, self.seen = raw, length, 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.raw.read() if n is None or n < 0 else self.raw.read(n)
        except Exception as e:  # http.client.IncompleteRead, botocore's IncompleteReadError, socket errors
            raise RemoteError(f"connection broke after {self.seen} bytes ({_reason(e)})") from e
        self.seen += len(data)
        if not data and n != 0 and self.length is not None and self.seen < self.length:
            raise RemoteError(f"connection closed after {self.seen} of {self.length} bytes")
        return data

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> _Checked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pipe(url: str) -> IO[bytes]:
    from webdataset.gopen import gopen

    try:
        return gopen(url, "rb")
    except OSError as e:
        raise RemoteError(f"cannot start the command ({_reason(e)})") from e


def _bucket_key(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or not key:
        raise RemoteError("not an s3://BUCKET/KEY URL")
    return bucket, key


_S3_CLIENTS: dict[int, Any] = {}


def _s3() -> Any:
    """One boto3 client per process: clients do not survive a fork into loader workers."""
    client = _S3_CLIENTS.get(os.getpid())
    if client is None:
        try:
            import boto3
        except ImportError as e:
            raise RemoteError("s3:// needs boto3: pip install 'seg_dist[s3]'") from e
        client = _S3_CLIENTS[os.getpid()] = boto3.client("s3")
    return client


def _s3_code(e: BaseException) -> str:
    response = getattr(e, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _s3_reason(e: BaseException) -> str:
    code = _s3_code(e)
    return f"S3 {code}: {_reason(e)}" if code else _reason(e)


def _gcsfs() -> Any:
    try:
        import fsspec

        return fsspec.filesystem("gs")
    except (ImportError, ValueError):  # fsspec without gcsfs: ValueError/ImportError for the protocol
        return None


def _reason(e: BaseException) -> str:
    """An exception as a short phrase: webdataset appends the stream and URL to an error's args."""
    first = e.args[0] if e.args else ""
    text = str(getattr(e, "reason", "") or first or type(e).__name__)
    return text.split(" @ ")[0]
