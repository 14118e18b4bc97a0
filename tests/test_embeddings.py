"""Embeddings (``VIDQ_EMBEDDINGS``, worker/features.py, vidq/embeddings.py); the setting
and the float16 format alone are in tests/unit/test_embedding_format.py:

- the captured features are the vector the head projects to the logits, in fp32 and
  bf16, alone and in a batch across videos, and per clip the mean over its 3 crops;
- ``vidq run`` writes one video row and (``clip``) one row per clip, on SQLite and
  PostgreSQL; ``vidq similar`` finds the re-encoded copy of a video first; the export
  carries the same vectors in Parquet, JSON lines and CSV; a re-run with embeddings
  off and a purge leave none behind;
- ``vidq similar`` ranks hand-made vectors exactly as numpy's cosine does, keeps to
  one model and weights id, and says so when nothing compares;
- it runs on a producer host: no torch, no numpy.

The slow_r50 fidelity bound is in tests/test_fidelity.py, int8 in tests/test_int8.py,
a real worker in tests/e2e/test_distributed.py.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from sqlalchemy import create_engine, text

from tests import media
from tests.cli import run_vidq
from vidq.embeddings import float16_from_floats, floats_from_float16, norm
from vidq.errors import ConfigError
from vidq.sampling import Sampling
from worker.inference import Classifier
from worker.pipeline import Pipeline, classify, classify_many
from worker.plan import Plan
from worker.transforms import clip_views
from worker.video import VideoReader

DIM = 2048


def vidq(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_vidq(*args, env={**os.environ, **env}, check=check, timeout=600)


def vectors(blobs: list[bytes]) -> np.ndarray:
    return np.stack([np.frombuffer(b, "<f2").astype(np.float32) for b in blobs])


def within_float16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise: ``a`` and ``b`` differ by at most one float16 step (2^-10 relative),
    what rounding a float32 vector twice can leave. Different videos' vectors from the
    random test model differ by a few steps only, so this is the tolerance to test with."""
    return np.abs(a - b) <= 2.0**-10 * np.maximum(np.abs(a), np.abs(b)) + 1e-7


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- capture -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An original, the same re-encoded at a far lower quality (a near duplicate), and
    two other videos: its colours inverted, and its channels swapped and mirrored."""
    root = tmp_path_factory.mktemp("embeddings")
    paths = {name: root / f"{name}.mp4" for name in ("original", "reencoded", "inverted",
                                                     "swapped")}
    media.make_video(paths["original"], seconds=3, seed=5)
    media.make_video(paths["reencoded"], seconds=3, seed=5, options={"crf": "38"})
    write_frames(paths["inverted"], lambda i: 255 - media.draw_frame(i, width=160, height=96,
                                                                     seed=5))
    write_frames(paths["swapped"], lambda i: media.draw_frame(i, width=160, height=96,
                                                              seed=6)[:, ::-1, ::-1])
    return paths


def write_frames(path: Path, frame: Any, *, seconds: float = 3, fps: int = 30) -> None:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 160, 96, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "16"}
        for i in range(int(seconds * fps)):
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame(i)), format="rgb24")
            image.pts = i
            for packet in stream.encode(image):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.fixture(scope="module")
def x3d_clip_views(videos: dict[str, Path]) -> torch.Tensor:
    """Two clips of the original as x3d_xs views: (2, 3, 4, 182, 182)."""
    clf = Classifier(model="x3d_xs", weights="random", device="cpu", precision="fp32")
    with VideoReader(videos["original"]) as reader:
        clips = list(reader.clips(
            [w for w in _windows(reader.info.duration_s, clf)][:2], num_frames=4))
    return torch.cat([clip_views(c.frames, clf.preset) for c in clips])


def _windows(duration_s: float, clf: Classifier) -> list[Any]:
    from vidq.sampling import plan_windows

    return plan_windows(Sampling(strategy="sliding"), duration_s, clf.preset.clip_duration)


@pytest.mark.parametrize(("precision", "logit_bound"), [("fp32", 1e-4), ("bf16", 0.05)])
def test_the_features_are_what_the_head_projects_to_the_logits(
    x3d_clip_views: torch.Tensor, precision: str, logit_bound: float,
) -> None:
    clf = Classifier(model="x3d_xs", weights="random", device="cpu", precision=precision,
                     embeddings="clip", top_k=400)
    probs, features = clf.forward_with_features(x3d_clip_views)
    assert features is not None and features.shape == (2, DIM) and features.dtype == torch.float32
    assert (features >= 0).all() and features.abs().sum() > 0  # after X3D's post-pool ReLU
    proj = clf.module.blocks[5].proj
    with torch.inference_mode():
        logits = proj.float()(features) if precision == "fp32" else torch.nn.functional.linear(
            features, proj.weight.float(), proj.bias.float())
    # The same forward's probabilities are the softmax of the projected features.
    assert (torch.log(probs) - torch.log_softmax(logits, dim=1)).abs().max() <= logit_bound
    # And the two clips differ: features of the batch are not one vector repeated.
    assert cosine(features[0].numpy(), features[1].numpy()) < 0.9999
    # Without embeddings nothing is captured and the probabilities are the same.
    plain = Classifier(model="x3d_xs", weights="random", device="cpu", precision=precision)
    plain_probs, none = plain.forward_with_features(x3d_clip_views)
    assert none is None and torch.equal(plain_probs, probs)


def test_batched_across_videos_and_three_crops_give_each_clip_its_own_features(
    videos: dict[str, Path],
) -> None:
    paths = [videos["original"], videos["inverted"], videos["swapped"]]
    one = Classifier(model="x3d_xs", weights="random", device="cpu", precision="fp32",
                     embeddings="clip")
    many = Classifier(model="x3d_xs", weights="random", device="cpu", precision="fp32",
                      embeddings="clip")
    sliding3 = Sampling(strategy="sliding", crops=3)
    alone = list(classify_many(one, paths, sliding3, plan=Plan.build(
        on_gpu=False, batch_size=1, decoder_count=1, inflight=1)))
    with Pipeline(many, Plan.build(on_gpu=False, batch_size=8, decoder_count=2, inflight=3,
                                   batch_wait_ms=500)) as pipeline:
        futures = [pipeline.submit(str(p), sliding3) for p in paths]
        together = [f.result(timeout=300) for f in futures]
        assert pipeline.stats.batches < pipeline.stats.views / 3  # clips really shared batches
    for a, b in zip(alone, together):
        assert a.embedding is not None and b.embedding is not None
        assert len(a.clips) == len(b.clips) >= 2
        for ca, cb in zip(a.clips, b.clips):
            assert ca.embedding is not None and cb.embedding is not None
            va, vb = vectors([ca.embedding, cb.embedding])
            assert within_float16(va, vb).all()
        # The video's vector is the mean of its clips' (float16 rounding apart).
        clip_mean = vectors([c.embedding for c in a.clips]).mean(axis=0)
        assert within_float16(vectors([a.embedding])[0], clip_mean).all()
    # The three videos' vectors are not the same one.
    first, second = vectors([alone[0].embedding, alone[1].embedding])  # type: ignore[list-item]
    assert (~within_float16(first, second)).mean() > 0.5
    # A clip's vector is the mean over its three crops, computed here from the views.
    result = alone[0]
    with VideoReader(paths[0]) as reader:
        (clip,) = list(reader.clips(_windows(reader.info.duration_s, one)[:1], num_frames=4))
    _probs, per_view = one.forward_with_features(clip_views(clip.frames, one.preset, crops=3))
    assert per_view is not None and per_view.shape == (3, DIM)
    expected = per_view.mean(dim=0).numpy()
    stored = vectors([result.clips[0].embedding])[0]  # type: ignore[list-item]
    assert within_float16(stored, expected).all()
    # ... which is not simply the centre crop's.
    assert (~within_float16(stored, per_view[1].numpy())).mean() > 0.5


def test_video_mode_keeps_no_clip_vectors_and_off_keeps_none(videos: dict[str, Path]) -> None:
    for mode in ("video", "off"):
        clf = Classifier(model="x3d_xs", weights="random", device="cpu", precision="fp32",
                         embeddings=mode)
        result = classify(clf, videos["original"], Sampling(strategy="sliding"))
        assert (result.embedding is not None) == (mode == "video")
        assert all(c.embedding is None for c in result.clips)
        assert ("embedding" in result.to_json()) == (mode == "video")
    with pytest.raises(ConfigError, match="Unknown embeddings mode 'all'"):
        Classifier(model="x3d_xs", weights="random", device="cpu", embeddings="all")


# -- through `vidq run` and the database ----------------------------------------------------------


def rows(url: str, query: str, **params: object) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(query), params)]
    finally:
        engine.dispose()


@pytest.mark.timeout(900)
@pytest.mark.heavy_on_postgresql
def test_vidq_run_writes_them_similar_finds_the_copy_export_carries_them_purge_drops_them(
    database_url: str, videos: dict[str, Path], tmp_path: Path,
) -> None:
    env = {"VIDQ_DATABASE_URL": database_url, "VIDQ_MODEL": "x3d_xs", "VIDQ_WEIGHTS": "random",
           "VIDQ_EMBEDDINGS": "off"}
    vidq("run", *map(str, videos.values()), "--batch", "emb", "--strategy", "sliding",
         "--embeddings", "clip", env=env)
    jobs = dict(rows(database_url, "select path, id from jobs"))
    ids = {name: jobs[str(p)] for name, p in videos.items()}
    video_rows = {r[0]: r[1:] for r in rows(
        database_url, "select job_id, model, weights_id, dim, norm, vector from video_embeddings")}
    assert set(video_rows) == set(ids.values())
    for job_id, (model, weights_id, dim, stored_norm, blob) in video_rows.items():
        assert (model, weights_id, dim, len(blob)) == ("x3d_xs", "random-init", DIM, 2 * DIM)
        vector = vectors([blob])[0]
        assert stored_norm == pytest.approx(float(np.linalg.norm(vector.astype(np.float64))),
                                            rel=1e-9)
        clips = rows(database_url, "select c.clip_index, c.start_sec, c.end_sec, c.vector "
                     "from clip_embeddings c where c.job_id = :j order by c.clip_index", j=job_id)
        planned = rows(database_url, "select clip_index, start_sec, end_sec from "
                       "clip_predictions where job_id = :j and rank = 1 order by clip_index",
                       j=job_id)
        assert [c[:3] for c in clips] == planned and len(planned) >= 2
        clip_mean = vectors([c[3] for c in clips]).mean(axis=0)
        assert within_float16(vector, clip_mean).all()

    # The re-encoded copy is the original's nearest video, then the others.
    found = vidq("similar", str(ids["original"]), "--top", "10", "--format", "jsonl", env=env)
    ranked = [json.loads(line) for line in found.stdout.splitlines()]
    assert [r["job_id"] for r in ranked][0] == ids["reencoded"]
    assert {r["job_id"] for r in ranked} == {ids["reencoded"], ids["inverted"], ids["swapped"]}
    blobs = {j: v[-1] for j, v in video_rows.items()}
    q = vectors([blobs[ids["original"]]])[0]
    for r in ranked:
        assert r["similarity"] == pytest.approx(cosine(q, vectors([blobs[r["job_id"]]])[0]),
                                                abs=1e-5)
        assert r["path"] == str(videos[next(n for n, i in ids.items() if i == r["job_id"])])
    assert ranked[0]["similarity"] > ranked[1]["similarity"] + 1e-4
    assert "compared 3 vectors of x3d_xs" in found.stderr
    table = vidq("similar", str(ids["original"]), "--top", "1", env=env).stdout.splitlines()
    assert len(table) == 2 and table[1].split()[1] == str(ids["reencoded"])

    # Exports: the same vectors in every format.
    for fmt in ("parquet", "jsonl", "csv"):
        out = vidq("export", "--batch", "emb", "--format", fmt, "--out", str(tmp_path / fmt),
                   env=env).stdout
        assert f"video_embeddings.{fmt}: 4 rows" in out and f"clip_embeddings.{fmt}" in out
    check_exports(tmp_path, database_url)

    # `video` mode: a video row, no clip rows (a forced second job of the original).
    vidq("run", str(videos["original"]), "--batch", "video-only", "--force", "--strategy",
         "sliding", env={**env, "VIDQ_EMBEDDINGS": "video"})
    (video_only,) = rows(database_url, "select j.id from jobs j join batches b on "
                         "b.id = j.batch_id where b.name = 'video-only'")
    assert rows(database_url, "select count(*) from video_embeddings where job_id = :j",
                j=video_only[0]) == [(1,)]
    assert rows(database_url, "select count(*) from clip_embeddings where job_id = :j",
                j=video_only[0]) == [(0,)]
    # Its vector is the original's (same frames, same model): the nearest, cosine 1.
    again = vidq("similar", str(ids["original"]), "--format", "jsonl", env=env).stdout
    first = json.loads(again.splitlines()[0])
    assert first["job_id"] == video_only[0] and first["similarity"] == pytest.approx(1.0, abs=1e-6)

    # A re-run of a job with embeddings off replaces its vectors by none.
    with create_engine(database_url).begin() as conn:
        conn.execute(text("update jobs set status = 'queued', lease_token = null "
                          "where id = :j"), {"j": ids["inverted"]})
    rerun = subprocess.run(
        [sys.executable, "-c", ("from worker.embedded import run_jobs\n"
                                "from vidq.settings import Settings\n"
                                f"print(run_jobs([{ids['inverted']}], "
                                "settings=Settings.from_env())[0].status)")],
        capture_output=True, text=True, timeout=300, check=False, env={**os.environ, **env})
    assert rerun.returncode == 0 and rerun.stdout.strip() == "succeeded", rerun.stderr
    for table in ("video_embeddings", "clip_embeddings"):
        assert rows(database_url, f"select count(*) from {table} where job_id = :j",
                    j=ids["inverted"]) == [(0,)]
    missing = vidq("similar", str(ids["inverted"]), env=env, check=False)
    assert missing.returncode == 2 and "has no embedding" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1

    # Purge: the vectors go with their jobs (ON DELETE CASCADE, on SQLite too).
    vidq("purge", "--batch", "emb", env=env)
    assert rows(database_url, "select count(*) from clip_embeddings") == [(0,)]
    assert rows(database_url, "select job_id from video_embeddings") == [(video_only[0],)]


def check_exports(root: Path, url: str) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    for table, key in (("video_embeddings", ("job_id",)),
                       ("clip_embeddings", ("job_id", "clip_index"))):
        stored = {r[:-1]: r[-1] for r in rows(
            url, f"select {', '.join(key)}, vector from {table} order by {', '.join(key)}")}
        parquet = pq.read_table(root / "parquet" / f"{table}.parquet")
        assert parquet.schema.field("vector").type == pa.list_(pa.float16(), DIM)
        as_parquet = {tuple(r[k] for k in key): r["vector"] for r in parquet.to_pylist()}
        as_json = {tuple(r[k] for k in key): r["vector"] for r in map(
            json.loads, (root / "jsonl" / f"{table}.jsonl").read_text().splitlines())}
        with open(root / "csv" / f"{table}.csv", newline="") as f:
            as_csv = {tuple(int(r[k]) for k in key): base64.b64decode(r["vector"])
                      for r in csv.DictReader(f)}
        assert set(stored) == set(as_parquet) == set(as_json) == set(as_csv) and stored
        for k, blob in stored.items():
            values = list(floats_from_float16(blob))
            assert as_parquet[k] == values and as_json[k] == values and as_csv[k] == blob


# -- `vidq similar` on known vectors ---------------------------------------------------------------


def insert_videos(url: str, vectors_by_path: list[tuple[str, str, np.ndarray | None]]
                  ) -> list[int]:
    """Succeeded jobs with the given (path, weights id, vector or None) as video rows."""
    engine = create_engine(url)
    ids = []
    with engine.begin() as conn:
        for i, (path, weights_id, vector) in enumerate(vectors_by_path):
            job_id = conn.execute(text(
                "insert into jobs (path, content_sha256, size_bytes, status, priority, attempts,"
                " submitted_at, model, weights, weights_id, strategy, clips_requested,"
                " start_sec, crops, config_key, top_label) values (:p, :sha, 1, 'succeeded',"
                " 5, 1, current_timestamp, 'slow_r50', 'w', :w, 'single', 1, 0, 1, 'k', :l)"
                " returning id"),
                {"p": path, "sha": f"{i:064x}", "w": weights_id, "l": f"label{i}"}).scalar_one()
            ids.append(job_id)
            if vector is not None:
                blob = float16_from_floats(vector.tolist())
                conn.execute(text(
                    "insert into video_embeddings (job_id, model, weights_id, dim, norm, vector)"
                    " values (:j, 'slow_r50', :w, :d, :n, :v)"),
                    {"j": job_id, "w": weights_id, "d": len(vector), "n": norm(blob), "v": blob})
    engine.dispose()
    return ids


def test_similar_ranks_known_vectors_by_cosine_within_one_model_and_weights(
    database_url: str,
) -> None:
    rng = np.random.default_rng(3)
    q = rng.normal(size=DIM).clip(0) * 3  # post-ReLU-like: non-negative
    noise = rng.normal(size=DIM)
    made = [
        ("/q.mp4", "sha256:a", q),
        ("/near.mp4", "sha256:a", q + 0.05 * noise),
        ("/mid.mp4", "sha256:a", q + 0.8 * noise),
        ("/far.mp4", "sha256:a", rng.normal(size=DIM).clip(0)),
        ("/scaled.mp4", "sha256:a", 7.5 * q),  # cosine ignores length: ties with /q itself
        ("/opposite.mp4", "sha256:a", -q),
        ("/other-weights.mp4", "sha256:b", q),  # must not be compared
        ("/no-vector.mp4", "sha256:a", None),
        ("/alone.mp4", "sha256:c", q),
    ]
    ids = insert_videos(database_url, made)
    env = {"VIDQ_DATABASE_URL": database_url}
    out = vidq("similar", str(ids[0]), "--top", "10", "--format", "jsonl", env=env)
    got = [json.loads(line) for line in out.stdout.splitlines()]
    stored = {ids[i]: np.frombuffer(float16_from_floats(v.tolist()), "<f2").astype(np.float64)
              for i, (_, w, v) in enumerate(made) if v is not None and w == "sha256:a"}
    want = sorted(((cosine(stored[ids[0]], v), j) for j, v in stored.items() if j != ids[0]),
                  key=lambda t: (-t[0], t[1]))
    assert [g["job_id"] for g in got] == [j for _, j in want]
    assert [g["path"] for g in got] == ["/scaled.mp4", "/near.mp4", "/mid.mp4", "/far.mp4",
                                        "/opposite.mp4"]
    for g, (similarity, _) in zip(got, want):
        assert g["similarity"] == pytest.approx(similarity, abs=1e-6)
    assert got[0]["similarity"] == pytest.approx(1.0, abs=1e-6)
    assert got[-1]["similarity"] == pytest.approx(-1.0, abs=1e-6)
    assert "compared 5 vectors of slow_r50, weights sha256:a" in out.stderr
    top2 = vidq("similar", str(ids[0]), "--top", "2", "--format", "csv", env=env).stdout
    assert top2.splitlines()[0] == "rank,job_id,similarity,top_label,path"
    assert [line.split(",")[4] for line in top2.splitlines()[1:]] == ["/scaled.mp4", "/near.mp4"]

    alone = vidq("similar", str(ids[-1]), env=env)
    assert "no other video has an embedding from model slow_r50 with weights sha256:c" in (
        alone.stderr)
    assert len(alone.stdout.splitlines()) == 1  # the header only
    for job_id, needle in ((ids[7], f"job {ids[7]} has no embedding (status succeeded)"),
                           (999_999, "no job 999999")):
        proc = vidq("similar", str(job_id), env=env, check=False)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_similar_runs_on_a_producer_host_without_torch_or_numpy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    from vidq.db import make_engine
    from vidq.migrate import upgrade

    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    q = np.linspace(0, 1, 16)
    ids = insert_videos(url, [("/a.mp4", "w", q), ("/b.mp4", "w", q[::-1])])
    code = ("import json, sys\n"
            "from vidq.cli import main\n"
            "try:\n"
            f"    main(['similar', '{ids[0]}', '--format', 'jsonl'], standalone_mode=False)\n"
            "except SystemExit as exc:\n"
            "    assert not exc.code, exc.code\n"
            "heavy = [m for m in ('torch', 'numpy', 'av', 'pyarrow') if m in sys.modules]\n"
            "print(json.dumps(heavy))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False,
                          env={**os.environ, "VIDQ_DATABASE_URL": url})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert json.loads(lines[0])["job_id"] == ids[1]
    assert json.loads(lines[-1]) == []


# -- through a real worker ------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_worker_writes_the_vectors_of_each_clip_and_video_once(
    cluster: Any, corpus: Path,
) -> None:
    cluster.start_worker(VIDQ_EMBEDDINGS="clip")
    cluster.vidq("submit", str(corpus), "--recursive", "--batch", "w", "--strategy", "uniform",
                 "--clips", "3", "--crops", "3", "--wait")
    jobs = cluster.sql("select id, path, status, clips_done from jobs order by id")
    assert len(jobs) == 6 and {j[2] for j in jobs} == {"succeeded"}
    assert cluster.sql("select count(*), min(dim), max(dim) from video_embeddings") == [
        (6, DIM, DIM)]
    assert cluster.sql("select count(*) from clip_embeddings") == [(6 * 3,)]
    # One video's vectors, recomputed in this process with the same random weights:
    # the worker stored the features of the clips it scored, not anything else.
    job_id, path = jobs[0][:2]
    reference = classify(Classifier(model="x3d_xs", weights="random", device="cpu",
                                    precision="fp32", embeddings="clip"),
                         path, Sampling(strategy="uniform", clips=3, crops=3))
    stored = cluster.sql("select vector from clip_embeddings where job_id = :j "
                         "order by clip_index", j=job_id)
    want = vectors([c.embedding for c in reference.clips])  # type: ignore[misc]
    got = vectors([r[0] for r in stored])
    assert got.shape == want.shape == (3, DIM) and within_float16(got, want).all()
    (video,) = cluster.sql("select vector from video_embeddings where job_id = :j", j=job_id)
    assert reference.embedding is not None
    assert within_float16(vectors([video[0]]), vectors([reference.embedding])).all()
    # Another video's vector differs (by a few float16 steps: the corpus videos differ
    # only in their noise): each job got its own.
    (other,) = cluster.sql("select vector from video_embeddings where job_id = :j", j=jobs[1][0])
    assert (~within_float16(vectors([other[0]]), vectors([video[0]]))).mean() > 0.1
