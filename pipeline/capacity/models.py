"""Per-clip cost models: GPU seconds of the depth and track models, and the bytes of one sample.

How each is derived is in the package docstring (``pipeline/capacity/__init__.py``) and in
docs/CLUSTER.md, "Capacity planning".
"""

from __future__ import annotations

import math

from pipeline.capacity.costs import Costs


def vda_seconds_per_clip(num_frames: int, image_hw: tuple[int, int], depth_cfg, costs: Costs) -> float:
    """GPU seconds of Video Depth Anything for one clip (the GPU of the costs file)."""
    from stages.depth.vda.infer import INFER_LEN, network_size, num_windows

    enc, dt = depth_cfg.encoder, depth_cfg.dtype
    fps = None
    if depth_cfg.compile:
        fps = costs.figure(f"depth.frames_per_s_compiled.{enc}.{dt}", required=False)
        if fps is None:
            costs.note(
                f"no torch.compile figure for {enc}/{dt} in the costs file: the uncompiled figure is used "
                f"(conservative)"
            )
    if fps is None:
        fps = costs.figure(f"depth.frames_per_s.{enc}.{dt}")
    ws = "depth.window_split."
    per_enc = costs.figure(ws + "encoder_s") / costs.figure(ws + "encoder_frames")
    per_tmp = costs.figure(ws + "temporal_s") / costs.figure(ws + "temporal_window_frames")
    ratio = per_enc / per_tmp
    ref_frames = int(costs.figure("depth.reference_video_frames"))
    ref_window_frames = INFER_LEN * num_windows(ref_frames)
    b = (ref_frames / fps) / (ratio * ref_frames + ref_window_frames)  # s per window frame at the reference size
    a = ratio * b  # s per distinct frame
    rh, rw = costs.file.depth.reference_hw
    h, w = network_size(int(image_hw[0]), int(image_hw[1]), depth_cfg.input_size)
    scale = (h * w / (rh * rw)) ** vda_pixel_exponent(costs)
    return scale * (a * num_frames + b * INFER_LEN * num_windows(num_frames))


def vda_pixel_exponent(costs: Costs) -> float:
    """Exponent of VDA time vs network pixels, fitted through the two most distant measured sizes."""
    n = len(costs.file.depth.resolution_points)
    pts = sorted(
        (costs.file.depth.resolution_points[i].hw, costs.figure(f"depth.resolution_points.{i}.frames_per_s"))
        for i in range(n)
    )
    (h0, w0), f0 = pts[0]
    (h1, w1), f1 = pts[-1]
    return math.log(f0 / f1) / math.log((h1 * w1) / (h0 * w0))


def cotracker_seconds_per_clip(num_frames: int, track_cfg, costs: Costs) -> tuple[float, int]:
    """(GPU seconds, tracks per clip) of CoTracker3 for one clip: proportional to point-frames."""
    from stages.tracks.cotracker.runner import resolve_query_frames

    qf = resolve_query_frames(track_cfg.query_frames, num_frames)
    points = len(qf) * track_cfg.grid_size**2
    passes = (
        2 if (track_cfg.variant == "offline" and max(qf) > 0) else 1
    )  # offline: backward pass for later query frames
    rate = costs.figure(f"tracks.point_frames_per_s.{track_cfg.variant}.{track_cfg.dtype}")
    return passes * points * num_frames / rate, points


def bytes_per_pixel(curve: list[tuple[float, float]], pixels: float) -> float:
    """Log-log interpolation between measured sizes; the end values outside them."""
    curve = sorted(curve)
    if pixels <= curve[0][0]:
        return curve[0][1]
    if pixels >= curve[-1][0]:
        return curve[-1][1]
    for (p0, b0), (p1, b1) in zip(curve, curve[1:]):
        if p0 <= pixels <= p1:
            t = math.log(pixels / p0) / math.log(p1 / p0) if p1 > p0 else 0.0
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return curve[-1][1]  # pragma: no cover


def clip_bytes(
    num_frames: int, image_hw: tuple[int, int], num_tracks: int, costs: Costs, with_depth: bool = True
) -> float:
    """Projected bytes of one shard sample (docs/FORMAT.md entries, tar headers included)."""
    px = float(image_hw[0] * image_hw[1])
    o = costs.file.output
    per_frame = bytes_per_pixel(o.rgb_bytes_per_pixel, px) * px
    entries = num_frames + 3  # rgb.NNN.jpg, intrinsics.npy, c2w.npy, meta.json
    if with_depth:
        per_frame += bytes_per_pixel(o.depth_bytes_per_pixel, px) * px
        entries += num_frames
    npy_header = 128
    fixed = (
        (npy_header + 32 * num_frames) + (npy_header + 128 * num_frames) + costs.figure("output.meta_bytes_per_clip")
    )
    tracks = 0.0
    if num_tracks:
        tracks = num_tracks * num_frames * costs.figure("output.track_bytes_per_point_frame") + 2 * npy_header
        entries += 2
    return num_frames * per_frame + fixed + tracks + entries * costs.figure("output.tar_bytes_per_entry")
