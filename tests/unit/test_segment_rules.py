"""Label segments' rules (vidq/segments.py) on hand-made clip predictions: a one-window
dip splits, overlapping and touching windows merge, a label leaving the top-k ends its
segment, uniform windows join only across short unseen gaps, the minimum length drops
short segments; the result does not depend on the order the clips come in. The same
segments on real databases: tests/test_segments.py. The segments and export modules
import no torch."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from vidq.segments import ClipRow, ScoredLabel, Segment, SegmentRules, derive_segments

ARCHERY, BOWLING, YOGA, JUGGLING = (5, "archery"), (31, "bowling"), (399, "yoga"), (171, "juggling")


def window(index: int, start: float, span: float, *labels: tuple[tuple[int, str], float]
           ) -> ClipRow:
    return ClipRow(index=index, start_sec=start, end_sec=start + span,
                   top=[ScoredLabel(c, name, score) for (c, name), score in labels])


def spans(segments: list[Segment], label: str) -> list[tuple[float, float, int]]:
    return [(round(s.start_sec, 6), round(s.end_sec, 6), s.clips)
            for s in segments if s.label == label]


RULES = SegmentRules(min_score=0.3, min_s=0.0, max_gap_s=1.0)


def test_a_one_window_dip_splits_even_between_overlapping_windows() -> None:
    # Sliding windows of 2 s every 1 s: each overlaps its neighbours by half.
    scores = [0.8, 0.7, 0.2, 0.9, 0.6]  # window 2 dips below 0.3
    clips = [window(i, float(i), 2.0, (ARCHERY, s), (BOWLING, 0.1)) for i, s in enumerate(scores)]
    segments = derive_segments(clips, RULES)
    assert spans(segments, "archery") == [(0.0, 3.0, 2), (3.0, 6.0, 2)]
    first, second = [s for s in segments if s.label == "archery"]
    assert first.mean_score == pytest.approx(0.75) and first.peak_score == pytest.approx(0.8)
    assert second.mean_score == pytest.approx(0.75) and second.peak_score == pytest.approx(0.9)
    assert first.class_id == 5
    # Bowling never reaches the threshold: no segment at all.
    assert spans(segments, "bowling") == []
    # At a lower threshold the dip is no dip: one segment over all five windows.
    low = derive_segments(clips, SegmentRules(min_score=0.15, max_gap_s=1.0))
    assert spans(low, "archery") == [(0.0, 6.0, 5)]
    assert next(s for s in low if s.label == "archery").mean_score == pytest.approx(0.64)


def test_overlapping_and_touching_windows_merge_and_labels_change_mid_video() -> None:
    # Default sliding stride (one span, touching windows), plus a last window aligned
    # to the end that overlaps the one before it, as vidq/sampling.py places it.
    clips = [
        window(0, 0.0, 2.0, (ARCHERY, 0.9), (BOWLING, 0.05)),
        window(1, 2.0, 2.0, (ARCHERY, 0.6), (BOWLING, 0.3)),
        window(2, 4.0, 2.0, (BOWLING, 0.5), (ARCHERY, 0.25)),
        window(3, 6.0, 2.0, (BOWLING, 0.7), (YOGA, 0.1)),
        window(4, 6.5, 2.0, (BOWLING, 0.4), (YOGA, 0.35)),
    ]
    segments = derive_segments(clips, RULES)
    assert spans(segments, "archery") == [(0.0, 4.0, 2)]
    assert spans(segments, "bowling") == [(2.0, 8.5, 4)]  # end: the overlapping last window
    assert spans(segments, "yoga") == [(6.5, 8.5, 1)]
    # Ordered by start, then label.
    assert [(s.label, s.start_sec) for s in segments] == [
        ("archery", 0.0), ("bowling", 2.0), ("yoga", 6.5)]


def test_a_label_leaving_the_top_k_ends_its_segment() -> None:
    # Scores are high whenever juggling is listed, but window 2 does not list it:
    # it fell out of that clip's top-k, which the table does not keep.
    # x3d_xs windows (1.6 s) every 0.8 s: juggling's two stretches overlap in time.
    clips = [
        window(0, 0.0, 1.6, (JUGGLING, 0.5), (YOGA, 0.4)),
        window(1, 0.8, 1.6, (JUGGLING, 0.5), (YOGA, 0.4)),
        window(2, 1.6, 1.6, (YOGA, 0.6), (BOWLING, 0.35)),
        window(3, 2.4, 1.6, (JUGGLING, 0.45), (YOGA, 0.5)),
    ]
    segments = derive_segments(clips, RULES)
    assert spans(segments, "juggling") == [(0.0, 2.4, 2), (2.4, 4.0, 1)]
    assert spans(segments, "yoga") == [(0.0, 4.0, 4)]
    assert spans(segments, "bowling") == [(1.6, 3.2, 1)]


def test_uniform_windows_join_only_across_short_unseen_gaps() -> None:
    # Uniform clips of 2 s, 2.5 s apart: 0.5 s between them that no clip looked at,
    # then a wider step of 4 s (2 s unseen).
    starts = [0.0, 2.5, 5.0, 9.0, 11.5]
    clips = [window(i, s, 2.0, (ARCHERY, 0.8)) for i, s in enumerate(starts)]
    assert spans(derive_segments(clips, RULES), "archery") == [(0.0, 7.0, 3), (9.0, 13.5, 2)]
    # max_gap_s 0: only touching or overlapping windows join.
    strict = derive_segments(clips, SegmentRules(min_score=0.3, max_gap_s=0.0))
    assert len(spans(strict, "archery")) == 5
    wide = derive_segments(clips, SegmentRules(min_score=0.3, max_gap_s=2.0))
    assert spans(wide, "archery") == [(0.0, 13.5, 5)]


def test_the_minimum_length_drops_short_segments_only() -> None:
    clips = [
        window(0, 0.0, 2.0, (ARCHERY, 0.9)),
        window(1, 2.0, 2.0, (ARCHERY, 0.9)),
        window(2, 4.0, 2.0, (BOWLING, 0.9)),
        window(3, 6.0, 2.0, (ARCHERY, 0.9)),
        window(4, 8.0, 2.0, (ARCHERY, 0.9)),
        window(5, 10.0, 2.0, (ARCHERY, 0.9)),
    ]
    rules = SegmentRules(min_score=0.3, min_s=5.0, max_gap_s=1.0)
    kept = derive_segments(clips, rules)
    assert spans(kept, "archery") == [(6.0, 12.0, 3)]  # 4 s segment dropped, 6 s kept
    assert spans(kept, "bowling") == []
    # Exactly the minimum is kept (float sums of strides included).
    exact = derive_segments(clips, SegmentRules(min_score=0.3, min_s=4.0, max_gap_s=1.0))
    assert spans(exact, "archery") == [(0.0, 4.0, 2), (6.0, 12.0, 3)]


def test_clip_order_does_not_matter_and_float_strides_touch() -> None:
    stride = 2.1333333333333333  # slow_r50's span, placed at i * stride
    clips = [window(i, i * stride, stride, (ARCHERY, 0.5 + i / 100)) for i in range(30)]
    shuffled = clips[:]
    random.Random(7).shuffle(shuffled)
    strict = SegmentRules(min_score=0.3, max_gap_s=0.0)
    assert derive_segments(shuffled, strict) == derive_segments(clips, strict)
    (only,) = derive_segments(clips, strict)
    assert only.clips == 30 and only.end_sec == pytest.approx(30 * stride)
    assert only.peak_score == pytest.approx(0.79)


def test_segments_and_export_modules_import_no_torch() -> None:
    code = ("import sys, vidq.segments, producer.export, producer.query\n"
            "print(','.join(m for m in ('torch', 'av', 'pyarrow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""  # pyarrow too is imported only when writing Parquet
