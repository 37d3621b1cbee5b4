"""The declared contract of every stage: what it reads, what it writes, what it runs on.

The runner assembles the DAG from these declarations (``pipeline/dag.py``), and
docs/STAGES.md is generated from the same table, so the documentation cannot drift from the
code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageContract:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    runs_as: str  # "task" (stateless CPU) or "actor" (model held in memory, with its stage's declared resources)
    acts_when: str  # when the stage changes a clip; otherwise the clip passes through unchanged
    errors: str  # what fails a clip here
