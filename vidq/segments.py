"""Label segments: the stretches of a video where one label holds, derived from the
per-clip predictions, like the segment labels of managed video-labelling services.

Torch-free and pure: ``derive_segments`` takes clip rows and rules and returns
segments, so the worker (in its results transaction), tests and a backfill share
one definition. The rules, precisely:

1. A window *supports* a label when the label is among the window's stored top-k
   (``VIDQ_TOP_K``) with a score of at least ``min_score``.
2. Windows are taken in time order (start, then clip index). Two windows are
   *consecutive* when no other window of the video lies between them in that order,
   whether they overlap (sliding windows with a stride under one clip span), touch
   (the default stride) or leave time between them (uniform clips, long strides).
3. A segment is a maximal run of consecutive windows that all support the label.
   A window that does not support it ends the run, even for one window, even when
   its neighbours overlap it: the model looked at that time and did not see the
   label. A run also ends where the next window starts more than ``max_gap_s``
   after the run's end so far: that much time was never looked at.
4. A segment spans from its first window's start to the latest end of its windows.
   ``mean_score`` is the label's mean score over those windows (each window once),
   ``peak_score`` the highest, ``clips`` how many windows.
5. Segments shorter than ``min_s`` seconds (end - start) are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection, delete, insert
from sqlalchemy.orm import Session

from vidq.db import LabelSegment
from vidq.settings import Settings

GAP_EPSILON_S = 1e-6
"""Float slack: windows placed at i * stride touch even when rounding says they miss."""


@dataclass(frozen=True)
class SegmentRules:
    """How segments are cut; defaults and meaning in ``vidq/settings.py`` (VIDQ_SEGMENT_*)."""

    min_score: float = 0.3
    min_s: float = 0.0
    max_gap_s: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings) -> SegmentRules:
        return cls(min_score=settings.segment_min_score, min_s=settings.segment_min_s,
                   max_gap_s=settings.segment_max_gap_s)


class Scored(Protocol):
    @property
    def class_id(self) -> int: ...
    @property
    def label(self) -> str: ...
    @property
    def score(self) -> float: ...


class Window(Protocol):
    """A classified clip: ``ClipRow`` here, ``worker.results.ClipScores`` in a worker."""

    @property
    def index(self) -> int: ...
    @property
    def start_sec(self) -> float: ...
    @property
    def end_sec(self) -> float: ...
    @property
    def top(self) -> Sequence[Scored]: ...


@dataclass(frozen=True)
class ScoredLabel:
    class_id: int
    label: str
    score: float


@dataclass(frozen=True)
class ClipRow:
    """One classified window: what ``clip_predictions`` holds for a clip index."""

    index: int
    start_sec: float
    end_sec: float
    top: Sequence[ScoredLabel]


@dataclass(frozen=True)
class Segment:
    class_id: int
    label: str
    start_sec: float
    end_sec: float
    mean_score: float
    peak_score: float
    clips: int

    @property
    def duration_s(self) -> float:
        return self.end_sec - self.start_sec


@dataclass
class _Run:
    class_id: int
    label: str
    start_sec: float
    end_sec: float
    scores: list[float]
    last_position: int

    def close(self) -> Segment:
        return Segment(class_id=self.class_id, label=self.label, start_sec=self.start_sec,
                       end_sec=self.end_sec, mean_score=sum(self.scores) / len(self.scores),
                       peak_score=max(self.scores), clips=len(self.scores))


def derive_segments(clips: Iterable[Window], rules: SegmentRules) -> list[Segment]:
    """The segments of one video, ordered by start, then label (see the module rules)."""
    ordered = sorted(clips, key=lambda c: (c.start_sec, c.index))
    open_runs: dict[int, _Run] = {}
    done: list[Segment] = []
    for position, clip in enumerate(ordered):
        for run_class in list(open_runs):
            run = open_runs[run_class]
            # Rule 3: the run's last window must be the one just before this one, and
            # this one must begin within max_gap_s of what the run has covered.
            if run.last_position != position - 1 or (
                clip.start_sec - run.end_sec > rules.max_gap_s + GAP_EPSILON_S
            ):
                done.append(open_runs.pop(run_class).close())
        for scored in clip.top:
            if scored.score < rules.min_score:
                continue
            extended = open_runs.get(scored.class_id)
            if extended is None:
                open_runs[scored.class_id] = _Run(scored.class_id, scored.label, clip.start_sec,
                                                  clip.end_sec, [scored.score], position)
            else:
                extended.end_sec = max(extended.end_sec, clip.end_sec)
                extended.scores.append(scored.score)
                extended.last_position = position
    done.extend(run.close() for run in open_runs.values())
    kept = [s for s in done if s.duration_s + GAP_EPSILON_S >= rules.min_s]
    return sorted(kept, key=lambda s: (s.start_sec, s.label, s.end_sec))


def clip_rows_from_predictions(rows: Iterable[Any]) -> list[ClipRow]:
    """ClipRows from ``clip_predictions``-shaped rows (clip_index, start_sec, end_sec,
    class_id, label, score), in any order: one ClipRow per clip index."""
    by_index: dict[int, tuple[float, float, list[ScoredLabel]]] = {}
    for clip_index, start_sec, end_sec, class_id, label, score in rows:
        entry = by_index.setdefault(clip_index, (start_sec, end_sec, []))
        entry[2].append(ScoredLabel(class_id, label, score))
    return [ClipRow(index=i, start_sec=s, end_sec=e, top=top)
            for i, (s, e, top) in sorted(by_index.items())]


def write_segments(session: Session | Connection, job_id: int, clips: Iterable[Window],
                   rules: SegmentRules | None = None, *, replace: bool = True) -> int:
    """Replace the job's segments with those of ``clips``, inside the caller's transaction
    (the job's results transaction: segments commit, or roll back, with its clip rows).
    ``rules`` default to this process's VIDQ_SEGMENT_* settings. ``replace=False``: the
    job has no segments yet (worker/jobs.py). Returns the count."""
    rules = rules or SegmentRules.from_settings(Settings.from_env())
    if replace:
        session.execute(delete(LabelSegment).where(LabelSegment.job_id == job_id))
    segments = derive_segments(clips, rules)
    if segments:
        session.execute(insert(LabelSegment), [
            {"job_id": job_id, "segment_index": i, "class_id": s.class_id, "label": s.label,
             "start_sec": s.start_sec, "end_sec": s.end_sec, "duration_s": s.duration_s,
             "mean_score": s.mean_score, "peak_score": s.peak_score, "clips": s.clips}
            for i, s in enumerate(segments)
        ])
    return len(segments)

