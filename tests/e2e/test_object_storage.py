"""Object storage end to end, against a real S3-compatible server (moto's, over HTTP on
127.0.0.1): ``vidq submit s3://bucket/prefix/ --recursive``, real ``vidq worker``
processes reading the objects, rows in the results tables.

- The same videos from a bucket and from local files give the same rows.
- Media roots refuse out-of-prefix URIs at submit, and at the worker for a row whose
  URI the worker's roots do not hold.
- A missing object fails ``not_found``, an over-limit object ``over_limit``; an
  unreachable endpoint is transient (retried, then ``retries_exhausted``); missing
  credentials fail ``no_credentials``; each is one line.
- Dedupe: single-part ETags (``md5:``), full-object SHA-256 checksums (the local
  form: they dedupe against local files), multipart objects hashed.
- ``vidq export --out s3://...`` round-trips through pyarrow; ``vidq run`` reads a URI.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.media import make_video
from tests.objectstore import S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
pytest.importorskip("s3fs")

SAMPLING = ("--strategy", "uniform", "--clips", "2")
# The endpoint of the dead-store cases is asked once, briefly (VIDQ_STORAGE_OPTIONS).
FAST_FAIL = json.dumps({"s3": {"retries": 1, "config_kwargs": {
    "retries": {"max_attempts": 1}, "connect_timeout": 1}}})


def upload_tree(s3: S3Server, bucket: str, root: Path, prefix: str) -> dict[str, Path]:
    """Every file under ``root`` as ``prefix/<relative path>``; URI -> local file."""
    uris = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(root).as_posix()}"
        s3.upload(bucket, key, path)
        uris[f"s3://{bucket}/{key}"] = path
    return uris


def wait_until_done(cluster: Cluster, timeout: float = 180) -> None:
    """Until no job is queued or running (every batch)."""
    deadline = time.monotonic() + timeout
    active = "select path, status from jobs where status in ('queued', 'running')"
    while rows := cluster.sql(active):
        assert time.monotonic() < deadline, rows
        time.sleep(0.5)


def one_line_error(stderr: str, needle: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("vidq: error:")]
    assert any(needle in line for line in lines), stderr
    assert "Traceback" not in stderr, stderr


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_a_bucket_prefix_is_classified_with_the_same_rows_as_the_local_files(
    cluster: Cluster, corpus: Path, s3_server: S3Server, tmp_path: Path,
) -> None:
    env = s3_server.env
    bucket = s3_server.new_bucket()
    uris = upload_tree(s3_server, bucket, corpus, "videos")
    videos = {u: p for u, p in uris.items() if not u.endswith(".txt")}
    limit = max(p.stat().st_size for p in videos.values())
    large = tmp_path / "large.mp4"
    make_video(large, seconds=3, width=320, height=192, seed=5)
    assert large.stat().st_size > limit
    s3_server.upload(bucket, "videos/big/large.mp4", large)
    s3_server.upload(bucket, "videos/gone.mp4", b"deleted before a worker reads it")

    out = cluster.vidq("submit", f"s3://{bucket}/videos/", "--recursive", "--batch", "s3",
                       *SAMPLING, **env)
    assert "8 jobs recorded" in out.stderr, out.stderr  # notes.txt skipped by extension
    rows = cluster.sql("select path, content_sha256, size_bytes from jobs order by path")
    assert [r[0] for r in rows] == sorted([*videos, f"s3://{bucket}/videos/big/large.mp4",
                                           f"s3://{bucket}/videos/gone.mp4"])
    for path, digest, size in rows:  # single-part uploads: the ETag is the MD5
        if path in videos:
            content = videos[path].read_bytes()
            assert (digest, size) == (f"md5:{hashlib.md5(content).hexdigest()}", len(content))
    # The same files from disk: sha256 identities, so not duplicates of the md5 ones.
    out = cluster.vidq("submit", str(corpus), "--recursive", "--batch", "local", *SAMPLING)
    assert "6 jobs recorded" in out.stderr, out.stderr
    s3_server.client().delete_object(Bucket=bucket, Key="videos/gone.mp4")

    cluster.start_worker(**env, VIDQ_MAX_FILE_BYTES=str(limit))
    wait_until_done(cluster)
    outcome = dict(cluster.sql(
        "select path, coalesce(error_kind, status) from jobs where path like 's3:%'"))
    assert outcome == {**{u: "succeeded" for u in videos},
                       f"s3://{bucket}/videos/big/large.mp4": "over_limit",
                       f"s3://{bucket}/videos/gone.mp4": "not_found"}
    messages = dict(cluster.sql("select error_kind, error_message from jobs "
                                "where error_kind is not null"))
    assert messages["not_found"] == f"s3://{bucket}/videos/gone.mp4: no such object."
    assert f"is over the limit VIDQ_MAX_FILE_BYTES={limit}" in messages["over_limit"]

    def results(path: str) -> tuple[list[tuple], list[tuple], tuple]:
        (job,) = cluster.sql("select id, duration_s, fps, frames, width, height, top_label, "
                             "top_score from jobs where path = :p", p=path)
        clips = cluster.sql("select clip_index, rank, start_sec, end_sec, class_id, score "
                            "from clip_predictions where job_id = :j order by 1, 2", j=job[0])
        labels = cluster.sql("select rank, class_id, score from video_labels "
                             "where job_id = :j order by 1", j=job[0])
        return clips, labels, job[1:]

    for uri, local in videos.items():
        from_bucket, from_disk = results(uri), results(str(local))
        assert from_bucket == from_disk and len(from_bucket[0]) == 2 * 5, uri


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_media_roots_refuse_other_prefixes_at_submit_and_at_the_worker(
    cluster: Cluster, corpus: Path, s3_server: S3Server,
) -> None:
    bucket, other = s3_server.new_bucket(), s3_server.new_bucket()
    for b, key in ((bucket, "videos/v0.mp4"), (bucket, "videos-evil/v0.mp4"),
                   (other, "videos/v0.mp4")):
        s3_server.upload(b, key, corpus / "v0.mp4")
    s3_server.upload(bucket, "secret/v0.mp4", corpus / "v2.mp4")  # other content: no dedupe
    roots = {"VIDQ_MEDIA_ROOTS": f"{corpus}:s3://{bucket}/videos/"}
    refused = [f"s3://{bucket}/videos-evil/v0.mp4", f"s3://{bucket}/videos/../secret/v0.mp4",
               f"s3://{other}/videos/v0.mp4", f"S3://{bucket}/secret/v0.mp4"]
    out = cluster.vidq("submit", *refused, f"s3://{bucket}/", "--recursive", "--batch", "r",
                       check=False, **s3_server.env, **roots)
    assert out.returncode == 1 and "0 jobs recorded" in out.stderr, out.stderr
    assert out.stderr.count("refused:") == 5 and "Traceback" not in out.stderr, out.stderr
    assert cluster.sql("select count(*) from jobs") == [(0,)]
    # Inside the roots (scheme case folds), and a local file still under its root.
    out = cluster.vidq("submit", f"S3://{bucket}/videos/v0.mp4", str(corpus / "v1.mp4"),
                       "--batch", "ok", **s3_server.env, **roots)
    assert "2 jobs recorded" in out.stderr
    assert sorted(p for (p,) in cluster.sql("select path from jobs")) == sorted(
        [f"s3://{bucket}/videos/v0.mp4", str(corpus / "v1.mp4")])
    # A row the worker's roots do not hold (recorded by a producer with other roots, or
    # forged): refused by the worker before it reads a byte.
    out = cluster.vidq("submit", f"s3://{bucket}/secret/v0.mp4", "--batch", "forged",
                       **s3_server.env)
    assert "1 jobs recorded" in out.stderr
    cluster.start_worker(**s3_server.env, **roots)
    wait_until_done(cluster)
    rows = dict(cluster.sql("select path, coalesce(error_kind, status) from jobs"))
    assert rows[f"s3://{bucket}/secret/v0.mp4"] == "refused_path"
    assert rows[f"s3://{bucket}/videos/v0.mp4"] == "succeeded"
    (message,) = cluster.sql("select error_message from jobs where error_kind = 'refused_path'")
    assert message[0].startswith(f"s3://{bucket}/secret/v0.mp4: refused: outside "
                                 "VIDQ_MEDIA_ROOTS")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_an_unreachable_store_is_retried_and_missing_credentials_fail_in_one_line(
    cluster: Cluster, corpus: Path, s3_server: S3Server,
) -> None:
    bucket = s3_server.new_bucket()
    s3_server.upload(bucket, "v/v0.mp4", corpus / "v0.mp4")
    s3_server.upload(bucket, "v/v1.mp4", corpus / "v1.mp4")
    uri0, uri1 = f"s3://{bucket}/v/v0.mp4", f"s3://{bucket}/v/v1.mp4"
    dead = {**s3_server.env, "VIDQ_S3_ENDPOINT_URL": "http://127.0.0.1:1",
            "VIDQ_STORAGE_OPTIONS": FAST_FAIL}
    no_credentials = {"VIDQ_S3_ENDPOINT_URL": s3_server.endpoint,
                      "AWS_EC2_METADATA_DISABLED": "true",
                      "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull,
                      "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    # At submit: one line, exit 2, nothing recorded.
    out = cluster.vidq("submit", uri0, check=False, **dead)
    assert out.returncode == 2 and cluster.sql("select count(*) from jobs") == [(0,)]
    one_line_error(out.stderr, f"{uri0}: object store unreachable or failing")
    out = cluster.vidq("submit", uri0, check=False, **no_credentials)
    assert out.returncode == 2
    one_line_error(out.stderr, f"{uri0}: no credentials for s3://")
    # At the worker: recorded failures with their kinds.
    cluster.vidq("submit", uri0, "--batch", "dead", **s3_server.env)
    cluster.start_worker(**dead, VIDQ_MAX_RETRIES="1")
    wait_until_done(cluster)
    status = dict(cluster.sql("select path, coalesce(error_kind, status) from jobs"))
    assert status[uri0] == "retries_exhausted", status
    (message,) = cluster.sql("select error_message from jobs where path = :p", p=uri0)
    assert "gave up after 2 attempts" in message[0]
    assert f"{uri0}: object store unreachable or failing" in message[0]
    cluster.stop_workers()
    cluster.vidq("submit", uri1, "--batch", "creds", **s3_server.env)
    cluster.start_worker(**no_credentials)
    wait_until_done(cluster)
    (row,) = cluster.sql("select error_kind, error_message, attempts from jobs where path = :p",
                         p=uri1)
    assert row[0] == "no_credentials" and row[2] == 1, row
    assert "AWS_ACCESS_KEY_ID" in row[1] and "\n" not in row[1]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_etag_and_checksum_dedupe_and_multipart_objects_are_hashed(
    cluster: Cluster, s3_server: S3Server, tmp_path: Path,
) -> None:
    env = s3_server.env
    bucket = s3_server.new_bucket()
    small = os.urandom(64 * 1024)
    big = os.urandom(11 * 2**20)  # three parts of a multipart upload
    s3_server.upload(bucket, "a/one.mp4", small)
    s3_server.upload(bucket, "a/two.mp4", small)                 # same content: same ETag
    s3_server.upload(bucket, "b/sum.mp4", big, ChecksumAlgorithm="SHA256")
    etag = s3_server.upload_multipart(bucket, "b/parts.mp4", big)
    assert "-" in etag                                           # not a content hash
    (tmp_path / "big.mp4").write_bytes(big)
    out = cluster.vidq("submit", f"s3://{bucket}/a/", "--batch", "d", **env)
    assert "1 jobs recorded, 1 already classified" in out.stderr, out.stderr
    (digest,) = cluster.sql("select content_sha256 from jobs")
    assert digest == (f"md5:{hashlib.md5(small).hexdigest()}",)
    # A full-object SHA-256 checksum is the local form: the local copy and the
    # multipart object (hashed byte by byte) are the same content.
    out = cluster.vidq("submit", f"s3://{bucket}/b/sum.mp4", "--batch", "d", **env)
    assert "1 jobs recorded" in out.stderr, out.stderr
    out = cluster.vidq("submit", str(tmp_path / "big.mp4"), f"s3://{bucket}/b/parts.mp4",
                       "--batch", "d", **env)
    assert "0 jobs recorded, 2 already classified" in out.stderr, out.stderr
    assert cluster.sql("select path, content_sha256 from jobs order by id")[1] == (
        f"s3://{bucket}/b/sum.mp4", hashlib.sha256(big).hexdigest())
    # The size limit holds at submit, from the object's metadata.
    out = cluster.vidq("submit", f"s3://{bucket}/b/parts.mp4", "--force", check=False,
                       VIDQ_MAX_FILE_BYTES=str(len(big) - 1), **env)
    assert out.returncode == 1 and f"{len(big)} bytes is over the limit" in out.stderr


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_manifests_list_uris_and_other_schemes_are_one_line(
    cluster: Cluster, corpus: Path, s3_server: S3Server, tmp_path: Path,
) -> None:
    bucket = s3_server.new_bucket()
    uris = upload_tree(s3_server, bucket, corpus / "sub", "m")
    (tmp_path / "list.csv").write_text("path\n" + "\n".join(uris) + "\n")
    s3_server.upload(bucket, "lists/list.jsonl",
                     f'{{"path": "s3://{bucket}/m/w0.mkv"}}\n'.encode())
    out = cluster.vidq("submit", "--manifest", str(tmp_path / "list.csv"),
                       "--manifest", f"s3://{bucket}/lists/list.jsonl", "--batch", "m",
                       **s3_server.env)
    assert "2 jobs recorded" in out.stderr, out.stderr
    assert sorted(p for (p,) in cluster.sql("select path from jobs where batch_id = "
                                            "(select id from batches where name = 'm')")
                  ) == sorted(uris)
    # botocore's own endpoint variable is honoured; VIDQ_S3_ENDPOINT_URL wins over it.
    s3_server.upload(bucket, "e/one.mp4", b"one")
    s3_server.upload(bucket, "e/two.mp4", b"two")
    out = cluster.vidq("submit", f"s3://{bucket}/e/one.mp4", "--batch", "e",
                       **{**s3_server.env, "VIDQ_S3_ENDPOINT_URL": "",
                          "AWS_ENDPOINT_URL": s3_server.endpoint})
    assert "1 jobs recorded" in out.stderr, out.stderr
    out = cluster.vidq("submit", f"s3://{bucket}/e/two.mp4", "--batch", "e",
                       **{**s3_server.env, "AWS_ENDPOINT_URL": "http://127.0.0.1:1"})
    assert "1 jobs recorded" in out.stderr, out.stderr
    out = cluster.vidq("submit", "http://127.0.0.1:1/v.mp4", check=False)
    assert out.returncode == 1
    one_line_error(out.stderr, "'http://' is not an object store vidq reads")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        out = cluster.vidq("submit", "gs://some-bucket/v.mp4", check=False)
        assert out.returncode == 2
        one_line_error(out.stderr, "reading gs:// URIs needs the gcsfs package: pip install gcsfs")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_export_to_a_bucket_round_trips(
    cluster: Cluster, s3_server: S3Server, tmp_path: Path,
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    from tests.test_export import fill_batch

    fill_batch(cluster.database_url, "b", 400)  # 200,000 clip rows
    bucket = s3_server.new_bucket()
    for fmt in ("parquet", "csv"):
        out = cluster.vidq("export", "--batch", "b", "--format", fmt, "--out",
                           f"s3://{bucket}/exports/b", **s3_server.env)
        assert f"s3://{bucket}/exports/b/clips.{fmt}: 200000 rows" in out.stdout, out.stdout
        cluster.vidq("export", "--batch", "b", "--format", fmt, "--out",
                     str(tmp_path / "local"))
    s3 = s3_server.client()
    for table in ("videos", "clips", "segments"):
        body = s3.get_object(Bucket=bucket, Key=f"exports/b/{table}.parquet")["Body"].read()
        (tmp_path / f"{table}.parquet").write_bytes(body)
        got = pq.read_table(tmp_path / f"{table}.parquet")
        want = pq.read_table(tmp_path / "local" / f"{table}.parquet")
        assert got.num_rows > 0 and got.equals(want), table
        csv_body = s3.get_object(Bucket=bucket, Key=f"exports/b/{table}.csv")["Body"].read()
        assert csv_body == (tmp_path / "local" / f"{table}.csv").read_bytes()
    # Streamed in parts (a multipart upload), not one PUT of a buffered file.
    assert "-" in s3.head_object(Bucket=bucket, Key="exports/b/clips.csv")["ETag"]
    # A store that does not answer: one line.
    out = cluster.vidq("export", "--batch", "b", "--out", f"s3://{bucket}/exports/dead",
                       check=False, **{**s3_server.env, "VIDQ_STORAGE_OPTIONS": FAST_FAIL,
                                       "VIDQ_S3_ENDPOINT_URL": "http://127.0.0.1:1"})
    assert out.returncode == 2
    one_line_error(out.stderr, "object store unreachable or failing")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_vidq_run_classifies_an_object_in_process(
    cluster: Cluster, corpus: Path, s3_server: S3Server,
) -> None:
    bucket = s3_server.new_bucket()
    s3_server.upload(bucket, "v/v3.mp4", corpus / "v3.mp4")
    out = cluster.vidq("run", f"s3://{bucket}/v/v3.mp4", "--batch", "embedded", *SAMPLING,
                       timeout=240, **s3_server.env)
    assert "1 succeeded, 0 failed" in out.stderr, out.stderr
    assert cluster.sql("select path, status, clips_done from jobs") == [
        (f"s3://{bucket}/v/v3.mp4", "succeeded", 2)]
    assert cluster.sql("select count(*) from clip_predictions") == [(2 * 5,)]
