"""The one place where camera conventions and conversions live.

d4s convention everywhere: OpenCV camera (x right, y down, z forward),
camera-to-world 4x4 (``c2w``), metres, pixel intrinsics ``(fx, fy, cx, cy)``
for the stored image size. Adapters convert *into* this convention with the
helpers below and nothing else; later stages and training only ever see it.
"""

from __future__ import annotations

import numpy as np

# Rotation (as a 4x4 right-multiplier) taking an OpenGL/Blender camera
# (x right, y up, z backward) to OpenCV axes: c2w_cv = c2w_gl @ GL_TO_CV.
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])

# TartanAir/AirSim NED body axes (x forward, y right, z down). Columns map the
# OpenCV axes into NED: x_cv = y_ned, y_cv = z_ned, z_cv = x_ned.
NED_TO_CV = np.array([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])

# PyTorch3D camera (x left, y up, z forward) to OpenCV: flip x and y.
P3D_TO_CV = np.diag([-1.0, -1.0, 1.0, 1.0])


def quat_xyzw_to_matrix(q: np.ndarray) -> np.ndarray:
    """Unit quaternion(s) ``(..., 4)`` in x y z w order to rotation matrices ``(..., 3, 3)``."""
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = np.moveaxis(q, -1, 0)
    r = np.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - z * w),
            2 * (x * z + y * w),
            2 * (x * y + z * w),
            1 - 2 * (x * x + z * z),
            2 * (y * z - x * w),
            2 * (x * z - y * w),
            2 * (y * z + x * w),
            1 - 2 * (x * x + y * y),
        ],
        axis=-1,
    )
    return r.reshape(q.shape[:-1] + (3, 3))


def matrix_to_quat_xyzw(r: np.ndarray) -> np.ndarray:
    """Rotation matrices ``(..., 3, 3)`` to unit quaternions ``(..., 4)`` (x y z w, w >= 0)."""
    r = np.asarray(r, dtype=np.float64)
    flat = r.reshape(-1, 3, 3)
    out = np.empty((flat.shape[0], 4))
    for i, m in enumerate(flat):
        tr = np.trace(m)
        if tr > 0:
            s = np.sqrt(tr + 1.0) * 2
            w, x, y, z = 0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s
        elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
            s = np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
            w, x, y, z = (m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s
        elif m[1, 1] > m[2, 2]:
            s = np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
            w, x, y, z = (m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s
        else:
            s = np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
            w, x, y, z = (m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s
        q = np.array([x, y, z, w])
        out[i] = q if w >= 0 else -q
    return out.reshape(r.shape[:-2] + (4,))


def make_pose(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Stack ``(..., 3, 3)`` rotations and ``(..., 3)`` translations into ``(..., 4, 4)``."""
    rotation = np.asarray(rotation, dtype=np.float64)
    translation = np.asarray(translation, dtype=np.float64)
    out = np.zeros(rotation.shape[:-2] + (4, 4))
    out[..., :3, :3] = rotation
    out[..., :3, 3] = translation
    out[..., 3, 3] = 1.0
    return out


def invert_pose(pose: np.ndarray) -> np.ndarray:
    """Inverse of rigid transforms ``(..., 4, 4)`` (w2c <-> c2w) without a general inverse."""
    pose = np.asarray(pose, dtype=np.float64)
    r = pose[..., :3, :3]
    t = pose[..., :3, 3]
    rt = np.swapaxes(r, -1, -2)
    return make_pose(rt, -np.einsum("...ij,...j->...i", rt, t))


def ned_c2w_to_opencv(c2w_ned: np.ndarray) -> np.ndarray:
    """TartanAir/AirSim NED camera pose to an OpenCV-camera c2w (world frame kept NED)."""
    return np.asarray(c2w_ned, dtype=np.float64) @ NED_TO_CV


def opencv_c2w_to_ned(c2w_cv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`ned_c2w_to_opencv` (used by fixture writers)."""
    return np.asarray(c2w_cv, dtype=np.float64) @ np.linalg.inv(NED_TO_CV)


def opengl_c2w_to_opencv(c2w_gl: np.ndarray) -> np.ndarray:
    """Blender/NeRF (x right, y up, z back) c2w to OpenCV c2w; world frame unchanged."""
    return np.asarray(c2w_gl, dtype=np.float64) @ GL_TO_CV


def opencv_c2w_to_opengl(c2w_cv: np.ndarray) -> np.ndarray:
    return np.asarray(c2w_cv, dtype=np.float64) @ GL_TO_CV


def intrinsics_matrix(fxfycxcy: np.ndarray) -> np.ndarray:
    """``(..., 4)`` fx fy cx cy to ``(..., 3, 3)`` K."""
    k = np.asarray(fxfycxcy, dtype=np.float64)
    out = np.zeros(k.shape[:-1] + (3, 3))
    out[..., 0, 0], out[..., 1, 1] = k[..., 0], k[..., 1]
    out[..., 0, 2], out[..., 1, 2] = k[..., 2], k[..., 3]
    out[..., 2, 2] = 1.0
    return out


def intrinsics_vector(k: np.ndarray) -> np.ndarray:
    """``(..., 3, 3)`` K to ``(..., 4)`` fx fy cx cy."""
    k = np.asarray(k, dtype=np.float64)
    return np.stack([k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2]], axis=-1)


def fov_to_focal(fov_rad: float, size_px: float) -> float:
    """Focal length in pixels from a full field of view across ``size_px`` pixels."""
    return 0.5 * size_px / np.tan(0.5 * fov_rad)


def pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (u, v) with the convention that pixel (0, 0) covers [0, 1)^2.

    d4s uses the centre of pixel ``(i, j)`` at ``u = j + 0.5, v = i + 0.5``; cx = W/2 is then
    the image centre. Fixture renderers and all (un)projections share this.
    """
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    return u, v


def unproject(depth: np.ndarray, fxfycxcy: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """Depth map ``(H, W)`` (z along the optical axis) to world points ``(H, W, 3)``."""
    h, w = depth.shape
    fx, fy, cx, cy = np.asarray(fxfycxcy, dtype=np.float64)
    u, v = pixel_grid(h, w)
    cam = np.stack([(u - cx) / fx * depth, (v - cy) / fy * depth, depth], axis=-1)
    return cam @ c2w[:3, :3].T + c2w[:3, 3]


def unproject_pixels(
    u: np.ndarray, v: np.ndarray, depth: np.ndarray, fxfycxcy: np.ndarray, c2w: np.ndarray
) -> np.ndarray:
    """Pixel coordinates ``(N,)`` (d4s convention: centres at +0.5) with z-depth ``(N,)`` to world
    points ``(N, 3)``: :func:`unproject` for a sparse set of pixels."""
    fx, fy, cx, cy = np.asarray(fxfycxcy, dtype=np.float64)
    z = np.asarray(depth, dtype=np.float64)
    cam = np.stack([(np.asarray(u) - cx) / fx * z, (np.asarray(v) - cy) / fy * z, z], axis=-1)
    return cam @ np.asarray(c2w, dtype=np.float64)[:3, :3].T + np.asarray(c2w, dtype=np.float64)[:3, 3]


def project(points_world: np.ndarray, fxfycxcy: np.ndarray, c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points ``(..., 3)`` to pixels ``(..., 2)`` and camera depth ``(...)``."""
    w2c = invert_pose(c2w)
    cam = np.asarray(points_world, dtype=np.float64) @ w2c[:3, :3].T + w2c[:3, 3]
    fx, fy, cx, cy = np.asarray(fxfycxcy, dtype=np.float64)
    z = cam[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = np.stack([fx * cam[..., 0] / z + cx, fy * cam[..., 1] / z + cy], axis=-1)
    return uv, z


def rotation_error(r: np.ndarray) -> np.ndarray:
    """Max abs deviation of ``R^T R`` from identity and of det from 1, per matrix ``(..., 3, 3)``."""
    r = np.asarray(r, dtype=np.float64)
    eye = np.eye(3)
    orth = np.abs(np.swapaxes(r, -1, -2) @ r - eye).max(axis=(-1, -2))
    det = np.abs(np.linalg.det(r) - 1.0)
    return np.maximum(orth, det)


def look_at_c2w(eye: np.ndarray, target: np.ndarray, up: np.ndarray = (0.0, -1.0, 0.0)) -> np.ndarray:
    """OpenCV c2w for a camera at ``eye`` looking at ``target`` (``up`` is world 'up' = -y_cam)."""
    eye, target, up = (np.asarray(a, dtype=np.float64) for a in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(-up, z)  # y_cam points down, so right = down x forward... keep right-handed
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return make_pose(np.stack([x, y, z], axis=1), eye)


def world_up_from_cameras(c2w: np.ndarray) -> np.ndarray:
    """The world's 'up' as seen by a clip's cameras: the mean of their -y axes, normalised.

    The world frame of a clip is its dataset's own (NED, y-up, z-up, ...; docs/FORMAT.md), so
    viewers cannot assume an up axis. Cameras are held roughly upright in every dataset d4s
    reads, and the OpenCV camera's y axis points down, so ``-y`` averaged over the clip is the
    best estimate available without the dataset's name. Falls back to the first camera's ``-y``
    when the mean cancels out (a camera rolling through 180 degrees).
    """
    c2w = np.asarray(c2w, dtype=np.float64).reshape(-1, 4, 4)
    ups = -c2w[:, :3, 1]
    mean = ups.mean(axis=0)
    n = np.linalg.norm(mean)
    if n < 1e-3:
        return ups[0] / np.linalg.norm(ups[0])
    return mean / n
