"""How a client tunnel chooses between multiplexing and one securechan connection per connection.

By default it multiplexes, and falls back to a connection each when the server tunnel refuses
(``--no-mux`` there): the connection it made to find out carries the first waiting connection, so
the target sees no connection that nobody asked for. ``--no-mux`` on the client never offers
multiplexing; ``--mux`` requires it (test_tunnel_mux.py has those failures).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from tunnelkit import client_spec, free_port, pair, plain_echo, running, server_spec, until

from securechan.tunnel import service

pytestmark = pytest.mark.timeout(60)

#: A client tunnel as the command makes it by default (tunnelkit's client_spec makes one with no_mux).
DEFAULT = {"no_mux": False}
FALLBACK = ("does not accept multiplexed connections (a server tunnel with --no-mux, or a securechan server that "
            "is not a tunnel)")


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "securechan.tunnel" and r.levelno >= level]


class CountingEcho:
    """A plain echo target that counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def counting_target() -> AsyncIterator[tuple[CountingEcho, int]]:
    target = CountingEcho()
    server = await asyncio.start_server(target.handle, "127.0.0.1", 0)
    try:
        yield target, server.sockets[0].getsockname()[1]
    finally:
        server.close()


def server_at(pki: Any, target: int, port: int, **kw: Any) -> Any:
    """A server tunnel on ``port`` in front of ``target`` (a test stops it and starts another on the port)."""
    return running(server_spec(pki, f"127.0.0.1:{target}", listen=f"127.0.0.1:{port}", **kw))


class Gate:
    """A TCP forwarder that holds every connection until it is opened."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.opened = asyncio.Event()
        self.waiting = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.waiting += 1
        await self.opened.wait()
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                dst.write_eof()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        writer.close()
        up_writer.close()


async def test_a_default_client_tunnel_multiplexes_when_the_server_tunnel_accepts_it(pki_dir: Any) -> None:
    async with counting_target() as (target, port), pair(pki_dir, f"127.0.0.1:{port}", client=DEFAULT) as (srv, cli):
        replies = await asyncio.gather(*(plain_echo(cli.port, b"m%d" % i) for i in range(5)))
        assert replies == [b"m%d" % i for i in range(5)]
        assert len(cli.carriers) == 1 and len(srv.carriers) == 1
        (carrier,) = cli.carriers
        assert carrier.carrier is not None and carrier.carrier.get_extra_info("alpn_protocol") == "securechan-mux/1"
        assert target.accepted == 5


@contextlib.asynccontextmanager
async def gated(upstream: int) -> AsyncIterator[tuple[Gate, int]]:
    gate = Gate(upstream)
    forwarder = await asyncio.start_server(gate.handle, "127.0.0.1", 0)
    try:
        yield gate, forwarder.sockets[0].getsockname()[1]
    finally:
        gate.opened.set()
        forwarder.close()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [m for m in messages(caplog, logging.WARNING) if FALLBACK in m]


async def test_a_default_client_tunnel_falls_back_to_a_connection_each_against_no_mux(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    """Five connections wait for the first connection to the server tunnel, which refuses multiplexing:
    that connection carries one of them, the other four get their own, and so does a later one. The
    server tunnel and the target see exactly the six connections, and the fallback is logged once."""
    async with counting_target() as (target, port), \
            running(server_spec(pki_dir, f"127.0.0.1:{port}", no_mux=True)) as (srv,), \
            gated(srv.port) as (gate, gate_port), \
            running(client_spec(pki_dir, f"127.0.0.1:{gate_port}", **DEFAULT)) as (cli,):
        waiting = [asyncio.ensure_future(plain_echo(cli.port, b"c%d" % i)) for i in range(5)]
        await until(lambda: gate.waiting == 1 and len(cli._mux_waiting) == 5)
        gate.opened.set()
        assert await asyncio.gather(*waiting) == [b"c%d" % i for i in range(5)]
        assert await plain_echo(cli.port, b"later") == b"later"
        await until(lambda: srv.completed == 6 and cli.completed == 6)
        assert target.accepted == 6 and srv.accepted == 6 and gate.waiting == 6
    (warning,) = warnings_of(tunnel_log)
    assert (f"the server at 127.0.0.1:{gate_port} {FALLBACK}: this tunnel makes one securechan connection per "
            "connection, and asks again in 600 s; give it --no-mux to do so from the start" in warning)
    served = [m for m in messages(tunnel_log) if m.startswith("tunnel 'cli': 127.0.0.1:") and "up=" in m]
    assert len(served) == 6 and all("identity='localhost'" in m and "closed: " in m for m in served)


async def test_after_a_refusal_multiplexing_is_offered_again_after_the_recheck_interval(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused: connections of their own (offering no multiplexing: the server tunnel, back without
    --no-mux, does not make one a carrier). After MUX_RECHECK the next connection asks again: refused
    again (said at debug level only), then, once the server tunnel accepts, a carrier."""
    monkeypatch.setattr(service, "MUX_RECHECK", 0.3)
    server_port = free_port()
    async with counting_target() as (target, port):
        async with running(client_spec(pki_dir, f"127.0.0.1:{server_port}", **DEFAULT)) as (cli,):
            async with server_at(pki_dir, port, server_port, no_mux=True):
                assert await plain_echo(cli.port, b"refused") == b"refused"
                await asyncio.sleep(0.35)
                assert await plain_echo(cli.port, b"refused again") == b"refused again"
            async with server_at(pki_dir, port, server_port) as (srv,):
                reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
                writer.write(b"own")
                assert await reader.readexactly(3) == b"own"
                assert not srv.carriers and not cli.carriers  # open now, and not a carrier
                writer.close()
                await asyncio.sleep(0.35)
                assert await plain_echo(cli.port, b"carried") == b"carried"
                assert len(srv.carriers) == 1 and len(cli.carriers) == 1
        assert target.accepted == 4
    assert len(warnings_of(tunnel_log)) == 1
    assert len([m for m in messages(tunnel_log) if FALLBACK in m]) == 2


async def test_a_reload_offers_multiplexing_again_at_once(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    server_port = free_port()
    async with counting_target() as (target, port):
        async with running(client_spec(pki_dir, f"127.0.0.1:{server_port}", **DEFAULT)) as (cli,):
            async with server_at(pki_dir, port, server_port, no_mux=True):
                assert await plain_echo(cli.port, b"one") == b"one"
            async with server_at(pki_dir, port, server_port) as (srv,):
                assert await plain_echo(cli.port, b"two") == b"two"
                assert not cli.carriers
                cli.reload()
                assert await plain_echo(cli.port, b"three") == b"three"
                assert len(srv.carriers) == 1 and len(cli.carriers) == 1
        assert target.accepted == 3
    assert len(warnings_of(tunnel_log)) == 1


async def test_a_refusal_of_a_connection_made_before_a_reload_changes_nothing(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    """The first connection is still being made when the client tunnel reloads: it still carries its
    waiting connection, but its refusal says nothing of the server under the new configuration, so the
    next connection asks again, and that refusal is the one logged."""
    async with counting_target() as (target, port), \
            running(server_spec(pki_dir, f"127.0.0.1:{port}", no_mux=True)) as (srv,), \
            gated(srv.port) as (gate, gate_port), \
            running(client_spec(pki_dir, f"127.0.0.1:{gate_port}", **DEFAULT)) as (cli,):
        first = asyncio.ensure_future(plain_echo(cli.port, b"first"))
        await until(lambda: gate.waiting == 1 and len(cli._mux_waiting) == 1)
        cli.reload()
        gate.opened.set()
        assert await first == b"first"
        assert not warnings_of(tunnel_log)
        assert await plain_echo(cli.port, b"second") == b"second"
        assert len(warnings_of(tunnel_log)) == 1
        assert await plain_echo(cli.port, b"third") == b"third"
        await until(lambda: srv.completed == 3)
        assert target.accepted == 3 and gate.waiting == 3


async def test_a_client_tunnel_with_no_mux_never_offers_multiplexing(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    async with counting_target() as (target, port), \
            pair(pki_dir, f"127.0.0.1:{port}", client={"no_mux": True}) as (srv, cli):
        replies = await asyncio.gather(*(plain_echo(cli.port, b"n%d" % i) for i in range(3)))
        assert replies == [b"n%d" % i for i in range(3)]
        await until(lambda: srv.completed == 3)
        assert srv.accepted == 3 and target.accepted == 3
        assert cli._client_config is not None and cli._client_config.alpn_protocols == ()
    assert not [m for m in messages(tunnel_log) if "multiplexed" in m]


async def test_a_fallback_connection_nobody_waits_for_any_more_is_closed_cleanly(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    """The only connection waiting for the first connection to the server tunnel is cut while that is
    still being made; the server tunnel refuses multiplexing, and no connection is left to carry: the
    client tunnel closes it (close_notify), and the server tunnel logs a clean end, not a reset."""
    async with counting_target() as (_target, port), \
            running(server_spec(pki_dir, f"127.0.0.1:{port}", no_mux=True)) as (srv,), \
            gated(srv.port) as (gate, gate_port), \
            running(client_spec(pki_dir, f"127.0.0.1:{gate_port}", **DEFAULT)) as (cli,):
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        await until(lambda: gate.waiting == 1 and len(cli._mux_waiting) == 1)
        (waiting,) = cli.connecting
        waiting.stop("cut by the test")
        gate.opened.set()
        await until(lambda: cli.active == 0 and not cli.connecting and srv.completed == 1)
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
    ended = [m for m in messages(tunnel_log) if m.startswith("tunnel 'srv': 127.0.0.1:") and "up=0 down=0" in m]
    assert len(ended) == 1 and "closed: client closed first" in ended[0]
    assert len(warnings_of(tunnel_log)) == 1
    (failed,) = [m for m in messages(tunnel_log, logging.WARNING) if m.startswith("tunnel 'cli': 127.0.0.1:")]
    assert "identity=- suite=-" in failed and failed.endswith("closed: cut by the test")


@pytest.mark.parametrize("client", [{"no_mux": True}, DEFAULT], ids=["no-mux", "fallback"])
async def test_a_defect_while_starting_a_relay_of_its_own_resets_the_client_and_frees_its_slot(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, client: dict[str, bool]
) -> None:
    """A connection that carries one connection (--no-mux, or the fallback) whose relay cannot start (a bug,
    here made by breaking the identity lookup): the plain client is reset, the slot freed, the line written
    and the exception handed to the loop, not lost."""
    def broken(_end: Any) -> tuple[str, str]:
        raise RuntimeError("defect")

    monkeypatch.setattr(service, "_session_text", broken)
    loop = asyncio.get_running_loop()
    handled: list[str] = []
    loop.set_exception_handler(lambda _loop, context: handled.append(context["message"]))
    try:
        async with counting_target() as (_target, port), \
                running(server_spec(pki_dir, f"127.0.0.1:{port}", no_mux=True)) as (srv,), \
                running(client_spec(pki_dir, f"127.0.0.1:{srv.port}", **client)) as (cli,):
            with pytest.raises(ConnectionResetError):
                await plain_echo(cli.port, b"x")
            await until(lambda: cli.active == 0 and not cli.connecting and not cli.relays)
    finally:
        loop.set_exception_handler(None)
    assert handled == ["exception while starting a tunnel relay"]
    (failed,) = [m for m in messages(tunnel_log, logging.WARNING) if m.startswith("tunnel 'cli': 127.0.0.1:")]
    assert failed.endswith("closed: internal error while starting the relay (RuntimeError)")
