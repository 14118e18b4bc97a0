"""The classifier a worker holds: device and precision choice, batching, pipelining.

``Classifier`` is LitServe-shaped: built once per process (``setup``), then
``classify(path)`` per video. Decoding runs on a background thread so the CPU
decoder overlaps the model's forward pass; clips are batched across videos.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from vidq.errors import ConfigError, InputError, VidqError
from vidq.sampling import Sampling, plan_windows
from vidq.settings import Settings
from worker.models import (
    LoadedModel,
    fold_batch_norms,
    get_preset,
    kinetics400_labels,
    load_model,
)
from worker.transforms import clip_views
from worker.video import ClipFrames, DecodeStats, Limits, VideoInfo, VideoReader

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
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
    CPU has AMX/AVX512-BF16 and the preset's convolutions profit from it."""
    if name not in PRECISIONS:
        raise ConfigError(f"Unknown precision {name!r}; use {', '.join(PRECISIONS)}.")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16 and cpu_has_fast_bf16() else "fp32"


def oom_errors() -> tuple[type[BaseException], ...]:
    """Out-of-memory errors worth a retry (another job may have held the memory)."""
    return (torch.OutOfMemoryError,)


@dataclass(frozen=True)
class LabelScore:
    class_id: int
    label: str
    score: float


@dataclass
class ClipPrediction:
    index: int
    start_sec: float
    end_sec: float
    source_frames: int
    top: list[LabelScore]


@dataclass
class VideoResult:
    path: str
    model: str
    weights_id: str
    precision: str
    device: str
    info: VideoInfo
    sampling: Sampling
    clips: list[ClipPrediction]
    top: list[LabelScore]
    timing: dict[str, float] = field(default_factory=dict)
    decode_stats: DecodeStats = field(default_factory=DecodeStats)
    """Packets read, skipped and decoded: ``decoded / packets`` is the decode work done."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["sampling"] = asdict(self.sampling)
        return out


@dataclass
class _Pending:
    """A video whose clips are in flight."""

    path: str
    info: VideoInfo
    started: float
    views: int = 0
    expected: int | None = None
    clips: list[tuple[ClipFrames, torch.Tensor]] = field(default_factory=list)
    decode_s: float = 0.0
    model_s: float = 0.0
    decode_stats: DecodeStats = field(default_factory=DecodeStats)


_END = object()


class _Stopped(Exception):
    """The consumer of a decode pipeline has gone: the decode thread stops."""


class Classifier:
    """A loaded model plus the input pipeline of its preset."""

    def __init__(
        self,
        *,
        model: str = "slow_r50",
        weights: str = "pretrained",
        device: str = "auto",
        precision: str = "auto",
        batch_size: int = 0,
        top_k: int = 5,
        limits: Limits = Limits(),
        compile: bool = False,
        skip_unused_frames: bool = True,
    ) -> None:
        self.preset = get_preset(model)
        self.device = resolve_device(device)
        self.precision = resolve_precision(
            precision, self.device, cpu_bf16=self.preset.cpu_bf16
        )
        self.batch_size = batch_size or (16 if self.device.type == "cuda" else 1)
        self.top_k = top_k
        self.limits = limits
        self.skip_unused_frames = skip_unused_frames
        self.labels = kinetics400_labels()
        loaded: LoadedModel = load_model(self.preset, weights)
        self.weights_id = loaded.weights_id
        module = loaded.module.to(self.device)
        # The fast path, at every precision: BN folded into the convs (one pass over
        # the activations instead of two; the same function up to float rounding)
        # and channels_last_3d, the layout oneDNN's and cuDNN's fast 3D convolutions
        # use. Together 1.5x on an fp32 slow_r50 forward on an AVX2 CPU
        # (benchmarks/forward_variants.py). In reduced precision the conv/linear
        # weights are stored in the autocast dtype too, which autocast would otherwise
        # re-cast from fp32 on every forward (same rounding, so the same results):
        # ~20% off a bf16 forward on an AMX CPU.
        fold_batch_norms(module)
        if self.precision != "fp32":
            for layer in module.modules():
                if isinstance(layer, (torch.nn.Conv3d, torch.nn.Linear)):
                    layer.to(_DTYPES[self.precision])
        module = module.to(memory_format=torch.channels_last_3d)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if compile:
            module = torch.compile(module, dynamic=False)
        self.module = module

    @classmethod
    def from_settings(cls, settings: Settings) -> Classifier:
        return cls(
            model=settings.model,
            weights=settings.weights,
            device=settings.device,
            precision=settings.precision,
            batch_size=settings.batch_size,
            top_k=settings.top_k,
            limits=Limits(
                max_duration_s=settings.max_duration_s,
                max_pixels=settings.max_pixels,
                max_frames=settings.max_frames,
                max_window_frames=settings.max_window_frames,
                max_decode_s=settings.max_decode_s,
            ),
            compile=settings.compile,
            skip_unused_frames=settings.skip_unused_frames,
        )

    # -- one batch -----------------------------------------------------------------
    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, S, S) normalized views -> (B, classes) float32 softmax, on CPU."""
        if self.device.type == "cuda":
            views = views.pin_memory().to(self.device, non_blocking=True)
        views = views.contiguous(memory_format=torch.channels_last_3d)
        with torch.inference_mode():
            if self.precision == "fp32":
                logits = self.module(views)
            else:
                with torch.autocast(self.device.type, dtype=_DTYPES[self.precision]):
                    logits = self.module(views)
            return torch.softmax(logits.float(), dim=1).cpu()

    def _top(self, probs: torch.Tensor) -> list[LabelScore]:
        scores, ids = probs.topk(min(self.top_k, probs.numel()))
        return [
            LabelScore(int(i), self.labels[int(i)], round(float(s), 6))
            for s, i in zip(scores.tolist(), ids.tolist())
        ]

    # -- videos --------------------------------------------------------------------
    def _decode(self, seq: int, path: str, sampling: Sampling, put: Callable[[tuple], None]) -> None:
        """Producer side of the pipeline: put ('start'|'clip'|'end'|'error', seq, ...) items."""
        t0 = time.perf_counter()
        try:
            with VideoReader(
                path, limits=self.limits, skip_unused_frames=self.skip_unused_frames
            ) as reader:
                put(("start", seq, (path, reader.info), t0))
                windows = plan_windows(sampling, reader.info.duration_s, self.preset.clip_duration)
                n = 0
                for clip in reader.clips(windows, num_frames=self.preset.num_frames):
                    views = clip_views(clip.frames, self.preset, crops=sampling.crops)
                    clip.frames = clip.frames[:0]  # the RGB frames are no longer needed
                    put(("clip", seq, clip, views))
                    n += 1
                if n == 0:
                    raise InputError(
                        f"{path}: no frames inside the requested window(s) "
                        f"(video is {reader.info.duration_s:.2f}s long).",
                        kind="no_frames",
                    )
                put(("end", seq, n, (time.perf_counter() - t0, reader.stats)))
        except _Stopped:
            raise
        except VidqError as exc:
            put(("error", seq, exc, None))
        except Exception as exc:  # a decoder crash must fail one video, not the run
            put(("error", seq, InputError(f"{path}: {exc}", kind="undecodable"), None))

    def classify_many(
        self, paths: Iterable[str | Path], sampling: Sampling = Sampling()
    ) -> Iterator[VideoResult | VidqError]:
        """Classify videos in order; yield a VideoResult or the error for each."""
        items: queue.Queue[Any] = queue.Queue(maxsize=max(4, 2 * self.batch_size))
        stop = threading.Event()
        path_list = [str(p) for p in paths]

        def put(item: Any) -> None:
            while not stop.is_set():
                try:
                    items.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue
            raise _Stopped

        def produce() -> None:
            # This thread's own torch ops (the transforms) stay on one core; the
            # model keeps its threads. (The setting is per thread under OpenMP.)
            torch.set_num_threads(1)
            try:
                for seq, p in enumerate(path_list):
                    self._decode(seq, p, sampling, put)
                put(_END)
            except _Stopped:
                pass  # the consumer went away (an error, or the caller stopped early)

        thread = threading.Thread(target=produce, name="vidq-decode", daemon=True)
        thread.start()
        pending: dict[int, _Pending] = {}
        batch: list[tuple[int, ClipFrames, torch.Tensor]] = []
        done: dict[int, VideoResult | VidqError] = {}
        next_out = 0

        def run_batch() -> None:
            if not batch:
                return
            views = torch.cat([v for _, _, v in batch])
            t = time.perf_counter()
            probs = self.forward(views)
            dt = time.perf_counter() - t
            offset = 0
            for seq, clip, v in batch:
                n = v.shape[0]
                pend = pending[seq]
                pend.clips.append((clip, probs[offset : offset + n]))
                pend.views += n
                offset += n
                pend.model_s += dt * n / views.shape[0]
            batch.clear()

        def finish_ready() -> Iterator[VideoResult | VidqError]:
            nonlocal next_out
            for seq in list(pending):
                pend = pending[seq]
                if pend.expected is not None and len(pend.clips) == pend.expected:
                    done[seq] = self._assemble(pend, sampling)
                    del pending[seq]
            while next_out in done:  # results come out in input order
                yield done.pop(next_out)
                next_out += 1

        try:
            while True:
                item = items.get()
                if item is _END:
                    break
                kind, seq, a, b = item
                if kind == "start":
                    pending[seq] = _Pending(path=a[0], info=a[1], started=b)
                elif kind == "clip":
                    batch.append((seq, a, b))
                    if sum(v.shape[0] for _, _, v in batch) >= self.batch_size:
                        run_batch()
                elif kind == "end":
                    pending[seq].expected = a
                    pending[seq].decode_s, pending[seq].decode_stats = b
                    if items.empty():
                        run_batch()  # nothing else queued: do not wait to fill the batch
                else:  # error
                    batch[:] = [entry for entry in batch if entry[0] != seq]
                    pending.pop(seq, None)
                    done[seq] = a
                yield from finish_ready()
            run_batch()
            yield from finish_ready()
        finally:
            stop.set()
            thread.join(timeout=10)

    def classify(self, path: str | Path, sampling: Sampling = Sampling()) -> VideoResult:
        """One video; raises the InputError of a bad one."""
        (result,) = list(self.classify_many([path], sampling))
        if isinstance(result, VidqError):
            raise result
        return result

    def _assemble(self, pend: _Pending, sampling: Sampling) -> VideoResult:
        pend.clips.sort(key=lambda c: c[0].window.index)
        clip_preds = []
        all_views = []
        for clip, probs in pend.clips:
            all_views.append(probs)
            w = clip.window
            clip_preds.append(
                ClipPrediction(
                    index=w.index,
                    start_sec=round(w.start_sec, 4),
                    end_sec=round(w.end_sec, 4),
                    source_frames=clip.source_frames,
                    top=self._top(probs.mean(dim=0)),
                )
            )
        # Video level: mean softmax over every view (clips x crops), as in multi-view eval.
        video_probs = torch.cat(all_views).mean(dim=0)
        total = time.perf_counter() - pend.started
        return VideoResult(
            path=pend.path,
            model=self.preset.name,
            weights_id=self.weights_id,
            precision=self.precision,
            device=str(self.device),
            info=pend.info,
            sampling=sampling,
            clips=clip_preds,
            top=self._top(video_probs),
            timing={
                "decode_s": round(pend.decode_s, 4),
                "model_s": round(pend.model_s, 4),
                "total_s": round(total, 4),
            },
            decode_stats=pend.decode_stats,
        )
