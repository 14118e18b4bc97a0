"""The seed's slow_r50 pipeline: PyTorch Hub's usage of facebookresearch/pytorchvideo's
``slow_r50``, written out so that vidq can be compared with it.

What it reproduces, step for step (the hub page's example, ``device = "cpu"``):

1. ``EncodedVideo.from_path(path)`` and ``video.get_clip(start_sec, start_sec +
   clip_duration)``, with ``clip_duration = (num_frames * sampling_rate) /
   frames_per_second = (8 * 8) / 30`` as a float;
2. ``ApplyTransformToKey("video", Compose([UniformTemporalSubsample(8),
   Lambda(x / 255.0), NormalizeVideo(mean, std), ShortSideScale(256),
   CenterCropVideo((256, 256))]))`` with mean 0.45 and std 0.225 per channel;
3. ``model = pytorchvideo.models.hub.slow_r50(...).eval()``, one clip at a time:
   ``preds = model(inputs[None, ...])``;
4. ``torch.nn.Softmax(dim=1)`` and ``preds.topk(k=5)``, mapped to Kinetics-400 names.

Two things differ from the page, neither in the arithmetic:

- PyTorchVideo 0.1.5's ``pytorchvideo.transforms`` imports a torchvision module that
  torchvision 0.17 renamed, so it cannot be imported beside a current torchvision.
  Its three transforms (and torchvision's private ``_transforms_video`` pair) are
  written below with the same torch operations, in the same order, as PyTorchVideo
  0.1.5 and torchvision define them.
- The class names are the Kinetics-400 categories torchvision ships (the page
  downloads them), and the weights are a checkpoint given here, or a seeded random
  init: the pretrained checkpoint is a download.

Run as a script it times the seed's loop over one video's first clips:

    python -m seed.pipeline VIDEO [N_CLIPS] [--weights CHECKPOINT.pyth]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SIDE_SIZE = 256
MEAN = [0.45, 0.45, 0.45]
STD = [0.225, 0.225, 0.225]
CROP_SIZE = 256
NUM_FRAMES = 8
SAMPLING_RATE = 8
FRAMES_PER_SECOND = 30
CLIP_DURATION = (NUM_FRAMES * SAMPLING_RATE) / FRAMES_PER_SECOND
"""Seconds of video per clip, the seed's float (64 / 30)."""


# -- PyTorchVideo 0.1.5: pytorchvideo/transforms/{transforms,functional}.py ----------
class ApplyTransformToKey:
    """Applies ``transform`` to ``x[key]`` of a clip dictionary, in place."""

    def __init__(self, key: str, transform: Callable[[Any], Any]) -> None:
        self.key = key
        self.transform = transform

    def __call__(self, x: dict[str, Any]) -> dict[str, Any]:
        x[self.key] = self.transform(x[self.key])
        return x


class UniformTemporalSubsample:
    """``num_samples`` equispaced frames of the time dimension (nearest neighbour
    when there are fewer frames than samples)."""

    def __init__(self, num_samples: int, temporal_dim: int = -3) -> None:
        self.num_samples = num_samples
        self.temporal_dim = temporal_dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[self.temporal_dim]
        assert self.num_samples > 0 and t > 0
        indices = torch.linspace(0, t - 1, self.num_samples)
        indices = torch.clamp(indices, 0, t - 1).long()
        return torch.index_select(x, self.temporal_dim, indices)


class ShortSideScale:
    """Scales a float32 (C, T, H, W) clip so that its short side is ``size``; the long
    side keeps the aspect ratio, floored (PyTorch backend: ``interpolate``)."""

    def __init__(self, size: int, interpolation: str = "bilinear") -> None:
        self.size = size
        self.interpolation = interpolation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert len(x.shape) == 4
        assert x.dtype == torch.float32
        _c, _t, h, w = x.shape
        if w < h:
            new_h = int(math.floor((float(h) / w) * self.size))
            new_w = self.size
        else:
            new_h = self.size
            new_w = int(math.floor((float(w) / h) * self.size))
        return torch.nn.functional.interpolate(
            x, size=(new_h, new_w), mode=self.interpolation, align_corners=False
        )


# -- torchvision: transforms/_transforms_video.py and _functional_video.py -----------
class NormalizeVideo:
    """``(clip - mean) / std`` per channel of a (C, T, H, W) clip, on a copy."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = mean
        self.std = std

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        if clip.ndimension() != 4:
            raise ValueError(f"clip should be 4D. Got {clip.dim()}D")
        clip = clip.clone()
        mean = torch.as_tensor(self.mean, dtype=clip.dtype, device=clip.device)
        std = torch.as_tensor(self.std, dtype=clip.dtype, device=clip.device)
        clip.sub_(mean[:, None, None, None]).div_(std[:, None, None, None])
        return clip


class CenterCropVideo:
    """The central (height, width) crop of a (C, T, H, W) clip."""

    def __init__(self, crop_size: int | tuple[int, int]) -> None:
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        if clip.ndimension() != 4:
            raise ValueError(f"clip should be 4D. Got {clip.dim()}D")
        h, w = clip.size(-2), clip.size(-1)
        th, tw = self.crop_size
        if h < th or w < tw:
            raise ValueError("height and width must be no smaller than crop_size")
        i = int(round((h - th) / 2.0))
        j = int(round((w - tw) / 2.0))
        return clip[..., i : i + th, j : j + tw]


def seed_transform() -> ApplyTransformToKey:
    """The seed's transform, composed as the hub page composes it."""
    from torchvision.transforms import Compose, Lambda

    return ApplyTransformToKey(
        key="video",
        transform=Compose(
            [
                UniformTemporalSubsample(NUM_FRAMES),
                Lambda(lambda x: x / 255.0),
                NormalizeVideo(MEAN, STD),
                ShortSideScale(size=SIDE_SIZE),
                CenterCropVideo(crop_size=(CROP_SIZE, CROP_SIZE)),
            ]
        ),
    )


def load_model(checkpoint: str | Path | None = None, *, seed: int = 0) -> torch.nn.Module:
    """``pytorchvideo.models.hub.slow_r50`` in eval mode: the weights of a hub-style
    ``.pyth`` checkpoint (``{"model_state": state_dict}``), or, without one, the
    architecture's own init after ``torch.manual_seed(seed)``."""
    from pytorchvideo.models.hub import slow_r50

    if checkpoint is None:
        torch.manual_seed(seed)
    model = slow_r50(pretrained=False)
    if checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu")
        model.load_state_dict(state["model_state"])
    return model.eval()


def kinetics_class_names() -> list[str]:
    """Kinetics-400 class names by class id, as torchvision ships them."""
    from torchvision.models.video import R3D_18_Weights

    return list(R3D_18_Weights.KINETICS400_V1.meta["categories"])


@dataclass(frozen=True)
class SeedClip:
    """What the seed computes for one clip."""

    inputs: torch.Tensor
    """The transformed clip, (3, 8, 256, 256) float32."""
    logits: torch.Tensor
    """``model(inputs[None])[0]``, (400,)."""
    probs: torch.Tensor
    """Its softmax, (400,)."""
    top5: list[int]
    """Class ids of the five highest probabilities, best first."""


class SeedPipeline:
    """The seed's model and transform, built once; ``clip`` runs its per-clip steps."""

    def __init__(self, checkpoint: str | Path | None = None) -> None:
        self.model = load_model(checkpoint)
        self.transform = seed_transform()
        self.class_names = kinetics_class_names()

    @staticmethod
    def open(path: str | Path) -> Any:
        """The seed's ``EncodedVideo.from_path``."""
        from pytorchvideo.data.encoded_video import EncodedVideo

        return EncodedVideo.from_path(str(path))

    def inputs(self, video: Any, start_sec: float) -> torch.Tensor:
        """``get_clip`` of one clip duration from ``start_sec``, transformed."""
        video_data = video.get_clip(start_sec=start_sec, end_sec=start_sec + CLIP_DURATION)
        return self.transform(video_data)["video"]

    def predict(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, softmax) of one transformed clip, both (1, 400)."""
        with torch.no_grad():
            preds = self.model(inputs[None, ...])
        return preds, torch.nn.Softmax(dim=1)(preds)

    def clip(self, video: Any, start_sec: float) -> SeedClip:
        inputs = self.inputs(video, start_sec)
        logits, probs = self.predict(inputs)
        return SeedClip(inputs=inputs, logits=logits[0], probs=probs[0],
                        top5=probs.topk(k=5).indices[0].tolist())

    def label(self, top5: list[int]) -> list[str]:
        return [self.class_names[int(i)] for i in top5]

    def run(self, path: str | Path, clips: int = 1) -> dict[str, Any]:
        """The seed's loop over one video: clip ``i`` starts at ``i * CLIP_DURATION``.
        Returns its timings (the model is built before, as in the seed) and the
        first clip's top five."""
        decode_s = model_s = 0.0
        t0 = time.perf_counter()
        video = self.open(path)
        first: list[int] = []
        for i in range(clips):
            a = time.perf_counter()
            inputs = self.inputs(video, i * CLIP_DURATION)
            b = time.perf_counter()
            _logits, probs = self.predict(inputs)
            c = time.perf_counter()
            decode_s += b - a
            model_s += c - b
            if i == 0:
                first = probs.topk(k=5).indices[0].tolist()
        video.close()
        total = time.perf_counter() - t0
        return {"clips": clips, "total_s": total, "decode_transform_s": decode_s,
                "model_s": model_s, "s_per_clip": total / max(clips, 1), "top5_first": first,
                "labels_first": self.label(first)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seed.pipeline",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("video")
    parser.add_argument("clips", nargs="?", type=int, default=1,
                        help="clips from the start, one clip duration each (default 1)")
    parser.add_argument("--weights", default=None,
                        help="a hub-style .pyth checkpoint (default: a seeded random init)")
    args = parser.parse_args(argv)
    print(json.dumps(SeedPipeline(args.weights).run(args.video, args.clips)))


if __name__ == "__main__":
    main()
