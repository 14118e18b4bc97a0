"""Decoding from an S3-compatible store against decoding the same local file.

    python benchmarks/object_storage.py [--seconds 20] [--rounds 3]

Writes one 720p H.264 MP4 with its index at the end (the layout that makes FFmpeg
seek to the end and back), uploads it to moto's S3 server on 127.0.0.1, and
decodes it both ways with x3d_xs's sampling (sliding windows, 4 frames each, with
and without seeking across uniform clips): wall time ratio, bytes read through the
reader against the object's size, and the GET requests the store answered. The
frames are checked equal. Loopback has no latency: on a real store each request
adds a round trip, which the 8 MiB blocks amortise.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--noise", type=int, default=40, help="grain: sets the bitrate")
    args = parser.parse_args()

    import logging
    import os

    import numpy as np
    from moto.server import ThreadedMotoServer

    from benchmarks.corpus import make_video
    from tests.objectstore import CREDENTIALS, S3Server
    from vidq.media import open_video
    from vidq.sampling import Sampling, plan_windows
    from vidq.storage import BoundedReader, StorageConfig
    from worker.video import VideoReader

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(endpoint=f"http://{host}:{port}")
    gets = 0

    def count(**_kw: object) -> None:
        nonlocal gets
        gets += 1

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.mp4"
        make_video(path, frames=int(args.seconds * 30), width=1280, height=720, noise=args.noise)
        bucket = s3.new_bucket()
        s3.upload(bucket, "bench.mp4", path)
        uri = f"s3://{bucket}/bench.mp4"
        storage = StorageConfig(s3_endpoint_url=s3.endpoint)
        fs = storage.filesystem("s3")
        fs.s3.meta.events.register("before-send.s3.GetObject", count)  # type: ignore[attr-defined]
        size = path.stat().st_size
        print(f"{path.name}: {size / 2**20:.1f} MiB, {args.seconds:g} s at 720p, index at the end")
        for strategy in ("sliding", "uniform"):
            sampling = Sampling(strategy=strategy, clips=3)

            def decode(source: object, sampling: Sampling = sampling
                       ) -> tuple[float, list[np.ndarray]]:
                t0 = time.perf_counter()
                with VideoReader(uri, source=source) as reader:  # type: ignore[arg-type]
                    windows = plan_windows(sampling, reader.info.duration_s, Fraction(8, 5))
                    frames = [c.frames for c in reader.clips(windows, num_frames=4)]
                return time.perf_counter() - t0, frames

            ratios = []
            for _ in range(args.rounds):
                local_s, want = decode(str(path))
                gets = 0
                with open_video(uri, storage_config=storage) as fh:
                    assert isinstance(fh, BoundedReader)
                    remote_s, got = decode(fh)
                    read = fh.bytes_read
                assert len(got) == len(want) and all(
                    np.array_equal(a, b) for a, b in zip(got, want))
                ratios.append(remote_s / local_s)
                print(f"  {strategy:8s} local {local_s:.2f}s  s3 {remote_s:.2f}s  "
                      f"ratio {remote_s / local_s:.2f}  read {read / size:.2f}x the object "
                      f"in {gets} GETs")
            print(f"{strategy}: median s3/local {statistics.median(ratios):.2f}")
    server.stop()


if __name__ == "__main__":
    main()
