"""The fixture writer's videos are the same bytes every time: the demo renders its data under each
output folder, so two demo builds are byte-identical only if the same frames encode to the same
file (left to the encoder to convert to yuv420p, they did not: up to 8 different files in 60 encodes
of one demo video)."""

from __future__ import annotations

import hashlib

from pipeline.demo.build_demo import available_demo_datasets, writer_module
from pipeline.demo.render import render
from stages.ingest.video import write_mp4


def test_the_demo_stereo4d_video_always_encodes_to_the_same_bytes(tmp_path):
    """The demo's Stereo4D scene whose video came out in two forms (its frames 6-9 decoded up to 33
    levels apart) in two demo builds (tests/test_build.py's slow byte-identity test)."""
    di = available_demo_datasets().index("stereo4d")
    w = writer_module("stereo4d")
    frames = render(w.demo_spec(0, seed=di * 100)).rgb
    digests = set()
    for i in range(30):
        path = tmp_path / f"{i}.mp4"
        write_mp4(path, frames, fps=30, crf=18)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1, f"{len(digests)} different files from 30 encodes of the same frames"
