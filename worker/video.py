"""Decoding with PyAV and clip sampling.

One sequential pass per video serves all of its clips. Packets are demuxed a
window ahead of the decoder, so each window's frame timestamps are known before
any of its frames is decoded: the temporal subsample is chosen from the packets'
timestamps, only the frames it picks are kept (memory stays bounded whatever the
file's frame rate), and packets of frames that nothing samples and nothing
references (most B-frames, read from the bitstream by worker/bitstream.py) never
reach the decoder. Every frame that is decoded is decoded exactly as it would be
without skipping. Windows are placed on the stream's own timestamps, with the
same second-to-pts arithmetic as PyTorchVideo's ``EncodedVideo.get_clip``, so
24/25/60 fps and variable frame rate videos span the right seconds and the
frames chosen are the seed's frames.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import cast

import av
import numpy as np
import torch
from av.container import InputContainer
from av.video.reformatter import VideoReformatter

from vidq.errors import InputError
from vidq.media import VideoSource
from vidq.sampling import Sampling, Window, plan_windows
from worker.bitstream import ReferenceReader
from worker.results import DecodeStats, VideoInfo

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


@dataclass
class ClipFrames:
    """The RGB frames one window contributes after temporal subsampling."""

    window: Window
    rgb: list[np.ndarray]
    """uint8 (H, W, 3) per sampled frame, in order (a frame repeats where the window is
    padded). Not stacked: the transforms read one frame at a time, and a stacked 1080p
    clip (50 MB, beyond the allocator's reuse) cost a fifth of the decode in fresh
    zeroed pages (`python -m benchmarks decode`)."""
    source_frames: int
    """Frames the window held before subsampling (fewer than expected: padded)."""

    @property
    def frames(self) -> np.ndarray:
        """The frames stacked, uint8 (num_frames, H, W, 3): a copy."""
        return np.stack(self.rgb) if self.rgb else np.empty((0, 0, 0, 3), np.uint8)


@dataclass(frozen=True)
class Limits:
    """What a video may cost; 0 switches a limit off. Checked against the headers
    at open and, because headers can lie, against what is actually decoded."""

    max_duration_s: float = 0.0
    max_pixels: int = 0
    max_frames: int = 0
    max_window_frames: int = 0
    """Frames in one clip window (a 1,000 fps stream holds 2,133 in a slow_r50 window)."""
    max_decode_s: float = 0.0
    """Wall time of one video's decode."""


def _secs_to_pts(seconds: float, time_base: Fraction, start_pts: int) -> int:
    # Exactly pytorchvideo.data.utils.secs_to_pts(round_mode="ceil"), float arithmetic included.
    return math.ceil(seconds / time_base) + start_pts


def subsample_indices(count: int, num_samples: int) -> list[int]:
    """PyTorchVideo's uniform_temporal_subsample indices (repeats frames when count < num)."""
    idx = torch.linspace(0, count - 1, num_samples)
    return torch.clamp(idx, 0, count - 1).long().tolist()


def _rational(value: Fraction | None) -> float:
    return float(value) if value else 0.0


class _Replan(Exception):
    """The frames out of the decoder are not the ones the packets announced."""


@dataclass(eq=False)
class _WindowPlan:
    """One window's state: collecting packet timestamps, then waiting for its frames."""

    lo: int
    hi: int
    window: Window
    pts: list[int] = field(default_factory=list)
    """Timestamps of the packets in [lo, hi), in demux order."""
    present: frozenset[int] = frozenset()
    sampled: list[int] = field(default_factory=list)
    """The timestamps the subsample picks, in pick order (repeats when padding)."""
    held: dict[int, av.VideoFrame] = field(default_factory=dict)
    decoded: set[int] = field(default_factory=set)
    skipped: set[int] = field(default_factory=set)

    def holds(self, pts: int) -> bool:
        return self.lo <= pts < self.hi
class VideoReader:
    """An opened video: metadata at once, clips through one decode pass."""

    def __init__(
        self,
        path: str | Path,
        *,
        limits: Limits = Limits(),
        threads: int = 0,
        skip_unused_frames: bool = True,
        source: str | VideoSource | None = None,
    ) -> None:
        self.path = str(path)
        self.source: str | VideoSource = source or self.path
        """What FFmpeg opens: the path, an already opened descriptor's /proc name, or a
        seekable file object (an object-store read, vidq/storage.py)."""
        self.limits = limits
        self.threads = threads
        self.skip_unused_frames = skip_unused_frames
        self.stats = DecodeStats()
        self._used = False
        # One converter to RGB for the reader's frames, single-threaded, on the
        # decoder's own thread. A frame's own (``to_ndarray(format=...)``) is a new
        # scaler per frame with automatic threads, which hand the GIL back and forth:
        # beside a busy Python thread a 360p frame took 6-7 ms to convert instead of
        # 0.3-1 ms, and two bare decoder threads went from 42 to 52 clips/s. The pixels
        # are the same (tests/test_video.py).
        self._rgb = VideoReformatter()
        self._open()

    def _open(self) -> None:
        if not isinstance(self.source, str):
            self.source.seek(0)  # reopened for a second pass: from the start again
        try:
            self._container = cast(InputContainer, av.open(  # opened for reading
                self.source, metadata_errors="ignore", options=SAFE_OPEN))
        except av.error.InvalidDataError:
            raise InputError(
                f"{self.path}: not a video FFmpeg can read (wrong format, or damaged: "
                "an MP4 cut short loses its index).",
                kind="not_a_video",
            ) from None
        except av.error.FFmpegError as exc:
            raise InputError(f"{self.path}: cannot open ({exc.strerror}).",
                             kind="not_a_video") from None
        try:
            self._open_stream(self.limits, self.threads)
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
            raise InputError(f"{self.path}: video stream has no decodable codec.",
                             kind="unsupported")
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
                f"{self.path}: {info.frames} frames is over the limit "
                f"VIDQ_MAX_FRAMES={limits.max_frames}.",
                kind="over_limit",
            )

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


    # -- decoding ------------------------------------------------------------------

    def clips(
        self, windows: list[Window], *, num_frames: int, seek_gap_s: float = 4.0
    ) -> Iterator[ClipFrames]:
        """Yield each window's subsampled RGB frames, as windows end, from one decode pass.

        Seeks forward only across gaps longer than ``seek_gap_s`` (sparse uniform
        clips of a long video); otherwise decoding straight through is cheaper.
        ``self.stats`` counts the packets read, skipped and decoded.
        """
        plans = sorted(
            (
                _WindowPlan(
                    lo=_secs_to_pts(w.start_sec, self.time_base, self.start_pts),
                    hi=_secs_to_pts(w.end_sec, self.time_base, self.start_pts),
                    window=w,
                )
                for w in windows
            ),
            key=lambda p: (p.lo, p.window.index),
        )
        gap_pts = int(seek_gap_s / self.time_base) if seek_gap_s > 0 else 0
        if self._used:  # a decoder that has been flushed takes no more packets
            self._container.close()
            self._open()
        self._used = True
        self.stats = DecodeStats()
        self._sought: list[int] = []
        started = time.monotonic()
        done: set[int] = set()
        try:
            with self._decode_errors():
                planned = _PlannedPass(self, plans, num_frames=num_frames, gap_pts=gap_pts,
                                       started=started)
                for clip in planned.run():
                    done.add(clip.window.index)
                    yield clip
            last_pts, unopened = planned.last_pts, planned.unopened
        except _Replan:
            # Not seen with the tests' H.264, HEVC and VP9 files. Kept so that a decoder
            # that drops frames (before a stream's first keyframe, say) or invents them
            # still yields the frames that every frame decoded and held would yield.
            self._container.close()
            self._open()
            self.stats = DecodeStats(replanned=True)
            self._sought = []
            rest = [_WindowPlan(p.lo, p.hi, p.window) for p in plans if p.window.index not in done]
            with self._decode_errors():
                holding = self._holding_pass(rest, num_frames=num_frames, gap_pts=gap_pts,
                                             started=started)
                yield from holding
            last_pts, unopened = self._hold_last_pts, self._hold_unopened
        if self.stats.decoded == 0:
            raise InputError(f"{self.path}: no decodable video frame.", kind="no_frames")
        self._check_truncation(last_pts, unopened)

    @contextmanager
    def _decode_errors(self) -> Iterator[None]:
        try:
            yield
        except av.error.FFmpegError as exc:
            if self.stats.decoded == 0:
                raise InputError(
                    f"{self.path}: cannot decode video ({exc.strerror}).", kind="undecodable"
                ) from None
            raise InputError(
                f"{self.path}: decoding failed after {self.stats.decoded} frames ({exc.strerror}); "
                "the file is corrupt or truncated.",
                kind="corrupt",
            ) from None

    def _may_seek(self, pts: int) -> bool:
        # A seek lands on the keyframe before ``pts``, which can be further back than
        # the gap (long GOPs, a window past the end): seek to each target at most
        # once, or the same gap would trigger the same seek forever.
        return not (self._sought and pts <= self._sought[-1])

    def _seek(self, pts: int) -> None:
        if self._may_seek(pts):
            self._sought.append(pts)
            self._container.seek(pts, backward=True, any_frame=False, stream=self._stream)

    def _over_limit(self, what: str, setting: str) -> InputError:
        return InputError(f"{self.path}: {what} is over the limit {setting}.", kind="over_limit")

    def _check_time(self, started: float) -> None:
        limit = self.limits.max_decode_s
        if limit and time.monotonic() - started > limit:
            raise self._over_limit(
                f"decoding for more than {limit:g}s", f"VIDQ_MAX_DECODE_S={limit:g}"
            )

    def _check_count(self, count: int) -> None:
        limit = self.limits.max_frames
        if limit and count > limit:
            raise self._over_limit(
                f"more than {limit} frames (the header declares {self.info.frames})",
                f"VIDQ_MAX_FRAMES={limit}",
            )

    def _count_packet(self, started: float) -> None:
        self.stats.packets += 1
        self._check_count(self.stats.packets)
        self._check_time(started)

    def _count_frame(self, frame: av.VideoFrame, started: float) -> None:
        # Headers can understate the frame size (a resolution change mid-stream).
        self.stats.decoded += 1
        limit = self.limits.max_pixels
        if limit and frame.width * frame.height > limit:
            at = float(((frame.pts or self.start_pts) - self.start_pts) * self.time_base)
            raise self._over_limit(
                f"a frame of {frame.width}x{frame.height} at {at:.2f}s", f"VIDQ_MAX_PIXELS={limit}"
            )
        self._check_count(self.stats.decoded)
        self._check_time(started)

    def _check_window_size(self, plan: _WindowPlan, count: int) -> None:
        limit = self.limits.max_window_frames
        if limit and count > limit:
            span = plan.window.end_sec - plan.window.start_sec
            raise self._over_limit(
                f"a {span:.2f}s clip window at {plan.window.start_sec:.2f}s holding more than "
                f"{limit} frames",
                f"VIDQ_MAX_WINDOW_FRAMES={limit}",
            )

    def _rgb_frames(self, window: Window, picked: list[av.VideoFrame]) -> list[np.ndarray]:
        """RGB of the picked frames (each converted once; padding repeats frames)."""
        rgb: dict[int, np.ndarray] = {}
        for frame in picked:
            if id(frame) not in rgb:
                rgb[id(frame)] = self._rgb.reformat(frame, format="rgb24",
                                                    threads=1).to_ndarray()
        sizes = sorted({(a.shape[1], a.shape[0]) for a in rgb.values()})
        if len(sizes) > 1:
            (w0, h0), (w1, h1) = sizes[0], sizes[-1]
            raise InputError(
                f"{self.path}: the frame size changes inside the clip at {window.start_sec:.2f}s "
                f"({w0}x{h0} and {w1}x{h1}); re-encode the video at one size.",
                kind="unsupported",
            )
        return [rgb[id(frame)] for frame in picked]

    def _holding_pass(
        self, plans: list[_WindowPlan], *, num_frames: int, gap_pts: int, started: float
    ) -> Iterator[ClipFrames]:
        """Decode every packet and keep every frame of an open window (up to the limit)."""
        nxt = 0
        active: list[_WindowPlan] = []
        self._hold_last_pts: int | None = None
        self._hold_unopened: list[Window] = []
        if plans and gap_pts and plans[0].lo - self.start_pts > gap_pts:
            self._seek(plans[0].lo)
        for frame in self._container.decode(self._stream):
            self.stats.packets += 1
            self._count_frame(frame, started)
            pts = frame.pts
            if pts is None:
                continue
            last: int | None = self._hold_last_pts
            self._hold_last_pts = pts if last is None else max(last, pts)
            while nxt < len(plans) and plans[nxt].lo <= pts:
                active.append(plans[nxt])
                nxt += 1
            still: list[_WindowPlan] = []
            for plan in active:
                if pts >= plan.hi:
                    if plan.held:
                        yield self._finish_held(plan, num_frames)
                    continue
                if pts >= plan.lo:
                    plan.held[pts] = frame
                    self._check_window_size(plan, len(plan.held))
                still.append(plan)
            active = still
            if not active:
                if nxt == len(plans):
                    break
                if gap_pts and plans[nxt].lo - pts > gap_pts:
                    self._seek(plans[nxt].lo)
        for plan in active:
            if plan.held:
                yield self._finish_held(plan, num_frames)
        self._hold_unopened = [p.window for p in plans[nxt:]]

    def _finish_held(self, plan: _WindowPlan, num_frames: int) -> ClipFrames:
        ordered = [plan.held[p] for p in sorted(plan.held)]
        picked = [ordered[i] for i in subsample_indices(len(ordered), num_frames)]
        return ClipFrames(window=plan.window, rgb=self._rgb_frames(plan.window, picked),
                          source_frames=len(ordered))

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


class _PlannedPass:
    """One decode pass that demuxes a window ahead of the decoder.

    A window collects the timestamps of its packets until a packet's dts reaches
    its end (pts >= dts, so no later packet can fall inside it); then its
    subsample is chosen. Packets leave the look-ahead buffer in demux order once
    no collecting window contains them: to the decoder if a planned window samples
    them, if they may be references, or if they lead their keyframe (after a seek,
    the decoder may drop those); otherwise they are skipped. When the frames that
    come out are not the ones the packets announced, ``_Replan`` is raised.
    """

    def __init__(
        self,
        reader: VideoReader,
        plans: list[_WindowPlan],
        *,
        num_frames: int,
        gap_pts: int,
        started: float,
    ) -> None:
        self.reader = reader
        self.plans = plans
        self.num_frames = num_frames
        self.gap_pts = gap_pts
        self.started = started
        self.codec = reader._stream.codec_context
        self.refs = (
            ReferenceReader(codec=self.codec.name, extradata=self.codec.extradata)
            if reader.skip_unused_frames
            else None
        )
        self.nxt = 0
        self.collecting: list[_WindowPlan] = []
        self.waiting: list[_WindowPlan] = []
        self.needed: Counter[int] = Counter()
        self.buffer: deque[av.Packet] = deque()
        # Look-ahead is one window of packets; far more means the timestamps do not
        # close windows (no dts): fall back to decoding while holding frames.
        self.buffer_cap = 2 * (reader.limits.max_window_frames or 2000) + 64
        self.ready: list[ClipFrames] = []
        self.frontier: int | None = None
        self.keyframe_pts: int | None = None
        self.max_pts: int | None = None
        self.last_pts: int | None = None

    @property
    def unopened(self) -> list[Window]:
        return [p.window for p in self.plans[self.nxt :]]

    def run(self) -> Iterator[ClipFrames]:
        reader, plans = self.reader, self.plans
        if plans and self.gap_pts and plans[0].lo - reader.start_pts > self.gap_pts:
            reader._seek(plans[0].lo)
        for packet in reader._container.demux(reader._stream):
            if packet.size == 0:  # PyAV's end-of-stream marker; _drain flushes
                continue
            reader._count_packet(self.started)
            self._add(packet)
            self._release()
            if self.ready:
                yield from self._take_ready()
            if self.collecting:
                continue
            if self.nxt == len(plans):
                break
            target = plans[self.nxt].lo
            if (
                self.gap_pts
                and packet.pts is not None
                and target - packet.pts > self.gap_pts
                and reader._may_seek(target)
            ):
                self._drain()
                yield from self._take_ready()
                reader._seek(target)
                self.frontier = self.keyframe_pts = None
        self.frontier = None
        self._plan_ended(final=True)
        self._release()
        self._drain()
        yield from self._take_ready()

    def _take_ready(self) -> Iterable[ClipFrames]:
        ready, self.ready = self.ready, []
        return ready

    def _add(self, packet: av.Packet) -> None:
        self.buffer.append(packet)
        if len(self.buffer) > self.buffer_cap:
            raise _Replan
        pts, dts = packet.pts, packet.dts
        if pts is None:
            return
        if self.keyframe_pts is None and packet.is_keyframe:
            self.keyframe_pts = pts
        self.max_pts = pts if self.max_pts is None else max(self.max_pts, pts)
        while self.nxt < len(self.plans) and self.plans[self.nxt].lo <= pts:
            self.collecting.append(self.plans[self.nxt])
            self.nxt += 1
        for plan in self.collecting:
            if plan.holds(pts):
                plan.pts.append(pts)
                self.reader._check_window_size(plan, len(plan.pts))
        if dts is not None:
            self.frontier = dts if self.frontier is None else max(self.frontier, dts)
            self._plan_ended(final=False)

    def _plan_ended(self, *, final: bool) -> None:
        """Choose the subsample of every window no later packet can fall into."""
        still: list[_WindowPlan] = []
        for plan in self.collecting:
            if not final and (self.frontier is None or self.frontier < plan.hi):
                still.append(plan)
                continue
            present = sorted(set(plan.pts))
            plan.pts = []
            plan.present = frozenset(present)
            if present:
                picks = subsample_indices(len(present), self.num_frames)
                plan.sampled = [present[i] for i in picks]
                self.needed.update(set(plan.sampled))
            self.waiting.append(plan)
        self.collecting = still

    def _release(self) -> None:
        while self.buffer:
            packet = self.buffer[0]
            pts = packet.pts
            if pts is not None and any(plan.holds(pts) for plan in self.collecting):
                return
            self.buffer.popleft()
            if self._wanted(packet):
                for frame in self.codec.decode(packet):
                    self._on_frame(frame)
            else:
                self.reader.stats.skipped += 1
                for plan in self.waiting:
                    if plan.holds(pts):  # type: ignore[arg-type]
                        plan.skipped.add(pts)  # type: ignore[arg-type]

    def _wanted(self, packet: av.Packet) -> bool:
        pts = packet.pts
        if self.refs is None or pts is None or pts in self.needed:  # (no zero counts kept)
            return True
        if self.keyframe_pts is None or pts < self.keyframe_pts:
            return True
        return self.refs.is_reference(memoryview(packet)) is not False

    def _on_frame(self, frame: av.VideoFrame) -> None:
        self.reader._count_frame(frame, self.started)
        pts = frame.pts
        if pts is None:
            return
        self.last_pts = pts if self.last_pts is None else max(self.last_pts, pts)
        if self.max_pts is None or pts > self.max_pts:
            raise _Replan  # a frame no packet announced
        if any(plan.holds(pts) for plan in self.collecting):
            raise _Replan
        still: list[_WindowPlan] = []
        for plan in self.waiting:
            if pts >= plan.hi:
                self._finish(plan)
                continue
            if pts >= plan.lo:
                plan.decoded.add(pts)
                if pts in plan.sampled:
                    plan.held[pts] = frame
            still.append(plan)
        self.waiting = still

    def _drain(self) -> None:
        for frame in self.codec.decode(None):
            self._on_frame(frame)
        for plan in self.waiting:
            self._finish(plan)
        self.waiting = []

    def _finish(self, plan: _WindowPlan) -> None:
        if plan.decoded | plan.skipped != plan.present:
            raise _Replan
        for pts in set(plan.sampled):
            self.needed[pts] -= 1
            if not self.needed[pts]:
                del self.needed[pts]
        if plan.present:
            rgb = self.reader._rgb_frames(plan.window, [plan.held[p] for p in plan.sampled])
            self.ready.append(
                ClipFrames(window=plan.window, rgb=rgb, source_frames=len(plan.present))
            )
        plan.held = {}


def read_clips(
    path: str | Path,
    sampling: Sampling,
    *,
    num_frames: int,
    clip_duration: Fraction,
    limits: Limits = Limits(),
    skip_unused_frames: bool = True,
) -> tuple[VideoInfo, list[ClipFrames]]:
    """Open, plan windows, decode once. Raises InputError with a kind on bad input."""
    with VideoReader(path, limits=limits, skip_unused_frames=skip_unused_frames) as reader:
        windows = plan_windows(sampling, reader.info.duration_s, clip_duration)
        clips = list(reader.clips(windows, num_frames=num_frames))
        if not clips:
            raise InputError(
                f"{path}: no frames inside the requested window(s) "
                f"(video is {reader.info.duration_s:.2f}s long).",
                kind="no_frames",
            )
        return reader.info, clips
