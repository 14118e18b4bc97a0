"""``vidq report --batch NAME --out DIR``: the viewer's pages as static files.

An ``index.html`` (the batch: counts, failed jobs, videos), a ``video-ID.html`` per
succeeded video, ``thumbs/`` beside them and the script and style under ``static/``.
Each page embeds its own data as JSON, so the folder opens from ``file://`` with no
server and no request for a local file; the player points at the video file itself
(``file://`` URI), which the browser plays from disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from vidq import storage
from vidq.db import Batch, Job, JobStatus
from vidq.errors import InputError, VidqError
from vidq.media import check_video_path, open_video
from vidq.segments import SegmentRules
from vidq.settings import Settings
from vidq.viewer import data
from vidq.viewer.pages import STATIC_FILES, ReportLinks, environment, gallery, static_text
from vidq.viewer.thumbs import decode_jpeg, quantize_ms


@dataclass
class ReportSummary:
    pages: int
    thumbnails: int
    skipped: list[str]
    """Videos (and thumbnails) left out, one line each: why."""


def write_report(settings: Settings, *, batch: str, out_dir: Path) -> ReportSummary:
    """Write the batch's report into ``out_dir`` (created; files of the same names are
    replaced)."""
    engine = data.readonly_engine(settings.database_url, settings=settings)
    rules = SegmentRules.from_settings(settings)
    env = environment()
    skipped: list[str] = []
    thumbs = 0
    try:
        with engine.connect() as conn:
            if conn.scalar(select(Batch.id).where(Batch.name == batch)) is None:
                raise InputError(f"no batch named {batch!r}.", kind="not_found")
            (out_dir / "thumbs").mkdir(parents=True, exist_ok=True)
            (out_dir / "static").mkdir(exist_ok=True)
            for name in STATIC_FILES:
                (out_dir / "static" / name).write_text(static_text(name), encoding="utf-8")
            job_ids = list(conn.scalars(
                select(Job.id).join(Batch, Batch.id == Job.batch_id)
                .where(Batch.name == batch, Job.status == JobStatus.SUCCEEDED.value)
                .order_by(Job.id)))
            media: dict[int, str] = {}
            checked: dict[int, Path] = {}
            for job_id in job_ids:
                raw = conn.scalar(select(Job.path).where(Job.id == job_id)) or ""
                if storage.is_uri(raw):
                    continue
                try:
                    checked[job_id] = check_video_path(raw, media_roots=settings.media_roots)
                except VidqError as exc:
                    skipped.append(f"job {job_id}: no player or thumbnails: {exc.message}")
                    continue
                media[job_id] = checked[job_id].as_uri()
            links = ReportLinks(media_uris=media)
            info = _all_videos(conn, batch)
            (out_dir / "index.html").write_text(env.get_template("batch.html").render(
                links=links, title=f"Batch {batch}", batch=info, refresh=False),
                encoding="utf-8")
            for job_id in job_ids:
                page = data.video_page(conn, job_id, rules)
                shown = gallery(page.segments)
                if job_id in checked:
                    thumbs += _thumbnails(checked[job_id], job_id, shown, out_dir, skipped,
                                          settings.media_roots)
                payload = page.to_json()
                payload["thumb_url"] = links.thumb_pattern(job_id)
                (out_dir / links.video(job_id)).write_text(env.get_template("video.html").render(
                    links=links, title=page.job["path"], page=page, data=payload,
                    gallery=shown if job_id in checked else []), encoding="utf-8")
    finally:
        engine.dispose()
    return ReportSummary(pages=len(job_ids) + 1, thumbnails=thumbs, skipped=skipped)


def _all_videos(conn: object, batch: str) -> dict[str, object]:
    """The batch page's data with every video on one page (a report has no pager)."""
    info = data.batch_page(conn, batch)  # type: ignore[arg-type]
    page = 1
    while info["more"]:
        more = data.batch_page(conn, batch, page=page)  # type: ignore[arg-type]
        info["videos"] = [*info["videos"], *more["videos"]]
        info["more"] = more["more"]
        page += 1
    return info


def _thumbnails(resolved: Path, job_id: int, segments: list[dict[str, object]],
                out_dir: Path, skipped: list[str], media_roots: tuple[str, ...]) -> int:
    made = 0
    for seg in segments:
        at = float(seg["peak_at"])  # type: ignore[arg-type]
        target = out_dir / "thumbs" / f"{job_id}-{quantize_ms(at)}.jpg"
        if target.exists():
            continue
        try:
            with open_video(str(resolved), media_roots=media_roots) as source:
                jpeg = decode_jpeg(source, quantize_ms(at) / 1000)
        except VidqError as exc:
            skipped.append(f"job {job_id}: thumbnail at {at:.1f}s: {exc.message}")
            continue
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(jpeg)
        os.replace(tmp, target)
        made += 1
    return made
