"""Storage access through fsspec: local paths, ``file://``, ``s3://``, ``gs://`` alike.

Every read of a dataset root and every write of an output goes through :class:`Store`, which
also refuses relative paths that would escape its root (``..``, absolute parts) so a crafted
scene or shard name can never reach outside the tree it belongs to.

Object stores: credentials and the endpoint come from the environment of every process (driver
and Ray workers), never from the config, so they are never written next to the output. For S3
that is botocore's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
an instance profile) and ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for an S3-compatible
server such as MinIO. Remote stores are opened with fsspec's listing cache off: other processes
(workers, another build, an operator) change the tree, and a stale listing would make a shard
look missing or present when it is not.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from typing import Iterator

import fsspec


class PathEscapeError(ValueError):
    pass


def safe_join(root: str, rel: str) -> str:
    """Join ``rel`` under ``root``; reject anything that would resolve outside it."""
    rel = rel.replace("\\", "/")
    if rel.startswith("/") or any(part == ".." for part in rel.split("/")):
        raise PathEscapeError(f"path {rel!r} escapes its root {root!r}")
    return posixpath.join(root, rel) if rel else root


class Store:
    """A root directory on any fsspec filesystem."""

    def __init__(self, url: str, **storage_options):
        self.url = str(url)
        proto, _ = fsspec.core.split_protocol(self.url)
        if proto not in (None, "file", "local"):
            storage_options.setdefault("use_listings_cache", False)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.is_local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.is_local:
            self.root = os.path.abspath(self.root)

    def path(self, rel: str = "") -> str:
        return safe_join(self.root, rel)

    def display(self, rel: str = "") -> str:
        """A human-readable location (the URL form for remote stores)."""
        if self.is_local:
            return self.path(rel)
        proto = self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol
        return f"{proto}://{self.path(rel)}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def isdir(self, rel: str) -> bool:
        return self.fs.isdir(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Sorted child names (not paths) of a directory; empty if it does not exist."""
        p = self.path(rel)
        if not self.fs.exists(p):
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in self.fs.ls(p, detail=False))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open(self, rel: str, mode: str = "rb"):
        return self.fs.open(self.path(rel), mode)

    def makedirs(self, rel: str) -> None:
        if self.is_local:
            os.makedirs(self.path(rel), exist_ok=True)

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Readers see the old object or the whole new one, never a partial file."""
        if not self.is_local:
            # one PUT (or a multipart upload completed only after every part arrived)
            self.fs.pipe_file(self.path(rel), bytes(data))
            return
        with self.atomic_writer(rel) as f:
            f.write(data)

    @contextmanager
    def atomic_writer(self, rel: str) -> Iterator:
        """A file to write; published whole when the block ends without an exception, else never.

        Locally: a ``.tmp-<uuid>`` sibling, fsynced and renamed. On object stores: a local
        temporary file, uploaded after the block (one PUT, or a multipart upload that the store
        makes visible only on completion and that s3fs aborts on error). Writing through
        ``fs.open(final, "wb")`` would not do: fsspec files commit on close even when the block
        raised, so an exception mid-write would publish a truncated object at the final key.
        """
        final = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            tmpdir = tempfile.mkdtemp(prefix="d4s-upload-")
            try:
                tmp = os.path.join(tmpdir, "part")
                with open(tmp, "wb") as f:
                    yield f
                self.fs.put_file(tmp, final)
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self.path(rel), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def walk_files(self, rel: str = "") -> list[str]:
        """All files under ``rel``, as paths relative to the store root, sorted."""
        base = self.path(rel)
        if not self.fs.exists(base):
            return []
        out = []
        for p in self.fs.find(base):
            out.append(posixpath.relpath(p, self.root))
        return sorted(out)
