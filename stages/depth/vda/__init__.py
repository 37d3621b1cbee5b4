"""Video Depth Anything (relative and metric), checkpoint-compatible with the official release.

* :mod:`.model` - network (:func:`build_vda`), :mod:`.load` - official checkpoints,
* :mod:`.infer` - whole-video inference (batched windows; official-style baseline),
* :mod:`.runner` - :class:`VDARunner` for the depth stage, :mod:`.parity` - fixture parity.
"""

from .infer import infer_video_depth, infer_video_depth_official_style, infer_videos, network_size
from .load import CheckpointMismatchError, load_checkpoint, load_official_state_dict, read_state_dict
from .model import VideoDepthAnything, build_vda, build_vda_empty, randomize_

__all__ = [
    "CheckpointMismatchError",
    "VideoDepthAnything",
    "build_vda",
    "build_vda_empty",
    "infer_video_depth",
    "infer_video_depth_official_style",
    "infer_videos",
    "load_checkpoint",
    "load_official_state_dict",
    "network_size",
    "randomize_",
    "read_state_dict",
]
