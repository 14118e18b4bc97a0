"""Decoding with PyAV and clip sampling.

One sequential decode pass per video serves all of its clips. Frames stay in
the decoder's YUV form until a window closes; only the frames the temporal
subsample keeps are converted to RGB. Windows are placed on the stream's own
timestamps, with the same second-to-pts arithmetic as PyTorchVideo's
``EncodedVideo.get_clip``, so 24/25/60 fps and variable frame rate videos span
the right seconds and the frames chosen are the seed's frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch

from vidq.errors import InputError
from vidq.sampling import Sampling, Window, plan_windows

# A file's *content* can make FFmpeg open other resources: an HLS playlist or a
# concat script saved as .mp4 would fetch URLs or read other local files. Only
# plain files, and only container formats that hold their media inside them.
SAFE_OPEN = {
    "protocol_whitelist": "file",
    "format_whitelist": ",".join(
        "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,avi,mpegts,mpeg,mpegvideo,flv,asf,ogg,"
        "h264,hevc,m4v,mjpeg,yuv4mpegpipe,nut,mxf,dv,ivf,obu,rm,vc1,gif,"
        "wav,mp3,aac,flac".split(",")
    ),
}


@dataclass(frozen=True)
class VideoInfo:
    duration_s: float
    fps: float
    width: int
    height: int
    frames: int
    """Frames the stream declares (or duration x fps where it declares none)."""
    codec: str
    has_audio: bool


@dataclass
class ClipFrames:
    """The RGB frames one window contributes after temporal subsampling."""

    window: Window
    frames: np.ndarray
    """uint8, (num_frames, H, W, 3)."""
    source_frames: int
    """Frames the window held before subsampling (fewer than expected: padded)."""


@dataclass(frozen=True)
class Limits:
    max_duration_s: float = 0.0
    max_pixels: int = 0
    max_frames: int = 0


def _secs_to_pts(seconds: float, time_base: Fraction, start_pts: int) -> int:
    # Exactly pytorchvideo.data.utils.secs_to_pts(round_mode="ceil"), float arithmetic included.
    return math.ceil(seconds / time_base) + start_pts


def subsample_indices(count: int, num_samples: int) -> list[int]:
    """PyTorchVideo's uniform_temporal_subsample indices (repeats frames when count < num)."""
    idx = torch.linspace(0, count - 1, num_samples)
    return torch.clamp(idx, 0, count - 1).long().tolist()


def _rational(value: Fraction | None) -> float:
    return float(value) if value else 0.0


class VideoReader:
    """An opened video: metadata at once, clips through one decode pass."""

    def __init__(self, path: str | Path, *, limits: Limits = Limits(), threads: int = 0) -> None:
        self.path = str(path)
        try:
            self._container = av.open(self.path, metadata_errors="ignore", options=SAFE_OPEN)
        except av.error.InvalidDataError:
            raise InputError(
                f"{self.path}: not a video FFmpeg can read (wrong format, or damaged: "
                "an MP4 cut short loses its index).",
                kind="not_a_video",
            ) from None
        except av.error.FFmpegError as exc:
            raise InputError(f"{self.path}: cannot open ({exc.strerror}).", kind="not_a_video") from None
        try:
            self._open_stream(limits, threads)
        except BaseException:
            self._container.close()
            raise

    def _open_stream(self, limits: Limits, threads: int) -> None:
        container = self._container
        if not container.streams.video:
            what = "audio only" if container.streams.audio else "no streams"
            raise InputError(f"{self.path}: no video stream ({what}).", kind="no_video_stream")
        stream = container.streams.video[0]
        if stream.codec_context is None or stream.codec_context.width == 0:
            raise InputError(f"{self.path}: video stream has no decodable codec.", kind="unsupported")
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        self._stream = stream
        self.time_base: Fraction = stream.time_base or Fraction(1, 1)
        self.start_pts: int = stream.start_time or 0
        fps = _rational(stream.average_rate) or _rational(stream.guessed_rate)
        if stream.duration:
            duration = float(stream.duration * self.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = self._duration_from_packets()
        frames = stream.frames or int(round(duration * fps))
        self.info = VideoInfo(
            duration_s=duration,
            fps=fps,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            frames=frames,
            codec=stream.codec_context.name,
            has_audio=bool(container.streams.audio),
        )
        self._check_limits(limits)

    def _duration_from_packets(self) -> float:
        # No duration in the headers (raw streams, some WebM): demux (cheap, no decode).
        last = None
        for packet in self._container.demux(self._stream):
            if packet.pts is not None:
                last = packet.pts if last is None else max(last, packet.pts)
        self._container.seek(0)
        if last is None:
            raise InputError(f"{self.path}: video stream has no timestamps.", kind="no_frames")
        return float((last - self.start_pts) * self.time_base)

    def _check_limits(self, limits: Limits) -> None:
        info = self.info
        if limits.max_duration_s and info.duration_s > limits.max_duration_s:
            raise InputError(
                f"{self.path}: duration {info.duration_s:.0f}s is over the limit "
                f"VIDQ_MAX_DURATION_S={limits.max_duration_s:g}.",
                kind="over_limit",
            )
        if limits.max_pixels and info.width * info.height > limits.max_pixels:
            raise InputError(
                f"{self.path}: {info.width}x{info.height} is over the limit "
                f"VIDQ_MAX_PIXELS={limits.max_pixels}.",
                kind="over_limit",
            )
        if limits.max_frames and info.frames > limits.max_frames:
            raise InputError(
                f"{self.path}: {info.frames} frames is over the limit VIDQ_MAX_FRAMES={limits.max_frames}.",
                kind="over_limit",
            )

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def clips(
        self, windows: list[Window], *, num_frames: int, seek_gap_s: float = 4.0
    ) -> Iterator[ClipFrames]:
        """Yield each window's subsampled RGB frames, in window order, from one decode pass.

        Seeks forward only across gaps longer than ``seek_gap_s`` (sparse uniform
        clips of a long video); otherwise decoding straight through is cheaper.
        """
        ranges = sorted(
            (
                (_secs_to_pts(w.start_sec, self.time_base, self.start_pts),
                 _secs_to_pts(w.end_sec, self.time_base, self.start_pts), w)
                for w in windows
            ),
            key=lambda r: (r[0], r[2].index),
        )
        gap_pts = int(seek_gap_s / self.time_base) if seek_gap_s > 0 else 0
        active: list[tuple[int, int, Window, dict[int, av.VideoFrame]]] = []
        nxt = 0
        last_pts: int | None = None
        decoded = 0

        sought: list[int] = []

        def seek_to(pts: int) -> None:
            # A seek lands on the keyframe before ``pts``, which can be further back
            # than the gap (long GOPs, a window past the end): seek to each target at
            # most once, or the same gap would trigger the same seek forever.
            if sought and pts <= sought[-1]:
                return
            sought.append(pts)
            self._container.seek(pts, backward=True, any_frame=False, stream=self._stream)

        if ranges and gap_pts and ranges[0][0] - self.start_pts > gap_pts:
            seek_to(ranges[0][0])
        try:
            frames_iter = self._container.decode(self._stream)
            for frame in frames_iter:
                pts = frame.pts
                if pts is None:
                    continue
                decoded += 1
                last_pts = pts if last_pts is None else max(last_pts, pts)
                while nxt < len(ranges) and ranges[nxt][0] <= pts:
                    lo, hi, w = ranges[nxt]
                    active.append((lo, hi, w, {}))
                    nxt += 1
                still: list[tuple[int, int, Window, dict[int, av.VideoFrame]]] = []
                for lo, hi, w, held in active:
                    if pts >= hi:
                        clip = self._finish(w, held, num_frames)
                        if clip is not None:
                            yield clip
                        continue
                    if pts >= lo:
                        held[pts] = frame
                    still.append((lo, hi, w, held))
                active = still
                if not active:
                    if nxt == len(ranges):
                        break
                    if gap_pts and ranges[nxt][0] - pts > gap_pts:
                        seek_to(ranges[nxt][0])
        except av.error.FFmpegError as exc:
            if decoded == 0:
                raise InputError(
                    f"{self.path}: cannot decode video ({exc.strerror}).", kind="undecodable"
                ) from None
            raise InputError(
                f"{self.path}: decoding failed after {decoded} frames ({exc.strerror}); "
                "the file is corrupt or truncated.",
                kind="corrupt",
            ) from None
        if decoded == 0:
            raise InputError(f"{self.path}: no decodable video frame.", kind="no_frames")
        for _lo, _hi, w, held in active:
            clip = self._finish(w, held, num_frames)
            if clip is not None:
                yield clip
        self._check_truncation(last_pts, [r[2] for r in ranges[nxt:]])

    def _check_truncation(self, last_pts: int | None, unopened: list[Window]) -> None:
        if not unopened or last_pts is None:
            return
        decoded_until = float((last_pts - self.start_pts) * self.time_base)
        if decoded_until < 0.9 * self.info.duration_s - 1.0:
            raise InputError(
                f"{self.path}: frames stop at {decoded_until:.1f}s of a declared "
                f"{self.info.duration_s:.1f}s; the file is truncated.",
                kind="truncated",
            )

    @staticmethod
    def _finish(
        window: Window, held: dict[int, av.VideoFrame], num_frames: int
    ) -> ClipFrames | None:
        if not held:
            return None
        ordered = [held[p] for p in sorted(held)]
        picks = subsample_indices(len(ordered), num_frames)
        rgb: dict[int, np.ndarray] = {}
        for i in picks:
            if i not in rgb:
                rgb[i] = ordered[i].to_ndarray(format="rgb24")
        frames = np.stack([rgb[i] for i in picks])
        return ClipFrames(window=window, frames=frames, source_frames=len(ordered))


def read_clips(
    path: str | Path,
    sampling: Sampling,
    *,
    num_frames: int,
    clip_duration: Fraction,
    limits: Limits = Limits(),
) -> tuple[VideoInfo, list[ClipFrames]]:
    """Open, plan windows, decode once. Raises InputError with a kind on bad input."""
    with VideoReader(path, limits=limits) as reader:
        windows = plan_windows(sampling, reader.info.duration_s, clip_duration)
        clips = list(reader.clips(windows, num_frames=num_frames))
        if not clips:
            raise InputError(
                f"{path}: no frames inside the requested window(s) "
                f"(video is {reader.info.duration_s:.2f}s long).",
                kind="no_frames",
            )
        return reader.info, clips
