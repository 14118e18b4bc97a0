"""Decoding one dense window keeps only the sampled frames: the peak memory of a
subprocess decoding a 640x360 file at 1,000 fps stays bounded (the other decode limits:
tests/unit/test_decode_limits.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import media

PEAK_RSS = textwrap.dedent(
    """
    import resource, sys
    from worker.video import VideoReader
    from vidq.sampling import Window
    with VideoReader(sys.argv[1]) as reader:  # every limit off
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        (clip,) = reader.clips([Window(0, 0.0, 64 / 30)], num_frames=8)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(clip.source_frames, (after - before) // 1024)
    """
)


@pytest.mark.timeout(120)
def test_peak_memory_of_a_dense_window_is_bounded_by_the_sampled_frames(tmp_path: Path) -> None:
    """640x360 at 1,000 fps: 2,134 frames in one slow_r50 window, 345 KB each in YUV.
    Holding them all took +801 MB (before this change); keeping the 8 sampled ones
    (and the decoder's own few) measured +47 MB."""
    path = tmp_path / "dense_360p.mkv"
    media.make_dense(path, seconds=2.2, width=640, height=360)
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(path)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1],
    )
    frames, growth_mb = map(int, out.stdout.split())
    assert frames == 2134
    assert growth_mb < 200, f"peak RSS grew {growth_mb} MB decoding one window"
