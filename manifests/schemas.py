"""Arrow schemas of every manifest table (documented field by field in docs/MANIFESTS.md)."""

import pyarrow as pa

SCENE_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("scene", pa.string()),
        ("num_frames", pa.int64()),
        ("num_clips", pa.int64()),
        ("note", pa.string()),  # why a scene gave no clips (too short, discovery problem)
    ]
)

CLIP_SCHEMA = pa.schema(
    [
        ("clip_id", pa.string()),
        ("ordinal", pa.int64()),  # position in the global plan order (stable)
        ("dataset", pa.string()),
        ("scene", pa.string()),
        ("start", pa.int64()),
        ("frames", pa.list_(pa.int64())),
        ("shard_id", pa.string()),
    ]
)

SHARD_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("dataset", pa.string()),
        ("path", pa.string()),  # relative to the output root
        ("num_clips", pa.int64()),
        ("clip_ids", pa.list_(pa.string())),
    ]
)

LEDGER_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),  # total order of events: lease epoch << 40 | counter (manifests/store.py)
        ("shard_id", pa.string()),
        ("state", pa.string()),  # pending | running | done | failed
        ("attempt", pa.int64()),
        ("error", pa.string()),
        ("error_class", pa.string()),  # failed events: transient (resume retries) | permanent
        ("samples_written", pa.int64()),
        ("clips_failed", pa.string()),  # JSON list of {clip_id, stage, reason, path}
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("fingerprint", pa.string()),  # the stored object's identity (size + ETag, or size + mtime + inode)
        ("content_hash", pa.string()),  # BuildConfig.content_hash() the shard was built with
        ("started_at", pa.float64()),
        ("finished_at", pa.float64()),
        ("timings", pa.string()),  # JSON {stage: seconds}
        ("samples", pa.string()),  # JSON list of [key, byte offset, num_frames, dynamic] (done events)
        ("clip_qc", pa.string()),  # JSON list of per-sample QC records (manifests/clip_qc.py; done events)
        (
            "stage_counts",
            pa.string(),
        ),  # JSON {stage: {in, out, dropped_by_reason, seconds}} (manifests/stage_counts.py; done events)
        ("host", pa.string()),
        ("build_id", pa.string()),
    ]
)

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("dataset", pa.string()),
        ("shard_id", pa.string()),
        ("shard_path", pa.string()),
        ("shard_sha256", pa.string()),  # of the whole shard; the training loader checks it before use
        ("shard_fingerprint", pa.string()),  # the stored object's identity when it was published
        ("offset", pa.int64()),  # byte offset of the sample's first tar member header
        ("num_frames", pa.int64()),
        ("dynamic", pa.bool_()),
        ("scene", pa.string()),
        ("split", pa.string()),  # train | val: held-out scenes (pipeline/split.py), never read by training
    ]
)
