"""Everything the benchmarks use of worker/, in one place: the classifier, its
pipeline, the decoders' bare loop, the Celery task in this process and the
embedded runner. A benchmark holds the objects these functions return and passes
them back here; it never reaches into them.

Two hooks of worker/ make the feed benchmark possible without private state: a
Celery app whose classify task runs on a given pipeline (``worker.tasks.in_process``),
and a pipeline built around any object with the model's interface
(``SimulatedAccelerator``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

Classifier = Any
"""worker.inference.Classifier (kept opaque here: worker/ is imported lazily)."""
Pipeline = Any
Settings = Any


# -- the model -----------------------------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    """A loaded model with the plan a worker process would size its pipeline by, and
    how its decoders open inputs: what a benchmark holds and passes back here."""

    model: Any
    """worker.inference.Classifier, or any object with its interface (the simulation)."""
    plan: Any
    """worker.plan.Plan."""
    inputs: Any
    """worker.decoders.InputPolicy."""


def classifier(*, model: str = "slow_r50", weights: str = "random", device: str = "cpu",
               precision: str = "auto", batch_size: int = 0, decode_workers: int = 0,
               inflight: int = 0, decoders: str = "auto", skip_unused_frames: bool = True,
               **options: Any) -> Loaded:
    """A loaded classifier (vidq's fast path) and its plan; the sizes left at 0 (and
    ``decoders`` at auto) take the worker's defaults. ``options``: the classifier's
    other arguments (int8_calibration, embeddings, ...)."""
    from worker.decoders import InputPolicy
    from worker.inference import Classifier
    from worker.plan import Plan

    clf = Classifier(model=model, weights=weights, device=device, precision=precision,
                     **options)
    plan = Plan.build(on_gpu=clf.device.type == "cuda", batch_size=batch_size,
                      decoder_count=decode_workers, inflight=inflight, decoder_kind=decoders)
    return Loaded(clf, plan, InputPolicy(skip_unused_frames=skip_unused_frames))


@dataclass(frozen=True)
class ModelInfo:
    model: str
    precision: str
    device: str
    batch_size: int
    decode_workers: int
    inflight: int
    num_frames: int
    crop_size: int


def describe(loaded: Loaded) -> ModelInfo:
    clf, plan = loaded.model, loaded.plan
    p = clf.preset
    return ModelInfo(model=p.name, precision=clf.precision, device=str(clf.device),
                     batch_size=plan.batch_size, decode_workers=plan.decoder_count,
                     inflight=plan.inflight, num_frames=p.num_frames, crop_size=p.crop_size)


def random_views(loaded: Loaded, batch: int = 0) -> Any:
    """(batch, 3, T, S, S) random input on the model's device (batch 0: its plan's)."""
    import torch

    p = loaded.model.preset
    return torch.randn(batch or loaded.plan.batch_size, 3, p.num_frames, p.crop_size,
                       p.crop_size, device=loaded.model.device)


def real_views(videos: Sequence[Path], *, model: str, clips: int) -> Iterator[Any]:
    """(1, 3, T, S, S) views of ``clips`` real clips, as ``vidq classify`` prepares them
    (random input can drive random-weight float models into slow denormals)."""
    from worker import quantize
    from worker.models import get_preset

    return quantize.calibration_views(videos, preset=get_preset(model), clips=clips)


def forward(loaded: Loaded, views: Any) -> Any:
    """One forward pass (softmax included): the model floor's unit of work."""
    return loaded.model.forward(views)


def forward_rate(loaded: Loaded, views: Any, *, iters: int = 0,
                 seconds: float = 0.0) -> float:
    """Clips/s of bare forward passes on ``views``: ``iters`` of them, or as many as
    fit in ``seconds`` (at least 3). The output comes back to the CPU: synchronised."""
    n, t0 = 0, time.perf_counter()
    while (n < iters) if iters else (n < 3 or time.perf_counter() - t0 < seconds):
        loaded.model.forward(views)
        n += 1
    return n * views.shape[0] / (time.perf_counter() - t0)


def classify(loaded: Loaded, videos: Sequence[Path], strategy: str = "sliding") -> int:
    """``vidq classify`` in this process (decoders, batching, assembly): the clips
    classified. Exits on a video it could not classify."""
    from vidq.sampling import Sampling
    from worker.pipeline import classify_many

    clips = 0
    for result in classify_many(loaded.model, [str(v) for v in videos],
                                Sampling(strategy=strategy), plan=loaded.plan,
                                inputs=loaded.inputs):
        if not hasattr(result, "clips"):
            raise SystemExit(f"vidq could not classify a video: {result}")
        clips += len(result.clips)
    return clips


def int8_classifier(*, videos: Sequence[Path], calibration: Path, clips: int) -> Loaded:
    """vidq's int8 slow_r50 (random weights), calibrated on ``clips`` clips of
    ``videos`` into ``calibration`` first."""
    from worker import quantize
    from worker.models import fold_batch_norms, get_preset, load_model

    preset = get_preset("slow_r50")
    loaded = load_model(preset, "random")
    fold_batch_norms(loaded.module)
    quantize.save_calibration(quantize.calibrate(
        loaded.module, preset=preset, weights_id=loaded.weights_id,
        views=real_views(videos, model=preset.name, clips=clips)), calibration)
    return classifier(precision="int8", int8_calibration=str(calibration))


# -- decoding alone ------------------------------------------------------------------
@dataclass(frozen=True)
class DecodePass:
    windows: int
    wall_s: float
    cpu_s: float
    decoded_share: float
    """Packets decoded / packets read (what skipping unused frames saves)."""


def decode_windows(path: Path, *, model: str, strategy: str = "sliding", skip: bool = True,
                   threads: int = 0, host: str = "cpu", crops: int = 1,
                   source: Any = None) -> DecodePass:
    """Every window of ``strategy`` decoded (FFmpeg ``threads``, 0: its choice) and made
    into the model's input as a ``host`` decoder does: "cpu" runs the transforms
    (one thread), "gpu" copies the clip's frames into one uint8 buffer for the
    device to transform. ``source``: what FFmpeg reads (default: the path)."""
    from vidq.sampling import Sampling, plan_windows
    from worker.models import get_preset
    from worker.transforms import clip_views
    from worker.video import VideoReader

    preset = get_preset(model)
    slot: np.ndarray | None = None
    n = 0
    t, cpu = time.perf_counter(), time.process_time()
    with VideoReader(path, skip_unused_frames=skip, threads=threads, source=source) as reader:
        windows = plan_windows(Sampling(strategy=strategy), reader.info.duration_s,
                               preset.clip_duration)
        for clip in reader.clips(windows, num_frames=preset.num_frames):
            if host == "cpu":
                clip_views(clip.rgb, preset, crops=crops)
            else:
                shape = (len(clip.rgb), *clip.rgb[0].shape)
                if slot is None or slot.shape != shape:
                    slot = np.empty(shape, np.uint8)
                np.stack(clip.rgb, out=slot)
            n += 1
        stats = reader.stats
    return DecodePass(n, time.perf_counter() - t, time.process_time() - cpu,
                      stats.decoded / max(stats.packets, 1))


def _one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _decode_in_child(path: str, options: dict[str, Any]) -> tuple[int, float]:
    done = decode_windows(Path(path), **options)
    return done.windows, done.cpu_s


class Decoders:
    """``count`` decoders of one ``kind`` ("threads" in this process, or "processes",
    each with one torch thread) that only decode and prepare: the rate the pipeline's
    decoders could feed at most. Processes are started (imports done) before any pass."""

    def __init__(self, count: int, kind: str = "threads") -> None:
        self.count, self.kind = count, kind
        self.pool: ProcessPoolExecutor | None = None
        if kind == "processes":
            self.pool = ProcessPoolExecutor(count, initializer=_one_torch_thread,
                                            mp_context=multiprocessing.get_context("spawn"))
            list(self.pool.map(time.sleep, [0.5] * count))

    def rate(self, videos: Sequence[Path], **options: Any) -> tuple[float, float]:
        """(windows per wall second of all decoders together, CPU seconds per window),
        each video decoded once by whichever decoder is free. ``options``: those of
        ``decode_windows``."""
        t = time.perf_counter()
        if self.pool is not None:
            done = list(self.pool.map(_decode_in_child, [str(v) for v in videos],
                                      [options] * len(videos)))
        else:
            todo, lock, done = list(videos), threading.Lock(), []

            def run() -> None:
                while True:
                    with lock:
                        if not todo:
                            return
                        path = todo.pop()
                    one = decode_windows(path, **options)
                    with lock:
                        done.append((one.windows, one.cpu_s))

            workers = [threading.Thread(target=run) for _ in range(self.count)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        windows = sum(n for n, _ in done)
        return windows / (time.perf_counter() - t), sum(c for _, c in done) / max(windows, 1)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# -- the pipeline ----------------------------------------------------------------------
class SimulatedAccelerator:
    """The classifier's interface around a real classifier (its presets, decoders'
    settings, transforms and assembly), whose ``predict`` sleeps ``batch_s`` per batch
    and uses no CPU, as an accelerator leaves the CPU free."""

    def __init__(self, real: Classifier, batch_s: float) -> None:
        self.real = real
        self.batch_s = batch_s

    def predict(self, prepared: list[Any], *, crops: list[int]) -> tuple[Any, None]:
        import torch

        time.sleep(self.batch_s)
        classes = len(self.real.labels)
        return torch.full((sum(crops), classes), 1.0 / classes), None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def simulated_accelerator(*, batch_ms: float, batch_size: int, decode_workers: int,
                          inflight: int, decoders: str) -> Loaded:
    """slow_r50's real input side; its forward pass a sleep of ``batch_ms`` a batch."""
    real = classifier(model="slow_r50", precision="fp32", batch_size=batch_size,
                      decode_workers=decode_workers, inflight=inflight, decoders=decoders)
    return Loaded(SimulatedAccelerator(real.model, batch_ms / 1000), real.plan, real.inputs)


def pipeline(loaded: Loaded, *, decoder_threads: int = 0) -> Pipeline:
    """A worker's pipeline around the loaded model with its plan's decoders and
    batching; ``decoder_threads``: FFmpeg threads per decoder (0: the plan's)."""
    from dataclasses import replace

    from worker.pipeline import Pipeline

    plan = loaded.plan
    if decoder_threads:
        plan = replace(plan, ffmpeg_threads=decoder_threads)
    return Pipeline(loaded.model, plan, inputs=loaded.inputs)


def batch_stats(pipe: Pipeline) -> dict[str, float]:
    """mean_fill, backlogged_fill, mean_wait_ms of the batches run so far."""
    return dict(pipe.stats.summary(pipe.batch_size))


def process_cpu(pipe: Pipeline) -> float:
    """CPU seconds of this process and of the pipeline's decoder processes."""
    from worker.decoder_process import cpu_seconds

    return time.process_time() + sum(cpu_seconds(pid) for pid in pipe.decoder_pids())


@contextlib.contextmanager
def in_process_app(settings: Settings, pipe: Pipeline) -> Iterator[Any]:
    """A Celery app of ``settings`` whose classify task runs on ``pipe`` in this
    process (claim, classify, commit), for ``start_worker``."""
    from worker.tasks import in_process

    with in_process(settings, pipe) as app:
        yield app


def run_embedded(job_ids: Sequence[int], *, settings: Settings, clf: Loaded) -> int:
    """``vidq run``'s path (SQLite, no broker, sized by ``settings``): the jobs that
    succeeded."""
    from worker.embedded import run_jobs

    outcomes = run_jobs(job_ids, settings=settings, classifier=clf.model)
    return sum(o.status == "succeeded" for o in outcomes)


def cpu_cores() -> int:
    from worker.plan import cpu_cores

    return cpu_cores()


def default_decode_workers() -> int:
    from worker.plan import default_decoder_count

    return default_decoder_count()


def read_frames(name: str, *, source: Any, strategy: str, clips: int, model: str
                ) -> list[np.ndarray]:
    """The stacked frames of every window of ``strategy`` (``clips`` of them where it
    takes a count) of the video ``name``, read from ``source`` (a path or a file
    object)."""
    from vidq.sampling import Sampling, plan_windows
    from worker.models import get_preset
    from worker.video import VideoReader

    preset = get_preset(model)
    with VideoReader(name, source=source) as reader:
        windows = plan_windows(Sampling(strategy=strategy, clips=clips), reader.info.duration_s,
                               preset.clip_duration)
        return [c.frames for c in reader.clips(windows, num_frames=preset.num_frames)]
