"""Can one worker process feed an accelerator? The real worker pipeline, measured.

Everything is real except, by default, the model: real Redis, a real SQLite
database, ``vidq submit`` publishing, a Celery worker consuming with the threads
pool (as ``vidq worker`` runs it), real claims, heartbeats and one-transaction
commits, real PyAV decoding and the seed's transforms (slow_r50's input: 64-frame
windows, short side 256, crop 256). The model is a SIMULATED ACCELERATOR: each
batch sleeps ``--batch-ms`` and uses no CPU, as a GPU would leave the CPU free.

For each corpus (one-clip videos; long 640x360 videos cut into sliding windows),
each kind of decoder (``--kinds``: threads, processes) and each number of decoders
D, it prints clips/s through the pipeline against the bare decode-and-transform
rate of D parallel decoders of the same kind on the same files, measured in the
same run, plus the batch fill and the wait for a fuller batch.

    python benchmarks/feed_rate.py                      # simulated accelerator
    python benchmarks/feed_rate.py --real x3d_xs        # a real model on this CPU:
                                                        # new defaults vs inflight 1 / 1 decoder
    python benchmarks/feed_rate.py --real slow_r50 --long 3 --short 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.corpus import make_video  # noqa: E402
from vidq.sampling import Sampling, plan_windows  # noqa: E402
from vidq.settings import Settings  # noqa: E402
from worker.decoders import cpu_seconds  # noqa: E402
from worker.inference import Classifier  # noqa: E402
from worker.video import VideoReader  # noqa: E402

REDIS_URL = os.environ.get("VIDQ_BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
SHORT = Sampling(strategy="single")
LONG = Sampling(strategy="sliding")


class SimulatedAccelerator(Classifier):
    """slow_r50's input pipeline; the forward pass is a sleep of ``batch_s`` per batch."""

    def __init__(self, *, batch_s: float, batch_size: int, decode_workers: int,
                 inflight: int, decoders: str = "threads") -> None:
        super().__init__(model="slow_r50", weights="random", device="cpu", precision="fp32",
                         batch_size=batch_size, decode_workers=decode_workers,
                         inflight=inflight, decoders=decoders)
        self.batch_s = batch_s

    def predict(self, prepared: list[torch.Tensor], *, crops: list[int]
                ) -> tuple[torch.Tensor, None]:
        time.sleep(self.batch_s)
        return torch.full((sum(crops), len(self.labels)), 1.0 / len(self.labels)), None


def bare_decode_rate(classifier: Classifier, videos: list[Path], sampling: Sampling,
                     decoders: int, threads: int = 0) -> float:
    """Windows/s of ``decoders`` threads that only decode and transform (no queue, no DB)."""
    return bare_decode(classifier, videos, sampling, decoders, threads)[0]


def bare_decode(classifier: Classifier, videos: list[Path], sampling: Sampling,
                decoders: int, threads: int = 0, kind: str = "threads") -> tuple[float, float]:
    """(windows/s, the process's CPU seconds per window) of ``bare_decode_rate``; with
    ``kind="processes"`` the decoders are the pipeline's decoder processes, each clip's
    slot freed as soon as it arrives (and the CPU includes theirs)."""
    if kind == "processes":
        return bare_decode_processes(classifier, videos, sampling, decoders, threads)
    todo = list(videos)
    lock = threading.Lock()
    done = [0]

    def run() -> None:
        torch.set_num_threads(1)
        while True:
            with lock:
                if not todo:
                    return
                path = todo.pop()
            with VideoReader(path, limits=classifier.limits, threads=threads) as reader:
                windows = plan_windows(sampling, reader.info.duration_s,
                                       classifier.preset.clip_duration)
                for clip in reader.clips(windows, num_frames=classifier.preset.num_frames):
                    classifier.prepare(clip.rgb, crops=sampling.crops)
                    with lock:
                        done[0] += 1

    t, cpu = time.perf_counter(), time.process_time()
    workers = [threading.Thread(target=run) for _ in range(decoders)]
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    cpu_per_clip = (time.process_time() - cpu) / max(1, done[0])
    return done[0] / (time.perf_counter() - t), cpu_per_clip


def bare_decode_processes(classifier: Classifier, videos: list[Path], sampling: Sampling,
                          decoders: int, threads: int) -> tuple[float, float]:
    from worker.decoders import DecodeConfig, DecoderProcess

    config = DecodeConfig.of(classifier, threads)
    procs = [DecoderProcess(config, 4, f"bare-{i}") for i in range(decoders)]
    for proc in procs:
        proc.start()
    for proc in procs:  # warm: each decodes the first video once, untimed
        proc.send(("video", 0, str(videos[0]), sampling))
        while (message := proc.recv())[0] not in ("end", "error"):
            if message[0] == "clip":
                proc.release(message[4], proc.generation)
    todo = list(videos)
    lock = threading.Lock()
    done = [0]

    def run(proc: DecoderProcess) -> None:
        while True:
            with lock:
                if not todo:
                    return
                path = todo.pop()
            proc.seq += 1
            proc.send(("video", proc.seq, str(path), sampling))
            while True:
                message = proc.recv()
                if message[0] == "clip":
                    proc.release(message[4], proc.generation)
                    with lock:
                        done[0] += 1
                elif message[0] in ("end", "error"):
                    break

    cpu0 = time.process_time() + sum(proc.cpu_seconds() for proc in procs)
    t = time.perf_counter()
    workers = [threading.Thread(target=run, args=(proc,)) for proc in procs]
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    elapsed = time.perf_counter() - t
    cpu = time.process_time() + sum(proc.cpu_seconds() for proc in procs) - cpu0
    for proc in procs:
        proc.stop()
    return done[0] / elapsed, cpu / max(1, done[0])


def worker_rate(classifier: Classifier, videos: list[Path], sampling: Sampling,
                workdir: Path, tag: str) -> tuple[float, dict[str, float]]:
    """Clips/s of a Celery worker (threads pool) draining jobs already submitted: Redis ->
    claim -> pipeline -> commit to SQLite, from its first claim to its last commit."""
    import redis
    from celery.contrib.testing.worker import start_worker

    import worker.tasks as tasks
    from producer.submit import JobRequest, submit
    from vidq.db import aware, dispose_engines, sessions
    from worker.jobs import JobStore

    db = workdir / f"{tag}.db"
    settings = Settings.from_env(broker_url=REDIS_URL, database_url=f"sqlite:///{db}",
                                 model=classifier.preset.name, weights="random",
                                 heartbeat_s=5, reconcile_every_s=0)
    redis.Redis.from_url(REDIS_URL).flushdb()
    tasks.settings = settings
    tasks.app = tasks.make_celery(settings)
    tasks.app.tasks.register(tasks.classify)  # the same task, on the app of these settings
    pipeline = classifier.pipeline()
    tasks._state = tasks._ProcessState(pipeline, JobStore.from_settings(settings))
    request = JobRequest(model=classifier.preset.name, weights="random",
                         strategy=sampling.strategy, clips=sampling.clips, crops=sampling.crops)
    try:
        # Submitted (and published) first, as a producer host would: the producer's
        # hashing and inserts are not the worker's work, and must not take these cores.
        report = submit([str(v) for v in videos], settings=settings, request=request,
                        batch=tag, force=True, publish=True)
        make = sessions(settings.database_url)
        with start_worker(tasks.app, pool="threads", concurrency=classifier.inflight,
                          perform_ping_check=False, loglevel="WARNING", shutdown_timeout=60):
            cpu0 = None
            while True:
                with make() as s:
                    left, running = s.execute(tasks_sql_active()).one()
                if cpu0 is None and (running or left < len(videos)):
                    cpu0 = process_cpu(pipeline)  # the first claim, within a poll
                if left == 0:
                    break
                time.sleep(0.1)  # this poll's Python shares the worker's GIL: not too often
            cpu1 = process_cpu(pipeline)
        with make() as s:
            clips, failed, first_claim, last_commit = s.execute(tasks_sql_clips()).one()
        assert failed == 0, f"{failed} jobs failed"
        assert len(report.job_ids) == len(videos)
        # The worker's own window, on the database's clock: first claim to last commit
        # (Celery's start-up before the first claim is not feeding anything yet).
        elapsed = (aware(last_commit) - aware(first_claim)).total_seconds()
        stats = pipeline.stats.summary(pipeline.batch_size)
        # The process's CPU per clip: against the bare decode's, what each job costs.
        stats["cpu_per_clip"] = (cpu1 - (cpu0 or cpu1)) / max(1, clips)
        return clips / elapsed, stats
    finally:
        pipeline.close()
        tasks._state = None
        dispose_engines()


def process_cpu(pipeline: Any) -> float:
    """CPU seconds of this process and its decoder processes."""
    return time.process_time() + sum(cpu_seconds(pid) for pid in pipeline.decoder_pids())


def tasks_sql_active() -> Any:
    from sqlalchemy import case, func, select

    from vidq.db import Job
    return select(func.count(), func.coalesce(func.sum(case((Job.status == "running", 1),
                                                           else_=0)), 0)
                  ).select_from(Job).where(Job.status.in_(("queued", "running")))


def tasks_sql_clips() -> Any:
    from sqlalchemy import case, func, select

    from vidq.db import Job
    return select(func.coalesce(func.sum(Job.clips_done), 0),
                  func.sum(case((Job.status == "failed", 1), else_=0)),
                  func.min(Job.started_at), func.max(Job.finished_at))


def corpus(root: Path, *, short: int, long: int, long_s: float) -> dict[str, list[Path]]:
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {"one-clip": [], "long": []}
    for i in range(short):  # 64 frames at 30 fps: exactly one slow_r50 window
        out["one-clip"].append(make_video(root / f"short_{i:03d}.mp4", frames=70, seed=i))
    for i in range(long):
        out["long"].append(make_video(root / f"long_{i:03d}.mp4", frames=int(30 * long_s),
                                      seed=1000 + i))
    return {k: v for k, v in out.items() if v}


def simulated(args: argparse.Namespace, videos: dict[str, list[Path]], work: Path) -> None:
    print(f"SIMULATED ACCELERATOR: {args.batch_ms:.0f} ms per batch of {args.batch_size} "
          "views, no CPU; everything else is the real worker pipeline.")
    print(f"{'corpus':9} {'decoders':9} {'D':>2} {'round':>5} {'bare decode':>12} {'pipeline':>9} "
          f"{'of bare':>8} {'fill':>5} {'fill*':>6} {'wait ms':>8} "
          f"{'CPU ms/clip bare, worker':>25}")
    results: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    for rnd in range(args.rounds):
        for name, files in videos.items():
            sampling = SHORT if name == "one-clip" else LONG
            for kind, decoders in itertools.product(args.kinds, args.decoders):
                clf = SimulatedAccelerator(batch_s=args.batch_ms / 1000,
                                           batch_size=args.batch_size,
                                           decode_workers=decoders, inflight=args.inflight,
                                           decoders=kind)
                clf.decoder_threads = args.decoder_threads
                bare, bare_cpu = bare_decode(clf, files, sampling, decoders,
                                             args.decoder_threads, kind)
                rate, stats = worker_rate(clf, files, sampling, work,
                                          f"sim-{name}-{kind}-{decoders}-{rnd}")
                results.setdefault((name, kind, decoders), []).append((rate, bare))
                print(f"{name:9} {kind:9} {decoders:>2} {rnd:>5} {bare:9.1f}/s {rate:7.1f}/s "
                      f"{rate / bare:7.0%} {stats['mean_fill']:5.0%} "
                      f"{stats['backlogged_fill']:6.0%} {stats['mean_wait_ms']:8.1f} "
                      f"{1000 * bare_cpu:12.1f}, {1000 * stats['cpu_per_clip']:.1f}",
                      flush=True)
    print("\nmedians over rounds (fill* = batch fill when a full batch was waiting)")
    for (name, kind, decoders), rows in results.items():
        rate = statistics.median(r for r, _ in rows)
        bare = statistics.median(b for _, b in rows)
        line = (f"{name:9} {kind:9} D={decoders}: pipeline {rate:.1f} clips/s = "
                f"{rate / bare:.0%} of bare ({bare:.1f}/s)")
        first = (name, kind, args.decoders[0])
        if decoders != args.decoders[0] and first in results:
            base = statistics.median(r for r, _ in results[first])
            line += f"; {rate / base:.2f}x of D={args.decoders[0]}"
        if kind != args.kinds[0] and (name, args.kinds[0], decoders) in results:
            other = statistics.median(r for r, _ in results[(name, args.kinds[0], decoders)])
            line += f"; {rate / other:.2f}x of {args.kinds[0]}"
        print(line)


REAL_CONFIGS = {
    "inflight 1, 1 decoder": {"inflight": 1, "decode_workers": 1},
    "new defaults": {"inflight": 0, "decode_workers": 0},
}


def real(args: argparse.Namespace, videos: dict[str, list[Path]], work: Path) -> None:
    """Each configuration and corpus in a fresh process, as a worker runs: several Celery
    workers and pipelines in one process measured a later one up to 4x slower (its
    cores half idle), whichever configuration it was."""
    settings = Settings.from_env()
    print(f"real model {args.real} on CPU ({settings.precision}, random weights): "
          "new defaults against VIDQ_INFLIGHT=1 VIDQ_DECODE_WORKERS=1, alternating rounds, "
          "each run in a fresh process")
    rates: dict[str, list[float]] = {k: [] for k in REAL_CONFIGS}
    for rnd in range(args.rounds):
        order = list(REAL_CONFIGS) if rnd % 2 == 0 else list(reversed(REAL_CONFIGS))
        for label in order:
            for name, files in videos.items():
                job = json.dumps({"model": args.real, "label": label, "corpus": name,
                                  "files": [str(f) for f in files], "work": str(work),
                                  # a database of its own: a second run in the first's
                                  # counted the first's jobs and the time between them
                                  "tag": f"real-{rnd}-{label.split()[-1]}-{name}"})
                out = subprocess.run([sys.executable, __file__, "--one-real-run", job],
                                     check=True, capture_output=True, text=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                rates[label].append(result["rate"])
                print(f"round {rnd} {label:22} {name:9} {result['rate']:6.2f} clips/s "
                      f"(inflight {result['inflight']}, {result['decoders']} decoders, "
                      f"fill {result['fill']:.0%})", flush=True)
    old, new = statistics.median(rates["inflight 1, 1 decoder"]), statistics.median(
        rates["new defaults"])
    print(f"\nmedian: new defaults {new:.2f} clips/s vs inflight 1 / 1 decoder {old:.2f}: "
          f"{new / old:.0%}")


def one_real_run(job: dict[str, Any]) -> None:
    settings = Settings.from_env()
    clf = Classifier(model=job["model"], weights="random", device="cpu",
                     precision=settings.precision, **REAL_CONFIGS[job["label"]])
    sampling = SHORT if job["corpus"] == "one-clip" else LONG
    rate, stats = worker_rate(clf, [Path(f) for f in job["files"]], sampling,
                              Path(job["work"]), job["tag"])
    print(json.dumps({"rate": rate, "inflight": clf.inflight,
                      "decoders": clf.decode_workers, "fill": stats["mean_fill"]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", type=int, default=160, help="one-clip videos")
    # Enough long videos that the decoders share them evenly and a round lasts seconds:
    # 3 of 16 s (24 clips, one second) measured mostly start-up and the last video.
    ap.add_argument("--long", type=int, default=8, help="long videos")
    ap.add_argument("--long-seconds", type=float, default=30.0)
    ap.add_argument("--decoders", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kinds", nargs="+", default=["threads", "processes"],
                    choices=["threads", "processes"], help="VIDQ_DECODERS values to measure")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batch-ms", type=float, default=20.0,
                    help="simulated accelerator time per batch")
    ap.add_argument("--inflight", type=int, default=0, help="0 = the default rule")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decoder-threads", type=int, default=1,
                    help="FFmpeg threads per decoder, in the pipeline and the baseline alike "
                         "(1: one core per decoder, as on a GPU host with many decoders; "
                         "0: the worker's default, cores / decoders)")
    ap.add_argument("--real", default=None, help="a real model preset instead of the simulation")
    ap.add_argument("--corpus", type=Path, default=None)
    ap.add_argument("--one-real-run", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_real_run:
        one_real_run(json.loads(args.one_real_run))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        videos = corpus(args.corpus or work / "media", short=args.short, long=args.long,
                        long_s=args.long_seconds)
        print(f"cores: {len(os.sched_getaffinity(0))}; corpus: "
              + ", ".join(f"{len(v)} {k} (640x360 H.264)" for k, v in videos.items()))
        if args.real:
            real(args, videos, work)
        else:
            simulated(args, videos, work)


if __name__ == "__main__":
    main()
