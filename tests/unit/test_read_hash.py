"""The decoder hashes the bytes it read: every byte of the file, in whatever order and
with whatever seeks FFmpeg read them, so the commit can compare them with the hash
taken at submit (vidq/media.py's ``HashingReader``)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from tests.media import make_video
from vidq.errors import TransientError
from vidq.media import HashingReader, changed_since_submit, sha256_file
from vidq.sampling import Sampling
from worker.decoders import DecodeConfig, decode_video
from worker.models import get_preset


def test_reads_in_any_order_hash_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "bytes.bin"
    path.write_bytes(random.Random(5).randbytes(3_000_000))
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = HashingReader(fd, raw=str(path))
        reader.read(1000)
        reader.seek(-5000, os.SEEK_END)  # an index at the end, read first
        reader.read(5000)
        reader.seek(1000)
        reader.read(200_000)
        reader.seek(2_000_000)  # a seek forward over what the decoder does not need
        reader.read(10_000)
        assert reader.sha256() == sha256_file(path)
    finally:
        os.close(fd)


@pytest.mark.parametrize("faststart", [False, True])
@pytest.mark.parametrize("sampling", [Sampling(strategy="single"),
                                      Sampling(strategy="uniform", clips=2)])
def test_the_decode_reports_the_hash_of_the_file_it_read(
    tmp_path: Path, faststart: bool, sampling: Sampling
) -> None:
    path = tmp_path / "v.mp4"
    make_video(path, seconds=12, seed=3, faststart=faststart, gop=30)
    done = decode_video(str(path), sampling, DecodeConfig(preset=get_preset("x3d_xs")),
                        prepare=lambda clip: None, started=lambda info: None,
                        clip_ready=lambda clip, prepared: None, check=lambda: None)
    assert done.clips >= 1
    assert done.stats.sha256 == sha256_file(path)


def submitted(path: Path) -> dict[str, object]:
    st = path.stat()
    return dict(size_bytes=st.st_size, mtime_ns=st.st_mtime_ns,
                content_sha256=sha256_file(path))


def test_a_read_hash_that_differs_is_a_change_whatever_the_stat_says(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    make_video(path, seconds=2, seed=1)
    job = submitted(path)
    assert changed_since_submit(str(path), read_sha256=job["content_sha256"], **job) is None
    changed = changed_since_submit(str(path), read_sha256="0" * 64, **job)
    assert changed is not None and changed.kind == "changed_since_submit"


def test_a_fifo_or_a_symlink_at_the_path_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "v.mp4"
    make_video(path, seconds=2, seed=1)
    job = submitted(path)
    copy = tmp_path / "copy.mp4"
    os.link(path, copy)
    path.unlink()
    path.symlink_to(copy)  # the same bytes, through a symlink
    changed = changed_since_submit(str(path), **job)
    assert changed is not None and "symbolic link" in changed.message
    path.unlink()
    os.mkfifo(path)  # nobody ever writes: an open() without O_NONBLOCK blocks forever
    t0 = time.monotonic()
    changed = changed_since_submit(str(path), **job)
    assert changed is not None and "regular file" in changed.message
    assert time.monotonic() - t0 < 5


def test_a_check_that_hangs_is_given_up_as_transient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vidq.media as media

    path = tmp_path / "v.mp4"
    make_video(path, seconds=2, seed=1)
    job = submitted(path)
    monkeypatch.setattr(media, "_local_changed", lambda *a, **k: time.sleep(30))
    t0 = time.monotonic()
    with pytest.raises(TransientError) as info:
        changed_since_submit(str(path), timeout_s=0.5, **job)
    assert info.value.kind == "check_timeout"
    assert time.monotonic() - t0 < 5


def test_a_path_gone_at_commit_is_this_hosts_trouble_unless_the_read_proved_the_bytes(
    tmp_path: Path,
) -> None:
    """A mount that went away after the decode: the bytes hashed while decoding are the
    submitted ones, so the result stands; without that hash, the path this host cannot
    open says nothing about the video (``not_found``, host-local), not a change."""
    path = tmp_path / "v.mp4"
    make_video(path, seconds=2, seed=1)
    job = submitted(path)
    path.unlink()
    assert changed_since_submit(str(path), read_sha256=job["content_sha256"], **job) is None
    changed = changed_since_submit(str(path), **job)
    assert changed is not None and changed.kind == "not_found", changed
    changed = changed_since_submit(str(path), read_sha256="0" * 64, **job)
    assert changed is not None and changed.kind == "changed_since_submit"
