"""A real S3-compatible server on loopback for the tests: moto's server mode in a thread.

:class:`LocalS3` starts ``moto.server.ThreadedMotoServer`` on 127.0.0.1 with a free port and
gives the environment that points every S3 client at it (botocore reads ``AWS_ENDPOINT_URL``,
so boto3, s3fs and the Ray workers started with this environment all use it). The credentials
are fake but unique per run, so a test can search the output for the secret.
"""

from __future__ import annotations

import os
import socket
import uuid

ENV_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3:
    def __init__(self, bucket: str = "d4s-test"):
        self.bucket = bucket
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = f"d4s-test-key-{uuid.uuid4().hex[:8]}"
        self.secret_key = f"d4s-test-secret-{uuid.uuid4().hex}"
        self._server = None
        self._saved: dict[str, str | None] = {}

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            # never look at the developer's own AWS setup or at an instance-metadata service
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> "LocalS3":
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def apply_env(self) -> None:
        """Point this process (and what it starts from now on) at the server."""
        self._saved = {k: os.environ.get(k) for k in ENV_KEYS}
        for k in ENV_KEYS:
            os.environ.pop(k, None)
        os.environ.update(self.env())
        _clear_s3fs_instances()

    def restore_env(self) -> None:
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_s3fs_instances()

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
        )

    def create_bucket(self) -> None:
        self.client().create_bucket(Bucket=self.bucket)

    def url(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix.strip('/')}"

    def objects(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (straight from the server, no client-side cache)."""
        keys = []
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return sorted(keys)

    def get(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def put(self, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=self.bucket, Key=key, Body=data)

    def put_tree(self, root, prefix: str) -> str:
        """Every file under the local folder ``root`` as ``prefix/<its path>``; the prefix's URL."""
        from pathlib import Path

        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                self.put(f"{prefix}/{p.relative_to(root).as_posix()}", p.read_bytes())
        return self.url(prefix)

    def delete(self, key: str) -> None:
        self.client().delete_object(Bucket=self.bucket, Key=key)


def _clear_s3fs_instances() -> None:
    """fsspec caches filesystem instances (with their endpoint and credentials): drop them."""
    try:
        import s3fs
    except ImportError:
        return
    s3fs.S3FileSystem.clear_instance_cache()
