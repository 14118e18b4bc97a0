"""The fault proxy (tests/faults/proxy.py) does what each mode says to real Redis and
PostgreSQL clients: pass, down (reset now, refused after), blackhole (nothing until
healed, then everything), latency (at least the delay, each way)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import psycopg
import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from tests.faults.proxy import Mode, Proxy
from tests.services import PG_ADMIN_URL

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]

FAST_S = 2.0
"""A connection error that comes within this is "fast" (no client timeout waited out)."""
LATENCY_MS = 200


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[tuple[Proxy, str]]:  # noqa: F811
    with Proxy.to_url(redis_url, name="redis") as proxy:
        yield proxy, proxy.url(redis_url)


@pytest.fixture
def pg_proxy() -> Iterator[tuple[Proxy, str]]:
    with Proxy.to_url(PG_ADMIN_URL, name="postgresql") as proxy:
        yield proxy, proxy.url(PG_ADMIN_URL)


def libpq(url: str) -> str:
    """A SQLAlchemy URL as psycopg takes it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def test_url_points_at_the_proxy_and_keeps_the_rest() -> None:
    proxy = Proxy(upstream=("db.example", 5432), listen_port=41000)
    assert proxy.url("postgresql+psycopg://u:p@db.example:5432/test?sslmode=disable") == (
        "postgresql+psycopg://u:p@127.0.0.1:41000/test?sslmode=disable")
    assert proxy.url("redis://127.0.0.1:6379/10") == "redis://127.0.0.1:41000/10"


# -- Redis -------------------------------------------------------------------------------
def test_redis_pass(redis_proxy: tuple[Proxy, str]) -> None:
    proxy, url = redis_proxy
    client = redis.Redis.from_url(url, socket_timeout=5)
    client.set("vidq-proxy-test", "through")
    assert client.get("vidq-proxy-test") == b"through"
    big = bytes(range(256)) * 20_000  # 5 MB: many chunks, in order, each way
    client.set("vidq-proxy-big", big)
    assert client.get("vidq-proxy-big") == big
    assert proxy.mode is Mode.PASS and proxy.connections_made >= 1


def test_redis_down_fails_the_next_command_fast_and_heals(redis_proxy: tuple[Proxy, str]) -> None:
    proxy, url = redis_proxy
    client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=30)
    assert client.ping()
    assert proxy.open_connections == 1
    proxy.down()
    assert proxy.open_connections == 0
    start = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        client.ping()  # the pooled connection was reset; the reconnect is refused
    assert time.monotonic() - start < FAST_S
    proxy.heal()
    assert client.ping()


def test_redis_blackhole_times_out_then_flows_after_heal(
    redis_proxy: tuple[Proxy, str],
) -> None:
    proxy, url = redis_proxy
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    assert client.ping()
    proxy.blackhole()
    start = time.monotonic()
    with pytest.raises(redis.TimeoutError):
        client.ping()
    assert time.monotonic() - start >= 0.5
    assert proxy.open_connections >= 1  # held open, not closed: nothing flows
    proxy.heal()
    assert client.ping()


def test_redis_latency_delays_each_direction(redis_proxy: tuple[Proxy, str]) -> None:
    proxy, url = redis_proxy
    client = redis.Redis.from_url(url, socket_timeout=10)
    assert client.ping()  # connected: only the round trip is timed
    proxy.latency(LATENCY_MS)
    start = time.monotonic()
    assert client.ping()
    assert time.monotonic() - start >= 2 * LATENCY_MS / 1000  # the command, then its reply
    proxy.heal()
    start = time.monotonic()
    assert client.ping()
    assert time.monotonic() - start < LATENCY_MS / 1000


# -- PostgreSQL ---------------------------------------------------------------------------
def test_postgresql_pass(pg_proxy: tuple[Proxy, str]) -> None:
    proxy, url = pg_proxy
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar_one() == 1
    finally:
        engine.dispose()
    assert proxy.connections_made == 1


def test_postgresql_down_fails_the_next_query_fast_and_heals(pg_proxy: tuple[Proxy, str]) -> None:
    proxy, url = pg_proxy
    engine = create_engine(url, connect_args={"connect_timeout": 30})
    try:
        with engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar_one() == 1
            proxy.down()
            start = time.monotonic()
            with pytest.raises(OperationalError):
                conn.execute(text("select 1"))  # an open connection: reset
            assert time.monotonic() - start < FAST_S
        start = time.monotonic()
        with pytest.raises(OperationalError, match="refused"):
            engine.connect()  # a new one: refused
        assert time.monotonic() - start < FAST_S
        proxy.heal()
        with engine.connect() as conn:
            assert conn.execute(text("select 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_postgresql_blackhole_times_out_then_flows_after_heal(
    pg_proxy: tuple[Proxy, str],
) -> None:
    proxy, url = pg_proxy
    with psycopg.connect(libpq(url), connect_timeout=10) as conn, \
            ThreadPoolExecutor(1) as pool:
        assert conn.execute("select 1").fetchone() == (1,)
        proxy.blackhole()
        stuck = pool.submit(lambda: conn.execute("select 2").fetchone())
        with pytest.raises(FutureTimeout):
            stuck.result(timeout=1.0)  # the client's own deadline: no reply came
        start = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="timeout"):
            psycopg.connect(libpq(url), connect_timeout=2)  # libpq's: no server answers
        assert time.monotonic() - start >= 1.5
        proxy.heal()
        assert stuck.result(timeout=10) == (2,)  # held, not lost: the same query answers
        assert conn.execute("select 3").fetchone() == (3,)
    with psycopg.connect(libpq(url), connect_timeout=10) as conn:
        assert conn.execute("select 4").fetchone() == (4,)


def test_postgresql_latency_delays_each_direction(pg_proxy: tuple[Proxy, str]) -> None:
    proxy, url = pg_proxy
    with psycopg.connect(libpq(url), connect_timeout=10) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        proxy.latency(LATENCY_MS)
        start = time.monotonic()
        assert conn.execute("select 2").fetchone() == (2,)
        assert time.monotonic() - start >= 2 * LATENCY_MS / 1000
        proxy.heal()
        start = time.monotonic()
        assert conn.execute("select 3").fetchone() == (3,)
        assert time.monotonic() - start < LATENCY_MS / 1000
