"""The validation split: which scenes a build holds out, decided by scene, deterministically.

A scene is held out when ``u(dataset, scene) < val_fraction``, where ``u`` maps the pair to a number
in [0, 1) through SHA-256. So the choice depends on nothing but the scene's identity and the fraction:
not on the order of discovery, the worker count or the other scenes, and a scene keeps its split
when a dataset grows (raising the fraction only moves scenes from training to validation). All clips
of a held-out scene are validation clips, so no validation clip shares a scene with a training clip.

A dataset with a positive fraction but so few scenes that no hash falls under it (3 scenes at 5 %)
would silently hold out nothing; then its scene with the smallest ``u`` is held out instead, provided
the dataset has at least two scenes (one scene is never taken away from training).

The split is recorded per sample in ``index.parquet`` (``split``: ``train`` | ``val``, beside the
``scene``); the training loader reads only ``train`` samples, validation and ``d4s eval`` the ``val``
ones (docs/MANIFESTS.md, docs/TRAINING.md). It changes no shard byte.
"""

from __future__ import annotations

import hashlib

TRAIN, VAL = "train", "val"


def scene_unit(dataset: str, scene: str) -> float:
    """A uniform-looking number in [0, 1) fixed by (dataset, scene)."""
    h = hashlib.sha256(f"d4s-split\0{dataset}\0{scene}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def validation_scenes(dataset: str, scenes: list[str], fraction: float) -> set[str]:
    """The scenes of ``dataset`` (among ``scenes``) held out for validation at ``fraction``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{dataset}: val_fraction must be in [0, 1), got {fraction}")
    uniq = sorted(set(scenes))
    if fraction <= 0.0 or not uniq:
        return set()
    held = {s for s in uniq if scene_unit(dataset, s) < fraction}
    if not held and len(uniq) >= 2:
        held = {min(uniq, key=lambda s: scene_unit(dataset, s))}
    return held


def split_of_clips(clips: list[dict], fractions: dict[str, float]) -> dict[str, str]:
    """Planned clips (``clip_id``, ``dataset``, ``scene``) -> ``{clip_id: "train" | "val"}``."""
    by_ds: dict[str, list[str]] = {}
    for c in clips:
        by_ds.setdefault(c["dataset"], []).append(c["scene"])
    held = {ds: validation_scenes(ds, scenes, fractions.get(ds, 0.0)) for ds, scenes in by_ds.items()}
    return {c["clip_id"]: VAL if c["scene"] in held[c["dataset"]] else TRAIN for c in clips}
