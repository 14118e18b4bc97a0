"""The decode side: skipping unused frames, and reading from object storage.

``decode``: a corpus of one H.264 file per size (360p, 720p, 1080p) written with
libx264's own defaults (preset medium: 3 B-frames, b-pyramid, 250-frame GOP) and
fresh per-frame grain of +-``--noise`` (with +-4, about 45% of frames are B-frames
nothing references, as on ordinary camera video); kept in ``--dir`` between runs.
Every sliding window is decoded and made into the model's input as each kind of
host does it: a CPU host's decoder runs the transforms (one thread), a GPU host's
copies the frames into one uint8 buffer. Skipping is on and off in alternating
rounds, for slow_r50's sampling (8 of 64 frames) and x3d_xs's (4 of 48): windows per
wall second and per CPU second (the work saved), and with one decoder process per
core (``--decoders``) each with one FFmpeg thread, as a saturated host runs them.
Then end to end: ``classify_many`` with skipping on and off, random weights, fp32.

``read_hash``: the same corpus's 720p file decoded as a worker does, hashing every
byte read (vidq/media.py's ``HashingReader``), against FFmpeg reading the file by
its path, unhashed, in alternating rounds, for every sliding window and for three
uniform clips (seeks: the bytes skipped are hashed at the end).

``storage``: one 720p H.264 MP4 with its index at the end (FFmpeg seeks to the end
and back) uploaded to moto's S3 server on 127.0.0.1, and decoded both ways with
x3d_xs's sampling (sliding windows, and uniform clips that seek): wall time, bytes
read against the object's size and GET requests. The frames are checked equal.
Loopback has no latency: on a real store each request adds a round trip, which the
8 MiB blocks amortise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks import vidq_worker
from benchmarks.common import Report, alternate
from benchmarks.corpus import make_video

SIZES = {"360p": (640, 360), "720p": (1280, 720), "1080p": (1920, 1080)}


def decode_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="length of each corpus file (8 s files hold 3-4 windows: "
                        "rounds too short)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--models", nargs="+", default=["slow_r50", "x3d_xs"])
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds, decode side")
    parser.add_argument("--e2e-rounds", type=int, default=2, help="alternating rounds end to end")
    parser.add_argument("--noise", type=int, default=4, help="per-frame grain of the corpus")
    parser.add_argument("--dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "vidq-decode-bench")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decoders", type=int, default=0,
                        help="decoder processes of the every-core passes (0: one per core)")
    parser.add_argument("--skip-e2e", action="store_true", help="decode side only")
    parser.add_argument("--quick", action="store_true",
                        help="one 6 s 360p file, x3d_xs, two rounds each")


def corpus(directory: Path, sizes: list[str], seconds: float, noise: int) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in sizes:
        width, height = SIZES[name]
        path = directory / f"default_x264_{name}_{seconds:g}s_noise{noise}.mp4"
        if not path.exists():
            part = path.with_suffix(f".{uuid.uuid4().hex[:6]}.mp4")
            make_video(part, frames=int(seconds * 30), width=width, height=height, options={},
                       noise=noise)
            part.rename(path)
        out[name] = path
    return out


def decode_side(path: Path, *, model: str, size: str, every: vidq_worker.Decoders,
                rounds: int) -> Report:
    """Alternating rounds of skip on / off over one file, every kind of host."""
    labels = ("CPU host, per wall s", "CPU host, per CPU s", "GPU host, per wall s",
              "GPU host, per CPU s", f"{every.count} decoders, CPU host",
              f"{every.count} decoders, GPU host")
    rows: dict[str, list[float]] = {}

    def measure(skip: bool) -> dict[str, float]:
        cpu = vidq_worker.decode_windows(path, model=model, skip=skip, host="cpu")
        gpu = vidq_worker.decode_windows(path, model=model, skip=skip, host="gpu")
        many = [every.rate([path] * every.count, model=model, skip=skip, host=host,
                           threads=1)[0] for host in ("cpu", "gpu")]
        values = (cpu.windows / cpu.wall_s, cpu.windows / cpu.cpu_s, gpu.windows / gpu.wall_s,
                  gpu.windows / gpu.cpu_s, *many)
        return {**dict(zip(labels, values)), "decoded share": cpu.decoded_share}

    def side(skip: bool) -> float:
        tag = "on" if skip else "off"
        got = measure(skip)
        for label, value in got.items():
            rows.setdefault(f"{label}, skip {tag}", []).append(value)
        return got[labels[0]]

    print(f"{model} {size}:", flush=True)
    measure(True), measure(False)  # untimed: the cold file and allocator
    alternate({"skip on": lambda: side(True), "skip off": lambda: side(False)}, rounds)
    report = Report(f"decode side, {model} sampling, {size}: windows/s, skipping unused "
                    "frames against decoding them all", "windows/s")
    for label in labels:
        report.add(f"{label}, skip off", rows[f"{label}, skip off"], baseline=True)
        report.add(f"{label}, skip on", rows[f"{label}, skip on"], against=f"{label}, skip off")
    share = statistics.median(rows["decoded share, skip on"])
    report.notes.append(f"skip on decodes {share:.0%} of the packets")
    return report


def decode(args: argparse.Namespace) -> list[Report]:
    """Skipping unused frames against decoding every frame: windows/s, clips/s."""
    import torch

    if args.quick:
        args.seconds, args.sizes, args.models, args.rounds, args.e2e_rounds = \
            6.0, ["360p"], ["x3d_xs"], 2, 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a decoder runs its transforms on one core
    files = corpus(args.dir, args.sizes, args.seconds, args.noise)
    every = vidq_worker.Decoders(args.decoders or os.cpu_count() or 1, "processes")
    try:
        reports = [decode_side(path, model=model, size=size, every=every, rounds=args.rounds)
                   for model in args.models for size, path in files.items()]
    finally:
        every.close()
    if not args.skip_e2e:
        torch.set_num_threads(threads)
        paths = list(files.values())
        for model in args.models:
            clfs = {skip: vidq_worker.classifier(model=model, device=args.device,
                                                 precision="fp32", skip_unused_frames=skip)
                    for skip in (True, False)}

            def classify_rate(skip: bool, clfs: dict[bool, Any] = clfs) -> float:
                t = time.perf_counter()
                return vidq_worker.classify(clfs[skip], paths) / (time.perf_counter() - t)

            print(f"end to end, {model}:", flush=True)
            rates = alternate({"skip on": partial(classify_rate, True),
                               "skip off": partial(classify_rate, False)}, args.e2e_rounds)
            report = Report(f"end to end, {model} (classify_many, random weights, fp32, "
                            f"{args.device}): clips/s", "clips/s")
            report.add("skip off", rates["skip off"])
            report.add("skip on", rates["skip on"])
            reports.append(report)
            del clfs
    return reports


# -- the hash of the bytes read ------------------------------------------------------
def read_hash_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--size", default="720p", choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds")
    parser.add_argument("--noise", type=int, nargs="+", default=[4, 40],
                        help="per-frame grain of each file: sets its bitrate (4: the decode "
                        "corpus's, about 0.3 Mbit/s at 720p; 40: about 25 Mbit/s)")
    parser.add_argument("--dir", type=Path,
                        default=Path(tempfile.gettempdir()) / "vidq-decode-bench")
    parser.add_argument("--quick", action="store_true", help="a 6 s 360p file, two rounds")


def hash_pass(path: Path, *, strategy: str, rounds: int, title: str) -> Report:
    """Alternating rounds over one file: decoded hashing every byte read, and unhashed."""
    from vidq.media import HashingReader, open_video, sha256_file

    digest = sha256_file(path)
    cpu: dict[str, list[float]] = {"unhashed": [], "hashed": []}

    def plain() -> float:
        t, c = time.perf_counter(), time.process_time()
        vidq_worker.decode_windows(path, model="x3d_xs", strategy=strategy, host="gpu",
                                   source=str(path))
        cpu["unhashed"].append(time.process_time() - c)
        return time.perf_counter() - t

    def hashed() -> float:
        t, c = time.perf_counter(), time.process_time()
        with open_video(str(path)) as source:
            assert isinstance(source, HashingReader)
            vidq_worker.decode_windows(path, model="x3d_xs", strategy=strategy, host="gpu",
                                       source=source)
            assert source.sha256() == digest
        cpu["hashed"].append(time.process_time() - c)
        return time.perf_counter() - t

    plain(), hashed()  # untimed: the cold file
    for values in cpu.values():
        values.clear()
    times = alternate({"unhashed": plain, "hashed": hashed}, rounds)
    report = Report(title, "s")
    report.add("wall, unhashed (FFmpeg reads the path)", times["unhashed"], baseline=True)
    report.add("wall, hashed (HashingReader)", times["hashed"],
               against="wall, unhashed (FFmpeg reads the path)")
    report.add("CPU, unhashed", cpu["unhashed"], baseline=True)
    report.add("CPU, hashed", cpu["hashed"], against="CPU, unhashed")
    return report


def read_hash(args: argparse.Namespace) -> list[Report]:
    """A decode that hashes every byte it reads (what a worker does, vidq/media.py's
    ``HashingReader``) against FFmpeg reading the file itself, unhashed: seconds."""
    import torch

    if args.quick:
        args.seconds, args.size, args.rounds, args.noise = 6.0, "360p", 2, [4]
    torch.set_num_threads(1)
    reports = []
    for noise in args.noise:
        path = corpus(args.dir, [args.size], args.seconds, noise)[args.size]
        mib = path.stat().st_size / 2**20
        for strategy in ("sliding", "uniform"):  # every window; three clips, seeking
            print(f"{path.name} ({mib:.1f} MiB), {strategy}:", flush=True)
            reports.append(hash_pass(
                path, strategy=strategy, rounds=args.rounds,
                title=f"x3d_xs {strategy} windows of a {args.seconds:g} s {args.size} file of "
                      f"{mib:.1f} MiB (a GPU host's decoder), seconds per video: hashing "
                      "every byte read against FFmpeg reading the file unhashed"))
    return reports


# -- object storage ------------------------------------------------------------------
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no instance-role lookups (a 1 s stall each)
}


def storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--noise", type=int, default=40, help="grain: sets the bitrate")
    parser.add_argument("--quick", action="store_true", help="a 4 s video, two rounds")


def storage_pass(path: Path, *, uri: str, config: Any, strategy: str, rounds: int,
                 gets: list[int]) -> Report:
    """Alternating local and S3 passes over one file's ``strategy`` windows; ``gets``
    counts the store's GET requests."""
    import numpy as np

    from vidq.media import open_video
    from vidq.storage import BoundedReader

    size = path.stat().st_size
    reference = vidq_worker.read_frames(str(path), source=str(path), strategy=strategy,
                                        clips=3, model="x3d_xs")
    read: list[float] = []
    requests: list[int] = []

    def local() -> float:
        t = time.perf_counter()
        vidq_worker.read_frames(str(path), source=str(path), strategy=strategy, clips=3,
                                model="x3d_xs")
        return time.perf_counter() - t

    def remote() -> float:
        gets[0] = 0
        t = time.perf_counter()
        with open_video(uri, storage_config=config) as fh:
            assert isinstance(fh, BoundedReader)
            frames = vidq_worker.read_frames(uri, source=fh, strategy=strategy, clips=3,
                                             model="x3d_xs")
            read.append(fh.bytes_read / size)
        elapsed = time.perf_counter() - t
        requests.append(gets[0])
        assert len(frames) == len(reference) and all(
            np.array_equal(a, b) for a, b in zip(frames, reference)), "S3 frames differ"
        return elapsed

    print(f"{strategy}:", flush=True)
    times = alternate({"local": local, "s3": remote}, rounds)
    report = Report(f"x3d_xs {strategy} windows of a 720p file, seconds per pass: S3 (moto "
                    "on loopback) against the local file", "s")
    report.add("local file", times["local"])
    report.add("s3://", times["s3"])
    report.notes.append(f"S3 reads {statistics.median(read):.2f}x the object's size in "
                        f"{statistics.median(requests):.0f} GETs")
    return report


def storage(args: argparse.Namespace) -> list[Report]:
    """Decoding from an S3-compatible store against the same local file: seconds."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from vidq.storage import StorageConfig

    if args.quick:
        args.seconds, args.rounds = 4.0, 2
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update(S3_CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    reports = []
    gets = [0]

    def count(**_kw: object) -> None:
        gets[0] += 1

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = make_video(Path(tmp) / "bench.mp4", frames=int(args.seconds * 30),
                              width=1280, height=720, noise=args.noise)
            bucket = f"vidq-{uuid.uuid4().hex[:12]}"
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key="bench.mp4", Body=path.read_bytes())
            uri = f"s3://{bucket}/bench.mp4"
            config = StorageConfig(s3_endpoint_url=endpoint)
            fs = config.filesystem("s3")
            fs.s3.meta.events.register("before-send.s3.GetObject", count)  # type: ignore[attr-defined]
            print(f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB, {args.seconds:g} s "
                  "at 720p, index at the end", flush=True)
            for strategy in ("sliding", "uniform"):
                reports.append(storage_pass(path, uri=uri, config=config, strategy=strategy,
                                            rounds=args.rounds, gets=gets))
    finally:
        server.stop()
    return reports
