"""How a worker host and each of its processes are sized: one frozen ``Plan``.

Every sizing default is computed here, and only here: the supervisor plans the host
(``Plan.for_host``) and passes the figures to each worker process in its
environment; a worker process (or ``vidq run``, ``vidq classify``) plans itself
from its settings (``Plan.from_settings``) and builds its pipeline from the plan.

Three names that are easy to confuse, kept apart here:

- ``decoder_count``: how many decoders decode videos side by side
  (``VIDQ_DECODE_WORKERS``);
- ``decoder_kind``: whether they are threads or processes (``VIDQ_DECODERS``);
- ``ffmpeg_threads``: the threads FFmpeg itself uses inside one decoder.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from dataclasses import dataclass

from vidq.settings import DECODER_KINDS, Settings

GPU_BATCH = 16
"""Views per forward pass on an accelerator when ``VIDQ_BATCH_SIZE`` is 0."""

CPU_BATCH = 1
"""Views per forward pass on a CPU: a CPU forward gains nothing from batching."""


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_decoder_count(processes: int = 1) -> int:
    """The CPU cores one worker process may use, less one for the model (at least one)."""
    return max(1, cpu_cores() // max(1, processes) - 1)


def default_inflight(decoder_count: int, batch_size: int) -> int:
    """A batch of one-clip videos in the model, the next batch decoded and waiting, and
    a video in each decoder's hands."""
    return 2 * batch_size + 2 * decoder_count


def default_ffmpeg_threads(decoder_count: int) -> int:
    """The cores shared out among the decoders, so one decoder on a small CPU host
    still uses every core, and fifteen on a GPU host do not start fifteen threads each
    (0 = FFmpeg's own choice, which is every core: right for a lone decoder)."""
    return 0 if decoder_count == 1 else max(1, cpu_cores() // decoder_count)


def resolve_decoder_kind(setting: str, decoder_count: int) -> str:
    """``threads`` or ``processes`` for VIDQ_DECODERS: ``auto`` is processes when there
    are several decoders (they share no GIL), threads for one (as fast, no process)."""
    if setting == "auto":
        return "processes" if decoder_count > 1 else "threads"
    return setting


def count_gpus(settings: Settings) -> int:
    """GPUs on this host, without initialising CUDA in this (parent) process."""
    if settings.device not in ("auto", "cuda") or not shutil.which("nvidia-smi"):
        return 0
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return listed.stdout.count("GPU ")


@dataclass(frozen=True)
class Plan:
    """How one worker process is sized (and how many of them a host runs)."""

    processes: int
    """Worker processes on this host (one per GPU, or one on a CPU host)."""
    gpus: int
    """GPUs on this host; 0 on a CPU host, or when the device is set."""
    decoder_count: int
    """Decoders in one process (``VIDQ_DECODE_WORKERS``)."""
    decoder_kind: str
    """``threads`` or ``processes`` (``VIDQ_DECODERS``, ``auto`` resolved)."""
    ffmpeg_threads: int
    """FFmpeg's threads inside one decoder (0 = FFmpeg's choice)."""
    inflight: int
    """Jobs one process holds at once (``VIDQ_INFLIGHT``)."""
    batch_size: int
    """Views per forward pass (``VIDQ_BATCH_SIZE``)."""
    batch_wait_ms: float
    """How long a batch waits to fill after its first clip (``VIDQ_BATCH_WAIT_MS``)."""
    clip_slots: int
    """Prepared clips that may wait for the model (what holds memory): a full batch
    plus two per decoder. A clip gives its slot back when the model takes it into a
    batch, so at peak a process holds the slots, plus the batch being formed or run,
    plus one clip per decoder blocked on a slot."""

    @classmethod
    def build(
        cls,
        *,
        on_gpu: bool,
        processes: int = 1,
        gpus: int = 0,
        decoder_count: int = 0,
        decoder_kind: str = "auto",
        ffmpeg_threads: int = 0,
        inflight: int = 0,
        batch_size: int = 0,
        batch_wait_ms: float = 5.0,
        clip_slots: int = 0,
    ) -> Plan:
        """A plan with every figure left at 0 (or ``auto``) given its default."""
        if decoder_kind not in DECODER_KINDS:
            raise ValueError(f"decoder_kind must be one of {DECODER_KINDS}, "
                             f"not {decoder_kind!r}")
        processes = max(1, processes)
        batch = batch_size or (GPU_BATCH if on_gpu else CPU_BATCH)
        decoders = max(1, decoder_count or default_decoder_count(processes))
        return cls(
            processes=processes,
            gpus=gpus,
            decoder_count=decoders,
            decoder_kind=resolve_decoder_kind(decoder_kind, decoders),
            ffmpeg_threads=ffmpeg_threads or default_ffmpeg_threads(decoders),
            inflight=inflight or default_inflight(decoders, batch),
            batch_size=batch,
            batch_wait_ms=max(0.0, batch_wait_ms),
            clip_slots=clip_slots or batch + 2 * decoders,
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, on_gpu: bool, processes: int = 1,
                      gpus: int = 0) -> Plan:
        """One process's plan (``processes``: how many share this host's cores; a
        supervised worker process is told its figures in ``environment()``)."""
        return cls.build(
            on_gpu=on_gpu, processes=processes, gpus=gpus,
            decoder_count=settings.decode_workers, decoder_kind=settings.decoders,
            inflight=settings.inflight, batch_size=settings.batch_size,
            batch_wait_ms=settings.batch_wait_ms,
        )

    @classmethod
    def for_host(cls, settings: Settings, *, processes: int | None = None) -> Plan:
        """The host's plan: one process per GPU (or ``VIDQ_WORKER_CONCURRENCY``, or
        ``processes``), each sized for its share of the cores."""
        gpus = count_gpus(settings)
        n = processes or settings.worker_concurrency or max(1, gpus)
        on_gpu = gpus > 0 or settings.device.startswith("cuda")
        return cls.from_settings(settings, on_gpu=on_gpu, processes=n, gpus=gpus)

    @property
    def process_slots(self) -> int:
        """Shared-memory slots of one decoder process. A slot is free again only once
        the batch that read it has run: the slots hold the queue's clips and the
        running batch's (as the memory of threads' clips does). With slots for the
        queue alone, a slow model's next batch held only what fitted beside the
        running one (62% full against threads' 83%, 1.5 s batches of 16)."""
        return max(3, math.ceil((self.clip_slots + self.batch_size) / self.decoder_count) + 1)

    def device_for(self, index: int, settings: Settings) -> str:
        """The device of worker process ``index``: its GPU, round robin."""
        if self.gpus and settings.device in ("auto", "cuda"):
            return f"cuda:{index % self.gpus}"
        return settings.device

    def environment(self) -> dict[str, str]:
        """The figures a worker process reads back (``from_settings``) as this plan."""
        return {
            "VIDQ_WORKER_PROCESSES": str(self.processes),
            "VIDQ_DECODE_WORKERS": str(self.decoder_count),
            "VIDQ_DECODERS": self.decoder_kind,
            "VIDQ_INFLIGHT": str(self.inflight),
            "VIDQ_BATCH_SIZE": str(self.batch_size),
        }

