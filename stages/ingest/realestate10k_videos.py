"""Where a RealEstate10K sequence's downloaded YouTube video is.

A camera file names its video by URL on line 1 (``https://www.youtube.com/watch?v=<id>``); many
sequences share one video. Users keep one file per YouTube id, named by a downloader: d4s finds it
either through ``video_map`` (a CSV ``video_id,path`` or a JSON object ``{video_id: path}``) or by
trying ``video_pattern`` templates in order (placeholders ``{video_id}``, ``{split}``,
``{sequence}``). Paths are relative to ``video_root`` (default: the dataset root) and may not
leave it (``..`` and absolute paths are refused, as everywhere in d4s).
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
from functools import lru_cache
from urllib.parse import parse_qs, urlparse

from pipeline.clip import ClipError
from pipeline.storage import PathEscapeError, Store

DEFAULT_PATTERNS = (
    "videos/{video_id}.mp4",
    "videos/{video_id}.mkv",
    "videos/{video_id}.webm",
    "{split}/videos/{video_id}.mp4",
)
YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{11}")


def youtube_id(url: str) -> str | None:
    """The 11-character id of a YouTube URL (watch?v=, youtu.be/, /embed/, /shorts/), else None."""
    try:
        u = urlparse(url.strip())
    except ValueError:
        return None
    host = (u.hostname or "").lower()
    candidates = []
    if host.endswith("youtu.be"):
        candidates.append(u.path.strip("/").split("/")[0])
    elif "youtube" in host:
        candidates += parse_qs(u.query).get("v", [])
        parts = u.path.strip("/").split("/")
        if len(parts) >= 2 and parts[0] in ("embed", "shorts", "v", "live"):
            candidates.append(parts[1])
    return next((c for c in candidates if YOUTUBE_ID.fullmatch(c)), None)


@lru_cache(maxsize=4)
def _read_map(store_url: str, rel: str, version: str) -> dict[str, str]:
    """The map file's entries; ``version`` (size and modification time) makes an edit visible."""
    text = Store(store_url).read_text(rel)
    if rel.lower().endswith(".json"):
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a JSON video map must be an object {video_id: path}")
        return {str(k): str(v) for k, v in data.items()}
    out = {}
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 2 or not row[0].strip() or row[0].strip().lower() in ("video_id", "id", "youtube_id"):
            continue
        out[row[0].strip()] = row[1].strip()
    return out


class VideoLocator:
    def __init__(self, store: Store, video_root: str | None, video_map: str | None, patterns):
        self.store = Store(video_root) if video_root else store
        self.patterns = tuple(patterns)
        self.map_store, self.map_rel = None, None
        if video_map:  # absolute path or URL, else relative to the dataset root
            if "://" in video_map or video_map.startswith("/"):
                parent, name = posixpath.split(video_map)
                self.map_store, self.map_rel = Store(parent), name
            else:
                self.map_store, self.map_rel = store, video_map

    def locate(self, video_id: str, split: str, sequence: str) -> tuple[str | None, list[str]]:
        """(path relative to the video root or None, the places looked at)."""
        if self.map_store is not None:
            where = self.map_store.display(self.map_rel)
            try:
                info = self.map_store.fs.info(self.map_store.path(self.map_rel))
                version = f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or ''}"
                mapping = _read_map(self.map_store.url, self.map_rel, version)
            except Exception as exc:
                raise ClipError(f"video_map is unreadable ({type(exc).__name__}: {exc})", where) from None
            if video_id not in mapping:
                return None, [f"{where} (no entry for {video_id})"]
            candidates = [mapping[video_id]]
        else:
            candidates = [p.format(video_id=video_id, split=split, sequence=sequence) for p in self.patterns]
        tried = []
        for rel in candidates:
            try:
                if self.store.exists(rel):
                    return rel, tried + [self.store.display(rel)]
            except PathEscapeError:
                raise ClipError(f"video path {rel!r} leaves the video root", self.store.display("")) from None
            tried.append(self.store.display(rel))
        return None, tried
