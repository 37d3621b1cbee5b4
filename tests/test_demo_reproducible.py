"""The demo's data is the same bytes wherever and whenever it is written: the demo renders its
data under each output folder, so two demo builds are byte-identical only if the same frames
encode to the same video file (with x264's MB-tree on, small videos did not: up to 8 different
files in 60 encodes of one demo video) and every other file is written alike."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from pipeline.demo.build_demo import available_demo_datasets, writer_module
from pipeline.demo.render import render
from stages.ingest.video import write_mp4


@pytest.mark.parametrize("size", [(48, 48), (36, 64), (50, 50)])
def test_the_same_small_frames_always_encode_to_the_same_bytes(tmp_path, size):
    """The demo's Stereo4D scene (48x48) came out in two forms in two demo builds (its frames 6-9
    decoded up to 33 levels apart; tests/test_build.py's slow byte-identity test). What the encoder
    produced changed with what else the process had allocated, so allocations vary between encodes."""
    di = available_demo_datasets().index("stereo4d")
    rendered = render(writer_module("stereo4d").demo_spec(0, seed=di * 100)).rgb
    h, w = size
    frames = np.stack(
        [np.pad(f, ((0, max(0, h - 48)), (0, max(0, w - 48)), (0, 0)), mode="edge")[:h, :w] for f in rendered]
    )
    digests, held = set(), []
    for i in range(30):
        held.append(np.ones(97 * i % 5000 + 1, dtype=np.uint8))  # a different heap each time
        path = tmp_path / f"{i}.mp4"
        write_mp4(path, frames, fps=30, crf=18)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1, f"{len(digests)} different files from 30 encodes of the same frames"


def test_the_demo_data_written_twice_is_the_same_bytes(tmp_path):
    """Every file the demo writes for the nine layouts, written into two folders: the same bytes
    (the demo's videos; DynamicReplica's gzip annotations, whose header held the time written)."""
    from pipeline.demo.build_demo import write_demo_data

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    written = []
    for name in ("a", "b"):
        write_demo_data(tmp_path / name, available_demo_datasets())
        written.append(files(tmp_path / name))
        time.sleep(1.1)  # a header that records the time written would differ
    a, b = written
    assert len(a) > 100 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
