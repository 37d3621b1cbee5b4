"""What to tell a user whose store cannot be used: one line, not a traceback.

Two causes have nothing to do with the data or the code: no credentials were found (botocore looks
in the environment, the shared files, the profile and the instance metadata; the store is never
contacted, so trying again cannot help), and an endpoint where nothing answers. Any command that
reaches an ``s3://`` location may meet either, on the driver; the CLI turns both into one line
(``pipeline/cli.py``), naming what to set (docs/CLUSTER.md, "Object storage"). So is a location
the command may not read (a PermissionError on a local folder, an object store's access denied),
named with its path.
"""

from __future__ import annotations

_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_NO_ANSWER = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ReadTimeoutError"}


def _chain(exc: BaseException, depth: int = 0):
    """``exc`` and what it wraps (``__cause__``, ``__context__``, a Ray error's ``cause``)."""
    if exc is None or depth > 10:
        return
    yield exc
    for nxt in (getattr(exc, "cause", None), exc.__cause__, exc.__context__):
        if isinstance(nxt, BaseException) and nxt is not exc:
            yield from _chain(nxt, depth + 1)


def store_problem(exc: BaseException) -> str | None:
    """The one line for ``exc`` when it is, or wraps, an object store without credentials or
    without an answer; None otherwise (the exception is the caller's to handle or raise)."""
    for e in _chain(exc):
        names = {c.__name__ for c in type(e).__mro__}
        first = (str(e).strip().splitlines() or [""])[0][:300]
        if names & _NO_CREDENTIALS:
            return (
                f"no credentials for the object store ({type(e).__name__}: {first}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a credentials file on this machine (docs/CLUSTER.md, "
                '"Object storage")'
            )
        if names & _NO_ANSWER:
            return (
                f"the object store did not answer ({type(e).__name__}: {first}); check its endpoint "
                "(AWS_ENDPOINT_URL) and the network, then try again"
            )
        if isinstance(e, PermissionError):
            where = f"{e.filename}: " if e.filename else ""
            return (
                f"permission denied: {where}{e.strerror or first}; give this user (or these credentials) access to it"
            )
    return None
