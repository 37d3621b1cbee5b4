"""A trained model from a checkpoint, for ``d4s eval`` and ``d4s generate``.

``CKPT`` is a checkpoint file (``step-*.pt`` with optimiser state, or ``best.pt`` with weights only) or a
training workdir (its ``ckpt/best.pt`` when validation kept one, else its latest checkpoint). The model
is rebuilt from the config stored in the checkpoint and its weights loaded strictly. Refused, each with
one clear :class:`CheckpointError`:

* a file holding anything but tensors and plain values: it is loaded with ``weights_only=True``, so no
  code from the file runs;
* a file that is not a d4s checkpoint (no ``model`` / ``config``), or whose weights do not fit its config;
* a checkpoint of another model than an expected config (``expect``: the backbone and LDRM fields that
  shape the weights must agree);
* a checkpoint trained from ``backbone.pretrained_dir`` when that directory is gone (the layout of a
  pretrained backbone is read from it; an ``expect`` config's ``pretrained_dir`` names another copy).
"""

from __future__ import annotations

import os
import pickle

import torch

from training.config import TrainConfig

# Config fields that do not change the weights' shapes (a checkpoint is comparable across them).
_NOT_SHAPING = {
    "backbone": {
        "pretrained_dir",
        "text_encoder_dir",
        "caption_dropout",
        "text_cache_size",
        "freeze_vae",
        "vae_precision",
    },
    "ldrm": {
        "clean_latent_prob",
        "clean_first_latent",
        "prune_opacity",
        "depth_min",
        "depth_max",
        "scale_min",
        "scale_max_rel",
        "birth_frame_stride",
    },
}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class CheckpointError(ValueError):
    """Why a checkpoint cannot be used; one line for the CLI."""


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file, or a workdir's best (else latest) checkpoint."""
    from training.trainer import _fs, _join, latest_checkpoint

    fs, p = _fs(path)
    if not fs.exists(p):
        raise CheckpointError(f"{path}: no such checkpoint or training workdir")
    if fs.isdir(p):
        best = _join(path, "ckpt", "best.pt")
        if _fs(best)[0].exists(_fs(best)[1]):
            return best
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"{path}: a directory without ckpt/best.pt or ckpt/latest: not a training workdir with a checkpoint"
            )
        return latest
    return path


def read_checkpoint(path: str) -> dict:
    """The checkpoint's dict, loaded with ``weights_only=True`` (module docs)."""
    from training.trainer import load_checkpoint

    try:
        state = load_checkpoint(path)
    except pickle.UnpicklingError as exc:
        lines = [x.strip() for x in str(exc).splitlines() if "GLOBAL" in x]
        if not lines:  # not the weights_only refusal of an object: bytes that are no pickle at all
            bad = [x.strip() for x in str(exc).splitlines() if "Unsupported" in x or "load key" in x]
            raise CheckpointError(
                f"{path}: not a d4s checkpoint: not a readable torch file ({(bad or [type(exc).__name__])[0][:200]})"
            ) from None
        first = lines[0][:200]
        raise CheckpointError(
            f"{path}: refused: it holds objects other than tensors and plain values, and d4s loads "
            f"checkpoints with weights_only=True so that no code from a file runs ({first})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load of a file of other bytes raises anything (KeyError, ...)
        raise CheckpointError(
            f"{path}: not a d4s checkpoint: not a readable torch file ({type(exc).__name__}: {str(exc).strip()[:200]})"
        ) from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        keys = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a d4s training checkpoint (needs 'model' and 'config'; has {keys})")
    return state


def shaping_differences(a: TrainConfig, b: TrainConfig) -> list[str]:
    """The fields that shape the weights and differ between two configs, as 'section.field: a vs b'."""
    out = []
    for section in ("backbone", "ldrm"):
        da, db = getattr(a, section).model_dump(), getattr(b, section).model_dump()
        for k in sorted(set(da) | set(db)):
            if k in _NOT_SHAPING[section] or da.get(k) == db.get(k):
                continue
            if section == "backbone" and k in ("vae", "transformer") and a.backbone.pretrained_dir:
                continue  # a pretrained backbone's layout comes from its directory, not these fields
            out.append(f"{section}.{k}: {da.get(k)} vs {db.get(k)}")
    fa = max((s.num_frames for s in a.stages), default=13)
    fb = max((s.num_frames for s in b.stages), default=13)
    if fa != fb:  # the deformation head has one output group per frame of the longest stage
        out.append(f"longest stage's num_frames: {fa} vs {fb}")
    return out


def load_model(path: str, device: torch.device | str = "cpu", expect: TrainConfig | None = None):
    """(model in eval mode on ``device``, its TrainConfig, info dict with ``checkpoint`` and ``step``)."""
    from training.model import Diff4Splat

    path = resolve_checkpoint(path)
    state = read_checkpoint(path)
    try:
        cfg = TrainConfig.model_validate(state["config"])
    except Exception as exc:  # noqa: BLE001 - pydantic's message says what is wrong
        raise CheckpointError(f"{path}: its stored config is not a valid training config: {exc}") from None
    if expect is not None:
        diff = shaping_differences(cfg, expect)
        if diff:
            raise CheckpointError(
                f"{path}: a checkpoint of another model than the given config (checkpoint vs config: "
                + "; ".join(diff[:6])
                + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
                + ")"
            )
    if expect is not None and expect.backbone.pretrained_dir:  # the caller's copy of the pretrained backbone
        cfg = cfg.model_copy(
            update={"backbone": cfg.backbone.model_copy(update={"pretrained_dir": expect.backbone.pretrained_dir})}
        )
    pre = cfg.backbone.pretrained_dir
    if pre and "://" not in pre and not os.path.isdir(pre):
        raise CheckpointError(
            f"{path}: trained from backbone.pretrained_dir {pre}, which is not here; the backbone's "
            "layout is read from it: give --config with backbone.pretrained_dir naming a copy"
        )
    torch.manual_seed(0)
    device = torch.device(device)
    # built on the target device when nothing is read from a pretrained directory: a 2B model initialises
    # in seconds on a GPU, minutes on a CPU (the weights are overwritten anyway)
    with torch.device(device) if device.type == "cuda" and not pre else _nothing():
        model = Diff4Splat(cfg)
    own, saved = model.state_dict(), state["model"]
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [
        f"{k}: {tuple(saved[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in saved and torch.is_tensor(saved[k]) and tuple(saved[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"{path}: its weights do not fit its config ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(shapes)} of another shape"
            + (f"; e.g. missing {missing[0]}" if missing else "")
            + (f"; e.g. unexpected {unexpected[0]}" if unexpected else "")
            + (f"; e.g. {shapes[0]}" if shapes else "")
            + ")"
        )
    model.load_state_dict(saved, strict=True)
    model = model.to(device).eval()
    return model, cfg, {"checkpoint": path, "step": int(state.get("step", 0))}
