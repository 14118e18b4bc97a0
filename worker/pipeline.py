"""The worker's pipeline: many videos in flight, decoders in parallel, one model loop
that batches clips across videos.

    submit ─▶ [todo] ─▶ decode xD ─▶ [clips, bounded] ─▶ batch ─▶ predict ─▶ route
    a future          threads or        backpressure       <= batch_size   each clip's
    per video         processes: decode,                   views, waits    probabilities
                      sample, transform                    <= batch_wait   go to its video

- **Decoders are threads or processes** (``VIDQ_DECODERS``). PyAV releases the GIL
  while FFmpeg decodes and converts frames, and torch while it transforms, so D
  decoder threads run in parallel and a clip reaches the model with no copy. But each
  takes the GIL back for every packet and frame, and shares it with the Celery
  consumer, the job threads and this model loop: with several decoders, processes
  (worker/decoders.py; clips in shared memory, still no copy) keep them apart.
  ``benchmarks/feed_rate.py`` measures both against bare decoders.
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

import logging
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vidq import metrics
from vidq.errors import InputError, TransientError, VidqError
from vidq.sampling import Sampling
from vidq.settings import DECODER_KINDS, decoder_kind
from worker.decoders import (
    DecodeConfig,
    DecoderDied,
    DecoderProcess,
    decode_video,
    rebuild_error,
    video_error,
)
from worker.supervisor import cpu_cores
from worker.video import ClipFrames, DecodeStats, VideoInfo

log = logging.getLogger(__name__)

_FINISH = threading.Lock()  # a video can be ended by a decoder, the model loop or close()

_Entry = tuple["_Video", ClipFrames, torch.Tensor, Callable[[], None] | None]
"""A clip in a batch: its video, its window, its model input, and what frees its slot
in a decoder process (None for a decoder thread)."""


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
        decoders: str = "auto",
    ) -> None:
        if decoders not in DECODER_KINDS:
            raise ValueError(f"decoders must be one of {DECODER_KINDS}, not {decoders!r}")
        self.classifier = classifier
        self.batch_size: int = classifier.batch_size
        self.batch_wait_s = max(0.0, batch_wait_ms) / 1000
        self.decode_workers = max(1, decode_workers)
        self.decoders = decoder_kind(decoders, self.decode_workers)
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
        self._config = DecodeConfig.of(classifier, self.decoder_threads)
        # A decoder process writes clips into slots of its own, and a slot is free again
        # only once the batch that read it has run: the slots hold the queue's clips and
        # the running batch's (as the memory of threads' clips does). With slots for
        # the queue alone, a slow model's next batch held only what fitted beside the
        # running one (62% full against threads' 83%, 1.5 s batches of 16).
        self.process_slots = max(3, math.ceil((self.clip_slots + self.batch_size)
                                              / self.decode_workers) + 1)
        self._procs = [
            DecoderProcess(self._config, self.process_slots, f"vidq-decoder-{i}")
            if self.decoders == "processes" else None for i in range(self.decode_workers)
        ]
        for proc in self._procs:  # all start at once, then each is waited for
            if proc is not None:
                proc.launch()
        for proc in self._procs:
            if proc is not None:
                proc.wait_ready()
        self._threads = [
            threading.Thread(target=self._decode_loop, args=(proc,), name=f"vidq-decode-{i}",
                             daemon=True)
            for i, proc in enumerate(self._procs)
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
        for proc in self._procs:  # a video in a decoder process ends like one in a thread
            if proc is not None:
                proc.kill()
        for _ in range(self.decode_workers):
            self._todo.put(None)
        if wait:
            for thread in self._threads:
                thread.join(timeout=30)
            self._abandon()  # anything a decoder put after the model loop left

    def decoder_pids(self) -> list[int]:
        """The decoder processes' pids (none with decoder threads)."""
        return [pid for proc in self._procs if proc is not None and (pid := proc.pid)]

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

    def _decode_loop(self, proc: DecoderProcess | None) -> None:
        # The transforms of this thread stay on one core; the model keeps its threads.
        # (torch's intra-op setting is per thread under OpenMP.)
        torch.set_num_threads(1)
        try:
            if proc is not None:
                self._feed_process(proc)
                return
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
                except Exception as exc:  # a bug here must not stop decoding
                    log.exception("decoder %s failed on %s", threading.current_thread().name,
                                  video.path)
                    video.finish(error=video_error(exc, video.path))
        finally:
            if proc is not None:
                proc.stop()

    def _decode(self, video: _Video) -> None:
        """Decode a video in this thread."""
        crops = video.sampling.crops

        def check() -> None:
            if self._closing.is_set():
                raise _Closed
            stop = video.should_stop()
            if stop is not None:
                raise stop

        def emit(kind: str, *payload: Any) -> None:
            if kind == "clip":
                clip, prepared = payload
                self._put_clip(video, clip, prepared, None)
            else:
                self._put((kind, video, *payload))

        try:
            decode_video(video.path, video.sampling, self._config,
                         prepare=lambda clip: self.classifier.prepare(clip.rgb, crops=crops),
                         emit=emit, check=check)
        except _Closed:
            raise
        except Exception as exc:  # a bad input (or a decoder crash) fails this video only
            self._put(("error", video, video_error(exc, video.path)))

    def _put_clip(self, video: _Video, clip: ClipFrames, prepared: torch.Tensor,
                  release: Callable[[], None] | None) -> None:
        try:
            self._put(("clip", video, clip, prepared, release))
        except _Closed:
            if release is not None:
                release()
            raise
        with self._views_lock:
            self._waiting_views += video.sampling.crops

    def _feed_process(self, proc: DecoderProcess) -> None:
        """Drive this thread's decoder process: videos from the queue go to it, up to
        ``SENT_AHEAD`` at a time, so that it starts the next one without waiting for
        this thread (which shares the GIL with the whole worker); its messages become
        the queue items a decoder thread would put."""
        sent: dict[int, _Sent] = {}  # by sequence number, in the order sent
        more = True  # until the queue's end marker
        while more or sent:
            try:
                while more and len(sent) < SENT_AHEAD:
                    try:
                        video = self._todo.get(block=not sent)
                    except queue.Empty:
                        break
                    if video is None:
                        more = False
                    elif self._closing.is_set():
                        video.finish(error=_shutdown())
                    elif (stop := video.should_stop()) is not None:
                        self._put(("error", video, stop))
                    else:
                        try:
                            proc.send(("video", proc.seq + 1, video.path, video.sampling))
                        except OSError:
                            self._todo.put(video)  # it never reached the process
                            raise
                        proc.seq += 1
                        sent[proc.seq] = _Sent(video)
                if sent:
                    self._route(proc, sent, proc.recv())
            except (DecoderDied, OSError) as exc:
                self._decoder_died(proc, sent, exc)
            except _Closed:
                for entry in sent.values():
                    entry.video.finish(error=_shutdown())
                sent.clear()
            except Exception as exc:  # a bug here must not stop decoding
                log.exception("decoder %s failed", proc.name)
                for entry in sent.values():
                    entry.video.finish(error=video_error(exc, entry.video.path))
                sent.clear()
                self._restart(proc)

    def _route(self, proc: DecoderProcess, sent: dict[int, _Sent],
               message: tuple[Any, ...]) -> None:
        kind, seq = message[0], message[1]
        entry = sent.get(seq)
        if entry is None:
            return
        video = entry.video
        if kind == "clip":
            _, _, clip, tensor, k = message
            generation = proc.generation
            if not entry.ended:
                stop = None if video.done else (
                    video.should_stop() or (_shutdown() if self._closing.is_set() else None))
                if video.done or stop is not None:  # the rest of the video is dropped
                    entry.ended = True
                    proc.cancel(seq)
                    if stop is not None:
                        self._put(("error", video, stop))
            if entry.ended:
                proc.release(k, generation)
                return
            if self._config.frames_only:
                # uint8 frames for the accelerator: into pinned memory here (the copy a
                # decoder thread makes too), so the model loop's upload does not block;
                # the slot is free at once.
                tensor = tensor.pin_memory()
                proc.release(k, generation)
                self._put_clip(video, clip, tensor, None)
                return
            self._put_clip(video, clip, tensor, lambda: proc.release(k, generation))
        elif kind in ("end", "error"):
            del sent[seq]
            if not entry.ended:
                self._put(("end", video, *message[2:]) if kind == "end" else
                          ("error", video, rebuild_error(*message[2:])))
        elif not entry.ended:  # "start"
            self._put((kind, video, *message[2:]))

    def _decoder_died(self, proc: DecoderProcess, sent: dict[int, _Sent],
                      exc: BaseException) -> None:
        """The video in its hands fails; those sent after it go back to the queue."""
        entries = list(sent.values())
        sent.clear()
        if self._closing.is_set():
            proc.stop(wait=0)
            for entry in entries:
                entry.video.finish(error=_shutdown())
            return
        reason = exc if isinstance(exc, DecoderDied) else DecoderDied(proc.exit_reason())
        self._restart(proc)
        if entries and not entries[0].ended:  # it decodes in order: the first is the one
            self._put(("error", entries[0].video, InputError(
                f"{entries[0].video.path}: the decoder process died ({reason}).",
                kind="undecodable")))
        for entry in entries[1:]:
            if not entry.ended:
                self._todo.put(entry.video)

    @staticmethod
    def _restart(proc: DecoderProcess) -> None:
        proc.stop(wait=0)
        try:
            proc.start()
        except Exception:  # the next video sent finds it dead and tries again
            log.exception("decoder process %s did not restart", proc.name)

    # -- batch, predict, route -----------------------------------------------------
    def _get(self, timeout: float) -> tuple[Any, ...] | None:
        try:
            return self._clips.get(timeout=timeout)
        except queue.Empty:
            return None

    def _model_loop(self) -> None:
        torch.set_num_threads(1)
        batch: list[_Entry] = []
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
            try:
                self._run(batch, wait_s=time.perf_counter() - first,
                          backlogged=backlog >= self.batch_size)
            finally:
                for entry in batch:  # a decoder process may write its slot again
                    if entry[3] is not None:
                        entry[3]()
                batch.clear()
        self._abandon()

    @staticmethod
    def _views(batch: list[_Entry]) -> int:
        return sum(entry[0].sampling.crops for entry in batch)

    def _take(self, item: tuple[Any, ...], batch: list[_Entry]) -> None:
        kind, video = item[0], item[1]
        if kind == "clip":  # its slot is free again, whatever becomes of the clip
            self._slots.release()
            with self._views_lock:
                self._waiting_views -= video.sampling.crops
            stop = None if video.done else video.should_stop()
            if video.done or stop is not None:
                if item[4] is not None:  # nor will it be read: its process may write it
                    item[4]()
                video.finish(error=stop)  # (no-op if done)
            else:
                batch.append((video, item[2], item[3], item[4]))
            return
        if video.done:
            return
        if kind == "start":
            video.info = item[2]
        elif kind == "end":
            video.expected, video.decode_s, video.decode_stats = item[2], item[3], item[4]
            metrics.DECODE_SECONDS.observe(video.decode_s)
            self._complete_if_scored(video, batch)
        else:
            video.finish(error=item[2])

    def _run(self, batch: list[_Entry], *, wait_s: float, backlogged: bool) -> None:
        batch = [entry for entry in batch if not entry[0].done]
        if not batch:
            return
        views = self._views(batch)
        t = time.perf_counter()
        torch.set_num_threads(self.model_threads)
        try:
            probs, features = self.classifier.predict(
                [entry[2] for entry in batch], crops=[entry[0].sampling.crops for entry in batch])
        except VidqError as exc:
            for entry in batch:
                entry[0].finish(error=exc)
            return
        except Exception as exc:  # noqa: BLE001  a failed forward fails its videos, not the loop
            error = TransientError(f"model forward failed ({type(exc).__name__}: {exc})",
                                   kind="model_error")
            for entry in batch:
                entry[0].finish(error=error)
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
        for video, clip, _, _ in batch:
            n = video.sampling.crops
            video.scored.append((clip, probs[offset : offset + n],
                                 None if features is None else features[offset : offset + n]))
            video.model_s += dt * n / views
            offset += n
            touched[id(video)] = video
        for video in touched.values():
            self._complete_if_scored(video, [])

    def _complete_if_scored(self, video: _Video, batch: list[_Entry]) -> None:
        if video.done or video.expected is None or len(video.scored) < video.expected:
            return
        if any(entry[0] is video for entry in batch):
            return  # its last clips are in the batch being formed
        assert video.info is not None
        try:
            result = self.classifier.assemble(
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
                item = self._clips.get_nowait()
            except queue.Empty:
                break
            if item[0] == "clip":
                self._slots.release()
                if item[4] is not None:
                    item[4]()
            item[1].finish(error=_shutdown())


SENT_AHEAD = 2
"""Videos a decoder process holds at once: the one it decodes and the next."""


@dataclass(eq=False)
class _Sent:
    """A video sent to a decoder process."""

    video: _Video
    ended: bool = False
    """Its outcome is decided (a stop, a cancel): its remaining messages are dropped."""


def _shutdown() -> TransientError:
    return TransientError("the worker is shutting down; the job goes back to the queue",
                          kind="shutdown")
