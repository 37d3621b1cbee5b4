import numpy as np

from pipeline import geometry as geo


def test_quaternion_roundtrip_and_convention():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((50, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    r = geo.quat_xyzw_to_matrix(q)
    assert geo.rotation_error(r).max() < 1e-12
    q2 = geo.matrix_to_quat_xyzw(r)
    q_sign = np.where(q[:, 3:] < 0, -q, q)
    np.testing.assert_allclose(q2, q_sign, atol=1e-10)
    # 90 degrees about z (x y z w order) maps x to y
    rz = geo.quat_xyzw_to_matrix(np.array([0, 0, np.sin(np.pi / 4), np.cos(np.pi / 4)]))
    np.testing.assert_allclose(rz @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_ned_to_opencv_axes():
    # An NED camera at identity looks along world +x (NED forward); its OpenCV z axis must too.
    c2w = geo.ned_c2w_to_opencv(np.eye(4))
    np.testing.assert_allclose(c2w[:3, 2], [1, 0, 0])  # optical axis = NED x (forward)
    np.testing.assert_allclose(c2w[:3, 0], [0, 1, 0])  # image right = NED y (right)
    np.testing.assert_allclose(c2w[:3, 1], [0, 0, 1])  # image down = NED z (down)
    np.testing.assert_allclose(geo.opencv_c2w_to_ned(c2w), np.eye(4), atol=1e-12)


def test_opengl_to_opencv_flips_y_and_z():
    c2w = geo.opengl_c2w_to_opencv(np.eye(4))
    np.testing.assert_allclose(np.diag(c2w), [1, -1, -1, 1])


def test_project_unproject_roundtrip():
    k = np.array([50.0, 55.0, 32.0, 24.0])
    c2w = geo.look_at_c2w([1, -1, -3], [0, 0, 0])
    depth = np.full((48, 64), 3.0) + np.linspace(0, 1, 64)[None]
    pts = geo.unproject(depth, k, c2w)
    uv, z = geo.project(pts, k, c2w)
    u, v = geo.pixel_grid(48, 64)
    np.testing.assert_allclose(uv[..., 0], u, atol=1e-9)
    np.testing.assert_allclose(uv[..., 1], v, atol=1e-9)
    np.testing.assert_allclose(z, depth, atol=1e-9)
    np.testing.assert_allclose(geo.invert_pose(geo.invert_pose(c2w)), c2w, atol=1e-12)
