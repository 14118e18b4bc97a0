"""``vidq serve``: the viewer as a Starlette app, read-only over the results database.

Safety, each with a test in tests/viewer/test_safety.py:

- **Who may ask.** Without ``VIDQ_VIEWER_TOKEN`` the app answers only requests
  addressed to a loopback name (``127.0.0.1``, ``localhost``, ``[::1]``), which also
  stops a web page from reaching it through DNS rebinding, and ``vidq serve`` refuses
  to listen anywhere else. With a token, every request must carry it: an
  ``Authorization: Bearer`` header, or the cookie that a first visit to ``?token=``
  sets (HttpOnly, SameSite=Strict).
- **What files.** A video is asked for by job id, never by path; the job's recorded
  path is then checked with the workers' rules (``vidq.media.check_video_path``: under
  ``VIDQ_MEDIA_ROOTS``, no ``..`` or symlink escape, a regular file). With no media
  roots set, only files with a video extension are served. Static files come from a
  fixed list.
- **What pages say.** Templates autoescape everything; page data is embedded as JSON
  with ``<``, ``>`` and ``&`` escaped; scripts are files (the Content-Security-Policy
  allows no inline script or style), ``nosniff``, no framing, no referrer.
"""

from __future__ import annotations

import hmac
import ipaddress
import mimetypes
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from vidq import storage
from vidq.db import unreachable
from vidq.errors import ConfigError, InputError, VidqError
from vidq.formats import VIDEO_EXTENSIONS
from vidq.media import check_video_path, open_video
from vidq.segments import SegmentRules
from vidq.settings import Settings
from vidq.viewer import data
from vidq.viewer.pages import STATIC_FILES, ServerLinks, environment, gallery, static_text
from vidq.viewer.thumbs import ThumbnailCache, default_cache_dir

TOKEN_COOKIE = "vidq_token"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})
PRESIGN_S = 300
"""A bucket object's presigned URL is good for this long (the player asks again on reload)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, settings: Settings) -> None:
    """Refuse, in one line, to listen beyond this machine without a token."""
    if not is_loopback(host) and not settings.viewer_token:
        raise ConfigError(
            f"--host {host}: listening beyond this machine needs a token; set "
            "VIDQ_VIEWER_TOKEN to a long random secret (open /?token=SECRET once in the "
            "browser), or keep the default --host 127.0.0.1.")


def content_security_policy(settings: Settings) -> str:
    _local, objects = storage.split_roots(settings.media_roots)
    media = "'self'"
    if objects:  # the player follows a redirect to the object's presigned URL
        endpoint = urlsplit(settings.s3_endpoint_url)
        media += f" https: {endpoint.scheme}://{endpoint.netloc}" if endpoint.netloc \
            else " https:"
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
            f"media-src {media}; connect-src 'self'; form-action 'self'; base-uri 'none'; "
            "frame-ancestors 'none'")


class Viewer:
    """The app's state: settings, the read-only engine, templates, thumbnail cache."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = data.readonly_engine(settings.database_url, settings=settings)
        self.rules = SegmentRules.from_settings(settings)
        self.env = environment()
        self.links = ServerLinks()
        cache_dir = Path(settings.viewer_cache_dir).expanduser() if settings.viewer_cache_dir \
            else default_cache_dir()
        self.thumbs = ThumbnailCache(cache_dir, max_bytes=settings.viewer_cache_mb * 2**20)
        self.csp = content_security_policy(settings)

    def render(self, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(template).render(links=self.links, **context)
        return HTMLResponse(html, status_code=status_code)

    def error(self, status_code: int, message: str) -> HTMLResponse:
        return self.render("error.html", status_code=status_code, message=message,
                           title=f"{status_code}")

    # -- pages --------------------------------------------------------------------------

    def index(self, request: Request) -> Response:
        with self.engine.connect() as conn:
            rows = data.batches(conn)
        return self.render("index.html", title="Batches", batches=rows,
                           refresh=any(b["active"] for b in rows))

    def batch(self, request: Request) -> Response:
        name = request.path_params["name"]
        page = _int(request.query_params.get("page"), 0)
        with self.engine.connect() as conn:
            info = data.batch_page(conn, name, page=page)
        return self.render("batch.html", title=f"Batch {name}", batch=info,
                           refresh=info["active"] > 0)

    def video(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        with self.engine.connect() as conn:
            page = data.video_page(conn, job_id, self.rules)
        return self.render("video.html", title=page.job["path"], page=page,
                           data=self.video_json(page), gallery=gallery(page.segments))

    def video_json(self, page: data.VideoPage) -> dict[str, Any]:
        out = page.to_json()
        out["thumb_url"] = self.links.thumb_pattern(page.job["id"])
        return out

    def search(self, request: Request) -> Response:
        q = request.query_params
        label = (q.get("label") or "").strip()
        min_score = _float(q.get("min_score"), 0.0)
        min_duration = _float(q.get("min_duration"), 0.0)
        page = _int(q.get("page"), 0)
        with self.engine.connect() as conn:
            found = data.search(conn, label=label, min_score=min_score,
                                min_duration_s=min_duration, page=page) if label else None
            known = data.labels(conn)
        return self.render("search.html", title="Search", found=found, labels=known,
                           label=label, min_score=min_score, min_duration=min_duration)

    def similar(self, request: Request) -> Response:
        from vidq.embeddings import nearest

        job_id = request.path_params["job_id"]
        with self.engine.connect() as conn:
            result = nearest(conn, job_id, top=20)
        return self.render("similar.html", title=f"Like job {job_id}", job_id=job_id,
                           result=result)

    # -- files --------------------------------------------------------------------------

    def _job_path(self, job_id: int) -> str:
        from sqlalchemy import select

        from vidq.db import Job

        with self.engine.connect() as conn:
            path = conn.scalar(select(Job.path).where(Job.id == job_id))
        if path is None:
            raise InputError(f"no job {job_id}.", kind="not_found")
        return path

    def checked_file(self, job_id: int) -> Path:
        """The job's video file, checked with the workers' rules (see the module)."""
        raw = self._job_path(job_id)
        if storage.is_uri(raw):
            raise InputError(f"{raw}: an object, not a local file.", kind="not_a_file")
        roots = self.settings.media_roots
        resolved = check_video_path(raw, media_roots=roots)
        if not roots and resolved.suffix.lower() not in VIDEO_EXTENSIONS:
            raise InputError(f"{raw}: refused: not a video file name, and VIDQ_MEDIA_ROOTS "
                             "is not set.", kind="refused_path")
        return resolved

    def media(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        raw = self._job_path(job_id)
        if storage.is_uri(raw):
            return RedirectResponse(self.presign(raw), status_code=307)
        resolved = self.checked_file(job_id)
        kind = mimetypes.guess_type(resolved.name)[0] or "application/octet-stream"
        return FileResponse(resolved, media_type=kind, content_disposition_type="inline")

    def presign(self, raw: str) -> str:
        uri = storage.ObjectURI.parse(raw)
        storage.check_roots(uri, raw, self.settings.media_roots)
        fs = storage.StorageConfig.from_settings(self.settings).filesystem(uri.scheme)
        with storage.storage_errors(raw):
            return str(fs.sign(uri.fs_path, expiration=PRESIGN_S))

    def thumb(self, request: Request) -> Response:
        job_id, at_ms = request.path_params["job_id"], request.path_params["ms"]
        raw = self._job_path(job_id)
        roots = self.settings.media_roots
        config = storage.StorageConfig.from_settings(self.settings)
        if storage.is_uri(raw):
            meta = storage.check_object(raw, media_roots=roots, storage=config)
            identity = f"{meta.uri}\0{meta.size}\0{meta.modified_ns}\0{meta.etag}"
        else:
            identity = self.thumbs.identity(self.checked_file(job_id))
        # Decoded from what the workers' open_video opens: the checks are made again
        # on the opened file, so a path swapped since the check cannot escape the roots.
        jpeg = self.thumbs.get(identity, at_ms, lambda: open_video(
            raw, media_roots=roots, storage_config=config))
        return Response(jpeg, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:  # a fixed list: no URL names a file on disk
            return PlainTextResponse("not found", status_code=404)
        return Response(static_text(name), media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "no-cache"})


def _int(raw: str | None, default: int) -> int:
    try:
        return max(0, int(raw)) if raw else default
    except ValueError:
        return default


def _float(raw: str | None, default: float) -> float:
    try:
        value = float(raw) if raw else default
    except ValueError:
        return default
    return value if value == value else default  # NaN


_STATUS = {"not_found": 404, "refused_path": 403, "not_a_file": 404, "unreadable": 403,
           "empty": 404, "decode_error": 422}


def create_app(settings: Settings) -> SecureViewer:
    viewer = Viewer(settings)

    def handle(fn: Callable[[Request], Response]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await run_in_threadpool(fn, request)
            except InputError as exc:
                return viewer.error(_STATUS.get(exc.kind, 400), exc.message)
            except VidqError as exc:  # the database unreachable, a store refusing
                return viewer.error(503, exc.message)
            except OperationalError as exc:
                return viewer.error(503, unreachable(viewer.settings.database_url, exc).message)
        return endpoint

    routes = [
        Route("/", handle(viewer.index)),
        Route("/batch/{name:str}", handle(viewer.batch)),
        Route("/video/{job_id:int}", handle(viewer.video)),
        Route("/video/{job_id:int}/media", handle(viewer.media)),
        Route("/thumb/{job_id:int}/{ms:int}.jpg", handle(viewer.thumb)),
        Route("/search", handle(viewer.search)),
        Route("/similar/{job_id:int}", handle(viewer.similar)),
        Route("/static/{name:str}", handle(viewer.static)),
    ]
    app = Starlette(routes=routes)
    app.state.viewer = viewer
    return SecureViewer(app, settings=settings, csp=viewer.csp)



class SecureViewer:
    """The guards every request passes (ASGI middleware): the loopback Host check or
    the token, then security headers on every response."""

    def __init__(self, app: Any, *, settings: Settings, csp: str) -> None:
        self.app = app
        self.token = settings.viewer_token
        self.headers = [
            (b"content-security-policy", csp.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            (b"cross-origin-resource-policy", b"same-origin"),
        ]

    @property
    def state(self) -> Any:
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal: Any = self.refuse(scope)
        if refusal is not None:
            await refusal(scope, receive, self.with_headers(send))
            return
        await self.app(scope, receive, self.with_headers(send))

    def with_headers(self, send: Send) -> Send:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)
        return send_with_headers

    def refuse(self, scope: Scope) -> Response | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if not self.token:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if not is_loopback(name):
                return PlainTextResponse(
                    "refused: this viewer answers only on 127.0.0.1 (set VIDQ_VIEWER_TOKEN "
                    "to serve other addresses)", status_code=403)
            return None
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        given = query.get("token")
        if given is not None and self.matches(given):
            rest = {k: v for k, v in query.items() if k != "token"}
            target = scope["path"] + (f"?{urlencode(rest)}" if rest else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(TOKEN_COOKIE, given, httponly=True, samesite="strict",
                                path="/")
            return response
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and self.matches(auth[7:].strip()):
            return None
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:
            cookie = SimpleCookie()
        if TOKEN_COOKIE in cookie and self.matches(cookie[TOKEN_COOKIE].value):
            return None
        return PlainTextResponse(
            "this viewer needs its token: open /?token=YOUR_TOKEN once (VIDQ_VIEWER_TOKEN), "
            "or send Authorization: Bearer YOUR_TOKEN", status_code=401)

    def matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                                   self.token.encode("utf-8"))


def run_app(app: SecureViewer, *, host: str, port: int) -> None:
    """Serve ``app`` (``create_app``; ``check_bind`` first) until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
