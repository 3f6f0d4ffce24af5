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


async def test_a_ca_client_without_a_name_to_verify_is_refused_before_connecting(
    serve, server_config, client_config, tmp_path
) -> None:
    """With sock= or a Unix path there is no host to default the server name to: a CA-verifying client
    says so at once; given server_name the same socket carries a verified channel."""
    import socket

    _, port = await serve(echo, server_config)
    sock = socket.create_connection(("127.0.0.1", port))
    with pytest.raises(securechan.ConfigError, match="server_name is required when connecting without a host"):
        await securechan.open_connection(sock=sock, config=client_config)
    reader, writer = await securechan.open_connection(sock=sock, config=client_config, server_name="localhost")
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.close()
    await writer.wait_closed()
    with pytest.raises(securechan.ConfigError, match="server_name is required for a Unix-socket connection"):
        await securechan.open_unix_connection(str(tmp_path / "nowhere.sock"), config=client_config)


async def test_server_api_refuses_foreign_configs_and_servers(client_config) -> None:
    with pytest.raises(securechan.ConfigError, match=r"config must be a securechan\.ServerConfig for a server"):
        await securechan.start_server(echo, "127.0.0.1", 0, config=client_config)  # type: ignore[arg-type]
    from securechan.streams import server_config

    plain = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        with pytest.raises(securechan.ConfigError, match=r"not created by securechan\.start_server"):
            server_config(plain)
    finally:
        plain.close()
        await plain.wait_closed()


# -- the SecureTransport surface: writes, half-close, pass-through, protocol switch --------------


async def test_write_of_a_non_bytes_object_is_a_type_error_naming_its_type(serve, server_config, client_config) -> None:
    _, port = await serve(echo, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    for bad, name in (("text", "str"), (None, "NoneType"), ([b"a"], "list")):
        with pytest.raises(TypeError, match=rf"^data: expecting a bytes-like instance, got {name}$"):
            writer.write(bad)  # type: ignore[arg-type]
    writer.write(b"still usable")  # a refused write leaves the channel intact
    writer.write_eof()
    assert await reader.read() == b"still usable"
    writer.close()
    await writer.wait_closed()


async def test_empty_writes_and_a_second_write_eof_are_no_ops(serve, server_config, client_config) -> None:
    """write(b"") sends nothing, even after write_eof() (where a non-empty write is refused); a second
    write_eof() changes nothing; the half-closed side still reads the peer's reply."""
    _, port = await serve(echo, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    writer.write(b"")
    writer.write(b"ab")
    writer.write(bytearray())
    writer.write_eof()
    writer.write_eof()
    writer.write(b"")
    writer.write(memoryview(b""))
    with pytest.raises(securechan.ConnectionClosedError, match=r"cannot write after write_eof\(\)/close\(\)"):
        writer.write(b"c")
    assert await reader.read() == b"ab"
    assert reader.at_eof()
    writer.close()
    await writer.wait_closed()


async def test_writelines_sends_the_parts_joined_in_order(serve, server_config, client_config) -> None:
    _, port = await serve(echo, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    writer.writelines([b"one ", bytearray(b"two "), memoryview(b"three"), b""])
    writer.transport.writelines(iter([b" four", b" five"]))
    writer.write_eof()
    assert await reader.read() == b"one two three four five"
    writer.close()
    await writer.wait_closed()


async def test_writelines_mixing_small_and_large_parts_keeps_their_order(serve, server_config, client_config) -> None:
    """Small parts share a record, a large one (>= 16 KiB) is sealed on its own: the bytes arrive in order."""
    _, port = await serve(echo, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    big, bigger = os.urandom(20_000), os.urandom(300_000)  # the second spans several records
    parts = [b"head ", big, b"mid", b"dle ", memoryview(bigger), b" tail"]
    writer.writelines(parts)
    writer.write_eof()
    assert await reader.read() == b"".join(bytes(p) for p in parts)
    writer.close()
    await writer.wait_closed()


async def test_writelines_with_a_part_that_is_not_bytes_sends_nothing(serve, server_config, client_config) -> None:
    _, port = await serve(echo, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    with pytest.raises(TypeError, match="expecting a bytes-like instance, got str"):
        writer.writelines([os.urandom(20_000), "text"])  # type: ignore[list-item]
    writer.write(b"only this")
    writer.write_eof()
    assert await reader.read() == b"only this"
    writer.close()
    await writer.wait_closed()


async def test_a_write_after_the_connection_was_lost_is_dropped_and_drain_reports_the_cause(
    serve, server_config, client_config
) -> None:
    """The server drops the socket without close_notify: the client's read raises the truncation; a later
    write is dropped without an exception (as asyncio transports do) and drain() raises the same cause."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    _, port = await serve(hang_up, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    with pytest.raises(securechan.TruncationError, match="close_notify") as cut:
        await reader.read()
    assert writer.transport.is_closing()
    writer.write(b"too late")  # no exception
    writer.writelines([b"also ", b"too late"])
    with pytest.raises(securechan.TruncationError) as drained:
        await writer.drain()
    assert drained.value is cut.value
    writer.close()
    with pytest.raises(securechan.TruncationError) as closed:
        await writer.wait_closed()  # as with asyncio's own streams, wait_closed() re-raises the loss
    assert closed.value is cut.value


async def test_reading_state_and_write_buffer_limits_are_the_tcp_transports(
    serve, server_config, client_config
) -> None:
    _, port = await serve(echo, server_config)
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    transport = writer.transport
    assert transport.is_reading()
    transport.pause_reading()
    assert not transport.is_reading()
    writer.write(b"held")
    await writer.drain()
    transport.resume_reading()
    assert transport.is_reading()
    assert await reader.readexactly(4) == b"held"
    transport.set_write_buffer_limits(high=40_000, low=10_000)
    assert transport.get_write_buffer_limits() == (10_000, 40_000)
    transport.set_write_buffer_limits(high=8192)
    assert transport.get_write_buffer_limits() == (2048, 8192)  # asyncio's default: low = high / 4
    assert transport.get_write_buffer_size() == 0
    writer.close()
    await writer.wait_closed()


async def test_set_protocol_hands_the_rest_of_the_connection_to_the_new_protocol(
    serve, server_config, client_config
) -> None:
    """After set_protocol, data, the peer's close_notify and connection_lost go to the new protocol only."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()
    lost: asyncio.Future[Exception | None] = loop.create_future()

    class First(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            got.set_exception(AssertionError(f"the replaced protocol received {data!r}"))

        def connection_lost(self, exc: Exception | None) -> None:
            lost.set_exception(AssertionError("the replaced protocol heard connection_lost"))

    class Second(asyncio.Protocol):
        def __init__(self) -> None:
            self.buf = b""
            self.eof = False

        def data_received(self, data: bytes) -> None:
            self.buf += data

        def eof_received(self) -> bool:
            self.eof = True
            got.set_result(self.buf)
            return False

        def connection_lost(self, exc: Exception | None) -> None:
            lost.set_result(exc)

    _, port = await serve(echo, server_config)
    transport, first = await securechan.create_connection(First, "127.0.0.1", port, config=client_config)
    assert isinstance(first, First) and transport.get_protocol() is first
    second = Second()
    transport.set_protocol(second)
    assert transport.get_protocol() is second
    transport.write(b"to the second")
    transport.write_eof()
    assert await asyncio.wait_for(got, 10) == b"to the second"
    assert await asyncio.wait_for(lost, 10) is None
    assert second.eof and transport.is_closing()


async def test_peer_chain_is_the_chain_the_peer_presented(serve, pki_dir) -> None:
    from securechan import pki

    inter = pki.make_ca("Streams Intermediate", issuer=pki_dir.ca, path_length=0)
    cert, key = pki.issue_cert(inter, "localhost", ips=["127.0.0.1"])
    crt, k = pki_dir.write("streams-chain", cert, key, inter[0])
    server_side: list[object] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_side.append(writer.get_extra_info("peer_chain"))
        writer.close()

    _, port = await serve(handler, securechan.ServerConfig(certfile=crt, keyfile=k))
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=pki_dir.client_config())
    chain = writer.get_extra_info("peer_chain")
    assert chain == writer.get_extra_info("securechan").peer_chain
    assert [c.subject for c in chain] == [cert.subject, inter[0].subject]
    assert chain[0] == writer.get_extra_info("peercert")
    assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
    assert server_side == [()]  # no client certificate: an empty chain, not the default


async def test_a_handshake_closed_locally_fails_the_waiter_and_never_reaches_the_application(
    client_config,
) -> None:
    """SecureProtocol used directly (it is public): the application closes the TCP transport while the
    handshake waits for the ServerHello. The waiter fails with an error that says the close was local
    (not a hang, and not blamed on the peer), and the application protocol is never created."""
    from rawpeer import raw_server, read_frame

    from securechan.connection import Connection
    from securechan.protocol import SecureProtocol

    hello_seen = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)  # the ClientHello; never answered
        hello_seen.set()
        await reader.read()
        writer.close()

    made: list[asyncio.BaseProtocol] = []

    def factory() -> asyncio.BaseProtocol:
        made.append(asyncio.Protocol())
        return made[-1]

    loop = asyncio.get_running_loop()
    server, port = await raw_server(silent)
    async with server:
        waiter: asyncio.Future[None] = loop.create_future()
        proto = SecureProtocol(Connection(client_config, server_name="localhost"), factory, waiter, None)
        tcp, _ = await loop.create_connection(lambda: proto, "127.0.0.1", port)
        await asyncio.wait_for(hello_seen.wait(), 10)
        tcp.close()
        with pytest.raises(securechan.ConnectionClosedError, match=r"closed on this side during the handshake"):
            await asyncio.wait_for(waiter, 10)
    assert made == [] and proto.app_transport is None
