"""What reading samples of an output's shards fetches from an object store: about the samples read,
never tens of MB per sample. Counted through s3fs (the ``s3_traffic`` fixture), never wall time.

Before: a sample read by seeking to its byte offset (``d4s show``, the report's gallery, the training
loader when a dataset has fewer shards than parts, validation, ``d4s eval``) went through s3fs's
default 50 MiB read-ahead: 11.5x a 4.5 MB sample from a 73 MB shard.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

SAMPLES = 8
SAMPLE_BYTES = 2_500_000


def _shard() -> tuple[bytes, list[tuple[str, int]]]:
    """A shard of SAMPLES samples (~2.5 MB each, incompressible) and each sample's (key, offset)."""
    buf = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(SAMPLES):
            key = f"synth__s{i}__0"
            for entry, data in (
                ("meta.json", json.dumps({"clip_id": key}).encode()),
                ("rgb.bin", os.urandom(SAMPLE_BYTES // 2)),
                ("depth.bin", os.urandom(SAMPLE_BYTES // 2)),
            ):
                info = tarfile.TarInfo(f"{key}.{entry}")
                info.size = len(data)
                if entry == "meta.json":
                    offsets.append((key, buf.tell()))
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), offsets


@pytest.fixture
def shard_on_s3(s3_env):
    body, offsets = _shard()
    s3_env.put("out-reads/shards/synth/synth-000000.tar", body)
    return s3_env.url("out-reads"), "shards/synth/synth-000000.tar", body, offsets


def test_the_training_loader_reads_a_sample_by_offset_not_the_shard_after_it(shard_on_s3, s3_traffic):
    from training.data import iter_tar_runs

    root, rel, body, offsets = shard_on_s3
    key, offset = offsets[2]
    s3_traffic["bytes"] = 0
    (got,) = list(iter_tar_runs(f"{root}/{rel}", [(offset, 1)]))
    assert got["__key__"] == key and len(got["rgb.bin"]) == SAMPLE_BYTES // 2
    assert s3_traffic["bytes"] < 2 * SAMPLE_BYTES, (s3_traffic["bytes"], len(body))


def test_show_reads_one_sample_not_the_shard_after_it(shard_on_s3, s3_traffic):
    from pipeline.shard_read import SampleLocation, read_sample
    from pipeline.storage import Store

    root, rel, body, offsets = shard_on_s3
    key, offset = offsets[1]
    s3_traffic["bytes"] = 0
    got = read_sample(Store(root), SampleLocation(key, "synth", "synth-000000", rel, offset, 9))
    assert json.loads(got["meta.json"])["clip_id"] == key and len(got["depth.bin"]) == SAMPLE_BYTES // 2
    assert s3_traffic["bytes"] < 2 * SAMPLE_BYTES, (s3_traffic["bytes"], len(body))


def test_a_shard_still_as_published_is_not_downloaded_to_check_it(shard_on_s3, s3_traffic):
    """The loader checks a shard against its build's sha256 before use. It downloaded every shard
    whole for that in every process that read one of its samples (8.7x the samples read by 24
    parts of a 3-shard dataset in the audit); a shard whose stored object still has the
    fingerprint its build recorded when it published it (hashed then) is trusted as resume trusts
    it; any other is downloaded and hashed as before."""
    import hashlib

    from pipeline.storage import Store
    from training import data

    root, rel, body, offsets = shard_on_s3
    url, sha = f"{root}/{rel}", hashlib.sha256(body).hexdigest()
    published = Store(root).fingerprint_of(rel)
    key, offset = offsets[3]
    data._VERIFIED.pop(url, None)
    s3_traffic["bytes"] = 0
    (got,) = list(data.iter_tar_runs(url, [(offset, 1)], sha, published))
    assert got["__key__"] == key
    assert s3_traffic["bytes"] < 2 * SAMPLE_BYTES, (s3_traffic["bytes"], len(body))
    # another object than the one published (rewritten since): hashed whole before use
    data._VERIFIED.pop(url, None)
    s3_traffic["bytes"] = 0
    (got,) = list(data.iter_tar_runs(url, [(offset, 1)], sha, "0:another-etag"))
    assert got["__key__"] == key and s3_traffic["bytes"] >= len(body)
