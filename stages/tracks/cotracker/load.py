"""Loading official CoTracker3 checkpoints (``scaled_offline.pth``, ``scaled_online.pth``).

The official state_dict names differ from d4s's module names; :func:`official_key` is the
one exact mapping (d4s name -> official name) and both directions are derived from it.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Mapping

import torch

from .model import CoTracker3, build_model

# (d4s pattern, official replacement); applied in order, first match wins.
_RULES: list[tuple[str, str]] = [
    (r"^encoder\.stem\.", "fnet.conv1."),
    (r"^encoder\.fuse\.", "fnet.conv2."),
    (r"^encoder\.head\.", "fnet.conv3."),
    (r"^encoder\.stages\.(\d)\.first\.proj\.", "fnet.layer{s}.0.downsample.0."),
    (r"^encoder\.stages\.(\d)\.first\.", "fnet.layer{s}.0."),
    (r"^encoder\.stages\.(\d)\.second\.", "fnet.layer{s}.1."),
    (r"^corr_mlp\.", "corr_mlp."),
    (r"^time_emb$", "time_emb"),
    (r"^transformer\.embed\.", "updateformer.input_transform."),
    (r"^transformer\.virtual_tracks$", "updateformer.virual_tracks"),
    (r"^transformer\.time_blocks\.", "updateformer.time_blocks."),
    (r"^transformer\.virtual_self\.", "updateformer.space_virtual_blocks."),
    (r"^transformer\.virtual_from_points\.(\d+)\.attn\.", "updateformer.space_virtual2point_blocks.{0}.cross_attn."),
    (
        r"^transformer\.virtual_from_points\.(\d+)\.norm_ctx\.",
        "updateformer.space_virtual2point_blocks.{0}.norm_context.",
    ),
    (r"^transformer\.virtual_from_points\.", "updateformer.space_virtual2point_blocks."),
    (r"^transformer\.points_from_virtual\.(\d+)\.attn\.", "updateformer.space_point2virtual_blocks.{0}.cross_attn."),
    (
        r"^transformer\.points_from_virtual\.(\d+)\.norm_ctx\.",
        "updateformer.space_point2virtual_blocks.{0}.norm_context.",
    ),
    (r"^transformer\.points_from_virtual\.", "updateformer.space_point2virtual_blocks."),
    (r"^transformer\.flow_head\.", "updateformer.flow_head."),
    (r"^transformer\.vis_conf_head\.", "updateformer.vis_conf_head."),
]


class StateDictMismatch(KeyError):
    """The checkpoint does not match the model; the message lists every problem."""

    def __init__(self, missing: list[str], unexpected: list[str], shapes: list[str]):
        self.missing, self.unexpected, self.shapes = missing, unexpected, shapes
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): " + "; ".join(shapes))
        self.message = "CoTracker3 state_dict does not match the model: " + " | ".join(parts)
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


def official_key(name: str) -> str:
    """The official checkpoint name of a d4s parameter/buffer name."""
    for pat, rep in _RULES:
        m = re.match(pat, name)
        if m:
            groups = m.groups()
            if "{s}" in rep:
                rep = rep.replace("{s}", str(int(groups[0]) + 1))
            elif groups:
                rep = rep.format(*groups)
            return rep + name[m.end() :]
    raise KeyError(f"no official name for d4s key {name!r}")


def key_map(model: CoTracker3) -> dict[str, str]:
    """official name -> d4s name, for every entry of ``model.state_dict()``."""
    out = {}
    for k in model.state_dict():
        ok = official_key(k)
        if ok in out:
            raise RuntimeError(f"two d4s keys map to {ok!r}: {out[ok]!r}, {k!r}")
        out[ok] = k
    return out


def unwrap(sd: Mapping) -> Mapping:
    """Accept a bare state_dict or one wrapped under ``"model"`` (as the official loader does)."""
    if "model" in sd and isinstance(sd["model"], Mapping):
        return sd["model"]
    return sd


def load_official_state_dict(model: CoTracker3, sd: Mapping[str, torch.Tensor]) -> CoTracker3:
    """Copy an official CoTracker3 state_dict into ``model`` (strict).

    Raises :class:`StateDictMismatch` listing missing keys, unexpected keys and shape
    mismatches (all of them, by official name) before touching the model.
    """
    sd = unwrap(sd)
    mapping = key_map(model)
    own = model.state_dict()
    missing = sorted(k for k in mapping if k not in sd)
    unexpected = sorted(k for k in sd if k not in mapping)
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[mapping[k]].shape)}"
        for k in sorted(mapping)
        if k in sd and tuple(sd[k].shape) != tuple(own[mapping[k]].shape)
    ]
    if missing or unexpected or shapes:
        raise StateDictMismatch(missing, unexpected, shapes)
    model.load_state_dict({mapping[k]: v for k, v in sd.items()}, strict=True)
    return model


def export_official_state_dict(model: CoTracker3) -> dict[str, torch.Tensor]:
    """The model's weights under the official names (inverse of :func:`load_official_state_dict`)."""
    return {official_key(k): v.detach().clone() for k, v in model.state_dict().items()}


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(..., map_location="cpu", weights_only=True)`` of a local path or fsspec URL."""
    path = str(path)
    if "://" in path and not path.startswith("file://"):
        import fsspec

        with fsspec.open(path, "rb") as f:
            data = f.read()
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    else:
        if path.startswith("file://"):
            path = path[len("file://") :]
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: checkpoint is a {type(sd).__name__}, expected a state_dict")
    return dict(unwrap(sd))


def infer_variant(sd: Mapping[str, torch.Tensor]) -> str:
    """``"offline"`` or ``"online"`` from the length of the stored temporal embedding."""
    te = unwrap(sd).get("time_emb")
    if te is None:
        raise StateDictMismatch(["time_emb"], [], [])
    return "offline" if te.shape[1] == 60 else "online" if te.shape[1] == 16 else f"window{te.shape[1]}"


def load_model(checkpoint: str | Path, variant: str | None = None, attn_impl: str = "sdpa") -> CoTracker3:
    """Build the variant (inferred from the checkpoint if None) and load the checkpoint."""
    sd = read_checkpoint(checkpoint)
    found = infer_variant(sd)
    variant = variant or found
    if variant != found:
        raise ValueError(f"{checkpoint}: checkpoint is the {found} model, asked for {variant}")
    model = build_model(variant, attn_impl=attn_impl)
    return load_official_state_dict(model, sd)
