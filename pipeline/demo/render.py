"""Procedural miniature scenes with exact geometry: the ground truth behind every fixture.

A :class:`SceneSpec` is a textured room (the inside of a box) holding textured boxes, some of
which move rigidly, seen by a moving pinhole camera. :func:`render` ray-casts it exactly, so
the depth, camera poses, dynamic masks and 3D point tracks it returns are known truth, in the
d4s convention (OpenCV camera, c2w, metres, pixel centres at +0.5). Per-dataset *writers*
(``pipeline/demo/writers/``) encode a :class:`RenderedScene` in each dataset's raw layout, and
the adapters must read it back: that round trip is how adapters are tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline import geometry as geo


@dataclass
class BoxSpec:
    """An axis-aligned box in its own frame, posed in the world per frame.

    ``center`` is the world position at t=0; ``velocity`` (m/frame) and ``spin`` (rad/frame
    about the box's vertical axis) make it move. A static box has both zero.
    """

    center: tuple[float, float, float]
    half_size: tuple[float, float, float]
    seed: int
    velocity: tuple[float, float, float] = (0.0, 0.0, 0.0)
    spin: float = 0.0

    @property
    def dynamic(self) -> bool:
        return any(v != 0.0 for v in self.velocity) or self.spin != 0.0

    def pose(self, t: int) -> np.ndarray:
        """Object-to-world 4x4 at frame ``t``."""
        a = self.spin * t
        rot = np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])
        return geo.make_pose(rot, np.asarray(self.center) + t * np.asarray(self.velocity))


@dataclass
class SceneSpec:
    """What to render. The world frame is OpenCV-like: y points down, the floor is at +y."""

    name: str
    num_frames: int = 12
    height: int = 48
    width: int = 64
    fov_x_deg: float = 90.0
    room_half: tuple[float, float, float] = (4.0, 1.5, 4.0)
    boxes: list[BoxSpec] = field(default_factory=list)
    camera_path: np.ndarray | None = None  # (T,4,4) c2w; default: a slow orbit
    num_tracks: int = 64
    seed: int = 0

    @property
    def dynamic(self) -> bool:
        return any(b.dynamic for b in self.boxes)


@dataclass
class RenderedScene:
    """Exact renders of a :class:`SceneSpec` in the d4s convention."""

    spec: SceneSpec
    rgb: np.ndarray  # (T,H,W,3) uint8
    depth: np.ndarray  # (T,H,W) float32 z-depth, metres
    object_id: np.ndarray  # (T,H,W) int16: 0 room, k box k-1
    intrinsics: np.ndarray  # (T,4)
    c2w: np.ndarray  # (T,4,4)
    tracks_world: np.ndarray  # (T,N,3) float64
    tracks_visible: np.ndarray  # (T,N) bool
    tracks_object: np.ndarray  # (N,) int: which object each track lies on

    @property
    def dynamic_mask(self) -> np.ndarray:
        moving = np.array([False] + [b.dynamic for b in self.spec.boxes])
        return moving[self.object_id]


def default_camera_path(spec: SceneSpec) -> np.ndarray:
    """A smooth arc through the room looking at its middle, with a little height change."""
    rng = np.random.default_rng(spec.seed)
    phase = rng.uniform(0, 2 * np.pi)
    poses = []
    for t in range(spec.num_frames):
        a = phase + 0.04 * t
        r = 2.2 + 0.1 * np.sin(0.3 * t)
        eye = np.array([r * np.cos(a), -0.2 + 0.05 * np.sin(0.2 * t), r * np.sin(a)])
        target = np.array([0.3 * np.cos(a + 1.0), 0.3, 0.3 * np.sin(a + 1.0)])
        poses.append(geo.look_at_c2w(eye, target, up=(0.0, -1.0, 0.0)))
    return np.stack(poses)


def random_scene(
    name: str,
    seed: int,
    dynamic: bool,
    num_frames: int = 12,
    height: int = 48,
    width: int = 64,
    num_boxes: int = 3,
    num_tracks: int = 64,
) -> SceneSpec:
    """A room with ``num_boxes`` boxes on the floor; with ``dynamic`` the first one or two move."""
    rng = np.random.default_rng(seed)
    boxes = []
    for k in range(num_boxes):
        hs = tuple(rng.uniform(0.2, 0.45, size=3))
        a = rng.uniform(0, 2 * np.pi)
        r = rng.uniform(0.3, 1.2)
        center = (r * np.cos(a), 1.5 - hs[1], r * np.sin(a))  # resting on the floor (y = +1.5)
        vel, spin = (0.0, 0.0, 0.0), 0.0
        if dynamic and k < 2:
            vel = tuple(float(v) for v in rng.uniform(-0.03, 0.03, size=3) * np.array([1, 0, 1]))
            spin = float(rng.uniform(-0.05, 0.05))
        boxes.append(
            BoxSpec(
                center=tuple(float(c) for c in center),
                half_size=tuple(float(h) for h in hs),
                seed=int(rng.integers(1 << 30)),
                velocity=vel,
                spin=spin,
            )
        )
    return SceneSpec(
        name=name, num_frames=num_frames, height=height, width=width, boxes=boxes, num_tracks=num_tracks, seed=seed
    )


# --------------------------------------------------------------------------------------------
# Ray casting


def _ray_box(origin: np.ndarray, direction: np.ndarray, half: np.ndarray, inside: bool):
    """Slab test for a box centred at 0 in its own frame. Returns (t_hit, local_point, normal_axis).

    ``inside`` selects the exit distance (for the room, seen from inside).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / direction
        t1 = (-half - origin) * inv
        t2 = (half - origin) * inv
    tmin = np.minimum(t1, t2)
    tmax = np.maximum(t1, t2)
    t_enter = np.nanmax(tmin, axis=-1)
    t_exit = np.nanmin(tmax, axis=-1)
    hit = (t_exit >= t_enter) & (t_exit > 1e-6)
    if inside:
        t = np.where(hit, t_exit, np.inf)
        axis = np.nanargmin(tmax, axis=-1)
    else:
        hit &= t_enter > 1e-6
        t = np.where(hit, t_enter, np.inf)
        axis = np.nanargmax(tmin, axis=-1)
    point = origin + np.where(np.isfinite(t), t, 0.0)[..., None] * direction
    return t, point, axis


def _texture(point_local: np.ndarray, axis: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic, high-contrast texture on a face: checker + sinusoids, per-object palette."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.2, 0.9, size=3)
    alt = rng.uniform(0.1, 0.9, size=3)
    freq = rng.uniform(2.0, 5.0)
    uvw = point_local
    # The two in-plane coordinates of the face that was hit.
    a_idx = (axis + 1) % 3
    b_idx = (axis + 2) % 3
    a = np.take_along_axis(uvw, a_idx[..., None], axis=-1)[..., 0]
    b = np.take_along_axis(uvw, b_idx[..., None], axis=-1)[..., 0]
    checker = (np.floor(a * freq) + np.floor(b * freq)) % 2
    wave = 0.5 + 0.5 * np.sin(7.0 * a + 3.0 * b + axis)
    col = np.where(checker[..., None] > 0, base, alt) * (0.6 + 0.4 * wave[..., None])
    return np.clip(col, 0.0, 1.0)


def _cast(spec: SceneSpec, t: int, origins: np.ndarray, dirs: np.ndarray):
    """Nearest hit along rays (world frame): distance, object id, colour."""
    room = np.asarray(spec.room_half)
    best_t, p_local, axis = _ray_box(origins, dirs, room, inside=True)
    best_id = np.zeros(best_t.shape, dtype=np.int16)
    color = _texture(p_local, axis, seed=spec.seed * 7919 + 17)
    for k, box in enumerate(spec.boxes):
        pose = box.pose(t)
        inv = geo.invert_pose(pose)
        o = origins @ inv[:3, :3].T + inv[:3, 3]
        d = dirs @ inv[:3, :3].T
        tk, pk, ak = _ray_box(o, d, np.asarray(box.half_size), inside=False)
        closer = tk < best_t
        if np.any(closer):
            best_t = np.where(closer, tk, best_t)
            best_id = np.where(closer, k + 1, best_id).astype(np.int16)
            color = np.where(closer[..., None], _texture(pk, ak, box.seed), color)
    return best_t, best_id, color


def render(spec: SceneSpec) -> RenderedScene:
    """Ray-cast every frame and sample ``num_tracks`` surface points tracked through time."""
    c2w = spec.camera_path if spec.camera_path is not None else default_camera_path(spec)
    if c2w.shape != (spec.num_frames, 4, 4):
        raise ValueError(f"camera_path must be ({spec.num_frames},4,4), got {c2w.shape}")
    h, w = spec.height, spec.width
    f = geo.fov_to_focal(np.deg2rad(spec.fov_x_deg), w)
    k = np.array([f, f, w / 2.0, h / 2.0])
    u, v = geo.pixel_grid(h, w)
    dirs_cam = np.stack([(u - k[2]) / k[0], (v - k[3]) / k[1], np.ones_like(u)], axis=-1)
    rgb = np.zeros((spec.num_frames, h, w, 3), np.uint8)
    depth = np.zeros((spec.num_frames, h, w), np.float32)
    obj = np.zeros((spec.num_frames, h, w), np.int16)
    for t in range(spec.num_frames):
        rot, eye = c2w[t, :3, :3], c2w[t, :3, 3]
        dirs = dirs_cam @ rot.T
        origins = np.broadcast_to(eye, dirs.shape)
        dist, oid, col = _cast(spec, t, origins, dirs)  # dist in units of the z=1 ray: z-depth
        depth[t] = dist.astype(np.float32)
        obj[t] = oid
        shade = 0.75 + 0.25 * np.clip(-dirs_cam[..., 1] / np.linalg.norm(dirs_cam, axis=-1) + 0.5, 0, 1)
        rgb[t] = np.round(255 * np.clip(col * shade[..., None], 0, 1)).astype(np.uint8)
    tracks, vis, tobj = _tracks(spec, c2w, k)
    return RenderedScene(
        spec=spec,
        rgb=rgb,
        depth=depth,
        object_id=obj,
        intrinsics=np.tile(k, (spec.num_frames, 1)),
        c2w=c2w,
        tracks_world=tracks,
        tracks_visible=vis,
        tracks_object=tobj,
    )


def _tracks(spec: SceneSpec, c2w: np.ndarray, k: np.ndarray):
    """Surface points seen in frame 0 (so most are trackable), carried by their object's motion."""
    rng = np.random.default_rng(spec.seed + 1)
    n = spec.num_tracks
    px = np.stack([rng.uniform(0, spec.width, n), rng.uniform(0, spec.height, n)], axis=-1)
    dirs_cam = np.stack([(px[:, 0] - k[2]) / k[0], (px[:, 1] - k[3]) / k[1], np.ones(n)], axis=-1)
    dirs = dirs_cam @ c2w[0, :3, :3].T
    origins = np.broadcast_to(c2w[0, :3, 3], dirs.shape)
    dist, oid, _ = _cast(spec, 0, origins, dirs)
    p0 = origins + dist[:, None] * dirs
    # Express each point in its object's frame at t=0, then move it with the object.
    local = p0.copy()
    for j in range(n):
        if oid[j] > 0:
            inv = geo.invert_pose(spec.boxes[oid[j] - 1].pose(0))
            local[j] = inv[:3, :3] @ p0[j] + inv[:3, 3]
    tracks = np.zeros((spec.num_frames, n, 3))
    vis = np.zeros((spec.num_frames, n), bool)
    for t in range(spec.num_frames):
        for j in range(n):
            tracks[t, j] = local[j] if oid[j] == 0 else (spec.boxes[oid[j] - 1].pose(t) @ np.append(local[j], 1.0))[:3]
        uv, z = geo.project(tracks[t], k, c2w[t])
        inside = (z > 1e-6) & (uv[:, 0] >= 0) & (uv[:, 0] < spec.width) & (uv[:, 1] >= 0) & (uv[:, 1] < spec.height)
        # Exact occlusion test: cast a ray from the camera to the point.
        d = (tracks[t] - c2w[t, :3, 3]) @ c2w[t, :3, :3]  # direction in camera coords
        with np.errstate(divide="ignore", invalid="ignore"):
            d_z1 = d / d[:, 2:3]
        dist_t, _, _ = _cast(spec, t, np.broadcast_to(c2w[t, :3, 3], (n, 3)), d_z1 @ c2w[t, :3, :3].T)
        vis[t] = inside & (np.abs(dist_t - z) < 1e-4 * np.maximum(1.0, z))
    return tracks, vis, oid.astype(np.int64)
