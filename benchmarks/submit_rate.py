"""Producer throughput: ``vidq submit`` of N real video files into Redis, with
SQLite and with PostgreSQL, against a raw pipelined publish of the very same
messages, in alternating rounds of the same run.

    python benchmarks/submit_rate.py [--files 5000] [--rounds 3] [--width 320 --height 180 --frames 64]

The files are one real H.264 MP4 (benchmarks/corpus.py, size printed) made
distinct by a 16-byte trailer, so the producer hashes what a real video costs;
it never decodes. The baseline LPUSHes the messages vidq published (read back
from Redis) in pipelines of 1,000, as vidq's publisher batches them: the floor
for any producer. Each round runs the baseline and both backends in a rotated
order; the ratios print with their spread over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import redis
from sqlalchemy import create_engine, text

from benchmarks.corpus import make_video
from producer.submit import JobRequest, discover, submit
from vidq.db import dispose_engines
from vidq.settings import Settings

PIPELINE = 1000


def make_files(root: Path, n: int, *, width: int, height: int, frames: int) -> int:
    """n distinct copies of one real video; returns the size of each in bytes."""
    root.mkdir(parents=True, exist_ok=True)
    video = make_video(root / "source.mp4", frames=frames, width=width, height=height)
    data = video.read_bytes()
    video.unlink()
    for i in range(n):
        (root / f"f{i:06d}.mp4").write_bytes(data + uuid.UUID(int=i).bytes)
    return len(data) + 16


def queue_keys(client: redis.Redis, queue: str) -> list[bytes]:
    return [k for k in client.scan_iter(f"{queue}*") if client.type(k) == b"list"]


def drain_messages(client: redis.Redis, queue: str) -> list[tuple[bytes, bytes]]:
    """(key, payload) of every message vidq published, removed from Redis."""
    out = [(k, m) for k in queue_keys(client, queue) for m in client.lrange(k, 0, -1)]
    client.flushdb()
    return out


def raw_publish_s(client: redis.Redis, messages: list[tuple[bytes, bytes]]) -> float:
    """LPUSH the same payloads onto the same keys, pipelined PIPELINE at a time."""
    client.flushdb()
    t0 = time.perf_counter()
    for i in range(0, len(messages), PIPELINE):
        pipe = client.pipeline(transaction=False)
        for key, payload in messages[i : i + PIPELINE]:
            pipe.lpush(key, payload)
        pipe.execute()
    elapsed = time.perf_counter() - t0
    client.flushdb()
    return elapsed


def vidq_submit_s(root: Path, settings: Settings) -> tuple[float, int]:
    paths = list(discover([str(root)]))
    t0 = time.perf_counter()
    report = submit(paths, settings=settings, request=JobRequest(),
                    batch=f"bench-{uuid.uuid4().hex[:6]}")
    elapsed = time.perf_counter() - t0
    assert report.publish_error is None, report.publish_error
    assert len(report.job_ids) == len(paths) == report.published
    return elapsed, report.published


def spread(values: list[float]) -> str:
    return f"median {statistics.median(values):.2f}x (rounds {min(values):.2f}-{max(values):.2f}x)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=5_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=180)
    ap.add_argument("--frames", type=int, default=64)
    ap.add_argument("--broker", default="redis://127.0.0.1:6379/14")
    ap.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()

    client = redis.Redis.from_url(args.broker)
    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "files"
        t = time.perf_counter()
        size = make_files(root, args.files, width=args.width, height=args.height,
                          frames=args.frames)
        total_mb = size * args.files / 1e6
        print(f"{args.files} real H.264 files of {size / 1024:.1f} KiB "
              f"({args.width}x{args.height}, {args.frames} frames; {total_mb:.0f} MB) "
              f"written in {time.perf_counter() - t:.1f}s")
        base = Settings.from_env(broker_url=args.broker)
        rates: dict[str, list[float]] = {"raw": [], "sqlite": [], "postgresql": []}
        ratios: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
        order = ["raw", "sqlite", "postgresql"]
        messages: list[tuple[bytes, bytes]] = []
        try:
            for r in range(args.rounds):
                round_rate: dict[str, float] = {}
                for name in order[r % 3:] + order[: r % 3]:  # rotate who goes first
                    client.flushdb()
                    if name == "raw":
                        if not messages:  # the first round's vidq messages, once known
                            vidq_submit_s(root, base.replace(
                                database_url=f"sqlite:///{tmp}/seed-{r}.db"))
                            messages = drain_messages(client, base.queue)
                        round_rate[name] = len(messages) / raw_publish_s(client, messages)
                        continue
                    if name == "sqlite":
                        url = f"sqlite:///{tmp}/bench-{r}.db"
                    else:
                        db = f"vidq_bench_{uuid.uuid4().hex[:8]}"
                        with admin.connect() as conn:
                            conn.execute(text(f'CREATE DATABASE "{db}"'))
                        url = args.pg.rsplit("/", 1)[0] + "/" + db
                    elapsed, sent = vidq_submit_s(root, base.replace(database_url=url))
                    queued = sum(client.llen(k) for k in queue_keys(client, base.queue))
                    assert queued == sent == args.files, (queued, sent)
                    round_rate[name] = sent / elapsed
                    dispose_engines()
                    if name == "postgresql":
                        with admin.connect() as conn:
                            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
                for name, rate in round_rate.items():
                    rates[name].append(rate)
                for name in ratios:
                    ratios[name].append(round_rate[name] / round_rate["raw"])
                print(f"round {r + 1}: raw pipelined publish {round_rate['raw']:,.0f} msg/s; "
                      f"vidq submit sqlite {round_rate['sqlite']:,.0f} jobs/s, "
                      f"postgresql {round_rate['postgresql']:,.0f} jobs/s")
        finally:
            client.flushdb()
            admin.dispose()
        raw = statistics.median(rates["raw"])
        print(f"\nraw pipelined publish of the same {len(messages)} messages "
              f"({statistics.mean(len(m) for _k, m in messages):.0f} B each): "
              f"median {raw:,.0f} msg/s (baseline)")
        for name in ratios:
            rate = statistics.median(rates[name])
            print(f"vidq submit, {name:10s}: median {rate:,.0f} jobs/s, "
                  f"{rate * size / 1e6:,.0f} MB/s hashed; {spread(ratios[name])} of raw publish; "
                  f"target >= 2,000 jobs/s: {'PASS' if rate >= 2000 else 'FAIL'}")


if __name__ == "__main__":
    main()
