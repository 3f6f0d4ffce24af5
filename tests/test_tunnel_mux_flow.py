"""Flow control of tunnel multiplexing (docs/PROTOCOL.md §14.3) against a real server tunnel.

The receive side: a stream that passes a whole window on within ``mux.GROW_WITHIN`` seconds
gets a larger one, doubling up to ``mux.MAX_WINDOW``, out of one budget per tunnel that is
paid back when the stream ends or its reader falls behind; credit is only for bytes the
reader took. The tests set ``GROW_WITHIN`` so that growth is certain, or impossible: the rule
compares loop times, and a loaded machine must not decide the outcome.

The send side: bytes written to a stream beyond its credit wait in order, small writes share
buffers, and a caller's mutable buffer is copied when written (as asyncio transports do).
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import os
from typing import Any

import pytest
from muxkit import DATA, FIN, OPEN, WINDOW, MuxPeer, Target, credit_reaches, frame, server_tunnel, the_carrier
from tunnelkit import echo_then_bye, plain_target, until

from securechan.tunnel import Tunnel, mux

pytestmark = pytest.mark.timeout(60)

CHUNK = 64 * 1024


async def push(peer: MuxPeer, stream: int, payload: bytes) -> None:
    """Send ``payload`` on ``stream`` as fast as the server's credit allows."""
    for sent in range(0, len(payload), CHUNK):
        piece = payload[sent:sent + CHUNK]
        assert await credit_reaches(peer, stream, sent + len(piece), 10), f"no credit for stream {stream}"
        peer.send(frame(DATA, stream, piece))
        await peer.writer.drain()


async def pushed(peer: MuxPeer, srv: Tunnel, target: Target, payloads: dict[int, bytes]) -> dict[int, int]:
    """Open and fill one stream per payload at once; once the target has every byte, the
    credit the server granted beyond what was sent, per stream (its window, less under 64 KiB
    passed on but not yet returned)."""
    peer.send(*(frame(OPEN, stream) for stream in payloads))
    for stream, payload in payloads.items():
        await push(peer, stream, payload)
    await until(lambda: sorted(map(len, target.received)) == sorted(map(len, payloads.values())))
    await until(lambda: all(peer.server_credit(s) + CHUNK > len(p) + WINDOW for s, p in payloads.items()))
    return {stream: peer.server_credit(stream) - len(payload) for stream, payload in payloads.items()}


async def ended(peer: MuxPeer, srv: Tunnel, streams: list[int]) -> None:
    peer.send(*(frame(FIN, stream) for stream in streams))
    for stream in streams:
        assert await peer.ending(stream) == (FIN, b"")
    await until(lambda: not the_carrier(srv).live)


# -- the receive window --------------------------------------------------------------------------


async def test_a_fast_stream_window_doubles_up_to_max_window(pki_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mux, "GROW_WITHIN", 3600.0)  # every window counts as passed on fast
    payload = os.urandom(8 << 20)
    target = Target(lambda _, got: hashlib.sha256(got).digest())
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (srv, peer):
        budget = srv.window_budget
        (ahead,) = (await pushed(peer, srv, target, {1: payload})).values()
        assert mux.MAX_WINDOW - CHUNK < ahead <= mux.MAX_WINDOW
        assert budget.available == mux.MAX_GROWTH - (mux.MAX_WINDOW - WINDOW)
        await ended(peer, srv, [1])
        assert budget.available == mux.MAX_GROWTH, "the stream's growth was not paid back when it ended"
    assert peer.data[1] == hashlib.sha256(payload).digest()
    assert peer.violations == []


async def test_a_stream_slower_than_a_window_per_grow_within_keeps_its_first_window(
        pki_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mux, "GROW_WITHIN", 0.0)  # no window is ever passed on fast enough
    payload = os.urandom(2 << 20)
    target = Target(lambda _, got: hashlib.sha256(got).digest())
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (srv, peer):
        (ahead,) = (await pushed(peer, srv, target, {1: payload})).values()
        assert WINDOW - CHUNK < ahead <= WINDOW
        assert srv.window_budget.available == mux.MAX_GROWTH
        await ended(peer, srv, [1])
    assert peer.data[1] == hashlib.sha256(payload).digest()


async def test_window_growth_of_all_streams_stays_within_the_tunnel_budget(
        pki_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mux, "GROW_WITHIN", 3600.0)
    limit = 384 * 1024  # one doubling and a half: the second stream gets a part of what it asks for, or none
    payloads = {1: os.urandom(4 << 20), 3: os.urandom(4 << 20)}
    target = Target(lambda _, got: hashlib.sha256(got).digest())
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (srv, peer):
        budget = srv.window_budget  # one object, shared by every carrier of the tunnel
        assert the_carrier(srv).budget is budget
        budget.available = limit
        ahead = await pushed(peer, srv, target, payloads)
        growth = sum(ahead.values()) - 2 * WINDOW
        assert limit - 2 * CHUNK < growth <= limit
        assert budget.available == 0
        await ended(peer, srv, list(payloads))
        assert budget.available == limit
    for stream, payload in payloads.items():
        assert peer.data[stream] == hashlib.sha256(payload).digest()


async def test_a_grown_window_whose_target_stalls_holds_its_window_and_shrinks_once_it_reads_again(
        pki_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream's window grew; then its target stops reading. The server holds at most that window (and
    its plain socket's write buffer); once the target reads again, the window goes back to 256 KiB and
    the growth to the tunnel's budget, with the stream still open."""
    monkeypatch.setattr(mux, "GROW_WITHIN", 3600.0)
    reading = asyncio.Event()
    reading.set()
    digest, count = hashlib.sha256(), 0

    async def gated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        while True:
            await reading.wait()
            if not (chunk := await reader.read(65536)):
                break
            digest.update(chunk)
            count += len(chunk)
        writer.write(digest.digest())
        writer.close()

    payload = os.urandom(1 << 20)
    async with plain_target(gated) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(frame(OPEN, 1))
        sent, sent_digest = 0, hashlib.sha256()

        async def send_while_credit(limit: int, wait: float) -> None:
            nonlocal sent
            while sent < limit and await credit_reaches(peer, 1, sent + CHUNK, wait):
                offset = sent % len(payload)
                piece = payload[offset:offset + CHUNK]
                sent_digest.update(piece)
                peer.send(frame(DATA, 1, piece))
                sent += CHUNK
                await peer.writer.drain()

        await send_while_credit(4 << 20, 10)
        await until(lambda: count == sent)
        assert peer.server_credit(1) - sent > mux.MAX_WINDOW - CHUNK  # grown to 2 MiB
        reading.clear()
        await send_while_credit(64 << 20, 0.5)  # until the server stops returning credit
        assert sent < 64 << 20, "the server kept returning credit for a target that reads nothing"
        (relay,) = srv.relays
        (stream,) = the_carrier(srv).live
        assert stream.get_read_buffer_size() <= mux.MAX_WINDOW
        assert relay.held_bytes() <= mux.MAX_WINDOW + 2 * CHUNK, relay.held_bytes()
        monkeypatch.setattr(mux, "GROW_WITHIN", 0.0)  # no new growth: only the shrinking is seen
        reading.set()
        await send_while_credit(sent + (8 << 20), 10)
        await until(lambda: count == sent)
        await until(lambda: peer.server_credit(1) - sent <= WINDOW)
        assert srv.window_budget.available == mux.MAX_GROWTH and stream in the_carrier(srv).live
        peer.send(frame(FIN, 1))
        assert await peer.ending(1) == (FIN, b"")
    assert peer.data[1] == sent_digest.digest()
    assert peer.violations == []


async def test_a_grown_window_that_stops_moving_fast_shrinks_back_with_its_reader_keeping_up(
        pki_dir: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst grew the window; the stream goes on slower than a window per SHRINK_AFTER seconds (here:
    always), its target reading all the while: the growth goes back, so a stream that once moved fast
    does not keep the tunnel's budget."""
    monkeypatch.setattr(mux, "GROW_WITHIN", 3600.0)
    payload = os.urandom(12 << 20)
    target = Target(lambda _, got: hashlib.sha256(got).digest())
    async with plain_target(target) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(frame(OPEN, 1))
        await push(peer, 1, payload[:4 << 20])
        await until(lambda: peer.server_credit(1) - (4 << 20) > mux.MAX_WINDOW - CHUNK)
        assert srv.window_budget.available < mux.MAX_GROWTH
        monkeypatch.setattr(mux, "GROW_WITHIN", 0.0)
        monkeypatch.setattr(mux, "SHRINK_AFTER", 0.0)
        for sent in range(4 << 20, len(payload), CHUNK):
            assert await credit_reaches(peer, 1, sent + CHUNK, 10), "no credit"
            peer.send(frame(DATA, 1, payload[sent:sent + CHUNK]))
            await peer.writer.drain()
        await until(lambda: peer.server_credit(1) - len(payload) <= WINDOW)
        assert srv.window_budget.available == mux.MAX_GROWTH
        (stream,) = the_carrier(srv).live
        assert stream.is_reading()  # shrunk without a pause of its reader
        peer.send(frame(FIN, 1))
        assert await peer.ending(1) == (FIN, b"")
    assert peer.data[1] == hashlib.sha256(payload).digest()


async def test_bytes_that_pause_the_reader_get_their_credit_back_only_once_it_resumes(pki_dir: Any) -> None:
    """Credit is for bytes the plain side took: a chunk whose hand-on paused the reader (its plain socket
    is full) is returned when reading resumes, so the peer cannot add a window on top of it."""
    async with plain_target(echo_then_bye) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(frame(OPEN, 1))
        await until(lambda: len(srv.relays) == 1)
        (stream,) = the_carrier(srv).live
        got = bytearray()

        class PausedOnceFull(asyncio.Protocol):  # as the relay pauses a stream whose plain socket is full
            def data_received(self, data: bytes) -> None:
                got.extend(data)
                if len(got) >= CHUNK:  # enough for a WINDOW_UPDATE, had its reader kept up
                    stream.pause_reading()

        stream.set_protocol(PausedOnceFull())
        peer.send(frame(DATA, 1, os.urandom(60_000)), frame(DATA, 1, os.urandom(10_000)))
        await until(lambda: len(got) >= CHUNK)
        peer.send(frame(OPEN, 3), frame(FIN, 3))  # a barrier: the server answered everything sent before it
        await peer.ending(3)
        assert peer.server_credit(1) == WINDOW
        stream.resume_reading()
        await until(lambda: peer.server_credit(1) == WINDOW + 70_000)
        assert len(got) == 70_000


# -- the send side ---------------------------------------------------------------------------------


async def test_writes_beyond_the_credit_wait_in_order_and_small_ones_share_buffers(pki_dir: Any) -> None:
    """Small writes, a large one split by the credit, a bytearray changed after its write, wide views:
    everything arrives once, in order, as written; the waiting bytes are held in few objects."""
    async with plain_target(Target(read=False)) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(frame(OPEN, 1))
        await until(lambda: len(srv.relays) == 1)
        (stream,) = the_carrier(srv).live
        expected = bytearray()

        def write(data: Any) -> None:
            expected.extend(memoryview(data).cast("B"))
            stream.write(data)

        write(os.urandom(WINDOW - 1000))
        write(os.urandom(300_000))  # 1,000 bytes of it fit the credit; the rest waits, not copied
        for _ in range(20_000):
            write(b"0123456789")  # 200,000 bytes in 20,000 writes
        mutable = bytearray(os.urandom(40_000))
        write(mutable)
        mutable[:] = bytes(len(mutable))  # the stream sends what it was given, not what the buffer became
        write(memoryview(array.array("I", range(1000))))
        write(b"tail")
        assert stream.get_write_buffer_size() == len(expected) - WINDOW
        assert len(stream._backlog) <= 2 + 200_000 // (16 * 1024) + 3  # not one object per small write
        await until(lambda: len(peer.data[1]) == WINDOW)
        while len(peer.data[1]) < len(expected):  # credit in odd steps: waiting buffers are sent in parts
            peer.credit(1, 100_003)
            await until(lambda: len(peer.data[1]) == min(peer.granted[1], len(expected)))
        assert peer.data[1] == expected
        assert stream.get_write_buffer_size() == 0
    assert peer.violations == []


async def test_small_frames_of_one_iteration_leave_together_in_groups_of_four(pki_dir: Any) -> None:
    """Ten streams write in one loop iteration: three records (4 + 4 + 2 frames), not ten and not one, so
    the far end can start on the first group while this end still reads the rest of a burst."""
    async with plain_target(Target(read=False)) as port, server_tunnel(pki_dir, port) as (srv, peer):
        peer.send(*(frame(OPEN, stream) for stream in range(1, 11)))
        await until(lambda: len(srv.relays) == 10)
        session = the_carrier(srv)
        streams = sorted(session.live, key=lambda s: s.stream_id)
        sealer = session.carrier._conn._live_sealer  # type: ignore[attr-defined]
        records = sealer.seq
        for stream in streams:
            stream.write(b"message %d" % stream.stream_id)
        await until(lambda: all(peer.data[s.stream_id] == b"message %d" % s.stream_id for s in streams))
        assert sealer.seq - records == 3
