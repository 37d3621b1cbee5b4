"""Validation errors of the typed configs as one line a user can act on: the field path, what is
wrong, and what is allowed.

Pydantic says "Extra inputs are not permitted" for a misspelt key and lists the literals for a
bad enumeration value; neither names a close match. :func:`describe` turns one pydantic error
into ``(path, message)``, looking up the allowed field names or values in the model's own type
annotations (so the list can never drift from the model), with a "did you mean" from
:mod:`difflib`. :class:`FieldError` lets a validator that checks several fields at once (an
adapter's options, a routing that does not fit the dataset) report the exact path too.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ValidationError


class FieldError(ValueError):
    """A problem with the field at ``loc`` found by a validator above it (path kept for the message)."""

    def __init__(self, loc: tuple, message: str):
        self.loc = tuple(loc)
        self.message = message
        super().__init__(f"{dotted(self.loc)}: {message}")


def dotted(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _unwrap(ann: Any) -> Any:
    """Strip ``Annotated`` and ``Optional``; of a union keep the one model / container member."""
    while True:
        origin = typing.get_origin(ann)
        if origin is typing.Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(ann) if a is not type(None)]
            rich = [a for a in members if _is_model(a) or typing.get_origin(a) in (dict, list, tuple, Literal)]
            ann = (rich or members)[0] if len(rich) <= 1 else rich[0]
        else:
            return ann


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def _child(ann: Any, part: Any) -> Any:
    """The annotation of ``part`` (field name, dict key, list index) inside ``ann``, or None."""
    ann = _unwrap(ann)
    if _is_model(ann):
        f = ann.model_fields.get(part) if isinstance(part, str) else None
        return f.annotation if f else None
    origin = typing.get_origin(ann)
    if origin is dict:
        return typing.get_args(ann)[0 if part == "[key]" else 1]
    if origin in (list, tuple) and isinstance(part, int):
        args = typing.get_args(ann)
        return (
            args[0]
            if origin is list or (len(args) == 2 and args[1] is Ellipsis)
            else (args[part] if part < len(args) else None)
        )
    return None


def annotation_at(model: type[BaseModel], loc: tuple) -> Any:
    """The type annotation at ``loc`` inside ``model`` (None where the path leaves the model)."""
    ann: Any = model
    for part in loc:
        ann = _child(ann, part)
        if ann is None:
            return None
    return ann


def _choices(ann: Any) -> list | None:
    ann = _unwrap(ann) if ann is not None else None
    if typing.get_origin(ann) is Literal:
        return list(typing.get_args(ann))
    return None


def _did_you_mean(bad: Any, allowed: list) -> str:
    close = difflib.get_close_matches(str(bad), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe(err: dict, model: type[BaseModel]) -> tuple[tuple, str]:
    """One pydantic error of validating ``model`` as ``(path, message)``."""
    loc = tuple(err["loc"])
    ctx = err.get("ctx") or {}
    if isinstance(ctx.get("error"), FieldError):  # raised with its own (absolute) path
        return ctx["error"].loc, ctx["error"].message
    if err["type"] == "extra_forbidden" and loc:
        parent = _unwrap(annotation_at(model, loc[:-1]))
        if _is_model(parent):
            allowed = list(parent.model_fields)
            return loc, (f"unknown field {loc[-1]!r}{_did_you_mean(loc[-1], allowed)}; allowed: {', '.join(allowed)}")
    if err["type"] == "literal_error":
        if loc and loc[-1] == "[key]":  # a mapping's key: loc is (..., mapping, bad key, "[key]")
            path, bad, what = loc[:-1], loc[-2], "key"
            choices = _choices(annotation_at(model, loc[:-2] + ("[key]",)))
        else:
            path, bad, what = loc, err.get("input"), "value"
            choices = _choices(annotation_at(model, loc))
        if choices:
            return path, (
                f"{what} {bad!r} is not allowed{_did_you_mean(bad, choices)}; "
                f"allowed: {', '.join(repr(c) for c in choices)}"
            )
    msg = err["msg"]
    if err["type"] == "value_error" and msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return loc, msg


def one_line(exc: ValidationError, model: type[BaseModel], what: str = "config") -> str:
    """The first error of ``exc`` as ``<what> error at <path>: <message> (and N more)``."""
    loc, msg = describe(exc.errors()[0], model)
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{what} error at {dotted(loc) or '<root>'}: {msg}{more}"
