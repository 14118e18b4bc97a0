"""Decoding and clip sampling (worker/video.py) against ground truth read back from
the frames themselves: every test video stamps its frame index into its pixels."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import media
from tests.media import Media
from vidq.errors import InputError
from vidq.sampling import Sampling, Window, plan_windows
from worker.video import Limits, VideoReader, read_clips, subsample_indices

SLOW_R50_SPAN = Fraction(64, 30)


def indices(frames: np.ndarray) -> list[int]:
    return [media.frame_index(f) for f in frames]


def expected_window(truth: media.DecodedStream, start: float, end: float) -> list[int]:
    """Indices of the frames whose pts fall in [start, end), seconds converted to pts
    with PyTorchVideo's own secs_to_pts (round_mode="ceil"), as EncodedVideo.get_clip does."""
    from pytorchvideo.data.utils import secs_to_pts

    lo = secs_to_pts(start, truth.time_base, truth.start_pts, round_mode="ceil")
    hi = secs_to_pts(end, truth.time_base, truth.start_pts, round_mode="ceil")
    return [index for pts, index in sorted(truth.frames) if lo <= pts < hi]


def clip_indices(
    path: Path, windows: list[Window], *, num_frames: int, **kw: float
) -> dict[int, tuple[list[int], int]]:
    with VideoReader(path) as reader:
        return {
            c.window.index: (indices(c.frames), c.source_frames)
            for c in reader.clips(windows, num_frames=num_frames, **kw)
        }


# -- window plans -------------------------------------------------------------------


def ptv_clip_starts(sampler: object, duration: float) -> list[float]:
    starts, last_end = [], 0.0
    while True:
        info = sampler(last_end, duration, {})  # type: ignore[operator]
        starts.append(float(info.clip_start_sec))
        last_end = info.clip_end_sec
        if info.is_last_clip:
            return starts


def test_single_window_is_start_plus_span() -> None:
    (w,) = plan_windows(Sampling(strategy="single", start_sec=1.25), 10.0, SLOW_R50_SPAN)
    assert (w.index, w.start_sec, w.end_sec) == (0, 1.25, 1.25 + 64 / 30)


@pytest.mark.parametrize("clips", [1, 3, 10])
@pytest.mark.parametrize("duration", [5.0, 10.5, 31.7])
def test_uniform_windows_are_pytorchvideo_constant_clips_sampler(
    seed_modules: None, clips: int, duration: float
) -> None:
    from pytorchvideo.data.clip_sampling import ConstantClipsPerVideoSampler

    windows = plan_windows(Sampling(strategy="uniform", clips=clips), duration, SLOW_R50_SPAN)
    expected = ptv_clip_starts(ConstantClipsPerVideoSampler(SLOW_R50_SPAN, clips), duration)
    assert [w.start_sec for w in windows] == pytest.approx(expected, abs=1e-9)
    assert all(w.end_sec == pytest.approx(w.start_sec + 64 / 30) for w in windows)
    assert [w.index for w in windows] == list(range(clips))


def test_uniform_on_a_video_shorter_than_a_clip_is_one_window_at_zero() -> None:
    windows = plan_windows(Sampling(strategy="uniform", clips=10), 1.0, SLOW_R50_SPAN)
    assert [(w.start_sec, w.end_sec) for w in windows] == [(0.0, 64 / 30)]


@pytest.mark.parametrize("stride", [None, 1.0, 0.5])
@pytest.mark.parametrize("duration", [64 / 30 * 4, 9.0, 2.5, 64 / 30])
def test_sliding_windows_are_pytorchvideo_uniform_sampler_with_back_padded_tail(
    seed_modules: None, stride: float | None, duration: float
) -> None:
    from pytorchvideo.data.clip_sampling import UniformClipSampler

    windows = plan_windows(Sampling(strategy="sliding", stride_s=stride), duration, SLOW_R50_SPAN)
    sampler = UniformClipSampler(SLOW_R50_SPAN, stride=stride, backpad_last=True)
    expected = ptv_clip_starts(sampler, duration)
    # The tail window starts 1 us early so the last frame's pts stays inside [start, end).
    assert [w.start_sec for w in windows] == pytest.approx(expected, abs=2e-6)


def test_sliding_starts_are_the_seeds_i_times_clip_duration() -> None:
    # A seed user tags a video with start_sec = i * clip_duration (floats); the same
    # floats must come out here, or a boundary frame can land in a different window.
    clip_duration = (8 * 8) / 30
    windows = plan_windows(Sampling(strategy="sliding"), 256 / 30, SLOW_R50_SPAN)
    assert [w.start_sec for w in windows] == [i * clip_duration for i in range(4)]


def test_sliding_adds_a_tail_window_aligned_to_the_end() -> None:
    windows = plan_windows(Sampling(strategy="sliding"), 5.0, SLOW_R50_SPAN)
    starts = [w.start_sec for w in windows]
    assert starts[:2] == [0.0, 64 / 30]
    assert len(starts) == 3 and starts[2] == pytest.approx(5.0 - 64 / 30, abs=2e-6)
    assert windows[2].end_sec == pytest.approx(5.0, abs=2e-6) and windows[2].end_sec < 5.0


def test_sampling_rejects_bad_parameters() -> None:
    for kwargs in (dict(strategy="random"), dict(crops=2), dict(clips=0), dict(stride_s=0.0)):
        with pytest.raises(InputError) as info:
            Sampling(**kwargs)  # type: ignore[arg-type]
        assert info.value.kind == "config"


# -- which frames a window holds --------------------------------------------------------

TIMING_CASES = [
    # (fixture attribute, window starts, window span in seconds)
    ("h264_24", [0.0, 0.5, 1.0, 64 / 30 * 0.5, 2.2], 0.75),
    ("h264_25_audio", [0.0, 0.04, 1.3], 0.8),
    ("h264_30", [0.0, 64 / 30 / 2, 1.0, 2.0], 64 / 30 / 2),
    ("h264_60_mkv", [0.0, 1 / 60, 0.5, 1.2], 0.6),
    ("ntsc", [0.0, 1001 / 30000 * 7, 1.0], 0.5),
    ("vfr", [0.0, 0.3, 0.9, 1.7, 2.2], 0.7),
    ("vfr_mkv", [0.0, 0.3, 0.9, 1.7, 2.2], 0.7),
    ("mpeg4_avi", [0.0, 1.0], 0.8),
    ("vp9_webm", [0.0, 1.0], 0.8),
]


@pytest.mark.parametrize(("name", "starts", "span"), TIMING_CASES, ids=[c[0] for c in TIMING_CASES])
def test_window_holds_exactly_the_frames_with_pts_in_start_end(
    media_files: Media, name: str, starts: list[float], span: float
) -> None:
    path = getattr(media_files, name)
    truth = media.decoded_frames(path)
    assert [i for _, i in sorted(truth.frames)] == list(range(len(truth.frames)))
    counts = []
    for start in starts:
        expected = expected_window(truth, start, start + span)
        assert expected, f"window at {start} of {name} must not be empty"
        counts.append(len(expected))
        # num_frames == count: the subsample keeps every frame, so we see the full set.
        got = clip_indices(path, [Window(0, start, start + span)], num_frames=len(expected))
        assert got[0] == (expected, len(expected)), f"{name} window at {start:.4f}s"
    if name.startswith("vfr"):
        assert len(set(counts)) > 1, "VFR windows of equal span must hold unequal frame counts"


@pytest.mark.parametrize(("name", "starts", "span"), TIMING_CASES, ids=[c[0] for c in TIMING_CASES])
def test_one_decode_pass_serves_overlapping_windows_with_the_seeds_subsample(
    media_files: Media, seed_modules: None, name: str, starts: list[float], span: float
) -> None:
    from pytorchvideo.transforms.functional import uniform_temporal_subsample

    path = getattr(media_files, name)
    truth = media.decoded_frames(path)
    # Given out of order: the reader sorts them but must label each with its own index.
    windows = [Window(i, s, s + span) for i, s in reversed(list(enumerate(starts)))]
    got = clip_indices(path, windows, num_frames=8)
    assert sorted(got) == list(range(len(starts)))
    for w in windows:
        full = expected_window(truth, w.start_sec, w.end_sec)
        picked = uniform_temporal_subsample(torch.tensor(full), 8, temporal_dim=0).tolist()
        assert got[w.index] == (picked, len(full)), f"{name} window at {w.start_sec:.4f}s"


@pytest.mark.parametrize("name", ["h264_24", "h264_60_mkv", "vfr"])
def test_windows_match_the_seeds_encoded_video_get_clip(
    media_files: Media, seed_modules: None, name: str
) -> None:
    """Independent of secs_to_pts: the frames PyTorchVideo's EncodedVideo returns,
    at the seed's sliding starts i * clip_duration (float boundaries included)."""
    from pytorchvideo.data.encoded_video import EncodedVideo

    path = getattr(media_files, name)
    span = 0.5
    starts = [i * span for i in range(4)] + [0.37]
    video = EncodedVideo.from_path(str(path), decode_audio=False)
    for start in starts:
        w = Window(0, start, start + span)
        seed_frames = video.get_clip(start_sec=w.start_sec, end_sec=w.end_sec)["video"]
        seed = [media.frame_index(f) for f in seed_frames.permute(1, 2, 3, 0).byte().numpy()]
        ours = clip_indices(path, [w], num_frames=len(seed))
        assert ours[0] == (seed, len(seed)), f"{name} window at {w.start_sec}"
    video.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["h264_30", "h264_60_mkv", "vfr_mkv", "long_gop"])
def test_seeking_across_a_long_gap_still_gives_the_exact_frames(
    media_files: Media, seed_modules: None, tmp_path: Path, name: str
) -> None:
    from pytorchvideo.transforms.functional import uniform_temporal_subsample

    if name == "long_gop":  # one keyframe: every seek lands back at frame 0
        path = tmp_path / "long_gop.mp4"
        media.make_video(path, seconds=3, gop=1000)
    else:
        path = getattr(media_files, name)
    truth = media.decoded_frames(path)
    windows = [Window(0, 0.0, 0.3), Window(1, 1.1, 1.6), Window(2, 1.3, 1.8)]
    # seek_gap_s=0.5 forces seeks between the windows (keyframes 1 s apart at most).
    got = clip_indices(path, windows, num_frames=15, seek_gap_s=0.5)
    for w in windows:
        full = expected_window(truth, w.start_sec, w.end_sec)
        padded = uniform_temporal_subsample(torch.tensor(full), 15, temporal_dim=0).tolist()
        assert got[w.index] == (padded, len(full)), f"window at {w.start_sec}"
    # A first window beyond the gap: the reader seeks before decoding anything.
    got = clip_indices(path, [Window(0, 1.2, 1.6)], num_frames=12, seek_gap_s=0.5)
    full = expected_window(truth, 1.2, 1.6)
    assert got[0][1] == len(full)
    assert got[0][0] == uniform_temporal_subsample(torch.tensor(full), 12, temporal_dim=0).tolist()


def test_padding_repeats_frames_when_the_window_holds_fewer_than_needed(media_files: Media) -> None:
    assert subsample_indices(5, 8) == [0, 0, 1, 1, 2, 2, 3, 4]
    assert subsample_indices(64, 8) == [0, 9, 18, 27, 36, 45, 54, 63]
    # tiny.mp4: 5 frames (0.2 s at 25 fps); an 8-frame clip repeats them in order.
    got = clip_indices(media_files.tiny, [Window(0, 0.0, float(SLOW_R50_SPAN))], num_frames=8)
    assert got[0] == ([0, 0, 1, 1, 2, 2, 3, 4], 5)


def test_a_video_shorter_than_one_clip_gives_one_clip_of_all_its_frames(media_files: Media) -> None:
    info, clips = read_clips(
        media_files.short, Sampling(strategy="sliding"), num_frames=8, clip_duration=SLOW_R50_SPAN
    )
    assert info.frames == 30 and info.duration_s == pytest.approx(1.0)
    (clip,) = clips
    assert clip.source_frames == 30
    assert indices(clip.frames) == [0, 4, 8, 12, 16, 20, 24, 29]


@pytest.mark.timeout(60)  # the seek towards it once looped forever
def test_a_window_past_the_end_is_reported_not_padded(media_files: Media) -> None:
    with pytest.raises(InputError) as info:
        read_clips(
            media_files.short,
            Sampling(strategy="single", start_sec=5.0),
            num_frames=8,
            clip_duration=SLOW_R50_SPAN,
        )
    assert info.value.kind == "no_frames" and str(media_files.short) in info.value.message


# -- metadata, limits, bad input -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fps", "size", "frames", "codec", "audio"),
    [
        ("h264_30", 30, (160, 96), 90, "h264", False),
        ("h264_25_audio", 25, (128, 96), 75, "h264", True),
        ("h264_60_mkv", 60, (96, 64), 120, "h264", False),
        ("portrait", 30, (96, 160), 60, "h264", False),
        ("mpeg4_avi", 30, (160, 96), 60, "mpeg4", False),
        ("vp9_webm", 30, (160, 96), 60, "vp9", True),
    ],
)
def test_video_info(
    media_files: Media,
    name: str,
    fps: float,
    size: tuple[int, int],
    frames: int,
    codec: str,
    audio: bool,
) -> None:
    with VideoReader(getattr(media_files, name)) as reader:
        info = reader.info
    assert (info.width, info.height) == size
    assert info.fps == pytest.approx(fps)
    assert info.frames == frames
    assert info.duration_s == pytest.approx(frames / fps, abs=0.05)
    assert (info.codec, info.has_audio) == (codec, audio)


def test_portrait_frames_keep_their_orientation(media_files: Media) -> None:
    _info, clips = read_clips(
        media_files.portrait, Sampling(), num_frames=8, clip_duration=Fraction(1)
    )
    assert clips[0].frames.shape == (8, 160, 96, 3)
    assert clips[0].frames.dtype == np.uint8



@pytest.mark.parametrize(
    ("pix_fmt", "codec", "size"),
    [
        ("yuv420p", "libx264", (162, 98)),  # odd chroma edges after the 4:2:0 halving
        ("yuvj420p", "libx264", (160, 96)),  # full range
        ("yuv422p", "libx264", (160, 96)),
        ("yuv444p", "libx264", (160, 96)),
        ("yuv420p10le", "libx264", (160, 96)),
        ("yuv420p", "libvpx-vp9", (160, 96)),
    ],
)
def test_rgb_frames_are_the_seeds_conversion_byte_for_byte(
    tmp_path: Path, pix_fmt: str, codec: str, size: tuple[int, int]
) -> None:
    """The reader converts frames to RGB with one converter of its own (single-threaded,
    reused across frames); every pixel must equal the seed's ``frame.to_rgb()``."""
    import av

    path = tmp_path / ("v.webm" if codec == "libvpx-vp9" else "v.mp4")
    media.make_video(path, seconds=0.5, width=size[0], height=size[1], codec=codec,
                     pix_fmt=pix_fmt)
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
        assert frames[0].format.name == pix_fmt
        seed = np.stack([f.to_rgb().to_ndarray() for f in frames])
    with VideoReader(path, skip_unused_frames=False) as reader:
        (clip,) = reader.clips([Window(0, 0.0, 1.0)], num_frames=len(frames))
    assert clip.frames.shape == seed.shape
    assert np.array_equal(clip.frames, seed)

@pytest.mark.parametrize(
    ("limits", "named"),
    [
        (Limits(max_duration_s=2.5), "VIDQ_MAX_DURATION_S=2.5"),
        (Limits(max_pixels=160 * 96 - 1), "VIDQ_MAX_PIXELS=15359"),
        (Limits(max_frames=89), "VIDQ_MAX_FRAMES=89"),
    ],
)
def test_limits_refuse_with_the_limit_named(media_files: Media, limits: Limits, named: str) -> None:
    with pytest.raises(InputError) as info:
        VideoReader(media_files.h264_30, limits=limits)
    assert info.value.kind == "over_limit"
    assert named in info.value.message and str(media_files.h264_30) in info.value.message


def test_limits_at_the_exact_value_pass(media_files: Media) -> None:
    limits = Limits(max_duration_s=3.0, max_pixels=160 * 96, max_frames=90)
    with VideoReader(media_files.h264_30, limits=limits) as reader:
        assert reader.info.frames == 90


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("random_bytes", "not_a_video"),
        ("truncated_mp4", "not_a_video"),
        ("audio_m4a", "no_video_stream"),
        ("audio_wav", "no_video_stream"),
        ("corrupt", "corrupt"),
        ("truncated_faststart", "truncated"),
        ("truncated_mkv", "truncated"),
    ],
)
def test_bad_input_raises_input_error_naming_the_file(
    media_files: Media, name: str, kind: str
) -> None:
    path = getattr(media_files, name)
    with pytest.raises(InputError) as info:
        read_clips(path, Sampling(strategy="sliding"), num_frames=8, clip_duration=Fraction(1))
    assert info.value.kind == kind
    message = info.value.message
    assert message.startswith(f"{path}: ") and "\n" not in message
