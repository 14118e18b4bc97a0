"""Decoder processes (``VIDQ_DECODERS=processes``): each decoder an interpreter, and a
GIL, of its own, driven by one pipeline thread.

Decoder threads spend their time inside FFmpeg and torch with the GIL released, but
take it back a hundred or more times per video (every packet and frame passes
through Python), and in a worker they share it with the Celery consumer, the job
threads and the model loop. A decoder process runs the same decode stage
(``decode_video``, worker/decoders.py) apart from all of them.

A decoder process (its side in worker/decoder_child.py) and its pipeline thread talk
over one pipe, in frozen messages::

    pipeline thread "vidq-decode-i"                 decoder process
      DecodeRequest(seq, path, sampling)    ───▶     open, plan, decode, prepare
      (the next one sent ahead: it starts
      it without waiting for this thread)
                                            ◀───     Started(seq, info)
                                            ◀───     SlotCreated(slot, size) + its descriptor
      slot k as a tensor, no copy           ◀───     ClipInSlot(seq, clip, slot, shape, dtype)
      (the model loop, once its batch ran)  ───▶     FreeSlot(slot)
                                            ◀───     Finished(seq, clips, seconds, stats)
                                                     or Failed(seq, error_type, message, kind)
      Cancel(seq)                           ───▶     stops between clips

Only plain data comes back: each reply is a JSON object, parsed and checked field by
field (``decoder_child.decode_reply``); nothing a decoder sends is unpickled, so a
decoder subverted by a hostile file cannot run code in the worker. A decoder's
environment holds no secret it does not need (``decoder_environment``).

A clip crosses in a **slot**: shared memory (a memfd, mapped by both sides; its
descriptor crosses once, when the child creates or grows the slot), written by
``prepare_clip`` in place and read by the model loop in place (for an accelerator:
uint8 frames, copied into pinned memory by the pipeline thread as a decoder thread
copies them, and the slot is free at once). A decoder has a fixed number of slots
and waits for a free one before it prepares the next clip, so a slow model slows
the decoders down (backpressure) and memory is bounded: slots x the largest clip.
Nothing has a name on a filesystem, so a SIGKILL leaves nothing behind; a decoder
dies with its worker (it watches its parent, and sees end-of-file on the pipe).
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from math import prod
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from pathlib import Path
from typing import Any, TypeAlias

import torch

from vidq import storage
from vidq.errors import InputError
from worker.decoder_child import (
    Cancel,
    ClipInSlot,
    DecodeRequest,
    Failed,
    Finished,
    FreeSlot,
    Setup,
    SlotCreated,
    Started,
    Stop,
    WireError,
    decode_reply,
)
from worker.decoders import DecodeConfig, video_error
from worker.messages import (
    ClipReady,
    Closed,
    InFlight,
    Message,
    VideoDecoded,
    VideoFailed,
    VideoStarted,
    shutdown_error,
)
from worker.video import ClipFrames
from worker.watchdog import Progress, stall_error

log = logging.getLogger(__name__)

SENT_AHEAD = 2
"""Videos a decoder process holds at once: the one it decodes and the next."""


@dataclass(frozen=True)
class ClipArrived:
    """A ``ClipInSlot`` as the parent reads it: the slot as a tensor, no copy."""

    seq: int
    clip: ClipFrames
    tensor: torch.Tensor
    slot: int


Reply: TypeAlias = Started | ClipArrived | Finished | Failed


# -- a decoder's environment ---------------------------------------------------------
SECRETS = ("VIDQ_DATABASE_URL", "VIDQ_BROKER_URL", "VIDQ_WEBHOOK_SECRET", "PGPASSWORD",
           "PGPASSFILE", "REDISCLI_AUTH")
"""Never in a decoder's environment: it reaches neither the database, nor the broker,
nor a webhook receiver (its settings come over its pipe, ``Setup``)."""
STORE_CREDENTIALS = {"s3": ("AWS_",), "gs": ("GOOGLE_", "GCLOUD", "CLOUDSDK_"),
                     "az": ("AZURE_",), "adl": ("AZURE_",), "oss": ("OSS_", "ALIBABA_CLOUD_")}
"""Per object-store scheme, the prefixes of the variables its client reads credentials
from (botocore, google-auth, azure-identity). A decoder keeps a scheme's only when it
may read that scheme's URIs; the other prefixes of this table are removed."""


def decoder_environment(environ: Mapping[str, str], *,
                        media_roots: tuple[str, ...]) -> dict[str, str]:
    """The environment a decoder process starts with: the worker's, less its secrets.

    A decoder parses untrusted files, so it holds nothing it does not need: no database
    or broker URL (their passwords), no webhook secret, and an object store's
    credentials only where ``media_roots`` let it read that store's URIs (no roots at
    all: any URI, so every store's; only local roots: none)."""
    _local, objects = storage.split_roots(media_roots)
    needed = set(STORE_CREDENTIALS) if not media_roots else {uri.scheme for uri in objects}
    kept = {prefix for scheme in needed for prefix in STORE_CREDENTIALS.get(scheme, ())}
    dropped = tuple({prefix for prefixes in STORE_CREDENTIALS.values()
                     for prefix in prefixes} - kept)
    return {name: value for name, value in environ.items()
            if name not in SECRETS and not name.startswith(dropped)}


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
        self.progress = Progress()
        """Its last message, or the last slot the model loop gave back (worker/watchdog.py)."""
        self.held = 0
        """Its slots whose clips the pipeline still holds: with all of them held, it
        waits for the model, and that is not a stall."""
        self._held_lock = threading.Lock()
        self.busy = False
        """Videos are in its hands (its pipeline thread waits for its messages)."""
        self.stalled = False
        """Killed by the watchdog (worker/watchdog.py), not dead of its own."""

    def start(self) -> None:
        """Start the process and wait until it is ready for videos (its imports take a
        second or two)."""
        self.launch()
        self.wait_ready()

    def wait_ready(self) -> None:
        try:
            self._receive()  # Ready()
        except DecoderDied as exc:
            raise RuntimeError(f"decoder process {self.name} did not start: {exc}") from None

    def launch(self) -> None:
        """Start a fresh interpreter (never a fork: the worker holds CUDA, threads and
        connections), with one end of a socket pair as its pipe. Not multiprocessing's
        Process: that would re-import the caller's ``__main__`` and refuses to run in a
        daemonic process (a Celery prefork child)."""
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[1])
        env = {**decoder_environment(os.environ, media_roots=self.config.inputs.media_roots),
               "PYTHONPATH": os.pathsep.join(
                   p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c",
                 "from worker.decoder_child import child_main; child_main()",
                 str(theirs.fileno()), self.name],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        conn.send(Setup(self.config, self.slots))
        self._conn, self._proc, self._maps = conn, proc, {}
        with self._held_lock:
            self.generation += 1
            self.held = 0
        self.stalled = False
        self.progress.touch()

    def send(self, message: DecodeRequest | FreeSlot | Cancel | Stop) -> None:
        if self._conn is None:
            raise OSError(f"decoder process {self.name} is not running")
        with self._send_lock:
            self._conn.send(message)

    def release(self, slot: int, generation: int) -> None:
        """Slot ``slot`` may be written again (its clip's batch has run)."""
        with self._held_lock:
            if generation != self.generation:
                return  # that process is gone, and its slots with it
            self.held -= 1
        self.progress.touch()
        try:
            self.send(FreeSlot(slot))
        except OSError:
            pass  # it died; its pipeline thread sees that on its next receive

    def cancel(self, seq: int) -> None:
        """Stop video ``seq`` between clips (its remaining messages still come)."""
        try:
            self.send(Cancel(seq))
        except OSError:
            pass  # it died; its pipeline thread sees that on its next receive

    def hold(self) -> None:
        """A clip of this process's is in the pipeline until ``release``."""
        with self._held_lock:
            self.held += 1

    def waiting_for_model(self) -> bool:
        """Every slot holds a clip the pipeline has not given back: backpressure."""
        return self.held >= self.slots

    def kill_stalled(self) -> None:
        """The watchdog's: end a process that made no progress; its pipeline thread
        then finds it dead and gives its video back as a stall."""
        self.stalled = True
        self.kill()

    def _receive(self) -> Any:
        """The next message, slot descriptors taken on the way. Raises DecoderDied."""
        if self._conn is None:
            raise DecoderDied("not running")
        try:
            while True:
                message = decode_reply(self._conn.recv_bytes())
                self.progress.touch()
                if not isinstance(message, SlotCreated):
                    return message
                if not 0 <= message.slot < self.slots or message.size <= 0:
                    raise WireError(f"slot {message.slot} of {message.size} bytes")
                fd = recv_handle(self._conn)
                try:  # a replaced map lives on in its views
                    self._maps[message.slot] = mmap.mmap(fd, message.size)
                finally:
                    os.close(fd)
        except (EOFError, OSError) as exc:
            raise DecoderDied(self.exit_reason()) from exc
        except WireError as exc:  # a decoder gone wrong: it is replaced, never believed
            self.kill()
            raise DecoderDied(f"it sent a message vidq does not send ({exc})") from None

    def recv(self) -> Reply:
        """The next message about a video; a clip's slot comes back as a tensor over
        the shared memory. Raises DecoderDied."""
        message = self._receive()
        if isinstance(message, ClipInSlot):
            buffer = self._maps.get(message.slot)
            dtype = getattr(torch, message.dtype)  # one of decoder_child.DTYPES
            if buffer is None or prod(message.shape) * dtype.itemsize > len(buffer):
                self.kill()
                raise DecoderDied(f"it named slot {message.slot} for a clip that is not there")
            tensor = torch.frombuffer(buffer, dtype=dtype, count=prod(message.shape))
            return ClipArrived(message.seq, message.clip, tensor.view(message.shape),
                               message.slot)
        assert isinstance(message, (Started, Finished, Failed)), message
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
            self.send(Stop())
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

    def restart(self) -> None:
        """A fresh process in place of this one (dead, or in a state nobody knows)."""
        self.stop(wait=0)
        try:
            self.start()
        except Exception:  # the next video sent finds it dead and tries again
            log.exception("decoder process %s did not restart", self.name)

    def kill(self) -> None:
        """End the process now (the pipeline is closing, or the process is stuck)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()


@dataclass(eq=False)
class _Sent:
    """A video sent to a decoder process."""

    video: InFlight
    ended: bool = False
    """Its outcome is decided (a stop, a cancel): its remaining messages are dropped."""


class ProcessFeed:
    """A pipeline thread's side of one decoder process: videos from the pipeline's
    queue go to the process, up to ``SENT_AHEAD`` at a time, so that it starts the
    next one without waiting for this thread (which shares the GIL with the whole
    worker); its replies become the messages a decoder thread would put."""

    def __init__(self, proc: DecoderProcess, *, todo: queue.Queue[InFlight | None],
                 put: Callable[[Message], None], closing: threading.Event,
                 stall_s: float = 0.0) -> None:
        self.proc, self.todo, self.put, self.closing = proc, todo, put, closing
        self.stall_s = stall_s
        """What the watchdog (worker/watchdog.py) waits before it kills the process."""
        self.sent: dict[int, _Sent] = {}  # by sequence number, in the order sent

    def run(self) -> None:
        """Until the queue's end marker, and every video sent has ended."""
        proc, sent = self.proc, self.sent
        more = True
        while more or sent:
            try:
                while more and len(sent) < SENT_AHEAD:
                    try:
                        video = self.todo.get(block=not sent)
                    except queue.Empty:
                        break
                    if video is None:
                        more = False
                    elif self.closing.is_set():
                        video.finish(error=shutdown_error())
                    elif (stop := video.should_stop()) is not None:
                        self.put(VideoFailed(video, stop))
                    else:
                        try:
                            proc.send(DecodeRequest(proc.seq + 1, video.path, video.sampling))
                        except OSError:
                            self.todo.put(video)  # it never reached the process
                            raise
                        proc.seq += 1
                        sent[proc.seq] = _Sent(video)
                if sent:
                    if not proc.busy:
                        proc.progress.touch()  # the watchdog's clock starts now
                        proc.busy = True
                    self._route(proc.recv())
                proc.busy = bool(sent)
            except (DecoderDied, OSError) as exc:
                proc.busy = False
                if proc.stalled:
                    self._stalled()
                else:
                    self._died(exc)
            except Closed:
                for entry in sent.values():
                    entry.video.finish(error=shutdown_error())
                sent.clear()
            except Exception as exc:  # a bug here must not stop decoding
                log.exception("decoder %s failed", proc.name)
                for entry in sent.values():
                    entry.video.finish(error=video_error(exc, entry.video.path))
                sent.clear()
                proc.restart()

    def _route(self, reply: Reply) -> None:
        entry = self.sent.get(reply.seq)
        if entry is None:
            return
        video = entry.video
        if isinstance(reply, ClipArrived):
            self._clip(entry, reply)
        elif isinstance(reply, (Finished, Failed)):
            del self.sent[reply.seq]
            if not entry.ended:
                self.put(VideoDecoded(video, reply.clips, reply.decode_s, reply.stats)
                         if isinstance(reply, Finished) else VideoFailed(video, reply.error()))
        elif not entry.ended:  # Started
            self.put(VideoStarted(video, reply.info))

    def _clip(self, entry: _Sent, reply: ClipArrived) -> None:
        proc, video = self.proc, entry.video
        slot, generation = reply.slot, proc.generation
        proc.hold()  # until ``release``, whatever becomes of the clip
        if not entry.ended:
            stop = None if video.done else (
                video.should_stop() or (shutdown_error() if self.closing.is_set() else None))
            if video.done or stop is not None:  # the rest of the video is dropped
                entry.ended = True
                proc.cancel(reply.seq)
                if stop is not None:
                    self.put(VideoFailed(video, stop))
        if entry.ended:
            proc.release(slot, generation)
            return
        if proc.config.frames_only:
            # uint8 frames for the accelerator: into pinned memory here (the copy a
            # decoder thread makes too), so the model loop's upload does not block;
            # the slot is free at once.
            tensor = reply.tensor.pin_memory()
            proc.release(slot, generation)
            self.put(ClipReady(video, reply.clip, tensor))
            return
        self.put(ClipReady(video, reply.clip, reply.tensor,
                           lambda: proc.release(slot, generation)))

    def _stalled(self) -> None:
        """Killed by the watchdog, and replaced here; the video in its hands goes back
        to the queue as this host's failure (stall_error), those sent after it to the
        pipeline's queue."""
        proc = self.proc
        entries = list(self.sent.values())
        self.sent.clear()
        proc.restart()
        if entries and not entries[0].ended:
            self.put(VideoFailed(entries[0].video,
                                 stall_error(entries[0].video.path, self.stall_s)))
        for entry in entries[1:]:
            if not entry.ended:
                self.todo.put(entry.video)

    def _died(self, exc: BaseException) -> None:
        """The video in its hands fails; those sent after it go back to the queue."""
        proc = self.proc
        entries = list(self.sent.values())
        self.sent.clear()
        if self.closing.is_set():
            proc.stop(wait=0)
            for entry in entries:
                entry.video.finish(error=shutdown_error())
            return
        reason = exc if isinstance(exc, DecoderDied) else DecoderDied(proc.exit_reason())
        proc.restart()
        if entries and not entries[0].ended:  # it decodes in order: the first is the one
            self.put(VideoFailed(entries[0].video, InputError(
                f"{entries[0].video.path}: the decoder process died ({reason}).",
                kind="undecodable")))
        for entry in entries[1:]:
            if not entry.ended:
                self.todo.put(entry.video)
