"""The report's gallery: clips read back from the shards, tracks projected where they belong, the
camera path seen from above the right way up, failed clips with their reasons, bad shards as notes."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
from PIL import Image
from viz_output import FAILED_REASON, write_output

IMG_RE = re.compile(r'<img id="([^"]+)" alt="([^"]*)" src="data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)">')


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    return write_output(tmp_path_factory.mktemp("gallery"))


def _gallery(out: dict, per_dataset: int = 2) -> tuple[str, int]:
    from manifests.store import ManifestStore
    from pipeline.gallery import render_gallery
    from pipeline.storage import Store

    ms = ManifestStore(Store(out["output"]))
    events = ms.ledger_events()
    failures = [
        {**f, "dataset": e["shard_id"].rsplit("-", 1)[0]}
        for e in events
        if e["state"] == "done"
        for f in e["clips_failed"]
    ]
    return render_gallery(Store(out["output"]), ms.shards(), events, failures, per_dataset)


def test_pick_clips_is_deterministic_and_spread():
    from pipeline.gallery import pick_clips, strip_frames

    keys = [f"k{i:02d}" for i in range(10)]
    assert pick_clips(keys[::-1], 3) == ["k00", "k04", "k09"] == pick_clips(keys, 3)
    assert pick_clips(keys, 1) == ["k00"] and pick_clips(keys, 0) == [] and pick_clips(keys[:2], 5) == ["k00", "k01"]
    assert strip_frames(16) == [0, 3, 6, 9, 12, 15] and strip_frames(3) == [0, 1, 2]


def test_gallery_cards_images_qc_and_failures(output):
    html, n_read = _gallery(output)
    po = sorted(k for k in output["clips"] if k.startswith("pointodyssey"))
    # two of the three pointodyssey clips (first and last key), the one spring clip
    assert n_read == 3
    for key in (po[0], po[2], "spring__s0__000000"):
        assert f'id="clip-{key}"' in html
    assert f'id="clip-{po[1]}"' not in html
    imgs = IMG_RE.findall(html)
    assert len(imgs) == html.count("<img") == 6
    for img_id, alt, fmt, b64 in imgs:
        raw = base64.b64decode(b64)
        with Image.open(io.BytesIO(raw)) as im:
            assert im.format == ("JPEG" if fmt == "jpeg" else "PNG") and alt
            if img_id.startswith("gallery-strip"):
                # RGB row and depth row, 6 frames across: wide, and no wider than the page
                assert fmt == "jpeg" and 700 < im.width <= 1100 and 150 < im.height < 400, im.size
                assert len(raw) < 150_000
            else:
                assert fmt == "png" and im.width >= 250
    # metadata and QC values of the sample (its meta.json), numeric lists summarised
    assert "tracks_visible_fraction" in html and "0.9" in html and "median 0.2, max 0.3 (3)" in html
    assert "align.residual" in html and "0.0123" in html and '<td class="bad">false</td>' in html
    assert "cotracker3: random weights, values meaningless" in html
    # the failed clip beside the spring clips, its reason and path escaped
    spring = html[html.index('id="gallery-spring"') :]
    assert "spring__s1__000000" in spring and "Failed clips (1)" in spring
    assert FAILED_REASON not in html and "&lt;b&gt;&amp;&quot;x&quot;" in html and "/data/&lt;s1&gt;/cam.txt" in html


def test_track_trails_land_on_the_projected_points():
    """A point moving along +x in front of a fixed camera: its trail is its pinhole projections."""
    from pipeline.gallery import pixel_tracks, trails_at

    t = 5
    c2w = np.tile(np.eye(4), (t, 1, 1))
    intr = np.tile([50.0, 60.0, 16.0, 12.0], (t, 1))
    tracks = np.zeros((t, 2, 3))
    tracks[:, 0] = [[0.1 * i, 0.2, 2.0] for i in range(t)]
    tracks[:, 1] = [0.0, 0.0, -1.0]  # behind the camera: never drawn
    vis = np.ones((t, 2), bool)
    vis[2, 0] = False  # not seen in frame 2: a gap in the trail
    uv = pixel_tracks(tracks, vis, intr, c2w)
    expect = np.array([[50.0 * 0.1 * i / 2.0 + 16.0, 60.0 * 0.2 / 2.0 + 12.0] for i in range(t)])
    ok = [0, 1, 3, 4]
    assert np.allclose(uv[ok, 0], expect[ok]) and np.isnan(uv[2, 0]).all() and np.isnan(uv[:, 1]).all()
    trails = trails_at(uv, 4, length=3)
    assert [j for j, _ in trails] == [0]
    assert np.allclose(trails[0][1], expect[[1, 3, 4]])  # frames 1..4, frame 2 skipped, oldest first
    assert trails_at(uv, 2) == []  # the point is not seen in frame 2


def test_top_down_axes_ned_and_y_up_worlds():
    """North-east-down world (TartanAir): a camera looking north, moving east, is seen from above
    looking 'forward' with the motion to the 'right'; the same for a y-down OpenCV-like world."""
    from pipeline.gallery import top_down_axes
    from pipeline.geometry import ned_c2w_to_opencv

    ned = np.tile(np.eye(4), (3, 1, 1))  # body = world: x north, y east, z down
    ned[:, 1, 3] = [0.0, 1.0, 2.0]  # moving east
    c2w = ned_c2w_to_opencv(ned)
    right, fwd, up = top_down_axes(c2w)
    assert np.allclose(up, [0, 0, -1]) and np.allclose(fwd, [1, 0, 0]) and np.allclose(right, [0, 1, 0])
    path = c2w[:, :3, 3]
    assert np.all(np.diff(path @ right) > 0) and np.allclose(path @ fwd, 0)
    # y-down world, cameras rolled by a few degrees: up still -y
    ang = np.deg2rad(8.0)
    roll = np.array([[np.cos(ang), -np.sin(ang), 0], [np.sin(ang), np.cos(ang), 0], [0, 0, 1]])
    cams = np.tile(np.eye(4), (2, 1, 1))
    cams[1, :3, :3] = roll
    right, fwd, up = top_down_axes(cams)
    assert up[1] < -0.99 and np.allclose(fwd, [0, 0, 1]) and np.isclose(np.linalg.det(np.stack([right, fwd, up])), 1.0)


def test_unreadable_shard_is_a_note_not_a_failed_report(tmp_path):
    out = write_output(tmp_path)
    shard = tmp_path / "out" / "shards" / "pointodyssey" / "pointodyssey-000001.tar"
    shard.write_bytes(shard.read_bytes()[:700])  # truncated inside the sample
    (tmp_path / "out" / "shards" / "spring" / "spring-000000.tar").unlink()
    html, n_read = _gallery(out)
    assert n_read == 1  # only the first pointodyssey clip could be read
    notes = re.findall(r"could not read this sample: ([^<]*)</p>", html)
    assert len(notes) == 2
    assert any("pointodyssey-000001.tar" in n and "unreadable" in n for n in notes), notes
    assert any("spring-000000.tar" in n and "missing" in n for n in notes), notes
    assert "spring__s1__000000" in html  # the failed clip is still listed


def test_gallery_off_and_empty(output):
    from pipeline.gallery import render_gallery
    from pipeline.storage import Store

    assert "turned off" in render_gallery(Store(output["output"]), [], [], [], 0)[0]
    html, n = render_gallery(Store(output["output"]), [], [], [], 2)
    assert n == 0 and "nothing to show" in html
