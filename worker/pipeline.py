"""The worker's pipeline: many videos in flight, decoders in parallel, one model loop
that batches clips across videos.

    submit ─▶ [todo] ─▶ decode xD ─▶ [clips, bounded] ─▶ batch ─▶ predict ─▶ route
    a future          threads or        backpressure       <= batch_size   each clip's
    per video         processes: decode,                   views, waits    probabilities
                      sample, prepare                      <= batch_wait   go to its video

A pipeline is built from a model (anything with ``prepare``, ``predict`` and
``assemble``: worker/inference.py's Classifier, or a simulated one), a ``Plan``
(worker/plan.py: how many decoders, of which kind, batch size, batch wait, the
clip bound) and an ``InputPolicy`` (worker/decoders.py: how inputs are opened).

- **Decoders are threads or processes** (``VIDQ_DECODERS``). PyAV releases the GIL
  while FFmpeg decodes and converts frames, and torch while it transforms, so D
  decoder threads run in parallel and a clip reaches the model with no copy. But each
  takes the GIL back for every packet and frame, and shares it with the Celery
  consumer, the job threads and this model loop: with several decoders, processes
  (worker/decoder_process.py; clips in shared memory, still no copy) keep them apart.
- **Backpressure.** The clip queue holds at most ``plan.clip_slots`` prepared clips.
  A slow model blocks the decoders' ``put``; memory does not grow with the jobs in
  flight.
- **One model loop per process.** It takes the first waiting clip, then waits at
  most ``batch_wait_ms`` for more, up to ``batch_size`` views from any videos, runs
  one forward pass and hands each clip's probabilities back to its video. The
  fill and the wait of every batch are counted in ``stats``.
- **Every in-flight video's state is one ``InFlight``** (worker/messages.py). Once
  decoding starts, only the model loop changes it (decoders send messages), so the
  queues are the only locks.

Callers (a Celery task thread per job, ``vidq run``, ``vidq classify``) ``submit``
a video and wait on its future; claims and commits stay with them (worker/jobs.py).
``classify`` and ``classify_many`` do the same for files, from Python.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from vidq import metrics
from vidq.errors import TransientError, VidqError
from vidq.sampling import Sampling
from vidq.settings import Settings
from worker.decoder_process import DecoderProcess, ProcessFeed
from worker.decoders import DecodeConfig, InputPolicy, decode_video, video_error
from worker.messages import (
    ClipReady,
    Closed,
    InFlight,
    Message,
    ScoredClip,
    VideoDecoded,
    VideoFailed,
    VideoStarted,
    shutdown_error,
)
from worker.models import ModelPreset
from worker.plan import Plan
from worker.results import DecodeStats, VideoInfo, VideoResult
from worker.watchdog import DecoderThreadState, Progress, Watchdog

log = logging.getLogger(__name__)


class Model(Protocol):
    """What a pipeline needs of its model (worker/inference.py's Classifier)."""

    @property
    def preset(self) -> ModelPreset: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def takes_frames(self) -> bool:
        """``prepare`` hands over uint8 frames rather than views (an accelerator)."""
        ...

    def prepare(self, frames: np.ndarray | Sequence[np.ndarray], *, crops: int
                ) -> torch.Tensor: ...

    def predict(self, prepared: list[torch.Tensor], *, crops: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def assemble(self, *, path: str, info: VideoInfo, sampling: Sampling,
                 scored: list[ScoredClip], decode_s: float, model_s: float,
                 started: float, decode_stats: DecodeStats | None = None) -> VideoResult: ...


def default_plan(model: Model) -> Plan:
    """The plan of a process that holds only this model, from no settings."""
    return Plan.build(on_gpu=model.device.type == "cuda")


@dataclass
class BatchStats:
    """What the model loop did: for the benchmarks and the metrics."""

    batches: int = 0
    views: int = 0
    wait_s: float = 0.0
    """Time from a batch's first clip to its forward pass (waiting for a fuller batch)."""
    model_s: float = 0.0
    backlogged_batches: int = 0
    """Batches formed while at least ``batch_size`` views were already waiting."""
    backlogged_views: int = 0

    def summary(self, batch_size: int) -> dict[str, float]:
        return {
            "batches": self.batches,
            "views": self.views,
            "mean_fill": self.views / max(1, self.batches) / batch_size,
            "backlogged_fill": self.backlogged_views / max(1, self.backlogged_batches)
            / batch_size if self.backlogged_batches else float("nan"),
            "mean_wait_ms": 1000 * self.wait_s / max(1, self.batches),
            "model_s": self.model_s,
        }


class Pipeline:
    """Decoders, a bounded clip queue and one model loop around a loaded model."""

    def __init__(self, model: Model, plan: Plan, *,
                 inputs: InputPolicy | None = None, stall_s: float = 0.0) -> None:
        """``stall_s``: the decoder watchdog (worker/watchdog.py; 0 = none)."""
        self.model = model
        self.stall_s = stall_s
        self.plan = plan
        self.batch_size = plan.batch_size
        self.batch_wait_s = plan.batch_wait_ms / 1000
        self._slots = threading.BoundedSemaphore(plan.clip_slots)
        self._clips: queue.Queue[Message] = queue.Queue()
        self._todo: queue.Queue[InFlight | None] = queue.Queue()
        self._closing = threading.Event()
        # A forward pass on CPU uses the intra-op threads the pipeline's creator chose
        # (a thread's first torch op would otherwise take the value last set by any
        # thread: a decoder's 1). Everything else the model loop does (uploads, the
        # small tensors of each video's result) runs on one: an OpenMP team spins on
        # its cores for a while after every parallel region, and on an accelerator host
        # those cores are the decoders' (measured: 1 s of CPU per 160 one-clip videos).
        self.model_threads = torch.get_num_threads() if model.device.type == "cpu" else 1
        self.stats = BatchStats()
        self._waiting_views = 0  # clip views in the queue (it also holds other messages)
        self._views_lock = threading.Lock()
        self._config = DecodeConfig(preset=model.preset, inputs=inputs or InputPolicy(),
                                    ffmpeg_threads=plan.ffmpeg_threads,
                                    frames_only=model.takes_frames)
        self._procs = [
            DecoderProcess(self._config, plan.process_slots, f"vidq-decoder-{i}")
            if plan.decoder_kind == "processes" else None
            for i in range(plan.decoder_count)
        ]
        for proc in self._procs:  # all start at once, then each is waited for
            if proc is not None:
                proc.launch()
        for proc in self._procs:
            if proc is not None:
                proc.wait_ready()
        self._decoders = [DecoderThreadState(i) for i in range(plan.decoder_count)]
        self._decoding = threading.local()
        """A decoder's pipeline thread: ``progress``, what the watchdog reads."""
        self._threads = [
            threading.Thread(target=self._decode_loop, args=(proc, self._decoders[i]),
                             name=f"vidq-decode-{i}", daemon=True)
            for i, proc in enumerate(self._procs)
        ]
        self._threads.append(
            threading.Thread(target=self._model_loop, name="vidq-model", daemon=True))
        for thread in self._threads:
            thread.start()
        self._abandoned: list[threading.Thread] = []
        self.watchdog: Watchdog | None = None
        if stall_s > 0:
            processes = [proc for proc in self._procs if proc is not None]
            self.watchdog = Watchdog(stall_s=stall_s,
                                     decoders=[] if processes else self._decoders,
                                     processes=processes, replace=self._replace_decoder,
                                     closing=self._closing)

    @classmethod
    def from_settings(cls, model: Model, settings: Settings) -> Pipeline:
        """A pipeline sized and opening inputs as ``settings`` say."""
        plan = Plan.from_settings(settings, on_gpu=model.device.type == "cuda")
        return cls(model, plan, inputs=InputPolicy.from_settings(settings),
                   stall_s=settings.decode_stall_s)

    # -- the caller's side ---------------------------------------------------------
    def submit(
        self,
        path: str,
        sampling: Sampling,
        *,
        should_stop: Callable[[], VidqError | None] = lambda: None,
    ) -> Future[VideoResult]:
        """Queue a video; its future gives a VideoResult or raises its VidqError.
        ``should_stop`` is polled between clips: an error it returns ends the video."""
        if self._closing.is_set():
            raise RuntimeError("pipeline is closed")
        video = InFlight(path=path, sampling=sampling, future=Future(),
                         should_stop=should_stop)
        metrics.IN_FLIGHT.inc()
        self._todo.put(video)
        return video.future

    def classify_many(self, paths: Iterable[str | Path], sampling: Sampling | None = None
                      ) -> Iterator[VideoResult | VidqError]:
        """Classify videos, ``plan.inflight`` at a time; yield a VideoResult or the
        error for each, in input order (``sampling``: the default ``Sampling()``)."""
        sampling = sampling or Sampling()
        window: deque[Future[VideoResult]] = deque()
        for p in paths:
            window.append(self.submit(str(p), sampling))
            if len(window) >= self.plan.inflight:
                yield _outcome(window.popleft())
        while window:
            yield _outcome(window.popleft())

    def classify(self, path: str | Path, sampling: Sampling | None = None) -> VideoResult:
        """One video; raises the InputError of a bad one."""
        return self.submit(str(path), sampling or Sampling()).result()

    def close(self, *, wait: bool = True) -> None:
        """Stop the threads; videos still in flight end with a ``shutdown`` error."""
        self._closing.set()
        for proc in self._procs:  # a video in a decoder process ends like one in a thread
            if proc is not None:
                proc.kill()
        for _ in range(self.plan.decoder_count):
            self._todo.put(None)
        if wait:
            for thread in self._threads:
                thread.join(timeout=30)
            for thread in self._abandoned:
                thread.join(timeout=0.1)
            self._abandon()  # anything a decoder put after the model loop left

    def decoder_pids(self) -> list[int]:
        """The decoder processes' pids (none with decoder threads)."""
        return [pid for proc in self._procs if proc is not None and (pid := proc.pid)]

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- decode stage --------------------------------------------------------------
    def _put(self, message: Message) -> None:
        """Queue a message; a clip first waits for a free slot (backpressure), until
        the pipeline closes. A decoder waiting so is not stalled (its ``progress``)."""
        if isinstance(message, ClipReady):
            progress: Progress | None = getattr(self._decoding, "progress", None)
            while not self._slots.acquire(timeout=0.2):
                if progress is not None:
                    progress.touch()
                if self._closing.is_set():
                    if message.release is not None:
                        message.release()
                    raise Closed
            with self._views_lock:
                self._waiting_views += message.video.sampling.crops
        self._clips.put(message)

    def _decode_loop(self, proc: DecoderProcess | None, state: DecoderThreadState) -> None:
        # The transforms of this thread stay on one core; the model keeps its threads.
        # (torch's intra-op setting is per thread under OpenMP.)
        torch.set_num_threads(1)
        try:
            if proc is not None:
                # A pipeline thread held back by the model is not a stalled decoder.
                self._decoding.progress = proc.progress
                ProcessFeed(proc, todo=self._todo, put=self._put, closing=self._closing,
                            stall_s=self.stall_s).run()
                return
            self._decoding.progress = state.progress
            while not state.abandoned.is_set():
                video = self._todo.get()
                if video is None:
                    return
                if self._closing.is_set():
                    video.finish(error=shutdown_error())
                    continue
                state.video = video
                state.progress.touch()
                try:
                    self._decode(video, state)
                except Closed:
                    video.finish(error=shutdown_error())
                except Exception as exc:  # a bug here must not stop decoding
                    log.exception("decoder %s failed on %s", threading.current_thread().name,
                                  video.path)
                    video.finish(error=video_error(exc, video.path))
                finally:
                    state.video = None
        finally:
            if proc is not None:
                proc.stop()

    def _replace_decoder(self, index: int) -> None:
        """The watchdog abandoned decoder thread ``index``: another takes its place."""
        if self._closing.is_set():
            return
        old = self._threads[index]
        state = self._decoders[index] = DecoderThreadState(index)
        thread = threading.Thread(target=self._decode_loop, args=(None, state),
                                  name=f"vidq-decode-{index}", daemon=True)
        self._threads[index] = thread
        self._abandoned.append(old)  # not waited for at close: it may never return
        thread.start()

    def _decode(self, video: InFlight, state: DecoderThreadState) -> None:
        """Decode a video in this thread."""
        crops = video.sampling.crops
        progress = state.progress

        def check() -> None:
            progress.touch()
            if self._closing.is_set() or state.abandoned.is_set():
                raise Closed
            stop = video.should_stop()
            if stop is not None:
                raise stop

        try:
            done = decode_video(
                video.path, video.sampling, self._config,
                prepare=lambda clip: self.model.prepare(clip.rgb, crops=crops),
                started=lambda info: self._put(VideoStarted(video, info)),
                clip_ready=lambda clip, prepared: self._put(ClipReady(video, clip, prepared)),
                check=check)
        except Closed:
            raise
        except Exception as exc:  # a bad input (or a decoder crash) fails this video only
            self._put(VideoFailed(video, video_error(exc, video.path)))
            return
        self._put(VideoDecoded(video, done.clips, done.decode_s, done.stats))

    # -- batch, predict, route -----------------------------------------------------
    def _get(self, timeout: float) -> Message | None:
        try:
            return self._clips.get(timeout=timeout)
        except queue.Empty:
            return None

    def _model_loop(self) -> None:
        torch.set_num_threads(1)
        batch: list[ClipReady] = []
        while not self._closing.is_set():
            message = self._get(0.2)
            if message is None:
                continue
            self._take(message, batch)
            if not batch:
                continue
            first = time.perf_counter()
            with self._views_lock:
                backlog = self._waiting_views + _views(batch)
            deadline = first + self.batch_wait_s
            while _views(batch) < self.batch_size:
                message = self._get(max(0.0, deadline - time.perf_counter()))
                if message is None:
                    break
                self._take(message, batch)
            try:
                self._run(batch, wait_s=time.perf_counter() - first,
                          backlogged=backlog >= self.batch_size)
            finally:
                for clip in batch:  # a decoder process may write its slot again
                    if clip.release is not None:
                        clip.release()
                batch.clear()
        self._abandon()

    def _take(self, message: Message, batch: list[ClipReady]) -> None:
        video = message.video
        if isinstance(message, ClipReady):  # its slot is free again, whatever becomes of it
            self._slots.release()
            with self._views_lock:
                self._waiting_views -= video.sampling.crops
            stop = None if video.done else video.should_stop()
            if video.done or stop is not None:
                if message.release is not None:  # nor will it be read: its process may write it
                    message.release()
                video.finish(error=stop)  # (no-op if done)
            else:
                batch.append(message)
            return
        if video.done:
            return
        if isinstance(message, VideoStarted):
            video.info = message.info
        elif isinstance(message, VideoDecoded):
            video.expected, video.decode_s = message.clips, message.decode_s
            video.decode_stats = message.stats
            metrics.DECODE_SECONDS.observe(video.decode_s)
            self._complete_if_scored(video, batch)
        else:
            video.finish(error=message.error)

    def _run(self, batch: list[ClipReady], *, wait_s: float, backlogged: bool) -> None:
        batch = [clip for clip in batch if not clip.video.done]
        if not batch:
            return
        views = _views(batch)
        t = time.perf_counter()
        torch.set_num_threads(self.model_threads)
        try:
            probs, features = self.model.predict(
                [clip.prepared for clip in batch],
                crops=[clip.video.sampling.crops for clip in batch])
        except VidqError as exc:
            for clip in batch:
                clip.video.finish(error=exc)
            return
        except Exception as exc:  # noqa: BLE001  a failed forward fails its videos, not the loop
            error = TransientError(f"model forward failed ({type(exc).__name__}: {exc})",
                                   kind="model_error")
            for clip in batch:
                clip.video.finish(error=error)
            return
        finally:
            torch.set_num_threads(1)
        dt = time.perf_counter() - t
        s = self.stats
        s.batches += 1
        s.views += views
        s.wait_s += wait_s
        s.model_s += dt
        if backlogged:
            s.backlogged_batches += 1
            s.backlogged_views += views
        metrics.MODEL_SECONDS.observe(dt)
        metrics.BATCH_FILL.observe(views / self.batch_size)
        if self.model.device.type == "cuda":
            metrics.DEVICE_MEMORY.set(torch.cuda.memory_allocated(self.model.device))
        offset = 0
        touched: dict[int, InFlight] = {}
        for clip in batch:
            video, n = clip.video, clip.video.sampling.crops
            video.scored.append(ScoredClip(
                clip.clip, probs[offset : offset + n],
                None if features is None else features[offset : offset + n]))
            video.model_s += dt * n / views
            offset += n
            touched[id(video)] = video
        for video in touched.values():
            self._complete_if_scored(video, [])

    def _complete_if_scored(self, video: InFlight, batch: list[ClipReady]) -> None:
        if video.done or video.expected is None or len(video.scored) < video.expected:
            return
        if any(clip.video is video for clip in batch):
            return  # its last clips are in the batch being formed
        assert video.info is not None, "a video's clips come after its start"
        try:
            result = self.model.assemble(
                path=video.path, info=video.info, sampling=video.sampling,
                scored=video.scored, decode_s=video.decode_s, model_s=video.model_s,
                started=video.submitted, decode_stats=video.decode_stats,
            )
        except Exception as exc:  # noqa: BLE001  a bug in assembling fails this video only
            video.finish(error=video_error(exc, video.path))
            return
        video.finish(result)

    def _abandon(self) -> None:
        """The pipeline is closing: whatever is still queued ends with an error."""
        while True:
            try:
                message = self._clips.get_nowait()
            except queue.Empty:
                break
            if isinstance(message, ClipReady):
                self._slots.release()
                if message.release is not None:
                    message.release()
            message.video.finish(error=shutdown_error())


def _views(batch: list[ClipReady]) -> int:
    return sum(clip.video.sampling.crops for clip in batch)


def _outcome(future: Future[VideoResult]) -> VideoResult | VidqError:
    try:
        return future.result()
    except VidqError as exc:
        return exc


# -- from Python: files in, results out ------------------------------------------------
def classify_many(
    model: Model, paths: Iterable[str | Path], sampling: Sampling | None = None, *,
    plan: Plan | None = None, inputs: InputPolicy | None = None,
) -> Iterator[VideoResult | VidqError]:
    """Classify videos through a pipeline of their own (``plan``: by default one
    decoder per core but one, sized for ``model``'s device); yield a VideoResult or
    the error of each, in input order."""
    with Pipeline(model, plan or default_plan(model), inputs=inputs) as pipeline:
        yield from pipeline.classify_many(paths, sampling)


def classify(model: Model, path: str | Path, sampling: Sampling | None = None, *,
             plan: Plan | None = None, inputs: InputPolicy | None = None) -> VideoResult:
    """One video; raises the InputError of a bad one."""
    (result,) = list(classify_many(model, [path], sampling, plan=plan, inputs=inputs))
    if isinstance(result, VidqError):
        raise result
    return result
