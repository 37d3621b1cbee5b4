"""``d4s report``: the HTML report of a small build (one bad input), its plots, and a headless browser."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import tartanair_config, write_tartanair
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()
PNG_SIG = b"\x89PNG\r\n\x1a\n"
IMG_RE = re.compile(r'<img id="([^"]+)" alt="([^"]+)" src="data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)">')
SECTIONS = (
    "Summary",
    "Clips per dataset",
    "Frames and bytes per clip",
    "Depth range",
    "Alignment residual",
    "QC drops by reason",
    "Throughput over time",
    "Stage time breakdown",
    "Failures",
    "Gallery",
)
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local):
    """Two TartanAir scenes (4 clips in 2 shards); a truncated PNG fails one clip. The data folder's
    name holds HTML metacharacters, so the failure's path must come out escaped."""
    from pipeline.runner import build

    tmp = tmp_path_factory.mktemp("report")
    data = tmp / "data<b>&x"
    write_tartanair(data, n_scenes=2, frames=7)
    png = sorted(data.glob("*/*/P*"))[0] / "image_left" / "000001_left.png"
    png.write_bytes(png.read_bytes()[:200])
    s = build(tartanair_config(tmp, data), show_progress=False)
    assert s.clips_written == 3 and len(s.failures) == 1
    return tmp / "out", s.failures[0]


@pytest.fixture(scope="module")
def report(built):
    out, _ = built
    r = runner.invoke(app, ["report", str(out)])
    assert r.exit_code == 0, r.output
    return r, out / "report.html"


def test_report_html_sections_images_and_escaping(built, report):
    out, failure = built
    r, path = report
    assert r.stdout.strip() == str(path) and path.is_file()
    page = path.read_text(encoding="utf-8")
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page, title
    # self-contained: no external stylesheet, script or image
    assert "<link" not in page and not re.search(r'src="(?!data:)', page)
    imgs = IMG_RE.findall(page)
    assert len(imgs) == page.count("<img") and len(imgs) >= 6
    ids = {i for i, _, _ in imgs}
    assert {
        "fig-clips-per-dataset",
        "fig-frames-per-clip",
        "fig-bytes-per-clip",
        "fig-depth-range",
        "fig-qc-drops",
        "fig-throughput",
        "fig-stage-times",
    } <= ids
    for img_id, alt, b64 in imgs:
        raw = base64.b64decode(b64)
        assert (raw.startswith(b"\xff\xd8") if img_id.startswith("gallery-strip") else raw.startswith(PNG_SIG)) and alt
        with Image.open(io.BytesIO(raw)) as im:
            assert im.width > 100 and im.height > 100
    # tartanair has ground-truth depth: nothing aligned, a note instead of an empty plot
    assert "No aligned clips" in page and "fig-align-residual" not in ids
    # the failure row: reason and path escaped (the data folder is named "data<b>&x")
    assert "data<b>&x" not in page and "data&lt;b&gt;&amp;x" in page
    assert "truncated" in failure["reason"] and "000001_left.png" in page
    assert failure["clip_id"] in page
    # gallery: 2 of the 3 written clips, read from the shards, and the failed clip beside them
    cards = re.findall(r'<div class="clip-card" id="clip-([^"]+)">', page)
    assert len(cards) == 2 and {"gallery-strip-1", "gallery-path-1", "gallery-strip-2", "gallery-path-2"} <= ids
    assert page.index(failure["clip_id"], page.index('id="gallery-tartanair"')) > 0
    # summary: 2 shards done; clips 3 done, 1 failed, 0 pending
    assert '<td>shards</td><td class="n">2</td><td class="n">0</td><td class="n">0</td>' in page
    assert '<td>clips</td><td class="n">3</td><td class="n">1</td><td class="n"></td><td class="n">0</td>' in page


def test_report_synthetic_aligned_clips_and_hostile_strings(tmp_path):
    """Alignment plots appear when clips were aligned; strings from the manifests never become markup."""
    from pipeline.report import render_report

    evil = '<script>alert("x")</script> $\\alpha$ & co'
    recs = [
        {
            "key": f"re__s__{i}",
            "dataset": "realestate10k",
            "frames": 16,
            "bytes": 2_000_000 + i * 1000,
            "depth_p5_m": 1.0 + i * 0.01,
            "depth_median_m": 3.0 + i * 0.05,
            "depth_p95_m": 9.0,
            "align": {"residual": 0.02 + 0.001 * i, "abs_rel": 0.05 + 0.002 * i, "scale": 1.3, "keep": True},
        }
        for i in range(20)
    ]
    events = [
        {"shard_id": "realestate10k-000000", "state": "running", "build_id": "b1", "started_at": 100.0},
        {
            "shard_id": "realestate10k-000000",
            "state": "done",
            "build_id": "b1",
            "started_at": 100.0,
            "finished_at": 160.0,
            "samples_written": 20,
            "clips_failed": [{"clip_id": "c1"}],
            "timings": {"ingest": 3.0, "depth": 20.0, "align": 5.0, "encode": 1.0, "write": 0.5},
            "clip_qc": recs,
        },
    ]
    st = {
        "output": "s3://b/o",
        "datasets": {"realestate10k": {"clips_done": 20, "clips_failed": 1, "clips_pending": 0}},
        "stages": {},
        "shards": {"done": 1, "failed": 0, "running": 0, "pending": 0},
        "stage_seconds": {"ingest": 3.0, "depth": 20.0, "align": 5.0, "encode": 1.0, "write": 0.5},
        "throughput": {"build_id": "b1", "clips": 21, "seconds": 60.0, "clips_per_s": 0.35, "eta_s": 0.0},
        "qc": {},
        "drops": {"realestate10k": {f"align: {evil}": 1}},
        "failures": [
            {
                "dataset": "realestate10k",
                "clip_id": "c1",
                "stage": "align",
                "reason": evil,
                "path": "/d/<x>.txt",
                "shard_id": "realestate10k-000000",
            }
        ],
    }
    page = render_report(st, events, "s3://b/o")
    ids = {i for i, _, _ in IMG_RE.findall(page)}
    assert "fig-align-residual" in ids and "No aligned clips" not in page
    assert "<script>alert" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "/d/&lt;x&gt;.txt" in page and page.count("<script>") == 1  # only the report's own image counter


def test_report_on_non_output_is_a_clear_error(tmp_path):
    from pipeline.report import write_report

    (tmp_path / "some_folder").mkdir()
    with pytest.raises(FileNotFoundError, match="not a d4s output"):
        write_report(str(tmp_path / "some_folder"))
    r = runner.invoke(app, ["report", str(tmp_path / "some_folder")])
    assert r.exit_code == 2 and "not a d4s output" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "some_folder" / "report.html").exists()


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'profile'}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp)


def test_report_renders_in_headless_chromium(report, tmp_path):
    if not Path(CHROMIUM).exists() or not shutil.which(CHROMIUM):
        pytest.skip(
            f"{CHROMIUM} not found: install Debian's chromium package (`apt-get install chromium`; "
            ".ci/run does) to run the browser check"
        )
    _, path = report
    n_imgs = path.read_text(encoding="utf-8").count("<img")
    url = path.resolve().as_uri()
    dom = _chromium(["--virtual-time-budget=5000", "--dump-dom", url], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'data-images-loaded="(\d+)"', dom.stdout)
    t = re.search(r'data-images-total="(\d+)"', dom.stdout)
    assert m and t, dom.stdout[:500]
    # every <img> was decoded by the browser (complete, non-zero natural width)
    assert int(t.group(1)) == n_imgs and int(m.group(1)) == n_imgs, (m.group(1), n_imgs)
    assert "<h2>Failures</h2>" in dom.stdout
    shot = tmp_path / "shot.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1200,3000", "--virtual-time-budget=5000", url], tmp_path)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        im = im.convert("RGB")
        assert im.size == (1200, 3000)
        colours = im.getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50  # a page of plots, not a blank canvas
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100


def test_report_gallery_clips_option(built):
    out, _ = built
    r = runner.invoke(app, ["report", str(out), "--gallery-clips", "1"])
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert len(re.findall(r'<div class="clip-card" id="clip-', page)) == 1
    r = runner.invoke(app, ["report", str(out), "--gallery-clips", "0"])
    page = (out / "report.html").read_text(encoding="utf-8")
    assert r.exit_code == 0 and "<h2>Gallery</h2>" not in page and "(no shard opened)" in page
