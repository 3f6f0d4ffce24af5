"""Tunnel multiplexing (``securechan-mux/1``, docs/PROTOCOL.md §14) against a real server tunnel.

A hand-written mux client (:class:`muxkit.MuxPeer`) opens a securechan connection to a server tunnel
in front of a real plain target and writes raw frames: hostile ones (every error of §14.5
must make the server abort the carrier, and log why) and edge cases of framing, flow
control, stream ends and GOAWAY. The last tests run a real ``--mux`` client tunnel against
servers that fail it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
from typing import Any

import pytest
from muxkit import (
    DATA,
    FIN,
    GOAWAY,
    MAX_CREDIT,
    OPEN,
    OPEN_STATE,
    PROTOCOL,
    RESET,
    WINDOW,
    WINDOW_UPDATE,
    Target,
    credit_reaches,
    frame,
    mux_peer,
    server_tunnel,
    the_carrier,
    window_update,
)
from tunnelkit import (
    client_spec,
    echo_then_bye,
    free_port,
    pair,
    plain_echo,
    plain_target,
    running,
    server_spec,
    until,
)

import securechan
from securechan.tunnel import Tunnel, mux, service

pytestmark = pytest.mark.timeout(60)


def tunnel_lines(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "securechan.tunnel" and r.levelno >= level)


# -- §14.5: every protocol error aborts the carrier ---------------------------------------------------

O1 = frame(OPEN, 1)
PROTOCOL_ERRORS: dict[str, tuple[bytes, str]] = {
    "unknown-type": (frame(7, 1), "unknown frame type 7"),
    "type-zero": (frame(0, 0), "unknown frame type 0"),
    "open-with-payload": (frame(OPEN, 1, b"x"), "frame type 1 with a 1-byte payload (expected 0)"),
    "fin-with-payload": (O1 + frame(FIN, 1, b"x"), "frame type 3 with a 1-byte payload (expected 0)"),
    "reset-without-code": (O1 + frame(RESET, 1), "frame type 4 with a 0-byte payload (expected 1)"),
    "reset-with-two-bytes": (O1 + frame(RESET, 1, b"\x00\x00"), "frame type 4 with a 2-byte payload (expected 1)"),
    "window-update-3-bytes": (O1 + frame(WINDOW_UPDATE, 1, b"\x00\x00\x01"),
                              "frame type 5 with a 3-byte payload (expected 4)"),
    "goaway-with-payload": (frame(GOAWAY, 0, b"x"), "frame type 6 with a 1-byte payload (expected 0)"),
    "empty-data": (O1 + frame(DATA, 1), "stream 1: empty DATA frame"),
    "data-beyond-credit": (O1 + frame(DATA, 1, length=WINDOW + 1),
                           f"stream 1: {WINDOW + 1} bytes of DATA beyond its {WINDOW} bytes of credit"),
    "data-after-fin": (O1 + frame(FIN, 1) + frame(DATA, 1, b"x"), "stream 1: DATA after FIN"),
    "fin-after-fin": (O1 + frame(FIN, 1) + frame(FIN, 1), "stream 1: FIN twice"),
    "data-on-stream-0": (O1 + frame(DATA, 0, b"x"), "DATA frame for stream 0"),
    "fin-on-stream-0": (O1 + frame(FIN, 0), "FIN frame for stream 0"),
    "reset-on-stream-0": (O1 + frame(RESET, 0, b"\x00"), "RESET frame for stream 0"),
    "window-update-on-stream-0": (O1 + window_update(0, 1), "WINDOW_UPDATE frame for stream 0"),
    "open-stream-0": (frame(OPEN, 0), "OPEN for stream 0, not above the last one opened (0)"),
    "data-never-opened": (O1 + frame(DATA, 2, b"x"), "DATA frame for stream 2, which was never opened"),
    "fin-never-opened": (frame(FIN, 1), "FIN frame for stream 1, which was never opened"),
    "reset-never-opened": (frame(RESET, 5, b"\x00"), "RESET frame for stream 5, which was never opened"),
    "window-update-never-opened": (window_update(3, 10), "WINDOW_UPDATE frame for stream 3, which was never opened"),
    "goaway-from-client": (frame(GOAWAY, 0), "GOAWAY from the client"),
    "goaway-for-a-stream": (O1 + frame(GOAWAY, 1), "GOAWAY from the client"),
    "open-going-down": (frame(OPEN, 2) + frame(OPEN, 1), "OPEN for stream 1, not above the last one opened (2)"),
    "open-repeated": (O1 + frame(OPEN, 1), "OPEN for stream 1, not above the last one opened (1)"),
    "window-update-of-0": (O1 + window_update(1, 0), "stream 1: WINDOW_UPDATE of 0 bytes"),
    "credit-above-max": (O1 + window_update(1, MAX_CREDIT - WINDOW + 1),
                         f"stream 1: WINDOW_UPDATE beyond {MAX_CREDIT} bytes of credit"),
    "credit-above-max-in-two-steps": (O1 + window_update(1, MAX_CREDIT - WINDOW) + window_update(1, 1),
                                      f"stream 1: WINDOW_UPDATE beyond {MAX_CREDIT} bytes of credit"),
}


@pytest.mark.parametrize(("frames", "why"), list(PROTOCOL_ERRORS.values()), ids=list(PROTOCOL_ERRORS))
async def test_protocol_error_aborts_the_carrier_and_is_logged(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture, frames: bytes, why: str
) -> None:
    target = Target(read=False)
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(frames)
        await peer.aborted()
        await until(lambda: not srv.carriers and srv.active == 0)
        target.release.set()
    broken = [line for line in tunnel_lines(tunnel_log, logging.WARNING).splitlines() if "broken" in line]
    assert len(broken) == 1, tunnel_lines(tunnel_log)
    assert "multiplexed securechan connection with 127.0.0.1:" in broken[0] and f"broken: {why}" in broken[0]


async def test_protocol_error_split_across_records_is_still_caught(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    """An oversized DATA header sent one byte per record: refused once its header is complete."""
    async with plain_target(Target()) as port, server_tunnel(pki_dir, port) as (_, peer):
        for byte in O1 + frame(DATA, 1, length=WINDOW + 1):
            peer.send(bytes([byte]))
        await peer.aborted()
    assert "beyond its 262144 bytes of credit" in tunnel_lines(tunnel_log, logging.WARNING)


async def test_protocol_error_cuts_the_streams_on_the_carrier(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    """Streams on a broken carrier end as cut: their targets see a reset, never a clean EOF."""
    target = Target()
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1, frame(DATA, 1, b"hello"), frame(OPEN, 2), frame(DATA, 2, b"world"))
        await until(lambda: [bytes(r) for r in target.received] in ([b"hello", b"world"], [b"world", b"hello"]))
        peer.send(frame(9, 0))
        await peer.aborted()
        await until(lambda: len(target.endings) == 2)
        await until(lambda: srv.completed == 2 and srv.active == 0)
    assert target.endings == ["ConnectionResetError"] * 2
    assert "its 2 streams aborted" in tunnel_lines(tunnel_log, logging.WARNING)


async def test_window_update_up_to_the_maximum_credit_is_accepted(pki_dir: Any) -> None:
    """Control for the credit-above-max cases: exactly 2^31-1 bytes of credit is allowed."""
    async with plain_target(Target(lambda _, got: got)) as port, server_tunnel(pki_dir, port) as (_, peer):
        peer.send(O1, window_update(1, MAX_CREDIT - WINDOW), frame(DATA, 1, b"still fine"), frame(FIN, 1))
        assert await peer.ending(1) == (FIN, b"")
        assert peer.data[1] == b"still fine" and peer.end == OPEN_STATE


# -- RESET codes -------------------------------------------------------------------------------------


async def test_target_refusing_resets_the_stream_with_code_2(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens there
    async with server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1, frame(DATA, 1, b"hello"))
        assert await peer.ending(1) == (RESET, b"\x02")
        await until(lambda: srv.active == 1)  # only the carrier: the stream's slot was released
        assert peer.end == OPEN_STATE  # the carrier itself goes on
    assert "stream 1 identity=none" in tunnel_lines(tunnel_log)
    assert f"target 127.0.0.1:{port} refused the connection" in tunnel_lines(tunnel_log, logging.WARNING)


async def test_open_over_the_connection_limit_is_reset_with_code_1(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    """The carrier and each stream count towards max_connections; a refused stream never reaches the target."""
    target = Target(lambda _, got: got)
    async with plain_target(target) as port, server_tunnel(pki_dir, port, max_connections=2) as (srv, peer):
        peer.send(O1, frame(OPEN, 2), frame(DATA, 2, b"dropped"), frame(FIN, 2))
        assert await peer.ending(2) == (RESET, b"\x01")
        peer.send(frame(DATA, 1, b"one"), frame(FIN, 1))
        assert await peer.ending(1) == (FIN, b"")
        assert peer.data[1] == b"one" and 2 not in peer.data
        assert [bytes(r) for r in target.received] == [b"one"]
        await until(lambda: srv.active == 1)  # stream 1 ended: its slot is free again
        peer.send(frame(OPEN, 3), frame(DATA, 3, b"three"), frame(FIN, 3))
        assert await peer.ending(3) == (FIN, b"")
        assert peer.data[3] == b"three"
    assert [bytes(r) for r in target.received] == [b"one", b"three"]
    assert srv.rejected == 1
    assert "connection limit (2) reached; refused stream 2 from 127.0.0.1:" in tunnel_lines(tunnel_log, logging.WARNING)


async def test_refusals_are_logged_once_a_second_and_a_burst_is_counted_at_its_end(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    """The first refusal has its line; the rest of that second are counted in one line once it is over,
    also when the burst has ended by then (nothing else would ever report them): a line a second at most."""
    async with plain_target(Target()) as port, server_tunnel(pki_dir, port, max_connections=1) as (srv, peer):
        peer.send(*(frame(OPEN, stream) for stream in range(1, 51)))
        await until(lambda: len(peer.of(50, RESET)) == 1)
        lines = tunnel_lines(tunnel_log, logging.WARNING).splitlines()
        assert [line for line in lines if "refused" in line] == [
            line for line in lines if "connection limit (1) reached; refused stream 1 from 127.0.0.1:" in line]
        await until(lambda: "49 more streams refused since the last line" in tunnel_lines(tunnel_log), 3)
        peer.send(frame(OPEN, 51))  # within a second of that line: counted in the next one
        await until(lambda: "; 1 more stream refused since the last line" in tunnel_lines(tunnel_log), 3)
        assert srv.rejected == 51
    assert sum("refused" in line for line in tunnel_lines(tunnel_log, logging.WARNING).splitlines()) == 3


async def test_the_carrier_itself_counts_towards_the_connection_limit(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    target = Target()
    async with plain_target(target) as port, server_tunnel(pki_dir, port, max_connections=1) as (srv, peer):
        peer.send(O1)
        assert await peer.ending(1) == (RESET, b"\x01")
        assert srv.active == 1 and peer.end == OPEN_STATE
    assert target.received == []
    assert "connection limit (1) reached; refused stream 1" in tunnel_lines(tunnel_log, logging.WARNING)


# -- flow control ------------------------------------------------------------------------------------


async def test_server_sends_no_more_than_its_credit_and_continues_after_window_update(pki_dir: Any) -> None:
    payload = os.urandom(4 * WINDOW + 12345)

    def reply(index: int, got: bytes) -> bytes:
        return payload if index == 0 else b"pong"

    async with plain_target(Target(reply)) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1, frame(FIN, 1))
        await until(lambda: len(peer.data[1]) == WINDOW)
        # The server holds the rest for stream 1: it has bytes it may not send without credit.
        await until(lambda: the_carrier(srv).streams[1].get_write_buffer_size() > 0)
        # A barrier: stream 2 answers while stream 1 is stalled (one slow stream stalls only itself),
        # and whatever the server sent on stream 1 before that answer has arrived too.
        peer.send(frame(OPEN, 2), frame(FIN, 2))
        assert await peer.ending(2) == (FIN, b"")
        assert peer.data[2] == b"pong"
        assert len(peer.data[1]) == WINDOW and not peer.of(1, FIN, RESET)
        while not peer.of(1, FIN, RESET):
            if len(peer.data[1]) == peer.granted[1]:
                peer.credit(1, 100_000)
            await until(lambda: len(peer.data[1]) == peer.granted[1] or bool(peer.of(1, FIN, RESET)))
        assert peer.of(1, FIN, RESET)[0][0] == FIN
    assert peer.violations == []
    assert hashlib.sha256(peer.data[1]).digest() == hashlib.sha256(payload).digest()


async def test_server_returns_credit_for_what_it_passed_on(pki_dir: Any) -> None:
    """We may send far more than one window, as long as we wait for the server's WINDOW_UPDATEs."""
    payload = os.urandom(3 * WINDOW)
    target = Target(lambda _, got: hashlib.sha256(got).digest())
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (_, peer):
        peer.send(O1)
        chunk = 16 * 1024
        for sent in range(0, len(payload), chunk):
            assert await credit_reaches(peer, 1, sent + chunk, 10), "the server returned no credit"
            peer.send(frame(DATA, 1, payload[sent:sent + chunk]))
        peer.send(frame(FIN, 1))
        assert await peer.ending(1) == (FIN, b"")
    assert peer.data[1] == hashlib.sha256(payload).digest()


async def test_a_target_that_does_not_read_stops_the_credit(pki_dir: Any) -> None:
    """The server returns no credit while its plain connection takes no bytes: it holds a bounded amount."""
    total, chunk = 48 * 1024 * 1024, 64 * 1024
    payload = os.urandom(1 << 20) * (total >> 20)
    target = Target(lambda _, got: hashlib.sha256(got).digest(), read=False)
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1)
        sent = 0

        async def push(wait: float) -> None:
            """Send as credit allows; stop once no credit came for ``wait`` seconds."""
            nonlocal sent
            while sent < total and await credit_reaches(peer, 1, sent + chunk, wait):
                peer.send(frame(DATA, 1, payload[sent:sent + chunk]))
                sent += chunk
                await peer.writer.drain()

        await push(0.5)
        assert sent < total, "the server kept returning credit for bytes its target never took"
        await until(lambda: len(srv.relays) == 1)
        (relay,) = srv.relays
        assert relay.held_bytes() <= (1 << 20) + mux.MAX_WINDOW  # a window grows only while it moves fast
        target.release.set()
        await push(10)
        assert sent == total
        peer.send(frame(FIN, 1))
        assert await peer.ending(1) == (FIN, b"")
    assert peer.data[1] == hashlib.sha256(payload).digest()


# -- framing -------------------------------------------------------------------------------------


async def test_frames_one_byte_per_record_still_work(pki_dir: Any) -> None:
    async with plain_target(echo_then_bye) as port, server_tunnel(pki_dir, port) as (_, peer):
        wire = O1 + frame(DATA, 1, b"hello") + window_update(1, 1000) + frame(DATA, 1, b" world") + frame(FIN, 1)
        for byte in wire:
            peer.send(bytes([byte]))
            await peer.writer.drain()
        assert await peer.ending(1) == (FIN, b"")
        assert peer.data[1] == b"hello worldBYE"


async def test_many_frames_in_one_write(pki_dir: Any) -> None:
    count = 25
    async with plain_target(echo_then_bye) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(*(frame(OPEN, n) + frame(DATA, n, f"stream {n}".encode()) + frame(FIN, n)
                    for n in range(1, count + 1)))
        for n in range(1, count + 1):
            assert await peer.ending(n) == (FIN, b"")
            assert peer.data[n] == f"stream {n}BYE".encode()
        await until(lambda: srv.completed == count)
        assert peer.end == OPEN_STATE


async def test_stream_identifiers_may_skip(pki_dir: Any) -> None:
    async with plain_target(echo_then_bye) as port, server_tunnel(pki_dir, port) as (_, peer):
        top = 2**32 - 1  # the largest identifier the header can carry
        peer.send(frame(OPEN, 7), frame(FIN, 7), frame(OPEN, 1000), frame(FIN, 1000), frame(OPEN, top), frame(FIN, top))
        assert await peer.ending(7) == (FIN, b"")
        assert await peer.ending(1000) == (FIN, b"")
        assert await peer.ending(top) == (FIN, b"")
        assert peer.data[7] == peer.data[1000] == peer.data[top] == b"BYE"


async def test_frames_for_a_stream_the_server_ended_are_ignored(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    refused = free_port()
    async with running(server_spec(pki_dir, f"127.0.0.1:{refused}", max_connections=2)) as (srv,), \
            mux_peer(pki_dir, srv.port) as peer:
        peer.send(O1)
        assert await peer.ending(1) == (RESET, b"\x02")  # the server ended stream 1
        await until(lambda: srv.active == 1)
        peer.send(frame(OPEN, 2), frame(OPEN, 3))  # stream 3 refused: over the limit
        assert await peer.ending(3) == (RESET, b"\x01")
        late = [frame(DATA, 1, b"late"), window_update(1, 5), frame(FIN, 1), frame(RESET, 1, b"\x00"),
                frame(DATA, 3, b"late"), window_update(3, 5), frame(FIN, 3), frame(RESET, 3, b"\x00")]
        peer.send(*late)
        assert await peer.ending(2) == (RESET, b"\x02")  # the carrier still works after them
        peer.send(frame(OPEN, 4))
        assert await peer.ending(4) == (RESET, b"\x02")
        assert peer.end == OPEN_STATE
    assert "broken" not in tunnel_lines(tunnel_log)


async def test_frames_for_a_stream_that_ended_with_both_fins_are_ignored(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    """§14.2/§14.5: DATA or FIN after our FIN is an error only while the stream has not ended."""
    async with plain_target(echo_then_bye) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1, frame(DATA, 1, b"x"), frame(FIN, 1))
        assert await peer.ending(1) == (FIN, b"")  # both FINs have passed: stream 1 is over
        await until(lambda: srv.completed == 1)
        peer.send(frame(DATA, 1, b"late"), frame(FIN, 1), window_update(1, 5), frame(RESET, 1, b"\x00"))
        peer.send(frame(OPEN, 2), frame(DATA, 2, b"y"), frame(FIN, 2))
        assert await peer.ending(2) == (FIN, b"")
        assert peer.data[1] == b"xBYE" and peer.data[2] == b"yBYE"
        assert peer.end == OPEN_STATE
    assert "broken" not in tunnel_lines(tunnel_log)


# -- stream ends map to TCP ends ----------------------------------------------------------------------


@pytest.mark.parametrize("fin_later", [False, True], ids=["fin-with-open", "fin-once-connected"])
async def test_fin_reaches_the_target_as_eof_and_target_eof_comes_back_as_fin(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture, fin_later: bool
) -> None:
    target = Target(lambda _, got: b"got " + got)
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (srv, peer):
        if fin_later:  # the stream is relaying already when the FIN comes
            peer.send(O1, frame(DATA, 1, b"request"))
            await until(lambda: bool(target.received) and target.received[0] == b"request")
            peer.send(frame(FIN, 1))
        else:  # OPEN, DATA and FIN in one record, before the target is even connected
            peer.send(O1, frame(DATA, 1, b"request"), frame(FIN, 1))
        assert await peer.ending(1) == (FIN, b"")
        assert peer.data[1] == b"got request"
        await until(lambda: srv.completed == 1)
    assert target.endings == ["eof"]
    assert not peer.of(1, RESET)
    assert "stream 1 identity=none" in tunnel_lines(tunnel_log) and "closed: client closed first" in tunnel_lines(
        tunnel_log)


async def test_target_eof_first_comes_back_as_fin_and_the_stream_stays_writable(pki_dir: Any) -> None:
    async def greet_then_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        writer.write_eof()
        got = await reader.read()
        received.append(got)
        writer.close()

    received: list[bytes] = []
    async with plain_target(greet_then_read) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1)
        assert await peer.ending(1) == (FIN, b"")
        assert peer.data[1] == b"hello"
        peer.send(frame(DATA, 1, b"after your FIN"), frame(FIN, 1))
        await until(lambda: received == [b"after your FIN"])
        await until(lambda: srv.completed == 1)


async def test_target_reset_comes_back_as_reset_0(pki_dir: Any, tunnel_log: pytest.LogCaptureFixture) -> None:
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with plain_target(resetter) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1, frame(DATA, 1, b"x"))
        assert await peer.ending(1) == (RESET, b"\x00")
        assert not peer.of(1, FIN)
        await until(lambda: srv.completed == 1)
        assert peer.end == OPEN_STATE
    assert "target connection reset" in tunnel_lines(tunnel_log)


@pytest.mark.parametrize(("code", "text"), [(0, "stream reset by the other tunnel end (its connection was reset"),
                                            (7, "stream reset by the other tunnel end (code 7)")])
async def test_our_reset_reaches_the_target_as_a_reset(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture, code: int, text: str
) -> None:
    """RESET 0, and a code this version does not know (§14.1: "other values: aborted")."""
    target = Target()
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1, frame(DATA, 1, b"partial"))
        await until(lambda: bool(target.received) and target.received[0] == b"partial")
        peer.send(frame(RESET, 1, bytes([code])))
        await until(lambda: bool(target.endings))
        await until(lambda: srv.completed == 1)
        assert peer.end == OPEN_STATE
    assert target.endings == ["ConnectionResetError"]
    assert not peer.of(1, FIN)
    assert text in tunnel_lines(tunnel_log)


async def test_reset_right_behind_open_never_reaches_the_target_as_data_or_eof(pki_dir: Any) -> None:
    """A stream reset while its target connection is still being made: that connection, if made, is reset."""
    target = Target()
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1, frame(DATA, 1, b"x"), frame(RESET, 1, b"\x00"), frame(OPEN, 2), frame(FIN, 2))
        assert await peer.ending(2) == (FIN, b"")
        await until(lambda: srv.active == 1 and not srv.connecting and not srv.relays and not srv._tasks)
        await until(lambda: "eof" in target.endings and len(target.endings) == len(target.received))
        assert peer.frames == [(FIN, 2, b"")]  # nothing for stream 1: we reset it
    assert sorted(target.endings) in (["eof"], ["ConnectionResetError", "eof"])
    assert all(r == b"" for r in target.received)


async def test_closing_the_carrier_cleanly_still_cuts_its_open_streams(pki_dir: Any) -> None:
    """§14.2: streams still open when the carrier ends are cut, also when it ended with close_notify."""
    target = Target()
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1, frame(DATA, 1, b"half a request"))
        await until(lambda: bool(target.received) and target.received[0] == b"half a request")
        peer.writer.write_eof()  # close_notify: the carrier ends cleanly, stream 1 did not
        await until(lambda: bool(target.endings))
        await until(lambda: srv.completed == 1 and not srv.carriers)
    assert target.endings == ["ConnectionResetError"]


async def test_stream_resets_leave_the_carrier_socket_alone(pki_dir: Any) -> None:
    """Resetting a stream must not reset (SO_LINGER 0) the carrier's socket, which its other streams share."""
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with plain_target(resetter) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1, frame(DATA, 1, b"x"), frame(OPEN, 2))
        assert await peer.ending(1) == (RESET, b"\x00")
        await until(lambda: srv.completed == 1)
        peer.send(frame(RESET, 2, b"\x00"))
        await until(lambda: srv.completed == 2)
        sock = the_carrier(srv).carrier_info("socket")
        assert struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)) == (0, 0)
        srv.stop_accepting()
        await peer.closed_cleanly()


async def test_proxy_header_of_a_stream_names_the_carrier_peer(pki_dir: Any) -> None:
    target = Target(lambda _, got: b"")
    async with plain_target(target) as port, server_tunnel(pki_dir, port, proxy_protocol=True) as (srv, peer):
        ports = (peer.writer.get_extra_info("sockname")[1], srv.port)
        peer.send(O1, frame(DATA, 1, b"payload"), frame(FIN, 1))
        assert await peer.ending(1) == (FIN, b"")
        await until(lambda: target.endings == ["eof"])
    data = bytes(target.received[0])
    assert data[:12] == b"\r\n\r\n\x00\r\nQUIT\n" and data[12:14] == b"\x21\x11"  # PROXY v2, TCP over IPv4
    assert struct.unpack("!HH", data[24:28]) == ports  # the carrier's client port, and the tunnel's
    assert data.endswith(b"payload")


# -- GOAWAY --------------------------------------------------------------------------------------


async def test_stop_accepting_sends_goaway_then_refuses_opens(pki_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mux, "GOAWAY_GRACE", 1000.0)  # a shutdown GOAWAY has no grace: nothing waits for this one
    target = Target(lambda _, got: got)
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1, frame(DATA, 1, b"in flight"))
        await until(lambda: bool(target.received) and target.received[0] == b"in flight")
        srv.stop_accepting()
        await until(lambda: bool(peer.of(0, GOAWAY)))
        assert peer.of(0, GOAWAY) == [(GOAWAY, 0, b"")]
        peer.send(frame(OPEN, 2), frame(DATA, 2, b"too late"))
        assert await peer.ending(2) == (RESET, b"\x01")
        peer.send(frame(FIN, 1))  # the stream that was open still completes ...
        assert await peer.ending(1) == (FIN, b"")
        assert peer.data[1] == b"in flight"
        await peer.closed_cleanly()  # ... and then the server closes the carrier with close_notify
    assert [bytes(r) for r in target.received] == [b"in flight"]


async def test_stop_accepting_closes_an_idle_carrier(pki_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mux, "GOAWAY_GRACE", 1000.0)  # closed at once, not after an advisory GOAWAY's grace
    async with plain_target(echo_then_bye) as port, server_tunnel(pki_dir, port) as (srv, peer):
        srv.stop_accepting()
        await peer.closed_cleanly()
        assert peer.frames == [(GOAWAY, 0, b"")]
        await until(lambda: not srv.carriers)


async def test_reload_sends_goaway_and_serves_opens_during_the_grace(pki_dir: Any) -> None:
    async with plain_target(echo_then_bye) as port, server_tunnel(pki_dir, port) as (srv, peer):
        srv.reload()
        await until(lambda: bool(peer.of(0, GOAWAY)))
        peer.send(O1, frame(DATA, 1, b"crossed the goaway"), frame(FIN, 1))
        assert await peer.ending(1) == (FIN, b"")
        assert peer.data[1] == b"crossed the goaway" + b"BYE"
        peer.send(frame(OPEN, 2), frame(FIN, 2))
        assert await peer.ending(2) == (FIN, b"")
        assert peer.of(0, GOAWAY) == [(GOAWAY, 0, b"")]  # one GOAWAY per carrier
        assert peer.end == OPEN_STATE


async def test_after_the_reload_grace_opens_are_refused_and_the_carrier_closes(
    pki_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mux, "GOAWAY_GRACE", 0.3)
    target = Target(lambda _, got: got)
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1)  # a stream that stays open keeps the carrier past the grace
        await until(lambda: len(target.received) == 1)
        srv.reload()
        await until(lambda: bool(peer.of(0, GOAWAY)))
        await asyncio.sleep(0.6)  # past the grace
        peer.send(frame(OPEN, 2))
        assert await peer.ending(2) == (RESET, b"\x01")
        peer.send(frame(FIN, 1))
        assert await peer.ending(1) == (FIN, b"")
        await peer.closed_cleanly()
        await until(lambda: not srv.carriers)
    assert len(target.received) == 1


async def test_an_idle_carrier_gets_an_advisory_goaway_then_closes(
    pki_dir: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "MUX_SERVER_IDLE", 0.3)
    monkeypatch.setattr(mux, "GOAWAY_GRACE", 0.3)
    async with plain_target(echo_then_bye) as port, server_tunnel(pki_dir, port) as (srv, peer):
        await until(lambda: bool(peer.of(0, GOAWAY)))
        await peer.closed_cleanly()
        await until(lambda: not srv.carriers and srv.active == 0)
        assert peer.frames == [(GOAWAY, 0, b"")]


# -- a client tunnel with --mux ----------------------------------------------------------------------


async def echoed_through(cli: Tunnel, first: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter,
                                                                mux.MuxSession]:
    """A plain connection through the ``--mux`` client tunnel ``cli`` (to an echo target), ``first`` echoed
    back; and the carrier its stream is on."""
    reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
    writer.write(first)
    assert await reader.readexactly(len(first)) == first
    (carrier,) = cli.carriers
    return reader, writer, carrier


async def test_client_tunnel_against_a_server_without_mux_fails_each_connection(
    serve: Any, pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.read()
        writer.close()

    _, port = await serve(handler, pki_dir.server_config())  # a securechan server, no alpn_protocols
    async with running(client_spec(pki_dir, f"127.0.0.1:{port}", mux=True)) as (cli,):
        for _ in range(2):
            with pytest.raises(ConnectionResetError):
                await plain_echo(cli.port, b"hello")
        await until(lambda: cli.active == 0 and not cli.connecting)
        assert not cli.carriers
    failures = [line for line in tunnel_lines(tunnel_log, logging.WARNING).splitlines()
                if "does not accept multiplexed connections" in line]
    assert len(failures) == 2
    assert f"the server tunnel at 127.0.0.1:{port} does not accept multiplexed connections (--mux)" in failures[0]


async def test_server_tunnel_with_no_mux_refuses_multiplexing_and_serves_the_default_mode(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    """--no-mux: the handshake agrees on no application protocol, so a --mux client tunnel fails each
    connection with a line naming the option; a --no-mux client tunnel is served as before (the default
    one falls back: test_tunnel_mux_fallback.py)."""
    async with plain_target(echo_then_bye) as target, \
            running(server_spec(pki_dir, f"127.0.0.1:{target}", no_mux=True)) as (srv,), \
            running(client_spec(pki_dir, f"127.0.0.1:{srv.port}", mux=True, name="muxed"),
                    client_spec(pki_dir, f"127.0.0.1:{srv.port}", name="plain", no_mux=True)) as (muxed, plain):
        reader, writer = await securechan.open_connection(
            "127.0.0.1", srv.port, config=pki_dir.client_config(alpn_protocols=[PROTOCOL]), server_name="localhost")
        assert writer.get_extra_info("alpn_protocol") is None
        writer.close()
        with pytest.raises(ConnectionResetError):
            await plain_echo(muxed.port, b"hello")
        assert await plain_echo(plain.port, b"hello") == b"helloBYE"
        await until(lambda: muxed.active == 0 and not muxed.connecting)
        assert not srv.carriers and not muxed.carriers
    (failure,) = [line for line in tunnel_lines(tunnel_log, logging.WARNING).splitlines()
                  if "does not accept multiplexed connections" in line]
    assert "it runs with --no-mux" in failure and "run this client tunnel without --mux (it then makes one" in failure


async def test_client_tunnel_resets_its_clients_when_the_carrier_dies_and_makes_a_new_one(
    pki_dir: Any, tunnel_log: pytest.LogCaptureFixture
) -> None:
    async with plain_target(echo_then_bye) as port, \
            pair(pki_dir, f"127.0.0.1:{port}", client={"mux": True}) as (srv, cli):
        reader, writer, first = await echoed_through(cli, b"one")
        srv.cut_now("x")
        with pytest.raises(ConnectionResetError):
            await reader.read()  # a reset, never a clean end
        writer.close()
        await until(lambda: not cli.carriers and cli.active == 0)
        assert await plain_echo(cli.port, b"two") == b"twoBYE"
        (second,) = cli.carriers
        assert second is not first and first.closed
        await until(lambda: cli.completed == 2)


async def test_client_tunnel_closes_an_idle_carrier(
    pki_dir: Any, monkeypatch: pytest.MonkeyPatch, tunnel_log: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(service, "MUX_CLIENT_IDLE", 0.5)
    async with plain_target(echo_then_bye) as port, \
            pair(pki_dir, f"127.0.0.1:{port}", client={"mux": True}) as (srv, cli):
        assert await plain_echo(cli.port, b"one") == b"oneBYE"
        await until(lambda: not srv.carriers and not cli.carriers)
        assert srv.active == 0 and srv.accepted == 2  # the carrier and its one stream
        assert await plain_echo(cli.port, b"two") == b"twoBYE"  # a new carrier for the next connection
    assert srv.accepted == 4
    assert tunnel_lines(tunnel_log).count("multiplexed securechan connection to 127.0.0.1") == 2


async def test_client_tunnel_moves_to_a_new_carrier_after_goaway(pki_dir: Any) -> None:
    async with plain_target(echo_then_bye) as port, \
            pair(pki_dir, f"127.0.0.1:{port}", client={"mux": True}) as (srv, cli):
        reader, writer, first = await echoed_through(cli, b"old")
        srv.reload()
        await until(lambda: first.going_away)
        assert await plain_echo(cli.port, b"new") == b"newBYE"  # not on the carrier told to go away
        assert len(cli.carriers) == 2 and not first.closed
        writer.write_eof()  # the last stream on the old carrier ends ...
        assert await reader.read() == b"BYE"
        writer.close()
        await until(lambda: first.closed)  # ... and the client closes that carrier
        assert first.error is None
        await until(lambda: len(srv.carriers) == 1)


async def test_client_tunnel_opens_a_new_carrier_before_identifiers_run_out(
        pki_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Identifiers only increase: at MAX_STREAM_ID a carrier takes no new stream, and the client moves
    to a new one, closing the old one once its last stream has ended."""
    monkeypatch.setattr(mux, "MAX_STREAM_ID", 3)
    async with plain_target(echo_then_bye) as port, \
            pair(pki_dir, f"127.0.0.1:{port}", client={"mux": True}) as (srv, cli):
        reader, writer, first = await echoed_through(cli, b"long")  # stream 1, open throughout
        for i in range(2, 6):  # streams 2 and 3 on the first carrier; then a new one
            assert await plain_echo(cli.port, b"%d" % i) == b"%dBYE" % i
        assert first.last_id == 3 and not first.usable and not first.closed
        assert len(cli.carriers) == 2
        (second,) = cli.carriers - {first}
        assert second.last_id == 2
        writer.write_eof()
        assert await reader.read() == b"BYE"
        writer.close()
        await until(lambda: first.closed)
        assert first.error is None
        await until(lambda: len(srv.carriers) == 1)


SERVER_SIDE_ERRORS: dict[str, tuple[bytes, str]] = {
    "open-from-the-server": (frame(OPEN, 1), "OPEN from the server"),
    "goaway-for-a-stream": (frame(GOAWAY, 1), "GOAWAY for a stream"),
    "data-beyond-credit": (frame(DATA, 1, length=WINDOW + 1),
                           f"stream 1: {WINDOW + 1} bytes of DATA beyond its {WINDOW} bytes of credit"),
    "data-never-opened": (frame(DATA, 2, b"x"), "DATA frame for stream 2, which was never opened"),
}


@pytest.mark.parametrize(("frames", "why"), list(SERVER_SIDE_ERRORS.values()), ids=list(SERVER_SIDE_ERRORS))
async def test_client_tunnel_aborts_a_carrier_the_server_breaks(
    serve: Any, pki_dir: Any, tunnel_log: pytest.LogCaptureFixture, frames: bytes, why: str
) -> None:
    """The errors only a client can see (§14.5), from a hand-written mux server."""
    server_saw: list[BaseException | None] = []

    async def bad_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert struct.unpack("!BII", await reader.readexactly(9)) == (OPEN, 1, 0)
        writer.write(frames)
        try:
            await reader.read()
            server_saw.append(None)
        except ConnectionError as exc:
            server_saw.append(exc)
        writer.close()

    _, port = await serve(bad_server, pki_dir.server_config(alpn_protocols=[PROTOCOL]))
    async with running(client_spec(pki_dir, f"127.0.0.1:{port}", mux=True)) as (cli,):
        with pytest.raises(ConnectionResetError):
            await plain_echo(cli.port, b"hello")
        await until(lambda: bool(server_saw) and not cli.carriers and cli.active == 0)
    assert isinstance(server_saw[0], ConnectionResetError)  # aborted: no close_notify
    assert f"broken: {why}" in tunnel_lines(tunnel_log, logging.WARNING)


async def test_client_tunnel_carries_concurrent_connections_on_one_carrier(pki_dir: Any) -> None:
    count = 8
    async with plain_target(echo_then_bye) as port, \
            pair(pki_dir, f"127.0.0.1:{port}", client={"mux": True}) as (srv, cli):
        replies = await asyncio.gather(*(plain_echo(cli.port, f"c{n}".encode()) for n in range(count)))
        assert replies == [f"c{n}BYE".encode() for n in range(count)]
        assert len(srv.carriers) == 1 and len(cli.carriers) == 1
        assert srv.accepted == 1 + count  # one securechan connection, then one stream per plain connection
        await until(lambda: srv.completed == count and cli.completed == count)


@pytest.mark.parametrize(("encoded", "kind", "stream", "payload"), [
    ("01 00000001 00000000", mux.OPEN, 1, b""),
    ("02 00000003 00000002 6869", mux.DATA, 3, b"hi"),
    ("05 00000003 00000004 00010000", mux.WINDOW_UPDATE, 3, (65536).to_bytes(4, "big")),
    ("04 00000003 00000001 02", mux.RESET, 3, bytes((mux.RESET_TARGET_FAILED,))),
    ("06 00000000 00000000", mux.GOAWAY, 0, b""),
])
def test_frame_encoding_matches_the_examples_of_protocol_md(encoded: str, kind: int, stream: int,
                                                           payload: bytes) -> None:
    """docs/PROTOCOL.md §14.1's examples, byte for byte, against the module's header and constants."""
    assert mux.HEADER.pack(kind, stream, len(payload)) + payload == bytes.fromhex(encoded.replace(" ", ""))
    assert frame(kind, stream, payload) == bytes.fromhex(encoded.replace(" ", ""))


async def test_a_stream_counts_bytes_not_items_of_a_wide_memoryview(pki_dir: Any) -> None:
    """A memoryview of 4-byte items written to a stream: frame lengths and credit count its bytes."""
    import array

    async with plain_target(Target(read=False)) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(O1)
        await until(lambda: len(srv.relays) == 1)
        (session,) = srv.carriers
        (stream,) = session.live
        wide = array.array("I", range(100_000))  # 400,000 bytes: more than one window
        stream.write(memoryview(wide))
        await until(lambda: len(peer.data[1]) == WINDOW)  # all the credit, and no more
        peer.credit(1, MAX_CREDIT - WINDOW)
        await until(lambda: len(peer.data[1]) == len(wide) * wide.itemsize)
        assert bytes(peer.data[1]) == wide.tobytes()
