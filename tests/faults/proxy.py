"""A TCP fault proxy on 127.0.0.1, modelled on Toxiproxy's toxics: what a worker host's
network does to its traffic to PostgreSQL or Redis, set from a test at any time.

    with Proxy(upstream=("127.0.0.1", 5432)) as db:
        url = db.url("postgresql+psycopg://postgres@127.0.0.1:5432/test")
        ...
        db.down()         # open connections reset (RST), new ones refused
        db.heal()
        db.blackhole()    # connections stay open; nothing flows either way until healed
        db.heal()         # what was held back flows on
        db.latency(200)   # 200 ms added to every chunk, in each direction

Modes (``Mode``):
- ``pass``: bytes flow as they come.
- ``down``: Toxiproxy's disabled proxy plus its ``reset_peer`` toxic. Every open
  connection is closed with SO_LINGER 0 on both sides, so client and server each
  see a reset, and the listening socket is closed, so new connections are refused.
- ``blackhole``: Toxiproxy's ``timeout`` toxic with timeout 0, except that what is
  sent meanwhile is held back, not dropped: a partition that TCP would ride out.
  New connections are accepted, but reach the server only once healed.
- ``latency``: Toxiproxy's ``latency`` toxic: each chunk is delivered ``latency_ms``
  after it arrived, in order, in each direction (a request and its reply: twice).

What it cannot show: the proxy's own kernel acknowledges what the client sends, so
TCP keepalives and ``tcp_user_timeout`` never notice a blackhole through it.

The proxy runs an asyncio loop in a thread of its own; mode changes are made on that
loop and have taken effect when the call returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

LISTEN_HOST = "127.0.0.1"
CHUNK_BYTES = 64 * 1024
CALL_TIMEOUT_S = 10.0
"""The longest a mode change may take on the proxy's loop."""


class Mode(str, enum.Enum):
    PASS = "pass"
    DOWN = "down"
    BLACKHOLE = "blackhole"
    LATENCY = "latency"


@dataclass(eq=False)
class _Link:
    """One client connection and its connection to the upstream."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def writers(self) -> Iterator[asyncio.StreamWriter]:
        yield self.client
        if self.upstream is not None:
            yield self.upstream


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Proxy:
    """Listens on 127.0.0.1 (a free port, or ``listen_port``) and forwards every
    connection to ``upstream``, doing to its bytes what the current ``mode`` says."""

    def __init__(self, *, upstream: tuple[str, int], listen_port: int = 0, name: str = "") -> None:
        self.upstream = upstream
        self.name = name or f"proxy-{upstream[1]}"
        self.port = listen_port
        self._mode = Mode.PASS
        self._latency_s = 0.0
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.name,
                                        daemon=True)
        self.connections_made = 0
        """Client connections accepted since start (for tests that a host used the proxy)."""

    @classmethod
    def to_url(cls, url: str, *, name: str = "") -> Proxy:
        """A proxy (not yet started) to the host and port of a service URL."""
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"{url!r} names no host and port to proxy to")
        return cls(upstream=(parts.hostname, parts.port), name=name)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> Proxy:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        """Close every connection (reset) and the listener, and stop the thread."""
        if not self._thread.is_alive():
            if not self._loop.is_closed():  # never started
                self._loop.close()
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=CALL_TIMEOUT_S)
        self._loop.close()

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- what a test sets --------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def address(self) -> tuple[str, int]:
        return (LISTEN_HOST, self.port)

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by this proxy's (user, path, query kept)."""
        parts = urlsplit(url)
        userinfo, _, _hostport = parts.netloc.rpartition("@")
        netloc = f"{userinfo}@" if userinfo else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}{LISTEN_HOST}:{self.port}"))

    def set_mode(self, mode: Mode | str, *, latency_ms: float = 0.0) -> None:
        self._call(self._set_mode(Mode(mode), latency_ms / 1000.0))

    def heal(self) -> None:
        """Back to ``pass``: held bytes flow on, a downed listener listens again."""
        self.set_mode(Mode.PASS)

    def down(self) -> None:
        self.set_mode(Mode.DOWN)

    def blackhole(self) -> None:
        self.set_mode(Mode.BLACKHOLE)

    def latency(self, ms: float) -> None:
        self.set_mode(Mode.LATENCY, latency_ms=ms)

    @property
    def open_connections(self) -> int:
        return len(self._links)

    # -- on the proxy's loop -----------------------------------------------------------
    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT_S)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        await self._listen()

    async def _listen(self) -> None:
        # reuse_address: a port whose connections were just reset binds again at once.
        self._server = await asyncio.start_server(self._serve, LISTEN_HOST, self.port,
                                                  reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _set_mode(self, mode: Mode, latency_s: float) -> None:
        assert self._flowing is not None
        self._latency_s = latency_s if mode is Mode.LATENCY else 0.0
        if mode is Mode.DOWN:
            await self._go_down()
        elif self._server is None:
            await self._listen()
        if mode is Mode.BLACKHOLE:
            self._flowing.clear()
        else:
            self._flowing.set()
        self._mode = mode

    async def _go_down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            for task in link.tasks:
                task.cancel()
            for writer in link.writers():
                _reset(writer)
        self._links.clear()

    async def _shutdown(self) -> None:
        await self._go_down()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _serve(self, client_reader: asyncio.StreamReader,
                     client_writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self.connections_made += 1
        link = _Link(client=client_writer)
        self._links.add(link)
        try:
            await self._flowing.wait()  # a blackholed host's connection reaches nobody
            if link not in self._links:
                return  # reset by down() meanwhile
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                _reset(client_writer)  # the upstream refused: so do we
                return
            link.upstream = up_writer
            if link not in self._links:
                _reset(up_writer)
                return
            link.tasks = [asyncio.create_task(self._pump(client_reader, up_writer)),
                          asyncio.create_task(self._pump(up_reader, client_writer))]
            # When either direction ends, the link ends: neither service half-closes.
            await asyncio.wait(link.tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            if link in self._links:
                self._links.discard(link)
                for task in link.tasks:
                    task.cancel()
                for writer in link.writers():
                    writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read chunks as they come; a second task delivers each when the mode lets it."""
        chunks: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        deliver = asyncio.create_task(self._deliver(chunks, writer))
        try:
            try:
                while data := await reader.read(CHUNK_BYTES):
                    chunks.put_nowait((time.monotonic(), data))
            except (ConnectionError, OSError):
                pass
            chunks.put_nowait(None)
            await deliver  # what was read before the end still goes out
        finally:
            deliver.cancel()

    async def _deliver(self, chunks: asyncio.Queue[tuple[float, bytes] | None],
                       writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        while (chunk := await chunks.get()) is not None:
            arrived, data = chunk
            while True:
                await self._flowing.wait()
                due = arrived + self._latency_s - time.monotonic()
                if due <= 0:
                    break
                await asyncio.sleep(due)  # then check again: a blackhole may have begun
            writer.write(data)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                return
