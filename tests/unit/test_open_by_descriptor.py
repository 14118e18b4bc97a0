"""A video is opened once, by descriptor, after the path checks: a path swapped between
the check and the open cannot escape the media roots or block the worker on a FIFO."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import vidq.media as media_mod
from tests.media import make_video
from vidq.errors import InputError
from vidq.media import HashingReader, VideoSource, open_video
from vidq.sampling import Sampling, plan_windows
from worker.video import VideoReader


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "media", tmp_path / "secret"
    (root / "sub").mkdir(parents=True)
    (outside / "sub").mkdir(parents=True)
    make_video(root / "sub" / "v.mp4", seconds=1)
    make_video(outside / "sub" / "v.mp4", seconds=1, seed=9)
    return root, outside


def swap_after_check(monkeypatch: pytest.MonkeyPatch, swap: Callable[[], None]) -> None:
    """The attacker's move lands between the checks and the open."""
    checked = media_mod.check_video_path

    def check_then_swap(raw: str, **kw: object) -> Path:
        resolved = checked(raw, **kw)  # type: ignore[arg-type]
        swap()
        return resolved

    monkeypatch.setattr(media_mod, "check_video_path", check_then_swap)


def test_a_file_swapped_for_a_symlink_is_refused(layout: tuple[Path, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root, outside = layout
    target = root / "sub" / "v.mp4"

    def swap() -> None:
        target.unlink()
        target.symlink_to(outside / "sub" / "v.mp4")

    swap_after_check(monkeypatch, swap)
    with pytest.raises(InputError, match="refused") as caught:
        with open_video(str(target), media_roots=(str(root),)):
            pass
    assert caught.value.kind == "refused_path"


def test_a_parent_directory_swapped_outside_the_roots_is_refused(
    layout: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = layout

    def swap() -> None:
        shutil.move(str(root / "sub"), str(root.parent / "moved"))
        (root / "sub").symlink_to(outside / "sub")

    swap_after_check(monkeypatch, swap)
    with pytest.raises(InputError, match="outside VIDQ_MEDIA_ROOTS"):
        with open_video(str(root / "sub" / "v.mp4"), media_roots=(str(root),)):
            pass


def test_a_file_swapped_for_a_fifo_is_refused_without_blocking(
    layout: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = layout
    target = root / "sub" / "v.mp4"

    def swap() -> None:
        target.unlink()
        os.mkfifo(target)

    swap_after_check(monkeypatch, swap)
    with pytest.raises(InputError, match="not a regular file once opened"):
        with open_video(str(target), media_roots=(str(root),)):
            pass


def first_clip(path: Path, source: VideoSource | None = None) -> object:
    with VideoReader(path, source=source) as reader:
        windows = plan_windows(Sampling(), reader.info.duration_s, Fraction(1, 2))
        (clip,) = list(reader.clips(windows, num_frames=4))
        return clip.frames


def test_the_decoder_reads_the_file_that_was_checked(layout: tuple[Path, Path]) -> None:
    root, outside = layout
    target = root / "sub" / "v.mp4"
    checked = first_clip(target)
    other = first_clip(outside / "sub" / "v.mp4")
    assert not np.array_equal(checked, other)
    with open_video(str(target), media_roots=(str(root),)) as source:
        assert isinstance(source, HashingReader)  # reads by the descriptor opened
        target.unlink()  # the name now points at another file
        shutil.copy(outside / "sub" / "v.mp4", target)
        assert np.array_equal(first_clip(target, source), checked)
