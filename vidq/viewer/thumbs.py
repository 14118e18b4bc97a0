"""Keyframe thumbnails: one frame of a video as a small JPEG, decoded with PyAV
(no torch, no Pillow) and cached on disk under a size bound.

A thumbnail's cache name is a hash of the file's identity (resolved path, size,
modification time) and the time asked for, so a file replaced under the same name
gets new thumbnails. When the cache grows past its bound, the files used least
recently are removed until it is back under 80 % of it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from fractions import Fraction
from pathlib import Path
from typing import IO

from vidq.errors import InputError
from vidq.media import VideoSource

THUMB_WIDTH = 160
"""Pixels; the height keeps the video's aspect ratio (even, as JPEG's 4:2:0 needs)."""

_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vidq" / "thumbs"


def quantize_ms(at_s: float) -> int:
    """Thumbnails are taken on a 100 ms grid: nearby asks share one file."""
    return max(0, int(round(at_s * 10)) * 100)


def decode_jpeg(source: str | IO[bytes] | VideoSource, at_s: float, *,
                width: int = THUMB_WIDTH) -> bytes:
    """The frame shown at ``at_s`` seconds (the last one before it, from the nearest
    keyframe on), scaled to ``width``, as JPEG bytes."""
    import av

    try:
        with av.open(source) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            tb = stream.time_base or Fraction(1, 1000)
            start = stream.start_time or 0
            target = start + int(at_s / tb)
            container.seek(target, stream=stream, backward=True, any_frame=False)
            chosen = None
            for frame in container.decode(stream):
                if chosen is not None and frame.pts is not None and frame.pts > target:
                    break
                chosen = frame
                if frame.pts is not None and frame.pts >= target:
                    break
            if chosen is None:
                raise InputError(f"no frame at {at_s:.1f}s.", kind="not_found")
            height = max(2, int(round(chosen.height * width / chosen.width / 2)) * 2)
            image = chosen.reformat(width=width, height=height, format="yuvj420p")
            encoder = av.CodecContext.create("mjpeg", "w")
            encoder.width, encoder.height = width, height
            encoder.pix_fmt = "yuvj420p"
            encoder.time_base = Fraction(1, 25)
            image.pts = 0
            packets = list(encoder.encode(image)) + list(encoder.encode(None))
            return b"".join(bytes(p) for p in packets)
    except av.FFmpegError as exc:
        raise InputError(f"cannot decode a thumbnail at {at_s:.1f}s ({exc}).",
                         kind="decode_error") from None


class ThumbnailCache:
    """JPEGs on disk under ``directory``, at most about ``max_bytes`` in all."""

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes

    @staticmethod
    def identity(resolved: Path) -> str:
        """A local file's identity: its path, size and modification time."""
        st = resolved.stat()
        return f"{resolved}\0{st.st_size}\0{st.st_mtime_ns}"

    def key(self, identity: str, at_ms: int) -> str:
        ident = f"{identity}\0{at_ms}"
        return hashlib.sha256(ident.encode("utf-8", "surrogateescape")).hexdigest()[:40]

    def get(self, identity: str, at_ms: int,
            open_source: Callable[[], AbstractContextManager[str | IO[bytes] | VideoSource]]
            ) -> bytes:
        """The thumbnail at ``at_ms`` of the video ``identity`` names (``identity()``, or
        an object's URI and metadata); on a miss ``open_source()`` opens it to decode."""
        path = self.directory / f"{self.key(identity, at_ms)}.jpg"
        try:
            data = path.read_bytes()
            os.utime(path)  # recently used: kept by the next trim
            return data
        except FileNotFoundError:
            pass
        with open_source() as source:
            data = decode_jpeg(source, at_ms / 1000)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        self.trim()
        return data

    def trim(self) -> None:
        """Remove the least recently used thumbnails while the cache is over its bound."""
        with _LOCK:
            entries = []
            total = 0
            for entry in os.scandir(self.directory):
                if entry.name.endswith(".jpg"):
                    st = entry.stat()
                    entries.append((st.st_mtime_ns, st.st_size, entry.path))
                    total += st.st_size
            if total <= self.max_bytes:
                return
            for _mtime, size, name in sorted(entries):
                if total <= self.max_bytes * 0.8:
                    break
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    continue
                total -= size
