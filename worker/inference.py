"""The model a worker holds, in LitServe's four verbs: load, prepare, predict, assemble.

``Classifier`` is built once per process (``setup``: device and precision chosen,
weights loaded, batch norms folded, int8 quantized), then called by the pipeline
(worker/pipeline.py) for every clip and every batch:

- ``prepare``: a decoded clip's frames -> the model's input (``decode_request``);
- ``predict``: prepared clips of any videos -> one forward pass (``predict``);
- ``assemble``: a video's scored clips -> its ``VideoResult`` (``encode_response``).

It does not size, decode or batch: the plan (worker/plan.py) sizes the pipeline,
and the pipeline decodes and batches. To classify files from Python::

    from worker.inference import Classifier
    from worker.pipeline import classify, classify_many

    model = Classifier(model="x3d_xs", weights="random", device="cpu")
    result = classify(model, "video.mp4")
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch

from vidq.errors import ConfigError, TransientError
from vidq.sampling import Sampling
from vidq.settings import EMBEDDING_MODES, Settings
from worker import quantize
from worker.features import PooledFeatures, head_pool_name
from worker.messages import ScoredClip
from worker.models import (
    LoadedModel,
    fold_batch_norms,
    get_preset,
    kinetics400_labels,
    load_model,
)
from worker.results import ClipScores, DecodeStats, LabelScore, VideoInfo, VideoResult
from worker.transforms import frames_to_views, prepare_clip

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"Unknown device {name!r}; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {name} requested but CUDA is not available; use --device cpu.")
    return device


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls/convolutions beat fp32 through oneDNN."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return bool(amx or avx512_bf16)


def resolve_precision(name: str, device: torch.device, *, cpu_bf16: bool = True) -> str:
    """``auto``: bf16 on CUDA (fp16 where bf16 is missing); on CPU, bf16 where the
    CPU has AMX/AVX512-BF16 and the preset's convolutions profit from it. ``auto``
    never picks int8: it needs a calibration and changes results (see worker/quantize.py)."""
    if name not in PRECISIONS:
        raise ConfigError(f"Unknown precision {name!r}; use {', '.join(PRECISIONS)}.")
    if name == "int8" and device.type != "cpu":
        raise ConfigError(
            f"Precision int8 runs on CPU only (fbgemm kernels), not on {device}; "
            "use --device cpu, or bf16/fp16 on the GPU."
        )
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16 and cpu_has_fast_bf16() else "fp32"


def oom_errors() -> tuple[type[BaseException], ...]:
    """Out-of-memory errors worth a retry (another job may have held the memory)."""
    return (torch.OutOfMemoryError,)


class Classifier:
    """A loaded model: ``prepare``, ``predict`` and ``assemble`` for the pipeline."""

    def __init__(
        self,
        *,
        model: str = "slow_r50",
        weights: str = "pretrained",
        device: str = "auto",
        precision: str = "auto",
        top_k: int = 5,
        compile: bool = False,
        int8_calibration: str = "",
        weights_sha256: str = "",
        embeddings: str = "off",
    ) -> None:
        if embeddings not in EMBEDDING_MODES:
            raise ConfigError(f"Unknown embeddings mode {embeddings!r}; use "
                              f"{', '.join(EMBEDDING_MODES)}.")
        self.embeddings = embeddings
        self.preset = get_preset(model)
        self.device = resolve_device(device)
        self.precision = resolve_precision(
            precision, self.device, cpu_bf16=self.preset.cpu_bf16
        )
        if self.precision == "int8":
            quantize.check_int8_supported(self.preset, int8_calibration)
        self.calibration_id: str | None = None
        self.top_k = top_k
        self.labels = kinetics400_labels()
        loaded: LoadedModel = load_model(self.preset, weights, sha256=weights_sha256)
        self.weights_id = loaded.weights_id
        module = loaded.module.to(self.device)
        pool_name = head_pool_name(module)
        # The fast path, at every precision: BN folded into the convs (one pass over
        # the activations instead of two; the same function up to float rounding)
        # and channels_last_3d, the layout oneDNN's and cuDNN's fast 3D convolutions
        # use. Together 1.5x on an fp32 slow_r50 forward on an AVX2 CPU
        # (`python -m benchmarks int8` compares it with the seed's eager model). In
        # reduced precision the conv/linear
        # weights are stored in the autocast dtype too, which autocast would otherwise
        # re-cast from fp32 on every forward (same rounding, so the same results):
        # ~20% off a bf16 forward on an AMX CPU.
        fold_batch_norms(module)
        if self.precision == "int8":
            calibration = quantize.load_calibration(
                int8_calibration, preset=self.preset, weights_id=self.weights_id
            )
            module = quantize.quantize(module, preset=self.preset, calibration=calibration)
            self.calibration_id = calibration.calibration_id
        elif self.precision != "fp32":
            for layer in module.modules():
                if isinstance(layer, (torch.nn.Conv3d, torch.nn.Linear)):
                    layer.to(_DTYPES[self.precision])
        module = module.to(memory_format=torch.channels_last_3d)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        # Hooked before compiling, so a compiled graph runs the hook too.
        self.features = (PooledFeatures(module, pool_name) if embeddings != "off" else None)
        if compile:  # an OptimizedModule: called like the module it wraps
            module = cast(torch.nn.Module, torch.compile(module, dynamic=False))
        self.module = module

    @classmethod
    def from_settings(cls, settings: Settings) -> Classifier:
        return cls(
            model=settings.model,
            weights=settings.weights,
            device=settings.device,
            precision=settings.precision,
            top_k=settings.top_k,
            compile=settings.compile,
            int8_calibration=settings.int8_calibration,
            weights_sha256=settings.weights_sha256,
            embeddings=settings.embeddings,
        )

    @property
    def takes_frames(self) -> bool:
        """Whether ``prepare`` hands over uint8 frames (an accelerator transforms them
        itself) rather than the normalized views a CPU model takes."""
        return self.device.type != "cpu"

    # -- one batch -----------------------------------------------------------------
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, S, S) normalized views -> (B, classes) float32 softmax, on CPU."""
        return self.forward_with_features(views)[0]

    def forward_with_features(self, views: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass: the (B, classes) float32 softmax and, when embeddings are
        kept, the (B, C) float32 pooled features (worker/features.py), both on CPU."""
        if views.device != self.device:
            views = views.pin_memory().to(self.device, non_blocking=True)
        views = views.contiguous(memory_format=torch.channels_last_3d)
        capture = self.features
        features = None
        with torch.inference_mode(), (capture.lock if capture else contextlib.nullcontext()):
            if capture:
                capture.reset()
            if self.precision not in _DTYPES:  # fp32, or int8 (quantized in the graph)
                logits = self.module(views)
            else:
                with torch.autocast(self.device.type, dtype=_DTYPES[self.precision]):
                    logits = self.module(views)
            if capture:
                features = capture.take().cpu()
            return torch.softmax(logits.float(), dim=1).cpu(), features

    def _top(self, probs: torch.Tensor) -> list[LabelScore]:
        scores, ids = probs.topk(min(self.top_k, probs.numel()))
        return [
            LabelScore(int(i), self.labels[int(i)], round(float(s), 6))
            for s, i in zip(scores.tolist(), ids.tolist())
        ]

    # -- the pipeline's steps (worker/pipeline.py) -----------------------------------
    def prepare(self, frames: np.ndarray | Sequence[np.ndarray], *, crops: int) -> torch.Tensor:
        """Decoder side, on a clip's uint8 (T, H, W, 3) frames or its T (H, W, 3) frames:
        ``prepare_clip`` (worker/transforms.py) for this model's preset and device."""
        return prepare_clip(frames, self.preset, crops=crops, frames_only=self.takes_frames)

    def predict(self, prepared: list[torch.Tensor], *, crops: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prepared clips (from any videos) -> one forward pass -> (views, classes) softmax
        and (views, C) pooled features, or None when embeddings are off."""
        try:
            if self.takes_frames:
                views = torch.cat([
                    frames_to_views(p.to(self.device, non_blocking=True), self.preset, crops=c)
                    for p, c in zip(prepared, crops)
                ])
            else:
                views = prepared[0] if len(prepared) == 1 else torch.cat(prepared)
            return self.forward_with_features(views)
        except oom_errors() as exc:
            raise TransientError(f"out of accelerator memory ({exc})".splitlines()[0],
                                 kind="out_of_memory") from None

    def assemble(
        self,
        *,
        path: str,
        info: VideoInfo,
        sampling: Sampling,
        scored: list[ScoredClip],
        decode_s: float,
        model_s: float,
        started: float,
        decode_stats: DecodeStats | None = None,
    ) -> VideoResult:
        """Every clip of a video scored: its clips' and the video's top-k (and embeddings)."""
        scored = sorted(scored, key=lambda s: s.clip.window.index)
        clip_preds = []
        all_views = []
        clip_features = []
        for one in scored:
            clip, probs, features = one.clip, one.probs, one.features
            all_views.append(probs)
            w = clip.window
            # A clip's features, like its probabilities, are the mean over its crops.
            feature = features.mean(dim=0) if features is not None else None
            if feature is not None:
                clip_features.append(feature)
            clip_preds.append(
                ClipScores(
                    index=w.index,
                    start_sec=round(w.start_sec, 4),
                    end_sec=round(w.end_sec, 4),
                    source_frames=clip.source_frames,
                    top=self._top(probs.mean(dim=0)),
                    embedding=(float16_bytes(feature) if feature is not None
                               and self.embeddings == "clip" else None),
                )
            )
        # Video level: mean softmax over every view (clips x crops), as in multi-view eval.
        video_probs = torch.cat(all_views).mean(dim=0)
        # The video's embedding: the mean of its clips' (every clip has the same crops, so
        # also the mean over every view), computed in float32 before the float16 rounding.
        video_embedding = (float16_bytes(torch.stack(clip_features).mean(dim=0))
                           if clip_features and len(clip_features) == len(scored) else None)
        total = time.perf_counter() - started
        return VideoResult(
            path=path,
            model=self.preset.name,
            weights_id=self.weights_id,
            precision=self.precision,
            device=str(self.device),
            info=info,
            sampling=sampling,
            clips=clip_preds,
            top=self._top(video_probs),
            timing={
                "decode_s": round(decode_s, 4),
                "model_s": round(model_s, 4),
                "total_s": round(total, 4),
            },
            decode_stats=decode_stats or DecodeStats(),
            calibration_id=self.calibration_id,
            embedding=video_embedding,
        )


FLOAT16_MAX = 65504.0


def float16_bytes(vector: torch.Tensor) -> bytes:
    """A float32 vector as little-endian IEEE float16 bytes (round to nearest). Values
    past float16's range are clamped to its largest finite value rather than stored as
    infinities, which would make every cosine with the vector undefined; pooled
    activations of a working model stay far below it."""
    half = vector.detach().float().clamp(-FLOAT16_MAX, FLOAT16_MAX).to(torch.float16).cpu()
    return half.numpy().astype("<f2", copy=False).tobytes()

