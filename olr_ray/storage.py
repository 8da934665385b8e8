"""One way to reach local paths and ``s3://`` URIs: pyarrow filesystems.

Every stage reads and writes through :func:`resolve`, so the same code serves a laptop
folder, AWS S3 and any S3-compatible endpoint. Endpoint and credentials come from the
standard AWS environment (``AWS_ENDPOINT_URL[_S3]``, ``AWS_ACCESS_KEY_ID``, profiles,
IAM roles); nothing here ever prints them.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import time
from typing import Any

import pyarrow.fs as pafs

_S3_SCHEMES = ("s3://", "s3a://")


class StorageError(RuntimeError):
    """A storage operation failed; the message names the operation and the URI."""


def is_s3(uri: str) -> bool:
    return uri.startswith(_S3_SCHEMES)


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the standard AWS variables, if any."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def max_attempts() -> int:
    """Attempts per S3 request (``OLR_S3_MAX_ATTEMPTS``, default 10)."""
    return int(os.environ.get("OLR_S3_MAX_ATTEMPTS", "10"))


def s3_filesystem(sdk_retries: bool = True) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem configured from the standard AWS environment.

    Credentials are left to the AWS SDK's default chain (environment, config files,
    instance or pod role), so no secret passes through this code.

    ``sdk_retries``: let the AWS SDK retry transient errors itself (for Parquet reads by
    pyarrow and Ray Data). This module's own operations pass False and retry in
    :func:`_call`, where every retry is counted (:func:`retry_count`).
    """
    kwargs: dict[str, Any] = {
        # Bounded retries: S3's 503 SlowDown and transient network errors are retried with
        # backoff, a dead endpoint or a wrong bucket fails within seconds instead of hanging.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts() if sdk_retries else 1),
        "connect_timeout": 5,
        "request_timeout": 30,
    }
    endpoint = s3_endpoint()
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or scheme
        kwargs["scheme"] = scheme if host else "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, sdk_retries: bool = True) -> tuple[pafs.FileSystem, str]:
    """Split a URI into (filesystem, path inside it)."""
    if is_s3(uri):
        path = uri.split("://", 1)[1].rstrip("/")
        return s3_filesystem(sdk_retries), path
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r}: expected a local path or s3://bucket/prefix")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def absolute(uri: str) -> str:
    """A local path made absolute (``~`` expanded); URIs with a scheme as they are. For paths handed to
    Ray's workers, which run in working directories of their own."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def relative(uri: str, root: str) -> str:
    """The path of ``uri`` under ``root``, whatever ./, ~ or file:// either was spelled with (``list_files``
    returns absolute local paths)."""
    return resolve(uri)[1][len(resolve(root)[1].rstrip("/")) + 1:]


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def redact(text: str) -> str:
    """Remove anything that looks like an AWS credential from a message."""
    for var in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(?i)(secret[_-]?access[_-]?key|session[_-]?token)\s*[=:]\s*\S+", r"\1=***", text)


def _wrap(op: str, uri: str, exc: BaseException) -> StorageError:
    return StorageError(redact(f"{op} {uri} failed: {type(exc).__name__}: {exc}"))


# Throttling, 5xx and dropped connections: worth another attempt. Anything else (access denied,
# bad credentials, missing bucket) fails at once, so a misconfigured job stops in seconds.
_TRANSIENT = re.compile(r"SLOW_?DOWN|SlowDown|SERVICE_UNAVAILABLE|ServiceUnavailable|INTERNAL_FAILURE|InternalError"
                        r"|THROTTL|Throttl|NETWORK_CONNECTION|Connection reset|timed out|HTTP response code: 5\d\d"
                        r"|\b50[0-4]\b")
_RETRIES = {"count": 0}


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and bool(_TRANSIENT.search(str(exc)))


def retry_count() -> int:
    """Storage retries made by this process so far (what the manifest reports)."""
    return _RETRIES["count"]


def _call(op: str, uri: str, fn, label: str | None = None):
    """Run ``fn(fs, path)`` with counted retries of transient S3 errors, exponential backoff."""
    fs, path = resolve(uri, sdk_retries=False)
    attempts = max_attempts() if is_s3(uri) else 1
    for attempt in range(1, attempts + 1):
        try:
            return fn(fs, path)
        except Exception as exc:  # noqa: BLE001 - re-raised with the URI named
            if attempt < attempts and is_transient(exc):
                _RETRIES["count"] += 1
                time.sleep(min(2.0, 0.05 * 2 ** (attempt - 1)))
                continue
            raise _wrap(op, label or uri, exc) from exc


def exists(uri: str) -> bool:
    return _call("stat", uri, lambda fs, path: fs.get_file_info(path).type != pafs.FileType.NotFound)


def makedirs(uri: str) -> None:
    _call("mkdir", uri, lambda fs, path: fs.create_dir(path, recursive=True))


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """The file's bytes, or only its first ``limit`` bytes."""
    def read(fs, path):
        with fs.open_input_stream(path) as f:
            return f.read() if limit is None else f.read(limit)

    return _call("read", uri, read)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; on a local disk via a temporary file and an atomic rename."""
    def write(fs, path):
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)

    _call("write", uri, write)


def delete_file(uri: str, missing_ok: bool = True) -> None:
    def delete(fs, path):
        if missing_ok and fs.get_file_info(path).type == pafs.FileType.NotFound:
            return
        fs.delete_file(path)

    _call("delete", uri, delete)


def _transfer(op: str, src: str, dst: str, fn, done_if_moved: bool = False) -> None:
    """``fn(fs, src_path, dst_path)`` under retries, with the local destination folder made first.

    ``done_if_moved``: on S3, a missing source with the destination present is an earlier attempt
    that finished and lost the reply, not an error.
    """
    _, dst_path = resolve(dst)

    def go(fs, path):
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        elif done_if_moved and fs.get_file_info(path).type == pafs.FileType.NotFound \
                and fs.get_file_info(dst_path).type == pafs.FileType.File:
            return
        fn(fs, path, dst_path)

    _call(op, src, go, label=f"{src} -> {dst}")


def move(src: str, dst: str) -> None:
    """Rename a file (S3: copy then delete; retried as a whole, so a repeated attempt is harmless)."""
    _transfer("move", src, dst, lambda fs, path, dst_path: fs.move(path, dst_path), done_if_moved=True)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode())


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly or recursively under ``uri`` ending in ``suffix``, as URIs, sorted."""
    infos = _call("list", uri, lambda fs, path: fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)))
    prefix = uri.split("://", 1)[0] + "://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def delete_dir(uri: str) -> None:
    def delete(fs, path):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)

    _call("delete", uri, delete)


def copy_file(src: str, dst: str) -> None:
    _transfer("copy", src, dst, lambda fs, path, dst_path: fs.copy_file(path, dst_path))
