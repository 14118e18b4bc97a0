"""The ``vidq`` command. Subcommands import their heavy halves lazily: a producer
host never imports torch."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click

from vidq.errors import VidqError
from vidq.settings import DECODER_KINDS, EMBEDDING_MODES, Settings


def fail(message: str) -> None:
    """One line on stderr, no traceback."""
    click.echo(f"vidq: error: {message}", err=True)


def warn(message: str) -> None:
    click.echo(f"vidq: warning: {message}", err=True)


def run_cli(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a VidqError into one line and exit status 2 (bad usage/config)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except VidqError as exc:
            fail(exc.message)
            sys.exit(2)

    return wrapper


def sampling_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that choose which clips of a video are classified."""
    options = [
        click.option("--model", default=None, help="Model preset (default slow_r50; VIDQ_MODEL)."),
        click.option(
            "--strategy",
            type=click.Choice(["single", "uniform", "sliding"]),
            default="single",
            show_default=True,
            help="single: one clip at --start-sec (the seed's); uniform: --clips evenly "
            "spaced; sliding: windows --stride seconds apart over the whole video.",
        ),
        click.option("--clips", type=click.IntRange(1, 1000), default=10, show_default=True),
        click.option("--stride", type=click.FloatRange(min=0.01), default=None,
                     help="Seconds between sliding windows (default: one clip span)."),
        click.option("--start-sec", type=click.FloatRange(min=0), default=0.0, show_default=True),
        click.option("--crops", type=click.Choice(["1", "3"]), default="1", show_default=True,
                     help="3 = left/centre/right crops, as in the published 3x10 eval."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


embeddings_option = click.option(
    "--embeddings", type=click.Choice(EMBEDDING_MODES), default=None,
    help="Keep the model's pooled features: per video, per video and clip, or not "
         "(VIDQ_EMBEDDINGS; default off).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vidq")
def main() -> None:
    """vidq: classify videos with PyTorchVideo, locally or across a Celery cluster."""


@main.command()
@click.argument("paths", nargs=-1, required=True)
@sampling_options
@click.option("--weights", default=None, help="pretrained | PATH | random (VIDQ_WEIGHTS).")
@click.option("--device", default=None, help="auto | cpu | cuda[:N] (VIDQ_DEVICE).")
@click.option("--precision", default=None,
              help="auto | fp32 | bf16 | fp16 | int8 (VIDQ_PRECISION).")
@click.option("--int8-calibration", default=None,
              help="Calibration file for int8, from `vidq calibrate` (VIDQ_INT8_CALIBRATION).")
@click.option("--batch-size", type=int, default=None, help="Clips per forward pass.")
@click.option("--top-k", type=click.IntRange(1, 400), default=None)
@embeddings_option
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per video (with --embeddings: the vectors too).")
@run_cli
def classify(
    paths: tuple[str, ...],
    model: str | None,
    strategy: str,
    clips: int,
    stride: float | None,
    start_sec: float,
    crops: str,
    weights: str | None,
    device: str | None,
    precision: str | None,
    int8_calibration: str | None,
    batch_size: int | None,
    top_k: int | None,
    embeddings: str | None,
    as_json: bool,
) -> None:
    """Classify video files or objects in this process (no Redis, no database)."""
    from vidq.media import check_input
    from vidq.sampling import Sampling
    from vidq.storage import StorageConfig
    from worker.decoders import InputPolicy
    from worker.inference import Classifier
    from worker.pipeline import classify_many
    from worker.plan import Plan

    settings = Settings.from_env(
        model=model, weights=weights, device=device, precision=precision,
        int8_calibration=int8_calibration, batch_size=batch_size, top_k=top_k,
        embeddings=embeddings,
    )
    # --clips counts only for uniform; report the one clip that single samples.
    sampling = Sampling(
        strategy=strategy, clips=1 if strategy == "single" else clips, stride_s=stride,
        start_sec=start_sec, crops=int(crops),
    )
    failures = 0
    good: list[str] = []
    for raw in paths:
        try:
            good.append(check_input(
                raw, media_roots=settings.media_roots, max_file_bytes=settings.max_file_bytes,
                storage_config=StorageConfig.from_settings(settings)))
        except VidqError as exc:
            fail(exc.message)
            failures += 1
    if good:
        classifier = Classifier.from_settings(settings)
        if classifier.weights_id == "random-init":
            warn("random weights (--weights random): predictions are meaningless.")
        t0 = time.perf_counter()
        n_clips = 0
        plan = Plan.from_settings(settings, on_gpu=classifier.device.type == "cuda")
        for result in classify_many(classifier, good, sampling, plan=plan,
                                    inputs=InputPolicy.from_settings(settings)):
            if isinstance(result, VidqError):
                fail(result.message)
                failures += 1
                continue
            n_clips += len(result.clips)
            if as_json:
                click.echo(json.dumps(result.to_json()))
            else:
                labels = ", ".join(f"{t.label} ({t.score:.3f})" for t in result.top)
                click.echo(f"{result.path}: Top {len(result.top)} predicted labels: {labels}")
        elapsed = time.perf_counter() - t0
        if n_clips:
            click.echo(
                f"vidq: {n_clips} clips in {elapsed:.2f}s ({n_clips / elapsed:.2f} clips/s, "
                f"{classifier.precision} on {classifier.device}, "
                f"weights {classifier.weights_id[:19]}"
                + (f", calibration {classifier.calibration_id[:19]}" if classifier.calibration_id
                   else "") + ")",
                err=True,
            )
    if failures:
        sys.exit(1)


def _request(settings: Settings, *, model: str | None, strategy: str, clips: int,
             stride: float | None, start_sec: float, crops: str, priority: int) -> Any:
    from producer.submit import JobRequest

    return JobRequest(
        model=model or settings.model, weights=settings.weights, strategy=strategy,
        clips=clips, stride_s=stride, start_sec=start_sec, crops=int(crops), priority=priority,
    )


def submission_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.argument("inputs", nargs=-1),
        click.option("--recursive", "-r", is_flag=True, help="Descend into directories."),
        click.option("--glob", "pattern", default=None,
                     help="File pattern inside directories (default: video extensions)."),
        click.option("--manifest", "manifests", multiple=True,
                     help="File listing paths: one a line, or CSV/JSONL with a 'path' column."),
        click.option("--batch", default=None, help="Batch name (default: batch-<timestamp>)."),
        click.option("--priority", type=click.IntRange(0, 9), default=5, show_default=True,
                     help="0 lowest .. 9 highest."),
        click.option("--force", is_flag=True, help="Run again even if already classified."),
        click.option("--weights", default=None, help="pretrained | PATH | random (VIDQ_WEIGHTS)."),
        click.option("--notify", default=None, metavar="URL",
                     help="POST a JSON summary here when the batch is done (signed with "
                          "VIDQ_WEBHOOK_SECRET)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return sampling_options(fn)


def _submit(settings: Settings, inputs: tuple[str, ...], *, recursive: bool, pattern: str | None,
            manifests: tuple[str, ...], batch: str | None, force: bool, publish: bool,
            request: Any, notify: str | None = None) -> Any:
    from tqdm import tqdm

    from producer.submit import discover, submit
    from vidq.storage import StorageConfig

    if not inputs and not manifests:
        raise click.UsageError("give files, directories or --manifest.")
    paths = list(discover(inputs, recursive=recursive, pattern=pattern, manifests=manifests,
                          media_roots=settings.media_roots,
                          storage_config=StorageConfig.from_settings(settings)))
    with tqdm(total=len(paths), desc="recording", unit="job", disable=len(paths) < 200,
              file=sys.stderr) as bar:
        report = submit(paths, settings=settings, request=request, batch=batch, force=force,
                        publish=publish, on_reject=fail, progress=bar.update, notify=notify)
    click.echo(
        f"batch {report.batch}: {len(report.job_ids)} jobs recorded, {report.duplicates} already "
        f"classified or in flight (use --force to redo what is done), "
        f"{len(report.rejected)} rejected", err=True,
    )
    if report.publish_error:
        fail(report.publish_error)
    return report


@main.command()
@submission_options
@click.option("--wait", is_flag=True, help="Follow the batch until it is done.")
@run_cli
def submit(inputs: tuple[str, ...], recursive: bool, pattern: str | None,
           manifests: tuple[str, ...], batch: str | None, priority: int, force: bool,
           weights: str | None, model: str | None, strategy: str, clips: int,
           stride: float | None, start_sec: float, crops: str, wait: bool,
           notify: str | None) -> None:
    """Record jobs in the results database and enqueue them for workers."""
    from vidq.notify import notify_if_done

    settings = Settings.from_env(weights=weights)
    request = _request(settings, model=model, strategy=strategy, clips=clips, stride=stride,
                       start_sec=start_sec, crops=crops, priority=priority)
    report = _submit(settings, inputs, recursive=recursive, pattern=pattern, manifests=manifests,
                     batch=batch, force=force, publish=True, request=request, notify=notify)
    if not report.job_ids:
        notify_if_done(settings, report.batch_id)  # nothing to wait for: done already
    if wait and report.job_ids and not report.publish_error:
        _wait(settings, report.batch)
    if report.rejected or report.publish_error:
        sys.exit(1)


def _wait(settings: Settings, batch: str, poll_s: float = 1.0) -> None:
    from tqdm import tqdm

    from producer.query import status_summary
    from vidq.db import sessions

    make_session = sessions(settings.database_url, auto_migrate=settings.auto_migrate)
    with make_session() as session:
        total = sum(status_summary(session, batch).counts.values())
    with tqdm(total=total, desc=batch, unit="job", file=sys.stderr) as bar:
        while True:
            with make_session() as session:
                summary = status_summary(session, batch)
            c = summary.counts
            done = c["succeeded"] + c["failed"] + c["cancelled"]
            bar.update(done - bar.n)
            bar.set_postfix(ok=c["succeeded"], failed=c["failed"], running=c["running"])
            if done >= total:
                break
            time.sleep(poll_s)


@main.command()
@submission_options
@click.option("--device", default=None, help="auto | cpu | cuda[:N] (VIDQ_DEVICE).")
@click.option("--precision", default=None,
              help="auto | fp32 | bf16 | fp16 | int8 (VIDQ_PRECISION).")
@click.option("--int8-calibration", default=None,
              help="Calibration file for int8, from `vidq calibrate` (VIDQ_INT8_CALIBRATION).")
@embeddings_option
@run_cli
def run(inputs: tuple[str, ...], recursive: bool, pattern: str | None,
        manifests: tuple[str, ...], batch: str | None, priority: int, force: bool,
        weights: str | None, model: str | None, strategy: str, clips: int,
        stride: float | None, start_sec: float, crops: str, device: str | None,
        precision: str | None, notify: str | None, int8_calibration: str | None,
        embeddings: str | None) -> None:
    """Submit and classify here, with no broker: the embedded mode (SQLite by default)."""
    from tqdm import tqdm

    from worker.embedded import run_jobs
    from worker.inference import Classifier

    settings = Settings.from_env(weights=weights, device=device, precision=precision,
                                 int8_calibration=int8_calibration, model=model,
                                 embeddings=embeddings)
    request = _request(settings, model=model, strategy=strategy, clips=clips, stride=stride,
                       start_sec=start_sec, crops=crops, priority=priority)
    classifier = Classifier.from_settings(settings)  # fail on missing weights before recording
    if classifier.weights_id == "random-init":
        warn("random weights (--weights random): every result row says weights_id=random-init.")
    report = _submit(settings, inputs, recursive=recursive, pattern=pattern, manifests=manifests,
                     batch=batch, force=force, publish=False, request=request, notify=notify)
    failed = 0
    if report.resumed:
        click.echo(f"resuming {len(report.resumed)} jobs an interrupted `vidq run` left "
                   "unfinished", err=True)
    todo = len(report.job_ids) + len(report.resumed)
    with tqdm(total=todo, desc=report.batch, unit="video", file=sys.stderr) as bar:
        def progress(outcome: Any) -> None:
            nonlocal failed
            if outcome.status == "failed":
                failed += 1
                fail(f"job {outcome.job_id}: {outcome.detail}")
            bar.update(1)

        run_jobs(report.job_ids + report.resumed, settings=settings, on_outcome=progress,
                 classifier=classifier)
    from vidq.notify import notify_if_done

    if notify_if_done(settings, report.batch_id) == "failed":
        warn(f"batch {report.batch}: the completion webhook was not delivered.")
    click.echo(f"batch {report.batch}: {todo - failed} succeeded, {failed} failed. "
               f"See: vidq results --batch {report.batch}", err=True)
    if failed or report.rejected:
        sys.exit(1)


def _status(settings: Settings, batch: str | None) -> Any:
    """Counts from the database, plus the broker's queue depths when it answers. Jobs
    that `vidq run` recorded never went through a broker: with no other job in view,
    the broker is not asked."""
    from sqlalchemy import select

    from producer.query import batch_id, status_summary, worker_hosts
    from vidq.db import Job, sessions
    from vidq.queue import queue_depths

    with sessions(settings.database_url, auto_migrate=settings.auto_migrate)() as session:
        summary = status_summary(session, batch)
        summary.workers = worker_hosts(session)
        bid = batch_id(session, batch)
        published = select(Job.id).where(Job.enqueued_at.is_not(None)).limit(1)
        if bid is not None:
            published = published.where(Job.batch_id == bid)
        brokered = session.scalar(published) is not None
    if not brokered:
        return summary
    try:
        summary.queue_depth = queue_depths(settings, [settings.queue])
    except Exception as exc:  # the broker is down: the database view still stands
        warn(f"broker not reachable for queue depths ({type(exc).__name__})")
    return summary


@main.command()
@click.option("--batch", default=None)
@click.option("--json", "as_json", is_flag=True)
@run_cli
def status(batch: str | None, as_json: bool) -> None:
    """Counts by status, clips/s over the last 10 minutes, an ETA, the oldest queued job
    and the broker's queue depth."""
    settings = Settings.from_env()
    summary = _status(settings, batch)
    if as_json:
        click.echo(json.dumps(summary.to_json()))
        return
    counts = "  ".join(f"{k} {v}" for k, v in summary.counts.items())
    eta = "-" if summary.eta_s is None else f"{summary.eta_s:.0f}s"
    click.echo(f"{batch or 'all batches'}: {counts}")
    click.echo(f"clips done {summary.clips_done}  {summary.jobs_per_s:.2f} jobs/s  "
               f"{summary.clips_per_s:.2f} clips/s  ETA {eta}")
    if summary.oldest_queued_s is not None:
        click.echo(f"oldest queued job: submitted {summary.oldest_queued_s:.0f}s ago")
    if summary.queue_depth:
        waiting = {q: sum(d.values()) for q, d in summary.queue_depth.items()}
        click.echo("broker: " + "  ".join(f"{q} {n}" for q, n in waiting.items()))
    if summary.workers:
        click.echo("workers:")
        for w in summary.workers:
            error = f"  last error: {w['last_error']}" if w["last_error"] else ""
            click.echo(f"  {w['host']}  {w['queue']}  {w['state']} since {w['since']}  "
                       f"seen {w['seen_s_ago']:.0f}s ago{error}")


@main.command("metrics")
@click.option("--batch", default=None)
@run_cli
def metrics_cmd(batch: str | None) -> None:
    """The same view as `vidq status --json`, in Prometheus' text format (for a
    textfile collector or a push gateway, where workers are not scraped)."""
    settings = Settings.from_env()
    summary = _status(settings, batch)
    label = f'batch="{batch}"' if batch else 'batch=""'
    lines = ["# TYPE vidq_db_jobs gauge"]
    lines += [f'vidq_db_jobs{{{label},status="{k}"}} {v}' for k, v in summary.counts.items()]
    lines += ["# TYPE vidq_db_clips_per_second gauge",
              f"vidq_db_clips_per_second{{{label}}} {summary.clips_per_s:.6g}",
              "# TYPE vidq_db_clips_done gauge",
              f"vidq_db_clips_done{{{label}}} {summary.clips_done}",
              "# TYPE vidq_db_oldest_queued_seconds gauge",
              f"vidq_db_oldest_queued_seconds{{{label}}} {summary.oldest_queued_s or 0:.6g}"]
    if summary.queue_depth:
        lines.append("# TYPE vidq_broker_queue_depth gauge")
        for queue, depths in summary.queue_depth.items():
            for priority, n in depths.items():
                lines.append(
                    f'vidq_broker_queue_depth{{queue="{queue}",priority="{priority}"}} {n}')
    click.echo("\n".join(lines))


def write_rows(rows: Iterable[dict[str, Any]], *, fmt: str, columns: Sequence[str],
               header: str, line: Callable[[dict[str, Any]], str]) -> None:
    """Rows to stdout as they stream: CSV, JSON lines, or a table of ``header`` and ``line``."""
    import csv

    out = sys.stdout  # (click.get_text_stream is deprecated)
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    elif fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row) + "\n")
    else:
        out.write(header + "\n")
        for row in rows:
            out.write(line(row) + "\n")


@main.command()
@click.option("--batch", default=None)
@click.option("--label", default=None, help="Only videos with this label (any rank).")
@click.option("--min-score", type=float, default=None)
@click.option("--all-ranks", is_flag=True, help="Every top-k label, not just the top one.")
@click.option("--limit", type=int, default=None)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "jsonl"]), default="table",
              show_default=True)
@run_cli
def results(batch: str | None, label: str | None, min_score: float | None, all_ranks: bool,
            limit: int | None, fmt: str) -> None:
    """Video-level labels of succeeded jobs (streamed: fine for millions of rows)."""
    from producer.query import RESULT_COLUMNS, iter_results
    from vidq.db import sessions

    settings = Settings.from_env()
    with sessions(settings.database_url, auto_migrate=settings.auto_migrate)() as session:
        rows = iter_results(session, batch=batch, label=label, min_score=min_score,
                            all_ranks=all_ranks, limit=limit)
        write_rows(rows, fmt=fmt, columns=RESULT_COLUMNS,
                   header=f"{'job':>7} {'#':>2} {'label':32} {'score':>6}  {'weights':19}  path",
                   line=lambda row: (
                       f"{row['job_id']:>7} {row['rank']:>2} {row['label'][:32]:32} "
                       f"{row['score']:6.3f}  {(row['weights_id'] or '')[:19]:19}  {row['path']}"))


@main.command()
@click.option("--batch", default=None)
@click.option("--label", default=None, help="Only segments of this label.")
@click.option("--min-score", type=float, default=None, help="Only segments whose mean score "
              "is at least this (they were cut at VIDQ_SEGMENT_MIN_SCORE when stored).")
@click.option("--min-duration", type=click.FloatRange(min=0), default=None,
              help="Only segments lasting at least this many seconds.")
@click.option("--limit", type=int, default=None)
@click.option("--job", "job_id", type=int, default=None, help="Only this job's segments.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="With --job: derive the job's segments again from its clip rows at this "
                   "clip score (what VIDQ_SEGMENT_MIN_SCORE sets), as the viewer's slider does.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "jsonl"]), default="table",
              show_default=True)
@run_cli
def segments(batch: str | None, label: str | None, min_score: float | None,
             min_duration: float | None, limit: int | None, job_id: int | None,
             threshold: float | None, fmt: str) -> None:
    """Label segments of succeeded jobs: where in each video a label holds (streamed)."""
    from producer.query import SEGMENT_COLUMNS, iter_segments
    from vidq.db import sessions
    from vidq.errors import ConfigError

    settings = Settings.from_env()
    if threshold is not None and job_id is None:
        raise ConfigError("--threshold needs --job: it derives one job's segments again.")
    with sessions(settings.database_url, auto_migrate=settings.auto_migrate)() as session:
        if job_id is not None:
            from vidq.segments import SegmentRules
            from vidq.viewer.data import filter_segments, job_segments

            rules = None if threshold is None else \
                SegmentRules.from_settings(settings.replace(segment_min_score=threshold))
            rows: Iterable[dict[str, Any]] = filter_segments(
                job_segments(session.connection(), job_id, rules=rules), batch=batch,
                label=label, min_score=min_score, min_duration_s=min_duration, limit=limit)
        else:
            rows = iter_segments(session, batch=batch, label=label, min_score=min_score,
                                 min_duration_s=min_duration, limit=limit)
        write_rows(rows, fmt=fmt, columns=SEGMENT_COLUMNS,
                   header=f"{'job':>7} {'label':32} {'start':>8} {'end':>8} {'mean':>6} "
                          f"{'peak':>6} {'clips':>5}  path",
                   line=lambda row: (
                       f"{row['job_id']:>7} {row['label'][:32]:32} {row['start_sec']:8.2f} "
                       f"{row['end_sec']:8.2f} {row['mean_score']:6.3f} "
                       f"{row['peak_score']:6.3f} {row['clips']:>5}  {row['path']}"))


@main.command()
@click.argument("job_id", type=int)
@click.option("--top", type=click.IntRange(1, 10_000), default=10, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "jsonl"]), default="table",
              show_default=True)
@run_cli
def similar(job_id: int, top: int, fmt: str) -> None:
    """The videos nearest to JOB_ID's by cosine similarity of their embeddings, among
    those made by the same model and weights (needs VIDQ_EMBEDDINGS=video or clip)."""
    from vidq.db import get_engine
    from vidq.embeddings import nearest

    settings = Settings.from_env()
    engine = get_engine(settings.database_url, auto_migrate=settings.auto_migrate)
    t0 = time.perf_counter()
    with engine.connect() as conn:
        search = nearest(conn, job_id, top=top)
    rows = [{"rank": rank, "job_id": n.job_id, "similarity": round(n.similarity, 6),
             "top_label": n.top_label, "path": n.path}
            for rank, n in enumerate(search.neighbours, start=1)]
    write_rows(rows, fmt=fmt, columns=["rank", "job_id", "similarity", "top_label", "path"],
               header=f"{'#':>3} {'job':>7} {'cosine':>8}  {'top label':32}  path",
               line=lambda r: (f"{r['rank']:>3} {r['job_id']:>7} {r['similarity']:8.4f}  "
                               f"{(r['top_label'] or '')[:32]:32}  {r['path']}"))
    if not search.compared:
        warn(f"no other video has an embedding from model {search.model} with weights "
             f"{search.weights_id[:19]}; vectors of other models or weights do not compare.")
    click.echo(f"vidq: compared {search.compared} vectors of {search.model}, weights "
               f"{search.weights_id[:19]}, in {time.perf_counter() - t0:.2f}s", err=True)


@main.command()
@click.option("--batch", required=True, help="The batch to export.")
@click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl", "csv"]),
              default="parquet", show_default=True)
@click.option("--out", "out_dir", required=True,
              help="Directory for videos.FMT, clips.FMT and segments.FMT: a local path "
                   "or an object-store prefix (s3://bucket/exports/b1).")
@run_cli
def export(batch: str, fmt: str, out_dir: str) -> None:
    """A batch's videos, clips and segments as files for data tools (streamed: flat
    memory for any number of rows)."""
    from producer.export import export_batch
    from vidq.db import get_engine
    from vidq.errors import ConfigError

    settings = Settings.from_env()
    engine = get_engine(settings.database_url, auto_migrate=settings.auto_migrate)
    if engine.dialect.name == "postgresql":
        # One snapshot for all three files, while workers keep committing.
        engine = engine.execution_options(isolation_level="REPEATABLE READ")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError("Parquet needs pyarrow: pip install 'vidq[export]' (or use "
                              "--format jsonl or csv).") from None
    t0 = time.perf_counter()
    from vidq.storage import StorageConfig

    with engine.connect() as conn:
        report = export_batch(conn, batch=batch, fmt=fmt, out_dir=out_dir,
                              storage_config=StorageConfig.from_settings(settings))
    for name, path in report.files.items():
        click.echo(f"{path}: {report.rows[name]} rows")
    click.echo(f"vidq: batch {batch} exported in {time.perf_counter() - t0:.1f}s", err=True)


@main.command()
@click.argument("job_id", type=int)
@click.option("--json", "as_json", is_flag=True)
@run_cli
def show(job_id: int, as_json: bool) -> None:
    """One job: metadata, video labels and the per-clip timeline."""
    from producer.query import show_job
    from vidq.db import sessions

    settings = Settings.from_env()
    with sessions(settings.database_url, auto_migrate=settings.auto_migrate)() as session:
        job = show_job(session, job_id)
    if as_json:
        click.echo(json.dumps(job, default=str))
        return
    for key in ("id", "path", "batch", "status", "attempts", "error_kind", "error_message",
                "model", "weights_id", "precision", "device", "strategy", "duration_s", "fps",
                "width", "height", "frames", "codec", "worker_host", "submitted_at",
                "started_at", "finished_at"):
        if job.get(key) is not None:
            click.echo(f"{key:14s} {job[key]}")
    if job["labels"]:
        click.echo("labels         "
                   + ", ".join(f"{v['label']} ({v['score']:.3f})" for v in job["labels"]))
    for clip in job["clips"]:
        top = ", ".join(f"{t['label']} ({t['score']:.3f})" for t in clip["top"][:3])
        click.echo(f"  clip {clip['clip_index']:3d} "
                   f"{clip['start_sec']:8.2f}-{clip['end_sec']:8.2f}s  {top}")


def _publish(settings: Settings, tasks: list[Any]) -> None:
    from producer.submit import enqueue

    sent, error = enqueue(settings, tasks) if tasks else (0, None)
    if error:
        fail(error)
        sys.exit(1)


@main.command()
@click.option("--batch", default=None)
@click.option("--failed", "only_failed", is_flag=True, default=True,
              help="Retry failed jobs (the default).")
@click.option("--cancelled", is_flag=True, help="Also retry cancelled jobs.")
@click.argument("job_ids", nargs=-1, type=int)
@run_cli
def retry(batch: str | None, only_failed: bool, cancelled: bool, job_ids: tuple[int, ...]) -> None:
    """Queue failed (and optionally cancelled) jobs again."""
    from producer.query import requeue
    from vidq.db import JobStatus, sessions

    settings = Settings.from_env()
    statuses = (JobStatus.FAILED.value,) + ((JobStatus.CANCELLED.value,) if cancelled else ())
    make = sessions(settings.database_url, auto_migrate=settings.auto_migrate)
    with make() as session, session.begin():
        tasks = requeue(session, batch=batch, statuses=statuses, job_ids=list(job_ids),
                        queue=settings.queue)
    _publish(settings, tasks)
    click.echo(f"{len(tasks)} jobs queued again")


@main.command()
@click.option("--batch", default=None)
@click.argument("job_ids", nargs=-1, type=int)
@run_cli
def cancel(batch: str | None, job_ids: tuple[int, ...]) -> None:
    """Cancel the queued and running jobs of a batch (or the given ids)."""
    from producer.query import cancel as cancel_jobs
    from vidq.db import sessions

    if batch is None and not job_ids:
        raise click.UsageError("give --batch or job ids.")
    from producer.query import batches_of
    from vidq.notify import notify_if_done

    settings = Settings.from_env()
    make = sessions(settings.database_url, auto_migrate=settings.auto_migrate)
    with make() as session, session.begin():
        n = cancel_jobs(session, batch=batch, job_ids=list(job_ids))
        touched = batches_of(session, batch=batch, job_ids=list(job_ids))
    click.echo(f"{n} jobs cancelled")
    for bid in touched:  # cancelling the last active jobs completes a batch
        notify_if_done(settings, bid)


@main.command()
@click.option("--older-than", type=float, default=None,
              help="Seconds a queued job must wait before counting as lost "
                   "(default VIDQ_RECONCILE_AFTER_S).")
@click.option("--dry-run", is_flag=True, help="Only list what would be re-enqueued.")
@run_cli
def reconcile(older_than: float | None, dry_run: bool) -> None:
    """Re-enqueue jobs no live task will finish (stale running, or lost from Redis)."""
    from vidq.notify import wait_for_deliveries
    from vidq.reconcile import reconcile as run_reconcile

    settings = Settings.from_env()
    report = run_reconcile(settings, older_than_s=older_than, dry_run=dry_run)
    # Webhooks go out in the background; this process sends them before it exits
    # (what is still unsent then, the next reconcile sends).
    wait_for_deliveries(timeout_s=150)
    verb = "would re-enqueue" if dry_run else "re-enqueued"
    click.echo(f"{verb} {len(report.stale_running)} stale running and "
               f"{len(report.lost_queued)} lost queued jobs")
    if not report.broker_checked and not dry_run:
        warn("the broker is not Redis: queued jobs were not checked against it.")


@main.command()
@click.option("--device", default=None, help="auto | cpu | cuda[:N] (VIDQ_DEVICE).")
@click.option("--concurrency", type=int, default=None,
              help="Worker processes (default: one per GPU, or one on CPU).")
@click.option("--inflight", type=click.IntRange(min=1), default=None,
              help="Jobs each process holds at once (VIDQ_INFLIGHT; default: enough to keep "
                   "its decoders and model busy).")
@click.option("--decode-workers", type=click.IntRange(min=1), default=None,
              help="Videos each process decodes at once (VIDQ_DECODE_WORKERS).")
@click.option("--decoders", type=click.Choice(DECODER_KINDS), default=None,
              help="Decode in threads of each worker process or in processes of their own "
                   "(VIDQ_DECODERS; auto: processes when there are several decoders).")
@click.option("--queues", default=None, help="Comma-separated queues (default VIDQ_QUEUE).")
@click.option("--loglevel", default="INFO", show_default=True)
@run_cli
def worker(device: str | None, concurrency: int | None, inflight: int | None,
           decode_workers: int | None, decoders: str | None, queues: str | None,
           loglevel: str) -> None:
    """Start worker processes (one per GPU): each loads the model once and keeps
    VIDQ_INFLIGHT jobs in flight through its decoders and model."""
    from vidq.db import dispose_engines, wait_for_database
    from worker.plan import Plan
    from worker.supervisor import run_workers

    settings = Settings.from_env(device=device, inflight=inflight,
                                 decode_workers=decode_workers, decoders=decoders)
    # Refuse a schema that is behind or ahead here, in one line, not in every process;
    # wait out a database that is down rather than failing messages.
    wait_for_database(settings.database_url, auto_migrate=settings.auto_migrate, on_wait=warn)
    dispose_engines()
    plan = Plan.for_host(settings, processes=concurrency)
    click.echo(f"vidq worker: {plan.processes} process(es), {plan.inflight} jobs in flight "
               f"and {plan.decoder_count} decoders ({plan.decoder_kind}) each, batches of "
               f"{plan.batch_size}", err=True)
    sys.exit(run_workers(settings, plan, queues=queues or settings.queue, loglevel=loglevel))


@main.command()
@click.option("--batch", default=None, help="Purge this batch's finished jobs.")
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), default=None,
              metavar="DAYS", help="Purge jobs finished more than DAYS ago.")
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@click.option("--chunk", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Jobs deleted per transaction.")
@run_cli
def purge(batch: str | None, older_than: float | None, dry_run: bool, chunk: int) -> None:
    """Delete finished jobs and their results, in chunks; active jobs are never touched."""
    from producer.retention import purge as run_purge
    from vidq.db import sessions

    settings = Settings.from_env()
    report = run_purge(sessions(settings.database_url, auto_migrate=settings.auto_migrate),
                       batch=batch, older_than_days=older_than, dry_run=dry_run, chunk=chunk)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {report.jobs} jobs, {report.clip_rows} clip rows, {report.label_rows} "
               f"label rows and {len(report.batches)} empty batches"
               + (f" ({', '.join(report.batches[:10])})" if report.batches else "")
               + f"; with the jobs {report.segment_rows} segment rows and "
               f"{report.embedding_rows} embedding rows")
    if report.kept_active:
        click.echo(f"kept {report.kept_active} queued or running jobs (cancel them first to "
                   "purge them)", err=True)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; beyond loopback it needs VIDQ_VIEWER_TOKEN.")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True)
@run_cli
def serve(host: str, port: int) -> None:
    """Look at the results in a browser: batches, videos with label lanes and
    thumbnails, search (read-only; needs `pip install 'vidq[viewer]'`)."""
    try:
        from vidq.viewer.app import check_bind, create_app, run_app
    except ImportError as exc:
        raise_missing_viewer(exc)
    settings = Settings.from_env()
    check_bind(host, settings)
    app = create_app(settings)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"vidq: viewer on http://{shown}:{port}/ (Ctrl-C stops it)", err=True)
    run_app(app, host=host, port=port)


@main.command()
@click.option("--batch", required=True, help="The batch to report.")
@click.option("--out", "out_dir", required=True, help="Directory for the static pages.")
@run_cli
def report(batch: str, out_dir: str) -> None:
    """Write a batch's viewer pages as static files that open from file:// (no server)."""
    from pathlib import Path

    try:
        from vidq.viewer.report import write_report
    except ImportError as exc:
        raise_missing_viewer(exc)
    summary = write_report(Settings.from_env(), batch=batch, out_dir=Path(out_dir))
    for line in summary.skipped:
        warn(line)
    click.echo(f"vidq: wrote {summary.pages} pages and {summary.thumbnails} thumbnails; "
               f"open {Path(out_dir) / 'index.html'}", err=True)


def raise_missing_viewer(exc: ImportError) -> Any:
    from vidq.errors import ConfigError

    raise ConfigError(f"the viewer needs its extra ({exc.name or exc} is missing): "
                      "pip install 'vidq[viewer]'.") from None


@main.group()
def db() -> None:
    """The results database's schema: upgrade, current revision, history."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target revision.")
@click.option("--sql", "as_sql", is_flag=True,
              help="Print the SQL for a DBA instead of running it.")
@run_cli
def db_upgrade(revision: str, as_sql: bool) -> None:
    """Migrate the database to this vidq's schema (a 0.1.0 database is stamped first)."""
    from sqlalchemy.exc import OperationalError

    from vidq import migrate
    from vidq.db import make_engine, mask_url, unreachable

    settings = Settings.from_env()
    url = settings.database_url
    engine = make_engine(url)
    try:
        if as_sql:
            # From where the database stands, when it can be reached; else from empty.
            try:
                with engine.connect() as conn:
                    state = migrate.schema_state(conn)
                start = migrate.BASELINE if state.legacy else state.current
            except OperationalError:
                start = None
            click.echo(migrate.upgrade_sql(url, from_revision=start, revision=revision), nl=False)
            return
        try:
            before, after = migrate.upgrade(engine, revision)
        except OperationalError as exc:
            raise unreachable(url, exc) from None
    finally:
        engine.dispose()
    if before.current == after.current and not before.legacy:
        click.echo(f"{mask_url(url)}: already at revision {after.current} (head {after.head})")
    else:
        click.echo(f"{mask_url(url)}: {before.describe()} -> revision {after.current}")


@db.command("downgrade")
@click.argument("revision")
@run_cli
def db_downgrade(revision: str) -> None:
    """Migrate the database back to REVISION (``base`` drops every vidq table)."""
    from vidq import migrate
    from vidq.db import make_engine, mask_url

    settings = Settings.from_env()
    engine = make_engine(settings.database_url)
    try:
        before, after = migrate.downgrade(engine, revision)
    finally:
        engine.dispose()
    click.echo(f"{mask_url(settings.database_url)}: {before.describe()} -> {after.describe()}")


@db.command("current")
@run_cli
def db_current() -> None:
    """The database's schema revision, and this vidq's."""
    from sqlalchemy.exc import OperationalError

    from vidq import migrate
    from vidq.db import make_engine, mask_url, unreachable

    settings = Settings.from_env()
    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            state = migrate.schema_state(conn)
    except OperationalError as exc:
        raise unreachable(settings.database_url, exc) from None
    finally:
        engine.dispose()
    verdict = ("up to date" if state.up_to_date else
               "newer than this vidq" if not state.known else "behind: run `vidq db upgrade`")
    click.echo(f"{mask_url(settings.database_url)}: {state.describe()}; this vidq: "
               f"{state.head} ({verdict})")
    if not state.up_to_date:
        sys.exit(1)


@db.command("history")
def db_history() -> None:
    """Every schema revision, oldest first."""
    from vidq import migrate

    head = migrate.head_revision()
    for rev, down, doc in migrate.history():
        mark = " (head)" if rev == head else ""
        click.echo(f"{down or 'base':>6} -> {rev}{mark}  {doc}")


@main.command()
@click.argument("paths", nargs=-1, required=True)
@click.option("--out", "out", required=True, help="Calibration file to write.")
@click.option("--clips", type=click.IntRange(1, 10000), default=32, show_default=True,
              help="Clips run through the float model, spread evenly over the videos.")
@click.option("--model", default=None, help="Model preset (default slow_r50; VIDQ_MODEL).")
@click.option("--weights", default=None, help="pretrained | PATH | random (VIDQ_WEIGHTS).")
@run_cli
def calibrate(paths: tuple[str, ...], out: str, clips: int, model: str | None,
              weights: str | None) -> None:
    """Record int8 activation ranges of the float model on your videos (for --precision int8)."""
    from vidq.media import check_video_path
    from worker import quantize
    from worker.models import fold_batch_norms, get_preset, load_model

    settings = Settings.from_env(model=model, weights=weights)
    preset = get_preset(settings.model)
    quantize.refuse_unsupported_preset(preset)
    videos = [check_video_path(p, media_roots=settings.media_roots,
                               max_file_bytes=settings.max_file_bytes) for p in paths]
    loaded = load_model(preset, settings.weights, sha256=settings.weights_sha256)
    fold_batch_norms(loaded.module)  # observe the model that int8 will quantize
    t0 = time.perf_counter()
    calibration = quantize.calibrate(
        loaded.module, preset=preset, weights_id=loaded.weights_id,
        views=quantize.calibration_views(videos, preset=preset, clips=clips),
    )
    quantize.save_calibration(calibration, out)
    click.echo(f"calibration {calibration.calibration_id} ({calibration.clips} clips of "
               f"{len(videos)} videos, {preset.name}, weights {loaded.weights_id[:19]}, "
               f"{time.perf_counter() - t0:.1f}s) written to {out}; use it with "
               f"--precision int8 and VIDQ_INT8_CALIBRATION={out}", err=True)


@main.command()
def models() -> None:
    """List the model presets."""
    from worker.models import PRESETS

    for p in PRESETS.values():
        click.echo(
            f"{p.name:10s} {p.num_frames}x{p.sampling_rate} frames, side {p.side_size}, "
            f"crop {p.crop_size}, clip {float(p.clip_duration):.3f}s  {p.checkpoint_url}"
        )


if __name__ == "__main__":
    main()
