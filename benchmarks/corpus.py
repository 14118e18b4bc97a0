"""Benchmark videos: moving shapes plus noise (so decoding costs what real video
costs), 640x360 H.264 at 30 fps, 256 frames: exactly four seed windows of 64/30 s,
so the seed's ``get_clip(i * span)`` windows and ``--strategy sliding`` coincide."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

SEED_WINDOW_FRAMES = 64


def make_video(path: Path, *, frames: int = 4 * SEED_WINDOW_FRAMES, fps: int = 30,
               width: int = 640, height: int = 360, seed: int = 0,
               options: dict[str, str] | None = None, noise: int = 12) -> Path:
    """``options``: libx264 options; default veryfast with a 2 s GOP, ``{}`` is libx264's
    own defaults (preset medium: 3 B-frames, b-pyramid, 250-frame GOP). ``noise``:
    amplitude of the fresh per-frame noise (grain that no motion search can predict)."""
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
            for packet in stream.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def make_corpus(directory: Path, n: int, **kwargs: int) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return [make_video(directory / f"bench_{i:03d}.mp4", seed=i, **kwargs) for i in range(n)]


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 2:
        raise SystemExit("usage: python benchmarks/corpus.py DIR [N] [FRAMES]")
    target = Path(sys.argv[1])
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    length = int(sys.argv[3]) if len(sys.argv) > 3 else 4 * SEED_WINDOW_FRAMES
    for p in make_corpus(target, count, frames=length):
        print(p)
