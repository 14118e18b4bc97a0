"""Where a completion webhook may go, and how a receiver knows it is fresh.

Real `vidq submit` and `vidq reconcile` processes, real SQLite and PostgreSQL, real
HTTP receivers on 127.0.0.1. Host names that resolve to a chosen address are the
one stand-in: this machine has no DNS server of its own, so ``socket.getaddrinfo``
answers for names under ``.test`` from a table (everything else is resolved as usual).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.cli import run_vidq
from tests.media import make_video
from tests.services import sql

pytestmark = [pytest.mark.timeout(300)]
LOOPBACK = "127.0.0.0/8,::1/128"
SECRET = "s3cret-for-tests"
PUBLIC_URL = "https://8.8.8.8/hooks/vidq"
"""A public address: accepted at submit, and never called (no job of it completes)."""


# -- a receiver, databases, and the CLI ------------------------------------------------

class Receiver:
    """A real HTTP server on 127.0.0.1 that records every request it gets.

    ``slow_first_s``: the first request waits this long before it is answered;
    ``redirect_to``: every request is answered 302 with this Location;
    ``tls``: (certificate, key) to serve HTTPS with."""

    def __init__(self, *, slow_first_s: float = 0.0, redirect_to: str | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                receiver.requests.append((self.command, dict(self.headers), body))
                if len(receiver.requests) == 1 and slow_first_s:
                    time.sleep(slow_first_s)
                if redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", redirect_to)
                else:
                    self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _handle  # noqa: N815

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def db_url(database_url: str) -> str:
    """A database at this vidq's schema (tests/conftest.py's, SQLite and PostgreSQL)."""
    return database_url


@pytest.fixture
def broker_url(redis_url: str) -> str:
    return redis_url


def vidq(*args: str, database_url: str, broker_url: str, cwd: Path,
         **env: str) -> subprocess.CompletedProcess[str]:
    """`vidq ARGS` as a user runs it; VIDQ_WEBHOOK_ALLOW_NETWORKS only if given."""
    environ = {k: v for k, v in os.environ.items() if k != "VIDQ_WEBHOOK_ALLOW_NETWORKS"}
    environ.update(VIDQ_DATABASE_URL=database_url, VIDQ_BROKER_URL=broker_url,
                   VIDQ_MODEL="x3d_xs", VIDQ_WEIGHTS="random", VIDQ_RECONCILE_EVERY_S="0",
                   PYTHONUNBUFFERED="1", **env)
    return run_vidq(*args, env=environ, cwd=cwd)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The refusal a user sees: exit status 2, one line on stderr, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert lines[0].startswith("vidq: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("videos")
    paths = [root / f"v{i}.mp4" for i in range(4)]
    for i, path in enumerate(paths):
        make_video(path, seconds=1.0, seed=40 + i)
    return paths


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[str]]]:
    """Names under ``.test`` resolve to the addresses listed here, the first list first
    and the last one from then on (a DNS answer that changes between two looks)."""
    answers: dict[str, list[list[str]]] = {}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".test"):
            if host not in answers:
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            turns = answers[host]
            addresses = turns.pop(0) if len(turns) > 1 else turns[0]
            return [info for address in addresses for info in real(address, port, *args,
                                                                    **kwargs)]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


def completed_batch(database_url: str, video: Path, *, url: str,
                    allow: str = "", name: str = "done") -> tuple[Any, int]:
    """A batch whose job is finished and whose webhook is due, recorded as `vidq run`
    leaves it (the URL written as an earlier vidq accepted it, unchecked)."""
    from producer.submit import JobRequest, submit
    from vidq.settings import Settings

    settings = Settings.from_env({}, database_url=database_url, webhook_allow_networks=allow)
    report = submit([str(video)], settings=settings, batch=name, publish=False,
                    request=JobRequest(model="x3d_xs", weights="random"))
    assert report.batch_id is not None
    sql(database_url, "update jobs set status = 'succeeded'")
    sql(database_url, "update batches set notify_url = :u, notify_status = 'pending' "
        "where id = :b", u=url, b=report.batch_id)
    return settings, report.batch_id


def notify_row(database_url: str, batch_id: int) -> tuple[Any, ...]:
    return sql(database_url, "select notify_status, notify_attempts, notify_response "
               "from batches where id = :b", b=batch_id)[0]


# -- what submit accepts ---------------------------------------------------------------

@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://8.8.8.8/hook"])
def test_submit_refuses_a_webhook_that_is_not_http(
    url: str, db_url: str, videos: list[Path], tmp_path: Path, broker_url: str,
) -> None:
    database_url = db_url
    proc = vidq("submit", str(videos[0]), "--batch", "b", "--notify", url,
                database_url=database_url, broker_url=broker_url, cwd=tmp_path)
    assert "http:// or https://" in one_error_line(proc)
    assert sql(database_url, "select count(*) from jobs") == [(0,)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("url", "network"), [
    ("http://localhost:{port}/hook", "127.0.0.0/8,::1/128"),  # a name: 127.0.0.1
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254/32"),  # cloud metadata
    ("http://10.20.30.40/hook", "10.0.0.0/8"),
    ("http://[::1]:{port}/hook", "::1/128"),
])
def test_submit_refuses_a_webhook_to_a_non_public_address_unless_allowed(
    url: str, network: str, db_url: str, videos: list[Path], tmp_path: Path,
    broker_url: str,
) -> None:
    url = url.format(port=9)
    database_url = db_url
    refused = vidq("submit", str(videos[0]), "--batch", "b", "--notify", url,
                   database_url=database_url, broker_url=broker_url, cwd=tmp_path)
    line = one_error_line(refused)
    assert "not a public address" in line and "VIDQ_WEBHOOK_ALLOW_NETWORKS" in line
    assert sql(database_url, "select count(*) from jobs") == [(0,)]

    allowed = vidq("submit", str(videos[0]), "--batch", "b", "--notify", url,
                   database_url=database_url, broker_url=broker_url, cwd=tmp_path,
                   VIDQ_WEBHOOK_ALLOW_NETWORKS=network)
    assert allowed.returncode == 0, allowed.stderr
    assert sql(database_url, "select notify_url from batches where name = 'b'") == [(url,)]


@pytest.mark.parametrize(("name", "address", "network"), [
    ("hooks.example.test", "127.0.0.1", "127.0.0.0/8"),
    ("metadata.example.test", "169.254.169.254", "169.254.0.0/16"),
    ("intranet.example.test", "10.1.2.3", "10.0.0.0/8"),
])
def test_a_host_name_is_judged_by_every_address_it_resolves_to(
    name: str, address: str, network: str, db_url: str, videos: list[Path],
    fake_dns: dict[str, list[list[str]]],
) -> None:
    from producer.submit import JobRequest, submit
    from vidq.notify import WebhookRefused
    from vidq.settings import Settings

    request = JobRequest(model="x3d_xs", weights="random")
    url = f"https://{name}/hook"
    fake_dns[name] = [["8.8.8.8", address]]  # one public address does not excuse the other
    with pytest.raises(WebhookRefused, match=f"{name} \\({address}\\) is not a public"):
        submit([str(videos[0])], settings=Settings.from_env({}, database_url=db_url),
               request=request, batch="named", publish=False, notify=url)
    assert sql(db_url, "select count(*) from jobs") == [(0,)]
    allowed = Settings.from_env({}, database_url=db_url, webhook_allow_networks=network)
    report = submit([str(videos[0])], settings=allowed, request=request, batch="named",
                    publish=False, notify=url)
    assert len(report.job_ids) == 1


def test_a_host_name_that_does_not_resolve_is_refused_at_submit(
    videos: list[Path], tmp_path: Path, fake_dns: dict[str, list[list[str]]],
) -> None:
    from producer.submit import JobRequest, submit
    from vidq.notify import WebhookUnresolved
    from vidq.settings import Settings

    settings = Settings.from_env({}, database_url=f"sqlite:///{tmp_path / 'vidq.db'}")
    with pytest.raises(WebhookUnresolved, match="nowhere.example.test does not resolve"):
        submit([str(videos[0])], settings=settings, batch="b", publish=False,
               request=JobRequest(model="x3d_xs", weights="random"),
               notify="https://nowhere.example.test/hook")


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_a_later_submit_cannot_change_a_batchs_webhook(
    db_url: str, videos: list[Path], tmp_path: Path, broker_url: str,
) -> None:
    def submit(video: Path, *notify: str) -> subprocess.CompletedProcess[str]:
        return vidq("submit", str(video), "--batch", "b", *notify, database_url=db_url,
                    broker_url=broker_url, cwd=tmp_path)

    assert submit(videos[0], "--notify", PUBLIC_URL).returncode == 0
    line = one_error_line(submit(videos[1], "--notify", "https://8.8.4.4/elsewhere"))
    assert "already sends its completion webhook to another URL" in line
    assert sql(db_url, "select notify_url from batches") == [(PUBLIC_URL,)]
    assert sql(db_url, "select count(*) from jobs") == [(1,)]  # nothing recorded
    # The same URL again, or none, adds work to the batch as before.
    assert submit(videos[2], "--notify", PUBLIC_URL).returncode == 0
    assert submit(videos[3]).returncode == 0
    assert sql(db_url, "select notify_url from batches") == [(PUBLIC_URL,)]
    assert sql(db_url, "select count(*) from jobs") == [(3,)]


# -- what a delivery does ----------------------------------------------------------------

def test_a_file_url_on_a_batch_is_refused_at_delivery_not_a_crash(
    db_url: str, videos: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    from vidq.notify import wait_for_deliveries
    from vidq.reconcile import reconcile

    target = tmp_path / "written-by-a-webhook"
    target.write_text("")
    settings, batch_id = completed_batch(db_url, videos[0], url=target.as_uri())
    with caplog.at_level(logging.WARNING, logger="vidq.notify"):
        reconcile(settings)
        assert wait_for_deliveries(timeout_s=30)
    assert notify_row(db_url, batch_id) == ("failed", 1, None)
    assert "http:// or https://" in caplog.text


def test_a_loopback_address_is_refused_at_delivery_after_resolving(
    db_url: str, videos: list[Path], receiver: Receiver,
    fake_dns: dict[str, list[list[str]]], caplog: pytest.LogCaptureFixture,
) -> None:
    """The name was public at submit; at delivery it resolves to this host."""
    from vidq.notify import notify_if_done

    fake_dns["rebound.example.test"] = [["8.8.8.8"], ["127.0.0.1"]]
    url = f"http://rebound.example.test:{receiver.port}/hook"
    from vidq.notify import check_url

    check_url(url)  # what submit saw: a public address
    settings, batch_id = completed_batch(db_url, videos[0], url=url)
    with caplog.at_level(logging.WARNING, logger="vidq.notify"):
        assert notify_if_done(settings, batch_id, retries=2, backoff_s=0.1) == "failed"
    assert receiver.requests == []
    assert notify_row(db_url, batch_id) == ("failed", 1, None)
    assert "rebound.example.test (127.0.0.1) is not a public address" in caplog.text


def test_the_request_goes_to_the_address_that_was_checked(
    db_url: str, videos: list[Path], receiver: Receiver,
    fake_dns: dict[str, list[list[str]]],
) -> None:
    """One look at DNS per attempt: a second answer (the cloud metadata service) is
    never the one connected to."""
    from vidq.notify import notify_if_done

    fake_dns["allowed.example.test"] = [["127.0.0.1"], ["169.254.169.254"]]
    url = f"http://allowed.example.test:{receiver.port}/hook"
    settings, batch_id = completed_batch(db_url, videos[0], url=url, allow="127.0.0.0/8")
    assert notify_if_done(settings, batch_id, retries=1) == "sent"
    assert [(method, headers["Host"]) for method, headers, _ in receiver.requests] == [
        ("POST", f"allowed.example.test:{receiver.port}")]


def test_https_is_sent_to_the_checked_address_with_the_url_hosts_certificate(
    db_url: str, videos: list[Path], tmp_path: Path, fake_dns: dict[str, list[list[str]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TLS to the address that was checked, the certificate verified against the URL's
    host name: a certificate for another name is refused."""
    from vidq.notify import notify_if_done

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=tls.example.test",
                    "-addext", "subjectAltName=DNS:tls.example.test"],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trusted like a public CA's
    fake_dns["tls.example.test"] = [["127.0.0.1"]]
    fake_dns["other.example.test"] = [["127.0.0.1"]]
    secure = Receiver(tls=(cert, key))
    try:
        settings, batch_id = completed_batch(
            db_url, videos[0], url=f"https://tls.example.test:{secure.port}/hook",
            allow="127.0.0.0/8")
        assert notify_if_done(settings, batch_id, retries=1) == "sent"
        assert len(secure.requests) == 1
        _, other = completed_batch(
            db_url, videos[1], url=f"https://other.example.test:{secure.port}/hook",
            allow="127.0.0.0/8", name="other")
        assert notify_if_done(settings, other, retries=1) == "failed"
        assert len(secure.requests) == 1
    finally:
        secure.close()


def test_a_redirect_is_not_followed(db_url: str, videos: list[Path],
                                    receiver: Receiver) -> None:
    from vidq.notify import notify_if_done

    redirecting = Receiver(redirect_to=receiver.url)
    try:
        settings, batch_id = completed_batch(db_url, videos[0], url=redirecting.url,
                                             allow=LOOPBACK)
        assert notify_if_done(settings, batch_id, retries=2, backoff_s=0.1) == "failed"
    finally:
        redirecting.close()
    assert [method for method, _, _ in redirecting.requests] == ["POST", "POST"]
    assert receiver.requests == []  # never reached through the redirect
    assert notify_row(db_url, batch_id) == ("failed", 2, 302)


def test_a_slow_receiver_does_not_delay_reconcile(db_url: str, videos: list[Path]) -> None:
    """The receiver takes 30 s to answer the first request: reconcile returns at once,
    the attempt times out in the background and the retry is delivered and recorded."""
    from vidq.notify import wait_for_deliveries
    from vidq.reconcile import reconcile

    slow = Receiver(slow_first_s=30)
    try:
        settings, batch_id = completed_batch(db_url, videos[0], url=slow.url, allow=LOOPBACK)
        started = time.monotonic()
        reconcile(settings)
        took = time.monotonic() - started
        assert took < 5, f"reconcile waited {took:.1f} s for a webhook"
        assert wait_for_deliveries(timeout_s=60)
    finally:
        slow.close()
    assert len(slow.requests) == 2
    assert notify_row(db_url, batch_id) == ("sent", 2, 200)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_vidq_reconcile_sends_a_due_webhook_before_it_exits(
    db_url: str, videos: list[Path], tmp_path: Path, receiver: Receiver, broker_url: str,
) -> None:
    _settings, batch_id = completed_batch(db_url, videos[0], url=receiver.url)
    proc = vidq("reconcile", database_url=db_url, broker_url=broker_url, cwd=tmp_path,
                VIDQ_WEBHOOK_ALLOW_NETWORKS=LOOPBACK)
    assert proc.returncode == 0, proc.stderr
    assert len(receiver.requests) == 1
    assert notify_row(db_url, batch_id) == ("sent", 1, 200)


# -- what a receiver checks --------------------------------------------------------------

def test_the_signature_covers_a_timestamp_that_a_receiver_checks(
    db_url: str, videos: list[Path], receiver: Receiver,
) -> None:
    from vidq.notify import notify_if_done, verify_signature

    settings, batch_id = completed_batch(db_url, videos[0], url=receiver.url, allow=LOOPBACK)
    settings = settings.replace(webhook_secret=SECRET)
    assert notify_if_done(settings, batch_id, retries=1) == "sent"
    [(_method, headers, body)] = receiver.requests
    timestamp, sig = headers["X-Vidq-Timestamp"], headers["X-Vidq-Signature"]
    assert abs(int(timestamp) - time.time()) < 60
    assert json.loads(body)["batch"] == "done"
    assert verify_signature(SECRET, timestamp, body, sig)
    # The signed message is "<timestamp>." + body, not the body alone.
    assert sig == "sha256=" + hmac.new(SECRET.encode(), timestamp.encode() + b"." + body,
                                       hashlib.sha256).hexdigest()
    # Captured and replayed six minutes later: refused.
    assert not verify_signature(SECRET, timestamp, body, sig, now=int(timestamp) + 360)
    assert verify_signature(SECRET, timestamp, body, sig, now=int(timestamp) + 299)
    # A new timestamp on the old signature, a changed body, another secret: refused.
    assert not verify_signature(SECRET, str(int(timestamp) + 360), body, sig,
                                now=int(timestamp) + 360)
    assert not verify_signature(SECRET, timestamp, body.replace(b'"done"', b'"dune"'), sig)
    assert not verify_signature("another secret", timestamp, body, sig)
    assert not verify_signature(SECRET, "yesterday", body, sig)
