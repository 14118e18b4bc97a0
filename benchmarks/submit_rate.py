"""Producer throughput: ``vidq submit`` of N files into Redis, with SQLite and with
PostgreSQL, against a raw Redis push of the same number of messages of the same
size, measured in the same run.

    python benchmarks/submit_rate.py [--files 10000] [--pg postgresql+psycopg://postgres@127.0.0.1/test]

The files are small distinct blobs with a video extension: the producer never
decodes, it checks, hashes, records and publishes, which is what is measured.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

from producer.submit import JobRequest, discover, submit
from vidq.db import dispose_engines
from vidq.queue import make_celery, new_task_id
from vidq.settings import Settings


def make_files(root: Path, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i:06d}.mp4").write_bytes(os.urandom(2048))


def raw_redis_rate(url: str, n: int, payload: bytes) -> float:
    """LPUSH of n messages of the producer's message size, one per round trip
    (as Celery's Redis transport publishes), the floor for any producer."""
    client = redis.Redis.from_url(url)
    client.delete("bench-raw")
    t0 = time.perf_counter()
    for _ in range(n):
        client.lpush("bench-raw", payload)
    elapsed = time.perf_counter() - t0
    client.delete("bench-raw")
    return n / elapsed


def message_size(settings: Settings) -> bytes:
    """One real vidq message, as the producer would publish it."""
    app = make_celery(settings)
    client = redis.Redis.from_url(settings.broker_url)
    client.delete(settings.queue)
    app.send_task("vidq.classify", args=[1], task_id=new_task_id(), queue=settings.queue)
    raw = client.lpop(settings.queue) or b"x" * 1000
    return raw


def submit_rate(root: Path, settings: Settings) -> tuple[float, int]:
    paths = list(discover([str(root)]))
    t0 = time.perf_counter()
    report = submit(paths, settings=settings, request=JobRequest(), batch=f"bench-{uuid.uuid4().hex[:6]}")
    elapsed = time.perf_counter() - t0
    assert report.publish_error is None, report.publish_error
    assert len(report.job_ids) == len(paths) == report.published
    return len(paths) / elapsed, report.published


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "files"
        t = time.perf_counter()
        make_files(root, args.files)
        print(f"wrote {args.files} files in {time.perf_counter() - t:.1f}s")
        redis.Redis.from_url(args.broker).flushdb()
        base = Settings.from_env(broker_url=args.broker)
        payload = message_size(base)
        raw = raw_redis_rate(args.broker, args.files, payload)
        print(f"raw Redis LPUSH ({len(payload)} B messages): {raw:,.0f} msg/s  (baseline)")

        targets = {"sqlite": f"sqlite:///{tmp}/bench.db"}
        pg_db = f"vidq_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{pg_db}"'))
        targets["postgresql"] = args.pg.rsplit("/", 1)[0] + "/" + pg_db
        try:
            for name, url in targets.items():
                redis.Redis.from_url(args.broker).flushdb()
                rate, sent = submit_rate(root, base.replace(database_url=url))
                client = redis.Redis.from_url(args.broker)
                queued = sum(client.llen(k) for k in client.scan_iter(f"{base.queue}*")
                             if client.type(k) == b"list")
                print(f"vidq submit, {name:10s}: {rate:,.0f} jobs/s  ({sent} jobs, {queued} messages "
                      f"in Redis)  = {rate / raw:.2f}x raw Redis push; target >= 2,000 jobs/s: "
                      f"{'PASS' if rate >= 2000 else 'FAIL'}")
        finally:
            dispose_engines()
            redis.Redis.from_url(args.broker).flushdb()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{pg_db}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
