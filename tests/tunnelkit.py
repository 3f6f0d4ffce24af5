"""Helpers for the tunnel tests: start tunnel pairs in-process, plain targets, free ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import securechan
from securechan.tunnel import Tunnel, TunnelSpec, parse_address

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def echo_then_bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then send b'BYE' and close: the reply only exists after the half-close."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write(b"BYE")
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass  # a test cut the connection on purpose
    finally:
        writer.close()


async def plain_echo(port: int, message: bytes) -> bytes:
    """Send ``message`` to the plain port, shut down the write side, and return everything read back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(message)
        writer.write_eof()
        return await reader.read()
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def plain_target(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextlib.contextmanager
def silent_target() -> Iterator[int]:
    """A port that accepts TCP and never answers (a securechan handshake towards it never completes)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        yield silent.getsockname()[1]
    finally:
        silent.close()


def server_spec(pki: Any, target: str, **kw: Any) -> TunnelSpec:
    kw.setdefault("listen", "127.0.0.1:0")
    listen = parse_address(kw.pop("listen"))
    return TunnelSpec(mode="server", listen=listen, target=parse_address(target), name=kw.pop("name", "srv"),
                      cert=str(pki.server_cert), key=str(pki.server_key), **kw)


def client_spec(pki: Any, target: str, **kw: Any) -> TunnelSpec:
    """A client tunnel. Unlike the command's default, it makes one securechan connection per connection
    (``no_mux``) unless the test gives ``mux`` or ``no_mux`` itself, or runs under the ``via`` fixture
    (:data:`MUX`): most tunnel tests are about that path; the multiplexed one has tests of its own."""
    if "mux" not in kw and "no_mux" not in kw:
        kw["no_mux"] = not MUX
    kw.setdefault("listen", "127.0.0.1:0")
    kw.setdefault("server_name", "localhost")
    kw.setdefault("cafile", str(pki.ca_file))
    listen = parse_address(kw.pop("listen"))
    return TunnelSpec(mode="client", listen=listen, target=parse_address(target), name=kw.pop("name", "cli"), **kw)


@contextlib.asynccontextmanager
async def running(*specs: TunnelSpec) -> AsyncIterator[list[Tunnel]]:
    tunnels = [Tunnel(spec) for spec in specs]
    try:
        for t in tunnels:
            await t.start()
        yield tunnels
    finally:
        for t in tunnels:
            await t.close(2)


#: Whether :func:`client_spec` makes a client tunnel in the default mode (multiplexing) rather than one with
#: ``no_mux``; the ``via`` fixture sets it per test.
MUX = False


@contextlib.asynccontextmanager
async def pair(pki: Any, target: str, *, server: dict[str, Any] | None = None,
               client: dict[str, Any] | None = None) -> AsyncIterator[tuple[Tunnel, Tunnel]]:
    """A server tunnel in front of ``target`` and a client tunnel in front of that server tunnel."""
    async with (
        running(server_spec(pki, target, **(server or {}))) as (srv,),
        running(client_spec(pki, f"127.0.0.1:{srv.port}", **(client or {}))) as (cli,),
    ):
        yield srv, cli


async def secure_client(pki: Any, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A securechan client of a server tunnel on ``port``, verifying it as 'localhost' against the test CA."""
    return await securechan.open_connection("127.0.0.1", port, config=pki.client_config(), server_name="localhost")


async def until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll until ``predicate()``; fail the test with a clear message if it never holds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"condition not reached within {limit} s")
        await asyncio.sleep(0.02)


def no_connections(*tunnels: Tunnel) -> bool:
    """No connection is open or being set up (a server tunnel's multiplexed connections, idle, may stay)."""
    return all(not t.relays and not t.connecting
               and t.active == (len(t.carriers) if t.spec.mode == "server" else 0) for t in tunnels)
