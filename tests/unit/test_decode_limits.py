"""Limits enforced on what is decoded, not only on what the headers declare.

The files here lie in their headers: one declares 30 fps and carries 1,000, one
changes frame size mid-stream. Each is refused with the VIDQ_* setting named,
or decoded with memory bounded by the settings (only sampled frames are kept; the
peak memory of a dense window: tests/test_decode_memory.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import media
from vidq.errors import InputError
from vidq.sampling import Window
from vidq.settings import Settings
from worker.decoders import InputPolicy
from worker.video import Limits, VideoReader

SLOW_R50_SPAN = 64 / 30


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160x96 Matroska that declares 30 fps and carries 1,000 for 2.5 s."""
    path = tmp_path_factory.mktemp("limits") / "dense.mkv"
    media.make_dense(path, seconds=2.5, per_second=1000)
    return path


@pytest.fixture(scope="module")
def size_change(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MPEG-TS: 160x96 for 1 s, then 320x192 for 1 s; the header says 160x96."""
    path = tmp_path_factory.mktemp("limits") / "size_change.ts"
    media.make_size_change(path)
    return path


def refusal(path: Path, limits: Limits, windows: list[Window], **kw: object) -> InputError:
    reader = VideoReader(path, limits=limits, **kw)  # type: ignore[arg-type]
    with reader, pytest.raises(InputError) as info:
        list(reader.clips(windows, num_frames=8))
    error = info.value
    assert error.kind == "over_limit"
    assert error.message.startswith(f"{path}: ") and "\n" not in error.message
    return error


def test_the_dense_file_header_understates_its_frames(dense: Path) -> None:
    with VideoReader(dense) as reader:
        assert reader.info.fps == 30 and reader.info.frames < 100


@pytest.mark.parametrize("skip", [True, False])
def test_a_window_holding_too_many_frames_is_refused_with_the_setting_named(
    dense: Path, skip: bool
) -> None:
    limits = Limits(max_window_frames=Settings().max_window_frames)
    error = refusal(dense, limits, [Window(0, 0.0, SLOW_R50_SPAN)], skip_unused_frames=skip)
    assert "VIDQ_MAX_WINDOW_FRAMES=2000" in error.message


def test_a_window_at_the_limit_decodes(dense: Path) -> None:
    with VideoReader(dense, limits=Limits(max_window_frames=500)) as reader:
        (clip,) = reader.clips([Window(0, 1.0, 1.5)], num_frames=8)
    assert clip.source_frames == 500
    assert [media.frame_index(f) for f in clip.frames] == [
        1000, 1071, 1142, 1213, 1285, 1356, 1427, 1499]


def test_frames_decoded_past_the_total_limit_are_refused(dense: Path) -> None:
    # The header declares ~75 frames: the open-time check passes, the decode stops.
    error = refusal(dense, Limits(max_frames=1500), [Window(0, 0.0, 0.5), Window(1, 2.0, 2.5)])
    assert "VIDQ_MAX_FRAMES=1500" in error.message and "header declares" in error.message


def test_decode_time_is_limited(dense: Path) -> None:
    error = refusal(dense, Limits(max_decode_s=1e-6), [Window(0, 0.0, 2.5)])
    assert "VIDQ_MAX_DECODE_S=1e-06" in error.message


def test_a_frame_larger_than_the_header_said_is_refused(size_change: Path) -> None:
    limits = Limits(max_pixels=160 * 96)
    with VideoReader(size_change, limits=limits) as reader:  # the header passes
        assert (reader.info.width, reader.info.height) == (160, 96)
    error = refusal(size_change, limits, [Window(0, 0.0, 0.5), Window(1, 1.2, 1.8)])
    assert "a frame of 320x192 at 1.00s" in error.message
    assert "VIDQ_MAX_PIXELS=15360" in error.message


def test_windows_on_either_side_of_a_size_change_keep_their_size(size_change: Path) -> None:
    with VideoReader(size_change) as reader:
        clips = list(reader.clips([Window(0, 0.0, 0.5), Window(1, 1.2, 1.8)], num_frames=4))
    assert [c.frames.shape for c in clips] == [(4, 96, 160, 3), (4, 192, 320, 3)]
    with VideoReader(size_change) as reader, pytest.raises(InputError) as info:
        list(reader.clips([Window(0, 0.8, 1.3)], num_frames=8))
    assert info.value.kind == "unsupported" and "160x96 and 320x192" in info.value.message


def test_settings_reach_the_reader_limits() -> None:
    env = {"VIDQ_MAX_WINDOW_FRAMES": "300", "VIDQ_MAX_DECODE_S": "12.5", "VIDQ_MAX_PIXELS": "9"}
    settings = Settings.from_env(env, model="x3d_xs", weights="random", device="cpu")
    assert (Settings().max_window_frames, Settings().max_decode_s) == (2000, 1800.0)
    limits = InputPolicy.from_settings(settings).limits
    assert (limits.max_window_frames, limits.max_decode_s, limits.max_pixels) == (300, 12.5, 9)
