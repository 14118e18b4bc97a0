"""A decoder process's replies cross as checked JSON (worker/decoder_child.py): every
reply survives the trip, and anything else is refused, a pickle first of all."""

from __future__ import annotations

import pickle

import pytest

from vidq.sampling import Window
from worker.decoder_child import (
    ClipInSlot,
    Failed,
    Finished,
    Ready,
    SlotCreated,
    Started,
    WireError,
    decode_reply,
    encode_reply,
)
from worker.results import DecodeStats, VideoInfo
from worker.video import ClipFrames

REPLIES = [
    Ready(),
    SlotCreated(2, 1 << 20),
    Started(3, VideoInfo(duration_s=2.5, fps=30.0, width=160, height=96, frames=75,
                         codec="h264", has_audio=False)),
    ClipInSlot(3, ClipFrames(window=Window(1, 0.5, 2.1), rgb=[], source_frames=48), 0,
               (1, 3, 4, 160, 160), "float32"),
    Finished(3, 4, 0.25, DecodeStats(packets=75, skipped=10, decoded=65, replanned=False,
                                     sha256="ab" * 32)),
    Failed(4, "InputError", "v.mp4: no video stream (audio only).", "no_video_stream"),
]


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_every_reply_survives_the_trip(reply: object) -> None:
    assert decode_reply(encode_reply(reply)) == reply  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [
    pickle.dumps(Ready()),
    b'{"type": "Exec", "seq": 1}',
    b'{"type": "ClipInSlot", "seq": 1, "slot": 0, "shape": [4], "dtype": "object",'
    b' "clip": {"window": {"index": 0, "start_sec": 0, "end_sec": 1}, "source_frames": 4}}',
    b'{"type": "Finished", "seq": "1", "clips": 1, "decode_s": 0.1, "stats": {}}',
    b"[]",
])
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(WireError):
        decode_reply(data)
