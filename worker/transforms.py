"""The seed's clip transform, reimplemented (PyPI's pytorchvideo.transforms is broken).

Seed order: UniformTemporalSubsample(8) -> /255 -> NormalizeVideo(mean, std) ->
ShortSideScale(256, bilinear) -> CenterCropVideo(256). Temporal subsampling is
done while decoding (worker/video.py). Normalization is a per-channel affine map
and bilinear interpolation a convex combination of pixels, so normalizing after
the resize gives the same tensor up to float rounding while touching far fewer
pixels; the fidelity test measures that difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeAlias

import numpy as np
import torch
from torch.nn import functional as F

from worker.models import ModelPreset


def short_side_scale(x: torch.Tensor, size: int) -> torch.Tensor:
    """pytorchvideo.transforms.functional.short_side_scale on a (C, T, H, W) tensor."""
    _c, _t, h, w = x.shape
    if w < h:
        new_h, new_w = int(math.floor((float(h) / w) * size)), size
    else:
        new_h, new_w = size, int(math.floor((float(w) / h) * size))
    return F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCropVideo offsets (round)."""
    h, w = x.shape[-2:]
    i = int(round((h - size) / 2.0))
    j = int(round((w - size) / 2.0))
    return x[..., i : i + size, j : j + size]


def uniform_crop(x: torch.Tensor, size: int, spatial_idx: int) -> torch.Tensor:
    """pytorchvideo's uniform_crop: 0/1/2 = left/centre/right (top/centre/bottom if portrait)."""
    h, w = x.shape[-2:]
    y = int(math.ceil((h - size) / 2))
    xo = int(math.ceil((w - size) / 2))
    if h > w:
        y = 0 if spatial_idx == 0 else (h - size if spatial_idx == 2 else y)
    else:
        xo = 0 if spatial_idx == 0 else (w - size if spatial_idx == 2 else xo)
    return x[..., y : y + size, xo : xo + size]


Frames: TypeAlias = torch.Tensor | Sequence[np.ndarray]
"""A clip's uint8 frames: a (T, H, W, 3) tensor, or T (H, W, 3) arrays."""


def _frame(frames: Frames, t: int) -> torch.Tensor:
    """Frame ``t`` as a (1, H, W, 3) tensor, without a copy."""
    if isinstance(frames, torch.Tensor):
        return frames[t : t + 1]
    return torch.from_numpy(frames[t]).unsqueeze(0)


def _device(frames: Frames) -> torch.device:
    return frames.device if isinstance(frames, torch.Tensor) else torch.device("cpu")


def _scaled(frames: Frames, size: int, *, crop: int = 0,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, h, w) short-side scaled, one frame at a time;
    with ``crop``, only each frame's centre crop is kept (3, T, crop, crop), written
    into ``out`` when given.

    Each output value is the one a single resize of all frames gives (the kernel works
    plane by plane), but the float copy of the full-resolution frames is one frame,
    not the whole clip: 88 MB at 720p is beyond the allocator's reuse, so the clip
    at once cost fresh zeroed pages on every window and took 6x longer at 720p
    (`python -m benchmarks decode`); the peak memory of a window drops by the same factor.
    That one float frame is allocated once per clip and refilled for each frame (a
    new one per frame cost fresh pages too: the transform of a window took 13-22%
    longer at 360p-1080p, decoding alongside). Each frame's result goes straight into
    one output tensor: a ``torch.cat`` of the eight results measured 1.7-4x slower in
    fresh processes (more live memory, and the frame-sized float buffer is no longer
    reused). Cropping each frame as it is copied there spares a copy of the whole
    resized clip.
    """
    first = _frame(frames, 0)
    buffer = torch.empty(first.shape, dtype=torch.float32, device=first.device)
    planes = buffer.permute(3, 0, 1, 2)  # (3, 1, H, W): the seed's (C, T, H, W), T = 1

    def one(t: int) -> torch.Tensor:
        buffer.copy_(_frame(frames, t))
        x = short_side_scale(planes, size)
        return center_crop(x, crop) if crop else x

    scaled = one(0)
    if out is None:
        out = torch.empty(
            (3, len(frames), *scaled.shape[-2:]), dtype=torch.float32, device=buffer.device
        )
    out[:, :1] = scaled
    for t in range(1, len(frames)):
        out[:, t : t + 1] = one(t)
    return out


def clip_views(frames: np.ndarray | Sequence[np.ndarray], preset: ModelPreset, *,
               crops: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (T, H, W, 3) frames, or T (H, W, 3) frames -> normalized float views
    (crops, 3, T, S, S), written into ``out`` when given (a decoder process's shared
    memory)."""
    if isinstance(frames, np.ndarray):
        return frames_to_views(torch.from_numpy(frames), preset, crops=crops, out=out)
    return frames_to_views(frames, preset, crops=crops, out=out)


def frames_to_views(frames: Frames, preset: ModelPreset, *, crops: int = 1,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The same on a uint8 (T, H, W, 3) tensor on any device: on CUDA the decoders hand
    over uint8 frames and this runs on the GPU, so the CPU only decodes."""
    size = preset.crop_size
    if crops == 1:  # each frame's crop straight into the one view
        if out is None:
            out = torch.empty((1, 3, len(frames), size, size), dtype=torch.float32,
                              device=_device(frames))
        _scaled(frames, preset.side_size, crop=size, out=out[0])
        views = out
    else:
        x = _scaled(frames, preset.side_size)  # C, T, H, W
        views = torch.stack([uniform_crop(x, size, i) for i in range(3)], out=out)
    # (v / 255 - mean) / std as one in-place pass over a contiguous tensor: an
    # elementwise op on the strided crop view costs more than the resize.
    mean = torch.tensor(preset.mean, dtype=torch.float32, device=views.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(preset.std, dtype=torch.float32, device=views.device).view(1, 3, 1, 1, 1)
    return views.sub_(mean * 255.0).div_(std * 255.0)


Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
"""Memory for a prepared clip, given its shape and dtype (a decoder process's slot)."""


def prepare_clip(frames: np.ndarray | Sequence[np.ndarray], preset: ModelPreset, *, crops: int,
                 frames_only: bool, into: Allocate | None = None) -> torch.Tensor:
    """A clip's model input, made once a clip is decoded: the one way to prepare a clip,
    in a decoder thread or a decoder process.

    On a CPU model (``frames_only`` False): the normalized views (crops, 3, T, S, S).
    For an accelerator: the uint8 (T, H, W, 3) frames, which the model's host uploads
    and transforms there, so the CPU only decodes. ``into`` gives the memory to write
    into (a decoder process's shared slot); by default frames go into pinned memory,
    so the upload does not block, and views into fresh memory."""
    if frames_only:
        shape = (len(frames), *frames[0].shape)
        out = (into(shape, torch.uint8) if into is not None
               else torch.empty(shape, dtype=torch.uint8, pin_memory=True))
        np.stack(list(frames), out=out.numpy())  # one copy, into the memory given
        return out
    if into is None:
        return clip_views(frames, preset, crops=crops)
    size = preset.crop_size
    return clip_views(frames, preset, crops=crops,
                      out=into((crops, 3, len(frames), size, size), torch.float32))
