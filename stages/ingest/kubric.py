"""Kubric MOVi-F (google-research/kubric, TFDS ``movi_f``): synthetic dynamic objects, depth, camera.

The official release is a TFDS dataset directory of TFRecord shards of ``tf.train.Example``::

    <root>/movi_f/<512x512|256x256|128x128>/<version>/movi_f-<split>.tfrecord-NNNNN-of-MMMMM

(``<root>`` may also be the ``movi_f`` folder or a config/version folder). It is read here
without TensorFlow: TFRecord framing (uint64 length, masked CRC32C of the length, payload, masked
CRC32C of the payload) by :func:`iter_tfrecord`, and the Example protobuf through a minimal
message definition built at import (field numbers of tensorflow/core/example/*.proto).

One scene = one Example (one video) = ``<shard path>/<record index:05d>``. Features used (TFDS
flattens nested dicts with ``/``):

* ``video``: 24 PNG-encoded RGB frames (bytes list);
* ``depth``: 24 16-bit single-channel PNGs; ``metadata/depth_range`` = (min, max):
  ``distance = v / 65535 * (max - min) + min``. This is the distance from the camera centre
  (along the ray), not z-depth; z = distance / |(x_n, y_n, 1)| with x_n = (u - cx) / fx etc.
* ``camera/focal_length``, ``camera/sensor_width``: fx = fy = focal_length / sensor_width * W,
  cx = W/2, cy = H/2 (pixel centres at j + 0.5, as kubric's point-tracking code does).
* ``camera/positions`` (24, 3) and ``camera/quaternions`` (24, 4) in **w x y z** order give the
  camera-to-world pose of a Blender camera (x right, y up, looking down -z);
  ``c2w_cv = [R(q) | p] @ diag(1, -1, -1, 1)``. World frame: kubric's (z up), Blender units
  (metres).

MOVi-F contains no point tracks (kubric's point-tracking challenge computes them on the fly from
object coordinates, depth and segmentations), so this adapter returns none; the default
track_source is ``cotracker``.
"""

from __future__ import annotations

import io
import posixpath
import struct

import numpy as np
from PIL import Image
from pydantic import Field

from pipeline import geometry as geo
from pipeline.clip import Clip, ClipError, ClipMeta
from stages.ingest.base import DISCOVERY_BLOCK, AdapterDefaults, AdapterOptions, Capabilities, DatasetAdapter, SceneRef

# -- CRC32C (Castagnoli) ---------------------------------------------------------------------------


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    """CRC32C of ``data``; uses google_crc32c / crc32c when installed (much faster)."""
    try:
        import google_crc32c

        return int(google_crc32c.value(bytes(data)))
    except ImportError:
        pass
    try:
        import crc32c as _c

        return int(_c.crc32c(data))
    except ImportError:
        pass
    crc = 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
    """One TFRecord: length, masked CRC of the length, payload, masked CRC of the payload."""
    head = struct.pack("<Q", len(payload))
    return head + struct.pack("<I", masked_crc32c(head)) + payload + struct.pack("<I", masked_crc32c(payload))


def iter_record_offsets(f, where: str) -> list[tuple[int, int]]:
    """(payload offset, payload length) for every record of an open TFRecord file, by seeking."""
    out = []
    pos = 0
    while True:
        f.seek(pos)
        head = f.read(12)
        if not head:
            return out
        if len(head) < 12:
            raise ClipError(f"truncated TFRecord header at byte {pos}", where)
        (length,) = struct.unpack("<Q", head[:8])
        (hcrc,) = struct.unpack("<I", head[8:])
        if masked_crc32c(head[:8]) != hcrc:
            raise ClipError(f"corrupt TFRecord length CRC at byte {pos}", where)
        out.append((pos + 12, length))
        pos += 12 + length + 4


def read_record(f, offset: int, length: int, where: str, verify: bool = True) -> bytes:
    f.seek(offset)
    data = f.read(length + 4)
    if len(data) < length + 4:
        raise ClipError(f"truncated TFRecord payload at byte {offset}", where)
    payload, (dcrc,) = data[:length], struct.unpack("<I", data[length:])
    if verify and masked_crc32c(payload) != dcrc:
        raise ClipError(f"corrupt TFRecord payload CRC at byte {offset}", where)
    return payload


# -- minimal tf.train.Example ---------------------------------------------------------------------


def _example_classes():
    """Example / Features / Feature message classes from a hand-built descriptor (no TF)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="d4s_tf_example.proto", package="tensorflow", syntax="proto3")
    F = descriptor_pb2.FieldDescriptorProto

    def msg(name, fields, nested=(), oneofs=()):
        m = fdp.message_type.add(name=name)
        for o in oneofs:
            m.oneof_decl.add(name=o)
        for fname, num, ftype, label, tname, oneof in fields:
            fd = m.field.add(name=fname, number=num, type=ftype, label=label)
            if tname:
                fd.type_name = tname
            if oneof is not None:
                fd.oneof_index = oneof
            if ftype in (F.TYPE_FLOAT, F.TYPE_INT64) and label == F.LABEL_REPEATED:
                fd.options.packed = True
        for n in nested:
            m.nested_type.add().CopyFrom(n)
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    msg("BytesList", [("value", 1, F.TYPE_BYTES, rep, None, None)])
    msg("FloatList", [("value", 1, F.TYPE_FLOAT, rep, None, None)])
    msg("Int64List", [("value", 1, F.TYPE_INT64, rep, None, None)])
    msg(
        "Feature",
        [
            ("bytes_list", 1, F.TYPE_MESSAGE, opt, ".tensorflow.BytesList", 0),
            ("float_list", 2, F.TYPE_MESSAGE, opt, ".tensorflow.FloatList", 0),
            ("int64_list", 3, F.TYPE_MESSAGE, opt, ".tensorflow.Int64List", 0),
        ],
        oneofs=("kind",),
    )
    entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature")
    entry.options.map_entry = True
    msg("Features", [("feature", 1, F.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry", None)], nested=(entry,))
    msg("Example", [("features", 1, F.TYPE_MESSAGE, opt, ".tensorflow.Features", None)])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = message_factory.GetMessageClass
    return (
        get(pool.FindMessageTypeByName("tensorflow.Example")),
        get(pool.FindMessageTypeByName("tensorflow.Feature")),
    )


_CLASSES = None


def example_classes():
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _example_classes()
    return _CLASSES


def parse_example(payload: bytes, where: str) -> dict[str, list]:
    """Serialized Example -> {key: list of values} (bytes, floats or ints)."""
    example_cls, _ = example_classes()
    ex = example_cls()
    try:
        ex.ParseFromString(payload)
    except Exception as exc:
        raise ClipError(f"record is not a tf.train.Example ({type(exc).__name__})", where) from None
    out = {}
    for key, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        out[key] = list(getattr(feat, kind).value) if kind else []
    return out


def build_example(features: dict[str, tuple[str, list]]) -> bytes:
    """{key: ("bytes"|"float"|"int64", values)} -> serialized Example (fixture writers)."""
    example_cls, _ = example_classes()
    ex = example_cls()
    for key, (kind, values) in features.items():
        getattr(ex.features.feature[key], f"{kind}_list").value.extend(values)
    return ex.SerializeToString()


# -- adapter ----------------------------------------------------------------------------------------


class KubricMoviFOptions(AdapterOptions):
    """``datasets.kubric_movi_f.options`` (docs/CONFIG.md)."""

    verify_crc: bool = Field(True, description="check every TFRecord payload's CRC32C")


class KubricMoviFAdapter(DatasetAdapter):
    name = "kubric_movi_f"
    version = "1"
    capabilities = Capabilities(dynamic=True, has_depth=True, has_tracks=False, real=False)
    options_model = KubricMoviFOptions
    defaults = AdapterDefaults(
        clip_length=24,
        frame_stride=1,
        clip_stride=24,
        repeat_weight=1.0,
        depth_source="gt",
        track_source="cotracker",
        min_depth_m=0.01,
        max_depth_m=1000.0,
    )

    def _shards(self) -> list[str]:
        found, errors = set(), []
        for pattern in ("*.tfrecord-*", "*/*.tfrecord-*", "*/*/*.tfrecord-*", "*/*/*/*.tfrecord-*"):
            for p in self.store.glob(pattern, errors):
                rel = posixpath.relpath(p, self.store.root)
                if posixpath.basename(rel).startswith("movi_f-"):
                    found.add(rel)
        self.listing_problems([], errors, lambda rel: None)  # a folder that cannot be listed: ConfigError
        return sorted(found)

    def discover(self) -> list[SceneRef]:
        scenes = []
        for shard in self._shards():
            where = self.where(shard)
            try:  # a small block: the record headers are fetched, not the records between them
                with self.store.open(shard, block_size=DISCOVERY_BLOCK) as f:
                    offsets = iter_record_offsets(f, where)
                    if not offsets:
                        continue
                    first = parse_example(read_record(f, *offsets[0], where, verify=False), where)
                n = self._num_frames(first, where)
            except (ClipError, OSError) as exc:  # bad content: this file's scenes fail with it, no other file's
                exc = self.read_error(exc, shard) if isinstance(exc, OSError) else exc  # (transient: raised)
                scenes.append(self.unreadable_scene(f"{shard}/unreadable", exc, shard))
                continue
            for k, (off, length) in enumerate(offsets):
                scenes.append(SceneRef(self.name, f"{shard}/{k:05d}", n, extra=(shard, off, length)))
        return sorted(scenes, key=lambda s: s.scene)

    @staticmethod
    def _num_frames(ex: dict, where: str) -> int:
        if ex.get("metadata/num_frames"):
            return int(ex["metadata/num_frames"][0])
        if ex.get("video"):
            return len(ex["video"])
        raise ClipError("Example has neither metadata/num_frames nor video", where)

    def _record(self, scene: SceneRef) -> tuple[dict, str]:
        if scene.extra:
            shard, off, length = scene.extra
        else:
            shard, k = scene.scene.rsplit("/", 1)
            with self.store.open(shard, block_size=DISCOVERY_BLOCK) as f:
                offsets = iter_record_offsets(f, self.where(shard))
            if int(k) >= len(offsets):
                raise ClipError(f"record {k} beyond the {len(offsets)} records of the shard", self.where(shard))
            off, length = offsets[int(k)]
        where = self.where(shard)
        with self.store.open(shard, block_size=DISCOVERY_BLOCK) as f:  # the record, not 50 MiB past it
            payload = read_record(f, off, length, where, verify=self.opts.verify_crc)
        return parse_example(payload, where), shard

    def _floats(self, ex: dict, key: str, shape: tuple, where: str) -> np.ndarray:
        if key not in ex:
            raise ClipError(f"Example lacks feature {key!r}", where)
        arr = np.asarray(ex[key], dtype=np.float64)
        if arr.size != int(np.prod(shape)):
            raise ClipError(f"feature {key!r} has {arr.size} values, expected shape {shape}", where)
        arr = arr.reshape(shape)
        if not np.all(np.isfinite(arr)):
            raise ClipError(f"feature {key!r} contains NaN/inf", where)
        return arr

    def _png(self, data: bytes, what: str, where: str, sixteen: bool) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if sixteen:
                    if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                        raise ValueError(f"expected a 16-bit single-channel PNG, got mode {im.mode}")
                    return np.asarray(im).astype(np.uint16)
                return np.asarray(im.convert("RGB"))
        except Exception as exc:
            raise ClipError(f"{what}: unreadable or truncated PNG ({type(exc).__name__}: {exc})", where) from None

    def load_clip(self, scene: SceneRef, frames: list[int], meta: ClipMeta) -> Clip:
        self.frame_window(scene, frames)
        ex, shard = self._record(scene)
        where = f"{self.where(shard)} record {scene.scene.rsplit('/', 1)[1]}"
        n = self._num_frames(ex, where)
        video, depth_png = ex.get("video", []), ex.get("depth", [])
        if n != scene.num_frames or len(video) != n or len(depth_png) != n:
            raise ClipError(
                f"frame counts disagree: num_frames {n}, video {len(video)}, depth {len(depth_png)}, "
                f"planned {scene.num_frames}",
                where,
            )
        focal = float(self._floats(ex, "camera/focal_length", (1,), where)[0])
        sensor = float(self._floats(ex, "camera/sensor_width", (1,), where)[0])
        pos = self._floats(ex, "camera/positions", (n, 3), where)
        quat = self._floats(ex, "camera/quaternions", (n, 4), where)
        drange = self._floats(ex, "metadata/depth_range", (2,), where)
        if not 0.0 <= drange[0] < drange[1]:
            raise ClipError(f"metadata/depth_range {drange.tolist()} is not (min, max) with 0 <= min < max", where)
        qn = np.linalg.norm(quat[frames], axis=1)
        if np.any(np.abs(qn - 1.0) > 1e-3):
            raise ClipError(f"camera quaternion norm {qn.min():.4f}..{qn.max():.4f} is not 1", where)
        if focal <= 0 or sensor <= 0:
            raise ClipError(f"focal_length {focal} / sensor_width {sensor} must be positive", where)
        wxyz = quat[frames]
        rot = geo.quat_xyzw_to_matrix(np.concatenate([wxyz[:, 1:], wxyz[:, :1]], axis=1))
        c2w = geo.opengl_c2w_to_opencv(geo.make_pose(rot, pos[frames]))
        rgb, depth = [], []
        for i in frames:
            img = self._png(video[i], f"video frame {i}", where, sixteen=False)
            if rgb and img.shape != rgb[0].shape:
                raise ClipError(
                    f"video frame {i} is {img.shape[1]}x{img.shape[0]}, frame {frames[0]} is "
                    f"{rgb[0].shape[1]}x{rgb[0].shape[0]}",
                    where,
                )
            v = self._png(depth_png[i], f"depth frame {i}", where, sixteen=True)
            if v.shape != img.shape[:2]:
                raise ClipError(
                    f"depth frame {i} is {v.shape[1]}x{v.shape[0]}, video is {img.shape[1]}x{img.shape[0]}", where
                )
            rgb.append(img)
            depth.append(v)
        h, w = rgb[0].shape[:2]
        f = focal / sensor * w
        k = np.array([f, f, w / 2.0, h / 2.0])
        dist = np.stack(depth).astype(np.float64) / 65535.0 * (drange[1] - drange[0]) + drange[0]
        u, v = geo.pixel_grid(h, w)
        ray_norm = np.sqrt(((u - k[2]) / k[0]) ** 2 + ((v - k[3]) / k[1]) ** 2 + 1.0)
        z = (dist / ray_norm).astype(np.float32)
        return Clip(
            meta=meta,
            rgb=np.stack(rgb),
            intrinsics=np.tile(k, (len(frames), 1)),
            c2w=c2w,
            depth=z,
            depth_valid=self.depth_validity(z),
        ).validate()
