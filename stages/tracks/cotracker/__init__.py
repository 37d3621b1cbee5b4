"""CoTracker3 (offline and online) for d4s: model, official-checkpoint loading, predictors,
parity against the official implementation and the track-stage runner."""

from .load import StateDictMismatch, load_model, load_official_state_dict, read_checkpoint
from .model import CoTracker3, build_model

__all__ = [
    "CoTracker3",
    "StateDictMismatch",
    "build_model",
    "load_model",
    "load_official_state_dict",
    "read_checkpoint",
]
