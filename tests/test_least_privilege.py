"""Least privilege on a worker host, with real processes: a decoder process (it parses
untrusted files) starts without the worker's secrets, and the worker believes only
plain data from it, never a pickle; /metrics listens on loopback unless told."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import worker.decoder_process as decoder_process
from tests.cluster import Cluster
from worker.decoder_process import DecoderProcess, decoder_environment
from worker.decoders import DecodeConfig, InputPolicy
from worker.models import get_preset

SECRETS = {
    "VIDQ_DATABASE_URL": "postgresql://vidq:db-password@db/vidq",
    "VIDQ_BROKER_URL": "redis://:broker-password@redis:6379/0",
    "VIDQ_WEBHOOK_SECRET": "webhook-secret",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "AWS_SESSION_TOKEN": "aws-token",
    "GOOGLE_APPLICATION_CREDENTIALS": "/secrets/gcp.json",
}


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


def test_a_decoder_process_starts_without_the_workers_secrets(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before: a decoder inherited the worker's whole environment, database and broker
    passwords, webhook secret and cloud keys included."""
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("VIDQ_MAX_FRAMES", "12345")  # not a secret: stays
    config = DecodeConfig(preset=get_preset("x3d_xs"),
                          inputs=InputPolicy(media_roots=(str(tmp_path),)))
    proc = DecoderProcess(config, slots=1, name="env-test")
    proc.start()
    try:
        assert proc.pid is not None
        env = environ_of(proc.pid)
    finally:
        proc.stop()
    assert not set(SECRETS) & set(env), sorted(set(SECRETS) & set(env))
    assert env["VIDQ_MAX_FRAMES"] == "12345"
    assert not any(value in " ".join(env.values()) for value in SECRETS.values())


def test_a_decoder_keeps_only_the_credentials_of_the_stores_it_may_read() -> None:
    environ = {**SECRETS, "PATH": "/usr/bin"}
    s3_only = decoder_environment(environ, media_roots=("s3://bucket/videos",))
    assert {k for k in s3_only if k.startswith("AWS_")} == {
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert "GOOGLE_APPLICATION_CREDENTIALS" not in s3_only
    local_only = decoder_environment(environ, media_roots=("/media",))
    assert set(local_only) == {"PATH"}
    anywhere = decoder_environment(environ, media_roots=())  # any URI: every store's keys
    assert "AWS_SECRET_ACCESS_KEY" in anywhere and "GOOGLE_APPLICATION_CREDENTIALS" in anywhere
    for env in (s3_only, local_only, anywhere):
        assert not {"VIDQ_DATABASE_URL", "VIDQ_BROKER_URL", "VIDQ_WEBHOOK_SECRET"} & set(env)


# A decoder subverted by a hostile file: it answers its setup with a pickle that, once
# unpickled, creates a file (it could as well run anything, with the worker's rights).
EVIL_CHILD = """
import pickle, sys
from multiprocessing.connection import Connection
conn = Connection(int(sys.argv[1]))
conn.recv_bytes()
class Exploit:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))
conn.send_bytes(pickle.dumps(Exploit()))
conn.recv_bytes()
"""


def test_the_worker_never_unpickles_what_a_decoder_sends(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Before: the worker read a decoder's replies with ``Connection.recv``, which
    unpickles them: the child's payload ran in the worker."""
    marker = tmp_path / "code-ran-in-the-worker"
    real_popen = subprocess.Popen

    def evil_popen(args: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        assert args[1] == "-c"  # [python, -c, code, fd, name]
        return real_popen([sys.executable, "-c", EVIL_CHILD, args[3], str(marker)],
                          **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(decoder_process.subprocess, "Popen", evil_popen)
    proc = DecoderProcess(DecodeConfig(preset=get_preset("x3d_xs")), slots=1, name="evil")
    try:
        with pytest.raises(RuntimeError, match="did not start"):
            proc.start()
    finally:
        proc.stop(wait=1)
    assert not marker.exists()


def listening_addresses(port: int) -> set[str]:
    """The local addresses a socket listens on for ``port`` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:  # LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_metrics_listen_on_loopback_unless_a_setting_opens_them(cluster: Cluster) -> None:
    """Before: /metrics and /healthz listened on every interface (0.0.0.0)."""
    closed, opened = free_port(), free_port()
    cluster.start_worker(VIDQ_METRICS_PORT=str(closed), ready=False)
    cluster.start_worker(VIDQ_METRICS_PORT=str(opened), VIDQ_METRICS_HOST="0.0.0.0",
                         ready=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (
            listening_addresses(closed) and listening_addresses(opened)):
        time.sleep(0.2)
    assert listening_addresses(closed) == {"127.0.0.1"}
    assert listening_addresses(opened) == {"0.0.0.0"}
