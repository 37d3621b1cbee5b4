"""The report's gallery: a few clips of every dataset, drawn from the shards themselves.

Counts and histograms hide the bugs that looking finds at once (a flipped axis, depth in the
wrong units, tracks sliding off their objects, a camera path that jumps), so ``d4s report``
shows, per dataset, ``per_dataset`` written clips chosen deterministically (evenly spread over
the dataset's sorted keys, so the same output always shows the same clips and they come from
different scenes where there are several). For each clip:

* a strip of up to :data:`STRIP_FRAMES` frames (evenly spaced over the clip) with its 3D tracks
  projected into them as short trails, CoTracker style: where the point was seen in the
  previous :data:`TRAIL_FRAMES` frames, each position projected with its own frame's camera,
  one colour per track, a dot where it is now;
* the depth of the same frames as a colour map (log scale, shared by the clip's frames) with
  its colour bar in metres; invalid pixels black;
* a top-down plot of the camera path with the frustums of the strip's frames, over the tracks'
  points. "Top" is :func:`pipeline.geometry.world_up_from_cameras` (the datasets' world frames
  differ), forward on the plot is the clip's mean viewing direction; axes in metres;
* the clip's metadata and every QC value its ``meta.json`` carries;

and beside each dataset's clips, its failed clips with the stage and reason (from the ledger).

Samples are read by key with one seek each (:mod:`pipeline.shard_read`) and decoded by
:func:`pipeline.sample_format.decode_sample`; a sample that cannot be read becomes a note in the
page, never a failed report. The strip is a JPEG (photographs; a fraction of a PNG's size), the
top-down plot a PNG (lines), both base64 inline, so the page stays self-contained.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math

import numpy as np

from pipeline.shard_read import (
    SampleLocation,
    SampleReadError,
    load_array,
    read_sample,
    written_samples,
)
from pipeline.storage import Store

GALLERY_CLIPS_DEFAULT = 2
STRIP_FRAMES = 6
TRAIL_FRAMES = 6
MAX_TRACKS_DRAWN = 48
MAX_FAILED_SHOWN = 5
MAX_QC_ROWS = 40
THUMB_WIDTH_IN = 1.6  # per frame, at DPI: ~160 px, enough to see a track sit on its object
DPI = 100
JPEG_QUALITY = 75

CSS = """
.gallery-ds{margin:1.2em 0 2em} .clip-card{border:1px solid #ddd;border-radius:4px;padding:.6em .8em;margin:.8em 0}
.clip-card h4{margin:.1em 0 .4em;font-size:.95em;word-break:break-all}
.clip-row{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start} .clip-row img{margin:0}
.clip-row table{margin:0;font-size:.8em} .warn{color:#b36b00;font-weight:600}
"""


def _esc(v) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def pick_clips(keys: list[str], n: int) -> list[str]:
    """``n`` keys spread evenly over the sorted keys (first and last included); deterministic."""
    keys = sorted(keys)
    if n <= 0 or not keys:
        return []
    if n >= len(keys):
        return keys
    idx = np.unique(np.round(np.linspace(0, len(keys) - 1, n)).astype(int))
    return [keys[i] for i in idx]


def strip_frames(num_frames: int, n: int = STRIP_FRAMES) -> list[int]:
    """Up to ``n`` frame positions spread evenly over a clip, first and last included."""
    return [int(i) for i in np.unique(np.round(np.linspace(0, num_frames - 1, min(n, num_frames))).astype(int))]


# -- figures ---------------------------------------------------------------------------------
def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _img_tag(fig, img_id: str, alt: str, fmt: str) -> str:
    buf = io.BytesIO()
    if fmt == "jpeg":
        from PIL import Image

        fig.canvas.draw()
        rgba = np.asarray(fig.canvas.buffer_rgba())
        Image.fromarray(rgba[..., :3]).save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    else:
        fig.savefig(buf, format="png")
    b64 = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img id="{_esc(img_id)}" alt="{_esc(alt)}" src="data:image/{fmt};base64,{b64}">'


def track_colours(n: int) -> np.ndarray:
    """(n, 4) RGBA, one hue per track index, the same in every frame and in ``d4s show``."""
    import matplotlib

    return matplotlib.colormaps["hsv"](np.linspace(0.0, 1.0, max(n, 1), endpoint=False))[:n]


def _tracks_drawn(vis: np.ndarray) -> np.ndarray:
    """Indices of at most :data:`MAX_TRACKS_DRAWN` tracks, spread over those ever visible."""
    seen = np.flatnonzero(vis.any(axis=0))
    if seen.size <= MAX_TRACKS_DRAWN:
        return seen
    return seen[np.round(np.linspace(0, seen.size - 1, MAX_TRACKS_DRAWN)).astype(int)]


def pixel_tracks(tracks: np.ndarray, vis: np.ndarray, intr: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """(T, N, 2) pixel position of every track in each frame it is visible in, projected with that
    frame's camera (NaN where not visible or behind the camera)."""
    from pipeline.geometry import project

    uv = np.full(tracks.shape[:2] + (2,), np.nan)
    for t in range(tracks.shape[0]):
        ok = vis[t] & np.all(np.isfinite(tracks[t]), axis=-1)
        if ok.any():
            p, z = project(tracks[t][ok], intr[t], c2w[t])
            p[z <= 0] = np.nan
            uv[t, ok] = p
    return uv


def trails_at(uv: np.ndarray, frame: int, length: int = TRAIL_FRAMES) -> list[tuple[int, np.ndarray]]:
    """``(track, (k, 2) pixels)`` for every track seen in ``frame``: its positions in frames
    ``frame - length .. frame`` where it was seen, oldest first (the last one is where it is now)."""
    out = []
    for j in range(uv.shape[1]):
        trail = uv[max(0, frame - length) : frame + 1, j]
        if np.isfinite(trail[-1]).all():
            out.append((j, trail[np.isfinite(trail).all(axis=1)]))
    return out


def _strip_figure(
    clip, frames: list[int], tracks: np.ndarray | None, vis: np.ndarray | None, intr: np.ndarray, c2w: np.ndarray
):
    """RGB frames with track trails (row 1) and depth colour maps with a metric colour bar (row 2)."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import LogNorm, Normalize

    k = len(frames)
    h, w = clip.rgb.shape[1:3]
    has_depth = clip.depth is not None and bool(clip.depth_valid.any())
    rows = 2 if has_depth else 1
    thumb_h = THUMB_WIDTH_IN * h / w
    fig = _figure(THUMB_WIDTH_IN * k + (0.9 if has_depth else 0.0), thumb_h * rows + 0.35)
    grid = fig.add_gridspec(
        rows,
        k + (1 if has_depth else 0),
        width_ratios=[1.0] * k + ([0.08] if has_depth else []),
        left=0.01,
        right=0.93 if has_depth else 0.99,
        bottom=0.02,
        top=0.9,
        wspace=0.04,
        hspace=0.08,
    )
    colours = uv = drawn = None
    if tracks is not None and vis is not None and vis.any():
        drawn = _tracks_drawn(vis)
        uv = pixel_tracks(tracks[:, drawn], vis[:, drawn], intr, c2w)
        colours = track_colours(tracks.shape[1])[drawn]
    for col, f in enumerate(frames):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(clip.rgb[col], interpolation="nearest" if w < 200 else "antialiased")
        ax.set_title(f"frame {f}", fontsize=7, pad=2)
        if uv is not None:
            trails = trails_at(uv, f)
            segs = [(pts, colours[j]) for j, pts in trails if len(pts) > 1]
            if segs:
                ax.add_collection(LineCollection([p for p, _ in segs], colors=[c for _, c in segs], linewidths=0.9))
            if trails:
                heads = np.array([pts[-1] for _, pts in trails])
                ax.scatter(heads[:, 0], heads[:, 1], s=4, c=colours[[j for j, _ in trails]], linewidths=0)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_axis_off()
    if has_depth:
        import matplotlib

        valid = clip.depth[clip.depth_valid]
        lo, hi = (float(v) for v in np.percentile(valid, [2, 98]))
        hi = max(hi, lo * 1.01)
        norm = LogNorm(lo, hi) if hi / lo > 3 else Normalize(lo, hi)
        cmap = matplotlib.colormaps["turbo_r"].with_extremes(bad="black")
        im = None
        for col in range(k):
            ax = fig.add_subplot(grid[1, col])
            d = np.where(clip.depth_valid[col], clip.depth[col], np.nan)
            im = ax.imshow(
                np.ma.masked_invalid(d), cmap=cmap, norm=norm, interpolation="nearest" if w < 200 else "antialiased"
            )
            ax.set_axis_off()
        cax = fig.add_subplot(grid[1, k])
        cb = fig.colorbar(im, cax=cax)
        cb.set_label("depth (m)" + (", log" if isinstance(norm, LogNorm) else ""), fontsize=7)
        cb.ax.tick_params(labelsize=6)
        if isinstance(norm, LogNorm):
            from matplotlib.ticker import LogLocator, ScalarFormatter

            cb.ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            cb.ax.yaxis.set_major_formatter(ScalarFormatter())
            cb.ax.yaxis.set_minor_formatter("")
    return fig


def top_down_axes(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(right, forward, up) unit vectors of the top-down view of a clip (a right-handed frame).

    ``up`` from :func:`pipeline.geometry.world_up_from_cameras`; ``forward`` the cameras' mean
    optical axis flattened onto the ground plane (any horizontal direction if they look straight
    down); ``right = forward x up``, so the plot is seen from above, not mirrored.
    """
    from pipeline.geometry import world_up_from_cameras

    up = world_up_from_cameras(c2w)
    fwd = c2w[:, :3, 2].mean(axis=0)
    fwd = fwd - up * float(fwd @ up)
    if np.linalg.norm(fwd) < 1e-6:
        fwd = np.cross(up, [1.0, 0.0, 0.0] if abs(up[0]) < 0.9 else [0.0, 1.0, 0.0])
    fwd = fwd / np.linalg.norm(fwd)
    right = np.cross(fwd, up)
    return right, fwd, up


def _top_down_figure(
    c2w: np.ndarray,
    intr: np.ndarray,
    width_px: float,
    frames: list[int],
    tracks: np.ndarray | None,
    vis: np.ndarray | None,
):
    """Camera path (line, start marked), frustums of the strip's frames, tracks' points in grey."""
    import matplotlib

    right, fwd, _ = top_down_axes(c2w)

    def to2d(p: np.ndarray) -> np.ndarray:
        return np.stack([p @ right, p @ fwd], axis=-1)

    centres = to2d(c2w[:, :3, 3])
    fig = _figure(3.2, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    pts = None
    if tracks is not None and vis is not None and vis.any():
        p = tracks[vis]
        p = p[np.all(np.isfinite(p), axis=-1)]
        if len(p) > 4000:
            p = p[np.round(np.linspace(0, len(p) - 1, 4000)).astype(int)]
        pts = to2d(p.astype(np.float64))
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, c="0.7", linewidths=0, label="track points")
    # the view: the whole path and the bulk of the points (a few far ones, the sky at 1 km, would
    # shrink the path to a dot); those beyond lie outside the axes
    lo, hi = centres.min(axis=0), centres.max(axis=0)
    if pts is not None:
        lo = np.minimum(lo, np.percentile(pts, 2, axis=0))
        hi = np.maximum(hi, np.percentile(pts, 98, axis=0))
    extent = float(np.max(hi - lo))
    extent = extent if extent > 1e-6 else 1.0
    mid = 0.5 * (lo + hi)
    ax.set_xlim(mid[0] - 0.6 * extent, mid[0] + 0.6 * extent)
    ax.set_ylim(mid[1] - 0.6 * extent, mid[1] + 0.6 * extent)
    length = 0.12 * extent
    cmap = matplotlib.colormaps["viridis"]
    ax.plot(centres[:, 0], centres[:, 1], "-", color="0.25", linewidth=1.0, label="camera path")
    ax.plot(centres[0, 0], centres[0, 1], "o", color=cmap(0.0), markersize=4, label="start")
    last = max(len(c2w) - 1, 1)
    for f in frames:
        half = 0.5 * width_px / intr[f, 0]
        c, x, z = c2w[f, :3, 3], c2w[f, :3, 0], c2w[f, :3, 2]
        tri = to2d(np.stack([c, c + length * (z - half * x), c + length * (z + half * x), c]))
        ax.plot(tri[:, 0], tri[:, 1], "-", color=cmap(f / last), linewidth=1.0)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("m (right)", fontsize=7)
    ax.set_ylabel("m (forward)", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.set_title("top-down: camera path, frustums", fontsize=7)
    ax.legend(fontsize=6, loc="best", markerscale=2)
    fig.tight_layout()
    return fig


# -- text ------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def flatten_qc(qc: dict, prefix: str = "") -> list[tuple[str, str]]:
    """``meta.qc`` as (dotted name, text) rows: nested dicts flattened, per-frame lists summarised."""
    rows: list[tuple[str, str]] = []
    for k in sorted(qc):
        v, name = qc[k], f"{prefix}{k}"
        if isinstance(v, dict):
            rows.extend(flatten_qc(v, name + "."))
        elif (
            isinstance(v, (list, tuple))
            and v
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        ):
            arr = np.asarray(v, dtype=np.float64)
            rows.append(
                (
                    name,
                    f"median {_fmt(float(np.nanmedian(arr)))}, max {_fmt(float(np.nanmax(arr)))} ({arr.size})"
                    if np.isfinite(arr).any()
                    else f"{arr.size} values, none finite",
                )
            )
        elif isinstance(v, (list, tuple)):
            rows.append((name, "; ".join(_fmt(x) for x in v) if v else "-"))
        elif v is None:
            rows.append((name, "-"))
        else:
            rows.append((name, _fmt(v)))
    return rows


def _kv_table(rows: list[tuple[str, str, str]]) -> str:
    body = "".join(
        f'<tr><td>{_esc(k)}</td><td class="{cls}">{_esc(v)}</td></tr>'
        if cls
        else f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>"
        for k, v, cls in rows
    )
    return f"<table><tbody>{body}</tbody></table>"


def _clip_card(loc: SampleLocation, sample: dict, n_card: int) -> str:
    from pipeline.clip import ClipMeta
    from pipeline.sample_format import decode_sample

    intr, c2w = load_array(sample, "intrinsics.npy"), load_array(sample, "c2w.npy")
    frames = strip_frames(intr.shape[0])
    clip = decode_sample(sample, frames=frames)  # only the strip's images are decoded
    tracks = vis = None
    if "tracks.npy" in sample and "track_vis.npy" in sample:
        tracks, vis = load_array(sample, "tracks.npy"), load_array(sample, "track_vis.npy")
    meta = ClipMeta.from_json(json.loads(sample["meta.json"]))  # all frame indices, not the strip's
    h, w = clip.rgb.shape[1:3]
    strip = _strip_figure(clip, frames, tracks, vis, intr, c2w)
    top = _top_down_figure(c2w, intr, float(w), frames, tracks, vis)
    n_tracks = int(tracks.shape[1]) if tracks is not None else 0
    info = [
        ("dataset", meta.dataset, ""),
        ("scene", meta.scene, ""),
        (
            "frames",
            f"{intr.shape[0]} (source frames {meta.frame_indices[0]}..{meta.frame_indices[-1]})"
            if meta.frame_indices
            else str(intr.shape[0]),
            "",
        ),
        ("image", f"{w}x{h} px, fx {intr[0, 0]:.4g} fy {intr[0, 1]:.4g}", ""),
        ("depth source", meta.depth_source, ""),
        ("track source", f"{meta.track_source} ({n_tracks} tracks)", ""),
        ("dynamic / real", f"{str(meta.dynamic).lower()} / {str(meta.real).lower()}", ""),
        ("sample bytes", f"{sum(len(v) for k, v in sample.items() if k != '__key__'):,}", ""),
        ("shard", f"{loc.shard_id} @ byte {loc.offset}", ""),
    ]
    if meta.untrained_models:
        info.append(
            ("untrained models", ", ".join(meta.untrained_models) + ": random weights, values meaningless", "warn")
        )
    qc = flatten_qc(meta.qc)
    qc_rows = [(k, v, "bad" if k.endswith(".keep") and v == "false" else "") for k, v in qc[:MAX_QC_ROWS]]
    if len(qc) > MAX_QC_ROWS:
        qc_rows.append(("...", f"{len(qc) - MAX_QC_ROWS} more in meta.json", ""))
    qc_html = (
        f"<div><b>QC</b>{_kv_table(qc_rows)}</div>"
        if qc_rows
        else '<div><p class="note">No QC values recorded.</p></div>'
    )
    alt = f"{loc.key}: {len(frames)} frames with track trails" + (
        ", depth colour map" if clip.depth is not None else ""
    )
    return (
        f'<div class="clip-card" id="clip-{_esc(loc.key)}"><h4>{_esc(loc.key)}</h4>'
        + _img_tag(strip, f"gallery-strip-{n_card}", alt, "jpeg")
        + '<div class="clip-row">'
        + _img_tag(top, f"gallery-path-{n_card}", f"{loc.key}: top-down camera path with frustums", "png")
        + f"<div><b>clip</b>{_kv_table(info)}</div>{qc_html}</div></div>"
    )


def _failed_table(fails: list[dict]) -> str:
    shown = sorted(fails, key=lambda f: str(f.get("clip_id")))[:MAX_FAILED_SHOWN]
    rows = "".join(
        f"<tr><td>{_esc(f.get('clip_id'))}</td><td>{_esc(f.get('stage'))}</td>"
        f'<td class="reason">{_esc(f.get("reason"))}</td><td class="path">{_esc(f.get("path") or "")}</td></tr>'
        for f in shown
    )
    more = (
        f'<p class="note">{len(fails) - len(shown)} more failed clips in the Failures section.</p>'
        if len(fails) > len(shown)
        else ""
    )
    return (
        f"<p>Failed clips ({len(fails)}): not in any shard.</p><table><thead><tr><th>clip</th><th>stage</th>"
        f"<th>reason</th><th>path</th></tr></thead><tbody>{rows}</tbody></table>{more}"
    )


def render_gallery(
    store: Store, shards: list[dict], events: list[dict], failures: list[dict], per_dataset: int = GALLERY_CLIPS_DEFAULT
) -> tuple[str, int]:
    """The gallery section's inner HTML and how many samples it read.

    ``shards``: the plan's shard rows; ``events``: the ledger's events (as the report read them);
    ``failures``: ``collect_status(...)["failures"]`` (clip failures carry ``dataset``).
    """
    written = written_samples(shards, events)
    by_ds: dict[str, list[str]] = {}
    for key, loc in written.items():
        by_ds.setdefault(loc.dataset, []).append(key)
    fails_by_ds: dict[str, list[dict]] = {}
    for f in failures:
        if f.get("clip_id"):
            fails_by_ds.setdefault(str(f.get("dataset")), []).append(f)
    datasets = sorted(set(by_ds) | set(fails_by_ds))
    if per_dataset <= 0:
        return '<p class="note">Gallery turned off (--gallery-clips 0).</p>', 0
    if not datasets:
        return '<p class="note">No clip written or failed yet: nothing to show.</p>', 0
    intro = (
        f"<p>{per_dataset} clip(s) per dataset, spread evenly over its sorted clip keys: frames with "
        f"their 3D tracks projected as trails (the last {TRAIL_FRAMES} frames' positions, one colour per "
        "track), depth in metres, and the camera path seen from above (up = the cameras' mean up "
        "direction). <code>d4s show OUT --clip KEY --rrd FILE</code> opens any clip in Rerun.</p>"
    )
    parts = [f"<style>{CSS}</style>{intro}"]
    n_read = 0
    for ds in datasets:
        part = [f'<div class="gallery-ds" id="gallery-{_esc(ds)}"><h3>{_esc(ds)}</h3>']
        keys = by_ds.get(ds, [])
        part.append(f"<p>{len(keys)} clips written.</p>")
        for key in pick_clips(keys, per_dataset):
            loc = written[key]
            try:
                sample = read_sample(store, loc)
                n_read += 1
                part.append(_clip_card(loc, sample, n_read))
            except (SampleReadError, KeyError, ValueError, OSError) as exc:
                part.append(
                    f'<div class="clip-card"><h4>{_esc(key)}</h4><p class="bad">could not read this '
                    f"sample: {_esc(exc)}</p></div>"
                )
        if fails_by_ds.get(ds):
            part.append(_failed_table(fails_by_ds[ds]))
        part.append("</div>")
        parts.append("".join(part))
    return "".join(parts), n_read
