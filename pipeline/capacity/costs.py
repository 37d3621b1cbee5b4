"""The per-frame costs file behind ``d4s plan`` (``costs.yaml`` beside this module): its schema
(pydantic, so a missing or malformed field is named by its path when the file is loaded, before
any planning) and the reading of figures from it.

Every figure in the file names the benchmark it comes from. A figure written as
``{value: X, assumed: "why"}`` is not a measurement: reading it through :meth:`Costs.figure`
records the note, and the report lists every assumption it used (and only those).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from pipeline.config import ConfigError, ModelDtype, TrackerVariant, VDAEncoder, read_text_file
from pipeline.config_errors import describe, dotted

COSTS_PATH = Path(__file__).with_name("costs.yaml")


class CostsError(ConfigError):
    """A costs file that is missing a field or holds a bad value (printed as one line by the CLI)."""


class Figure(BaseModel):
    """One number of the costs file; ``assumed`` says why it is not a measurement (None: measured)."""

    model_config = ConfigDict(frozen=True)

    value: float
    assumed: str | None = None


def _figure(zero_ok: bool):
    def parse(v: Any) -> Any:
        if isinstance(v, Figure):
            return v
        note = None
        if isinstance(v, dict):
            if "value" not in v or set(v) - {"value", "assumed"}:
                raise ValueError(f"must be a number or {{value: number, assumed: why}}, got {v!r}")
            note, v = v.get("assumed"), v["value"]
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not math.isfinite(v)
            or v < 0
            or (v == 0 and not zero_ok)
        ):
            raise ValueError(f"must be a {'non-negative' if zero_ok else 'positive'} number, got {v!r}")
        return Figure(value=float(v), assumed=note)

    return parse


def _hw(v: Any) -> Any:
    if not (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)
    ):
        raise ValueError(f"must be [height, width] in pixels, got {v!r}")
    return tuple(v)


def _point(v: Any) -> Any:
    if not (
        isinstance(v, (list, tuple))
        and len(v) == 2
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in v)
    ):
        raise ValueError(f"must be [pixels, bytes_per_pixel] (positive numbers), got {v!r}")
    return (float(v[0]), float(v[1]))


Positive = Annotated[Figure, BeforeValidator(_figure(zero_ok=False))]
NonNegative = Annotated[Figure, BeforeValidator(_figure(zero_ok=True))]
HW = Annotated[tuple[int, int], BeforeValidator(_hw)]
CurvePoint = Annotated[tuple[float, float], BeforeValidator(_point)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowSplit(_Strict):
    """Profile of one VDA call: per-distinct-frame (encoder) vs per-window-frame (temporal head) time."""

    encoder_s: Positive
    encoder_frames: Positive
    temporal_s: Positive
    temporal_window_frames: Positive


class ResolutionPoint(_Strict):
    hw: HW
    frames_per_s: Positive


class DepthCosts(_Strict):
    reference_hw: HW
    reference_video_frames: Positive
    frames_per_s: dict[VDAEncoder, dict[ModelDtype, Positive]] = Field(min_length=1)
    frames_per_s_compiled: dict[VDAEncoder, dict[ModelDtype, Positive]] = {}
    window_split: WindowSplit
    resolution_points: list[ResolutionPoint] = Field(min_length=2)

    @field_validator("resolution_points")
    @classmethod
    def _two_sizes(cls, v: list[ResolutionPoint]) -> list[ResolutionPoint]:
        if len({p.hw[0] * p.hw[1] for p in v}) < 2:
            raise ValueError("needs two different sizes")
        return v


class TrackCosts(_Strict):
    model_hw: HW
    point_frames_per_s: dict[TrackerVariant, dict[ModelDtype, Positive]] = Field(min_length=1)


class MegasamCosts(_Strict):
    gpu_s_per_frame: Positive


class CpuStageMs(_Strict):
    ingest: NonNegative
    encode: NonNegative
    write: NonNegative


class CpuCosts(_Strict):
    reference_hw: HW
    ms_per_frame: CpuStageMs
    align_ms_per_frame: NonNegative


class OutputCosts(_Strict):
    jpeg_quality: int = Field(ge=1, le=100)
    depth_png_level: int = Field(ge=0, le=9)
    rgb_bytes_per_pixel: list[CurvePoint] = Field(min_length=1)
    depth_bytes_per_pixel: list[CurvePoint] = Field(min_length=1)
    track_bytes_per_point_frame: NonNegative
    meta_bytes_per_clip: NonNegative
    tar_bytes_per_entry: NonNegative
    tar_bytes_per_shard: NonNegative


class DatasetNominal(_Strict):
    """A release's nominal frame size and ground-truth tracks per clip, for when no data is read."""

    hw: HW
    gt_tracks: NonNegative
    source: str = ""
    assumed: str | None = None


class CostsFile(_Strict):
    gpu: str | None = None
    depth: DepthCosts
    tracks: TrackCosts
    megasam: MegasamCosts
    cpu: CpuCosts
    output: OutputCosts
    datasets: dict[str, DatasetNominal]

    @field_validator("datasets")
    @classmethod
    def _known(cls, v: dict[str, DatasetNominal]) -> dict[str, DatasetNominal]:
        from stages.ingest import ADAPTERS

        unknown = sorted(set(v) - set(ADAPTERS))
        if unknown:
            raise ValueError(f"unknown dataset(s) {unknown}; known: {sorted(ADAPTERS)}")
        return v


def _error(exc: ValidationError, source: str) -> CostsError:
    err = exc.errors()[0]
    loc, msg = describe(err, CostsFile)
    what = " is missing" if err["type"] == "missing" else f": {msg}"
    return CostsError(f"costs file {source}: field '{dotted(loc)}'{what}")


class Costs:
    """A validated costs file. ``used_notes`` collects the notes of unmeasured figures that were read."""

    def __init__(self, raw: Any, source: str):
        self.source = source
        if not isinstance(raw, dict):
            raise CostsError(f"costs file {source}: expected a YAML mapping at the top level")
        try:
            self.file = CostsFile.model_validate(raw)
        except ValidationError as exc:
            raise _error(exc, source) from None
        self.used_notes: list[str] = []

    def note(self, text: str) -> None:
        if text not in self.used_notes:
            self.used_notes.append(text)

    def figure(self, path: str, required: bool = True) -> float | None:
        """The number at ``path`` (``"depth.frames_per_s.vitl.fp16"``); an assumed one is noted."""
        node: Any = self.file
        for part in path.split("."):
            if isinstance(node, BaseModel) and part in type(node).model_fields:
                node = getattr(node, part)
            elif isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                if required:
                    raise CostsError(f"costs file {self.source}: field '{path}' is missing")
                return None
        if not isinstance(node, Figure):  # pragma: no cover - a wrong path in the code, not in the file
            raise TypeError(f"{path} is not a figure of the costs file")
        if node.assumed:
            self.note(f"{path} = {node.value:g} is an assumption, not a measurement: {node.assumed}")
        return node.value

    def nominal(self, dataset: str) -> tuple[tuple[int, int], int, str]:
        """(image size, ground-truth tracks per clip, source) of a release, when its data is not read."""
        entry = self.file.datasets.get(dataset)
        if entry is None:
            raise CostsError(
                f"costs file {self.source}: field 'datasets.{dataset}' is missing (needed when the data "
                f"cannot be read or for a projection from counts)"
            )
        if entry.assumed:
            self.note(f"datasets.{dataset}: {entry.assumed} (an assumption, not read from data)")
        return entry.hw, int(self.figure(f"datasets.{dataset}.gt_tracks")), entry.source


def load_costs(costs: str | Path | dict | None = None) -> Costs:
    """The costs file (default: ``costs.yaml`` beside this module), a path to another, or a dict."""
    if isinstance(costs, dict):
        return Costs(costs, "<dict>")
    path = Path(costs) if costs is not None else COSTS_PATH
    from pipeline.yaml_load import yaml_error_line

    try:
        raw = yaml.safe_load(read_text_file(str(path), "costs file"))
    except ConfigError as exc:
        raise CostsError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise CostsError(f"costs file {path} is not valid YAML: {yaml_error_line(exc)}") from None
    return Costs(raw, str(path))
