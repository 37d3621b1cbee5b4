"""Locations must not carry credentials: ``https://user:password@host/...`` (fsspec accepts it)
would be copied into ``config.resolved.yaml`` next to the output, and every error that repeats
the location (a checkpoint that does not load, a root that does not list) would carry it into the
driver's output and Ray's log files, which other users of a node can read. Such a location is
refused where it is given, naming where it was found but never the secret; object-store and
HTTP credentials come from the environment of every process instead (docs/CLUSTER.md)."""

from __future__ import annotations

import re
from typing import Any, Iterator

# scheme://userinfo@ at the start of a URL or of one part of a chained fsspec URL (a::b::c)
_USERINFO = re.compile(r"(?:^|::)[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*@")

ADVICE = (
    "a URL with a user name or password in it would be written to config.resolved.yaml and the logs; "
    "give credentials by the environment instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE "
    "for s3://, ~/.netrc for http(s)://; docs/CLUSTER.md)"
)


def has_credentials(value: str) -> bool:
    """Whether ``value`` is a URL (or chained fsspec URL) with a user-info part."""
    return bool(_USERINFO.search(value.strip()))


def find_credentials(raw: Any, loc: tuple = ()) -> Iterator[tuple]:
    """The path of every string inside ``raw`` (nested mappings and lists, as a config is read)
    that is a URL with credentials."""
    if isinstance(raw, str):
        if has_credentials(raw):
            yield loc
    elif isinstance(raw, dict):
        for k, v in raw.items():
            yield from find_credentials(v, (*loc, k))
    elif isinstance(raw, (list, tuple)):
        for i, v in enumerate(raw):
            yield from find_credentials(v, (*loc, i))


def refuse_credentials(raw: Any) -> Any:
    """A config's raw input, unchanged, or a ``FieldError`` at the first location with credentials
    (the "before" validator of the build and the training configs)."""
    from pipeline.config_errors import FieldError

    for loc in find_credentials(raw):
        raise FieldError(loc, ADVICE)
    return raw
