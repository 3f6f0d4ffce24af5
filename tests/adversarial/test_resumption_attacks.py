"""An attacker in the middle of resumed (session-ticket) handshakes.

A resumed handshake is ClientHello(ticket, binder) → ServerHello(resumed) + Finished(server) →
Finished(client). The client completes when the server's Finished verifies, so under attack
a client may see its connection open and then fail; what must hold is that the server never
completes, nothing reaches the server's application, and both sides end with typed errors.
"""

from __future__ import annotations

import asyncio
import os

import pytest

import securechan
from securechan.frames import HEADER_LEN

from .peers import RecordingServer, assert_still_serving, connect, start_server
from .proxy import Attack, Direction, Flow, FrameProxy, Verdict, flip, message_of, message_type, rewrite


class OnFlow(Attack):
    """Apply ``fn(direction, n, frame)`` only on connection ``index`` of the proxy (the earlier ones prime)."""

    def __init__(self, index: int, fn) -> None:  # type: ignore[no-untyped-def]
        self.index, self.fn = index, fn
        self.counts = {d: 0 for d in Direction}

    def frame(self, flow: Flow, direction: Direction, frame: bytes) -> Verdict:
        if flow.index != self.index:
            return [frame]
        n = self.counts[direction]
        self.counts[direction] = n + 1
        return self.fn(direction, n, frame)  # type: ignore[no-any-return]


async def primed(server_config: securechan.ServerConfig, pki_dir) -> tuple[RecordingServer, FrameProxy, int,  # type: ignore[no-untyped-def]
                                                                            securechan.ClientConfig]:
    """A server, a proxy in front of it, and a client config holding a ticket for the proxy's address."""
    server = await start_server(server_config)
    proxy = FrameProxy(server.port)
    port = await proxy.start()
    config = pki_dir.client_config()
    app = await connect(port, config)
    assert app.transport is not None
    app.transport.write(b"prime")
    app.transport.write_eof()
    await asyncio.wait_for(app.eof_event.wait(), 10)
    app.transport.close()
    await app.ended()
    assert len(config.session_cache.peek(("127.0.0.1", port, "localhost"))) == 1
    return server, proxy, port, config


async def resumed_under_attack(server: RecordingServer, port: int, config: securechan.ClientConfig) -> tuple[
        BaseException, BaseException]:
    """One connection through the attacking proxy; returns (client error, server error)."""
    try:
        app = await connect(port, config)
    except securechan.SecureChannelError as exc:
        client_error: BaseException = exc
    else:
        assert app.transport is not None
        app.transport.write(b"request")
        error = await app.ended()
        assert isinstance(error, securechan.SecureChannelError), f"attacked resumed connection ended with {error!r}"
        client_error = error
    server_error = await server.next_failure(after=0)
    assert isinstance(server_error, securechan.SecureChannelError)
    assert len(server.apps) == 1, "the server completed an attacked handshake"
    assert bytes(server.apps[0].data) == b"prime"
    return client_error, server_error


def _positions(frame: bytes) -> list[tuple[int, int]]:
    body = len(frame) - HEADER_LEN
    step = max(1, body // 12)
    return [(0, 7), (1, 1), (2, 0), (6, 0), *((HEADER_LEN + i, i % 8) for i in range(0, body, step)),
            (len(frame) - 1, 3)]


RESUMED_FRAMES = {"client_hello": (Direction.C2S, 0), "server_hello": (Direction.S2C, 0),
                  "server_finished": (Direction.S2C, 1), "client_finished": (Direction.C2S, 1)}


async def test_bit_flip_sweep_resumed_handshake(server_config, pki_dir) -> None:
    """Learn the resumed frames from one honest resumption, then flip bits in each of them."""
    server, proxy, port, config = await primed(server_config, pki_dir)
    app = await connect(port, config)
    assert app.transport is not None and app.transport.get_extra_info("securechan").resumed
    app.transport.close()
    await app.ended()
    await asyncio.wait_for(proxy.flows[1].done.wait(), 10)
    honest = proxy.flows[1]
    assert message_type(honest.frames[Direction.S2C][0]) == "server_hello"
    assert message_of(honest.frames[Direction.S2C][0]).get("resumed") is True
    assert "ticket" in message_of(honest.frames[Direction.C2S][0])
    cases = [(name, pos, bit) for name, (d, i) in RESUMED_FRAMES.items()
             for pos, bit in _positions(honest.frames[d][i])]
    await proxy.close()
    await server.close()

    limit = asyncio.Semaphore(6)
    failures: list[str] = []

    async def one(name: str, pos: int, bit: int) -> None:
        async with limit:
            srv, prx, prt, cfg = await primed(server_config, pki_dir)
            target = RESUMED_FRAMES[name]
            prx.attack = OnFlow(1, lambda d, n, f: [flip(f, pos, bit)] if (d, n) == target else [f])
            try:
                await resumed_under_attack(srv, prt, cfg)
                await assert_still_serving(srv, pki_dir.client_config(resume=False))
            except BaseException as exc:
                failures.append(f"{name} byte {pos} bit {bit}: {exc!r}")
            finally:
                await prx.close()
                await srv.close()

    await asyncio.gather(*(one(*c) for c in cases))
    assert not failures, "\n".join(failures)
    assert len(cases) > 40


@pytest.mark.parametrize("change", ["strip-ticket", "foreign-ticket", "binder", "suites"])
async def test_client_hello_rewritten(server_config, pki_dir, change: str) -> None:
    """Removing the ticket (downgrade to a full handshake), splicing in another client's ticket,
    or touching the binder or suites: the Finished MACs refuse the result."""
    server, proxy, port, config = await primed(server_config, pki_dir)
    other_ticket = os.urandom(64)
    if change == "foreign-ticket":
        other = pki_dir.client_config()
        app = await connect(port, other)
        app.transport.close()  # type: ignore[union-attr]
        await app.ended()
        other_ticket = other.session_cache.peek(("127.0.0.1", port, "localhost"))[0].ticket

    def fn(d: Direction, n: int, f: bytes) -> Verdict:
        if (d, n) != (Direction.C2S, 0):
            return [f]
        if change == "strip-ticket":
            return [rewrite(f, ticket=None, binder=None)]
        if change == "foreign-ticket":
            m = message_of(f)
            binder = m.pop("binder")
            return [rewrite(rewrite(f, ticket=other_ticket, binder=None), binder=binder)]
        if change == "binder":
            return [rewrite(f, binder=os.urandom(32))]
        return [rewrite(rewrite(f, suites=[2], binder=None), binder=message_of(f)["binder"])]

    index = len(proxy.flows)
    proxy.attack = OnFlow(index, fn)
    apps_before = len(server.apps)
    try:
        app = await connect(port, config)
    except securechan.SecureChannelError as exc:
        client_error: BaseException = exc
    else:
        app.transport.write(b"request")  # type: ignore[union-attr]
        client_error = await app.ended()  # type: ignore[assignment]
    assert isinstance(client_error, securechan.SecureChannelError), repr(client_error)
    failure = await server.next_failure()
    # Every rewrite falls back to a full handshake whose transcript no longer matches the client's.
    assert type(failure) is securechan.HandshakeAuthError and not failure.remote
    assert type(client_error) is securechan.HandshakeAuthError and client_error.remote
    assert len(server.apps) == apps_before, "the server completed a rewritten handshake"
    await proxy.close()
    await assert_still_serving(server, pki_dir.client_config(resume=False))
    await server.close()


@pytest.mark.parametrize("single_use", [False, True])
async def test_replayed_resumed_flight_is_refused(pki_dir, single_use: bool) -> None:
    """A recorded resumed client flight (ClientHello with ticket and binder, Finished, data) replayed:
    the server's fresh random and key share make the recorded Finished wrong; with single-use
    tickets the ticket is refused outright and the full handshake cannot proceed either."""
    server_config = pki_dir.server_config(ticket_single_use=single_use)
    server, proxy, port, config = await primed(server_config, pki_dir)
    app = await connect(port, config)
    assert app.transport is not None and app.transport.get_extra_info("securechan").resumed
    app.transport.write(b"pay mallory")
    app.transport.write_eof()
    await asyncio.wait_for(app.eof_event.wait(), 10)
    app.transport.close()
    await app.ended()
    await asyncio.wait_for(proxy.flows[1].done.wait(), 10)
    recorded = b"".join(proxy.flows[1].frames[Direction.C2S])
    await proxy.close()
    assert [bytes(a.data) for a in server.apps] == [b"prime", b"pay mallory"]

    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(recorded)
    await writer.drain()
    await asyncio.wait_for(reader.read(), 10)
    writer.close()
    failure = await server.next_failure()
    expected = securechan.UnexpectedMessageError if single_use else securechan.HandshakeAuthError
    assert type(failure) is expected and not failure.remote, repr(failure)
    assert len(server.apps) == 2, "the replayed flight reached the application"
    await assert_still_serving(server, pki_dir.client_config(resume=False))
    await server.close()
