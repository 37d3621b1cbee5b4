"""Fixture writers: encode a rendered scene in one dataset's exact raw layout.

Each module ``pipeline.demo.writers.<dataset>`` provides:

- ``write(scene: RenderedScene, root: Path, scene_id: str | None = None) -> WrittenScene``
- ``demo_spec(index: int, seed: int) -> SceneSpec``: a tiny scene suited to the dataset
  (its field of view, aspect, static/dynamic nature), used by ``d4s build --demo``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

WRITERS = [
    "tartanair",
    "matrixcity",
    "pointodyssey",
    "dynamic_replica",
    "spring",
    "vkitti2",
    "kubric_movi_f",
    "realestate10k",
    "stereo4d",
]


def writer_module(dataset: str) -> ModuleType:
    if dataset not in WRITERS:
        raise KeyError(f"no fixture writer for {dataset!r}")
    return importlib.import_module(f"pipeline.demo.writers.{dataset}")
