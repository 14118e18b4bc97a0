"""What classifying a video produces: plain dataclasses, no torch.

A worker's classifier (worker/inference.py) builds a ``VideoResult`` per video; the
job store (worker/jobs.py) writes it in one transaction; ``vidq classify`` prints
it. Nothing here imports torch or PyAV, so the result types can be read, compared
and serialised wherever vidq's base package is installed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from vidq.embeddings import ClipVector, floats_from_float16
from vidq.sampling import Sampling


@dataclass(frozen=True)
class VideoInfo:
    duration_s: float
    fps: float
    width: int
    height: int
    frames: int
    """Frames the stream declares (or duration x fps where it declares none)."""
    codec: str
    has_audio: bool


@dataclass
class DecodeStats:
    """What one video's decode did: the share of packets decoded is the work done."""

    packets: int = 0
    """Video packets read from the container (one per frame)."""
    skipped: int = 0
    """Packets never sent to the decoder: unsampled and unreferenced."""
    decoded: int = 0
    """Frames the decoder returned."""
    replanned: bool = False
    """The decoder's frames contradicted the packet timestamps: decoded again, holding frames."""
    sha256: str | None = None
    """The SHA-256 of the file's bytes as the decoder read them (every byte: what it
    skipped is hashed after the decode); None for an object-store input, whose identity
    its store's checksum or ETag proves. The commit compares it with the job's hash."""


@dataclass(frozen=True)
class LabelScore:
    class_id: int
    label: str
    score: float


@dataclass
class ClipScores:
    """One clip's top-k labels (and embedding): what becomes its ``clip_predictions``
    rows (the ORM row is ``vidq.db.ClipPrediction``)."""

    index: int
    start_sec: float
    end_sec: float
    source_frames: int
    top: list[LabelScore]
    embedding: bytes | None = None
    """The clip's pooled features (mean over its crops), float16 bytes; ``clip`` mode only."""


@dataclass
class VideoResult:
    path: str
    model: str
    weights_id: str
    precision: str
    device: str
    info: VideoInfo
    sampling: Sampling
    clips: list[ClipScores]
    top: list[LabelScore]
    timing: dict[str, float] = field(default_factory=dict)
    decode_stats: DecodeStats = field(default_factory=DecodeStats)
    """Packets read, skipped and decoded: ``decoded / packets`` is the decode work done."""
    calibration_id: str | None = None
    """The int8 calibration the model was quantized with; None at float precisions."""
    embedding: bytes | None = None
    """The mean of the clips' pooled features, float16 bytes, not normalised
    (``VIDQ_EMBEDDINGS=video|clip``; vidq/embeddings.py)."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["sampling"] = asdict(self.sampling)
        # Vectors as JSON numbers (each float16 value exactly), not bytes.
        for holder in (out, *out["clips"]):
            if holder.get("embedding") is not None:
                holder["embedding"] = list(floats_from_float16(holder["embedding"]))
            else:
                holder.pop("embedding", None)
        return out

    def clip_vectors(self) -> list[ClipVector]:
        """The per-clip embeddings, as ``vidq.embeddings.write_embeddings`` takes them."""
        return [ClipVector(c.index, c.start_sec, c.end_sec, c.embedding)
                for c in self.clips if c.embedding is not None]
