"""A decoder process's own side: the messages of its pipe, and its main loop.

The process (``python -c "from worker.decoder_child import child_main; ..."``, started
by worker/decoder_process.py) receives a ``Setup``, answers ``Ready``, then decodes
each ``DecodeRequest`` with ``decode_video`` (worker/decoders.py), writing every
prepared clip into a shared-memory slot of its own and saying so in a ``ClipInSlot``.
The parent's messages come pickled (the parent is trusted); the replies go back as
plain JSON (``encode_reply``), which the parent parses and checks (``decode_reply``).
It waits for a ``FreeSlot`` when every slot is taken (backpressure), stops a video on
``Cancel`` and ends on ``Stop``, on end-of-file, or when its parent dies.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from math import prod
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from typing import Any, TypeAlias

import torch

from vidq import errors
from vidq.errors import InputError, VidqError
from vidq.sampling import Sampling, Window
from worker.decoders import DecodeConfig, decode_video, video_error
from worker.results import DecodeStats, VideoInfo
from worker.transforms import prepare_clip
from worker.video import ClipFrames


# -- the pipe's messages: pipeline thread -> decoder process --------------------------
@dataclass(frozen=True)
class Setup:
    config: DecodeConfig
    slots: int


@dataclass(frozen=True)
class DecodeRequest:
    seq: int
    path: str
    sampling: Sampling


@dataclass(frozen=True)
class FreeSlot:
    slot: int


@dataclass(frozen=True)
class Cancel:
    seq: int


@dataclass(frozen=True)
class Stop:
    pass


# -- decoder process -> pipeline thread -----------------------------------------------
@dataclass(frozen=True)
class Ready:
    pass


@dataclass(frozen=True)
class SlotCreated:
    """Slot ``slot`` is (now) ``size`` bytes; its memfd follows on the pipe."""

    slot: int
    size: int


@dataclass(frozen=True)
class Started:
    seq: int
    info: VideoInfo


@dataclass(frozen=True)
class ClipInSlot:
    seq: int
    clip: ClipFrames
    slot: int
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Finished:
    seq: int
    clips: int
    decode_s: float
    stats: DecodeStats


@dataclass(frozen=True)
class Failed:
    """``video_error`` as three strings (an exception with keyword arguments does not
    pickle back)."""

    seq: int
    error_type: str
    message: str
    kind: str

    @classmethod
    def of(cls, seq: int, exc: BaseException, path: str) -> Failed:
        error = video_error(exc, path)
        return cls(seq, type(error).__name__, error.message, error.kind)

    def error(self) -> VidqError:
        error_type = getattr(errors, self.error_type, None)
        if not (isinstance(error_type, type) and issubclass(error_type, VidqError)):
            error_type = InputError
        return error_type(self.message, kind=self.kind)


Reply: TypeAlias = Ready | SlotCreated | Started | ClipInSlot | Finished | Failed

# -- the child's replies on the wire: JSON, never pickle -------------------------------
# The parent unpickles nothing a decoder sends: a decoder parses untrusted media with
# FFmpeg, and a pickle from a compromised one would run code in the worker, which holds
# the database and broker credentials. A reply is one JSON object of plain fields; a
# clip's pixels stay in its shared-memory slot.
DTYPES = ("uint8", "float16", "bfloat16", "float32")
"""The tensor types a slot may hold."""


class WireError(ValueError):
    """A decoder sent something that is not a reply of this module's."""


def encode_reply(reply: Reply) -> bytes:
    """``reply`` as the JSON bytes the parent reads with ``decode_reply``."""
    fields = asdict(reply)
    if isinstance(reply, ClipInSlot):
        fields["clip"] = {"window": asdict(reply.clip.window),
                          "source_frames": reply.clip.source_frames}
    return json.dumps({"type": type(reply).__name__, **fields},
                      separators=(",", ":")).encode()


def _get(fields: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = fields.get(name)
    if isinstance(value, bool) and kind is not bool:  # JSON's true is no number here
        raise WireError(f"{name}: {value!r}")
    if kind is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, kind):
        raise WireError(f"{name}: {value!r}")
    return value


def _info(fields: dict[str, Any]) -> VideoInfo:
    return VideoInfo(duration_s=_get(fields, "duration_s", float), fps=_get(fields, "fps", float),
                     width=_get(fields, "width", int), height=_get(fields, "height", int),
                     frames=_get(fields, "frames", int), codec=_get(fields, "codec", str),
                     has_audio=_get(fields, "has_audio", bool))


def _stats(fields: dict[str, Any]) -> DecodeStats:
    sha256 = fields.get("sha256")
    if sha256 is not None and not (isinstance(sha256, str) and len(sha256) == 64):
        raise WireError(f"sha256: {sha256!r}")
    return DecodeStats(packets=_get(fields, "packets", int), skipped=_get(fields, "skipped", int),
                       decoded=_get(fields, "decoded", int),
                       replanned=_get(fields, "replanned", bool), sha256=sha256)


def _clip(fields: dict[str, Any]) -> ClipFrames:
    window = _get(fields, "window", dict)
    return ClipFrames(window=Window(index=_get(window, "index", int),
                                    start_sec=_get(window, "start_sec", float),
                                    end_sec=_get(window, "end_sec", float)),
                      rgb=[], source_frames=_get(fields, "source_frames", int))


def decode_reply(data: bytes) -> Reply:
    """The reply in ``data``, its every field checked; WireError if it is not one."""
    try:
        fields = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise WireError("not a JSON object")
    kind = fields.get("type")
    if kind == "Ready":
        return Ready()
    seq = _get(fields, "seq", int) if kind not in ("SlotCreated",) else 0
    if kind == "SlotCreated":
        return SlotCreated(_get(fields, "slot", int), _get(fields, "size", int))
    if kind == "Started":
        return Started(seq, _info(_get(fields, "info", dict)))
    if kind == "ClipInSlot":
        shape = _get(fields, "shape", list)
        dtype = _get(fields, "dtype", str)
        if not (0 < len(shape) <= 8 and all(isinstance(n, int) and not isinstance(n, bool)
                                            and n >= 0 for n in shape)) or dtype not in DTYPES:
            raise WireError(f"shape {shape!r}, dtype {dtype!r}")
        return ClipInSlot(seq, _clip(_get(fields, "clip", dict)), _get(fields, "slot", int),
                          tuple(shape), dtype)
    if kind == "Finished":
        return Finished(seq, _get(fields, "clips", int), _get(fields, "decode_s", float),
                        _stats(_get(fields, "stats", dict)))
    if kind == "Failed":
        return Failed(seq, _get(fields, "error_type", str), _get(fields, "message", str),
                      _get(fields, "kind", str))
    raise WireError(f"no reply of type {kind!r}")


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
        self.pending: deque[DecodeRequest] = deque()
        """Videos sent ahead of the one in hand, in order."""

    def handle(self, message: object) -> None:
        if isinstance(message, DecodeRequest):
            self.pending.append(message)
        elif isinstance(message, FreeSlot):
            self.free.append(message.slot)
        elif isinstance(message, Cancel):
            if message.seq == self.current:
                self.cancelled = True
            elif any(request.seq == message.seq for request in self.pending):
                self.pending = deque(r for r in self.pending if r.seq != message.seq)
                self.reply(Failed(message.seq, "Cancelled", "cancelled", "cancelled"))
        elif isinstance(message, Stop):
            raise _Stop

    def reply(self, message: Reply) -> None:
        self.conn.send_bytes(encode_reply(message))

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
                self.reply(SlotCreated(k, size))
                send_handle(self.conn, fd, os.getppid())
            finally:
                os.close(fd)
            held = self.buffers[k] = (buffer, size)
        return k, held[0]

    def prepare(self, seq: int, clip: ClipFrames, crops: int) -> ClipInSlot:
        """The clip's model input, written into a free slot by ``prepare_clip``."""
        taken: list[int] = []

        def into(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            k, buffer = self.slot(prod(shape) * dtype.itemsize)
            taken.append(k)
            return torch.frombuffer(buffer, dtype=dtype, count=prod(shape)).view(shape)

        out = prepare_clip(clip.rgb, self.config.preset, crops=crops,
                           frames_only=self.config.frames_only, into=into)
        return ClipInSlot(seq, clip, taken[0], tuple(out.shape), str(out.dtype).split(".")[-1])

    def run(self, request: DecodeRequest) -> None:
        seq, path, sampling = request.seq, request.path, request.sampling
        self.current, self.cancelled = seq, False
        try:
            done = decode_video(
                path, sampling, self.config,
                prepare=lambda clip: self.prepare(seq, clip, sampling.crops),
                started=lambda info: self.reply(Started(seq, info)),
                clip_ready=lambda _clip, placed: self.reply(placed), check=self.check)
        except (_Stop, _Cancel):
            if self.cancelled:
                self.reply(Failed(seq, "Cancelled", "cancelled", "cancelled"))
                return
            raise _Stop from None
        except Exception as exc:  # a bad input (or a decoder bug) fails this video only
            self.reply(Failed.of(seq, exc, path))
            return
        self.reply(Finished(seq, done.clips, done.decode_s, done.stats))


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
        setup: Setup = conn.recv()
    except (EOFError, OSError):
        return
    # Ctrl-C and SIGTERM are the worker's to handle: it stops its decoders itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    torch.set_num_threads(1)  # the transforms of one decoder stay on one core
    child = _Child(conn, setup.config, setup.slots)
    conn.send_bytes(encode_reply(Ready()))
    try:
        while True:
            if child.pending:
                child.run(child.pending.popleft())
            else:
                child.receive()
    except _Stop:
        pass
    finally:
        conn.close()
