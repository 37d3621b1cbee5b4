"""What loading a clip fetches from an object store: about the bytes it needs, never a large file
per clip. Measured through s3fs itself (requests made, bytes fetched from a local S3 server), never
wall time.

Before: a stored video (RealEstate10K's downloaded videos, Stereo4D's raw VR180 videos) was opened
with s3fs's default 50 MiB read-ahead, so the decoder's seeks (the container header, the index at
the end, the clip's keyframe) fetched 1.4x a 77 MB video for an 8-frame clip; a pixelSplat chunk's
listing fetched 2.3x the chunk; MatrixCity's ``transforms.json`` and Virtual KITTI 2's camera
tables were fetched twice per clip.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline.clip import ClipMeta
from pipeline.demo.build_demo import write_demo_data
from pipeline.storage import Store
from stages.ingest import get_adapter


def _meta(dataset: str, scene: str, frames: list[int], real: bool = False) -> ClipMeta:
    return ClipMeta(
        dataset=dataset,
        scene=scene,
        clip_id=f"{scene}:{frames[0]}",
        frame_indices=list(frames),
        dynamic=not real,
        real=real,
        depth_source="none" if real else "gt",
        track_source="none" if real else "gt",
    )


def _upload(s3_env, root: Path, prefix: str) -> str:
    return s3_env.put_tree(root, prefix)


def _reencode_with_filler(path: Path, keep: range, total: int, seed: int = 0) -> None:
    """Rewrite ``path`` with frames ``keep`` as they were and random frames (which do not
    compress) everywhere else up to ``total`` frames: a clip's seconds inside a large video."""
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        rate = s.average_rate or Fraction(30000, 1001)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    h, w = frames[0].shape[:2]
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "23", "g": "60", "keyint_min": "60", "preset": "ultrafast"}
        s.codec_context.time_base = 1 / rate
        for i in range(total):
            img = frames[i] if i in keep and i < len(frames) else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            f.pts = i
            for pk in s.encode(f):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3demo")
    write_demo_data(root, ["realestate10k", "matrixcity", "vkitti2"], scenes=1)
    write_demo_data(root, ["stereo4d"], scenes=2)  # the second scene has a raw VR180 video
    return root


def test_a_clip_of_a_long_video_fetches_about_its_gops(demo, s3_env, s3_traffic):
    """RealEstate10K's downloaded video: the demo's sequence sits after a long lead-in; the lead-in
    and a tail become incompressible filler, so the file is large and the clip a small part."""
    root = demo / "realestate10k"
    local = get_adapter("realestate10k", str(root))
    (scene,) = local.discover()
    times = local.read_cameras(scene).timestamps
    [video] = sorted((root / "videos").glob("*.mp4"))
    import av

    with av.open(str(video)) as c:
        s = c.streams.video[0]
        first = int(round(times[0] / 1e6 * float(s.average_rate)))
        n = s.frames
    _reencode_with_filler(video, range(max(0, first - 60), n), n + 3600)
    size = video.stat().st_size
    assert size > 6e6
    frames = list(range(8))
    want = local.load_clip(scene, frames, _meta("realestate10k", scene.scene, frames, real=True))
    remote = get_adapter("realestate10k", _upload(s3_env, root, "re-video"))
    (rscene,) = remote.discover()
    s3_traffic["bytes"] = 0
    got = remote.load_clip(rscene, frames, _meta("realestate10k", rscene.scene, frames, real=True))
    np.testing.assert_array_equal(got.rgb, want.rgb)
    assert s3_traffic["bytes"] < 0.5 * size, (s3_traffic["bytes"], size)


@pytest.mark.parametrize("dataset", ["realestate10k", "stereo4d"])
def test_videos_on_an_object_store_are_read_with_a_small_read_ahead(demo, s3_env, monkeypatch, dataset):
    """Both video readers (RealEstate10K's downloaded videos, Stereo4D's raw VR180 videos) open
    the stored video with the decoders' small read-ahead, not s3fs's 50 MiB default."""
    from stages.ingest.video_decoders import VIDEO_READ_AHEAD

    opened: list[tuple[str, int | None]] = []
    real_open = Store.open

    def spy(self, rel, mode="rb", block_size=None):
        opened.append((rel, block_size))
        return real_open(self, rel, mode, block_size)

    monkeypatch.setattr(Store, "open", spy)
    opts = {"source": "raw", "output_size": 48, "min_vr180_height": 0} if dataset == "stereo4d" else {}
    adapter = get_adapter(dataset, _upload(s3_env, demo / dataset, f"{dataset}-spy"), opts)
    raw = {p.stem for p in (demo / dataset).glob("raw/*.mp4")}
    [scene] = [
        s for s in adapter.discover() if dataset != "stereo4d" or s.scene.split("/")[-1].rsplit("_", 1)[0] in raw
    ]
    frames = list(range(4))
    clip = adapter.load_clip(scene, frames, _meta(dataset, scene.scene, frames, real=True))
    assert clip.rgb.shape[0] == 4
    videos = [(rel, b) for rel, b in opened if rel.endswith(".mp4")]
    assert videos and all(b == VIDEO_READ_AHEAD for _, b in videos), opened


@pytest.mark.parametrize("dataset", ["matrixcity", "vkitti2"])
def test_a_clip_fetches_each_camera_file_once(demo, s3_env, s3_traffic, dataset):
    """MatrixCity's ``transforms.json`` and Virtual KITTI 2's ``extrinsic.txt`` / ``intrinsic.txt``
    are read once per clip (each was fetched twice)."""
    import s3fs.core as core

    adapter = get_adapter(dataset, _upload(s3_env, demo / dataset, f"{dataset}-once"))
    scenes = adapter.discover()
    scene = scenes[0]
    frames = list(range(3))
    gets: list[str] = []
    call = core.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        name = method if isinstance(method, str) else getattr(method, "__name__", str(method))
        if name == "get_object":
            gets.append(kwargs.get("Key", ""))
        return await call(self, method, *args, **kwargs)

    core.S3FileSystem._call_s3 = counting
    try:
        adapter.load_clip(scene, frames, _meta(dataset, scene.scene, frames))
    finally:
        core.S3FileSystem._call_s3 = call
    tables = [k for k in gets if k.endswith(("transforms.json", "extrinsic.txt", "intrinsic.txt"))]
    assert tables and len(tables) == len(set(tables)), sorted(tables)


def test_listing_a_chunk_fetches_its_structure_not_its_images(s3_env, s3_traffic):
    """A pixelSplat chunk (``torch.save`` of examples whose images are JPEG bytes, ~100 MB) is
    listed from its pickled structure: the images are neither needed nor fetched."""
    import io

    import torch

    from stages.ingest.realestate10k_chunks import list_examples

    g = torch.Generator().manual_seed(0)
    examples = [
        {
            "key": f"{i:016x}",
            "url": f"https://www.youtube.com/watch?v=vid{i:08d}",
            "timestamps": torch.arange(12, dtype=torch.int64) * 33_366,
            "cameras": torch.zeros(12, 18),
            "images": [torch.randint(0, 256, (200_000,), dtype=torch.uint8, generator=g) for _ in range(12)],
        }
        for i in range(5)
    ]
    buf = io.BytesIO()
    torch.save(examples, buf)
    body = buf.getvalue()
    s3_env.put("chunks/train/000000.torch", body)
    s3_traffic["bytes"] = 0
    got = list_examples(Store(s3_env.url("chunks")), "train/000000.torch")
    assert [(e.key, e.num_frames, e.problem) for e in got] == [(f"{i:016x}", 12, "") for i in range(5)]
    assert s3_traffic["bytes"] < 0.1 * len(body), (s3_traffic["bytes"], len(body))


def test_reading_a_stored_file_is_one_request(s3_env, s3_traffic):
    """A whole-file read (every frame image, depth map and camera table of a clip) is one GET; it
    was a HEAD then a GET, doubling the requests per clip."""
    s3_env.put("one/a.bin", b"x" * 1000)
    store = Store(s3_env.url("one"))
    s3_traffic["requests"] = 0
    assert store.read_bytes("a.bin") == b"x" * 1000
    assert s3_traffic["requests"] == 1
    with pytest.raises(FileNotFoundError):
        store.read_bytes("missing.bin")


def _noise_chunk(path: Path, examples: int = 5, frames: int = 12) -> None:
    """A pixelSplat chunk of ``examples`` sequences whose frames are noise JPEGs (~90 kB each)."""
    import io

    import torch
    from PIL import Image

    rng = np.random.default_rng(1)

    def jpeg() -> torch.Tensor:
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (160, 288, 3), dtype=np.uint8)).save(b, "JPEG", quality=90)
        return torch.frombuffer(bytearray(b.getvalue()), dtype=torch.uint8)

    row = [0.5, 0.9, 0.5, 0.5, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0]
    chunk = [
        {
            "key": f"{i:016x}",
            "url": f"https://www.youtube.com/watch?v=vid{i:08d}",
            "timestamps": torch.arange(frames, dtype=torch.int64) * 33_366 + 1000,
            "cameras": torch.tensor([row] * frames, dtype=torch.float32),
            "images": [jpeg() for _ in range(frames)],
        }
        for i in range(examples)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(chunk, path)


def test_a_clip_from_a_remote_chunk_fetches_its_frames_not_the_chunk(tmp_path, s3_env, s3_traffic):
    """A remote chunk was read whole (~100 MB) by every process that loaded one of its examples;
    now its structure (small, kept per process) and then only the clip's images and cameras."""
    root = tmp_path / "re"
    _noise_chunk(root / "train" / "000000.torch", examples=10, frames=24)
    size = (root / "train" / "000000.torch").stat().st_size
    frames = [2, 3, 4, 5]
    local = get_adapter("realestate10k", str(root))
    scene = next(s for s in local.discover() if s.scene.endswith(f"{3:016x}"))
    want = local.load_clip(scene, frames, _meta("realestate10k", scene.scene, frames, real=True))
    remote = get_adapter("realestate10k", _upload(s3_env, root, "re-chunk"))
    rscene = next(s for s in remote.discover() if s.scene == scene.scene)
    s3_traffic["bytes"] = 0
    got = remote.load_clip(rscene, frames, _meta("realestate10k", rscene.scene, frames, real=True))
    np.testing.assert_array_equal(got.rgb, want.rgb)
    np.testing.assert_array_equal(got.c2w, want.c2w)
    np.testing.assert_array_equal(got.intrinsics, want.intrinsics)
    assert got.meta.extra == want.meta.extra
    assert s3_traffic["bytes"] < 0.1 * size, (s3_traffic["bytes"], size)


def test_a_remote_chunk_cut_short_fails_its_clips_naming_it(tmp_path, s3_env):
    from pipeline.clip import ClipError

    root = tmp_path / "re"
    _noise_chunk(root / "train" / "000000.torch", examples=2, frames=6)
    url = _upload(s3_env, root, "re-cut")
    remote = get_adapter("realestate10k", url)
    scene = remote.discover()[1]
    body = (root / "train" / "000000.torch").read_bytes()
    s3_env.put("re-cut/train/000000.torch", body[: len(body) // 2])  # rewritten after discovery
    with pytest.raises(ClipError) as err:
        remote.load_clip(scene, [0, 1], _meta("realestate10k", scene.scene, [0, 1], real=True))
    assert "000000.torch" in str(err.value.path) and "truncated" in err.value.reason, str(err.value)
