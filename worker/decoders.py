"""The decode stage: one video opened, its windows planned, decoded, sampled and
prepared, clip by clip, in a pipeline's decoder thread or in a decoder process
(worker/decoder_process.py).

``decode_video`` reports through callbacks (``started``, ``clip_ready``) and returns
what the decode did; ``check`` runs before the file is opened and between clips,
and raises to stop. What a decoder needs is one picklable ``DecodeConfig``: the
model's preset, the rules for opening inputs (``InputPolicy``: media roots, sizes,
object storage, decode limits) and how to prepare a clip for the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from vidq.errors import InputError, VidqError
from vidq.faultpoints import pause_point
from vidq.media import HashingReader, open_video
from vidq.sampling import Sampling, plan_windows
from vidq.settings import Settings
from vidq.storage import StorageConfig
from worker.models import ModelPreset
from worker.results import DecodeStats, VideoInfo
from worker.video import ClipFrames, Limits, VideoReader

Prepared = TypeVar("Prepared")


@dataclass(frozen=True)
class InputPolicy:
    """How inputs are opened and what a video may cost (the settings of ``VIDQ_MEDIA_ROOTS``,
    ``VIDQ_MAX_FILE_BYTES``, the object-store settings, the ``VIDQ_MAX_*`` decode limits
    and ``VIDQ_SKIP_UNUSED_FRAMES``)."""

    media_roots: tuple[str, ...] = ()
    max_file_bytes: int = 0
    storage: StorageConfig = field(default_factory=StorageConfig)
    """How decoders reach object-store inputs (s3://...)."""
    limits: Limits = field(default_factory=Limits)
    skip_unused_frames: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> InputPolicy:
        return cls(
            media_roots=settings.media_roots,
            max_file_bytes=settings.max_file_bytes,
            storage=StorageConfig.from_settings(settings),
            limits=Limits(
                max_duration_s=settings.max_duration_s,
                max_pixels=settings.max_pixels,
                max_frames=settings.max_frames,
                max_window_frames=settings.max_window_frames,
                max_decode_s=settings.max_decode_s,
            ),
            skip_unused_frames=settings.skip_unused_frames,
        )


@dataclass(frozen=True)
class DecodeConfig:
    """What a decoder needs: picklable, for a decoder process."""

    preset: ModelPreset
    inputs: InputPolicy = field(default_factory=InputPolicy)
    ffmpeg_threads: int = 0
    """FFmpeg's threads for one video (0 = FFmpeg's choice)."""
    frames_only: bool = False
    """Hand over the uint8 frames (an accelerator transforms them), not the views."""


@dataclass(frozen=True)
class Decoded:
    """What decoding one video did."""

    clips: int
    decode_s: float
    stats: DecodeStats


def decode_video(
    path: str,
    sampling: Sampling,
    config: DecodeConfig,
    *,
    prepare: Callable[[ClipFrames], Prepared],
    started: Callable[[VideoInfo], None],
    clip_ready: Callable[[ClipFrames, Prepared], None],
    check: Callable[[], None],
) -> Decoded:
    """Decode one video: ``started(info)``, then ``clip_ready(clip, prepared)`` for
    each window (``prepare`` makes the model's input of a clip). ``check`` runs before
    the file is opened and between clips, and raises to stop. A bad input raises its
    VidqError; anything else is a decoder bug and raises as it is."""
    t0 = time.perf_counter()
    check()
    inputs = config.inputs
    # Opened once, by descriptor, after the path checks (vidq/media.py).
    with open_video(path, media_roots=inputs.media_roots,
                    max_file_bytes=inputs.max_file_bytes,
                    storage_config=inputs.storage) as source, \
            VideoReader(path, source=source, limits=inputs.limits,
                        threads=config.ffmpeg_threads,
                        skip_unused_frames=inputs.skip_unused_frames) as reader:
        started(reader.info)
        windows = plan_windows(sampling, reader.info.duration_s, config.preset.clip_duration)
        n = 0
        for clip in reader.clips(windows, num_frames=config.preset.num_frames):
            pause_point("decode_clip", path)
            check()
            prepared = prepare(clip)
            clip.rgb = []  # the RGB frames are no longer needed
            clip_ready(clip, prepared)
            n += 1
        if n == 0:
            raise InputError(
                f"{path}: no frames inside the requested window(s) "
                f"(video is {reader.info.duration_s:.2f}s long).",
                kind="no_frames",
            )
        if isinstance(source, HashingReader):
            reader.stats.sha256 = source.sha256()
    return Decoded(n, time.perf_counter() - t0, reader.stats)


def video_error(exc: BaseException, path: str) -> VidqError:
    """What a failure while decoding a video records: its own error if vidq raised
    it, else (a decoder or library crash) the video is ``undecodable``; the worker
    goes on either way."""
    if isinstance(exc, VidqError):
        return exc
    return InputError(f"{path}: {exc}", kind="undecodable")

