"""Can one worker process feed an accelerator? The real worker pipeline, measured.

``feed``: everything is real except, by default, the model: real Redis, a real
SQLite database, ``vidq submit`` publishing, a Celery worker in this process
consuming with the threads pool (as ``vidq worker`` runs it), real claims,
heartbeats and one-transaction commits, real PyAV decoding and the seed's
transforms (slow_r50's input). The model is a SIMULATED ACCELERATOR: each batch
sleeps ``--batch-ms`` and uses no CPU, as a GPU leaves the CPU free. For each corpus
(one-clip videos; long videos cut into sliding windows), each kind of decoder and
each number of decoders D: clips/s through the pipeline against the bare decode
rate of D decoders of the same kind on the same files, in alternating rounds. With
``--real MODEL`` the model is real and each configuration runs in a fresh process:
the worker's defaults against one job in flight and one decoder.

``gpu`` (on a GPU host, through benchmarks/gpu.sh): the forward floor at batch sizes
1 to 64, the decoders' rate (one, and the worker's default count as threads and as
processes), and ``vidq run``'s path end to end (embedded: SQLite, no broker; the
same claims, pipeline and commits as a worker) against the floor at its batch size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import vidq_worker
from benchmarks.common import BROKER_URL, Report, alternate, fresh_process
from benchmarks.corpus import make_video

REAL_CONFIGS: dict[str, dict[str, Any]] = {
    "inflight 1, 1 decoder": {"inflight": 1, "decode_workers": 1},
    "the worker's defaults": {"inflight": 0, "decode_workers": 0},
}


def feed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--short", type=int, default=160, help="one-clip videos")
    # Enough long videos that the decoders share them evenly and a round lasts seconds.
    parser.add_argument("--long", type=int, default=8, help="long videos")
    parser.add_argument("--long-seconds", type=float, default=30.0)
    parser.add_argument("--decoders", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--kinds", nargs="+", default=["threads", "processes"],
                        choices=["threads", "processes"], help="VIDQ_DECODERS values")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-ms", type=float, default=20.0,
                        help="simulated accelerator time per batch")
    parser.add_argument("--inflight", type=int, default=0, help="0: the worker's default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decoder-threads", type=int, default=1,
                        help="FFmpeg threads per decoder, pipeline and baseline alike (1: a "
                        "core per decoder, as on a GPU host; 0: the worker's default)")
    parser.add_argument("--real", default=None, metavar="MODEL",
                        help="a real model preset instead of the simulated accelerator")
    parser.add_argument("--broker", default=BROKER_URL, help="a Redis database it flushes")
    parser.add_argument("--quick", action="store_true",
                        help="8 one-clip and 2 long 6 s videos, threads, D=1, two rounds")


def corpus(root: Path, *, short: int, long: int, long_s: float) -> dict[str, list[Path]]:
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {
        # 70 frames at 30 fps: one slow_r50 window.
        "one-clip": [make_video(root / f"short_{i:03d}.mp4", frames=70, seed=i)
                     for i in range(short)],
        "long": [make_video(root / f"long_{i:03d}.mp4", frames=int(30 * long_s), seed=1000 + i)
                 for i in range(long)],
    }
    return {k: v for k, v in out.items() if v}


def strategy_of(corpus_name: str) -> str:
    return "single" if corpus_name == "one-clip" else "sliding"


def worker_rate(clf: Any, videos: list[Path], *, strategy: str, workdir: Path, tag: str,
                broker: str, decoder_threads: int = 0) -> tuple[float, dict[str, float]]:
    """Clips/s of a Celery worker (threads pool, in this process) draining jobs already
    submitted: Redis -> claim -> pipeline -> commit to SQLite, from its first claim to
    its last commit (the database's clock), and the pipeline's batch statistics."""
    import redis
    from celery.contrib.testing.worker import start_worker
    from sqlalchemy import case, func, select

    from producer.submit import JobRequest, submit
    from vidq.db import Job, aware, dispose_engines, sessions
    from vidq.settings import Settings

    info = vidq_worker.describe(clf)
    settings = Settings.from_env(broker_url=broker, database_url=f"sqlite:///{workdir / tag}.db",
                                 model=info.model, weights="random", heartbeat_s=5,
                                 reconcile_every_s=0)
    redis.Redis.from_url(broker).flushdb()
    pipe = vidq_worker.pipeline(clf, decoder_threads=decoder_threads)
    try:
        # Submitted first, as a producer host would: hashing and inserts are not the
        # worker's work, and must not take these cores.
        report = submit([str(v) for v in videos], settings=settings, batch=tag, force=True,
                        publish=True, request=JobRequest(model=info.model, weights="random",
                                                         strategy=strategy))
        assert len(report.job_ids) == len(videos)
        make = sessions(settings.database_url)
        # (jobs not finished, jobs not yet claimed)
        progress = select(
            func.coalesce(func.sum(case((Job.status.in_(("queued", "running")), 1), else_=0)), 0),
            func.coalesce(func.sum(case((Job.status == "queued", 1), else_=0)), 0))
        with vidq_worker.in_process_app(settings, pipe) as app, start_worker(
                app, pool="threads", concurrency=info.inflight, perform_ping_check=False,
                loglevel="WARNING", shutdown_timeout=60):
            cpu0 = None
            while True:
                with make() as s:
                    left, unclaimed = s.execute(progress).one()
                if cpu0 is None and unclaimed < len(videos):  # the first claim, within a poll
                    cpu0 = vidq_worker.process_cpu(pipe)
                if left == 0:
                    break
                time.sleep(0.1)  # this poll shares the worker's GIL: not too often
            cpu1 = vidq_worker.process_cpu(pipe)
        with make() as s:
            clips, failed, first_claim, last_commit = s.execute(select(
                func.coalesce(func.sum(Job.clips_done), 0),
                func.sum(case((Job.status == "failed", 1), else_=0)),
                func.min(Job.started_at), func.max(Job.finished_at))).one()
        assert not failed, f"{failed} jobs failed"
        elapsed = (aware(last_commit) - aware(first_claim)).total_seconds()
        stats = vidq_worker.batch_stats(pipe)
        stats["cpu_per_clip"] = (cpu1 - (cpu0 or cpu1)) / max(1, clips)
        return clips / elapsed, stats
    finally:
        pipe.close()
        dispose_engines()


def simulated_rounds(args: argparse.Namespace, *, name: str, files: list[Path], kind: str,
                     count: int, work: Path) -> tuple[dict[str, list[float]], str]:
    """Alternating rounds of the bare decoders and the pipeline; their rates and a
    note on the pipeline's batches."""
    strategy = strategy_of(name)
    sim = vidq_worker.simulated_accelerator(
        batch_ms=args.batch_ms, batch_size=args.batch_size, decode_workers=count,
        inflight=args.inflight, decoders=kind)
    bare = vidq_worker.Decoders(count, kind)
    stats: list[dict[str, float]] = []

    def pipeline_rate() -> float:
        rate, batches = worker_rate(sim, files, strategy=strategy, workdir=work,
                                    broker=args.broker, decoder_threads=args.decoder_threads,
                                    tag=f"sim-{name}-{kind}-{count}-{len(stats)}")
        stats.append(batches)
        return rate

    def bare_rate() -> float:
        return bare.rate(files, model="slow_r50", strategy=strategy,
                         threads=args.decoder_threads)[0]

    print(f"{name}, {kind}, D={count}:", flush=True)
    try:
        rates = alternate({"bare": bare_rate, "pipeline": pipeline_rate}, args.rounds)
    finally:
        bare.close()
    fill, full, wait = (sum(s[k] for s in stats) / len(stats)
                        for k in ("mean_fill", "backlogged_fill", "mean_wait_ms"))
    return rates, (f"D={count}: batch fill {fill:.0%} ({full:.0%} when a full batch was "
                   f"waiting), wait for a fuller batch {wait:.1f} ms")


def simulated(args: argparse.Namespace, videos: dict[str, list[Path]], work: Path
              ) -> list[Report]:
    print(f"SIMULATED ACCELERATOR: {args.batch_ms:.0f} ms per batch of {args.batch_size} "
          "views, no CPU; everything else is the real worker pipeline.", flush=True)
    reports = []
    for name, files in videos.items():
        for kind in args.kinds:
            report = Report(f"{name} videos ({strategy_of(name)}), {kind} decoders: clips/s "
                            "through the pipeline against the bare decoders", "clips/s")
            for count in args.decoders:
                rates, note = simulated_rounds(args, name=name, files=files, kind=kind,
                                               count=count, work=work)
                report.add(f"bare decode, D={count}", rates["bare"], baseline=True)
                report.add(f"pipeline, D={count}", rates["pipeline"],
                           against=f"bare decode, D={count}")
                report.notes.append(note)
            reports.append(report)
    return reports


def run_real(model: str, config: str, files: list[str], strategy: str, work: str, tag: str,
             broker: str) -> dict[str, float]:
    """One real configuration, in its own process (several Celery workers and pipelines
    in one process measured a later one up to 4x slower, whichever it was)."""
    clf = vidq_worker.classifier(model=model, precision="auto", **REAL_CONFIGS[config])
    rate, stats = worker_rate(clf, [Path(f) for f in files], strategy=strategy,
                              workdir=Path(work), tag=tag, broker=broker)
    return {"rate": rate, "fill": stats["mean_fill"]}


def real(args: argparse.Namespace, videos: dict[str, list[Path]], work: Path) -> list[Report]:
    reports = []
    for name, files in videos.items():
        rounds = [0]

        def config_rate(config: str, files: list[Path] = files, name: str = name,
                        rounds: list[int] = rounds) -> float:
            rounds[0] += 1
            return fresh_process("benchmarks.feed:run_real", model=args.real, config=config,
                                 files=[str(f) for f in files], strategy=strategy_of(name),
                                 work=str(work), tag=f"real-{name}-{rounds[0]}",
                                 broker=args.broker)["rate"]

        print(f"{name}:", flush=True)
        rates = alternate({c: partial(config_rate, c) for c in REAL_CONFIGS}, args.rounds)
        report = Report(f"real {args.real} on this host, {name} videos: clips/s, the worker's "
                        "defaults against one job in flight and one decoder", "clips/s")
        for config in REAL_CONFIGS:
            report.add(config, rates[config])
        reports.append(report)
    return reports


def feed(args: argparse.Namespace) -> list[Report]:
    """A worker's pipeline (simulated accelerator) against its bare decoders: clips/s."""
    if args.quick:
        args.short, args.long, args.long_seconds = 8, 2, 6.0
        args.kinds, args.decoders, args.rounds = ["threads"], [1], 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        videos = corpus(work / "media", short=args.short, long=args.long,
                        long_s=args.long_seconds)
        print(f"cores: {len(os.sched_getaffinity(0))}; corpus: "
              + ", ".join(f"{len(v)} {k} (640x360 H.264)" for k, v in videos.items()))
        return real(args, videos, work) if args.real else simulated(args, videos, work)


# -- a GPU host -------------------------------------------------------------------------
def gpu_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="slow_r50")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--videos", type=int, default=48)
    parser.add_argument("--quick", action="store_true",
                        help="batches 1-2, 4 videos (with --device cpu --model x3d_xs: a "
                        "smoke test anywhere)")


def gpu(args: argparse.Namespace) -> list[Report]:
    """A GPU host: forward floor per batch size, decoders, vidq run: clips/s ratios."""
    import torch

    from producer.submit import JobRequest, submit
    from vidq.settings import Settings

    batches = [1, 2] if args.quick else [1, 2, 4, 8, 16, 32, 64]
    iters = 2 if args.quick else 20
    n_videos = 4 if args.quick else args.videos
    host = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"host: {host}, {vidq_worker.cpu_cores()} cores, torch {torch.__version__}",
          flush=True)
    clf = vidq_worker.classifier(model=args.model, device=args.device, precision=args.precision)
    info = vidq_worker.describe(clf)
    floor = Report(f"{info.model} forward floor ({info.precision} on {info.device}, views "
                   "on the device): clips/s by batch size", "clips/s")
    for b in batches:
        views = vidq_worker.random_views(clf, b)
        vidq_worker.forward_rate(clf, views, iters=3)  # warm-up, cudnn's choice of kernels
        floor.add(f"batch {b}", vidq_worker.forward_rate(clf, views, iters=iters))
        print(f"  batch {b}: {floor.rows[-1].values[0]:.1f} clips/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        media = root / "media"
        media.mkdir()
        videos = [make_video(media / f"v{i:03d}.mp4", seed=i) for i in range(n_videos)]
        d = vidq_worker.default_decode_workers()
        decode = Report(f"decode + transform of 640x360 H.264 windows ({info.model}): "
                        "windows/s", "windows/s")
        for label, count, kind in (("one decoder", 1, "threads"),
                                   (f"{d} decoder threads", d, "threads"),
                                   (f"{d} decoder processes", d, "processes")):
            decoders = vidq_worker.Decoders(count, kind)
            try:
                rate = decoders.rate(videos, model=info.model, strategy="sliding",
                                     host="cpu" if info.device == "cpu" else "gpu")[0]
            finally:
                decoders.close()
            decode.add(label, rate)
        settings = Settings.from_env(database_url=f"sqlite:///{root / 'vidq.db'}",
                                     weights="random", model=info.model, device=args.device)
        t = time.perf_counter()
        report = submit([str(v) for v in videos], settings=settings, batch="gpu", publish=False,
                        request=JobRequest(model=info.model, weights="random",
                                           strategy="sliding"))
        ok = vidq_worker.run_embedded(report.job_ids, settings=settings, clf=clf)
        rate = 4 * ok / (time.perf_counter() - t)  # four windows a video
    best_decode = max(r.values[0] for r in decode.rows)
    end = Report(f"vidq run's path end to end ({ok}/{n_videos} videos; hashing and recording "
                 "included): clips/s against the model floor", "clips/s")
    base = f"batch {info.batch_size}" if any(
        r.name == f"batch {info.batch_size}" for r in floor.rows) else floor.rows[-1].name
    end.add(f"forward floor, {base}", floor.row(base).values)
    end.add("end to end", rate)
    end.add("best decoders", best_decode)
    return [floor, decode, end]

