"""The worker pipeline in one process: batches across videos go back to the right
video, a slow model holds the decoders back (bounded memory), a bad video fails
alone, and the model thread keeps the intra-op threads its creator chose; decoder
threads and decoder processes (VIDQ_DECODERS) give the same results, and a decoder
process that dies fails only the video in its hands."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch

from tests.media import make_video
from vidq.errors import VidqError
from vidq.sampling import Sampling
from worker.inference import Classifier
from worker.messages import ClipReady
from worker.pipeline import Pipeline, classify_many
from worker.plan import Plan


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("pipeline")
    paths = [root / f"v{i}.mp4" for i in range(6)]
    for i, p in enumerate(paths):
        make_video(p, seconds=2, seed=70 + i)
    return paths


def classifier() -> Classifier:
    torch.manual_seed(0)
    return Classifier(model="x3d_xs", weights="random", device="cpu", precision="fp32")


def plan(**kw: Any) -> Plan:
    return Plan.build(on_gpu=False, **kw)


KINDS = ["threads", "processes"]


@pytest.mark.parametrize("kind", KINDS)
def test_batches_across_videos_route_each_clip_to_its_video(clips: list[Path], kind: str) -> None:
    sampling = Sampling(strategy="uniform", clips=2)
    one, many = classifier(), classifier()
    alone = list(classify_many(one, clips, sampling,
                               plan=plan(batch_size=1, inflight=1, decoder_count=1)))
    with Pipeline(many, plan(batch_size=4, inflight=6, decoder_count=2, batch_wait_ms=200,
                             decoder_kind=kind)) as pipeline:
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
    clf = classifier()
    clf_plan = plan(batch_size=1, inflight=6, decoder_count=2, decoder_kind="threads")
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
    with Pipeline(clf, clf_plan) as pipeline:
        bound = pipeline.plan.clip_slots
        futures = [pipeline.submit(str(p), Sampling(strategy="sliding", stride_s=0.25))
                   for p in clips]
        for f in futures:
            f.result(timeout=300)
    # Queue + one clip in each decoder's hand + the one being scored, never more.
    assert max(live) <= bound + pipeline.plan.decoder_count + 1, (max(live), bound)
    assert len(live) > bound + 3  # there was enough work to overflow an unbounded queue


def test_a_slow_model_holds_decoder_processes_back(clips: list[Path]) -> None:
    clf = classifier()
    clf_plan = plan(batch_size=1, inflight=6, decoder_count=2, decoder_kind="processes")
    live: list[int] = []
    made = [0]
    real_predict = clf.predict

    def predict(prepared: list[torch.Tensor], *, crops: list[int]) -> Any:
        live.append(made[0] - len(live))  # clips out of the decoders, not yet scored
        time.sleep(0.3)
        return real_predict(prepared, crops=crops)

    real_put = Pipeline._put

    def put(self: Pipeline, message: Any) -> None:
        made[0] += isinstance(message, ClipReady)
        real_put(self, message)

    clf.predict = predict  # type: ignore[method-assign]
    with mock.patch.object(Pipeline, "_put", put), Pipeline(clf, clf_plan) as pipeline:
        bound = pipeline.plan.decoder_count * pipeline.plan.process_slots
        futures = [pipeline.submit(str(p), Sampling(strategy="sliding", stride_s=0.25))
                   for p in clips]
        for f in futures:
            f.result(timeout=300)
    # A decoder process writes a clip only into a free slot of its own.
    assert max(live) <= bound, (max(live), bound)
    assert len(live) > bound + 3


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_video_fails_alone(clips: list[Path], tmp_path: Path, kind: str) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 4096)
    clf = classifier()
    clf_plan = plan(batch_size=2, inflight=4, decoder_count=2, decoder_kind=kind)
    results = list(classify_many(clf, [clips[0], bad, clips[1]], Sampling(), plan=clf_plan))
    assert not isinstance(results[0], VidqError) and not isinstance(results[2], VidqError)
    assert isinstance(results[1], VidqError) and results[1].kind == "not_a_video"


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 intra-op threads")
def test_the_model_thread_keeps_its_creators_threads(clips: list[Path]) -> None:
    clf = classifier()
    clf_plan = plan(batch_size=1, decoder_count=2)
    seen: list[int] = []
    real = clf.forward_with_features  # what the model loop's predict calls

    def forward(views: torch.Tensor) -> Any:
        seen.append(torch.get_num_threads())
        return real(views)

    clf.forward_with_features = forward  # type: ignore[method-assign]
    list(classify_many(clf, clips[:3], Sampling(), plan=clf_plan))
    assert seen and set(seen) == {torch.get_num_threads()}


@pytest.mark.parametrize("crops", [1, 3])
def test_threads_and_processes_give_identical_results(clips: list[Path], crops: int) -> None:
    sampling = Sampling(strategy="uniform", clips=3, crops=crops)
    threads = classifier()
    threads_plan = plan(batch_size=3, decoder_count=2, decoder_kind="threads")
    processes = classifier()
    processes_plan = plan(batch_size=3, decoder_count=2, decoder_kind="processes")
    a = list(classify_many(threads, clips[:4], sampling, plan=threads_plan))
    b = list(classify_many(processes, clips[:4], sampling, plan=processes_plan))
    for x, y in zip(a, b):
        assert not isinstance(x, VidqError) and not isinstance(y, VidqError)
        assert x.clips == y.clips  # windows, frames used, labels and scores, exactly
        assert x.top == y.top and x.decode_stats == y.decode_stats


def test_a_decoder_process_hands_a_gpu_host_the_readers_frames(clips: list[Path]) -> None:
    """For an accelerator the decoder process writes a clip's uint8 frames, not views,
    into its slot: they must be the reader's frames byte for byte (run here on CPU)."""
    from worker.decoder_process import (
        ClipArrived,
        DecodeRequest,
        DecoderProcess,
        Failed,
        Finished,
    )
    from worker.decoders import DecodeConfig, InputPolicy
    from worker.video import read_clips

    clf = classifier()
    config = DecodeConfig(preset=clf.preset, ffmpeg_threads=1, frames_only=True)
    sampling = Sampling(strategy="uniform", clips=3)
    proc = DecoderProcess(config, 4, "frames-only")
    proc.start()
    try:
        proc.send(DecodeRequest(1, str(clips[0]), sampling))
        got = []
        while not isinstance(message := proc.recv(), (Finished, Failed)):
            if isinstance(message, ClipArrived):
                got.append(message.tensor.numpy().copy())
                proc.release(message.slot, proc.generation)
        assert isinstance(message, Finished), message
    finally:
        proc.stop()
    _info, expected = read_clips(clips[0], sampling, num_frames=clf.preset.num_frames,
                                 clip_duration=clf.preset.clip_duration,
                                 limits=InputPolicy().limits)
    assert len(got) == len(expected) == 3
    for frames, clip in zip(got, expected):
        assert frames.dtype == np.uint8 and np.array_equal(frames, clip.frames)


def test_a_decoder_process_that_dies_fails_only_its_video(clips: list[Path]) -> None:
    clf = classifier()
    clf_plan = plan(batch_size=1, decoder_count=1, decoder_kind="processes")
    killed: list[int] = []
    real_predict = clf.predict

    def predict(prepared: list[torch.Tensor], *, crops: list[int]) -> Any:
        if not killed:  # the first clip of the long video: its decoder is still at work
            proc = pipeline._procs[0]
            killed.append(proc._proc.pid)
            proc._proc.kill()
            proc._proc.wait()
        return real_predict(prepared, crops=crops)

    clf.predict = predict  # type: ignore[method-assign]
    with Pipeline(clf, clf_plan) as pipeline:
        long = pipeline.submit(str(clips[0]), Sampling(strategy="sliding", stride_s=0.1))
        after = pipeline.submit(str(clips[1]), Sampling())
        with pytest.raises(VidqError) as died:
            long.result(timeout=120)
        result = after.result(timeout=120)
        assert pipeline._procs[0]._proc.pid != killed[0]  # a new decoder took over
    assert died.value.kind == "undecodable"
    assert "decoder process died (killed by SIGKILL)" in died.value.message
    assert len(result.clips) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_stopped_video_ends_and_the_next_one_runs(clips: list[Path], kind: str) -> None:
    """``should_stop`` (a cancel, a lost claim) ends a video between clips; a decoder
    process drops the rest of it and takes the next."""
    clf = classifier()
    clf_plan = plan(batch_size=1, decoder_count=2, decoder_kind=kind)
    seen = [0]

    def stop_after_two() -> VidqError | None:
        seen[0] += 1
        return VidqError("cancelled", kind="cancelled") if seen[0] > 2 else None

    with Pipeline(clf, clf_plan) as pipeline:
        stopped = pipeline.submit(str(clips[0]), Sampling(strategy="sliding", stride_s=0.1),
                                  should_stop=stop_after_two)
        with pytest.raises(VidqError) as cancelled:
            stopped.result(timeout=120)
        following = [pipeline.submit(str(p), Sampling()) for p in clips[1:5]]
        results = [f.result(timeout=120) for f in following]
    assert cancelled.value.kind == "cancelled"
    assert all(len(r.clips) == 1 for r in results)


def test_a_decoder_process_that_died_idle_is_replaced(clips: list[Path]) -> None:
    clf = classifier()
    clf_plan = plan(batch_size=1, decoder_count=1, decoder_kind="processes")
    with Pipeline(clf, clf_plan) as pipeline:
        first = pipeline._procs[0]._proc
        first.kill()
        first.wait()
        result = pipeline.submit(str(clips[2]), Sampling()).result(timeout=120)
        assert pipeline._procs[0]._proc.pid != first.pid
    assert len(result.clips) == 1  # the video never reached the dead one: not failed


def test_decoder_processes_outlive_the_thread_that_built_the_pipeline(clips: list[Path]) -> None:
    clf = classifier()
    clf_plan = plan(batch_size=1, decoder_count=1, decoder_kind="processes")
    built: list[Any] = []
    builder = threading.Thread(target=lambda: built.append(Pipeline(clf, clf_plan)))
    builder.start()
    builder.join()
    (pipeline,) = built
    try:
        pids = pipeline.decoder_pids()
        time.sleep(1)  # a decoder tied to the builder thread would be gone by now
        result = pipeline.submit(str(clips[3]), Sampling()).result(timeout=120)
        assert pipeline.decoder_pids() == pids
        assert len(result.clips) == 1
    finally:
        pipeline.close()
