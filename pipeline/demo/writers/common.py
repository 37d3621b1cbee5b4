"""What every fixture writer returns, so round-trip tests can compare against the render."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class WrittenScene:
    dataset: str
    scene_id: str  # the scene id the adapter's discover() is expected to report
    world_from_render: np.ndarray  # 4x4: the dataset's world frame from the renderer's world
    frame_ids: list = field(default_factory=list)  # dataset-native frame ids (numbers, timestamps)
    pose_scale: float = 1.0  # dataset translation units per metre (1 for metric datasets)
    notes: str = ""

    def expected_c2w(self, c2w_render: np.ndarray) -> np.ndarray:
        """Ground-truth c2w in the dataset's world and scale, for comparing with the adapter."""
        out = self.world_from_render @ c2w_render
        out = out.copy()
        out[..., :3, 3] *= self.pose_scale
        return out

    def expected_points(self, pts_render: np.ndarray) -> np.ndarray:
        a = self.world_from_render
        return (pts_render @ a[:3, :3].T + a[:3, 3]) * self.pose_scale
