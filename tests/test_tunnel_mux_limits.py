"""Resource limits of tunnel multiplexing against peers that abuse it (docs/SECURITY.md, "The tunnel").

Each test drives a real server or client tunnel over loopback with a peer that sends valid
but abusive traffic: many tiny frames, OPENs it never reads the answers to, a GOAWAY with
the handshake, a handshake that straddles a reload.
"""

from __future__ import annotations

import asyncio
import gc
import re
import socket
import struct
import tracemalloc
from typing import Any

import pytest
from muxkit import mux_peer, the_carrier, window_update
from tunnelkit import client_spec, echo_then_bye, plain_target, running, server_spec, until

import securechan
from securechan.tunnel import mux

pytestmark = pytest.mark.timeout(60)

OPEN, DATA, GOAWAY = 1, 2, 6


def frame(kind: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack("!BII", kind, stream, len(payload)) + payload


def mux_config(pki_dir: Any) -> securechan.ClientConfig:
    return pki_dir.client_config(alpn_protocols=[mux.PROTOCOL], resume=False)


async def test_a_stream_filled_with_one_byte_frames_holds_one_buffer_not_an_object_per_frame(pki_dir) -> None:
    """262,144 one-byte DATA frames for a target that reads nothing: the server holds about the
    window, not an object per frame (which was some 40 bytes each, and slow to hand on)."""
    stalled = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stalled.wait()
        writer.close()

    async with plain_target(never_reads) as port, running(server_spec(pki_dir, f"127.0.0.1:{port}")) as (srv,):
        reader, writer = await securechan.open_connection("127.0.0.1", srv.port, config=mux_config(pki_dir),
                                                          server_name="localhost")
        writer.write(frame(OPEN, 1))
        await until(lambda: len(srv.relays) == 1)  # the target is connected: the stream is wired
        (session,) = srv.carriers
        (stream,) = session.live
        stream.pause_reading()  # as the relay does when the target stops taking bytes
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            tiny = frame(DATA, 1, b"x") * 4096
            for _ in range(mux.WINDOW // 4096):
                writer.write(tiny)
                await writer.drain()
            await until(lambda: stream.get_read_buffer_size() == mux.WINDOW)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert held < 2 * mux.WINDOW, f"{held} bytes held for {mux.WINDOW} bytes of payload"
        (relay,) = srv.relays
        assert relay.held_bytes() >= mux.WINDOW  # what a stall is reported with counts the held bytes
        stalled.set()
        writer.transport.abort()


async def _opens_from_a_peer_that_does_not_read(pki_dir: Any, srv: Any, per_write: int, limit: int,
                                               pause: float = 0.0) -> None:
    """OPEN after OPEN from a mux client that takes almost nothing from its socket, until the server
    tunnel drops the carrier (or ``limit`` OPENs were sent)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the peer takes almost nothing
    sock.connect(("127.0.0.1", srv.port))
    sock.setblocking(False)
    _, writer = await securechan.open_connection(sock=sock, config=mux_config(pki_dir), server_name="localhost",
                                                 limit=1024)
    writer.transport.pause_reading()
    await until(lambda: len(srv.carriers) == 1)
    (session,) = srv.carriers
    # As a remote peer with a full TCP window would: the server's kernel takes little more.
    session.carrier_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    last = 0
    while srv.carriers and last < limit:
        writer.write(b"".join(frame(OPEN, i) for i in range(last + 1, last + per_write + 1)))
        last += per_write
        try:
            await asyncio.wait_for(writer.drain(), 5)
        except (ConnectionError, TimeoutError):
            break
        await asyncio.sleep(pause)
    await until(lambda: not srv.carriers, 30)
    writer.transport.abort()


async def test_a_peer_that_floods_refused_opens_without_reading_loses_its_carrier(pki_dir, tunnel_log) -> None:
    """Every OPEN is refused (the carrier takes the only slot); the peer never reads the RESETs.
    The server stops queueing them and aborts the carrier; refusals are logged once a second at most."""
    async with plain_target(echo_then_bye) as port, \
            running(server_spec(pki_dir, f"127.0.0.1:{port}", max_connections=1)) as (srv,):
        await _opens_from_a_peer_that_does_not_read(pki_dir, srv, per_write=20_000, limit=2_000_000)
    log = "\n".join(r.getMessage() for r in tunnel_log.records)
    assert "kept this side sending control frames (RESET, FIN) while not reading them" in log
    refusals = [r.getMessage() for r in tunnel_log.records if "refused" in r.getMessage()]
    assert srv.rejected > 1000 and len(refusals) <= 30, (srv.rejected, len(refusals))
    counted = sum(int(m.group(1)) if (m := re.search(r"; (\d+) more streams? refused", line)) else 1
                  for line in refusals)
    assert counted == srv.rejected, "a refusal went neither into a line nor into a count"


async def test_a_peer_whose_streams_all_fail_and_that_never_reads_loses_its_carrier(pki_dir, tunnel_log) -> None:
    """Every OPEN is admitted and fails (nothing listens at the target): the server's RESETs (code 2) are
    not answers to a frame but count the same, so a peer that reads none of them loses its carrier."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        target = closed.getsockname()[1]  # bound, not listening: connections are refused
        async with running(server_spec(pki_dir, f"127.0.0.1:{target}")) as (srv,):
            # A pause between writes lets the target connections fail.
            await _opens_from_a_peer_that_does_not_read(pki_dir, srv, per_write=500, limit=200_000, pause=0.01)
    log = "\n".join(r.getMessage() for r in tunnel_log.records)
    assert "kept this side sending control frames (RESET, FIN) while not reading them" in log


async def _goaway_server(pki_dir: Any) -> tuple[asyncio.Server, int]:
    """A securechan server that chooses securechan-mux/1 and says GOAWAY with its first bytes."""

    class Goaway(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(frame(GOAWAY, 0))  # type: ignore[attr-defined]

    config = pki_dir.server_config(alpn_protocols=[mux.PROTOCOL])
    server = await securechan.create_server(Goaway, "127.0.0.1", 0, config=config)
    return server, server.sockets[0].getsockname()[1]


async def test_a_carrier_going_away_as_it_is_made_fails_the_waiting_connections_cleanly(pki_dir, tunnel_log) -> None:
    """Plain connections waiting for the carrier get a reset and a log line, never a hang or a lost slot."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    server, port = await _goaway_server(pki_dir)
    try:
        async with running(client_spec(pki_dir, f"127.0.0.1:{port}", mux=True)) as (cli,):
            conns = [await asyncio.open_connection("127.0.0.1", cli.port) for _ in range(3)]
            for reader, writer in conns:
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(), 10)
                writer.close()
            await until(lambda: cli.active == 0 and not cli.connecting and not cli.relays)
    finally:
        server.close()
    assert "stopped taking streams as soon as they were made" in "\n".join(r.getMessage() for r in tunnel_log.records)
    assert not errors, errors


async def test_a_client_tunnel_stopping_while_its_carrier_is_made_cuts_the_waiting_connections(
        pki_dir, tunnel_log) -> None:
    with socket.socket() as silent:  # accepts TCP, never answers: the carrier's handshake hangs
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        async with running(client_spec(pki_dir, f"127.0.0.1:{silent.getsockname()[1]}", mux=True)) as (cli,):
            conns = [await asyncio.open_connection("127.0.0.1", cli.port) for _ in range(3)]
            await until(lambda: len(cli.connecting) == 3)
            cli.stop_accepting()
            assert await cli.drain(0.2) == 3
            for reader, writer in conns:
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(), 10)
                writer.close()
            assert cli.active == 0 and not cli.connecting and not cli._tasks


async def test_a_carrier_whose_handshake_straddles_a_reload_is_sent_away(pki_dir, tunnel_log) -> None:
    """Accepted before a SIGHUP, completed after it: the server sends GOAWAY at once, so the client's
    new streams go to a carrier authenticated under the reloaded configuration."""
    async with plain_target(echo_then_bye) as port, running(server_spec(pki_dir, f"127.0.0.1:{port}")) as (srv,):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        conn = securechan.Connection(mux_config(pki_dir), server_name="localhost")
        writer.write(conn.data_to_send())  # ClientHello: accepted under today's configuration
        events: list[Any] = []
        reloaded = False
        while not conn.handshake_complete:
            events += conn.receive_data(await asyncio.wait_for(reader.read(65536), 10))
            if out := conn.data_to_send():
                if not reloaded:
                    srv.reload()  # between the server's hello and the client's Finished
                    reloaded = True
                writer.write(out)
        while len(plain := b"".join(e.data for e in events if isinstance(e, securechan.DataReceived))) < 9:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the server closed without a GOAWAY"
            events += conn.receive_data(data)
        assert plain[:9] == frame(GOAWAY, 0)
        assert all(session.going_away for session in srv.carriers)
        writer.close()


async def _talker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A target with more to say than any credit allows: it writes until the tunnel stops taking bytes."""
    try:
        while True:
            writer.write(b"z" * 65536)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def test_one_byte_credits_make_a_data_frame_per_loop_iteration_not_one_per_credit(pki_dir) -> None:
    """4,096 WINDOW_UPDATEs of one byte, each in a record of its own, all written at once: the bytes they free
    leave as a DATA frame per event-loop iteration that read them (a frame per credit would be 9 bytes of
    header, a Python object and a record slot per byte of payload)."""
    async with plain_target(_talker) as port, running(server_spec(pki_dir, f"127.0.0.1:{port}")) as (srv,), \
            mux_peer(pki_dir, srv.port) as peer:
        peer.send(frame(OPEN, 1))
        await until(lambda: len(peer.data[1]) == mux.WINDOW)
        (stream,) = the_carrier(srv).live
        await until(lambda: stream.get_write_buffer_size() > 4096)
        frames_before = len(peer.of(1, DATA))
        peer.granted[1] += 4096
        for _ in range(4096):
            peer.send(window_update(1, 1))  # one record each, one TCP write for all (no await between)
        await until(lambda: len(peer.data[1]) == mux.WINDOW + 4096)
        # 147 KB of records arrive in a handful of reads (ten or so here); one frame per credit would be 4,096.
        assert len(peer.of(1, DATA)) - frames_before <= 64


async def test_credit_for_a_peer_that_does_not_read_leaves_the_backlog_where_it_is(pki_dir) -> None:
    """The peer stops reading the carrier (its write buffer fills: pause_writing), then hands out credit a
    byte at a time. The server sends no DATA into the full carrier: the bytes wait in the stream's backlog,
    bounded, not as frames in the carrier's buffer at ten times their size. Reading again, the peer gets
    every byte."""
    async with plain_target(_talker) as port, running(server_spec(pki_dir, f"127.0.0.1:{port}")) as (srv,):
        reader, writer = await securechan.open_connection("127.0.0.1", srv.port, config=mux_config(pki_dir),
                                                          server_name="localhost")
        writer.transport.pause_reading()  # the peer reads nothing more
        writer.write(frame(OPEN, 1) + frame(OPEN, 3))
        await until(lambda: len(srv.relays) == 2)
        (session,) = srv.carriers
        low, high = sorted(session.live, key=lambda s: s.stream_id)
        await until(lambda: low.get_write_buffer_size() > 0)  # stream 1 used its credit
        while not session.writing_paused:  # stream 3's credit fills the carrier
            writer.write(window_update(3, 1 << 20))
            await writer.drain()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        carrier_before, backlog_before = session.carrier.get_write_buffer_size(), low.get_write_buffer_size()
        writer.write(window_update(1, 1) * backlog_before)
        await writer.drain()
        await asyncio.sleep(0.5)
        assert session.carrier.get_write_buffer_size() - carrier_before < 1024
        assert low.get_write_buffer_size() == backlog_before
        writer.transport.abort()
