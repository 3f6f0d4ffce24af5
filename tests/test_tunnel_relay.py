"""Tunnel relay semantics over real loopback sockets: half-close, failures, backpressure, limits, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from tunnelkit import (
    client_spec,
    echo_then_bye,
    free_port,
    no_connections,
    open_fds,
    pair,
    plain_target,
    running,
    secure_client,
    server_spec,
    silent_target,
    until,
)

import securechan
from securechan import pki
from securechan.errors import ConfigError, ListenError
from securechan.tunnel import Relay, Tunnel, mux
from securechan.tunnel import relay as relay_module

pytestmark = pytest.mark.timeout(60)


def lines(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "securechan.tunnel" and r.levelno >= level)


async def test_half_close_sender_still_gets_whole_reply(pki_dir, via, tunnel_log) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    async with plain_target(echo_then_bye) as port, pair(pki_dir, f"127.0.0.1:{port}") as (srv, cli):
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        writer.write(payload)
        writer.write_eof()  # the sender is done writing ...
        reply = await reader.read()  # ... and still reads the whole reply, which exists only after its EOF
        writer.close()
        await until(lambda: srv.completed == 1 and cli.completed == 1)
    assert hashlib.sha256(reply).digest() == hashlib.sha256(payload + b"BYE").digest()
    log = lines(tunnel_log, logging.INFO)
    assert f"up={len(payload)} down={len(payload) + 3}" in log
    assert "closed: client closed first" in log


async def test_target_eof_reaches_securechan_client_as_close_notify(pki_dir) -> None:
    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        writer.write_eof()  # target half-closes first; it still reads afterwards
        got = await reader.read()
        writer.write(got) if not writer.transport.is_closing() else None
        writer.close()

    async with plain_target(greet) as port, running(server_spec(pki_dir, f"127.0.0.1:{port}")) as (srv,):
        reader, writer = await secure_client(pki_dir, srv.port)
        assert await reader.read() == b"hello"  # b"" after close_notify, not a TruncationError
        assert reader.at_eof()
        writer.write(b"still writable after the peer's close_notify")
        writer.write_eof()
        writer.close()
        await writer.wait_closed()
        await until(lambda: srv.completed == 1)


async def test_truncated_secure_stream_resets_the_plain_side(pki_dir, tunnel_log) -> None:
    """TCP EOF without close_notify must not reach the target as a clean EOF."""
    outcome: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read(100)
            outcome.set_result(("data", data, await reader.read()))
        except ConnectionResetError as exc:
            outcome.set_result(exc)
        writer.close()

    async with plain_target(target) as port, running(server_spec(pki_dir, f"127.0.0.1:{port}")) as (srv,):
        reader, writer = await secure_client(pki_dir, srv.port)
        writer.write(b"x")
        await writer.drain()
        await until(lambda: len(srv.relays) == 1)
        # FIN, no close_notify (through a duplicate: uvloop's socket objects refuse shutdown())
        sock = writer.get_extra_info("socket")
        with socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno())) as dup:
            dup.shutdown(socket.SHUT_WR)
        result = await asyncio.wait_for(outcome, 10)
        writer.transport.abort()
        await until(lambda: srv.completed == 1)
    assert isinstance(result, ConnectionResetError), f"target saw {result!r} instead of a reset"
    assert "without close_notify (truncated)" in lines(tunnel_log)


async def test_plain_reset_reaches_securechan_client_as_reset(pki_dir) -> None:
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"partial")
        await writer.drain()
        await reader.read(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with plain_target(resetter) as port, running(server_spec(pki_dir, f"127.0.0.1:{port}")) as (srv,):
        reader, writer = await secure_client(pki_dir, srv.port)
        assert await reader.readexactly(7) == b"partial"
        writer.write(b"go")
        with pytest.raises(ConnectionResetError):  # the tunnel resets: never a clean close_notify
            await reader.read()
        writer.transport.abort()
        await until(lambda: srv.completed == 1)


async def test_reset_through_both_tunnels_reaches_the_plain_client_as_reset(pki_dir, via) -> None:
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with plain_target(resetter) as port, pair(pki_dir, f"127.0.0.1:{port}") as (srv, cli):
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        writer.write(b"go")
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        await until(lambda: srv.completed == 1 and cli.completed == 1)
        # A stream's reset is a RESET frame: the carrier's own socket keeps its clean close (no SO_LINGER 0).
        for session in srv.carriers | cli.carriers:
            sock = session.carrier_info("socket")
            assert struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))[0] == 0


async def test_slow_reader_pauses_the_sender_and_memory_stays_bounded(pki_dir, via) -> None:
    """The target reads nothing: the tunnels stop reading, and hold a bounded number of bytes."""
    release = asyncio.Event()
    total = 48 * 1024 * 1024
    received = 0

    async def stalled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await release.wait()
        while data := await reader.read(1 << 20):
            received += len(data)
        writer.close()

    async with plain_target(stalled) as port, pair(pki_dir, f"127.0.0.1:{port}") as (srv, cli):
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        writer.write(os.urandom(1 << 20) * (total >> 20))  # all queued in this process at once
        await until(lambda: len(srv.relays) == 1 and len(cli.relays) == 1)
        # Wait until the flow stopped: the sender's buffer no longer shrinks.
        previous = -1
        while (pending := writer.transport.get_write_buffer_size()) != previous:
            previous = pending
            await asyncio.sleep(0.2)
        (s_relay,), (c_relay,) = srv.relays, cli.relays
        assert pending > total // 2, "the sender was not paused: the tunnels absorbed most of the stream"
        # A stream's receive window may have grown while the target's socket buffer still took bytes.
        limit = 1024 * 1024 + (mux.MAX_WINDOW - mux.WINDOW if via else 0)
        for relay in (s_relay, c_relay):
            assert relay.held_bytes() <= limit, f"a tunnel holds {relay.held_bytes()} bytes for one connection"
        release.set()
        writer.write_eof()
        await until(lambda: received == total, 30)
        writer.close()
        await until(lambda: srv.completed == 1 and cli.completed == 1)


async def test_target_refusing(pki_dir, via, tunnel_log) -> None:
    port = free_port()  # nothing listens there
    async with pair(pki_dir, f"127.0.0.1:{port}") as (srv, cli):
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        writer.write(b"hello")
        with pytest.raises(ConnectionResetError):
            await reader.read()  # reset, not a clean (empty) reply
        writer.close()
        await until(lambda: "refused the connection" in lines(tunnel_log))
    warning = lines(tunnel_log, logging.WARNING)
    assert f"target 127.0.0.1:{port} refused the connection; is the service running" in warning


async def test_target_down_unix_socket(pki_dir, tmp_path, tunnel_log) -> None:
    spec = server_spec(pki_dir, f"unix:{tmp_path}/missing.sock")
    async with running(spec) as (srv,):
        reader, writer = await secure_client(pki_dir, srv.port)
        with pytest.raises(ConnectionResetError):  # never a clean, empty stream
            await reader.read()
        writer.transport.abort()
    assert f"target unix:{tmp_path}/missing.sock refused the connection" in lines(tunnel_log)


async def test_target_slow_to_accept_hits_connect_timeout_with_retries(pki_dir, via, tunnel_log) -> None:
    """A target whose accept queue is full never completes the TCP handshake."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    port = full.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # fill the accept queue; later SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        await asyncio.sleep(0.1)
        async with pair(pki_dir, f"127.0.0.1:{port}",
                        server={"connect_timeout": 0.3, "connect_retries": 1, "retry_delay": 0.05}) as (srv, cli):
            reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
            with pytest.raises(ConnectionResetError):
                await reader.read()
            writer.close()
    finally:
        for s in fillers:
            s.close()
        full.close()
    assert f"target 127.0.0.1:{port} did not accept the connection within 0.3 s" in lines(tunnel_log)


async def test_target_slow_to_answer_is_waited_for(pki_dir, via) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readexactly(4)
        await asyncio.sleep(0.5)
        writer.write(request[::-1])
        writer.close()

    async with plain_target(slow) as port, pair(pki_dir, f"127.0.0.1:{port}") as (srv, cli):
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        writer.write(b"ping")
        assert await reader.read() == b"gnip"
        writer.close()


async def test_idle_timeout_cuts_a_silent_connection(pki_dir, via, tunnel_log) -> None:
    """An idle connection is cut with a reset: the stream was never ended, so it must not look complete."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async with plain_target(silent) as port, pair(pki_dir, f"127.0.0.1:{port}", server={"idle_timeout": 0.3}) as (
        srv, cli,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        writer.write(b"anyone?")
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        await until(lambda: srv.completed == 1)
    assert "closed: idle for 0.3 s; both sides aborted" in lines(tunnel_log)


async def test_idle_timeout_on_a_stalled_transfer_aborts_instead_of_closing(pki_dir, via, tunnel_log) -> None:
    """A transfer that stalls past the idle timeout (a slow reader, or an attacker holding the path)
    is cut with a reset, never closed cleanly: a prefix must not look like the whole stream."""
    total = 8 * 1024 * 1024
    received = 0
    target_end: list[str] = []

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal received
        await asyncio.sleep(1.5)  # longer than the idle timeout, while the tunnels hold data
        try:
            while data := await reader.read(65536):
                received += len(data)
            target_end.append("clean EOF")
        except ConnectionResetError:
            target_end.append("reset")
        writer.close()

    async with plain_target(slow) as port, pair(pki_dir, f"127.0.0.1:{port}", server={"idle_timeout": 0.5}) as (
        srv, cli,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        writer.write(os.urandom(total))
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 10)
        writer.close()
        await until(lambda: bool(target_end), 10)
    assert received < total and target_end == ["reset"]
    assert "stalled for 0.5 s" in lines(tunnel_log)


async def test_max_lifetime_cuts_a_busy_connection(pki_dir, via, tunnel_log) -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                writer.write(b"tick\n")
                await writer.drain()
                await asyncio.sleep(0.05)
        except ConnectionError:
            writer.close()

    async with plain_target(chatty) as port, pair(pki_dir, f"127.0.0.1:{port}", client={"max_lifetime": 0.4}) as (
        srv, cli,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        with pytest.raises(ConnectionResetError):
            while await reader.read(1024):
                pass
        writer.close()
        await until(lambda: srv.completed == 1 and cli.completed == 1)
    assert "maximum connection lifetime (0.4 s) reached" in lines(tunnel_log)


async def test_handshake_timeout_drops_a_silent_peer(pki_dir, tunnel_log) -> None:
    async with running(server_spec(pki_dir, f"127.0.0.1:{free_port()}", handshake_timeout=0.3)) as (srv,):
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)  # plain TCP, says nothing
        await reader.read()  # the tunnel gives up: an alert, then EOF
        assert reader.at_eof()
        writer.close()
        await until(lambda: no_connections(srv))
    assert "did not complete within 0.3 s" in lines(tunnel_log, logging.WARNING)


async def test_connection_limit_resets_the_excess(pki_dir, via, tunnel_log) -> None:
    async with plain_target(echo_then_bye) as port, pair(pki_dir, f"127.0.0.1:{port}",
                                                          client={"max_connections": 1}) as (srv, cli):
        r1, w1 = await asyncio.open_connection("127.0.0.1", cli.port)
        w1.write(b"one")
        assert await r1.readexactly(3) == b"one"
        r2, w2 = await asyncio.open_connection("127.0.0.1", cli.port)
        with pytest.raises(ConnectionResetError):
            await r2.read()
        w2.close()
        w1.write_eof()
        assert await r1.read() == b"BYE"
        w1.close()
        await until(lambda: cli.active == 0)
        r3, w3 = await asyncio.open_connection("127.0.0.1", cli.port)  # a slot is free again
        w3.write_eof()
        assert await r3.read() == b"BYE"
        w3.close()
    assert cli.rejected == 1
    assert "connection limit (1) reached" in lines(tunnel_log, logging.WARNING)


async def test_client_vanishing_mid_transfer_leaks_nothing(pki_dir, via) -> None:
    target_done = asyncio.Event()

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        block = os.urandom(1 << 16)
        try:
            while True:
                writer.write(block)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            target_done.set()

    async with plain_target(firehose) as port, pair(pki_dir, f"127.0.0.1:{port}") as (srv, cli):
        baseline_tasks = len(asyncio.all_tasks())
        baseline_fds = open_fds()
        for _ in range(3):
            target_done.clear()
            reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
            await reader.readexactly(1 << 20)  # mid-transfer ...
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # ... the client vanishes
            await asyncio.wait_for(target_done.wait(), 10)
        await until(lambda: no_connections(srv, cli))
        await until(lambda: len(asyncio.all_tasks()) <= baseline_tasks)
        carrier = 2 if via else 0  # the multiplexed connection's two sockets, made with the first stream, stay
        await until(lambda: open_fds() <= baseline_fds + carrier)
        assert srv.completed == 3 and cli.completed == 3


async def test_name_mismatch_error_names_the_option(pki_dir, tunnel_log) -> None:
    async with plain_target(echo_then_bye) as port, pair(pki_dir, f"127.0.0.1:{port}",
                                                          client={"server_name": "db"}) as (srv, cli):
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        with pytest.raises(ConnectionResetError):
            await reader.read()
        writer.close()
        await until(lambda: cli.active == 0)
        await asyncio.sleep(0.05)
        # Reported once (no task awaits the handshake: its failure is a callback), nothing left behind.
        assert not cli.connecting and not cli._protocols and not cli._tasks and cli.active == 0
    assert "the server certificate does not match --server-name 'db'" in lines(tunnel_log, logging.WARNING)
    assert lines(tunnel_log).count("certificate for 'localhost' is not valid for server name 'db'") == 1


async def test_session_resumes_across_tunnel_connections(pki_dir, tunnel_log) -> None:
    async with plain_target(echo_then_bye) as port, pair(pki_dir, f"127.0.0.1:{port}") as (srv, cli):
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
            writer.write_eof()
            assert await reader.read() == b"BYE"
            writer.close()
            await until(lambda: cli.active == 0)
    client_lines = [r.getMessage() for r in tunnel_log.records if "'cli'" in r.getMessage() and "up=" in r.getMessage()]
    assert len(client_lines) == 2
    assert " resumed " not in client_lines[0] and " resumed " in client_lines[1]


async def test_unix_listeners_and_unix_target(pki_dir, tmp_path, tunnel_log) -> None:
    target_path = str(tmp_path / "svc.sock")
    server = await asyncio.start_unix_server(echo_then_bye, target_path)
    try:
        async with running(server_spec(pki_dir, f"unix:{target_path}", listen=f"unix:{tmp_path}/in.sock")) as _, \
                running(server_spec(pki_dir, "unix:/nonexistent", name="unused")) as _unused:
            from tunnelkit import client_spec

            spec = client_spec(pki_dir, f"unix:{tmp_path}/in.sock", listen=f"unix:{tmp_path}/plain.sock")
            async with running(spec):
                reader, writer = await asyncio.open_unix_connection(f"{tmp_path}/plain.sock")
                writer.write(b"over unix")
                writer.write_eof()
                assert await reader.read() == b"over unixBYE"
                writer.close()
        assert not os.path.exists(f"{tmp_path}/in.sock")  # the listener removed its socket file
    finally:
        server.close()
    # A Unix socket has no reset: each tunnel whose plain side is one says what that costs, once.
    warnings = [line for line in lines(tunnel_log, logging.WARNING).splitlines() if "has no reset" in line]
    assert len(warnings) == 3, warnings  # the server tunnel's target, the unused one's, the client's listener
    assert any(f"plain side (unix:{tmp_path}/plain.sock)" in w and "reaches the client" in w for w in warnings)


def parse_proxy_v2(data: bytes) -> tuple[int, int, bytes, bytes, int, int, bytes, int]:
    """An independent reading of a PROXY v2 header (HAProxy spec 2.2): returns its fields and length."""
    assert data[:12] == b"\r\n\r\n\x00\r\nQUIT\n"
    ver_cmd, fam, length = struct.unpack("!BBH", data[12:16])
    body = data[16 : 16 + length]
    if fam == 0x11:
        src, dst, sport, dport = body[0:4], body[4:8], *struct.unpack("!HH", body[8:12])
        tlvs = body[12:]
    else:
        src, dst, sport, dport, tlvs = b"", b"", 0, 0, body
    return ver_cmd, fam, src, dst, sport, dport, tlvs, 16 + length


async def test_proxy_protocol_v2_tells_the_target_the_real_client(pki_dir) -> None:
    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(await reader.read())
        writer.close()

    client_cert, client_key = pki_dir.issue("app-7", client=True)
    async with plain_target(target) as port, running(server_spec(
        pki_dir, f"127.0.0.1:{port}", proxy_protocol=True, client_ca=str(pki_dir.ca_file),
    )) as (srv,):
        config = pki_dir.client_config(certfile=client_cert, keyfile=client_key)
        tunnel_port = srv.port
        reader, writer = await securechan.open_connection("127.0.0.1", tunnel_port, config=config,
                                                          server_name="localhost")
        client_port = writer.get_extra_info("sockname")[1]
        writer.write(b"payload")
        writer.write_eof()
        await reader.read()
        writer.close()
        data = await asyncio.wait_for(seen, 10)
    ver_cmd, fam, src, dst, sport, dport, tlvs, size = parse_proxy_v2(data)
    assert (ver_cmd, fam) == (0x21, 0x11)  # v2 PROXY, TCP over IPv4
    assert (src, dst) == (bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]))
    assert (sport, dport) == (client_port, tunnel_port)
    assert data[size:] == b"payload"
    assert tlvs[0] == 0x20  # PP2_TYPE_SSL
    ssl = tlvs[3 : 3 + struct.unpack("!H", tlvs[1:3])[0]]
    assert ssl[0] == 0x07 and ssl[1:5] == b"\0\0\0\0"  # SSL + client cert (conn and session), verified
    assert b"\x22\x00\x05app-7" in ssl[5:]  # PP2_SUBTYPE_SSL_CN
    assert b"securechan/" in ssl[5:]


async def test_access_list_admits_listed_client_and_refuses_others(pki_dir, tunnel_log) -> None:
    good_cert, good_key = pki_dir.issue("reporting", client=True)
    bad_cert, bad_key = pki_dir.issue("intruder", client=True)
    async with plain_target(echo_then_bye) as port, running(server_spec(
        pki_dir, f"127.0.0.1:{port}", client_ca=str(pki_dir.ca_file), allow_cn=("reporting",),
    )) as (srv,):
        from tunnelkit import client_spec

        ok_spec = client_spec(pki_dir, f"127.0.0.1:{srv.port}", cert=str(good_cert), key=str(good_key), name="ok")
        bad_spec = client_spec(pki_dir, f"127.0.0.1:{srv.port}", cert=str(bad_cert), key=str(bad_key), name="bad")
        async with running(ok_spec, bad_spec) as (ok, bad):
            reader, writer = await asyncio.open_connection("127.0.0.1", ok.port)
            writer.write_eof()
            assert await reader.read() == b"BYE"
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", bad.port)
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 10)
            writer.close()
            await until(lambda: ok.active == 0 and bad.active == 0 and srv.completed == 1)
    log = lines(tunnel_log)
    assert "tunnel 'srv': 127.0.0.1:" in log and "identity='reporting'" in log
    assert "tunnel 'bad':" in log and "access list" in log


async def test_quiet_mode_hides_health_checks_only(pki_dir, via, tunnel_log) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())
        writer.close()

    async with plain_target(echo) as port, pair(pki_dir, f"127.0.0.1:{port}",
                                                          server={"quiet": True}, client={"quiet": True}) as (srv, cli):
        for target_port in (srv.port, cli.port):  # a TCP health check: connect, hang up
            _, writer = await asyncio.open_connection("127.0.0.1", target_port)
            writer.close()
        await until(lambda: no_connections(srv, cli))
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        writer.write(b"real")
        writer.write_eof()
        assert await reader.read() == b"real"
        writer.close()
        await until(lambda: srv.completed == 2 and cli.completed == 2)
    info = [r.getMessage() for r in tunnel_log.records if r.levelno >= logging.INFO and "closed:" in r.getMessage()]
    debug = [r.getMessage() for r in tunnel_log.records if r.levelno == logging.DEBUG and r.name == "securechan.tunnel"]
    assert len(info) == 2 and all("up=4 down=4" in line for line in info)
    assert any("handshake failed" in line for line in debug)  # the server tunnel's health check
    assert any("up=0 down=0" in line for line in debug)  # the client tunnel's health check


async def test_ipv6_listener_and_proxy_header(pki_dir) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    seen: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.set_result(await reader.readexactly(16 + 36))
        writer.close()

    async with plain_target(target) as port, running(server_spec(
        pki_dir, f"127.0.0.1:{port}", listen="[::1]:0", proxy_protocol=True,
    )) as (srv,):
        tunnel_port = srv.port
        reader, writer = await securechan.open_connection("::1", tunnel_port, config=pki_dir.client_config(),
                                                          server_name="localhost")
        client_port = writer.get_extra_info("sockname")[1]
        head = await asyncio.wait_for(seen, 10)
        writer.close()
    assert head[12:14] == b"\x21\x21"  # PROXY, TCP over IPv6
    assert head[16:32] == head[32:48] == bytes(15) + b"\x01"
    assert struct.unpack("!HH", head[48:52]) == (client_port, tunnel_port)


async def test_records_arriving_with_the_clients_finished_reach_the_target(pki_dir) -> None:
    """A resumed client sends its Finished, data and close_notify in one write: the server tunnel
    gets them in one read, before its target connection exists, and must relay all of it, then EOF."""
    got: list[bytes] = []
    done = asyncio.Event()

    async def collect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read())  # everything, up to a clean EOF
        writer.close()
        done.set()

    config = pki_dir.client_config()
    async with plain_target(collect) as port, running(server_spec(pki_dir, f"127.0.0.1:{port}")) as (srv,):
        reader, writer = await securechan.open_connection("127.0.0.1", srv.port, config=config,
                                                          server_name="localhost")
        writer.write(b"first")
        writer.write_eof()
        await reader.read()  # the session ticket arrives before the server's close_notify
        writer.close()
        await asyncio.wait_for(done.wait(), 10)
        assert got == [b"first"] and config.session_stats.tickets >= 1
        got.clear()
        done.clear()

        conn = securechan.Connection(config, server_name="localhost", resume_key=("127.0.0.1", srv.port, "localhost"))
        loop = asyncio.get_running_loop()
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.setblocking(False)
        try:
            await loop.sock_sendall(sock, conn.data_to_send())
            while not conn.handshake_complete:
                conn.receive_data(await loop.sock_recv(sock, 65536))
            assert conn.session is not None and conn.session.resumed
            conn.send_data(b"early bytes")
            conn.close()
            await loop.sock_sendall(sock, conn.data_to_send())  # Finished + record + close_notify, one write
            await asyncio.wait_for(done.wait(), 10)
        finally:
            sock.close()
    assert got == [b"early bytes"]


async def test_a_client_is_not_read_while_its_tunnel_connects(pki_dir) -> None:
    """Until the securechan connection exists, the client tunnel holds at most one read of the plain client,
    however much it sends (uvloop starts reading right after connection_made, so the pause must follow it)."""
    with silent_target() as port:
        spec = client_spec(pki_dir, f"127.0.0.1:{port}", handshake_timeout=3.0)
        async with running(spec) as (cli,):
            reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
            chunk = os.urandom(1 << 20)
            loop = asyncio.get_running_loop()
            end = loop.time() + 1.5  # inside the handshake timeout
            peak = 0
            while loop.time() < end:
                writer.write(chunk)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(writer.drain(), 0.05)
                peak = max([peak, *(r.held_bytes() for r in cli.connecting)])
            assert cli.connecting, "the connection was not waiting for its handshake"
            writer.transport.abort()
    assert peak <= 1 << 20, f"the client tunnel held {peak} bytes of a connection still in its handshake"


async def test_eof_towards_a_target_that_reset_is_a_reset(pki_dir, tunnel_log) -> None:
    """close_notify arrives for a target that reset while the tunnel was not reading it: the relay resets the
    client and blames the target (write_eof raises there, and must not escape into the secure side)."""
    reset_now = asyncio.Event()

    async def flood_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError):
            for _ in range(400):  # the secure client reads nothing: the tunnel stops reading this target
                writer.write(b"t" * 65536)
                await asyncio.wait_for(writer.drain(), 0.5)
        await reset_now.wait()
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with plain_target(flood_then_reset) as port, running(server_spec(pki_dir, f"127.0.0.1:{port}")) as (srv,):
        reader, writer = await secure_client(pki_dir, srv.port)
        writer.transport.pause_reading()  # the client does not read
        await until(lambda: bool(srv.relays) and not next(iter(srv.relays)).target.transport.is_reading(), 20)
        reset_now.set()
        await asyncio.sleep(1.0)  # the target's RST reaches the tunnel, which is not reading that socket
        writer.write_eof()  # close_notify: the tunnel forwards it as write_eof() to the reset target
        await until(lambda: srv.completed == 1, 20)
        writer.transport.abort()
    closed = [line.split("closed: ", 1)[1] for line in lines(tunnel_log).splitlines() if "closed: " in line]
    assert closed and closed[0].startswith("target "), f"the relay blamed the wrong side: {closed}"


async def test_last_bytes_not_taken_in_the_close_grace_are_logged_as_a_cut(pki_dir, tunnel_log, monkeypatch) -> None:
    """Both sides ended, but the secure client never reads the end of the reply: when the close grace
    runs out the relay aborts, and it must say it cut the stream, not that it closed cleanly."""
    monkeypatch.setattr(relay_module, "CLOSE_GRACE", 0.5)
    go = asyncio.Event()

    async def reply_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await go.wait()
        writer.write(os.urandom(16 << 20))
        writer.write_eof()
        await reader.read()
        writer.close()

    async with plain_target(reply_then_close) as port, running(server_spec(pki_dir, f"127.0.0.1:{port}")) as (srv,):
        reader, writer = await secure_client(pki_dir, srv.port)
        writer.transport.pause_reading()  # the client reads nothing more
        await until(lambda: bool(srv.relays))
        # The tunnel takes the whole reply (and the target's EOF) without pausing the target, so the
        # relay finishes with megabytes still queued towards the client.
        next(iter(srv.relays)).client.transport.set_write_buffer_limits(high=64 << 20)
        go.set()
        writer.write_eof()
        await until(lambda: srv.completed == 1, 20)
        writer.transport.resume_reading()
        with pytest.raises(ConnectionResetError):
            while await reader.read(1 << 20):
                pass
    assert "then cut before the last bytes were delivered (the last bytes were not taken within 0.5 s)" in lines(
        tunnel_log)


async def test_a_connection_still_connecting_at_shutdown_is_cut_and_logged(pki_dir, tunnel_log) -> None:
    """A client connection in its handshake has no task (its end is a callback): cut_open still cuts it,
    and it is logged and its slot released by the time cut_open returns."""
    with silent_target() as port:
        spec = client_spec(pki_dir, f"127.0.0.1:{port}", handshake_timeout=30.0)
        async with running(spec) as (cli,):
            reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
            await until(lambda: bool(cli.connecting) and not cli._tasks)  # TCP connected, in the handshake
            assert await cli.cut_open("shutdown deadline (0 s) reached") == 1
            assert lines(tunnel_log).count("closed: shutdown deadline (0 s) reached") == 1
            assert not cli.connecting and cli.active == 0
            with pytest.raises(ConnectionResetError):
                await reader.read()
            writer.close()
            await asyncio.sleep(0.05)
    assert lines(tunnel_log).count("closed: shutdown deadline (0 s) reached") == 1  # once, not again at close


async def test_a_client_connection_cancelled_while_connecting_is_logged_once(pki_dir, tunnel_log) -> None:
    """The task that makes the TCP connection is cancelled before it connects: logged once, slot released."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        # Fill the accept queue so the next connect hangs in SYN_SENT instead of being accepted.
        fillers = [socket.socket() for _ in range(8)]
        for f in fillers:
            f.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                f.connect(full.getsockname())
        try:
            spec = client_spec(pki_dir, f"127.0.0.1:{full.getsockname()[1]}", connect_timeout=30.0)
            async with running(spec) as (cli,):
                reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
                await until(lambda: bool(cli._tasks))
                await asyncio.sleep(0.2)
                if not cli._tasks:
                    pytest.skip("this kernel accepted the connection despite the full backlog")
                assert await cli.cut_open("shutdown deadline (0 s) reached") == 1
                assert lines(tunnel_log).count("closed: shutdown deadline (0 s) reached") == 1
                assert not cli.connecting and not cli._tasks and cli.active == 0
                with pytest.raises(ConnectionResetError):
                    await reader.read()
                writer.close()
        finally:
            for f in fillers:
                f.close()


async def test_running_relays_cut_at_shutdown_are_logged_before_cut_open_returns(pki_dir, via, tunnel_log) -> None:
    """No task waits on a running relay: cut_open itself waits until each cut relay has ended and logged."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never replies; the client's cut ends it
        writer.close()

    async with plain_target(hold) as port, pair(pki_dir, f"127.0.0.1:{port}") as (srv, cli):
        streams = [await asyncio.open_connection("127.0.0.1", cli.port) for _ in range(2)]
        for _, writer in streams:
            writer.write(b"hello")
        await until(lambda: len(cli.relays) == 2 and len(srv.relays) == 2)
        assert not cli._tasks and not srv._tasks  # running relays: no task per connection
        assert await cli.cut_open("shutdown deadline (0 s) reached") == 2
        # Logged and released by the time cut_open returned, not at some later loop turn.
        assert lines(tunnel_log).count("closed: shutdown deadline (0 s) reached") == 2
        assert not cli.relays and cli.active == 0 and cli.completed == 2
        for reader, writer in streams:
            with pytest.raises(ConnectionResetError):
                await reader.read()
            writer.close()


async def test_relay_when_done_calls_back_once_even_if_it_already_ended() -> None:
    relay = relay_module.Relay(client_secure=False)
    early: list[str | None] = []
    second: list[str | None] = []
    relay.when_done(lambda r: early.append(r.reason))
    relay.when_done(lambda r: second.append(r.reason))  # a second callback does not replace the first
    relay.stop("stopped before either end connected")  # no connection to wait for: it ends at once
    assert relay.settled and early == second == ["stopped before either end connected"]
    relay.stop("again")
    late: list[str | None] = []
    relay.when_done(lambda r: late.append(r.reason))  # registered after the end: called at once
    assert early == ["stopped before either end connected"] and late == early
    assert await relay.wait() == "stopped before either end connected"


async def test_a_cancelled_wait_stops_the_relay_and_its_callback_still_runs_once() -> None:
    loop = asyncio.get_running_loop()
    relay = relay_module.Relay(client_secure=False)
    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    await loop.create_connection(lambda: relay.client, "127.0.0.1", port)
    await loop.create_connection(lambda: relay.target, "127.0.0.1", port)
    relay.start()
    seen: list[str | None] = []
    relay.when_done(lambda r: seen.append(r.reason))
    waiter = asyncio.ensure_future(relay.wait())
    await asyncio.sleep(0)
    waiter.cancel()  # cancelling a wait stops the relay (as it always did) ...
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert relay.reason == "cancelled"
    await until(lambda: relay.settled)  # ... and the callback runs, once, when both ends are gone
    await asyncio.sleep(0.05)
    assert seen == ["cancelled"] and relay.client.lost and relay.target.lost
    server.close()


async def test_an_exception_in_a_when_done_callback_goes_to_the_loop_handler() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        relay = relay_module.Relay(client_secure=False)
        after: list[str | None] = []
        relay.when_done(lambda r: 1 / 0)  # type: ignore[func-returns-value]
        relay.when_done(lambda r: after.append(r.reason))
        relay.stop("stopped")
    finally:
        loop.set_exception_handler(None)
    assert [type(c["exception"]) for c in reported] == [ZeroDivisionError]
    assert after == ["stopped"]  # the callbacks after it still ran


# -- error paths of the tunnel service and the relay ------------------------------------------------------------


def tcp_state(sock: socket.socket) -> int:
    """The kernel's TCP state of ``sock`` (``tcpi_state``, the first byte of ``struct tcp_info``): 7 is TCP_CLOSE.
    Read without touching ``SO_ERROR``, so a pending reset is still reported to the next send."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)[0]


async def outcome_of_reading(reader: asyncio.StreamReader) -> object:
    """Read to the end: the bytes if the stream ended cleanly, else the exception that ended it."""
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError as exc:
        return exc


@pytest.mark.parametrize("mode", ["server", "client"])
async def test_a_listen_address_in_use_is_a_listen_error_with_its_hint(pki_dir, mode: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        make = server_spec if mode == "server" else client_spec
        tunnel = Tunnel(make(pki_dir, "127.0.0.1:1", listen=f"127.0.0.1:{port}", name="busy"))
        with pytest.raises(ListenError, match=(
            rf"^tunnel 'busy' cannot listen on 127\.0\.0\.1:{port}: Address already in use; "
            r"another process is listening there; stop it or choose another port$")):
            await tunnel.start()
    assert tunnel.server is None and tunnel.addresses == []  # nothing half-started


async def test_server_connection_limit_resets_the_excess_from_accept(pki_dir, tunnel_log) -> None:
    """A server tunnel counts a socket from accept: above the limit it is reset before any handshake."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())
        writer.close()

    async with plain_target(hold) as port, running(server_spec(pki_dir, f"127.0.0.1:{port}",
                                                               max_connections=1)) as (srv,):
        config = pki_dir.client_config()
        r1, w1 = await securechan.open_connection("127.0.0.1", srv.port, config=config, server_name="localhost")
        r2, w2 = await asyncio.open_connection("127.0.0.1", srv.port)  # plain TCP: the tunnel must not wait for it
        second = w2.get_extra_info("sockname")[1]
        assert isinstance(await outcome_of_reading(r2), ConnectionResetError)
        w2.close()
        assert srv.rejected == 1 and srv.accepted == 1 and srv.active == 1
        w1.write(b"first")
        w1.write_eof()
        assert await r1.read() == b"first"  # the admitted connection was not disturbed
        w1.close()
        await until(lambda: srv.active == 0 and srv.completed == 1)
        r3, w3 = await securechan.open_connection("127.0.0.1", srv.port, config=config, server_name="localhost")
        w3.write_eof()
        assert await r3.read() == b""  # a slot is free again
        w3.close()
        await until(lambda: srv.active == 0 and srv.completed == 2)
    assert srv.rejected == 1 and srv.accepted == 2
    assert (f"tunnel 'srv': connection limit (1) reached; reset connection from 127.0.0.1:{second} "
            "(raise --max-connections if this load is expected)") in lines(tunnel_log, logging.WARNING)


async def test_client_tunnel_target_refusing_resets_the_plain_client(pki_dir, tunnel_log) -> None:
    """The client tunnel's own connect fails: logged with the hint, the plain client reset, the slot freed."""
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))  # bound, not listening: a connect is refused, and the port stays ours
        port = closed_port.getsockname()[1]
        async with running(client_spec(pki_dir, f"127.0.0.1:{port}")) as (cli,):
            reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
            client_port = writer.get_extra_info("sockname")[1]
            writer.write(b"hello")
            assert isinstance(await outcome_of_reading(reader), ConnectionResetError)
            writer.close()
            await until(lambda: cli.active == 0)
            assert not cli.connecting and not cli._protocols and not cli.relays
    warnings = lines(tunnel_log, logging.WARNING)
    assert f"tunnel 'cli': 127.0.0.1:{client_port} identity=- suite=- up=0 down=0 " in warnings
    assert warnings.count(f"closed: target 127.0.0.1:{port} refused the connection; "
                          "is the service running and listening there?") == 1


@pytest.mark.parametrize("mode", ["server", "client"])
async def test_target_connect_error_names_the_os_error(pki_dir, tmp_path, tunnel_log, mode: str) -> None:
    """Neither refused nor a timeout (here ENOTDIR: a path component is a file): the log says what the OS said."""
    (tmp_path / "file").write_text("not a directory")
    target = f"unix:{tmp_path}/file/svc.sock"
    if mode == "server":
        async with running(server_spec(pki_dir, target)) as (tunnel,):
            reader, writer = await securechan.open_connection("127.0.0.1", tunnel.port,
                                                              config=pki_dir.client_config(), server_name="localhost")
            assert isinstance(await outcome_of_reading(reader), ConnectionResetError)
            writer.transport.abort()
            await until(lambda: tunnel.active == 0)
    else:
        async with running(client_spec(pki_dir, target)) as (tunnel,):
            reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port)
            assert isinstance(await outcome_of_reading(reader), ConnectionResetError)
            writer.close()
            await until(lambda: tunnel.active == 0)
    assert not tunnel.connecting and not tunnel.relays
    assert lines(tunnel_log, logging.WARNING).count(f"closed: cannot connect to target {target}: Not a directory") == 1


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_tunnel_target_ending_the_handshake_is_explained(pki_dir, tunnel_log, how: str) -> None:
    """The target reads the ClientHello and hangs up (a plain service, or a server that refused us without an
    alert): the client tunnel says what that usually means, and the plain client is reset."""
    hello: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello.set_result(await reader.read(1))
        if how == "reset":
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()

    async with plain_target(hang_up) as port, running(client_spec(pki_dir, f"127.0.0.1:{port}")) as (cli,):
        reader, writer = await asyncio.open_connection("127.0.0.1", cli.port)
        writer.write(b"request")
        assert isinstance(await outcome_of_reading(reader), ConnectionResetError)
        writer.close()
        await until(lambda: cli.active == 0)
        assert not cli.connecting and not cli._protocols
    assert await hello  # the tunnel did start a handshake
    what = {
        "close": "the peer closed the connection during the handshake (client: waiting for ServerHello); it may "
                 "not be a securechan endpoint, or it rejected us without an alert",
        "reset": "the handshake was cut by a TCP reset or socket error (Connection reset by peer)",
    }[how]
    assert lines(tunnel_log, logging.WARNING).count(
        f"closed: securechan handshake with 127.0.0.1:{port} failed: {what}; is 127.0.0.1:{port} a securechan "
        "server tunnel, and does it accept this client (its log says why)?") == 1, lines(tunnel_log)


async def test_client_tunnel_reload_rereads_its_ca_for_new_connections(pki_dir, tmp_path, tunnel_log) -> None:
    """SIGHUP on a client tunnel: the CA file is read again; a broken file raises and keeps the working config."""
    other_ca = pki.make_ca("Some Other CA")
    live_ca = tmp_path / "live-ca.crt"
    live_ca.write_bytes(pki.cert_pem(other_ca[0]))  # does not vouch for the server tunnel's certificate

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read())
        writer.close()

    async def exchange(port: int) -> object:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        writer.write_eof()
        got = await outcome_of_reading(reader)
        writer.close()
        return got

    async with plain_target(echo) as port, running(server_spec(pki_dir, f"127.0.0.1:{port}")) as (srv,), \
            running(client_spec(pki_dir, f"127.0.0.1:{srv.port}", cafile=str(live_ca))) as (cli,):
        assert isinstance(await exchange(cli.port), ConnectionResetError)  # the server is not trusted yet
        await until(lambda: cli.active == 0)
        live_ca.write_bytes(pki_dir.ca_file.read_bytes())
        cli.reload()
        assert await exchange(cli.port) == b"ping"
        live_ca.write_text("not a certificate")
        with pytest.raises(ConfigError, match=str(live_ca)):
            cli.reload()
        assert await exchange(cli.port) == b"ping"  # still the configuration that worked
        await until(lambda: cli.active == 0 and srv.completed == 2)
    assert lines(tunnel_log).count("tunnel 'cli': reloaded certificates for new connections") == 1



@contextlib.contextmanager
def full_backlog() -> Iterator[tuple[socket.socket, set[int]]]:
    """A listening socket whose accept queue is full: a further connect hangs (the kernel drops its SYNs)
    until the queue has room again (``listen()`` with a larger backlog, then a SYN retransmission).
    Also yields the local ports of the connections that fill it."""
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(full.getsockname())
            fillers.append(filler)
        yield full, {f.getsockname()[1] for f in fillers}
    finally:
        for filler in fillers:
            filler.close()
        full.close()


async def connect_hangs(tunnel: Tunnel) -> Relay:
    """The one relay of ``tunnel`` whose target connect is under way; skips if the kernel accepted it anyway."""
    await until(lambda: bool(tunnel.connecting))
    await asyncio.sleep(0.2)  # time to send the SYN that the full queue drops
    if not tunnel.connecting or next(iter(tunnel.connecting)).target.transport is not None:
        pytest.skip("this kernel accepted the connection despite the full backlog")
    return next(iter(tunnel.connecting))


async def test_server_tunnel_cancelled_while_connecting_to_its_target_is_logged_once(pki_dir, tunnel_log) -> None:
    """Shutdown while the target connect hangs: cut_open cancels the task; the cut is logged once, with the
    shutdown's reason, and the securechan client sees a reset."""
    with full_backlog() as (full, _):
        spec = server_spec(pki_dir, f"127.0.0.1:{full.getsockname()[1]}", connect_timeout=30.0)
        async with running(spec) as (srv,):
            reader, writer = await secure_client(pki_dir, srv.port)
            await connect_hangs(srv)
            assert await srv.cut_open("shutdown deadline (0 s) reached") == 1
            assert not srv.connecting and not srv._tasks and not srv.relays
            assert isinstance(await outcome_of_reading(reader), ConnectionResetError)
            writer.transport.abort()
            await until(lambda: srv.active == 0)
    closed = [line for line in lines(tunnel_log).splitlines() if "closed: " in line]
    assert len(closed) == 1, closed
    assert "identity=none suite=AES-" in closed[0] and " up=0 down=0 " in closed[0]
    assert closed[0].endswith("closed: shutdown deadline (0 s) reached")


async def test_server_relay_stopped_while_connecting_resets_the_target_connection_made_later(
        pki_dir, tunnel_log) -> None:
    """cut_now() while the target connect hangs; the target then accepts: the late connection is reset at once
    (never relayed), and the relay is logged once, with the cut's reason."""
    target_saw: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    with full_backlog() as (full, fillers):
        async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if writer.get_extra_info("peername")[1] not in fillers:
                target_saw.set_result(await outcome_of_reading(reader))
            writer.close()

        spec = server_spec(pki_dir, f"127.0.0.1:{full.getsockname()[1]}", connect_timeout=30.0)
        async with running(spec) as (srv,):
            reader, writer = await secure_client(pki_dir, srv.port)
            writer.write(b"early")
            await connect_hangs(srv)
            srv.cut_now("the tunnel process stopped")
            assert isinstance(await outcome_of_reading(reader), ConnectionResetError)
            writer.transport.abort()
            server = await asyncio.start_server(target, sock=full)  # a larger backlog: the SYN retransmit connects
            try:
                assert isinstance(await asyncio.wait_for(target_saw, 40), ConnectionResetError)
                await until(lambda: srv.completed == 1 and srv.active == 0)
                assert not srv.connecting and not srv.relays
            finally:
                server.close()
    closed = [line for line in lines(tunnel_log).splitlines() if "closed: " in line]
    assert len(closed) == 1, closed
    assert " up=0 down=0 " in closed[0] and closed[0].endswith("closed: the tunnel process stopped")


async def test_a_target_reset_before_the_relay_starts_resets_the_client(pki_dir, tunnel_log) -> None:
    """The target accepts and resets before the relay starts (the tunnel is not reading it yet). The client's
    bytes then fail to reach it and the client's close_notify meets a closing target: the EOF must not be
    sent (the stream must not look complete), the relay stops, the client is reset and the cut logged once."""
    if type(asyncio.get_running_loop()).__module__.startswith("uvloop"):
        pytest.skip("uvloop reads a new connection despite the pause in connection_made, so the target's reset "
                    "ends the relay before the client's bytes reach it; this path is only reachable on asyncio's loop")
    states: list[int] = []

    with full_backlog() as (full, _):
        def reset_from_the_target_side(end: relay_module.End) -> None:
            # Runs in the target connection's connection_made, before the relay starts: the target accepts
            # and resets (on loopback the RST has arrived when close() returns; TCP_INFO shows it).
            assert end.transport is not None
            ours = end.transport.get_extra_info("sockname")[1]
            full.settimeout(5)
            while True:
                conn, peer = full.accept()
                if peer[1] == ours:
                    break
                conn.close()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            states.append(tcp_state(end.transport.get_extra_info("socket")))

        spec = server_spec(pki_dir, f"127.0.0.1:{full.getsockname()[1]}", connect_timeout=30.0)
        async with running(spec) as (srv,):
            loop = asyncio.get_running_loop()
            conn = securechan.Connection(pki_dir.client_config(), server_name="localhost")
            sock = socket.create_connection(("127.0.0.1", srv.port))
            sock.setblocking(False)
            try:
                await loop.sock_sendall(sock, conn.data_to_send())
                while not conn.handshake_complete:
                    conn.receive_data(await loop.sock_recv(sock, 65536))
                    if not conn.handshake_complete:
                        await loop.sock_sendall(sock, conn.data_to_send())
                conn.send_data(b"early bytes")
                conn.close()
                await loop.sock_sendall(sock, conn.data_to_send())  # last flight + record + close_notify, one write
                relay = await connect_hangs(srv)
                relay.target.on_connected = reset_from_the_target_side
                full.listen(16)  # room in the queue: the SYN retransmit connects
                await until(lambda: srv.completed == 1, 40)
                with pytest.raises(ConnectionResetError):
                    while await loop.sock_recv(sock, 65536):  # a session ticket may come first; never a clean EOF
                        pass
            finally:
                sock.close()
            await until(lambda: srv.active == 0)
            assert not srv.connecting and not srv.relays
    assert states == [7]  # TCP_CLOSE: the target's reset had arrived before the hand-over
    closed = [line for line in lines(tunnel_log).splitlines() if "closed: " in line]
    assert len(closed) == 1, closed
    assert " up=11 down=0 " in closed[0]
    assert closed[0].endswith("closed: target connection reset (Connection reset by peer); client connection aborted")


async def test_a_securechan_client_reset_after_its_close_notify_is_a_reset(pki_dir, tunnel_log) -> None:
    """The client ends its direction cleanly, then resets while the reply still flows: the relay reports a reset
    (not a truncation, which close_notify ruled out) and resets the target. An RST after the peer's FIN is
    reported by the kernel as EPIPE on the next send, hence "Broken pipe"."""
    target_end: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def stream_until_cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # up to the client's (relayed) EOF
        try:
            while True:
                writer.write(request * 4096)
                await writer.drain()
        except ConnectionError as exc:
            target_end.set_result(exc)
        writer.close()

    async with plain_target(stream_until_cut) as port, running(server_spec(pki_dir, f"127.0.0.1:{port}")) as (srv,):
        reader, writer = await secure_client(pki_dir, srv.port)
        writer.write(b"send me more")
        writer.write_eof()  # close_notify: this direction is complete
        await reader.readexactly(65536)
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        # The target got the relayed EOF (its socket is in CLOSE_WAIT), so the tunnel's RST reaches its next
        # send as EPIPE, or as asyncio's "Connection lost" when the transport saw it first: a cut either way.
        assert isinstance(await asyncio.wait_for(target_end, 10), (ConnectionResetError, BrokenPipeError))
        await until(lambda: srv.completed == 1)
    closed = [line for line in lines(tunnel_log).splitlines() if "closed: " in line]
    assert len(closed) == 1, closed
    assert closed[0].endswith("closed: client connection reset (Broken pipe); target connection aborted")


@pytest.mark.parametrize("name", ["db\udcff", "bad name", "x" * 254])
def test_a_server_name_no_server_accepts_is_refused_when_the_tunnel_is_built(pki_dir, name: str) -> None:
    """A --server-name the server would refuse (here a lone surrogate, as a non-UTF-8 byte on the command line
    becomes, a space, a name over 253 characters) stops the tunnel at start-up, not each connection later."""
    with pytest.raises(ConfigError, match=r"server_name .* is neither a DNS name \(1-253 letters, digits, '-', '_' "
                                          r"and '\.'\) nor an IP address; give the name the server certificate is "
                                          r"issued for \(--server-name, or the target's host\)"):
        Tunnel(client_spec(pki_dir, "127.0.0.1:1", server_name=name))


@pytest.mark.parametrize("side", ["server", "client"])
async def test_connect_retries_reach_a_target_that_starts_listening_late(pki_dir, side: str) -> None:
    """--connect-retries retries a refused connect on both loops (uvloop creates the protocol before it
    connects, so a refused attempt must not count as a protocol already handed out)."""
    port = free_port()
    retry = {"connect_retries": 50, "retry_delay": 0.1}
    if side == "server":  # the server tunnel's target starts late
        context = pair(pki_dir, f"127.0.0.1:{port}", server=retry)
    else:  # the client tunnel's target, a server tunnel, starts late
        context = running(client_spec(pki_dir, f"127.0.0.1:{port}", **retry))
    async with context as tunnels:
        reader, writer = await asyncio.open_connection("127.0.0.1", tunnels[-1].port)
        writer.write(b"hello")
        writer.write_eof()
        await asyncio.sleep(0.5)  # several refused attempts
        if side == "server":
            late = await asyncio.start_server(echo_then_bye, "127.0.0.1", port)
            async with late:
                assert await asyncio.wait_for(reader.read(), 20) == b"helloBYE"
        else:
            async with (
                plain_target(echo_then_bye) as target_port,
                running(server_spec(pki_dir, f"127.0.0.1:{target_port}", listen=f"127.0.0.1:{port}")),
            ):
                assert await asyncio.wait_for(reader.read(), 20) == b"helloBYE"
        writer.close()


async def test_relay_run_as_a_library_between_two_plain_connections() -> None:
    """Relay is public: its ends are the protocols of two connections the owner makes, run() starts it and
    returns why it ended; cancelling a run() stops the relay (both connections reset)."""
    loop = asyncio.get_running_loop()

    async def wire(relay: Relay, target_port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        accepted = loop.create_future()
        front = await loop.create_server(lambda: (accepted.set_result(None), relay.client)[1], "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", front.sockets[0].getsockname()[1])
        await accepted
        front.close()
        await loop.create_connection(lambda: relay.target, "127.0.0.1", target_port)
        return reader, writer

    async with plain_target(echo_then_bye) as port:
        relay = Relay(client_secure=False)
        reader, writer = await wire(relay, port)
        writer.write(b"hello")  # read by the client end before the relay starts (reading is paused)
        writer.write_eof()
        reason = await asyncio.wait_for(relay.run(), 10)
        assert reason == "client closed first, then the other side"
        assert await reader.read() == b"helloBYE" and (relay.up, relay.down) == (5, 8)
        writer.close()

        relay = Relay(client_secure=False)
        reader, writer = await wire(relay, port)
        running_relay = asyncio.ensure_future(relay.run())
        await asyncio.sleep(0)
        running_relay.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running_relay
        assert relay.reason == "cancelled" and relay.failed
        assert isinstance(await outcome_of_reading(reader), ConnectionResetError)
        writer.close()
