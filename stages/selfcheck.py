"""Ground-truth self-check: a clip's depth must agree with itself across frames under its cameras.

Why. Every adapter converts its dataset's conventions (which way a pose points, the camera axes,
how a rotation is laid out, the depth unit) into d4s's. A convention that is wrong for one
dataset passes every round-trip test made from d4s's own fixtures, because the fixture writer
encodes the same belief the adapter decodes (Spring's ``extrinsics.txt``, whose direction and
axes its authors never state, is the standing example). The geometry cannot be fooled that way:
unproject frame i's depth with camera i, project it into frame j, and a static, unoccluded
surface point must land where frame j's depth map shows a surface at the predicted depth, with
the same colour. Inverted poses, flipped camera axes, transposed rotations and depth in the
wrong unit each break that on any clip whose camera moves, so a build stops at its first clips
instead of writing a dataset of silently wrong geometry.

How (cheap: a few thousand pixels, a few frame pairs, per clip):

* pairs: (first, last), (first, middle), (middle, last) frames of the clip, both directions —
  the longest baselines the clip has, where a wrong convention moves points furthest;
* a regular grid of about ``QCConfig.selfcheck_pixels`` pixels with valid depth per source frame;
* a reprojected point is *seen* when it lands inside the other image, in front of its camera,
  next to valid depth; seen points lying clearly behind the surface shown there are *occluded*
  (excused: the other frame cannot see them); the rest *agree* when their predicted depth lies
  within the depth range of the 2x2 pixels around where they land (widened by ``DEPTH_TOL`` and
  ``DEPTH_TOL_M``) and their colour within those pixels' colour range (widened by
  ``COLOR_TOL``);
* ``agreement`` = agreeing / (seen - occluded). Moving objects, specular surfaces and depth
  edges lower it a little; a wrong convention drops it to chance;
* ``overlap``: the share of sampled depth pixels that *neighbouring* frames (start, middle,
  end of the clip) see unoccluded. A video's neighbouring frames overlap; under a wrong
  convention the points often leave the image or land behind what the other frame shows,
  leaving nothing to compare between far frames (then ``agreement`` is taken over the
  neighbouring pairs).

A clip fails with the reason ``pose/depth convention mismatch (...)`` when ``overlap`` is below
``QCConfig.selfcheck_min_overlap`` or ``agreement`` below ``QCConfig.selfcheck_min_agreement``
(both chosen from measurements: docs/DATASETS.md, "Ground-truth self-check",
bench/selfcheck_calibration.py); the reason also names which common convention error would
explain the clip (:data:`ALTERNATIVES`), when one does. A clip with too few comparable points
is recorded as not judged; a clip whose camera does not move passes (nothing can tell).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipError
from pipeline.config import QCConfig
from stages.contract import StageContract

CONTRACT = StageContract(
    name="selfcheck",
    inputs=("rgb", "intrinsics", "c2w", "depth (gt)", "depth_valid"),
    outputs=("meta.qc.selfcheck",),
    runs_as="task (inside ingest)",
    acts_when="the clip has ground-truth depth and metric poses",
    errors="pose/depth convention mismatch: reprojected depth and colour disagree between frames",
)

DEPTH_TOL = 0.02  # relative: float16 / 16-bit depth quantisation and sub-pixel slant, with room
DEPTH_TOL_M = 0.01  # absolute floor (PointOdyssey's depth step is 0.015 m)
COLOR_TOL = 24.0  # of 255 per channel: JPEG and per-pixel shading, not texture
MIN_JUDGED = 64  # fewer comparable points than this: the clip is not judged

Hypothesis = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]

# Common convention errors, each as the correction that would undo it: (c2w, depth) -> (c2w, depth).
ALTERNATIVES: dict[str, Hypothesis] = {
    "the poses were inverted, world-to-camera read as camera-to-world": lambda c2w, d: (geo.invert_pose(c2w), d),
    "the camera y and z axes were flipped, an OpenGL camera read as OpenCV": lambda c2w, d: (c2w @ geo.GL_TO_CV, d),
    "the rotations were transposed": lambda c2w, d: (_transpose_rotations(c2w), d),
    "the poses were inverted with y and z flipped, OpenGL camera-to-world read as OpenCV world-to-camera": lambda c2w, d: (
        geo.invert_pose(c2w) @ geo.GL_TO_CV,
        d,
    ),
    "the depth were in millimetres": lambda c2w, d: (c2w, d / 1000.0),
    "the depth were in centimetres": lambda c2w, d: (c2w, d / 100.0),
    "the depth were 100x larger than given, metres read as centimetres": lambda c2w, d: (c2w, d * 100.0),
    "the depth were 1000x larger than given, metres read as millimetres": lambda c2w, d: (c2w, d * 1000.0),
}


def _transpose_rotations(c2w: np.ndarray) -> np.ndarray:
    out = np.array(c2w, dtype=np.float64)
    out[..., :3, :3] = np.swapaxes(out[..., :3, :3], -1, -2)
    return out


def frame_pairs(t: int) -> list[tuple[int, int]]:
    """Far pairs: (first, last), (first, middle), (middle, last), each both ways, no duplicates."""
    m = (t - 1) // 2
    return _both_ways([(0, t - 1), (0, m), (m, t - 1)])


def neighbour_pairs(t: int) -> list[tuple[int, int]]:
    """Neighbouring frames at the start, middle and end of the clip, each both ways."""
    m = (t - 1) // 2
    return _both_ways([(0, 1), (m, m + 1), (t - 2, t - 1)])


def _both_ways(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in pairs:
        for p in ((a, b), (b, a)):
            if p[0] != p[1] and min(p) >= 0 and p not in out:
                out.append(p)
    return out


def sample_grid(height: int, width: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a regular grid of about ``n`` pixels (deterministic, even cover)."""
    step = max(1, int(np.floor(np.sqrt(height * width / max(n, 1)))))
    rows = np.arange(step // 2, height, step)
    cols = np.arange(step // 2, width, step)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return rr.ravel(), cc.ravel()


def _neighbours(u: np.ndarray, v: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns ``(N, 4)`` of the 2x2 pixels whose centres surround ``(u, v)``."""
    x0 = np.clip(np.floor(u - 0.5).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(v - 0.5).astype(np.int64), 0, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    return np.stack([y0, y0, y1, y1], axis=1), np.stack([x0, x1, x0, x1], axis=1)


def pair_counts(
    src: int,
    dst: int,
    rgb: np.ndarray,
    depth: np.ndarray,
    valid: np.ndarray,
    intrinsics: np.ndarray,
    c2w: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
) -> np.ndarray:
    """``[sampled, seen, occluded, agree]`` for the grid pixels of frame ``src`` reprojected into ``dst``."""
    h, w = depth.shape[1:3]
    ok = valid[src, rows, cols]
    r, c = rows[ok], cols[ok]
    z_src = depth[src, r, c].astype(np.float64)
    pts = geo.unproject_pixels(c + 0.5, r + 0.5, z_src, intrinsics[src], c2w[src])
    uv, z = geo.project(pts, intrinsics[dst], c2w[dst])
    with np.errstate(invalid="ignore"):
        inside = (z > 1e-9) & (uv[:, 0] >= 0) & (uv[:, 0] <= w) & (uv[:, 1] >= 0) & (uv[:, 1] <= h)
    uv, z, r, c = uv[inside], z[inside], r[inside], c[inside]
    nr, nc = _neighbours(uv[:, 0], uv[:, 1], h, w)
    nd = depth[dst][nr, nc].astype(np.float64)
    nv = valid[dst][nr, nc]
    seen = nv.any(axis=1)
    lo = np.where(nv, nd, np.inf).min(axis=1)
    hi = np.where(nv, nd, -np.inf).max(axis=1)
    with np.errstate(invalid="ignore"):  # inf bounds where no neighbour is valid (not seen)
        slack_hi = hi * DEPTH_TOL + DEPTH_TOL_M
        slack_lo = lo * DEPTH_TOL + DEPTH_TOL_M
        occluded = seen & (z > hi + slack_hi)
        depth_ok = seen & (z >= lo - slack_lo) & (z <= hi + slack_hi)
    col = rgb[dst][nr, nc].astype(np.float64)  # (N, 4, 3)
    own = rgb[src, r, c].astype(np.float64)  # (N, 3)
    below = col.min(axis=1) - COLOR_TOL - own
    above = own - col.max(axis=1) - COLOR_TOL
    color_ok = np.all((below <= 0) & (above <= 0), axis=1)
    return np.array([int(ok.sum()), int(seen.sum()), int(occluded.sum()), int((depth_ok & color_ok).sum())])


def _pooled(pairs, rgb, depth, valid, intrinsics, c2w, rows, cols) -> np.ndarray:
    total = np.zeros(4, dtype=np.int64)
    for src, dst in pairs:
        total += pair_counts(src, dst, rgb, depth, valid, intrinsics, c2w, rows, cols)
    return total


def agreement(
    rgb: np.ndarray, depth: np.ndarray, valid: np.ndarray, intrinsics: np.ndarray, c2w: np.ndarray, pixels: int
) -> dict:
    """The self-check's measures of one clip (no verdict).

    ``overlap``: share of neighbouring frames' depth pixels that the other frame sees, not behind
    one of its surfaces (a video's neighbouring frames overlap; under a wrong convention points
    often leave the image or end up behind what the other frame shows). ``agreement``:
    agreeing / compared over the far pairs, or over the neighbouring pairs when the far pairs
    have fewer than MIN_JUDGED comparable points (``basis`` says which); None when neither has.
    ``overlap`` is None when the neighbouring frames have too little valid depth to sample
    (left to the geometric QC's valid-depth check).
    """
    t, h, w = depth.shape
    if t < 2:
        return {"agreement": None, "compared": 0, "overlap": 1.0, "basis": "one frame"}
    rows, cols = sample_grid(h, w, pixels)
    near = _pooled(neighbour_pairs(t), rgb, depth, valid, intrinsics, c2w, rows, cols)
    far = _pooled(frame_pairs(t), rgb, depth, valid, intrinsics, c2w, rows, cols)
    basis, counts = "far frames", far
    if far[1] - far[2] < MIN_JUDGED:
        basis, counts = "neighbouring frames", near
    _, seen, occluded, agree = (int(x) for x in counts)
    compared = seen - occluded
    return {
        "agreement": agree / compared if compared >= MIN_JUDGED else None,
        "compared": compared,
        "overlap": float((near[1] - near[2]) / near[0]) if near[0] >= MIN_JUDGED else None,
        "basis": basis,
    }


def verdict(res: dict, cfg: QCConfig) -> str | None:
    """Why the measures say the conventions are wrong, or None (also when there is too little to judge)."""
    if res["overlap"] is not None and res["overlap"] < cfg.selfcheck_min_overlap:
        return (
            f"neighbouring frames see {res['overlap']:.0%} of each other's depth pixels unoccluded under "
            f"the clip's cameras, < {cfg.selfcheck_min_overlap:.0%}"
        )
    if res["agreement"] is not None and res["agreement"] < cfg.selfcheck_min_agreement:
        return (
            f"{res['agreement']:.0%} of {res['compared']} depth pixels reprojected between {res['basis']} "
            f"agree, < {cfg.selfcheck_min_agreement:.0%}"
        )
    return None


def gt_self_check(clip: Clip, cfg: QCConfig) -> dict:
    """The self-check of one clip with ground-truth depth: its QC record, or :class:`ClipError`."""
    where = f"{clip.meta.dataset}/{clip.meta.scene}/{clip.meta.clip_id}"
    if float(geo.rotation_error(clip.c2w[:, :3, :3]).max()) > cfg.max_rotation_error:
        return {
            "agreement": None,
            "compared": 0,
            "overlap": None,
            "basis": "rotations not orthonormal",
            "judged": False,
        }
    res = agreement(clip.rgb, clip.depth, clip.depth_valid, clip.intrinsics, clip.c2w, cfg.selfcheck_pixels)
    why = verdict(res, cfg)
    res["judged"] = res["agreement"] is not None
    if why is None:
        return res
    hint, best = "", -1.0
    for name, fix in ALTERNATIVES.items():
        c2w, depth = fix(clip.c2w, clip.depth)
        alt = agreement(clip.rgb, depth, clip.depth_valid, clip.intrinsics, c2w, cfg.selfcheck_pixels)
        if verdict(alt, cfg) is None and alt["agreement"] is not None and alt["agreement"] > best:
            hint, best = f"; {alt['agreement']:.0%} would agree if {name}", alt["agreement"]
    raise ClipError(f"pose/depth convention mismatch ({why}{hint})", where)
