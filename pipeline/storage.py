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

Conditional writes (the driver's lease, ``manifests/lease.py``): :meth:`Store.create_exclusive`
publishes an object only if none exists, :meth:`Store.replace_if_version` only if it is still the
version the caller read. On S3 they are the ``If-None-Match: *`` / ``If-Match: <ETag>`` PUT
preconditions; on a filesystem, ``link(2)`` (fails when the name exists) and a compare-and-rename
under an ``flock`` on a sibling ``.lock`` file (works on local disks and on NFS, whose clients map
``flock`` to byte-range locks). Other stores (``gs://``, ...) have no such precondition through
fsspec: there the two calls check first and then write, and a race between two writers within the
same second is not excluded (``conditional_writes`` is False; docs/CLUSTER.md).
"""

from __future__ import annotations

import contextlib
import errno
import glob as _glob
import hashlib
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

import fsspec


class PathEscapeError(ValueError):
    pass


CONDITIONAL_PROTOCOLS = ("file", "local", "s3", "s3a")


# errnos of a write the node refused for want of a resource (pipeline/failures.py: transient)
_NODE_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


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
        from pipeline.url_credentials import ADVICE, has_credentials

        if has_credentials(self.url):
            from pipeline.config import ConfigError

            raise ConfigError(f"refused a location: {ADVICE}")
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
        """Whether something is at ``rel``. A folder on the way that cannot be read raises (fsspec's
        ``exists`` says False for any error: an unreadable manifests folder was "no plan")."""
        return self.lookup(rel) is not None

    def isdir(self, rel: str) -> bool:
        """Whether ``rel`` is a folder; like :meth:`exists`, an unreadable folder on the way raises."""
        info = self.lookup(rel)
        return info is not None and info.get("type") == "directory"

    def lookup(self, rel: str) -> dict | None:
        """The listing entry of ``rel`` (``type`` file or directory, size, ...), or None when there
        is nothing there. Unlike ``exists``/``isdir``, which answer False for a path they cannot
        look at, a folder on the way that cannot be read (PermissionError, an I/O error) raises:
        discovery must not take an unreadable scene for an absent one."""
        try:
            return self.fs.info(self.path(rel))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def listdir(self, rel: str = "") -> list[str]:
        """Sorted child names (not paths) of a directory; empty if it does not exist. A folder that
        is there but cannot be read raises (``exists`` would say it is not there: a ledger folder
        that cannot be read must not read as an empty ledger)."""
        p = self.path(rel)
        try:
            listing = self.fs.ls(p, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in listing if e.rstrip("/") != p.rstrip("/"))

    def read_bytes(self, rel: str) -> bytes:
        """The whole file: on an object store one GET (opening a file object first asks for its
        size, a second request per file)."""
        if self.is_local:
            with self.fs.open(self.path(rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(rel), **self._one_get)

    @property
    def _one_get(self) -> dict:
        """cat arguments for one GET per object: s3fs asks each object's size first (a HEAD, to
        split a large one into concurrent ranges); one GET streams any file d4s reads whole fast
        enough and halves the requests."""
        return {"max_concurrency": 1} if self.protocol in ("s3", "s3a") else {}

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def open(self, rel: str, mode: str = "rb", block_size: int | None = None):
        """A file object. ``block_size``: on an object store, the bytes fetched ahead of each read
        that misses the buffer (s3fs's default is 50 MiB, so a reader that seeks and reads a few
        bytes here and there, as discovery reading one small array of an npz or the 12-byte
        headers of a TFRecord file, would download the whole file); ignored locally."""
        if block_size is not None and not self.is_local:
            return self.fs.open(self.path(rel), mode, block_size=int(block_size))
        return self.fs.open(self.path(rel), mode)

    def makedirs(self, rel: str) -> None:
        if self.is_local:
            os.makedirs(self.path(rel), exist_ok=True)

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Readers see the old object or the whole new one, never a partial file."""
        if not self.is_local:
            # one PUT (or a multipart upload completed only after every part arrived)
            with self._naming(rel):
                self.fs.pipe_file(self.path(rel), bytes(data))
            return
        with self.atomic_writer(rel) as f:
            f.write(data)

    @contextmanager
    def _naming(self, rel: str) -> Iterator[None]:
        """A write the node refused (disk or quota full, read-only, file size limit) names the
        object: the errno alone ("No space left on device") says neither where nor what."""
        try:
            yield
        except OSError as exc:
            if exc.errno in _NODE_WRITE_ERRNOS and exc.filename is None:
                raise OSError(exc.errno, exc.strerror or str(exc), self.display(rel)) from exc
            raise

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
            with self._naming(rel):
                os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}.tmp-{uuid.uuid4().hex}"
            try:
                with self._naming(rel):  # the block's writes too: a full disk fails f.write
                    with open(tmp, "wb") as f:
                        yield f
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, final)
                    _fsync_dir(os.path.dirname(final))
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            tmpdir = tempfile.mkdtemp(prefix="d4s-upload-")
            try:
                tmp = os.path.join(tmpdir, "part")
                with self._naming(rel):
                    with open(tmp, "wb") as f:
                        yield f
                    self.fs.put_file(tmp, final)
            finally:
                shutil.rmtree(tmpdir, ignore_errors=True)

    def remove(self, rel: str) -> None:
        """Delete a file or a folder with what is in it. The path is taken literally: fsspec's rm
        expands a path with glob characters (a root named ``o*`` would match a sibling ``oo``)."""
        p = self.path(rel)
        if self.is_local:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.remove(p)
            return
        if not self.fs.exists(p):
            return
        if not _glob.has_magic(p):
            self.fs.rm(p, recursive=True)
        elif self.fs.isdir(p):
            for f in self.fs.find(p):  # a listing, never a pattern
                self.fs.rm_file(f)
        else:
            self.fs.rm_file(p)

    def glob(self, pattern: str, errors: list | None = None) -> list[str]:
        """Paths under the root matching ``pattern`` (relative, '/'-separated; each component a
        name or an fnmatch pattern: ``*``, ``?``, ``[...]``, never across a '/'), sorted; the root
        itself is taken literally, whatever characters its name holds.

        Walked one folder level at a time: a folder is listed only where a pattern component has
        to match its entries (a ``*`` component short of the last matches folders only), a literal
        component is joined without a listing, and a literal last component is looked up (one
        ``info``). ``*/*/*/pose_left.txt`` lists three levels and never a frame folder, where
        fsspec's glob walked (and, locally, stat-ed) every file down to the pattern's depth.
        Symbolic links to folders are followed.

        A folder or file that is there but cannot be read (PermissionError, an I/O error) is never
        left out in silence, as fsspec's walk does: with ``errors`` None it raises; else
        ``(path relative to the root, exception)`` is appended to ``errors`` and the walk goes on.
        A transient error (the network, a throttled store) always raises."""
        import fnmatch

        from pipeline.failures import is_transient

        parts = [p for p in pattern.split("/") if p and p != "."]
        if any("**" in p for p in parts):
            raise ValueError(f"Store.glob matches one folder level per component: {pattern!r}")

        def failed(path: str, exc: OSError) -> None:
            if errors is None or is_transient(exc):
                raise exc
            errors.append((posixpath.relpath(path, self.root), exc))

        def entries(folder: str, types: bool) -> list[tuple[str, bool]]:
            try:
                listing = self.fs.ls(folder, detail=types)
            except (FileNotFoundError, NotADirectoryError):
                return []
            except OSError as exc:
                failed(folder, exc)
                return []
            out = []
            for e in listing:
                path = (e["name"] if types else e).rstrip("/")
                if path == folder.rstrip("/"):
                    continue  # a file is listed as itself
                is_dir = types and (e["type"] == "directory" or bool(e.get("islink") and self.fs.isdir(path)))
                out.append((path, is_dir))
            return out

        level = [self.root]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            found = []
            for folder in level:
                if _glob.has_magic(part):
                    found += [
                        path
                        for path, is_dir in entries(folder, types=not last)
                        if (last or is_dir) and fnmatch.fnmatchcase(posixpath.basename(path), part)
                    ]
                    continue
                path = posixpath.join(folder, part)
                if not last:
                    found.append(path)  # listed at the next level; nothing there, nothing found
                    continue
                try:
                    self.fs.info(path)
                    found.append(path)
                except (FileNotFoundError, NotADirectoryError):
                    if self.is_local and os.path.islink(path):
                        found.append(path)  # a dangling link: reading it names the file
                except OSError as exc:
                    failed(path, exc)
            level = found
        return sorted(level)

    def sha256(self, rel: str) -> str:
        h = hashlib.sha256()
        with self.fs.open(self.path(rel), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    @property
    def protocol(self) -> str:
        return self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol

    @property
    def conditional_writes(self) -> bool:
        """Whether create-if-absent and replace-if-unchanged are atomic on this store."""
        return self.is_local or self.protocol in CONDITIONAL_PROTOCOLS

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Publish ``data`` at ``rel`` only if nothing is there; False when something is."""
        final = self.path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, final)  # atomic, and fails if the name exists (also on NFS)
                _fsync_dir(os.path.dirname(final))
                return True
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        if self.conditional_writes:
            try:
                self.fs.pipe_file(final, bytes(data), mode="create")
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if _precondition_failed(exc):
                    return False
                raise
        if self.fs.exists(final):
            return False
        self.fs.pipe_file(final, bytes(data))
        return True

    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        """(bytes, version) of an object, or None when absent. The version changes whenever the
        object is rewritten (S3: its ETag; filesystem: a hash of the bytes)."""
        p = self.path(rel)
        for attempt in range(5):
            try:
                if self.is_local or not self.conditional_writes:
                    with self.fs.open(p, "rb") as f:
                        data = f.read()
                    return data, hashlib.sha256(data).hexdigest()
                with self.fs.open(p, "rb") as f:  # s3fs reads with If-Match on the ETag it saw at open
                    return f.read(), str(f.details["ETag"])
            except FileNotFoundError:
                return None
            except OSError as exc:
                # s3fs's FileExpired (EBUSY): the object was rewritten between the ETag and the
                # read (a lease renewal landing); the next read sees the new version whole
                if exc.errno != errno.EBUSY or attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    def replace_if_version(self, rel: str, data: bytes, version: str) -> bool:
        """Overwrite ``rel`` with ``data`` only if it is still at ``version``; False otherwise."""
        final = self.path(rel)
        if self.is_local:
            with _flocked(f"{final}.lock"):
                cur = self.read_versioned(rel)
                if cur is None or cur[1] != version:
                    return False
                self.write_bytes_atomic(rel, data)
                return True
        if self.conditional_writes:
            try:
                self.fs.pipe_file(final, bytes(data), IfMatch=version)
                return True
            except (FileNotFoundError, FileExistsError):
                return False
            except OSError as exc:
                if _precondition_failed(exc):
                    return False
                raise
        cur = self.read_versioned(rel)
        if cur is None or cur[1] != version:
            return False
        self.fs.pipe_file(final, bytes(data))
        return True

    def modified_time(self, rel: str) -> float:
        """The store's own modification time of ``rel`` (epoch seconds, the store's clock)."""
        return _mtime(self.fs.info(self.path(rel)))

    def clock(self, rel_dir: str = "") -> float:
        """The store's clock now: the modification time of a probe object written and removed
        here. Lets two hosts whose clocks disagree compare an object's age on one clock."""
        probe = posixpath.join(rel_dir, f".clock-probe-{uuid.uuid4().hex}")
        self.write_bytes_atomic(probe, b"")
        try:
            return self.modified_time(probe)
        finally:
            self.remove(probe)

    def files_detail(self, rel: str = "") -> dict[str, dict]:
        """Every file under ``rel`` with its listing entry (size, mtime or ETag): one recursive
        listing, a few requests per thousand objects on an object store. A folder that cannot be
        listed (PermissionError, an I/O error) raises: fsspec's local walk would leave its files
        out, as if they were missing."""
        base = self.path(rel)
        if not self.fs.exists(base):
            return {}
        if self.is_local:
            found, todo = {}, [base]
            while todo:
                folder = todo.pop()
                try:
                    listing = self.fs.ls(folder, detail=True)
                except FileNotFoundError:  # removed meanwhile
                    continue
                for info in listing:
                    name = info["name"].rstrip("/")
                    if info.get("type") == "directory" and name != folder:
                        todo.append(name)
                    elif info.get("type") != "directory":
                        found[name] = info
        else:  # a flat listing of the prefix (s3fs, gcsfs): its errors raise
            found = self.fs.find(base, detail=True)
        return {
            posixpath.relpath(p, self.root): info
            for p, info in found.items()
            if info.get("type", "file") != "directory"
        }

    @staticmethod
    def fingerprint(info: dict) -> str:
        """Identity of one stored version of an object, from a listing or ``info`` entry: it
        changes when the object is rewritten (S3: size and ETag; filesystem: size, mtime, inode)."""
        etag = info.get("ETag") or info.get("etag")
        if etag:
            return f"{info.get('size')}:{str(etag).strip(chr(34))}"
        return f"{info.get('size')}:{info.get('mtime')}:{info.get('ino')}"

    def fingerprint_of(self, rel: str) -> str:
        return self.fingerprint(self.fs.info(self.path(rel)))

    def read_ranges(self, rel: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Byte ranges ``[start, end)`` of one file (concurrent requests on an object store); a
        range past the end comes back short."""
        if not ranges:
            return []
        path = self.path(rel)
        if self.is_local:
            with self.fs.open(path, "rb") as f:
                out = []
                for start, end in ranges:
                    f.seek(start)
                    out.append(f.read(end - start))
                return out
        n = len(ranges)
        return self.fs.cat_ranges([path] * n, [a for a, _ in ranges], [b for _, b in ranges], on_error="raise")

    def read_many(self, rels: list[str]) -> dict[str, bytes | Exception]:
        """Several objects at once (concurrent requests on object stores); a failed read is
        returned as its exception, e.g. FileNotFoundError for an object deleted meanwhile."""
        if not rels:
            return {}
        paths = {self.path(r): r for r in rels}
        if any(_glob.has_magic(p) for p in paths):  # fsspec's cat would expand them as patterns
            out: dict[str, bytes | Exception] = {}
            for p, r in paths.items():
                try:
                    out[r] = self.fs.cat_file(p, **self._one_get)
                except Exception as exc:  # noqa: BLE001 - returned, as cat(on_error="return") does
                    out[r] = exc
            return out
        got = self.fs.cat(list(paths), on_error="return", **self._one_get)  # all concurrent
        return {paths[p]: v for p, v in got.items()}

    def walk_files(self, rel: str = "") -> list[str]:
        """All files under ``rel``, as paths relative to the store root, sorted."""
        return sorted(self.files_detail(rel))  # a folder that cannot be listed raises


def _precondition_failed(exc: OSError) -> bool:
    text = str(exc)
    return "PreconditionFailed" in text or "pre-conditions" in text or "412" in text


def _mtime(info: dict) -> float:
    m = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("last_modified")
    if m is None:
        raise OSError(f"{info.get('name')}: the store gives no modification time")
    if hasattr(m, "timestamp"):
        return float(m.timestamp())
    if isinstance(m, str):
        from datetime import datetime

        return datetime.fromisoformat(m.replace("Z", "+00:00")).timestamp()
    return float(m)


def _fsync_dir(path: str) -> None:
    """Make a rename or link in ``path`` durable (the new name survives a power loss)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _flocked(lock_path: str) -> Iterator[None]:
    """An exclusive lock on ``lock_path``, waited for at most ``LOCK_TIMEOUT_S`` (a process stuck
    holding it, or a lock left behind on NFS, must not freeze the caller: TimeoutError)."""
    import fcntl

    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        give_up = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= give_up:
                    raise TimeoutError(
                        errno.ETIMEDOUT, f"another process holds {lock_path} for over {LOCK_TIMEOUT_S:g} s"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


LOCK_TIMEOUT_S = 30.0
