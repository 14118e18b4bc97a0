"""A real S3-compatible server for tests: moto's, over HTTP on 127.0.0.1.

The server runs in a thread of the test process; vidq's workers and CLI calls are
other processes, so they reach it like any S3 endpoint, through the environment
that ``S3Server.env`` gives (fake credentials, ``VIDQ_S3_ENDPOINT_URL``, no instance
metadata lookups). Each test gets a bucket of its own.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # No lookups of an EC2 instance role on a machine that has none (a 1 s stall each).
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """What a vidq process needs to use this server as its S3."""
        return {**CREDENTIALS, "VIDQ_S3_ENDPOINT_URL": self.endpoint}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def new_bucket(self) -> str:
        name = f"vidq-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload(self, bucket: str, key: str, source: Path | bytes, **extra: Any) -> None:
        """One PutObject (a single-part upload: its ETag is the content's MD5)."""
        body = source if isinstance(source, bytes) else source.read_bytes()
        self.client().put_object(Bucket=bucket, Key=key, Body=body, **extra)

    def upload_multipart(self, bucket: str, key: str, body: bytes, *,
                         part: int = 5 * 2**20) -> str:
        """A multipart upload (S3's minimum part is 5 MiB); returns the ETag."""
        s3 = self.client()
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key)
        parts = []
        for n, start in enumerate(range(0, len(body), part), start=1):
            done = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                  PartNumber=n, Body=body[start:start + part])
            parts.append({"ETag": done["ETag"], "PartNumber": n})
        s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"],
                                     MultipartUpload={"Parts": parts})
        return str(s3.head_object(Bucket=bucket, Key=key)["ETag"]).strip('"')


@contextlib.contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """moto's server on a free port, for as long as the block runs (the ``s3_server``
    fixture of tests/conftest.py); skips the test where moto is not installed."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # for fsspec calls made by the tests themselves
    try:
        yield S3Server(endpoint=f"http://{host}:{port}")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
