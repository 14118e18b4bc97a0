"""The worker's pipeline: many videos in flight, decoders in parallel, one model loop
that batches clips across videos.

    submit ─▶ [todo] ─▶ decode xD ─▶ [clips, bounded] ─▶ batch ─▶ predict ─▶ route
    a future          threads: decode,  backpressure       <= batch_size   each clip's
    per video         sample, transform                    views, waits    probabilities
                                                           <= batch_wait   go to its video

- **Decoders are threads.** PyAV releases the GIL while FFmpeg decodes and converts
  frames, and torch while it transforms, so D decoders run in parallel
  (``benchmarks/feed_rate.py`` measures it against one), and a clip reaches the
  model with no copy and no pickling.
- **Backpressure.** The clip queue holds at most ``queue_clips`` prepared clips. A
  slow model blocks the decoders' ``put``; memory does not grow with the jobs in
  flight.
- **One model loop per process.** It takes the first waiting clip, then waits at
  most ``batch_wait_ms`` for more, up to ``batch_size`` views from any videos, runs
  one forward pass and hands each clip's probabilities back to its video. The
  fill and the wait of every batch are counted in ``stats``.
- **Every in-flight video's state is one ``_Video``.** Once decoding starts, only the
  model loop changes it (decoders send messages), so the queues are the only locks.

Callers (a Celery task thread per job, ``vidq run``, ``vidq classify``) ``submit``
a video and wait on its future; claims and commits stay with them (worker/jobs.py).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vidq import metrics
from vidq.errors import InputError, TransientError, VidqError
from vidq.media import open_video
from vidq.sampling import Sampling, plan_windows
from worker.supervisor import cpu_cores
from worker.video import ClipFrames, DecodeStats, VideoInfo, VideoReader

_FINISH = threading.Lock()  # a video can be ended by a decoder, the model loop or close()


class _Closed(Exception):
    """The pipeline is closing: a decoder stops where it is."""


@dataclass(eq=False)
class _Video:
    """One video in flight: everything the pipeline knows about it."""

    path: str
    sampling: Sampling
    future: Future[Any]
    should_stop: Callable[[], VidqError | None]
    submitted: float = field(default_factory=time.perf_counter)
    info: VideoInfo | None = None
    expected: int | None = None
    """Clips the decoder produced; known when it has finished the video."""
    scored: list[tuple[ClipFrames, torch.Tensor, torch.Tensor | None]] = field(
        default_factory=list)
    """Each clip's probabilities per view and, when embeddings are kept, its features."""
    decode_s: float = 0.0
    model_s: float = 0.0
    decode_stats: DecodeStats | None = None
    done: bool = False

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        with _FINISH:
            if self.done:
                return
            self.done = True
        metrics.IN_FLIGHT.dec()
        self.scored = []
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)


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
    """Decoders, a bounded clip queue and one model loop around a loaded classifier.

    ``classifier`` provides ``preset``, ``limits``, ``batch_size``, ``prepare``,
    ``predict`` and ``assemble`` (worker/inference.py's Classifier).
    """

    def __init__(
        self,
        classifier: Any,
        *,
        decode_workers: int = 1,
        batch_wait_ms: float = 5.0,
        queue_clips: int = 0,
        decoder_threads: int = 0,
    ) -> None:
        self.classifier = classifier
        self.batch_size: int = classifier.batch_size
        self.batch_wait_s = max(0.0, batch_wait_ms) / 1000
        self.decode_workers = max(1, decode_workers)
        # FFmpeg's own threads per decoder: the cores shared out among the decoders, so
        # one decoder on a small CPU host still uses every core (as one decode thread
        # did before), and fifteen on a GPU host do not start fifteen threads each.
        # (0 = FFmpeg's own choice, which is every core: right for a lone decoder.)
        share = cpu_cores() // self.decode_workers
        self.decoder_threads = decoder_threads or (0 if self.decode_workers == 1 else
                                                   max(1, share))
        # The bound is on prepared clips waiting for the model (what holds memory):
        # enough for a full batch plus two per decoder. A clip gives its slot back when
        # the model loop takes it into a batch, so at peak a process holds the slots,
        # plus the batch being formed or run, plus one clip per decoder blocked on a
        # slot. The queue also carries small control items (a video's start and end),
        # which take no slot.
        self.clip_slots = queue_clips or self.batch_size + 2 * self.decode_workers
        self._slots = threading.BoundedSemaphore(self.clip_slots)
        self._clips: queue.Queue[Any] = queue.Queue()
        self._todo: queue.Queue[_Video | None] = queue.Queue()
        self._closing = threading.Event()
        # A forward pass on CPU uses the intra-op threads the pipeline's creator chose
        # (a thread's first torch op would otherwise take the value last set by any
        # thread: a decoder's 1). Everything else the model loop does (uploads, the
        # small tensors of each video's result) runs on one: an OpenMP team spins on
        # its cores for a while after every parallel region, and on an accelerator host
        # those cores are the decoders' (measured: 1 s of CPU per 160 one-clip videos).
        self.model_threads = (torch.get_num_threads() if classifier.device.type == "cpu"
                              else 1)
        self.stats = BatchStats()
        self._waiting_views = 0  # clip views in the queue (the queue also holds control items)
        self._views_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._decode_loop, name=f"vidq-decode-{i}", daemon=True)
            for i in range(self.decode_workers)
        ]
        self._threads.append(
            threading.Thread(target=self._model_loop, name="vidq-model", daemon=True))
        for thread in self._threads:
            thread.start()

    # -- the caller's side ---------------------------------------------------------
    def submit(
        self,
        path: str,
        sampling: Sampling,
        *,
        should_stop: Callable[[], VidqError | None] = lambda: None,
    ) -> Future[Any]:
        """Queue a video; its future gives a VideoResult or raises its VidqError.
        ``should_stop`` is polled between clips: an error it returns ends the video."""
        if self._closing.is_set():
            raise RuntimeError("pipeline is closed")
        video = _Video(path=path, sampling=sampling, future=Future(), should_stop=should_stop)
        metrics.IN_FLIGHT.inc()
        self._todo.put(video)
        return video.future

    def close(self, *, wait: bool = True) -> None:
        """Stop the threads; videos still in flight end with a ``shutdown`` error."""
        self._closing.set()
        for _ in range(self.decode_workers):
            self._todo.put(None)
        if wait:
            for thread in self._threads:
                thread.join(timeout=30)
            self._abandon()  # anything a decoder put after the model loop left

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- decode stage --------------------------------------------------------------
    def _put(self, item: tuple[Any, ...]) -> None:
        """Queue an item; a clip first waits for a free slot (backpressure), until the
        pipeline closes."""
        if item[0] == "clip":
            while not self._slots.acquire(timeout=0.2):
                if self._closing.is_set():
                    raise _Closed
        self._clips.put(item)

    def _decode_loop(self) -> None:
        # The transforms of this thread stay on one core; the model keeps its threads.
        # (torch's intra-op setting is per thread under OpenMP.)
        torch.set_num_threads(1)
        while True:
            video = self._todo.get()
            if video is None:
                return
            if self._closing.is_set():
                video.finish(error=_shutdown())
                continue
            try:
                self._decode(video)
            except _Closed:
                video.finish(error=_shutdown())

    def _decode(self, video: _Video) -> None:
        t0 = time.perf_counter()
        classifier = self.classifier
        crops = video.sampling.crops
        try:
            stop = video.should_stop()
            if stop is not None:
                raise stop
            # Opened once, by descriptor, after the path checks (vidq/media.py).
            with open_video(video.path, media_roots=classifier.media_roots,
                            max_file_bytes=classifier.max_file_bytes,
                            storage_config=classifier.storage) as source, \
                    VideoReader(video.path, source=source, limits=classifier.limits,
                                threads=self.decoder_threads,
                                skip_unused_frames=classifier.skip_unused_frames) as reader:
                self._put(("start", video, reader.info))
                windows = plan_windows(video.sampling, reader.info.duration_s,
                                       classifier.preset.clip_duration)
                n = 0
                for clip in reader.clips(windows, num_frames=classifier.preset.num_frames):
                    if self._closing.is_set():
                        raise _Closed
                    stop = video.should_stop()
                    if stop is not None:
                        raise stop
                    prepared = classifier.prepare(clip.frames, crops=crops)
                    clip.frames = clip.frames[:0]  # the RGB frames are no longer needed
                    self._put(("clip", video, clip, prepared))
                    with self._views_lock:
                        self._waiting_views += crops
                    n += 1
                if n == 0:
                    raise InputError(
                        f"{video.path}: no frames inside the requested window(s) "
                        f"(video is {reader.info.duration_s:.2f}s long).",
                        kind="no_frames",
                    )
            self._put(("end", video, n, time.perf_counter() - t0, reader.stats))
        except _Closed:
            raise
        except VidqError as exc:
            self._put(("error", video, exc))
        except Exception as exc:  # a decoder crash fails one video, not the worker
            self._put(("error", video,
                       InputError(f"{video.path}: {exc}", kind="undecodable")))

    # -- batch, predict, route -----------------------------------------------------
    def _get(self, timeout: float) -> tuple[Any, ...] | None:
        try:
            return self._clips.get(timeout=timeout)
        except queue.Empty:
            return None

    def _model_loop(self) -> None:
        torch.set_num_threads(1)
        batch: list[tuple[_Video, ClipFrames, torch.Tensor]] = []
        while not self._closing.is_set():
            item = self._get(0.2)
            if item is None:
                continue
            self._take(item, batch)
            if not batch:
                continue
            first = time.perf_counter()
            with self._views_lock:
                backlog = self._waiting_views + self._views(batch)
            deadline = first + self.batch_wait_s
            while self._views(batch) < self.batch_size:
                item = self._get(max(0.0, deadline - time.perf_counter()))
                if item is None:
                    break
                self._take(item, batch)
            self._run(batch, wait_s=time.perf_counter() - first,
                      backlogged=backlog >= self.batch_size)
            batch.clear()
        self._abandon()

    @staticmethod
    def _views(batch: list[tuple[_Video, ClipFrames, torch.Tensor]]) -> int:
        return sum(video.sampling.crops for video, _, _ in batch)

    def _take(self, item: tuple[Any, ...], batch: list[tuple[_Video, ClipFrames, torch.Tensor]]
              ) -> None:
        kind, video = item[0], item[1]
        if kind == "clip":  # its slot is free again, whatever becomes of the clip
            self._slots.release()
            with self._views_lock:
                self._waiting_views -= video.sampling.crops
        if video.done:
            return
        if kind == "start":
            video.info = item[2]
        elif kind == "clip":
            stop = video.should_stop()
            if stop is not None:
                video.finish(error=stop)
            else:
                batch.append((video, item[2], item[3]))
        elif kind == "end":
            video.expected, video.decode_s, video.decode_stats = item[2], item[3], item[4]
            metrics.DECODE_SECONDS.observe(video.decode_s)
            self._complete_if_scored(video, batch)
        else:
            video.finish(error=item[2])

    def _run(self, batch: list[tuple[_Video, ClipFrames, torch.Tensor]], *, wait_s: float,
             backlogged: bool) -> None:
        batch = [entry for entry in batch if not entry[0].done]
        if not batch:
            return
        views = self._views(batch)
        t = time.perf_counter()
        torch.set_num_threads(self.model_threads)
        try:
            probs, features = self.classifier.predict(
                [p for _, _, p in batch], crops=[v.sampling.crops for v, _, _ in batch])
        except VidqError as exc:
            for video, _, _ in batch:
                video.finish(error=exc)
            return
        except Exception as exc:  # noqa: BLE001  a failed forward fails its videos, not the loop
            error = TransientError(f"model forward failed ({type(exc).__name__}: {exc})",
                                   kind="model_error")
            for video, _, _ in batch:
                video.finish(error=error)
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
        if self.classifier.device.type == "cuda":
            metrics.DEVICE_MEMORY.set(torch.cuda.memory_allocated(self.classifier.device))
        offset = 0
        touched: dict[int, _Video] = {}
        for video, clip, _ in batch:
            n = video.sampling.crops
            video.scored.append((clip, probs[offset : offset + n],
                                 None if features is None else features[offset : offset + n]))
            video.model_s += dt * n / views
            offset += n
            touched[id(video)] = video
        for video in touched.values():
            self._complete_if_scored(video, [])

    def _complete_if_scored(self, video: _Video,
                            batch: list[tuple[_Video, ClipFrames, torch.Tensor]]) -> None:
        if video.done or video.expected is None or len(video.scored) < video.expected:
            return
        if any(v is video for v, _, _ in batch):
            return  # its last clips are in the batch being formed
        assert video.info is not None
        try:
            result = self.classifier.assemble(
                path=video.path, info=video.info, sampling=video.sampling,
                scored=video.scored, decode_s=video.decode_s, model_s=video.model_s,
                started=video.submitted, decode_stats=video.decode_stats,
            )
        except Exception as exc:  # noqa: BLE001
            video.finish(error=InputError(f"{video.path}: {exc}", kind="undecodable"))
            return
        video.finish(result)

    def _abandon(self) -> None:
        """The pipeline is closing: whatever is still queued ends with an error."""
        while True:
            try:
                item = self._clips.get_nowait()
            except queue.Empty:
                break
            if item[0] == "clip":
                self._slots.release()
            item[1].finish(error=_shutdown())


def _shutdown() -> TransientError:
    return TransientError("the worker is shutting down; the job goes back to the queue",
                          kind="shutdown")
