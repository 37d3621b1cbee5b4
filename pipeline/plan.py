"""Deterministic planning: scenes -> clips -> shards.

The plan depends only on the dataset contents and the planning fields of the config, never on
worker count or timing: datasets in name order, scenes in id order, clips by start frame, and
shards are consecutive runs of ``shard_size`` clips of one dataset (per-dataset shards let the
trainer weight datasets by choosing shards). Clip ids are ``dataset__scene__start`` with the
scene id made key-safe; a collision after that mapping is a planning error, never a silent merge.

Datasets with a scene pass (``pipeline.stage_routes.whole_scene_shards``) get shards that hold
whole scenes: scenes are added in order while the shard has room for all of a scene's clips; a
scene never splits, so a scene with more clips than ``shard_size`` fills a shard of its own (cap
it with ``max_clips_per_scene``). Each scene pass then runs in exactly one shard pipeline, and
a shard that is redone redoes only its own scenes.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from pipeline.clip import ClipError
from pipeline.config import BuildConfig, ConfigError
from pipeline.failures import is_transient
from pipeline.stage_routes import stage_names, whole_scene_shards
from stages.ingest import adapter_for_dataset
from stages.ingest.base import SceneRef

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def key_safe(scene: str) -> str:
    """Scene id to a key fragment: no dots, no slashes (webdataset splits keys at dots)."""
    s = _UNSAFE.sub("-", scene.replace("/", "-")).strip("-")
    return s.replace("__", "_-")  # '__' separates key fields


def utf8_text(text: str) -> str:
    """``text`` as UTF-8 can hold it: the bytes of a file name that are not UTF-8 (which Python
    keeps as lone surrogates) written as ``\\xNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name gives
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def recordable(sc: SceneRef, where) -> SceneRef:
    """A scene that the manifests (Parquet: UTF-8 strings) can record. One whose id holds a file
    name that is not UTF-8 is planned under its id with those bytes escaped (``demo\\xffenv/...``),
    as a scene with the problem ``file name is not UTF-8``: its clip fails at ingest, recorded like
    any unreadable scene (a UTF-8 name is the only one that is the same on every store and
    reader). ``where(scene)``: the scene's location, for the record."""
    try:
        sc.scene.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = sc.scene.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = sc.scene.encode("utf-8", "backslashreplace")
        return SceneRef(
            sc.dataset, utf8_text(sc.scene), 0, problem=(f"file name is not UTF-8: {raw!r}", utf8_text(where(sc.scene)))
        )
    if sc.problem:
        return dataclasses.replace(sc, problem=tuple(utf8_text(str(p)) for p in sc.problem))
    return sc


def clip_id(dataset: str, scene: str, start: int) -> str:
    return f"{dataset}__{key_safe(scene)}__{start:06d}"


def clip_starts(num_frames: int, length: int, stride: int, clip_stride: int) -> list[int]:
    span = (length - 1) * stride + 1
    return list(range(0, num_frames - span + 1, clip_stride)) if num_frames >= span else []


@dataclass
class Plan:
    scenes: list[dict]
    clips: list[dict]
    shards: list[dict]
    scene_refs: dict = field(default_factory=dict)  # (dataset, scene) -> SceneRef; not persisted


def make_plan(cfg: BuildConfig) -> Plan:
    cfg = cfg.resolved()
    scenes_out, clips_out, shards_out = [], [], []
    scene_refs = {}
    ordinal = 0
    for name in sorted(cfg.datasets):
        ds = cfg.datasets[name]
        if not ds.enabled:
            continue
        adapter = adapter_for_dataset(name, ds)
        try:
            scenes = adapter.discover()
        except FileNotFoundError as exc:
            raise ConfigError(f"dataset {name}: root {ds.root} not readable ({exc})") from None
        except ClipError as exc:  # a file that lists the whole dataset: its one clip fails with it
            scenes = [SceneRef(name, "unreadable", 0, problem=(exc.reason, exc.path or ds.root))]
        except OSError as exc:  # a folder or file not tied to one scene: the plan would miss scenes
            if is_transient(exc):
                raise
            why = f"{type(exc).__name__}: {exc.strerror or exc}"
            raise ConfigError(f"dataset {name}: discovery cannot read {exc.filename or ds.root} ({why})") from None
        scenes = [recordable(sc, adapter.where) for sc in scenes]
        if not scenes:
            raise ConfigError(f"dataset {name}: no scenes found under {ds.root} (see docs/DATASETS.md for the layout)")
        if ds.max_scenes:
            scenes = scenes[: ds.max_scenes]
        seen: dict[str, str] = {}
        by_scene: list[list[dict]] = []
        for sc in scenes:
            scene_refs[(name, sc.scene)] = sc
            starts = clip_starts(sc.num_frames, ds.clip_length, ds.frame_stride, ds.clip_stride)
            if ds.max_clips_per_scene:
                starts = starts[: ds.max_clips_per_scene]
            note = (
                ""
                if starts
                else f"only {sc.num_frames} frames, a clip needs {(ds.clip_length - 1) * ds.frame_stride + 1}"
            )
            if sc.problem:  # unreadable at discovery: one clip, failed at ingest with the reason
                starts, note = [0], f"unreadable: {sc.problem[0]} ({sc.problem[1]})"
            scenes_out.append(
                {
                    "dataset": name,
                    "scene": sc.scene,
                    "num_frames": sc.num_frames,
                    "num_clips": len(starts),
                    "note": note,
                }
            )
            for s in starts:
                cid = clip_id(name, sc.scene, s)
                if cid in seen:
                    raise ConfigError(
                        f"dataset {name}: scenes {seen[cid]!r} and {sc.scene!r} map to the same clip id {cid}"
                    )
                seen[cid] = sc.scene
            by_scene.append(
                [
                    {
                        "clip_id": clip_id(name, sc.scene, s),
                        "dataset": name,
                        "scene": sc.scene,
                        "start": s,
                        "frames": [s + i * ds.frame_stride for i in range(ds.clip_length)],
                    }
                    for s in starts
                ]
            )
        for k, group in enumerate(shard_groups(by_scene, cfg.shard_size, whole_scene_shards(cfg, name))):
            sid = f"{name}-{k:06d}"
            for c in group:
                c["shard_id"] = sid
                c["ordinal"] = ordinal
                ordinal += 1
                clips_out.append(c)
            shards_out.append(
                {
                    "shard_id": sid,
                    "dataset": name,
                    "path": f"shards/{name}/{sid}.tar",
                    "num_clips": len(group),
                    "clip_ids": [c["clip_id"] for c in group],
                }
            )
    return Plan(scenes_out, clips_out, shards_out, scene_refs)


def shard_groups(by_scene: list[list[dict]], shard_size: int, whole_scenes: bool) -> list[list[dict]]:
    """Clips (grouped per scene, in plan order) cut into shards: runs of ``shard_size`` clips, or,
    with ``whole_scenes``, runs of whole scenes holding at most ``shard_size`` clips (a bigger
    scene alone)."""
    if not whole_scenes:
        flat = [c for sc in by_scene for c in sc]
        return [flat[k : k + shard_size] for k in range(0, len(flat), shard_size)]
    out: list[list[dict]] = []
    cur: list[dict] = []
    for sc in by_scene:
        if cur and len(cur) + len(sc) > shard_size:
            out.append(cur)
            cur = []
        cur = cur + sc
    if cur:
        out.append(cur)
    return out


def stages_for(cfg: BuildConfig, dataset: str) -> list[str]:
    """The stages a clip of ``dataset`` passes through, in order (``pipeline/stage_routes.py``)."""
    return stage_names(cfg, dataset)
