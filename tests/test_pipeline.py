"""The worker pipeline in one process: batches across videos go back to the right
video, a slow model holds the decoders back (bounded memory), a bad video fails
alone, and the model thread keeps the intra-op threads its creator chose."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.media import make_video
from vidq.errors import VidqError
from vidq.sampling import Sampling
from worker.inference import Classifier


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("pipeline")
    paths = [root / f"v{i}.mp4" for i in range(6)]
    for i, p in enumerate(paths):
        make_video(p, seconds=2, seed=70 + i)
    return paths


def classifier(**kw: Any) -> Classifier:
    torch.manual_seed(0)
    return Classifier(model="x3d_xs", weights="random", device="cpu", precision="fp32", **kw)


def test_batches_across_videos_route_each_clip_to_its_video(clips: list[Path]) -> None:
    sampling = Sampling(strategy="uniform", clips=2)
    one = classifier(batch_size=1, inflight=1, decode_workers=1)
    many = classifier(batch_size=4, inflight=6, decode_workers=2, batch_wait_ms=200)
    alone = list(one.classify_many(clips, sampling))
    with many.pipeline() as pipeline:
        futures = [pipeline.submit(str(p), sampling) for p in clips]
        together = [f.result(timeout=120) for f in futures]
        stats = pipeline.stats
    assert stats.views == 12 and stats.batches < 12  # clips of different videos shared batches
    for a, b in zip(alone, together):
        assert not isinstance(a, VidqError) and not isinstance(b, VidqError)
        assert a.path == b.path
        assert [c.top[0].class_id for c in a.clips] == [c.top[0].class_id for c in b.clips]
        for ca, cb in zip(a.clips, b.clips):
            assert abs(ca.top[0].score - cb.top[0].score) < 1e-4


def test_a_slow_model_holds_the_decoders_back(clips: list[Path]) -> None:
    clf = classifier(batch_size=1, inflight=6, decode_workers=2)
    live: list[int] = []
    created = [0]
    lock = threading.Lock()
    real_prepare, real_predict = clf.prepare, clf.predict

    def prepare(frames: Any, *, crops: int) -> torch.Tensor:
        with lock:
            created[0] += 1
        return real_prepare(frames, crops=crops)

    def predict(prepared: list[torch.Tensor], *, crops: list[int]) -> Any:
        with lock:
            live.append(created[0] - len(live))  # prepared clips not yet scored
        time.sleep(0.3)  # a model far slower than the decoders
        return real_predict(prepared, crops=crops)

    clf.prepare, clf.predict = prepare, predict  # type: ignore[method-assign]
    with clf.pipeline() as pipeline:
        bound = pipeline.clip_slots
        futures = [pipeline.submit(str(p), Sampling(strategy="sliding", stride_s=0.25))
                   for p in clips]
        for f in futures:
            f.result(timeout=300)
    # Queue + one clip in each decoder's hand + the one being scored, never more.
    assert max(live) <= bound + pipeline.decode_workers + 1, (max(live), bound)
    assert len(live) > bound + 3  # there was enough work to overflow an unbounded queue


def test_a_bad_video_fails_alone(clips: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 4096)
    clf = classifier(batch_size=2, inflight=4)
    results = list(clf.classify_many([clips[0], bad, clips[1]], Sampling()))
    assert not isinstance(results[0], VidqError) and not isinstance(results[2], VidqError)
    assert isinstance(results[1], VidqError) and results[1].kind == "not_a_video"


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 intra-op threads")
def test_the_model_thread_keeps_its_creators_threads(clips: list[Path]) -> None:
    clf = classifier(batch_size=1, decode_workers=2)
    seen: list[int] = []
    real = clf.forward_with_features  # what the model loop's predict calls

    def forward(views: torch.Tensor) -> Any:
        seen.append(torch.get_num_threads())
        return real(views)

    clf.forward_with_features = forward  # type: ignore[method-assign]
    list(clf.classify_many(clips[:3], Sampling()))
    assert seen and set(seen) == {torch.get_num_threads()}
