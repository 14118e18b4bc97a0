"""Object-storage inputs in-process, against a real S3-compatible server (moto's, over
HTTP on 127.0.0.1): the access rules, decoding straight from a bucket, the bounded
temporary copy, and the size limit on bytes actually read.

- Media roots are matched on (scheme, bucket, key segments): ``videos-evil``, ``..``,
  another bucket, another scheme are refused, and refused before any request (the
  endpoint is a dead port: a request would be a transient error, not a refusal).
- Decoding a streamed object gives exactly the frames of the local file (MP4 with its
  index at the end, Matroska, AVI, WebM), through a seekable reader, no copy.
- A stream that cannot seek is copied to a temporary file bounded by the size limit.
- An object replaced after submit, or while it is read, is caught.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tests.media import Media
from tests.objectstore import S3Server
from vidq.errors import ConfigError, InputError, TransientError
from vidq.media import check_input, open_video
from vidq.sampling import Sampling, plan_windows
from vidq.settings import Settings
from vidq.storage import (
    READ_BLOCK_BYTES,
    BoundedReader,
    StorageConfig,
    check_object,
    content_hash,
    hash_object,
    object_changed,
    open_object,
    spool,
)
from worker.video import VideoReader

pytest.importorskip("s3fs")

# A dead endpoint, asked once, quickly: any request made shows up as TransientError.
DEAD = StorageConfig(s3_endpoint_url="http://127.0.0.1:1", options_json=json.dumps(
    {"s3": {"retries": 1, "config_kwargs": {"retries": {"max_attempts": 1},
                                            "connect_timeout": 1}}}))
ROOTS = ("s3://media-bucket/videos/",)


def test_bucket_roots_cannot_be_fooled_and_refuse_before_any_request() -> None:
    refused = [
        "s3://media-bucket/videos-evil/a.mp4",      # a sibling prefix sharing the root's start
        "s3://media-bucket/videos/../secret/a.mp4",  # '..' segments
        "s3://media-bucket/videos/./a.mp4",
        "s3://media-bucket/videos//a.mp4",           # an empty segment
        "s3://media-bucket/videos\\..\\a.mp4",
        "s3://media-bucket/videos/a.mp4?versionId=1",
        "s3://media-bucket/a.mp4",
        "s3://other-bucket/videos/a.mp4",            # another bucket
        "s3://media-bucket.evil/videos/a.mp4",
        "gs://media-bucket/videos/a.mp4",            # another scheme
        "S3://MEDIA-BUCKET/videos/a.mp4",            # bucket names are exact
        "http://media-bucket/videos/a.mp4",          # not an object store vidq reads
        "file:///etc/passwd",
        "simplecache::s3://media-bucket/videos/a.mp4",  # fsspec chaining
        "/etc/passwd",                               # roots list only a bucket prefix
    ]
    t0 = time.monotonic()
    for raw in refused:
        with pytest.raises(InputError) as info:
            check_input(raw, media_roots=ROOTS, storage_config=DEAD)
        assert info.value.kind == "refused_path", (raw, info.value.message)
        assert "\n" not in info.value.message
    assert time.monotonic() - t0 < 1.0  # no connection attempted
    # Scheme case and aliases fold: these are under the root, so they are looked up
    # (and the dead endpoint says so).
    for raw in ("s3://media-bucket/videos/a.mp4", "S3://media-bucket/videos/sub/a.mp4",
                "s3a://media-bucket/videos/a.mp4"):
        with pytest.raises(TransientError) as info:
            check_input(raw, media_roots=ROOTS, storage_config=DEAD)
        assert info.value.kind == "storage_unavailable"
        assert "object store unreachable" in info.value.message
    # A whole-bucket root, and roots of local directories only.
    with pytest.raises(TransientError):
        check_input("s3://media-bucket/x/y.mp4", media_roots=("s3://media-bucket",),
                    storage_config=DEAD)
    with pytest.raises(InputError) as info:
        check_input("s3://media-bucket/videos/a.mp4", media_roots=("/data",),
                    storage_config=DEAD)
    assert "outside VIDQ_MEDIA_ROOTS (no object-store prefix)" in info.value.message


def test_media_roots_split_on_the_path_separator_but_not_inside_a_uri() -> None:
    settings = Settings.from_env({"VIDQ_MEDIA_ROOTS": "/data:s3://b1/videos/:gs://b2"})
    assert settings.media_roots == ("/data", "s3://b1/videos/", "gs://b2")


def test_bad_storage_options_are_one_line() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        StorageConfig(options_json="{s3").filesystem("s3")
    with pytest.raises(ConfigError, match="JSON object of objects per scheme"):
        StorageConfig(options_json='{"s3": 1}').filesystem("s3")


def _clips(reader: VideoReader) -> list[np.ndarray]:
    windows = plan_windows(Sampling(strategy="sliding", stride_s=0.5), reader.info.duration_s,
                           Fraction(16, 15))
    return [c.frames for c in reader.clips(windows, num_frames=8)]


def _local(path: Path) -> tuple[object, list[np.ndarray]]:
    with VideoReader(path) as reader:
        return reader.info, _clips(reader)


@pytest.mark.parametrize("name", ["h264_30", "h264_60_mkv", "mpeg4_avi", "vp9_webm", "vfr"])
def test_an_object_streams_into_the_decoder_with_the_local_files_frames(
    name: str, media_files: Media, s3_server: S3Server,
) -> None:
    local = getattr(media_files, name)
    bucket = s3_server.new_bucket()
    s3_server.upload(bucket, f"videos/{local.name}", local)
    uri = f"s3://{bucket}/videos/{local.name}"
    storage = StorageConfig(s3_endpoint_url=s3_server.endpoint)
    want_info, want = _local(local)
    with open_video(uri, media_roots=(f"s3://{bucket}/videos",), storage_config=storage,
                    max_file_bytes=local.stat().st_size) as source:
        # Streamed by range requests: the object itself, no temporary copy.
        assert isinstance(source, BoundedReader)
        with VideoReader(uri, source=source) as reader:
            assert reader.info == want_info
            got = _clips(reader)
            again = _clips(reader)  # a second pass reopens the stream from the start
        assert 0 < source.bytes_read
    assert len(got) == len(want) == len(again) > 1
    for a, b, c in zip(got, want, again):
        assert np.array_equal(a, b) and np.array_equal(c, b)


class OneWay(io.RawIOBase):
    """A stream that cannot seek (as some fsspec filesystems hand out)."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        chunk = self._data.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


def test_a_stream_that_cannot_seek_is_spooled_within_the_size_limit(media_files: Media
                                                                      ) -> None:
    data = media_files.h264_30.read_bytes()
    want_info, want = _local(media_files.h264_30)
    with spool(OneWay(data), raw="x://v.mp4", limit=len(data)) as tmp, \
            VideoReader("x://v.mp4", source=tmp) as reader:
        assert reader.info == want_info
        got = _clips(reader)
    assert all(np.array_equal(a, b) for a, b in zip(got, want)) and len(got) == len(want)
    with pytest.raises(InputError) as info:
        spool(OneWay(data), raw="x://v.mp4", limit=len(data) - 1)
    assert info.value.kind == "over_limit"


def test_the_size_limit_holds_on_metadata_and_on_bytes_read(
    media_files: Media, s3_server: S3Server,
) -> None:
    local = media_files.h264_30
    size = local.stat().st_size
    bucket = s3_server.new_bucket()
    s3_server.upload(bucket, "v.mp4", local)
    uri = f"s3://{bucket}/v.mp4"
    storage = StorageConfig(s3_endpoint_url=s3_server.endpoint)
    assert check_object(uri, max_file_bytes=size, storage=storage).size == size
    with pytest.raises(InputError) as info:
        check_object(uri, max_file_bytes=size - 1, storage=storage)
    assert info.value.kind == "over_limit" and f"{size} bytes is over" in info.value.message
    # Metadata that understated the size: the reader still stops at the limit.
    fs = storage.filesystem("s3")
    with fs.open(f"{bucket}/v.mp4", "rb") as fh, pytest.raises(InputError) as info, \
            VideoReader(uri, source=BoundedReader(fh, raw=uri, limit=size // 2)) as reader:
        _clips(reader)
    assert info.value.kind == "over_limit"
    assert "VIDQ_MAX_FILE_BYTES" in info.value.message


def test_missing_objects_and_buckets_are_permanent_a_dead_endpoint_transient(
    s3_server: S3Server,
) -> None:
    storage = StorageConfig(s3_endpoint_url=s3_server.endpoint)
    bucket = s3_server.new_bucket()
    for raw in (f"s3://{bucket}/nope.mp4", "s3://vidq-no-such-bucket/v.mp4"):
        with pytest.raises(InputError) as info:
            check_input(raw, storage_config=storage)
        assert info.value.kind == "not_found" and info.value.message == f"{raw}: no such object."


def test_a_changed_object_is_caught_after_decode_and_while_it_is_read(
    s3_server: S3Server,
) -> None:
    storage = StorageConfig(s3_endpoint_url=s3_server.endpoint)
    bucket = s3_server.new_bucket()
    small, other = b"a" * 4096, b"b" * 4096
    s3_server.upload(bucket, "v.mp4", small)
    uri = f"s3://{bucket}/v.mp4"
    meta = check_object(uri, storage=storage)
    md5 = content_hash(meta, storage=storage)
    assert md5 == f"md5:{hashlib.md5(small).hexdigest()}"

    def changed(digest: str, modified_ns: int | None = meta.modified_ns,
                kind: str = "changed_since_submit") -> str | None:
        error = object_changed(uri, size_bytes=len(small), modified_ns=modified_ns,
                               content_hash=digest, storage=storage)
        assert error is None or error.kind == kind
        return None if error is None else error.message

    sha = hash_object(meta, storage=storage)
    assert sha == hashlib.sha256(small).hexdigest()
    assert changed(md5) is None and changed(sha) is None
    s3_server.upload(bucket, "v.mp4", small)  # the same bytes again: a new LastModified
    assert changed(md5) is None and changed(sha, modified_ns=1) is None  # hashed again
    s3_server.upload(bucket, "v.mp4", other)  # same size, other content
    assert "its ETag differs" in (changed(md5) or "")
    assert "its content hash differs" in (changed(sha, modified_ns=1) or "")
    s3_server.client().delete_object(Bucket=bucket, Key="v.mp4")
    # Gone for this host: host-local (not_found) until another host agrees.
    assert "no longer readable since it was submitted" in (changed(md5, kind="not_found") or "")

    # Replaced while a worker streams it: the next range request is refused (If-Match).
    big = os.urandom(READ_BLOCK_BYTES + 4096)
    s3_server.upload(bucket, "big.mp4", big)
    with open_object(f"s3://{bucket}/big.mp4", storage=storage) as fh:
        assert fh.read(1000) == big[:1000]
        s3_server.upload(bucket, "big.mp4", os.urandom(len(big)))
        fh.seek(READ_BLOCK_BYTES)
        with pytest.raises(InputError) as info:
            fh.read(1000)
    assert info.value.kind == "changed_since_submit"
    assert "replaced while it was read" in info.value.message
