"""Decoding one video, in a pipeline thread or in a decoder process of its own.

``decode_video`` is the decode stage: open, plan the windows, decode, sample and
transform each clip, reporting through callbacks. A pipeline runs it in its decoder
threads (``VIDQ_DECODERS=threads``) or in one child process per decoder
(``VIDQ_DECODERS=processes``), where each decoder has an interpreter, and a GIL, of
its own. Decoder threads spend their time inside FFmpeg and torch with the GIL
released, but take it back a hundred or more times per video (every packet and frame
passes through Python), and in a worker they share it with the Celery consumer,
the job threads and the model loop. Measured (``benchmarks/feed_rate.py``, one-clip
videos, 2 decoders, simulated accelerator): threads 76% of bare decoding, processes
86%.

A decoder process and its pipeline thread talk over one pipe::

    pipeline thread "vidq-decode-i"                 decoder process
      ("video", seq, path, sampling)        ───▶     open, plan, decode, transform
      (the next one sent ahead: it starts
      it without waiting for this thread)
                                            ◀───     ("start", seq, info)
                                            ◀───     ("slot", k, bytes) + its descriptor
      slot k as a tensor, no copy           ◀───     ("clip", seq, clip, k, shape, dtype)
      (the model loop, once its batch ran)  ───▶     ("free", k)
                                            ◀───     ("end", seq, n, seconds, stats)
                                                     or ("error", seq, class, message, kind)
      ("cancel", seq)                       ───▶     stops between clips

A clip crosses in a **slot**: shared memory (a memfd, mapped by both sides; its
descriptor crosses once, when the child creates or grows the slot), written by the
transform in place and read by the model loop in place (for an accelerator: uint8
frames, copied into pinned memory by the pipeline thread as a decoder thread copies
them, and the slot is free at once). A decoder has a fixed number
of slots and waits for a free one before it transforms the next clip, so a slow model
slows the decoders down (backpressure) and memory is bounded: slots x the largest clip.
Nothing has a name on a filesystem, so a SIGKILL leaves nothing behind; a decoder dies
with its worker (it watches its parent, and sees end-of-file on the pipe).
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from math import prod
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from vidq import errors
from vidq.errors import InputError, VidqError
from vidq.media import open_video
from vidq.sampling import Sampling, plan_windows
from vidq.storage import StorageConfig
from worker.models import ModelPreset
from worker.transforms import clip_views
from worker.video import ClipFrames, Limits, VideoReader


@dataclass(frozen=True)
class DecodeConfig:
    """What a decoder needs of its classifier: picklable, for a decoder process."""

    preset: ModelPreset
    limits: Limits = field(default_factory=Limits)
    media_roots: tuple[str, ...] = ()
    max_file_bytes: int = 0
    storage: StorageConfig = field(default_factory=StorageConfig)
    skip_unused_frames: bool = True
    threads: int = 0
    """FFmpeg's threads for one video (0 = FFmpeg's choice)."""
    frames_only: bool = False
    """Hand over the uint8 frames (an accelerator transforms them), not the views."""

    @classmethod
    def of(cls, classifier: Any, threads: int) -> DecodeConfig:
        return cls(preset=classifier.preset, limits=classifier.limits,
                   media_roots=classifier.media_roots,
                   max_file_bytes=classifier.max_file_bytes, storage=classifier.storage,
                   skip_unused_frames=classifier.skip_unused_frames, threads=threads,
                   frames_only=classifier.device.type != "cpu")


def decode_video(
    path: str,
    sampling: Sampling,
    config: DecodeConfig,
    *,
    prepare: Callable[[ClipFrames], Any],
    emit: Callable[..., None],
    check: Callable[[], None],
) -> None:
    """Decode one video: ``emit("start", info)``, ``emit("clip", clip, prepared)`` for
    each window (``prepare`` makes the model's input of a clip), ``emit("end", clips,
    seconds, stats)``. ``check`` runs before the file is opened and between clips, and
    raises to stop. A bad input raises its VidqError; anything else is a decoder bug
    and raises as it is."""
    t0 = time.perf_counter()
    check()
    # Opened once, by descriptor, after the path checks (vidq/media.py).
    with open_video(path, media_roots=config.media_roots,
                    max_file_bytes=config.max_file_bytes,
                    storage_config=config.storage) as source, \
            VideoReader(path, source=source, limits=config.limits, threads=config.threads,
                        skip_unused_frames=config.skip_unused_frames) as reader:
        emit("start", reader.info)
        windows = plan_windows(sampling, reader.info.duration_s, config.preset.clip_duration)
        n = 0
        for clip in reader.clips(windows, num_frames=config.preset.num_frames):
            check()
            prepared = prepare(clip)
            clip.rgb = []  # the RGB frames are no longer needed
            emit("clip", clip, prepared)
            n += 1
        if n == 0:
            raise InputError(
                f"{path}: no frames inside the requested window(s) "
                f"(video is {reader.info.duration_s:.2f}s long).",
                kind="no_frames",
            )
    emit("end", n, time.perf_counter() - t0, reader.stats)


# -- the parent's side ---------------------------------------------------------------
class DecoderDied(Exception):
    """The decoder process ended while a video was in its hands."""


def cpu_seconds(pid: int) -> float:
    """CPU time process ``pid`` has used so far (Linux /proc; 0 if it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DecoderProcess:
    """One decoder process, driven by one pipeline thread (``recv`` and the video
    messages); ``release`` may come from any thread (the model loop)."""

    def __init__(self, config: DecodeConfig, slots: int, name: str) -> None:
        self.config, self.slots, self.name = config, slots, name
        self._send_lock = threading.Lock()
        self._conn: Connection | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._maps: dict[int, mmap.mmap] = {}
        self.generation = 0
        """Counts the processes started: a slot freed for a dead one is not sent."""
        self.seq = 0
        """Numbers the videos sent, so that a cancelled video's late messages are known."""

    def start(self) -> None:
        """Start the process and wait until it is ready for videos (its imports take a
        second or two)."""
        self.launch()
        self.wait_ready()

    def wait_ready(self) -> None:
        try:
            self.recv()  # ("ready",)
        except DecoderDied as exc:
            raise RuntimeError(f"decoder process {self.name} did not start: {exc}") from None

    def launch(self) -> None:
        """Start a fresh interpreter (never a fork: the worker holds CUDA, threads and
        connections), with one end of a socket pair as its pipe. Not multiprocessing's
        Process: that would re-import the caller's ``__main__`` and refuses to run in a
        daemonic process (a Celery prefork child)."""
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from worker.decoders import child_main; child_main()",
                 str(theirs.fileno()), self.name],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        conn.send(("config", self.config, self.slots))
        self._conn, self._proc, self._maps = conn, proc, {}
        self.generation += 1

    def send(self, message: tuple[Any, ...]) -> None:
        if self._conn is None:
            raise OSError(f"decoder process {self.name} is not running")
        with self._send_lock:
            self._conn.send(message)

    def release(self, slot: int, generation: int) -> None:
        """Slot ``slot`` may be written again (its clip's batch has run)."""
        if generation != self.generation:
            return  # that process is gone, and its slots with it
        try:
            self.send(("free", slot))
        except OSError:
            pass  # it died; its pipeline thread sees that on its next receive

    def cancel(self, seq: int) -> None:
        """Stop video ``seq`` between clips (its remaining messages still come)."""
        try:
            self.send(("cancel", seq))
        except OSError:
            pass  # it died; its pipeline thread sees that on its next receive

    def recv(self) -> tuple[Any, ...]:
        """The next message about a video (slot descriptors are taken on the way); a
        clip's slot comes back as a tensor over the shared memory. Raises DecoderDied."""
        if self._conn is None:
            raise DecoderDied("not running")
        try:
            while True:
                message = self._conn.recv()
                if message[0] != "slot":
                    break
                _, k, size = message
                fd = recv_handle(self._conn)
                try:
                    self._maps[k] = mmap.mmap(fd, size)  # a replaced map lives on in its views
                finally:
                    os.close(fd)
        except (EOFError, OSError) as exc:
            raise DecoderDied(self.exit_reason()) from exc
        if message[0] == "clip":
            seq, clip, k, shape, dtype = message[1:]
            count = prod(shape)
            tensor = torch.frombuffer(self._maps[k], dtype=getattr(torch, dtype), count=count)
            message = ("clip", seq, clip, tensor.view(shape), k)
        return message

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def cpu_seconds(self) -> float:
        """CPU time the process has used so far (0 if it has ended)."""
        return 0.0 if self._proc is None else cpu_seconds(self._proc.pid)

    def exit_reason(self) -> str:
        proc = self._proc
        if proc is None:
            return "not started"
        try:
            code = proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return "its pipe closed"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    def stop(self, *, wait: float = 5.0) -> None:
        proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            return
        try:
            self.send(("stop",))
        except OSError:
            pass
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        conn.close()
        self._proc = self._conn = None
        self._maps = {}

    def kill(self) -> None:
        """End the process now (the pipeline is closing, or the process is stuck)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()


def video_error(exc: BaseException, path: str) -> VidqError:
    """What a failure while decoding a video records: its own error if vidq raised
    it, else (a decoder or library crash) the video is ``undecodable``; the worker
    goes on either way."""
    if isinstance(exc, VidqError):
        return exc
    return InputError(f"{path}: {exc}", kind="undecodable")


def error_message(exc: BaseException, path: str) -> tuple[str, str, str]:
    """``video_error`` as three strings, for the pipe to the pipeline."""
    error = video_error(exc, path)
    return type(error).__name__, error.message, error.kind


def rebuild_error(cls: str, message: str, kind: str) -> VidqError:
    error_type = getattr(errors, cls, None)
    if not (isinstance(error_type, type) and issubclass(error_type, VidqError)):
        error_type = InputError
    return error_type(message, kind=kind)


# -- the decoder process -------------------------------------------------------------
class _Stop(Exception):
    """The pipeline asked this decoder to stop (or went away)."""


class _Cancel(Exception):
    """The pipeline cancelled the video in hand."""


class _Child:
    def __init__(self, conn: Connection, config: DecodeConfig, slots: int) -> None:
        self.conn, self.config = conn, config
        self.buffers: list[tuple[mmap.mmap, int] | None] = [None] * slots
        self.free = list(range(slots))
        self.current = -1
        self.cancelled = False
        self.pending: deque[tuple[Any, ...]] = deque()
        """Videos sent ahead of the one in hand, in order."""

    def handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "video":
            self.pending.append(message)
        elif kind == "free":
            self.free.append(message[1])
        elif kind == "cancel":
            seq = message[1]
            if seq == self.current:
                self.cancelled = True
            elif any(request[1] == seq for request in self.pending):
                self.pending = deque(r for r in self.pending if r[1] != seq)
                self.conn.send(("error", seq, "Cancelled", "cancelled", "cancelled"))
        elif kind == "stop":
            raise _Stop

    def receive(self) -> None:
        try:
            self.handle(self.conn.recv())
        except (EOFError, OSError):
            raise _Stop from None

    def check(self) -> None:
        while self.conn.poll():
            self.receive()
        if self.cancelled:
            raise _Cancel

    def slot(self, nbytes: int) -> tuple[int, mmap.mmap]:
        """A free slot of at least ``nbytes``, waiting for the model loop to free one."""
        while not self.free:
            self.receive()
            if self.cancelled:
                raise _Cancel
        k = self.free.pop()
        held = self.buffers[k]
        if held is None or held[1] < nbytes:
            size = -(-nbytes // (1 << 20)) << 20  # whole MiB: a slightly larger clip fits
            fd = os.memfd_create(f"vidq-slot-{k}", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, size)
                buffer = mmap.mmap(fd, size)
                self.conn.send(("slot", k, size))
                send_handle(self.conn, fd, os.getppid())
            finally:
                os.close(fd)
            self.buffers[k] = (buffer, size)
        return k, self.buffers[k][0]  # type: ignore[index]

    def prepare(self, clip: ClipFrames, crops: int) -> tuple[int, tuple[int, ...], str]:
        """The clip's model input, written into a slot: (slot, shape, dtype)."""
        if self.config.frames_only:
            shape = (len(clip.rgb), *clip.rgb[0].shape)
            k, buffer = self.slot(prod(shape))
            np.stack(clip.rgb, out=np.frombuffer(buffer, np.uint8, prod(shape)).reshape(shape))
            return k, shape, "uint8"
        preset = self.config.preset
        shape = (crops, 3, len(clip.rgb), preset.crop_size, preset.crop_size)
        k, buffer = self.slot(prod(shape) * 4)
        out = torch.frombuffer(buffer, dtype=torch.float32, count=prod(shape)).view(shape)
        clip_views(clip.rgb, preset, crops=crops, out=out)
        return k, shape, "float32"

    def run(self, seq: int, path: str, sampling: Sampling) -> None:
        self.current, self.cancelled = seq, False

        def prepare(clip: ClipFrames) -> tuple[int, tuple[int, ...], str]:
            return self.prepare(clip, sampling.crops)

        def emit(kind: str, *payload: Any) -> None:
            if kind == "clip":
                clip, (k, shape, dtype) = payload
                self.conn.send(("clip", seq, clip, k, shape, dtype))
            else:
                self.conn.send((kind, seq, *payload))

        try:
            decode_video(path, sampling, self.config, prepare=prepare, emit=emit,
                         check=self.check)
        except (_Stop, _Cancel):
            if self.cancelled:
                self.conn.send(("error", seq, "Cancelled", "cancelled", "cancelled"))
            else:
                raise _Stop from None
        except Exception as exc:  # a bad input (or a decoder bug) fails this video only
            self.conn.send(("error", seq, *error_message(exc, path)))


def _die_with_parent() -> None:
    """End this process within half a second of its parent's death, whatever it is
    doing (deep in FFmpeg, or waiting for a slot), so no decoder outlives a SIGKILLed
    worker. (Not ``PR_SET_PDEATHSIG``: that follows the thread that started the
    process, and a pipeline may be built in a thread that ends.)"""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="vidq-parent-watch", daemon=True).start()


def child_main() -> None:
    """A decoder process: ``python -c ... FD NAME``, FD its end of the pipe."""
    _die_with_parent()
    conn = Connection(int(sys.argv[1]))
    try:
        _, config, slots = conn.recv()
    except (EOFError, OSError):
        return
    # Ctrl-C and SIGTERM are the worker's to handle: it stops its decoders itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)  # the transforms of one decoder stay on one core
    child = _Child(conn, config, slots)
    conn.send(("ready",))
    try:
        while True:
            if child.pending:
                child.run(*child.pending.popleft()[1:])
            else:
                child.receive()
    except _Stop:
        pass
    finally:
        conn.close()
