"""What flows through a worker's pipeline: one in-flight video's state, and the
small frozen messages its decoders send the model loop.

    decoder ──▶ VideoStarted ─▶ ClipReady ... ClipReady ─▶ VideoDecoded ──▶ model loop
                (or VideoFailed, at any point)

A message names its video (an ``InFlight``); once decoding starts only the model loop
changes that video's state, so the queue between them is the only lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeAlias

import torch

from vidq import metrics
from vidq.errors import TransientError, VidqError
from vidq.sampling import Sampling
from worker.results import DecodeStats, VideoInfo, VideoResult
from worker.video import ClipFrames

_FINISH = threading.Lock()  # a video can be ended by a decoder, the model loop or close()


class Closed(Exception):
    """The pipeline is closing: a decoder stops where it is."""


def shutdown_error() -> TransientError:
    """What a video still in flight when the pipeline closes ends with."""
    return TransientError("the worker is shutting down; the job goes back to the queue",
                          kind="shutdown")


@dataclass(frozen=True)
class ScoredClip:
    """A clip after its forward pass: its probabilities per view (crops, classes) and,
    when embeddings are kept, its pooled features per view."""

    clip: ClipFrames
    probs: torch.Tensor
    features: torch.Tensor | None


@dataclass(eq=False)
class InFlight:
    """One video in flight: everything the pipeline knows about it."""

    path: str
    sampling: Sampling
    future: Future[VideoResult]
    should_stop: Callable[[], VidqError | None]
    submitted: float = field(default_factory=time.perf_counter)
    info: VideoInfo | None = None
    expected: int | None = None
    """Clips the decoder produced; known when it has finished the video."""
    scored: list[ScoredClip] = field(default_factory=list)
    decode_s: float = 0.0
    model_s: float = 0.0
    decode_stats: DecodeStats | None = None
    done: bool = False

    def finish(self, result: VideoResult | None = None,
               error: BaseException | None = None) -> None:
        """End the video with its result or its error (the first call wins)."""
        with _FINISH:
            if self.done:
                return
            self.done = True
        metrics.IN_FLIGHT.dec()
        self.scored = []
        if error is not None:
            self.future.set_exception(error)
        else:
            assert result is not None, "a video ends with a result or an error"
            self.future.set_result(result)


# -- decoders -> model loop ------------------------------------------------------------
@dataclass(frozen=True)
class VideoStarted:
    video: InFlight
    info: VideoInfo


@dataclass(frozen=True)
class ClipReady:
    """A prepared clip, waiting for a batch. It holds one of the pipeline's clip slots
    until the model loop takes it."""

    video: InFlight
    clip: ClipFrames
    prepared: torch.Tensor
    release: Callable[[], None] | None = None
    """Frees the decoder process's shared slot the clip lies in, once its batch has
    run (None for a decoder thread's clip)."""


@dataclass(frozen=True)
class VideoDecoded:
    """The decoder is done with the video: ``clips`` clips were sent."""

    video: InFlight
    clips: int
    decode_s: float
    stats: DecodeStats


@dataclass(frozen=True)
class VideoFailed:
    video: InFlight
    error: VidqError


Message: TypeAlias = VideoStarted | ClipReady | VideoDecoded | VideoFailed
