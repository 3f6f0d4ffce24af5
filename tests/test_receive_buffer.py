"""The receive buffer on the data path: it grows for bulk records, is released once idle, and the
header fast path refuses exactly what the full header check refuses."""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import securechan
from securechan import Connection, protocol
from securechan.errors import DecodeError, RecordOverflowError, UnexpectedMessageError
from securechan.events import DataReceived


def _pair(pki_dir, record_size: int = 64 * 1024) -> tuple[Connection, Connection]:
    client = Connection(pki_dir.client_config(max_record_size=record_size), server_name="127.0.0.1")
    server = Connection(pki_dir.server_config(max_record_size=record_size))
    for _ in range(4):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    assert client.handshake_complete and server.handshake_complete
    return client, server


def _data(events) -> bytes:
    return b"".join(bytes(e.data) for e in events if isinstance(e, DataReceived))


def test_plaintext_is_a_fresh_bytes_object(pki_dir) -> None:
    client, server = _pair(pki_dir)
    first = _data(server.receive_data(client.seal(b"a" * 1000)))
    events = server.receive_data(client.seal(b"b" * 1000))
    assert all(type(e.data) is bytes for e in events if isinstance(e, DataReceived))
    assert first == b"a" * 1000  # not overwritten by the next record


def test_release_keeps_a_pending_frame_tail(pki_dir) -> None:
    client, server = _pair(pki_dir)
    payload = os.urandom(200_000)
    wire = bytes(client.seal(payload))
    cut = len(wire) - 1000
    got = _data(server.receive_data(wire[:cut]))
    assert server.holds_large_buffer
    server.release_buffer()  # a frame is incomplete: nothing may be dropped
    assert server.holds_large_buffer
    got += _data(server.receive_data(wire[cut:]))
    assert got == payload
    server.release_buffer()
    assert not server.holds_large_buffer
    # the small buffer grows again for the next burst
    assert _data(server.receive_data(bytes(client.seal(payload)))) == payload


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=90_000), min_size=1, max_size=6),
    reads=st.lists(st.integers(min_value=1, max_value=300_000), min_size=1, max_size=40),
    release_every=st.integers(min_value=1, max_value=5),
    loop_path=st.booleans(),
)
def test_reads_through_get_buffer_like_a_socket(pki_dir, sizes, reads, release_every, loop_path) -> None:
    """The event loop's way in: a buffer from the connection, a read of up to all of it, ``buffer_updated``.

    Reads fill as much of the offered view as the chunk allows (a full view included), the
    buffer grows for large records and is released between bursts; every byte arrives, in order,
    and every view is of the buffer the connection reads from. Both ways in: the event loop's
    (``SecureProtocol`` hands it ``_loop_buffer``) and the public ``get_buffer``.
    """
    client, server = _pair(pki_dir)
    get = server._loop_buffer if loop_path else server.get_buffer
    payloads = [os.urandom(n) for n in sizes]
    wire = memoryview(b"".join(bytes(client.seal(p)) for p in payloads))
    got, i, pos = [], 0, 0
    while pos < len(wire):
        view = get(-1)
        assert len(view) >= 1 and view.obj is server._buf
        n = min(len(view), reads[i % len(reads)], len(wire) - pos)
        view[:n] = wire[pos : pos + n]
        pos += n
        i += 1
        got.append(_data(server.buffer_updated(n)))
        if i % release_every == 0:
            server.release_buffer()  # as the idle timer would; a pending frame tail must survive it
    assert b"".join(got) == b"".join(payloads)


def test_buffer_views_follow_growth_and_release(pki_dir) -> None:
    """A large record grows the buffer, release_buffer shrinks it between records: each view
    handed out afterwards is of the current buffer, and a released public view harms nothing."""
    client, server = _pair(pki_dir)
    for getter in (server._loop_buffer, server.get_buffer):
        for payload in (os.urandom(100_000), b"small", os.urandom(40_000)):
            wire = memoryview(bytes(client.seal(payload)))
            got, pos = b"", 0
            while pos < len(wire):
                view = getter(-1)
                assert view.obj is server._buf
                n = min(len(view), len(wire) - pos)
                view[:n] = wire[pos : pos + n]
                pos += n
                got += _data(server.buffer_updated(n))
            assert got == payload
            assert server.holds_large_buffer == (len(payload) > 16 * 1024)
            server.release_buffer()
            assert not server.holds_large_buffer
    with server.get_buffer() as view:  # a caller may release what get_buffer gave it
        wire = bytes(client.seal(b"after a released view"))
        view[: len(wire)] = wire
    assert _data(server.buffer_updated(len(wire))) == b"after a released view"
    assert server._loop_buffer(-1) is server._loop_buffer(-1)  # empty: the loop's view is made once per buffer
    assert _data(server.receive_data(client.seal(b"and then"))) == b"and then"


@pytest.mark.parametrize(
    ("head", "error"),
    [
        (b"\x92\x03\xc6" + (2**20 + 17).to_bytes(4, "big"), RecordOverflowError),  # over the record limit
        (b"\x93\x03\xc6" + (100).to_bytes(4, "big"), DecodeError),  # not a 2-element array
        (b"\x92\x03\xc5" + (100).to_bytes(4, "big"), DecodeError),  # not bin 32
        (b"\x92\x01\xc6" + (100).to_bytes(4, "big"), UnexpectedMessageError),  # handshake after the handshake
    ],
)
def test_header_fast_path_refuses_what_parse_header_refuses(pki_dir, head: bytes, error: type) -> None:
    _, server = _pair(pki_dir, record_size=1024 * 1024)
    with pytest.raises(error):
        server.receive_data(head)


async def test_grown_buffer_is_released_once_idle(serve, server_config, client_config, monkeypatch) -> None:
    monkeypatch.setattr(protocol, "IDLE_RELEASE_SECONDS", 0.3)
    transports: list = []
    grew: list[bool] = []
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transports.append(writer.transport)
        total = 0
        while total < 1_000_000:
            chunk = await reader.read(1 << 20)
            assert chunk
            total += len(chunk)
        grew.append(writer.transport._proto._conn.holds_large_buffer)  # bulk records made it grow
        done.set()
        await reader.read()
        writer.close()

    _, port = await serve(sink, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    writer.write(os.urandom(1_000_000))
    await writer.drain()
    await done.wait()
    conn = transports[0]._proto._conn
    assert grew == [True]
    for _ in range(100):
        await asyncio.sleep(0.05)
        if not conn.holds_large_buffer:
            break
    assert not conn.holds_large_buffer
    writer.close()
    await writer.wait_closed()


def test_protocol_hands_the_loop_the_connections_buffer_unless_overridden(pki_dir) -> None:
    conn = Connection(pki_dir.server_config())
    proto = protocol.SecureProtocol(conn, asyncio.Protocol, None, None)
    assert proto.get_buffer == conn._loop_buffer  # the loop calls the connection directly

    seen: list[int] = []

    class Custom(protocol.SecureProtocol):
        def get_buffer(self, sizehint: int) -> memoryview:
            seen.append(sizehint)
            return super().get_buffer(sizehint)

    custom = Custom(Connection(pki_dir.server_config()), asyncio.Protocol, None, None)
    assert len(custom.get_buffer(-1)) > 0 and seen == [-1]  # a subclass's override is kept


@pytest.mark.parametrize("where", ["in a later chunk", "in the same chunk, with more bytes behind it"])
def test_receive_data_returns_what_verified_before_a_failure(pki_dir, where: str) -> None:
    # receive_data copies its input through the receive buffer in chunks; records verified in one
    # chunk are returned even when a record after them fails, and the failure is raised next call.
    client, server = _pair(pki_dir)
    good = bytes(client.seal(b"0123456789"))
    if where == "in a later chunk":
        bad = bytearray(client.seal(os.urandom(20_000)))  # completes past the first 16 KiB chunk
        rest = b""
    else:
        bad = bytearray(client.seal(b"tampered"))
        rest = bytes(client.seal(os.urandom(20_000)))  # bytes of a later chunk, never opened
    bad[-1] ^= 1  # in the tag
    events = server.receive_data(good + bytes(bad) + rest)
    assert _data(events) == b"0123456789"
    assert server.state is securechan.connection.State.FAILED
    with pytest.raises(securechan.BadRecordMACError, match="failed authentication"):
        server.receive_data(b"")
    with pytest.raises(securechan.ConnectionClosedError, match="no more data is accepted"):
        server.receive_data(b"more")
