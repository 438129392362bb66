"""A real S3 endpoint on 127.0.0.1 for tests: moto's threaded server, one bucket, dummy credentials.

Tests use it through s3fs/boto3 over HTTP, exactly like a production bucket::

    from support.s3_server import s3_endpoint  # noqa: F401  (pytest fixture)

    def test_something(s3_endpoint):
        url = f"s3://{s3_endpoint.bucket}/data"
        ... storage_options=s3_endpoint.storage_options ...
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Iterator

import pytest

__all__ = ["S3Endpoint", "s3_endpoint"]

_DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Endpoint:
    """Where the test S3 server listens and how to talk to it."""

    endpoint_url: str
    bucket: str
    key: str = "testing"
    secret: str = "testing"

    @property
    def storage_options(self) -> dict:
        """Options for ``pipeline.fsutil.StorageSettings`` (and, as a dict, for the job config)."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret}

    @property
    def s3fs_options(self) -> dict:
        """Keyword arguments for ``s3fs.S3FileSystem`` / ``fsspec`` directly."""
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """Start moto's S3 server on a free loopback port with a fresh bucket; stop it after the module."""
    from moto.server import ThreadedMotoServer
    import boto3

    saved = {name: os.environ.get(name) for name in _DUMMY_CREDENTIALS}
    os.environ.update(_DUMMY_CREDENTIALS)  # never let a test reach real credentials or a real account
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = S3Endpoint(endpoint_url=f"http://127.0.0.1:{port}", bucket="holefill-test")
        client = boto3.client(
            "s3", endpoint_url=endpoint.endpoint_url, aws_access_key_id="testing", aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=endpoint.bucket)
        # s3fs caches filesystem instances (and their listings) per options: start each module fresh.
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        yield endpoint
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
