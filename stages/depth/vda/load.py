"""Loading official Video Depth Anything checkpoints.

Official files (``video_depth_anything_{vits,vitb,vitl}.pth``, ``metric_video_depth_anything_*.pth``)
are plain state_dicts whose keys equal :class:`~stages.depth.vda.model.VideoDepthAnything`'s, so
the mapping is the identity; what this module adds is a strict check with a readable error and
safe (``weights_only``) loading from local paths or fsspec URLs.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .model import VideoDepthAnything, build_vda_empty

_PREFIXES = ("module.", "model.")  # wrappers some tools add around a state_dict


class CheckpointMismatchError(ValueError):
    """The state_dict does not fit the model: names or shapes differ."""

    def __init__(self, missing: list[str], unexpected: list[str], shape_errors: list[str]):
        self.missing, self.unexpected, self.shape_errors = missing, unexpected, shape_errors

        def show(items: list[str], n: int = 12) -> str:
            more = f", ... (+{len(items) - n} more)" if len(items) > n else ""
            return ", ".join(items[:n]) + more

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {show(unexpected)}")
        if shape_errors:
            parts.append(f"{len(shape_errors)} shape mismatches: {show(shape_errors)}")
        super().__init__("checkpoint does not match the VDA model: " + "; ".join(parts))


def _strip_wrappers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    for pre in _PREFIXES:
        if sd and all(k.startswith(pre) for k in sd):
            sd = {k[len(pre) :]: v for k, v in sd.items()}
    return sd


def load_official_state_dict(model: VideoDepthAnything, state_dict: Mapping[str, torch.Tensor]) -> VideoDepthAnything:
    """Copy an official state_dict into ``model`` (exact key match, shapes checked).

    Raises :class:`CheckpointMismatchError` (a ValueError) listing missing keys, unexpected keys
    and shape mismatches; nothing is copied in that case.
    """
    sd = _strip_wrappers(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        err = CheckpointMismatchError(missing, unexpected, shapes)
        try:
            found = infer_encoder(sd)
        except (KeyError, ValueError):
            found = None
        if found is not None and found != getattr(model, "encoder", found):
            err.args = (f"{err.args[0]} (the checkpoint holds encoder {found!r}, the model is {model.encoder!r})",)
        raise err
    model.load_state_dict(sd, strict=True)
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.load(..., weights_only=True)`` of a local path or an fsspec URL (s3://, gs://, https://...)."""
    p = str(path)
    if "://" in p and not p.startswith("file://"):
        import fsspec

        with fsspec.open(p, "rb") as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    else:
        # mmap: the tensors are read from the file as they are copied into the model, not first
        # into a second 1.3 GB copy (vitl); files in torch's legacy format cannot be mapped
        local = p.removeprefix("file://")
        obj = torch.load(local, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(local))
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{p}: expected a state_dict, got {type(obj).__name__}")
    return dict(obj)


def infer_encoder(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Encoder size from a state_dict (embedding width and depth)."""
    sd = _strip_wrappers(state_dict)
    dim = int(sd["pretrained.cls_token"].shape[-1])
    depth = len({k.split(".")[2] for k in sd if k.startswith("pretrained.blocks.")})
    for name, cfg in {"vits": (384, 12), "vitb": (768, 12), "vitl": (1024, 24)}.items():
        if (dim, depth) == cfg:
            return name
    raise ValueError(f"state_dict has an unknown encoder (dim {dim}, depth {depth})")


def load_checkpoint(path: str | Path, encoder: str | None = None, metric: bool | None = None) -> VideoDepthAnything:
    """Build the model that fits the checkpoint at ``path`` and load it (eval mode, CPU).

    ``encoder`` defaults to what the weights say; ``metric`` defaults to whether the file name
    starts with ``metric_`` (the official naming; the weights alone cannot tell).
    """
    sd = read_state_dict(path)
    enc = encoder or infer_encoder(sd)
    if metric is None:
        metric = Path(str(path).rstrip("/")).name.startswith("metric")
    # every weight comes from the file (load_official_state_dict refuses missing keys), so the
    # default initialisation would only be overwritten
    return load_official_state_dict(build_vda_empty(enc, metric=metric), sd)
