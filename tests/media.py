"""Test media written with PyAV: real containers and codecs, tiny and fast to make.

Every video frame carries its own index, stamped as a row of black/white 8x8
blocks (bit 0 first) in the top-left corner, so a test can read back which
source frames a window picked (``frame_index``), through lossy codecs and after
RGB conversion. The rest of the frame is moving, textured content (gradients, a
disc, noise) like the benchmarks' corpus (benchmarks/corpus.py), so resizing and
cropping see real image structure.

The functions here import no pytest and no vidq code: tests/e2e can use them too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BLOCK = 8
"""Side of one index bit's block (pixels); 8 keeps blocks on codec block boundaries."""
INDEX_BITS = 12
"""Frames per video are limited to 2**12 = 4096."""

CODEC_SUFFIX = {
    "libx264": ".mp4", "libx265": ".mp4", "mpeg4": ".avi", "libvpx": ".webm", "libvpx-vp9": ".webm",
}


def _bit_origin(bit: int, width: int) -> tuple[int, int]:
    per_row = max(width // BLOCK, 1)
    return (bit // per_row) * BLOCK, (bit % per_row) * BLOCK


def draw_frame(index: int, *, width: int, height: int, seed: int = 0) -> np.ndarray:
    """The RGB (height, width, 3) uint8 image of frame ``index``."""
    rng = np.random.default_rng(seed * 100_003 + index)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (xx * 255 // max(width - 1, 1) + index * 3) % 256
    img[..., 1] = (yy * 255 // max(height - 1, 1) + index * 5) % 256
    img[..., 2] = ((xx + yy + index * 2) % 128 + 64).astype(np.uint8)
    cx = (index * 5) % width
    cy = int(height / 2 + height / 4 * np.sin(index / 7))
    radius = max(min(width, height) // 6, 4)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < radius**2] = (250, 70, 30)
    noise = rng.integers(-10, 11, img.shape)
    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return stamp(img, index)


def stamp(img: np.ndarray, index: int) -> np.ndarray:
    """Write ``index`` into the top-left blocks of ``img`` (in place) and return it."""
    width = img.shape[1]
    for bit in range(INDEX_BITS):
        y, x = _bit_origin(bit, width)
        img[y : y + BLOCK, x : x + BLOCK] = 255 if (index >> bit) & 1 else 0
    return img


def frame_index(rgb: np.ndarray) -> int:
    """Read back the index ``draw_frame`` stamped on a decoded (H, W, 3) frame."""
    width = rgb.shape[1]
    value = 0
    for bit in range(INDEX_BITS):
        y, x = _bit_origin(bit, width)
        centre = rgb[y + 2 : y + BLOCK - 2, x + 2 : x + BLOCK - 2].astype(np.float32)
        if centre.mean() > 127.5:
            value |= 1 << bit
    return value


def frame_times(*, seconds: float, fps: float, vfr: bool = False) -> list[Fraction]:
    """Presentation times (seconds) of the frames ``make_video`` writes.

    Constant rate: i / fps. Variable rate: gaps cycle through 0.5, 1.5, 1 and 2
    frame periods (mean 1.25), in milliseconds, so windows hold unequal frame counts.
    """
    if not vfr:
        count = int(round(seconds * fps))
        return [Fraction(i) / Fraction(fps).limit_denominator(1001) for i in range(count)]
    period_ms = 1000 / fps
    gaps = [round(period_ms * g) for g in (0.5, 1.5, 1.0, 2.0)]
    times, t, i = [], 0, 0
    while t < seconds * 1000 - 1e-9:
        times.append(Fraction(t, 1000))
        t += gaps[i % len(gaps)]
        i += 1
    return times


def make_video(
    path: str | Path,
    *,
    seconds: float = 2.0,
    fps: float = 30,
    width: int = 160,
    height: int = 96,
    codec: str = "libx264",
    audio: bool = False,
    vfr: bool = False,
    faststart: bool = False,
    gop: int = 0,
    seed: int = 0,
    options: dict[str, str] | None = None,
    pix_fmt: str = "yuv420p",
) -> list[Fraction]:
    """Write a video whose frame i shows ``draw_frame(i)``; return its frame times (s).

    ``codec``: libx264 (mp4/mkv/mov), mpeg4 (avi/mkv/mp4), libvpx or libvpx-vp9
    (webm/mkv). ``audio`` adds a 1 kHz AAC (or Opus in WebM) track as long as the
    video. ``vfr`` writes irregular timestamps with a 1/1000 time base.
    ``faststart`` puts an MP4's index (moov) before the media data, as streaming
    files have it; by default it is written at the end. ``gop``: frames between
    keyframes (default: one second's worth). ``options`` are encoder options laid
    over the defaults (e.g. ``{"preset": "medium"}`` for libx264's default B-frames,
    ``x264-params``/``x265-params`` for GOP structure); libx265 writes HEVC.
    """
    path = str(path)
    times = frame_times(seconds=seconds, fps=fps, vfr=vfr)
    rate = Fraction(fps).limit_denominator(1001)
    container_options = {"movflags": "+faststart"} if faststart else {}
    with av.open(path, "w", options=container_options) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
            stream.time_base = Fraction(1, 1000)
        encoder_options = {"g": str(gop or max(int(fps), 1))}
        if gop:
            encoder_options["keyint_min"] = str(gop)
        if codec == "libx264":
            encoder_options.update(preset="ultrafast", crf="16")
        elif codec == "libx265":
            encoder_options.update(preset="ultrafast", crf="16",
                                   **{"x265-params": "log-level=error"})
        elif codec == "mpeg4":
            encoder_options.update(qscale="3")
        elif codec.startswith("libvpx"):
            encoder_options.update(crf="10", deadline="realtime", **{"cpu-used": "8", "b": "0"})
        encoder_options.update(options or {})
        stream.options = encoder_options
        audio_stream = None
        if audio:
            audio_codec = "libopus" if path.endswith(".webm") else "aac"
            audio_stream = out.add_stream(audio_codec, rate=48000)
            audio_stream.layout = "mono"
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(
                draw_frame(i, width=width, height=height, seed=seed), format="rgb24"
            )
            if vfr:
                frame.pts = int(t * 1000)
                frame.time_base = Fraction(1, 1000)
            else:
                frame.pts = i
                frame.time_base = 1 / rate
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
        if audio_stream is not None:
            _write_tone(out, audio_stream, seconds=float(times[-1]) + 1 / float(rate))
    return times


def make_dense(
    path: str | Path,
    *,
    declared_fps: int = 30,
    per_second: int = 1000,
    seconds: float = 1.0,
    width: int = 160,
    height: int = 96,
) -> int:
    """A file that declares ``declared_fps`` but carries ``per_second`` frames a second.

    The encoder (and so the H.264 headers) are told ``declared_fps``; the frames'
    timestamps are 1/``per_second`` apart. In Matroska, FFmpeg then reports the
    declared rate and ``duration x rate`` frames. The picture is still but for the
    stamped index, so the file stays tiny whatever its frame count (the shape of a
    decompression bomb). Returns the number of frames written.
    """
    base = draw_frame(0, width=width, height=height)
    count = round(seconds * per_second)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=declared_fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = Fraction(1, per_second)
        stream.time_base = Fraction(1, per_second)
        stream.options = {"preset": "ultrafast", "crf": "16"}
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(stamp(base.copy(), i), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, per_second)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return count


def make_size_change(
    path: str | Path,
    *,
    sizes: tuple[tuple[int, int], ...] = ((160, 96), (320, 192)),
    seconds_each: float = 1.0,
    fps: int = 30,
) -> None:
    """H.264 in MPEG-TS whose frame size changes mid-stream (width, height per segment).

    Each segment comes from its own encoder and carries its own SPS in band; the
    container's header (the first SPS) states only the first size. Frame indices
    run on across segments.
    """
    rate = Fraction(fps)
    per_segment = round(seconds_each * fps)
    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = sizes[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "16", "g": str(fps)}
        for n, (width, height) in enumerate(sizes):
            if n == 0:
                encoder = stream.codec_context
            else:
                encoder = av.CodecContext.create("libx264", "w")
                encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuv420p"
                encoder.time_base = 1 / rate
                encoder.framerate = rate
                encoder.options = {"preset": "ultrafast", "crf": "16", "g": str(fps)}
            for i in range(n * per_segment, (n + 1) * per_segment):
                frame = av.VideoFrame.from_ndarray(
                    draw_frame(i, width=width, height=height), format="rgb24"
                )
                frame.pts, frame.time_base = i, 1 / rate
                for packet in encoder.encode(frame):
                    packet.stream = stream
                    out.mux(packet)
            for packet in encoder.encode(None):
                packet.stream = stream
                out.mux(packet)


def cut_at_keyframe(source: str | Path, path: str | Path, *, keyframe: int = 2) -> None:
    """``source``'s video packets from its ``keyframe``-th keyframe on (stream copy): a
    stream cut mid-file, which with open GOPs starts at a non-IDR keyframe whose
    leading pictures reference frames the cut removed."""
    with av.open(str(source)) as inp, av.open(str(path), "w") as out:
        video = inp.streams.video[0]
        stream = out.add_stream_from_template(video)
        seen = 0
        for packet in inp.demux(video):
            if packet.size == 0:
                continue
            seen += packet.is_keyframe
            if seen >= keyframe:
                packet.stream = stream
                out.mux(packet)


def _write_tone(
    out: av.container.OutputContainer, stream: av.AudioStream, *, seconds: float
) -> None:
    rate = 48000
    chunk = 960  # 20 ms: a frame size both AAC's encoder (buffers) and Opus accept
    total = int(seconds * rate)
    for start in range(0, total, chunk):
        n = min(chunk, total - start)
        t = (np.arange(start, start + n) / rate).astype(np.float32)
        samples = (0.2 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def make_audio_only(path: str | Path, *, seconds: float = 1.0) -> None:
    """An audio-only file (AAC in .m4a, PCM in .wav, by suffix): no video stream."""
    path = str(path)
    with av.open(path, "w") as out:
        if path.endswith(".wav"):
            stream = out.add_stream("pcm_s16le", rate=48000)
        else:
            stream = out.add_stream("aac", rate=48000)
        stream.layout = "mono"
        if path.endswith(".wav"):
            total = int(seconds * 48000)
            for start in range(0, total, 960):
                n = min(960, total - start)
                t = np.arange(start, start + n) / 48000
                samples = (3000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)[None, :]
                frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
                frame.sample_rate = 48000
                frame.pts = start
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        else:
            _write_tone(out, stream, seconds=seconds)


def make_random_bytes(path: str | Path, *, size: int = 64 * 1024, seed: int = 0) -> None:
    """Random bytes under a video name: FFmpeg finds no container in it."""
    Path(path).write_bytes(np.random.default_rng(seed).integers(0, 256, size, np.uint8).tobytes())


def make_empty(path: str | Path) -> None:
    Path(path).write_bytes(b"")


def make_corrupt(source: str | Path, path: str | Path, *, seed: int = 0) -> None:
    """``source`` with the middle half of its bytes replaced by random bytes.

    The first and last quarters stay, so the container's headers and index
    (front or back of an MP4) are intact: the file opens, declares a video
    stream, and its decoder meets garbage half-way through. With H.264 that is
    a decode error; error-concealing decoders (MPEG-4, VP9) may not notice.
    """
    data = bytearray(Path(source).read_bytes())
    lo, hi = len(data) // 4, 3 * len(data) // 4
    data[lo:hi] = np.random.default_rng(seed).integers(0, 256, hi - lo, np.uint8).tobytes()
    Path(path).write_bytes(bytes(data))


def make_truncated(source: str | Path, path: str | Path, *, fraction: float = 0.5) -> None:
    """The first ``fraction`` of ``source``'s bytes: a download cut off half-way."""
    data = Path(source).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])


def make_corpus(
    directory: str | Path, n: int, *, seconds: float = 2.0, width: int = 160, height: int = 96
) -> list[Path]:
    """``n`` distinct small H.264 videos ``clip_000.mp4``... (content differs by seed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = directory / f"clip_{i:03d}.mp4"
        make_video(p, seconds=seconds, width=width, height=height, seed=i)
        paths.append(p)
    return paths


@dataclass(frozen=True)
class DecodedStream:
    """Ground truth for timing tests, read with plain PyAV (no vidq code)."""

    time_base: Fraction
    start_pts: int
    frames: list[tuple[int, int]]
    """(pts, stamped index) of every decoded frame, in decode order."""


def decoded_frames(path: str | Path) -> DecodedStream:
    """Every frame of the first video stream with its pts and stamped index."""
    frames = []
    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            frames.append((frame.pts, frame_index(frame.to_ndarray(format="rgb24"))))
        return DecodedStream(stream.time_base, stream.start_time or 0, frames)


@dataclass(frozen=True)
class Media:
    """The files of the ``media_files`` fixture (tests/conftest.py); each name says what
    the file is."""

    h264_30: Path
    """160x96, 30 fps, 3 s, H.264 in MP4, silent."""
    h264_24: Path
    """160x96, 24 fps, 3 s."""
    h264_25_audio: Path
    """128x96, 25 fps, 3 s, with an AAC track."""
    h264_60_mkv: Path
    """96x64, 60 fps, 2 s, H.264 in Matroska (1/1000 time base, no frame count)."""
    ntsc: Path
    """160x96 at 30000/1001 fps, 2 s."""
    vfr: Path
    """160x96, irregular timestamps (mean 24 fps), 3 s, MP4."""
    vfr_mkv: Path
    """The same irregular timestamps in Matroska."""
    portrait: Path
    """96x160 (portrait), 30 fps, 2 s."""
    mpeg4_avi: Path
    """MPEG-4 part 2 in AVI, 160x96, 2 s."""
    vp9_webm: Path
    """VP9 in WebM with an Opus track, 160x96, 2 s."""
    short: Path
    """1 s at 30 fps: shorter than one slow_r50 (2.13 s) or x3d_xs (1.6 s) clip."""
    tiny: Path
    """5 frames at 25 fps (0.2 s): fewer frames than x3d_s/slow_r50 subsample."""
    audio_m4a: Path
    audio_wav: Path
    corrupt: Path
    """H.264 MP4, index intact, middle half of the bytes random."""
    truncated_mp4: Path
    """The first half of an MP4 whose index is at the end: FFmpeg cannot open it."""
    truncated_faststart: Path
    """The first half of an MP4 with its index in front: frames stop half-way."""
    truncated_mkv: Path
    """The first half of a Matroska file: frames stop half-way."""
    random_bytes: Path
    empty: Path
