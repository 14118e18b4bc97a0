"""The seed's transform (worker/transforms.py) against PyTorchVideo's and torchvision's
own functions, on real decoded frames."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch

from tests.media import Media
from vidq.sampling import Sampling
from worker.models import get_preset
from worker.transforms import center_crop, clip_views, short_side_scale, uniform_crop
from worker.video import read_clips

NORMALIZE_TOLERANCE = 1e-5
"""Max abs difference allowed between our views and the seed's Compose on the same
frames. The only difference is float rounding: we resize first and normalize
after (and fold /255 into the affine map); the values are ~[-2, 2.5], where one
float32 ulp is 2.4e-7, and a few roundings apart leaves them ~1e-6 apart. A
wrong mean/std, crop offset, resize size or channel order is >= 1e-2 off."""


def frames_of(path: object, *, num_frames: int = 8) -> np.ndarray:
    _info, clips = read_clips(
        path, Sampling(), num_frames=num_frames, clip_duration=Fraction(1)  # type: ignore[arg-type]
    )
    return clips[0].frames


def seed_transform(preset_name: str, crop: str = "center", spatial_idx: int = 1) -> Any:
    """The seed's Compose (minus the temporal subsample, already applied), built from
    the seed's own imports, for any preset's sizes."""
    from pytorchvideo.transforms import ShortSideScale
    from pytorchvideo.transforms.functional import uniform_crop as ptv_uniform_crop
    from torchvision.transforms import Compose, Lambda
    from torchvision.transforms._transforms_video import CenterCropVideo, NormalizeVideo

    p = get_preset(preset_name)
    cropper = (
        CenterCropVideo(crop_size=(p.crop_size, p.crop_size))
        if crop == "center"
        else Lambda(lambda x: ptv_uniform_crop(x, p.crop_size, spatial_idx))
    )
    return Compose(
        [
            Lambda(lambda x: x / 255.0),
            NormalizeVideo(list(p.mean), list(p.std)),
            ShortSideScale(size=p.side_size),
            cropper,
        ]
    )


def as_cthw(frames: np.ndarray) -> torch.Tensor:
    """What EncodedVideo.get_clip returns: float32 (C, T, H, W) in [0, 255]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).to(torch.float32)


SHAPES = [(3, 8, 96, 160), (3, 8, 160, 96), (3, 4, 240, 320), (3, 2, 61, 97), (3, 2, 64, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[2]}x{s[3]}" for s in SHAPES])
@pytest.mark.parametrize("size", [182, 256])
def test_short_side_scale_is_pytorchvideos(
    seed_modules: None, shape: tuple[int, ...], size: int
) -> None:
    from pytorchvideo.transforms.functional import short_side_scale as ptv_short_side_scale

    x = torch.rand(shape) * 255
    ours = short_side_scale(x, size)
    theirs = ptv_short_side_scale(x, size)
    assert ours.shape == theirs.shape and min(ours.shape[-2:]) == size
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "shape", [(3, 2, 256, 455), (3, 2, 455, 256), (3, 2, 257, 300), (3, 2, 256, 256)]
)
def test_center_crop_is_torchvisions_center_crop_video(
    seed_modules: None, shape: tuple[int, ...]
) -> None:
    from torchvision.transforms._transforms_video import CenterCropVideo

    x = torch.rand(shape)
    assert torch.equal(center_crop(x, 256), CenterCropVideo(crop_size=(256, 256))(x))


@pytest.mark.parametrize(
    ("shape", "offsets"),
    [
        # (C, T, H, W): expected (y, x) of the left/centre/right (or top/centre/bottom) crop
        ((3, 2, 256, 455), [(0, 0), (0, 100), (0, 199)]),
        ((3, 2, 455, 256), [(0, 0), (100, 0), (199, 0)]),
        ((3, 2, 182, 323), [(0, 0), (0, 71), (0, 141)]),
    ],
)
def test_three_crops_are_left_centre_right_like_pytorchvideo(
    seed_modules: None, shape: tuple[int, ...], offsets: list[tuple[int, int]]
) -> None:
    from pytorchvideo.transforms.functional import uniform_crop as ptv_uniform_crop

    size = min(shape[-2:])
    h, w = shape[-2:]
    # Each pixel holds its own coordinates, so a crop tells where it was taken.
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x = torch.stack([yy, xx, yy * 0]).float()[:, None].expand(3, shape[1], h, w).contiguous()
    for spatial_idx, (y0, x0) in enumerate(offsets):
        ours = uniform_crop(x, size, spatial_idx)
        assert ours.shape[-2:] == (size, size)
        assert (int(ours[0, 0, 0, 0]), int(ours[1, 0, 0, 0])) == (y0, x0)
        assert torch.equal(ours, ptv_uniform_crop(x, size, spatial_idx))


FRAME_SIZES = [(360, 640), (720, 1280), (1080, 1920), (640, 360), (200, 300), (1082, 1918)]


@pytest.mark.parametrize("hw", FRAME_SIZES, ids=[f"{w}x{h}" for h, w in FRAME_SIZES])
def test_frame_by_frame_resize_is_the_whole_clips_bit_for_bit(hw: tuple[int, int]) -> None:
    """The transform resizes (and crops) one frame at a time into a reused float frame;
    every value must be the one resizing the whole (C, T, H, W) clip at once gives,
    exactly, for frames as a list or one array."""
    from worker.transforms import _scaled

    rng = np.random.default_rng(hw[0] * hw[1])
    frames = [rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for _ in range(3)]
    whole = short_side_scale(as_cthw(np.stack(frames)).contiguous(), 256)
    for given in (frames, torch.from_numpy(np.stack(frames))):
        assert torch.equal(_scaled(given, 256), whole)
        assert torch.equal(_scaled(given, 256, crop=224), center_crop(whole, 224))


@pytest.mark.parametrize("name", ["h264_30", "portrait", "h264_60_mkv", "vp9_webm"])
@pytest.mark.parametrize("preset_name", ["slow_r50", "x3d_xs"])
def test_clip_views_match_the_seed_compose_on_real_frames(
    media_files: Media, seed_modules: None, name: str, preset_name: str
) -> None:
    preset = get_preset(preset_name)
    frames = frames_of(getattr(media_files, name), num_frames=preset.num_frames)
    ours = clip_views(frames, preset)
    seed = seed_transform(preset_name)(as_cthw(frames))
    assert ours.shape == (1, 3, preset.num_frames, preset.crop_size, preset.crop_size)
    assert ours.dtype == torch.float32
    diff = (ours[0] - seed).abs().max().item()
    assert diff <= NORMALIZE_TOLERANCE, f"max abs diff {diff:.2e}"


@pytest.mark.parametrize("name", ["h264_30", "portrait"])
def test_three_crop_views_match_the_seed_compose_with_uniform_crop(
    media_files: Media, seed_modules: None, name: str
) -> None:
    preset = get_preset("x3d_xs")
    frames = frames_of(getattr(media_files, name), num_frames=preset.num_frames)
    views = clip_views(frames, preset, crops=3)
    assert views.shape == (3, 3, preset.num_frames, preset.crop_size, preset.crop_size)
    for i in range(3):
        seed = seed_transform("x3d_xs", crop="uniform", spatial_idx=i)(as_cthw(frames))
        assert (views[i] - seed).abs().max().item() <= NORMALIZE_TOLERANCE
    # The three views are different regions of the frame.
    assert not torch.allclose(views[0], views[2], atol=0.1)


def test_views_are_normalized_with_the_presets_mean_and_std() -> None:
    preset = get_preset("slow_r50")
    grey = np.full((8, 256, 256, 3), 0.45 * 255, np.float32).round().astype(np.uint8)
    white = np.full((8, 256, 256, 3), 255, np.uint8)
    assert clip_views(grey, preset).abs().max().item() < 0.01  # (115/255 - .45)/.225
    assert clip_views(white, preset).min().item() == pytest.approx((1 - 0.45) / 0.225, abs=1e-5)
