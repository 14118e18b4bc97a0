"""``vidq classify`` against the seed's slow_r50 pipeline, same videos, same windows.

    python benchmarks/classify_vs_seed.py [--videos 3] [--rounds 3] [--seed-script PATH]
                                          [--dir DIR]

About 3 minutes with the defaults on 2 cores. ``--dir`` takes .mp4 files whose
length is a whole number of clip spans (64/30 s), so both sides see the same windows.

Each video is 640x360 at 30 fps, ``--frames`` long (default 256 = 4 clip spans of
64/30 s, so the seed's windows i * clip_duration and our sliding windows are the
same 4 windows). Content is /work/shared/reference/make_video.py's: moving shapes
over gradients plus noise, H.264 ``veryfast``, a keyframe every 60 frames.

Measured in this one run, ``--rounds`` times, seed then ours each round:
  * seed: the seed script (default /work/shared/reference/seed_pipeline.py) once
    per video, N_CLIPS = the video's whole clip spans; its own ``total_s`` (open,
    decode, transform, forward for every clip; model construction excluded);
  * ours: one ``vidq classify --strategy sliding --json`` over all videos; the
    time it reports on stderr, measured after model load (decode, transform,
    forward, assembly);
  * floor: the bare model forward (softmax included) on random input of our batch
    size and precision, in this process, after ours in each round: what the model
    alone allows.
Every time is printed with its baseline and the ratio. Both sides use random
slow_r50 weights (the pretrained checkpoint is not reachable offline), which
changes no timing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SPAN = Fraction(64, 30)  # slow_r50: 8 frames x sampling rate 8 at 30 fps
DEFAULT_SEED_SCRIPT = "/work/shared/reference/seed_pipeline.py"


def write_video(path: Path, *, frames: int, fps: int = 30, width: int = 640, height: int = 360,
                seed: int = 0) -> None:
    """make_video.py's content with an exact frame count."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.options = {"preset": "veryfast", "g": "60"}
        yy, xx = np.mgrid[0:height, 0:width]
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            cx = int((i * 7 + seed * 50) % width)
            cy = int(height / 2 + 80 * np.sin(i / 15))
            img[..., 0] = ((xx + i * 3) % 256).astype(np.uint8)
            img[..., 1] = ((yy * 2 + i) % 256).astype(np.uint8)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < 40**2] = (255, 64, 32)
            noise = rng.integers(-12, 12, img.shape)
            img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
            for packet in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in st.encode():
            out.mux(packet)


def clip_spans(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.duration:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = container.duration / 1e6
    return max(int(Fraction(duration).limit_denominator(100000) / SPAN), 1)


def run_seed(script: str, video: Path, clips: int) -> dict[str, float]:
    proc = subprocess.run([sys.executable, script, str(video), str(clips)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"seed script failed on {video}:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_ours(videos: list[Path], args: argparse.Namespace) -> tuple[int, float, list[dict]]:
    command = [str(Path(sys.executable).with_name("vidq")), "classify", *map(str, videos),
               "--strategy", "sliding", "--json", "--model", "slow_r50", "--weights", args.weights,
               "--precision", args.precision]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"vidq classify failed:\n{proc.stderr[-2000:]}")
    summary = re.search(r"vidq: (\d+) clips in ([\d.]+)s", proc.stderr)
    if summary is None:
        sys.exit(f"no summary line from vidq classify:\n{proc.stderr}")
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return int(summary.group(1)), float(summary.group(2)), results


class ForwardFloor:
    """The bare forward (softmax included) of vidq's Classifier on random input."""

    def __init__(self, precision: str, batch_size: int) -> None:
        import torch

        from worker.inference import Classifier

        self.clf = Classifier(model="slow_r50", weights="random", precision=precision,
                              batch_size=batch_size)
        p = self.clf.preset
        self.views = torch.randn(self.clf.batch_size, 3, p.num_frames, p.crop_size, p.crop_size)
        self.clf.forward(self.views)  # first call: oneDNN picks and caches its kernels

    def measure(self, seconds: float) -> tuple[int, float]:
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < seconds:
            self.clf.forward(self.views)
            n += self.clf.batch_size
        return n, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=3, help="videos to generate (default 3)")
    parser.add_argument("--frames", type=int, default=256,
                        help="frames per video (default 256 = 4 clip spans)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="use the .mp4 files in DIR (whole clip spans long) instead "
                        "of generating videos")
    parser.add_argument("--seed-script", default=DEFAULT_SEED_SCRIPT)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=0, help="0: vidq's default")
    parser.add_argument("--rounds", type=int, default=3, help="seed-then-ours rounds (default 3)")
    parser.add_argument("--floor-seconds", type=float, default=5.0,
                        help="seconds of bare forward passes per round (default 5)")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # before this script adds its own load

    with tempfile.TemporaryDirectory(prefix="vidq_bench_") as tmp:
        if args.dir:
            videos = sorted(args.dir.glob("*.mp4"))
        else:
            videos = [Path(tmp) / f"bench_{i}.mp4" for i in range(args.videos)]
            for i, v in enumerate(videos):
                write_video(v, frames=args.frames, seed=i)
        if not videos:
            sys.exit("no videos")
        spans = {v: clip_spans(v) for v in videos}
        print(f"{len(videos)} videos, {sum(spans.values())} clips of {float(SPAN):.4f}s "
              f"(slow_r50 8x8) per round, {args.rounds} rounds, {os.cpu_count()} CPUs")

        # Rounds alternate seed and ours so that any other load on the machine
        # weighs on both sides alike; the totals add up every round.
        floor = ForwardFloor(args.precision, args.batch_size)
        batch, floor_precision = floor.clf.batch_size, floor.clf.precision
        seed_clips, seed_s, our_clips, our_s, round_ratios = 0, 0.0, 0, 0.0, []
        floor_clips, floor_s = 0, 0.0
        seed_stage = {"decode_transform_s": 0.0, "model_s": 0.0}
        our_stage = {"model_s": 0.0}
        for _ in range(args.rounds):
            r_clips, r_s = 0, 0.0
            for v in videos:
                out = run_seed(args.seed_script, v, spans[v])
                r_clips += out["clips"]
                r_s += out["total_s"]
                for key in seed_stage:
                    seed_stage[key] += out[key]
            o_clips, o_s, results = run_ours(videos, args)
            for v, r in zip(videos, results):
                for key in our_stage:
                    our_stage[key] += r["timing"][key]
                starts = [c["start_sec"] for c in r["clips"]]
                expected = [round(i * (8 * 8) / 30, 4) for i in range(spans[v])]
                if starts != expected:
                    sys.exit(f"{v}: our windows {starts} are not the seed's {expected}")
            if o_clips != r_clips:
                sys.exit(f"clip counts differ: seed {r_clips}, ours {o_clips}")
            f_clips, f_s = floor.measure(args.floor_seconds)
            floor_clips, floor_s = floor_clips + f_clips, floor_s + f_s
            round_ratios.append((o_clips / o_s) / (r_clips / r_s))
            seed_clips, seed_s = seed_clips + r_clips, seed_s + r_s
            our_clips, our_s = our_clips + o_clips, our_s + o_s
        seed_rate = seed_clips / seed_s
        our_rate = our_clips / our_s
        precision = results[0]["precision"]

        floor_rate = floor_clips / floor_s
        load_after = os.getloadavg()[0]

    print(f"seed pipeline (fp32, one clip at a time): {seed_clips} clips in {seed_s:.2f}s = "
          f"{seed_rate:.3f} clips/s  (baseline, 1.00x); of its time: decode+transform "
          f"{seed_stage['decode_transform_s'] / seed_s:.0%}, "
          f"model {seed_stage['model_s'] / seed_s:.0%}")
    print(f"vidq classify --strategy sliding ({precision}, batch {batch}): {our_clips} clips in "
          f"{our_s:.2f}s = {our_rate:.3f} clips/s  = {our_rate / seed_rate:.2f}x the seed "
          f"(per round: {', '.join(f'{r:.2f}x' for r in round_ratios)}); "
          f"forward passes {our_stage['model_s'] / our_s:.0%} of its time")
    print(f"bare model forward ({floor_precision}, batch {batch}, random input): "
          f"{floor_rate:.3f} clips/s = {floor_rate / seed_rate:.2f}x the seed; "
          f"vidq classify reaches {our_rate / floor_rate:.0%} of it")
    print(f"load average {load_before:.2f} before, {load_after:.2f} after (this benchmark "
          f"itself keeps the CPUs busy)")
    if load_before > 0.5 * (os.cpu_count() or 1):
        print("note: other processes were using the CPUs; the rounds' ratios are fairer than "
              "absolute rates; rerun on a quiet machine.")


if __name__ == "__main__":
    main()
