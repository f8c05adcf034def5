"""Shared pieces of the index tests: a moto S3 server on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import boto3
import pytest


@contextmanager
def _moto_s3(bucket: str, *, key: str, secret: str) -> Iterator[str]:
    """A moto S3 server on a free 127.0.0.1 port with one bucket; dummy credentials in the environment."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", key)
        patch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.delenv("AWS_ENDPOINT_URL", raising=False)
        patch.delenv("AWS_PROFILE", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        url = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
        try:
            yield url
        finally:
            server.stop()


@pytest.fixture(scope="session")
def moto_s3() -> object:
    """`moto_s3(bucket, key=..., secret=...)`: a context manager yielding the server's URL."""
    return _moto_s3
