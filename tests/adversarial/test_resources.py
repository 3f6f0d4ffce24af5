"""Hostile peers that attack resources: huge lengths, slowloris, and a thousand idle connections.

Counts are configurable for longer runs: SECURECHAN_IDLE_CONNECTIONS (default 1000).
"""

from __future__ import annotations

import asyncio
import os
import resource
import tracemalloc

import pytest

import securechan
from securechan import AlertCode
from securechan.frames import HEADER_LEN, MAX_HANDSHAKE_BODY, FrameType, header, unpack_map

from .peers import assert_still_serving, connect, start_server
from .proxy import alert_code, split_frames

IDLE_CONNECTIONS = int(os.environ.get("SECURECHAN_IDLE_CONNECTIONS", "1000"))


def client_hello_bytes(config: securechan.ClientConfig) -> bytes:
    return securechan.Connection(config, server_name="localhost").data_to_send()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 15)


# -- lengths ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ftype", [FrameType.HANDSHAKE, FrameType.ALERT, FrameType.APPLICATION_DATA])
@pytest.mark.parametrize("length", [MAX_HANDSHAKE_BODY + 1, 2**31, 2**32 - 1])
async def test_huge_declared_length_over_tcp(recording_server, client_config, ftype: FrameType, length: int) -> None:
    """A frame head declaring a huge body is answered at once, from the seven head bytes alone."""
    reader, writer = await asyncio.open_connection("127.0.0.1", recording_server.port)
    writer.write(header(ftype, length))  # and nothing else: the server must not wait for the body
    answer = await read_until_closed(reader)
    writer.close()
    frames = split_frames(answer)
    expected = securechan.UnexpectedMessageError if ftype is FrameType.APPLICATION_DATA else (
        securechan.RecordOverflowError)
    assert [alert_code(f) for f in frames] == [int(expected.alert)]
    failure = await recording_server.next_failure()
    assert type(failure) is expected and not failure.remote
    await assert_still_serving(recording_server, client_config)


@pytest.mark.parametrize("state", ["handshake", "connected"])
def test_huge_length_is_refused_before_allocation(server_config, client_config, state: str) -> None:
    server = securechan.Connection(server_config)
    if state == "connected":
        client = securechan.Connection(client_config, server_name="localhost")
        for _ in range(3):
            server.receive_data(client.data_to_send())
            client.receive_data(server.data_to_send())
        assert server.handshake_complete
        server.data_to_send()
    ftype = FrameType.HANDSHAKE if state == "handshake" else FrameType.APPLICATION_DATA
    tracemalloc.start()
    try:
        with pytest.raises(securechan.RecordOverflowError):
            server.receive_data(header(ftype, 2**32 - 1) + b"\x00" * 100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A fixed cost (the alert, wiping the receive buffer), nowhere near the declared 4 GiB.
    assert peak < 1024 * 1024, f"refusing a 4 GiB frame allocated {peak} bytes"
    out = server.data_to_send()
    assert out  # the alert (encrypted once connected)
    if state == "handshake":
        assert unpack_map(out[HEADER_LEN:], 64)["code"] == AlertCode.RECORD_OVERFLOW


# -- slowloris --------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["client-hello", "after-server-hello"])
async def test_slowloris_ends_at_the_handshake_timeout(server_config, client_config, stage: str) -> None:
    """Trickling one byte at a time never extends the handshake: the server's timer is for the
    whole handshake, not per read."""
    server = await start_server(server_config, handshake_timeout=0.5)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        hello = client_hello_bytes(client_config)
        if stage == "client-hello":
            trickle = hello
        else:
            writer.write(hello)
            trickle = header(FrameType.HANDSHAKE, 1000) + bytes(1000)  # a KeyExchange that never completes
        sent = 0
        for byte in trickle:
            if reader.at_eof() or writer.transport.is_closing():
                break
            writer.write(bytes([byte]))
            sent += 1
            await asyncio.sleep(0.02)
            if server.handshake_failures:
                break
        failure = await server.next_failure()
        assert type(failure) is securechan.HandshakeTimeoutError
        assert sent < len(trickle), "the server waited for the whole trickle"
        answer = await read_until_closed(reader)
        writer.close()
        frames = split_frames(answer)
        assert alert_code(frames[-1]) == AlertCode.USER_CANCELED
        await assert_still_serving(server, client_config)
    finally:
        await server.close()


# -- a thousand idle connections --------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_idle_and_half_open_connections_do_not_starve_the_server(server_config, client_config) -> None:
    n = IDLE_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n + 256  # both ends of each connection live in this process
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    server = await start_server(server_config, handshake_timeout=120, backlog=min(n, 4096))
    hello = client_hello_bytes(client_config)
    idle: list[asyncio.StreamWriter] = []
    try:
        before = _rss()

        async def open_one(i: int) -> None:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            kind = i % 3
            if kind == 1:
                writer.write(hello[: len(hello) // 2])  # half a ClientHello
            elif kind == 2:
                writer.write(header(FrameType.HANDSHAKE, MAX_HANDSHAKE_BODY) + b"\x80")  # a 64 KiB promise
            idle.append(writer)

        for start in range(0, n, 200):
            await asyncio.gather(*(open_one(i) for i in range(start, min(n, start + 200))))
        async def all_accepted() -> None:
            while server.accepted < n:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(all_accepted(), 60)
        await asyncio.sleep(0.2)  # let the server read what the idle clients sent
        grown = _rss() - before
        print(f"{n} idle/half-open connections: RSS grew by {grown / 2**20:.1f} MiB")

        app = await connect(server.port, client_config, handshake_timeout=10)
        assert app.transport is not None
        app.transport.write(b"still here")
        app.transport.write_eof()
        await asyncio.wait_for(app.eof_event.wait(), 10)
        assert app.clean_eof and bytes(app.data) == b"still here"
        app.transport.close()
        assert not server.handshake_failures
        # Generous: the server's per-connection state plus this process's client-side sockets.
        assert grown < n * 256 * 1024 + 64 * 1024 * 1024, f"{n} idle connections grew RSS by {grown} bytes"
    finally:
        for w in idle:
            w.transport.abort()
        await server.close()
