"""Hostile and broken inputs: each is refused or failed at once with its own error
kind (attempts == 1, never retried), nothing outside the media roots is opened,
and the worker goes on to classify a good video after them."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.faults.harness import FaultCluster, FaultMedia
from tests.media import (
    make_audio_only,
    make_corrupt,
    make_empty,
    make_random_bytes,
    make_truncated,
    make_video,
)

pytestmark = [
    pytest.mark.faults,
    pytest.mark.timeout(300),
    # The inputs decide these outcomes, not the database: SQLite is enough.
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]


def outcomes(cluster: FaultCluster) -> dict[str, tuple[str, str | None, int]]:
    """path as submitted -> (status, error_kind, attempts)."""
    return {j["path"]: (j["status"], j["error_kind"], j["attempts"]) for j in cluster.jobs()}


def test_broken_files_fail_at_once_with_their_kind_and_the_worker_goes_on(
    cluster: FaultCluster, media: FaultMedia, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    make_video(bad / "source.mp4", seconds=4, seed=41)
    make_video(bad / "source_faststart.mp4", seconds=4, seed=42, faststart=True)
    make_corrupt(bad / "source.mp4", bad / "corrupt.mp4")
    make_truncated(bad / "source.mp4", bad / "truncated.mp4")  # index at the end: cut off
    make_truncated(bad / "source_faststart.mp4", bad / "truncated_faststart.mp4")
    make_random_bytes(bad / "random.mp4")
    (bad / "text.mp4").write_text("This is a text file with a video name.\n" * 40)
    make_video(bad / "video.mp4", seconds=2, seed=43)
    (bad / "video.mp4").rename(bad / "video.txt")  # a real video with a text name
    make_audio_only(bad / "audio.m4a")
    make_video(bad / "short.mp4", seconds=1, seed=44)  # x3d_xs clips span 1.6 s
    make_empty(bad / "empty.mp4")
    names = ["corrupt.mp4", "truncated.mp4", "truncated_faststart.mp4", "random.mp4",
             "text.mp4", "video.txt", "audio.m4a", "short.mp4"]

    cluster.start_worker("--concurrency", "1")
    out = cluster.vidq("submit", *(str(bad / n) for n in names), str(bad / "empty.mp4"),
                       "--strategy", "sliding", "--batch", "bad", check=False)
    # The producer refuses the empty file itself; a row for it is written directly
    # below to check that the worker refuses it too.
    assert out.returncode == 1 and f"{bad / 'empty.mp4'}: empty file (0 bytes)." in out.stderr
    assert f"{len(names)} jobs recorded" in out.stderr
    cluster.wait_done(n=len(names))
    cluster.insert_job(str(bad / "empty.mp4"), strategy="sliding")
    cluster.publish_inserted(1)
    cluster.wait_done(n=len(names) + 1)
    cluster.vidq("submit", str(media.good[0]), "--batch", "good-after")
    cluster.wait_done(n=len(names) + 2)

    assert outcomes(cluster) == {
        str(bad / "corrupt.mp4"): ("failed", "corrupt", 1),
        str(bad / "truncated.mp4"): ("failed", "not_a_video", 1),
        str(bad / "truncated_faststart.mp4"): ("failed", "truncated", 1),
        str(bad / "random.mp4"): ("failed", "not_a_video", 1),
        str(bad / "text.mp4"): ("failed", "not_a_video", 1),
        str(bad / "video.txt"): ("succeeded", None, 1),  # content decides, not the name
        str(bad / "audio.m4a"): ("failed", "no_video_stream", 1),
        str(bad / "short.mp4"): ("succeeded", None, 1),  # one clip, padded
        str(bad / "empty.mp4"): ("failed", "empty", 1),
        str(media.good[0]): ("succeeded", None, 1),
    }
    for job in cluster.jobs():
        if job["status"] == "failed":
            # One sentence naming the file: what a user reads in `vidq show`.
            assert job["error_message"].startswith(job["path"] + ":"), job
            assert "\n" not in job["error_message"] and "Traceback" not in job["error_message"]
        else:
            cluster.assert_succeeded_once(job["id"])
    short = next(j for j in cluster.jobs() if j["path"].endswith("short.mp4"))
    assert short["clips_done"] == 1
    assert "retry" not in cluster.all_logs().lower()


def test_over_limit_inputs_are_refused_with_the_limit_named(
    cluster: FaultCluster, tmp_path: Path
) -> None:
    lim = tmp_path / "limits"
    lim.mkdir()
    make_video(lim / "wide.mp4", seconds=1, fps=10, width=320, height=192, seed=51)
    make_video(lim / "long.mp4", seconds=6, fps=10, width=64, height=48, seed=52)
    make_video(lim / "many_frames.mp4", seconds=2, fps=60, width=64, height=48, seed=53)
    make_video(lim / "big.mp4", seconds=3, fps=30, width=160, height=96, seed=54)
    make_video(lim / "ok.mp4", seconds=2, fps=10, width=64, height=48, seed=55)
    big = (lim / "big.mp4").stat().st_size
    others = [p for p in lim.iterdir() if p.name != "big.mp4"]
    assert all(p.stat().st_size < big - 1 for p in others), "only big.mp4 is over the byte limit"
    limits = {
        "VIDQ_MAX_PIXELS": "20000",  # 160x96 = 15360 fits; 320x192 does not
        "VIDQ_MAX_DURATION_S": "5",
        "VIDQ_MAX_FRAMES": "100",  # 2 s at 60 fps = 120
        "VIDQ_MAX_FILE_BYTES": str(big - 1),
    }
    expected = {
        "wide.mp4": "VIDQ_MAX_PIXELS=20000",
        "long.mp4": "VIDQ_MAX_DURATION_S=5",
        "many_frames.mp4": "VIDQ_MAX_FRAMES=100",
        "big.mp4": f"VIDQ_MAX_FILE_BYTES={big - 1}",
    }

    # A producer with the byte limit refuses the big file before recording anything.
    refused = cluster.vidq("submit", str(lim / "big.mp4"), check=False,
                           VIDQ_MAX_FILE_BYTES=str(big - 1))
    assert refused.returncode == 1 and f"VIDQ_MAX_FILE_BYTES={big - 1}" in refused.stderr
    assert "0 jobs recorded" in refused.stderr

    # Workers apply their own limits, whatever the producer that recorded the job had.
    cluster.start_worker("--concurrency", "1", **limits)
    cluster.vidq("submit", *(str(lim / n) for n in [*expected, "ok.mp4"]), "--batch", "limits")
    cluster.wait_done(n=5)
    jobs = {Path(j["path"]).name: j for j in cluster.jobs()}
    for name, named in expected.items():
        job = jobs[name]
        assert (job["status"], job["error_kind"], job["attempts"]) == ("failed", "over_limit", 1)
        assert named in job["error_message"], job["error_message"]
    assert (jobs["ok.mp4"]["status"], jobs["ok.mp4"]["attempts"]) == ("succeeded", 1)


@pytest.fixture
def http_listener() -> Iterator[tuple[int, list[bytes]]]:
    """A TCP port that records whatever connects to it: FFmpeg must never call it."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    hits: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                try:
                    hits.append(conn.recv(1024) or b"(connected)")
                except OSError:
                    hits.append(b"(connected)")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], hits
    stop.set()
    thread.join(timeout=5)
    server.close()


def test_path_attacks_are_refused_before_anything_is_opened(
    cluster: FaultCluster, tmp_path: Path, http_listener: tuple[int, list[bytes]]
) -> None:
    port, hits = http_listener
    root = tmp_path / "media"
    root.mkdir()
    make_video(root / "inside.mp4", seconds=2, seed=61)
    make_video(tmp_path / "secret.mp4", seconds=2, seed=62)  # outside the media root
    (root / "escape.mp4").symlink_to(tmp_path / "secret.mp4")
    (root / "device.mp4").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo.mp4")  # opening it to read would block forever
    cluster.env["VIDQ_MEDIA_ROOTS"] = str(root)  # producer and workers alike

    attacks = [
        f"{root}/../secret.mp4",  # traversal
        str(root / "escape.mp4"),  # symlink escape
        str(root / "device.mp4"),  # symlink to a device
        str(root / "fifo.mp4"),  # not a regular file, inside the root
        "/dev/zero",
        "/dev/urandom",
        f"concat:{root}/inside.mp4|{tmp_path}/secret.mp4",
        f"http://127.0.0.1:{port}/video.mp4",
        "pipe:0",
        f"file:{tmp_path}/secret.mp4",
    ]
    # The producer reports each one and records and enqueues nothing, whether the
    # paths come as arguments or in a manifest.
    manifest = tmp_path / "attacks.txt"
    manifest.write_text("\n".join(attacks) + "\n")
    for how in (attacks, ["--manifest", str(manifest)]):
        out = cluster.vidq("submit", *how, "--batch", "attacks", check=False)
        assert out.returncode == 1
        assert "0 jobs recorded" in out.stderr and f"{len(attacks)} rejected" in out.stderr
        for attack in attacks:
            assert f"vidq: error: {attack}: " in out.stderr, attack
    assert cluster.sql("select count(*) from jobs") == [(0,)]
    assert not redis.Redis.from_url(cluster.settings.broker_url).llen("vidq")

    # Rows written behind the producer's back meet the same checks in the worker.
    worker = cluster.start_worker("--concurrency", "1")
    ids = [cluster.insert_job(attack) for attack in attacks]
    cluster.publish_inserted(len(ids))
    # Files that are regular and inside the root but whose *content* points FFmpeg at
    # other resources: an HLS playlist and an ffconcat script, as .mp4 and as .m3u8.
    playlist = (f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://127.0.0.1:{port}/seg.ts\n"
                "#EXTINF:10,\ninside.mp4\n#EXT-X-ENDLIST\n")
    local_playlist = "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\ninside.mp4\n#EXT-X-ENDLIST\n"
    (root / "playlist.mp4").write_text(playlist)
    (root / "playlist.m3u8").write_text(local_playlist)
    (root / "concat.mp4").write_text("ffconcat version 1.0\nfile 'inside.mp4'\n")
    scripts = ["playlist.mp4", "playlist.m3u8", "concat.mp4"]
    cluster.vidq("submit", *(str(root / s) for s in scripts), str(root / "inside.mp4"),
                 "--batch", "scripts")
    cluster.wait_done(n=len(attacks) + len(scripts) + 1, timeout=120)

    jobs = {j["id"]: j for j in cluster.jobs()}
    for job_id in ids:
        job = jobs[job_id]
        outcome = (job["status"], job["error_kind"], job["attempts"])
        assert outcome == ("failed", "refused_path", 1), job
        assert "refused" in job["error_message"], job
    by_path = {Path(j["path"]).name: j for j in jobs.values() if j["id"] not in ids}
    for name in scripts:
        job = by_path[name]
        # Had FFmpeg followed the script, it would have classified inside.mp4: succeeded.
        outcome = (job["status"], job["error_kind"], job["attempts"])
        assert outcome == ("failed", "not_a_video", 1), job
    assert hits == [], "FFmpeg connected to the network"
    assert by_path["inside.mp4"]["status"] == "succeeded"
    assert worker.poll() is None
