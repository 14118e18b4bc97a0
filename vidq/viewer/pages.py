"""The viewer's templates and how its pages link to each other: the same templates
render the live server's pages (``vidq serve``) and the static report's files
(``vidq report``), which differ only in their URLs."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import quote, urlencode

import jinja2

from vidq.viewer.thumbs import quantize_ms

STATIC_FILES = {"viewer.js": "text/javascript; charset=utf-8",
                "viewer.css": "text/css; charset=utf-8"}
"""Every file under /static/, and nothing else: no path from a URL reaches the disk."""

GALLERY_MAX = 60
"""Thumbnails a video's page shows: its best segments by mean score, in time order."""


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("vidq.viewer", "templates"),
        autoescape=True,  # every label, path and message is escaped, whatever its file type
        undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters["duration"] = format_duration
    env.policies["json.dumps_kwargs"] = {"separators": (",", ":")}
    return env


def static_text(name: str) -> str:
    return resources.files("vidq.viewer").joinpath("static").joinpath(name).read_text("utf-8")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def gallery(segments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The segments whose peak thumbnails a video's page shows."""
    best = sorted(range(len(segments)), key=lambda i: (-segments[i]["mean"], i))[:GALLERY_MAX]
    return [segments[i] for i in sorted(best)]


@dataclass(frozen=True)
class ServerLinks:
    """URLs of the live viewer."""

    live: bool = True

    def index(self) -> str:
        return "/"

    def batch(self, name: str, page: int = 0) -> str:
        tail = f"?page={page}" if page else ""
        return f"/batch/{quote(name, safe='')}{tail}"

    def video(self, job_id: int) -> str:
        return f"/video/{int(job_id)}"

    def media(self, job_id: int) -> str:
        return f"/video/{int(job_id)}/media"

    def thumb(self, job_id: int, at_s: float) -> str:
        return f"/thumb/{int(job_id)}/{quantize_ms(at_s)}.jpg"

    def thumb_pattern(self, job_id: int) -> str:
        return f"/thumb/{int(job_id)}/{{ms}}.jpg"

    def static(self, name: str) -> str:
        return f"/static/{name}"

    def search(self, **params: Any) -> str:
        query = urlencode({k: v for k, v in params.items() if v is not None})
        return f"/search?{query}" if query else "/search"

    def similar(self, job_id: int) -> str:
        return f"/similar/{int(job_id)}"


@dataclass(frozen=True)
class ReportLinks:
    """Relative URLs between the files of a static report (they open from file://)."""

    media_uris: dict[int, str]
    live: bool = False

    def index(self) -> str:
        return "index.html"

    def batch(self, name: str, page: int = 0) -> str:
        return "index.html"

    def video(self, job_id: int) -> str:
        return f"video-{int(job_id)}.html"

    def media(self, job_id: int) -> str:
        return self.media_uris.get(int(job_id), "")

    def thumb(self, job_id: int, at_s: float) -> str:
        return f"thumbs/{int(job_id)}-{quantize_ms(at_s)}.jpg"

    def thumb_pattern(self, job_id: int) -> str:
        return f"thumbs/{int(job_id)}-{{ms}}.jpg"

    def static(self, name: str) -> str:
        return f"static/{name}"

    def search(self, **params: Any) -> str:
        return ""

    def similar(self, job_id: int) -> str:
        return ""
