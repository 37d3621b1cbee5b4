"""YAML for configs: safe, a duplicate key is an error (YAML's last-one-wins would silently drop
a setting), and a syntax error is one line naming where."""

from __future__ import annotations

from typing import IO, Any

import yaml


class _UniqueKeys(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader says so below
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (YAML would keep only the last)", key_node.start_mark
                )
        return super().construct_mapping(node, deep)


def load_yaml(text_or_stream: str | IO) -> Any:
    """The document, like ``yaml.safe_load``, refusing duplicate keys."""
    return yaml.load(text_or_stream, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader subclass


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """``<problem> at line L, column C`` (PyYAML's message spans several lines)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}".replace("\n", " ")
