"""Input integrity between submit and commit, with real workers: the results table
never holds one video's labels under another video's sha256, and the commit's check
of the path neither follows a symlink nor hangs on a FIFO."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.faults.harness import FaultCluster
from tests.media import make_video

pytestmark = [
    pytest.mark.faults,
    pytest.mark.timeout(180),
    # The files decide these outcomes, not the database: SQLite is enough.
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]


def pad_to(path: Path, size: int) -> None:
    """Append an MP4 ``free`` box so the file is ``size`` bytes (players skip it)."""
    extra = size - path.stat().st_size
    assert extra >= 8, extra
    with open(path, "ab") as fh:
        fh.write(extra.to_bytes(4, "big") + b"free" + bytes(extra - 8))


def same_size_pair(a: Path, b: Path) -> None:
    """Two different videos padded to the same size."""
    make_video(a, seconds=2, seed=61)
    make_video(b, seconds=2, seed=62)
    size = max(a.stat().st_size, b.stat().st_size) + 64
    pad_to(a, size)
    pad_to(b, size)


def result_rows(cluster: FaultCluster, job_id: int) -> int:
    return sum(cluster.sql(f"select count(*) from {table} where job_id = :id", id=job_id)[0][0]
               for table in ("video_labels", "clip_predictions"))


@pytest.mark.parametrize("decoders", ["threads", "processes"])
def test_a_same_size_replacement_with_its_mtime_restored_fails_changed_since_submit(
    cluster: FaultCluster, tmp_path: Path, decoders: str
) -> None:
    """Before: size and mtime matched, so the worker classified the other video and
    stored its labels under the original's sha256."""
    original, other = tmp_path / "original.mp4", tmp_path / "other.mp4"
    same_size_pair(original, other)
    kept = tmp_path / "kept.mp4"
    make_video(kept, seconds=2, seed=63)
    cluster.vidq("submit", str(original), str(kept), "--batch", "swap")
    st = original.stat()
    shutil.copyfile(other, original)  # same size, other bytes
    os.utime(original, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (original.stat().st_size, original.stat().st_mtime_ns) == (st.st_size,
                                                                      st.st_mtime_ns)

    cluster.start_worker("--concurrency", "1", VIDQ_DECODERS=decoders,
                         VIDQ_DECODE_WORKERS="2")
    cluster.wait_done(2, timeout=120)
    jobs = {j["path"]: j for j in cluster.jobs()}
    swapped = jobs[str(original)]
    assert (swapped["status"], swapped["error_kind"]) == ("failed", "changed_since_submit"), jobs
    assert result_rows(cluster, swapped["id"]) == 0
    assert jobs[str(kept)]["status"] == "succeeded"  # the worker went on


def test_a_fifo_swapped_in_at_commit_fails_at_once_instead_of_hanging(
    cluster: FaultCluster, tmp_path: Path
) -> None:
    """Before: the path's size no longer matched, so the commit hashed it again with a
    plain open(), which blocks on a FIFO nobody writes: the job hung."""
    path = tmp_path / "v.mp4"
    make_video(path, seconds=2, seed=64)
    hold = cluster.hold("before_commit")
    hold.engage()
    cluster.start_worker("--concurrency", "1", **hold.env())
    cluster.vidq("submit", str(path), "--batch", "fifo")
    cluster.wait_held(hold)  # classified, nothing written
    path.unlink()
    os.mkfifo(path)
    hold.release()
    t0 = time.monotonic()
    cluster.wait_for(lambda: cluster.status_of(1) == "failed", timeout=30,
                     what="the job to fail on the FIFO")
    assert time.monotonic() - t0 < 30
    (job,) = cluster.jobs()
    assert job["error_kind"] == "changed_since_submit"
    assert "regular file" in job["error_message"]
    assert result_rows(cluster, 1) == 0


def test_a_symlink_swapped_in_at_commit_is_refused(
    cluster: FaultCluster, tmp_path: Path
) -> None:
    """Before: the commit's stat() followed the link to a copy with the same size and
    mtime, and the job succeeded for a path that is now a symlink."""
    path = tmp_path / "v.mp4"
    make_video(path, seconds=2, seed=65)
    hold = cluster.hold("before_commit")
    hold.engage()
    cluster.start_worker("--concurrency", "1", **hold.env())
    cluster.vidq("submit", str(path), "--batch", "link")
    cluster.wait_held(hold)
    copy = tmp_path / "copy.mp4"
    shutil.copy2(path, copy)  # same bytes, size and mtime
    path.unlink()
    path.symlink_to(copy)
    hold.release()
    cluster.wait_done(1, timeout=60)
    (job,) = cluster.jobs()
    assert (job["status"], job["error_kind"]) == ("failed", "changed_since_submit"), job
    assert "symbolic link" in job["error_message"]
    assert result_rows(cluster, 1) == 0
