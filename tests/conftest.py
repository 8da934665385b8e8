"""Shared fixtures: one local Ray per test session and a real S3 endpoint (moto server on 127.0.0.1).

The S3 endpoint is started before Ray so that every Ray worker inherits the AWS variables and
reaches it through the same pyarrow/boto3 code paths as AWS.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest

_MOTO = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config):
    global _MOTO
    from moto.server import ThreadedMotoServer

    port = _free_port()
    _MOTO = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    _MOTO.start()
    os.environ.update({
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-canary-7f3a9",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "OLR_S3_MAX_ATTEMPTS": "3",
        # Keep Ray quiet and local: no dashboard, no usage stats.
        "RAY_USAGE_STATS_ENABLED": "0",
    })


def pytest_unconfigure(config):
    if _MOTO is not None:
        _MOTO.stop()


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    return os.environ["AWS_ENDPOINT_URL_S3"]


@pytest.fixture()
def s3_bucket(s3_endpoint) -> str:
    """A fresh bucket on the moto endpoint; returns ``s3://<bucket>``."""
    import boto3

    name = f"olr-test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (2 CPUs, dashboard off, token auth on)."""
    import ray

    from olr_ray.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def upload_dir(local: str, s3_uri: str) -> None:
    """Copy a local folder to S3 through boto3 (how users upload datasets)."""
    import boto3

    bucket, _, prefix = s3_uri[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    for root, _, files in os.walk(local):
        for f in files:
            path = os.path.join(root, f)
            key = "/".join(p for p in (prefix, os.path.relpath(path, local).replace(os.sep, "/")) if p)
            client.upload_file(path, bucket, key)
