"""The stream API over real loopback TCP: round trips, integrity, half-close, key update, extra info.

Every test here runs on the stdlib event loop and on uvloop (see conftest.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from rawpeer import frame_types

import securechan


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 20):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("size", [0, 1, 100_000, 20 * 1024 * 1024])
async def test_round_trip_integrity(serve, server_config, client_config, size: int) -> None:
    _, port = await serve(echo, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    payload = os.urandom(size)

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), 1 << 20):
            writer.write(view[i : i + (1 << 20)])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    received = await reader.read(-1)
    await sender
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert reader.at_eof()
    writer.close()
    await writer.wait_closed()


async def test_concurrent_both_directions(serve, server_config, client_config) -> None:
    """Both sides stream at once; each stream's hash matches at the far end."""
    up = os.urandom(8 * 1024 * 1024)
    down = os.urandom(8 * 1024 * 1024)
    got_up: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def push() -> None:
            writer.write(down)
            await writer.drain()
            writer.write_eof()

        pusher = asyncio.create_task(push())
        got_up.append(await reader.read(-1))
        await pusher
        writer.close()

    _, port = await serve(handler, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    writer.write(up)
    writer.write_eof()
    got_down = await reader.read(-1)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
    await asyncio.sleep(0.05)
    assert hashlib.sha256(got_up[0]).digest() == hashlib.sha256(up).digest()


async def test_many_concurrent_connections(serve, server_config, client_config) -> None:
    _, port = await serve(echo, server_config)

    async def one(i: int) -> bytes:
        reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
        msg = os.urandom(1000 + i * 997)
        writer.write(msg)
        writer.write_eof()
        back = await reader.read(-1)
        writer.close()
        await writer.wait_closed()
        return hashlib.sha256(back).digest() + hashlib.sha256(msg).digest()

    for result in await asyncio.gather(*(one(i) for i in range(20))):
        assert result[:32] == result[32:]


async def test_half_close_client_still_reads_reply(serve, server_config, client_config) -> None:
    """The client ends its direction (close_notify + TCP FIN) and still receives the whole reply."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read(-1)  # until the client's close_notify
        assert reader.at_eof()
        writer.write(b"reply to " + request + os.urandom(3_000_000))
        await writer.drain()
        writer.close()

    _, port = await serve(handler, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    writer.write(b"question")
    writer.write_eof()
    with pytest.raises(securechan.ConnectionClosedError):
        writer.write(b"more")
    reply = await reader.read(-1)
    assert reply.startswith(b"reply to question") and len(reply) == len(b"reply to question") + 3_000_000
    writer.close()
    await writer.wait_closed()


async def test_server_half_close_reaches_client_as_clean_eof(serve, server_config, client_config) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner\n")
        writer.write_eof()  # server ends its direction but keeps reading
        data = await reader.read(-1)
        writer.transport.get_extra_info("socket")  # still open
        assert data == b"late data"

    _, port = await serve(handler, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    assert await reader.readline() == b"banner\n"
    assert await reader.read() == b""
    assert reader.at_eof()
    writer.write(b"late data")
    writer.write_eof()
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def test_key_update_under_traffic(serve, pki_dir) -> None:
    """A tiny key_update_records forces many automatic ratchets mid-stream; explicit updates work too."""
    server_config = pki_dir.server_config(key_update_records=7, max_record_size=1024)
    client_config = pki_dir.client_config(key_update_records=5, max_record_size=1024)
    _, port = await serve(echo, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    payload = os.urandom(300_000)
    writer.write(payload[:100_000])
    writer.transport.update_keys(request_peer=True)
    writer.write(payload[100_000:])
    writer.write_eof()
    back = await reader.read(-1)
    assert back == payload
    writer.close()
    await writer.wait_closed()


async def test_extra_info_and_exporter(serve, server_config, client_config) -> None:
    server_side: list[securechan.SessionInfo] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_side.append(writer.get_extra_info("securechan"))
        writer.write(server_side[0].export_keying_material(b"test label", b"ctx", 32))
        await writer.drain()
        writer.close()

    _, port = await serve(handler, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    info: securechan.SessionInfo = writer.get_extra_info("securechan")
    assert info.version == 1 and info.suite == "AES-256-GCM" and info.resumed is False
    peercert = writer.get_extra_info("peercert")
    assert peercert is not None and "localhost" in peercert.subject.rfc4514_string()
    assert writer.get_extra_info("peername")[0] == "127.0.0.1"
    # Read once at connect time, and the same as the socket's own answer.
    assert writer.get_extra_info("peername") == writer.get_extra_info("socket").getpeername() == ("127.0.0.1", port)
    assert writer.get_extra_info("sockname") == writer.get_extra_info("socket").getsockname()
    assert writer.get_extra_info("cipher")[0] == "AES-256-GCM"
    ours = info.export_keying_material(b"test label", b"ctx", 32)
    assert await reader.readexactly(32) == ours
    assert info.export_keying_material(b"other label", b"ctx", 32) != ours
    writer.close()
    await writer.wait_closed()
    assert server_side[0].peer_certificate is None


@pytest.mark.parametrize("suite", list(securechan.Suite))
async def test_each_suite_and_server_preference(serve, pki_dir, suite: securechan.Suite) -> None:
    _, port = await serve(echo, pki_dir.server_config(suites=[suite, *[s for s in securechan.Suite if s != suite]]))
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=pki_dir.client_config())
    assert writer.get_extra_info("securechan").suite == suite.label
    writer.write(b"ping")
    writer.write_eof()
    assert await reader.read() == b"ping"
    writer.close()


async def test_server_name_defaults_to_host_and_ip_san(serve, server_config, client_config) -> None:
    _, port = await serve(echo, server_config)
    for host in ("127.0.0.1", "localhost"):
        reader, writer = await securechan.open_connection(host, port, config=client_config)
        assert writer.get_extra_info("securechan").server_name == host
        writer.close()
        await writer.wait_closed()


async def test_pin_only_client(serve, pki_dir, server_config) -> None:
    from securechan.certs import format_pin, spki_sha256

    pin = format_pin(spki_sha256(server_config.certificate))
    _, port = await serve(echo, server_config)
    reader, writer = await securechan.open_connection(
        "127.0.0.1", port, config=securechan.ClientConfig(pin=pin), server_name="anything"
    )
    writer.write(b"x")
    writer.write_eof()
    assert await reader.read() == b"x"
    writer.close()


async def test_protocol_api_wraps_existing_protocol(serve, server_config, client_config) -> None:
    """create_server/create_connection carry ordinary asyncio.Protocol classes."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()

    class Upper(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data.upper())  # type: ignore[attr-defined]

        def eof_received(self) -> bool:
            self.transport.close()
            return False

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.buf = b""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert transport.get_extra_info("securechan").version == 1
            transport.write(b"hello protocol")  # type: ignore[attr-defined]
            transport.write_eof()  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            self.buf += data

        def eof_received(self) -> bool:
            done.set_result(self.buf)
            return False

    server = await securechan.create_server(Upper, "127.0.0.1", 0, config=server_config)
    async with server:
        port = server.sockets[0].getsockname()[1]
        transport, _ = await securechan.create_connection(Client, "127.0.0.1", port, config=client_config)
        assert await asyncio.wait_for(done, 5) == b"HELLO PROTOCOL"
        transport.close()


async def test_unix_socket(tmp_path, server_config, client_config) -> None:
    path = str(tmp_path / "s.sock")
    server = await securechan.start_unix_server(echo, path, config=server_config)
    async with server:
        reader, writer = await securechan.open_unix_connection(path, config=client_config, server_name="localhost")
        writer.write(b"over unix")
        writer.write_eof()
        assert await reader.read() == b"over unix"
        writer.close()
        await writer.wait_closed()


async def test_backpressure_bounded_memory(serve, server_config, client_config) -> None:
    """A server that does not read pauses the client's writer: drain() blocks instead of buffering."""
    gate = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await gate.wait()
        total = 0
        while chunk := await reader.read(1 << 20):
            total += len(chunk)
        writer.write(str(total).encode())
        await writer.drain()
        writer.close()

    _, port = await serve(handler, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    chunk = os.urandom(1 << 20)
    sent = 0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            while True:
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
    # Socket buffers plus one transport high-water mark, not the whole attempted stream.
    assert writer.transport.get_write_buffer_size() <= 2 * (1 << 20) + 65536
    assert sent < 64 * (1 << 20)
    gate.set()
    await writer.drain()
    writer.write_eof()
    assert int(await reader.read()) == sent
    writer.close()


async def test_keys_are_wiped_even_when_the_applications_connection_lost_raises(
    serve, server_config, client_config
) -> None:
    loop = asyncio.get_running_loop()
    lost = loop.create_future()

    class Fragile(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            lost.set_result(None)
            raise RuntimeError("application bug in connection_lost")

    _, port = await serve(echo, server_config)
    transport, _ = await securechan.create_connection(Fragile, "127.0.0.1", port, config=client_config)
    conn = transport._proto._conn
    secret = conn._sealer._secret
    assert any(secret)
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        transport.abort()
        await asyncio.wait_for(lost, 5)
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(None)
    assert not any(secret) and conn._sealer._aead is None and not any(conn._buf)
    assert any(isinstance(c.get("exception"), RuntimeError) for c in reported)  # still reported, not swallowed


class _WriteLog:
    """The TCP transport as SecureProtocol sees it, with each write call recorded (the I/O is the real socket's)."""

    def __init__(self, transport: asyncio.Transport, calls: list[bytes]) -> None:
        self._transport = transport
        self._calls = calls

    def write(self, data: bytes) -> None:
        self._calls.append(bytes(data))
        self._transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        parts = list(parts)
        self._calls.append(b"".join(parts))
        self._transport.writelines(parts)

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


async def test_a_resumed_clients_finished_leaves_with_what_connection_made_writes(serve, pki_dir) -> None:
    """The read that completes a resumed handshake: the client's Finished and the request its application
    writes in connection_made go out in one write (one system call, one segment), Finished first."""
    from securechan.connection import Connection
    from securechan.frames import FrameType
    from securechan.protocol import SecureProtocol

    client_config = pki_dir.client_config()
    _, port = await serve(echo, pki_dir.server_config())
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config,
                                                      server_name="localhost")
    writer.write(b"x")
    await reader.readexactly(1)  # the session ticket arrived before the echo
    writer.close()
    await writer.wait_closed()

    loop = asyncio.get_running_loop()
    calls: list[bytes] = []
    answer: asyncio.Future[bytes] = loop.create_future()

    class Request(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            transport.write(b"request")  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            if not answer.done():
                answer.set_result(data)

    class Recorded(SecureProtocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(_WriteLog(transport, calls))  # type: ignore[arg-type]

    waiter: asyncio.Future[None] = loop.create_future()
    proto = Recorded(Connection(client_config, server_name="localhost", resume_key=("127.0.0.1", port, "localhost")),
                     Request, waiter, 10.0)
    tcp, _ = await loop.create_connection(lambda: proto, "127.0.0.1", port)
    try:
        await waiter
        assert await asyncio.wait_for(answer, 10) == b"request"
        assert proto.app_transport is not None and proto.app_transport.get_extra_info("securechan").resumed
        assert [frame_types(c) for c in calls] == [
            [FrameType.HANDSHAKE],  # ClientHello
            [FrameType.HANDSHAKE, FrameType.APPLICATION_DATA],  # Finished + the request, one write
        ]
    finally:
        tcp.close()


@pytest.mark.parametrize("ending", ["close", "write_eof"])
async def test_an_application_that_writes_and_ends_in_connection_made_is_delivered_whole(
    serve, pki_dir, ending: str
) -> None:
    """Writes and the close_notify an application makes inside connection_made (while the handshake's
    last flight is held back to leave with them) reach the peer in order, complete, for full and resumed
    handshakes alike."""
    received: list[bytes] = []
    done = asyncio.Event()

    async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())  # up to close_notify; a truncation would raise
        writer.close()
        done.set()

    class WriteAndEnd(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.write(b"one ")  # type: ignore[attr-defined]
            transport.write(b"two")  # type: ignore[attr-defined]
            getattr(transport, ending)()

    client_config = pki_dir.client_config()
    _, port = await serve(collect, pki_dir.server_config())
    for _ in range(2):  # a full handshake, then a resumed one
        done.clear()
        transport, _ = await securechan.create_connection(WriteAndEnd, "127.0.0.1", port, config=client_config,
                                                          server_name="localhost")
        await asyncio.wait_for(done.wait(), 10)
        transport.close()
    assert received == [b"one two", b"one two"]
    assert client_config.session_stats.resumed == 1
