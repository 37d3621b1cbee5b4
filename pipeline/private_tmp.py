"""Node-local scratch folders that other users of the node cannot reach.

A fixed name in the shared temporary directory (``/tmp/d4s-megasam``) can be made in advance by
another user, world-writable or as a symbolic link: then they pick our file names, read our logs,
or swap our inputs and outputs in the middle of a run. Each user gets their own folder
(``<tmp>/<name>-<uid>``), created mode 0700 and checked before use: a link, another owner or a
folder that others may write is refused, naming it."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class UnsafeScratchError(OSError):
    """A scratch folder another user could tamper with."""


def private_temp_dir(name: str) -> Path:
    """``<tmp>/<name>-<uid>``, made if missing, checked to be this user's alone."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    path = Path(tempfile.gettempdir()) / f"{name}-{uid}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    why = None
    if stat.S_ISLNK(st.st_mode):
        why = "is a symbolic link"
    elif not stat.S_ISDIR(st.st_mode):
        why = "is not a folder"
    elif hasattr(os, "getuid") and st.st_uid != uid:
        why = f"belongs to another user (uid {st.st_uid})"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        why = f"may be written by other users (mode {stat.S_IMODE(st.st_mode):o})"
    if why:
        raise UnsafeScratchError(
            f"scratch folder {path} {why}: another user could read or replace what d4s writes there; "
            "remove it (or set TMPDIR to a private folder) and run again"
        )
    return path
