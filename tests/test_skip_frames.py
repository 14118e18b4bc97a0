"""Skipping unreferenced, unsampled packets (worker/video.py, worker/bitstream.py).

Skipping must never change a result: for every GOP structure, framing and clip
plan, the frames vidq samples with skipping are byte-identical to those without,
they are the frames the seed's subsample picks (read back from the stamped
indices), and the model's fp32 logits are identical. And skipping must happen
where B-frames exist, or these tests would pass with the feature switched off.
(Reading reference status from NAL headers: tests/unit/test_bitstream.py.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import pytest
import torch

from tests import media
from vidq.sampling import Sampling, Window, plan_windows
from vidq.settings import Settings
from worker.bitstream import ReferenceReader
from worker.decoders import InputPolicy
from worker.inference import Classifier
from worker.models import get_preset
from worker.pipeline import Pipeline, classify
from worker.transforms import clip_views
from worker.video import ClipFrames, DecodeStats, VideoReader

HAS_X265 = "libx265" in av.codecs_available


@dataclass(frozen=True)
class Case:
    name: str
    spec: dict[str, object] = field(default_factory=dict)
    skips: bool = True
    """Whether the stream has frames nothing references (B-frames)."""
    hevc: bool = False


VERYFAST = {"preset": "veryfast"}
CASES = [
    # libx264's defaults (preset medium): 3 B-frames, b-pyramid normal (B-refs).
    Case("h264_default.mp4", {"options": {"preset": "medium"}}),
    Case(
        "h264_pyramid_strict.mp4",
        {"options": {**VERYFAST, "x264-params": "bframes=3:b-pyramid=strict"}},
    ),
    Case(
        "h264_no_pyramid.mkv",
        {"options": {**VERYFAST, "x264-params": "bframes=2:b-pyramid=none"}},
    ),
    Case(
        "h264_open_gop.mp4",
        {"options": {**VERYFAST, "x264-params": "bframes=3:open-gop=1:keyint=20:min-keyint=20"}},
    ),
    Case("h264_annexb.ts", {"options": VERYFAST}),
    Case("h264_vfr.mp4", {"options": VERYFAST, "vfr": True}),
    Case("h264_vfr.mkv", {"options": VERYFAST, "vfr": True}),
    Case("h264_no_bframes.mp4", {}, skips=False),  # ultrafast: P-frames only
    Case("hevc.mp4", {"codec": "libx265"}, hevc=True),
    Case(
        "hevc_open_gop.mkv",
        {"codec": "libx265", "options": {"x265-params": "log-level=error:open-gop=1:keyint=20"}},
        hevc=True,
    ),
    Case("hevc_annexb.ts", {"codec": "libx265"}, hevc=True),
    Case("vp9.webm", {"codec": "libvpx-vp9"}, skips=False),
]

PLANS = {
    "single": Sampling(strategy="single", start_sec=0.9),
    "uniform": Sampling(strategy="uniform", clips=4),
    "sliding": Sampling(strategy="sliding", stride_s=0.7),  # overlapping windows
}
SPAN = Fraction(64, 30)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("skip_media")
    out = {}
    for case in CASES:
        if case.hevc and not HAS_X265:
            continue
        out[case.name] = root / case.name
        media.make_video(out[case.name], seconds=4, **case.spec)  # type: ignore[arg-type]
    return out


def video(videos: dict[str, Path], name: str) -> Path:
    if name not in videos:
        pytest.skip("this PyAV build has no libx265 encoder")
    return videos[name]


def decode(
    path: Path, sampling: Sampling, *, skip: bool, num_frames: int = 8, threads: int = 0
) -> tuple[dict[int, ClipFrames], DecodeStats, list[Window]]:
    with VideoReader(path, skip_unused_frames=skip, threads=threads) as reader:
        windows = plan_windows(sampling, reader.info.duration_s, SPAN)
        clips = {c.window.index: c for c in reader.clips(windows, num_frames=num_frames)}
        return clips, reader.stats, windows


def assert_identical(a: dict[int, ClipFrames], b: dict[int, ClipFrames]) -> None:
    assert sorted(a) == sorted(b)
    for index, clip in a.items():
        assert clip.source_frames == b[index].source_frames, f"window {index}"
        assert clip.frames.shape == b[index].frames.shape, f"window {index}"
        assert clip.frames.tobytes() == b[index].frames.tobytes(), f"window {index}"


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_skipping_samples_byte_identical_frames_the_seeds_subsample_picks(
    videos: dict[str, Path], seed_modules: None, case: Case, plan: str
) -> None:
    from pytorchvideo.transforms.functional import uniform_temporal_subsample

    path = video(videos, case.name)
    skipped, with_stats, windows = decode(path, PLANS[plan], skip=True)
    full, full_stats, _ = decode(path, PLANS[plan], skip=False)
    assert_identical(skipped, full)
    truth = media.decoded_frames(path)
    assert len(skipped) == len(windows)
    for w in windows:
        lo = media_pts(truth, w.start_sec)
        hi = media_pts(truth, w.end_sec)
        inside = [i for pts, i in sorted(truth.frames) if lo <= pts < hi]
        picked = uniform_temporal_subsample(torch.tensor(inside), 8, temporal_dim=0).tolist()
        got = [media.frame_index(f) for f in skipped[w.index].frames]
        assert got == picked and skipped[w.index].source_frames == len(inside), f"window {w.index}"
    assert not with_stats.replanned and not full_stats.replanned
    assert full_stats.skipped == 0 and full_stats.decoded == full_stats.packets
    assert with_stats.packets == full_stats.packets
    assert with_stats.decoded + with_stats.skipped == with_stats.packets
    if case.skips:
        assert with_stats.skipped > 0, "B-frames present but nothing was skipped"
    else:
        assert with_stats.skipped == 0


def media_pts(truth: media.DecodedStream, seconds: float) -> int:
    from pytorchvideo.data.utils import secs_to_pts

    return int(secs_to_pts(seconds, truth.time_base, truth.start_pts, round_mode="ceil"))


def test_default_h264_skips_about_a_third_of_packets_for_x3d_xs(videos: dict[str, Path]) -> None:
    """x3d_xs samples 4 frames from 48: most unreferenced B-frames go unused."""
    x3d = get_preset("x3d_xs")
    with VideoReader(videos["h264_default.mp4"]) as reader:
        windows = plan_windows(Sampling(strategy="sliding"), reader.info.duration_s,
                               x3d.clip_duration)
        list(reader.clips(windows, num_frames=x3d.num_frames))
        stats = reader.stats
    assert stats.packets == 120 and stats.skipped >= 30, stats


@pytest.mark.parametrize("threads", [1, 2])
def test_frame_threading_does_not_change_what_skipping_decodes(
    videos: dict[str, Path], threads: int
) -> None:
    sampling = PLANS["sliding"]
    threaded, stats, _ = decode(videos["h264_default.mp4"], sampling, skip=True, threads=threads)
    reference, _, _ = decode(videos["h264_default.mp4"], sampling, skip=False, threads=1)
    assert_identical(threaded, reference)
    assert stats.skipped > 0


def test_seeking_between_sparse_windows_keeps_frames_identical(
    videos: dict[str, Path]
) -> None:
    """seek_gap_s small enough that the reader seeks (into open GOPs) between windows."""
    for name in ("h264_open_gop.mp4", "hevc_open_gop.mkv"):
        if name not in videos:
            continue
        results = []
        for skip in (True, False):
            with VideoReader(videos[name], skip_unused_frames=skip) as reader:
                windows = plan_windows(Sampling(strategy="uniform", clips=3), 4.0, Fraction(1, 2))
                clips = {c.window.index: c
                         for c in reader.clips(windows, num_frames=6, seek_gap_s=0.3)}
                results.append((clips, reader.stats))
        assert_identical(results[0][0], results[1][0])
        assert not results[0][1].replanned and results[0][1].packets < 120  # it did seek


@pytest.mark.parametrize("name", ["h264_open_gop.mp4", "hevc_open_gop.mkv"])
def test_a_stream_cut_at_an_open_gop_keyframe_keeps_frames_identical(
    videos: dict[str, Path], tmp_path: Path, name: str
) -> None:
    """It starts at a keyframe whose leading pictures lost their references."""
    source = video(videos, name)
    path = tmp_path / f"cut{source.suffix}"
    media.cut_at_keyframe(source, path, keyframe=2)
    sampling = Sampling(strategy="sliding", stride_s=0.5)
    skipped, stats, _ = decode(path, sampling, skip=True)
    full, _, _ = decode(path, sampling, skip=False)
    assert_identical(skipped, full)
    assert stats.skipped > 0 and not stats.replanned
    truth = [index for _pts, index in sorted(media.decoded_frames(path).frames)]
    first = [media.frame_index(f) for f in skipped[0].frames]
    assert first[0] == truth[0] == 20  # the cut starts at frame 20 (keyint=20)


def test_frames_the_decoder_does_not_return_as_announced_fall_back_to_decoding_all(
    videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong reference reading (here: every packet read as unreferenced) starves the
    decoder of references; it then drops frames the plan counted. The reader sees the
    mismatch and decodes again holding every frame: the clips are still the right ones."""
    path = videos["h264_default.mp4"]
    full, _, _ = decode(path, PLANS["sliding"], skip=False)
    monkeypatch.setattr(ReferenceReader, "is_reference", lambda self, data: False)
    fallback, stats, _ = decode(path, PLANS["sliding"], skip=True)
    assert stats.replanned and stats.skipped == 0
    assert_identical(fallback, full)


# -- the model sees the same input: identical fp32 logits ---------------------------------


@pytest.fixture(scope="module")
def x3d_xs() -> Classifier:
    torch.manual_seed(0)
    return Classifier(model="x3d_xs", weights="random", device="cpu", precision="fp32")


def logits(clf: Classifier, clips: dict[int, ClipFrames], crops: int) -> torch.Tensor:
    views = torch.cat(
        [clip_views(clips[i].frames, clf.preset, crops=crops) for i in sorted(clips)]
    )
    with torch.inference_mode():
        return clf.module(views.contiguous(memory_format=torch.channels_last_3d))


LOGIT_CASES = [
    "h264_default.mp4", "h264_open_gop.mp4", "h264_annexb.ts", "h264_vfr.mkv", "hevc.mp4",
]
LOGIT_PLANS = {
    "single": PLANS["single"],
    "uniform": PLANS["uniform"],
    "sliding-3-crops": dataclasses.replace(PLANS["sliding"], crops=3),
}


@pytest.mark.parametrize("plan", list(LOGIT_PLANS))
@pytest.mark.parametrize("name", LOGIT_CASES)
def test_x3d_xs_fp32_logits_identical_with_and_without_skipping(
    videos: dict[str, Path], x3d_xs: Classifier, name: str, plan: str
) -> None:
    path = video(videos, name)
    sampling = LOGIT_PLANS[plan]
    outputs = []
    for skip in (True, False):
        with VideoReader(path, skip_unused_frames=skip) as reader:
            windows = plan_windows(sampling, reader.info.duration_s, x3d_xs.preset.clip_duration)
            clips = {
                c.window.index: c
                for c in reader.clips(windows, num_frames=x3d_xs.preset.num_frames)
            }
        outputs.append(logits(x3d_xs, clips, sampling.crops))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("name", ["h264_default.mp4", "hevc_annexb.ts"])
def test_classify_results_identical_with_and_without_skipping(
    videos: dict[str, Path], x3d_xs: Classifier, name: str
) -> None:
    path = video(videos, name)
    sampling = dataclasses.replace(PLANS["sliding"], crops=3)
    results = []
    for skip in (True, False):
        results.append(classify(x3d_xs, path, sampling,
                                inputs=InputPolicy(skip_unused_frames=skip)))
    assert results[0].decode_stats.skipped > 0 and results[1].decode_stats.skipped == 0
    for r in results:
        r.timing, r.decode_stats = {}, DecodeStats()
    assert results[0].to_json() == results[1].to_json()


@pytest.mark.slow
def test_slow_r50_fp32_logits_identical_with_and_without_skipping(videos: dict[str, Path]) -> None:
    torch.manual_seed(0)
    clf = Classifier(model="slow_r50", weights="random", device="cpu", precision="fp32")
    sampling = Sampling(strategy="uniform", clips=2)
    outputs = []
    for skip in (True, False):
        clips, _, _ = decode(videos["h264_default.mp4"], sampling, skip=skip)
        outputs.append(logits(clf, clips, 1))
    assert torch.equal(outputs[0], outputs[1])


def test_decode_stats_are_in_the_result_and_the_setting_turns_skipping_off(
    videos: dict[str, Path]
) -> None:
    path = videos["h264_default.mp4"]
    on = Settings.from_env({}, model="x3d_xs", weights="random", device="cpu")
    assert InputPolicy.from_settings(on).skip_unused_frames
    with Pipeline.from_settings(Classifier.from_settings(on), on) as pipeline:
        stats = pipeline.classify(path).to_json()["decode_stats"]
    assert stats["skipped"] > 0 and stats["decoded"] + stats["skipped"] == stats["packets"]
    env = {"VIDQ_SKIP_UNUSED_FRAMES": "false"}
    off = Settings.from_env(env, model="x3d_xs", weights="random", device="cpu")
    with Pipeline.from_settings(Classifier.from_settings(off), off) as pipeline:
        stats = pipeline.classify(path).to_json()["decode_stats"]
    assert stats["skipped"] == 0 and stats["decoded"] == stats["packets"] > 0
