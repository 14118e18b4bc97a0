"""The benchmarks' videos: moving shapes over gradients plus fresh per-frame noise (so
decoding costs what real video costs), 640x360 H.264 at 30 fps by default, 256
frames: four slow_r50 windows of 64/30 s, so the seed's ``get_clip(i *
clip_duration)`` windows and ``--strategy sliding`` coincide.

Needs only PyAV and numpy. As a script it writes sample videos:

    python benchmarks/corpus.py DIR [N] [FRAMES]
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

SEED_WINDOW_FRAMES = 64
"""Frames of one slow_r50 window at 30 fps (8 frames x sampling rate 8)."""
SEED_SPAN = Fraction(SEED_WINDOW_FRAMES, 30)


def make_video(path: Path, *, frames: int = 4 * SEED_WINDOW_FRAMES, fps: int = 30,
               width: int = 640, height: int = 360, seed: int = 0,
               options: dict[str, str] | None = None, noise: int = 12) -> Path:
    """One corpus video. ``options``: libx264 options; default veryfast with a 2 s GOP,
    ``{}`` is libx264's own defaults (preset medium: 3 B-frames, b-pyramid, 250-frame
    GOP). ``noise``: amplitude of the fresh per-frame grain (what no motion search
    can predict, and so what sets the bitrate)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "g": "60"} if options is None else options
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            cx = int((i * 7 + seed * 50) % width)
            cy = int(height / 2 + 80 * np.sin(i / 15 + seed))
            img[..., 0] = ((xx + i * 3) % 256).astype(np.uint8)
            img[..., 1] = ((yy * 2 + i + seed * 10) % 256).astype(np.uint8)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < 40**2] = (255, 64, 32)
            img = np.clip(img.astype(np.int16) + rng.integers(-noise, noise, img.shape), 0, 255)
            frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_corpus(directory: Path, n: int, *, prefix: str = "bench", first_seed: int = 0,
                **kwargs: Any) -> list[Path]:
    """``n`` corpus videos of distinct content in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    return [make_video(directory / f"{prefix}_{i:03d}.mp4", seed=first_seed + i, **kwargs)
            for i in range(n)]


def seed_windows(path: Path) -> int:
    """How many whole slow_r50 windows (64/30 s) a video holds."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.duration and stream.time_base:
            duration = Fraction(stream.duration * stream.time_base)
        else:
            duration = Fraction(container.duration or 0, 1_000_000)
    return max(int(duration.limit_denominator(100_000) / SEED_SPAN), 1)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: python benchmarks/corpus.py DIR [N] [FRAMES]")
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    frames = int(sys.argv[3]) if len(sys.argv) > 3 else 4 * SEED_WINDOW_FRAMES
    for path in make_corpus(Path(sys.argv[1]), count, frames=frames):
        print(path)
