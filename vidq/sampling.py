"""Which windows of a video are classified: the sampling strategies.

Torch-free, so the producer can validate a request and key it for dedupe with
the same code the worker uses to place the windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from vidq.errors import InputError

STRATEGIES = ("single", "uniform", "sliding")


@dataclass(frozen=True)
class Sampling:
    """Which windows of a video are classified, and how many spatial crops each."""

    strategy: str = "single"
    clips: int = 10
    """Number of clips for ``uniform``."""
    stride_s: float | None = None
    """Seconds between window starts for ``sliding``; default: one clip span."""
    start_sec: float = 0.0
    """Start of the one clip for ``single``."""
    crops: int = 1
    """1 (centre crop, the seed's) or 3 (left, centre, right; the published 3x10 eval)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InputError(
                f"unknown strategy {self.strategy!r}; choose {', '.join(STRATEGIES)}.",
                kind="config",
            )
        if self.crops not in (1, 3):
            raise InputError("crops must be 1 or 3.", kind="config")
        if self.clips < 1 or (self.stride_s is not None and self.stride_s <= 0):
            raise InputError("clips must be >= 1 and stride > 0.", kind="config")

    def key(self) -> str:
        """Canonical text of the parameters that change results (for dedupe)."""
        if self.strategy == "single":
            detail = f"start={self.start_sec:g}"
        elif self.strategy == "uniform":
            detail = f"clips={self.clips}"
        else:
            detail = f"stride={self.stride_s:g}" if self.stride_s else "stride=span"
        return f"{self.strategy}:{detail}:crops={self.crops}"


@dataclass(frozen=True)
class Window:
    index: int
    start_sec: float
    end_sec: float


def plan_windows(sampling: Sampling, duration_s: float, clip_duration: Fraction) -> list[Window]:
    """The windows a sampling strategy classifies in a video of ``duration_s`` seconds."""
    span = float(clip_duration)
    if sampling.strategy == "single":
        starts = [float(sampling.start_sec)]
    elif sampling.strategy == "uniform":
        # PyTorchVideo's ConstantClipsPerVideoSampler (and SlowFast's multi-view test):
        # start i = i * (duration - span) / clips, so the last clip stops short of the end.
        max_start = max(duration_s - span, 0.0)
        step = max_start / sampling.clips
        starts = [step * i for i in range(sampling.clips)] if max_start > 0 else [0.0]
    else:
        stride = float(sampling.stride_s) if sampling.stride_s else span
        starts = []
        i = 0
        # Same arithmetic as a seed user tagging a video: start = i * stride.
        while i == 0 or i * stride + span <= duration_s + 1e-6:
            starts.append(i * stride)
            i += 1
        tail = duration_s - (starts[-1] + span)
        if tail > 1e-6:  # cover the end with one window aligned to it
            starts.append(max(duration_s - span - 1e-6, 0.0))
    return [Window(i, s, s + span) for i, s in enumerate(starts)]
