"""Honest peers that record everything: what the application received, and how each side ended.

The server is built from the public pieces (:class:`securechan.SecureProtocol` over a
:class:`securechan.Connection`) so a test can see the typed exception of a handshake that
failed on the server side, which the stream API only logs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import securechan

#: Every test connection gets a short handshake timeout so a stalled attack ends quickly.
HANDSHAKE_TIMEOUT = 2.0

Sequence_of_bytes = list[bytes] | tuple[bytes, ...]


class Recorder(asyncio.Protocol):
    """An application protocol that records its bytes and how its connection ended.

    ``greeting`` is sent once the handshake completes; with ``echo`` every byte received
    is sent back, and a clean EOF (close_notify) is answered by close_notify.
    """

    def __init__(
        self, greeting: Sequence_of_bytes = (), echo: bool = False, close_after_greeting: bool = False
    ) -> None:
        self.greeting = list(greeting)
        self.echo = echo
        self.close_after_greeting = close_after_greeting
        self.transport: securechan.SecureTransport | None = None
        self.data = bytearray()
        self.clean_eof = False
        self.eof_event = asyncio.Event()
        self.error: BaseException | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, securechan.SecureTransport)
        self.transport = transport
        for chunk in self.greeting:
            transport.write(chunk)
        if self.close_after_greeting:
            transport.write_eof()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.echo and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def eof_received(self) -> bool:
        self.clean_eof = True
        self.eof_event.set()
        if self.echo and self.transport is not None:
            self.transport.write_eof()
        return True  # keep reading until the peer closes its side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.error = exc
        self.eof_event.set()
        if not self.lost.done():
            self.lost.set_result(exc)

    async def ended(self, timeout: float = 10.0) -> BaseException | None:
        return await asyncio.wait_for(asyncio.shield(self.lost), timeout)


@dataclass
class RecordingServer:
    port: int
    server: asyncio.Server
    apps: list[Recorder] = field(default_factory=list)
    handshake_failures: list[securechan.SecureChannelError | BaseException] = field(default_factory=list)
    #: TCP connections accepted so far (handshaken or not).
    accepted: int = 0
    failure_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def next_failure(self, after: int = 0, timeout: float = 10.0) -> BaseException:
        """Wait until more than ``after`` handshake failures were recorded; return the next one."""
        async def wait() -> None:
            while len(self.handshake_failures) <= after:
                self.failure_event.clear()
                await self.failure_event.wait()

        await asyncio.wait_for(wait(), timeout)
        return self.handshake_failures[after]

    async def close(self) -> None:
        self.server.close()
        for app in self.apps:
            if app.transport is not None:
                app.transport.abort()
        await self.server.wait_closed()


async def start_server(
    config: securechan.ServerConfig,
    app_factory: Callable[[], Recorder] | None = None,
    *,
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
    backlog: int = 100,
) -> RecordingServer:
    loop = asyncio.get_running_loop()
    holder: list[RecordingServer] = []

    def make_app() -> Recorder:
        app = app_factory() if app_factory is not None else Recorder(echo=True)
        holder[0].apps.append(app)
        return app

    def failed(_proto: securechan.SecureProtocol, exc: BaseException) -> None:
        holder[0].handshake_failures.append(exc)
        holder[0].failure_event.set()

    def factory() -> securechan.SecureProtocol:
        holder[0].accepted += 1
        proto = securechan.SecureProtocol(securechan.Connection(config), make_app, None, handshake_timeout)
        proto.on_handshake_failed = failed
        return proto

    server = await loop.create_server(factory, "127.0.0.1", 0, backlog=backlog)
    rs = RecordingServer(server.sockets[0].getsockname()[1], server)
    holder.append(rs)
    return rs


async def connect(
    port: int,
    config: securechan.ClientConfig,
    app: Recorder | None = None,
    *,
    server_name: str = "localhost",
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
) -> Recorder:
    """Handshake through 127.0.0.1:``port``; raises the typed error if the handshake fails."""
    recorder = app or Recorder()
    await securechan.create_connection(
        lambda: recorder, "127.0.0.1", port, config=config, server_name=server_name,
        handshake_timeout=handshake_timeout,
    )
    return recorder


async def assert_still_serving(server: RecordingServer, config: securechan.ClientConfig) -> None:
    """A fresh honest client, straight to the server, gets a full echo round trip and a clean close."""
    payload = os.urandom(4096)
    app = await connect(server.port, config)
    assert app.transport is not None
    app.transport.write(payload)
    app.transport.write_eof()
    await asyncio.wait_for(app.eof_event.wait(), 10)
    assert app.clean_eof, f"honest connection after the attack did not close cleanly: {app.error!r}"
    assert bytes(app.data) == payload
    app.transport.close()
    assert await app.ended() is None


def assert_prefix(delivered: bytes | bytearray, sent: bytes) -> None:
    """Nothing but a prefix of what the honest side sent was delivered (no tampered byte)."""
    assert sent.startswith(bytes(delivered)), "the application received bytes the honest peer never sent"
