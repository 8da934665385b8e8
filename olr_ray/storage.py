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


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem configured from the standard AWS environment.

    Credentials are left to the AWS SDK's default chain (environment, config files,
    instance or pod role), so no secret passes through this code.
    """
    kwargs: dict[str, Any] = {
        # Bounded retries: S3's 503 SlowDown and transient network errors are retried with
        # backoff, a dead endpoint or a wrong bucket fails within seconds instead of hanging.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=int(os.environ.get("OLR_S3_MAX_ATTEMPTS", "10"))),
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


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Split a URI into (filesystem, path inside it)."""
    if is_s3(uri):
        path = uri.split("://", 1)[1].rstrip("/")
        return s3_filesystem(), path
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported URI scheme in {uri!r}: expected a local path or s3://bucket/prefix")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


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


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except Exception as exc:  # noqa: BLE001 - re-raised with the URI named
        raise _wrap("stat", uri, exc) from exc


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
    except Exception as exc:  # noqa: BLE001
        raise _wrap("mkdir", uri, exc) from exc


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except Exception as exc:  # noqa: BLE001
        raise _wrap("read", uri, exc) from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; on a local disk via a temporary file and an atomic rename."""
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}-{time.monotonic_ns()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except Exception as exc:  # noqa: BLE001
        raise _wrap("write", uri, exc) from exc


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri).decode())


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly or recursively under ``uri`` ending in ``suffix``, as URIs, sorted."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except Exception as exc:  # noqa: BLE001
        raise _wrap("list", uri, exc) from exc
    prefix = uri.split("://", 1)[0] + "://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    except Exception as exc:  # noqa: BLE001
        raise _wrap("delete", uri, exc) from exc


def copy_file(src: str, dst: str) -> None:
    fs, src_path = resolve(src)
    _, dst_path = resolve(dst)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        fs.copy_file(src_path, dst_path)
    except Exception as exc:  # noqa: BLE001
        raise _wrap("copy", f"{src} -> {dst}", exc) from exc
