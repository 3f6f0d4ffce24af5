"""Session resumption over real loopback sockets: tickets, expiry, fleets behind a balancer, rotation, replay."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rawpeer import frame_types

import securechan
from securechan import pki
from securechan.acl import AccessList
from securechan.connection import Connection
from securechan.errors import IllegalParameterError, UnexpectedMessageError
from securechan.frames import HEADER_LEN, FrameType, pack_map, unpack_map
from securechan.handshake import handshake_frame
from securechan.messages import NewTicket, ServerHello
from securechan.ticketcli import write_key_file
from securechan.tickets import (
    CachedSession,
    ServerTickets,
    TicketContents,
    TicketStatus,
    new_key_secret,
    read_key_file,
)

HOST = "127.0.0.1"


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def talk(port: int, config: securechan.ClientConfig, name: str = "localhost") -> securechan.SessionInfo:
    """Connect, prove the channel carries data both ways, close cleanly; return the session info.

    The echo round trip also guarantees the server's NewTicket (sent right after its side of
    the handshake) has arrived before the connection is closed.
    """
    reader, writer = await securechan.open_connection(HOST, port, config=config, server_name=name)
    try:
        payload = os.urandom(3000)
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        return writer.get_extra_info("securechan")
    finally:
        writer.close()
        await writer.wait_closed()


class Balancer:
    """A round-robin TCP load balancer on 127.0.0.1: connection i goes to backend ``order[i]``."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.next: int = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    def route_to(self, index: int) -> None:
        self.next = index

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        backend = self.backends[self.next % len(self.backends)]
        self.next += 1
        up_r, up_w = await asyncio.open_connection(HOST, backend)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (ConnectionError, OSError):
                pass

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))
        for w in (writer, up_w):
            w.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def balancer() -> AsyncIterator[Callable[[list[int]], Awaitable[Balancer]]]:
    made: list[Balancer] = []

    async def make(backends: list[int]) -> Balancer:
        b = Balancer(backends)
        await b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        await b.close()


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.keys"
    write_key_file(str(path), [new_key_secret()])
    return path


def only_session(config: securechan.ClientConfig, port: int, name: str = "localhost"):
    sessions = config.session_cache.peek((HOST, port, name))
    assert len(sessions) == 1
    return sessions[0]


# -- the basic promise --------------------------------------------------------------------


async def test_resume_success(serve, pki_dir) -> None:
    server_cfg = pki_dir.server_config()
    client_cfg = pki_dir.client_config()
    _, port = await serve(echo, server_cfg)
    first = await talk(port, client_cfg)
    assert not first.resumed
    second = await talk(port, client_cfg)
    third = await talk(port, client_cfg)
    assert second.resumed and third.resumed
    # The resumed session still names the server that was verified in the full handshake.
    assert second.peer_certificate == first.peer_certificate
    assert second.suite == first.suite and second.version == first.version
    assert server_cfg.session_stats.resumed == 2 and server_cfg.session_stats.full == 1
    assert server_cfg.session_stats.tickets == 3
    assert client_cfg.session_stats.resumed == 2 and client_cfg.session_stats.full == 1
    assert not client_cfg.session_stats.fallbacks and not server_cfg.session_stats.fallbacks


async def test_resumed_session_has_fresh_keys(serve, pki_dir) -> None:
    """Both ends agree on the exporter, and it differs between the original and the resumed session."""
    server_side: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server_side.append(writer.get_extra_info("securechan").export_keying_material(b"test", b"", 32))
        await echo(reader, writer)

    client_cfg = pki_dir.client_config()
    _, port = await serve(handler, pki_dir.server_config())
    exports = []
    for _ in range(2):
        reader, writer = await securechan.open_connection(HOST, port, config=client_cfg, server_name="localhost")
        writer.write(b"x")
        await reader.readexactly(1)
        exports.append(writer.get_extra_info("securechan").export_keying_material(b"test", b"", 32))
        writer.close()
        await writer.wait_closed()
    assert exports == server_side
    assert exports[0] != exports[1]


async def test_fresh_config_starts_cold(serve, pki_dir) -> None:
    _, port = await serve(echo, pki_dir.server_config())
    assert not (await talk(port, pki_dir.client_config())).resumed
    assert not (await talk(port, pki_dir.client_config())).resumed


async def test_cache_is_keyed_by_server_name(serve, pki_dir) -> None:
    client_cfg = pki_dir.client_config()
    _, port = await serve(echo, pki_dir.server_config())
    await talk(port, client_cfg, name="localhost")
    assert not (await talk(port, client_cfg, name="127.0.0.1")).resumed
    assert (await talk(port, client_cfg, name="localhost")).resumed


async def test_resume_disabled_on_client(serve, pki_dir) -> None:
    server_cfg = pki_dir.server_config()
    client_cfg = pki_dir.client_config(resume=False)
    _, port = await serve(echo, server_cfg)
    await talk(port, client_cfg)
    assert not (await talk(port, client_cfg)).resumed
    assert len(client_cfg.session_cache) == 0
    assert server_cfg.session_stats.full == 2


async def test_server_without_tickets_issues_none(serve, pki_dir) -> None:
    client_cfg = pki_dir.client_config()
    _, port = await serve(echo, pki_dir.server_config(tickets=False))
    await talk(port, client_cfg)
    assert len(client_cfg.session_cache) == 0
    assert not (await talk(port, client_cfg)).resumed


async def test_unix_socket_resumes(pki_dir, tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    client_cfg = pki_dir.client_config()
    server = await securechan.start_unix_server(echo, path, config=pki_dir.server_config())
    try:
        infos = []
        for _ in range(2):
            reader, writer = await securechan.open_unix_connection(path, config=client_cfg, server_name="localhost")
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            infos.append(writer.get_extra_info("securechan").resumed)
            writer.close()
            await writer.wait_closed()
        assert infos == [False, True]
    finally:
        server.close()
        await server.wait_closed()


# -- expiry -------------------------------------------------------------------------------


async def test_expired_ticket_falls_back_to_full_handshake(serve, pki_dir, caplog) -> None:
    server_cfg = pki_dir.server_config(ticket_lifetime=600)
    client_cfg = pki_dir.client_config()
    _, port = await serve(echo, server_cfg)
    await talk(port, client_cfg)
    tickets = server_cfg.ticket_keys
    assert tickets is not None
    tickets.clock = lambda: time.time() + 601  # the server's clock is past the ticket's expiry
    with caplog.at_level(logging.DEBUG, logger="securechan"):
        info = await talk(port, client_cfg)
    assert not info.resumed
    assert server_cfg.session_stats.fallbacks == {"expired": 1}
    assert client_cfg.session_stats.fallbacks == {"expired": 1}
    assert "falling back to a full handshake" in caplog.text
    # The full handshake brought a fresh ticket, which resumes.
    assert (await talk(port, client_cfg)).resumed


async def test_client_stops_offering_before_the_server_would_refuse(serve, pki_dir) -> None:
    server_cfg = pki_dir.server_config(ticket_lifetime=600)
    client_cfg = pki_dir.client_config()
    _, port = await serve(echo, server_cfg)
    await talk(port, client_cfg)
    # 580 s later the server would still accept it (lifetime 600 s), but it is inside the client's margin.
    client_cfg.session_cache.clock = lambda: time.monotonic() + 580
    assert not (await talk(port, client_cfg)).resumed
    assert not server_cfg.session_stats.fallbacks  # never offered, so never refused
    assert server_cfg.session_stats.full == 2


# -- fleets ---------------------------------------------------------------------------------


async def test_ticket_from_another_server_with_the_same_key_file_resumes(serve, pki_dir, balancer, key_file) -> None:
    a_cfg = pki_dir.server_config(ticket_key_file=key_file)
    b_cfg = pki_dir.server_config(ticket_key_file=key_file)
    _, a_port = await serve(echo, a_cfg)
    _, b_port = await serve(echo, b_cfg)
    lb = await balancer([a_port, b_port])
    client_cfg = pki_dir.client_config()
    assert not (await talk(lb.port, client_cfg)).resumed  # served by A
    assert (await talk(lb.port, client_cfg)).resumed  # served by B, with A's ticket
    assert (await talk(lb.port, client_cfg)).resumed  # A again, with B's ticket
    assert a_cfg.session_stats.full == 1 and a_cfg.session_stats.resumed == 1
    assert b_cfg.session_stats.resumed == 1


async def test_ticket_from_a_server_with_another_key_falls_back(serve, pki_dir, balancer, tmp_path) -> None:
    other = tmp_path / "other.keys"
    write_key_file(str(other), [new_key_secret()])
    for a_cfg, b_cfg in [
        (pki_dir.server_config(), pki_dir.server_config()),  # two in-memory keys
        (pki_dir.server_config(ticket_key_file=other), pki_dir.server_config()),
    ]:
        _, a_port = await serve(echo, a_cfg)
        _, b_port = await serve(echo, b_cfg)
        lb = await balancer([a_port, b_port])
        client_cfg = pki_dir.client_config()
        await talk(lb.port, client_cfg)
        info = await talk(lb.port, client_cfg)
        assert not info.resumed
        assert b_cfg.session_stats.fallbacks == {"invalid": 1}
        assert client_cfg.session_stats.fallbacks == {"invalid": 1}


async def test_ticket_to_a_server_that_takes_none_falls_back(serve, pki_dir, balancer) -> None:
    a_cfg, b_cfg = pki_dir.server_config(), pki_dir.server_config(tickets=False)
    _, a_port = await serve(echo, a_cfg)
    _, b_port = await serve(echo, b_cfg)
    lb = await balancer([a_port, b_port])
    client_cfg = pki_dir.client_config()
    await talk(lb.port, client_cfg)
    assert not (await talk(lb.port, client_cfg)).resumed
    assert client_cfg.session_stats.fallbacks == {"disabled": 1}


async def test_ticket_for_a_suite_the_server_no_longer_allows_falls_back(serve, pki_dir, balancer, key_file) -> None:
    a_cfg = pki_dir.server_config(ticket_key_file=key_file, suites=["AES-256-GCM"])
    b_cfg = pki_dir.server_config(ticket_key_file=key_file, suites=["CHACHA20-POLY1305"])
    _, a_port = await serve(echo, a_cfg)
    _, b_port = await serve(echo, b_cfg)
    lb = await balancer([a_port, b_port])
    client_cfg = pki_dir.client_config()
    await talk(lb.port, client_cfg)
    info = await talk(lb.port, client_cfg)
    assert not info.resumed and info.suite == "CHACHA20-POLY1305"
    assert b_cfg.session_stats.fallbacks == {"mismatch": 1}


async def test_ticket_for_another_server_name_falls_back(serve, pki_dir) -> None:
    server_cfg = pki_dir.server_config()
    client_cfg = pki_dir.client_config()
    _, port = await serve(echo, server_cfg)
    await talk(port, client_cfg, name="localhost")
    session = client_cfg.session_cache.take((HOST, port, "localhost"))
    assert session is not None
    client_cfg.session_cache.restore((HOST, port, "127.0.0.1"), session)  # misfiled under another name
    assert not (await talk(port, client_cfg, name="127.0.0.1")).resumed
    assert server_cfg.session_stats.fallbacks == {"mismatch": 1}


# -- tampering ------------------------------------------------------------------------------


async def _served_with_a_ticket(
    serve, pki_dir
) -> tuple[securechan.ServerConfig, securechan.ClientConfig, int, tuple[str, int, str], CachedSession]:
    """A server, and a client that talked to it once and took the ticket it got out of its cache."""
    server_cfg = pki_dir.server_config()
    client_cfg = pki_dir.client_config()
    _, port = await serve(echo, server_cfg)
    await talk(port, client_cfg)
    key = (HOST, port, "localhost")
    session = client_cfg.session_cache.take(key)
    assert session is not None
    return server_cfg, client_cfg, port, key, session


@pytest.mark.parametrize("where", ["format", "key_id", "nonce", "body", "tag", "truncate", "extend"])
async def test_tampered_ticket_falls_back(serve, pki_dir, where: str) -> None:
    server_cfg, client_cfg, port, key, session = await _served_with_a_ticket(serve, pki_dir)
    t = bytearray(session.ticket)
    if where == "truncate":
        t = t[:20]
    elif where == "extend":
        t += b"\x00"
    else:
        pos = {"format": 0, "key_id": 3, "nonce": 12, "body": 40, "tag": len(t) - 1}[where]
        t[pos] ^= 0x01
    client_cfg.session_cache.restore(key, dataclasses.replace(session, ticket=bytes(t)))
    info = await talk(port, client_cfg)
    assert not info.resumed
    assert server_cfg.session_stats.fallbacks == {"invalid": 1}
    assert (await talk(port, client_cfg)).resumed  # the server is unharmed and issued a good ticket


async def test_wrong_psk_is_caught_by_the_binder(serve, pki_dir) -> None:
    """A client holding someone else's ticket but not its PSK gets a full handshake, not a session."""
    server_cfg, client_cfg, port, key, session = await _served_with_a_ticket(serve, pki_dir)
    client_cfg.session_cache.restore(key, dataclasses.replace(session, psk=bytes(32)))
    assert not (await talk(port, client_cfg)).resumed
    assert server_cfg.session_stats.fallbacks == {"invalid": 1}


# -- rotation --------------------------------------------------------------------------------


async def test_in_memory_key_rotation(serve, pki_dir) -> None:
    """Keys rotate on schedule; a ticket sealed just before a rotation still resumes after it."""
    server_cfg = pki_dir.server_config(ticket_rotation=3600, ticket_lifetime=1800)
    client_cfg = pki_dir.client_config()
    _, port = await serve(echo, server_cfg)
    tickets = server_cfg.ticket_keys
    assert tickets is not None
    start = time.time()
    await talk(port, client_cfg)  # the first key is made now
    for offset in (1500, 3000):  # resume every 1500 s: each connection brings a fresh ticket under key 1
        tickets.clock = lambda offset=offset: start + offset
        assert (await talk(port, client_cfg)).resumed
    assert tickets.ring.rotations == 0
    tickets.clock = lambda: start + 3700  # rotated: key 2 seals, key 1 still opens the ticket from +3000
    assert (await talk(port, client_cfg)).resumed
    assert tickets.ring.rotations == 1
    ids = [k.key_id for k in tickets.ring.current()]
    assert len(ids) == 2
    tickets.clock = lambda: start + 3700 + 3601  # the next rotation drops key 1 and keeps key 2
    assert [k.key_id for k in tickets.ring.current()][1:] == ids[:1]
    tickets.clock = lambda: start + 100_000  # idle for many periods: no old key is kept at all
    assert len(tickets.ring.current()) == 1
    assert not server_cfg.session_stats.fallbacks


async def test_manual_rotation_keeps_previous_key_for_one_rotation(serve, pki_dir) -> None:
    server_cfg = pki_dir.server_config()
    client_cfg = pki_dir.client_config()
    _, port = await serve(echo, server_cfg)
    key = (HOST, port, "localhost")
    tickets = server_cfg.ticket_keys
    assert tickets is not None
    await talk(port, client_cfg)
    old = only_session(client_cfg, port)
    tickets.ring.rotate()
    assert (await talk(port, client_cfg)).resumed
    tickets.ring.rotate()
    client_cfg.session_cache.restore(key, old)
    assert not (await talk(port, client_cfg)).resumed
    assert server_cfg.session_stats.fallbacks == {"invalid": 1}


async def test_key_file_rotation_is_picked_up(serve, pki_dir, key_file: Path) -> None:
    server_cfg = pki_dir.server_config(ticket_key_file=key_file)
    client_cfg = pki_dir.client_config()
    _, port = await serve(echo, server_cfg)
    key = (HOST, port, "localhost")
    await talk(port, client_cfg)
    old = only_session(client_cfg, port)
    run_cli("ticket-key", "rotate", str(key_file))
    assert len(read_key_file(key_file)[0]) == 2
    assert (await talk(port, client_cfg)).resumed  # sealed under the previous key: still opens
    assert server_cfg.ticket_keys is not None and server_cfg.ticket_keys.ring.rotations == 1
    new = only_session(client_cfg, port)
    run_cli("ticket-key", "rotate", str(key_file))
    client_cfg.session_cache.restore(key, old)
    assert not (await talk(port, client_cfg)).resumed  # two rotations old: refused
    client_cfg.session_cache.restore(key, new)
    assert (await talk(port, client_cfg)).resumed  # one rotation old: accepted


async def test_broken_key_file_keeps_the_loaded_keys(serve, pki_dir, key_file: Path, caplog) -> None:
    server_cfg = pki_dir.server_config(ticket_key_file=key_file)
    client_cfg = pki_dir.client_config()
    _, port = await serve(echo, server_cfg)
    await talk(port, client_cfg)
    key_file.write_text("not a key\n")
    with caplog.at_level(logging.WARNING, logger="securechan"):
        assert (await talk(port, client_cfg)).resumed
    assert "keeping the keys loaded before" in caplog.text


# -- anti-replay -----------------------------------------------------------------------------


@pytest.mark.parametrize("single_use", [True, False])
async def test_replay_of_a_one_use_ticket(serve, pki_dir, single_use: bool) -> None:
    server_cfg = pki_dir.server_config(ticket_single_use=single_use)
    client_cfg = pki_dir.client_config()
    _, port = await serve(echo, server_cfg)
    key = (HOST, port, "localhost")
    await talk(port, client_cfg)
    copy = only_session(client_cfg, port)
    assert (await talk(port, client_cfg)).resumed  # first use
    client_cfg.session_cache.clear()
    client_cfg.session_cache.restore(key, copy)  # present the same ticket again
    replayed = await talk(port, client_cfg)
    if single_use:
        assert not replayed.resumed
        assert server_cfg.session_stats.fallbacks == {"replayed": 1}
        assert client_cfg.session_stats.fallbacks == {"replayed": 1}
    else:
        assert replayed.resumed
        assert not server_cfg.session_stats.fallbacks


async def test_single_use_survives_a_reload(serve, pki_dir) -> None:
    """reload_server keeps the ticket keys and the single-use memory when the ticket settings are unchanged."""
    server_cfg = pki_dir.server_config(ticket_single_use=True)
    client_cfg = pki_dir.client_config()
    server, port = await serve(echo, server_cfg)
    key = (HOST, port, "localhost")
    await talk(port, client_cfg)
    copy = only_session(client_cfg, port)
    assert (await talk(port, client_cfg)).resumed  # first use
    reloaded = pki_dir.server_config(ticket_single_use=True)
    securechan.reload_server(server, reloaded)
    client_cfg.session_cache.clear()
    client_cfg.session_cache.restore(key, copy)
    assert not (await talk(port, client_cfg)).resumed  # the replay is still refused after the reload
    assert reloaded.session_stats.fallbacks == {"replayed": 1}
    assert (await talk(port, client_cfg)).resumed  # and a fresh ticket from before the reload's keys works


async def test_single_use_survives_a_reload_that_changes_other_ticket_settings(serve, pki_dir, key_file) -> None:
    """Same key file (spelled differently), new lifetime: old tickets still open, so their use is remembered."""
    server_cfg = pki_dir.server_config(ticket_single_use=True, ticket_key_file=key_file)
    client_cfg = pki_dir.client_config()
    server, port = await serve(echo, server_cfg)
    key = (HOST, port, "localhost")
    await talk(port, client_cfg)
    copy = only_session(client_cfg, port)
    assert (await talk(port, client_cfg)).resumed
    spelled_differently = str(key_file.parent / "." / key_file.name)
    securechan.reload_server(server, pki_dir.server_config(
        ticket_single_use=True, ticket_key_file=spelled_differently, ticket_lifetime=900))
    client_cfg.session_cache.clear()
    client_cfg.session_cache.restore(key, copy)
    assert not (await talk(port, client_cfg)).resumed


def test_single_use_memory_is_ordered_by_expiry(monkeypatch) -> None:
    """A long-lived ticket does not keep expired short-lived ids in memory."""
    from securechan import tickets as t

    now = [1_000.0]
    store = t.ServerTickets(lifetime=1000, rotation=3600, single_use=True, clock=lambda: now[0])

    def use(lifetime: float) -> None:
        store.lifetime = lifetime
        sealed = store.seal(t.TicketContents(psk=bytes(32), version=1, suite=1, server_name=None, client_chain=()))
        assert sealed is not None
        contents, _ = store.open(sealed)
        assert contents is not None and store.consume(sealed, contents)

    use(1000)  # long-lived, remembered first
    for _ in range(5):
        use(10)
    now[0] += 11
    use(10)  # the five short ones have expired and are gone, although the long one came first
    assert len(store._seen) == 2


def test_client_cache_bounds_bytes(monkeypatch) -> None:
    from securechan import tickets as t

    monkeypatch.setattr(t, "MAX_CACHE_BYTES", 10_000)
    cache = t.TicketCache()
    for i in range(40):
        cache.put(("host", i, None), b"x" * 1000, bytes(32), version=1, suite=1, server_chain=(), lifetime=600)
    assert len(cache) == 10 and cache._bytes == 10_000
    assert cache.peek(("host", 39, None)) and not cache.peek(("host", 0, None))  # the oldest servers went first
    assert cache.take(("host", 39, None)) is not None and cache._bytes == 9_000


def test_single_use_memory_evicts_expired_ids_and_stays_bounded(monkeypatch) -> None:
    from securechan import tickets as t

    now = [1_000.0]
    monkeypatch.setattr(t, "MAX_SEEN_TICKETS", 3)
    store = t.ServerTickets(lifetime=10, rotation=3600, single_use=True, clock=lambda: now[0])

    def ticket() -> tuple[bytes, t.TicketContents]:
        sealed = store.seal(t.TicketContents(psk=bytes(32), version=1, suite=1, server_name=None, client_chain=()))
        assert sealed is not None
        contents, status = store.open(sealed)
        assert status is t.TicketStatus.ACCEPTED and contents is not None
        return sealed, contents

    first = [ticket() for _ in range(3)]
    assert all(store.consume(*tk) for tk in first)
    assert not store.consume(*first[0])  # replay
    assert not store.consume(*ticket())  # full: refused (a full handshake), never forgotten early
    now[0] += 11  # the remembered tickets expire and are dropped from the front
    assert store.consume(*ticket())
    assert len(store._seen) == 1


# -- peer identity ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory, pki_dir) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("alice")
    cert, key = pki.issue_cert(pki_dir.ca, "alice", client=True, key_type="ec-p256")
    crt, k = d / "alice.crt", d / "alice.key"
    crt.write_bytes(pki.cert_pem(cert))
    k.write_bytes(pki.key_pem(key))
    os.chmod(k, 0o600)
    return crt, k


async def test_resumed_session_carries_the_original_client_identity(serve, pki_dir, alice, key_file, balancer) -> None:
    seen: list[tuple[bool, str | None]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = writer.get_extra_info("securechan")
        cert = info.peer_certificate
        cn = cert.subject.rfc4514_string() if cert is not None else None
        seen.append((info.resumed, cn))
        await echo(reader, writer)

    admit = pki_dir.server_config(client_cafile=pki_dir.ca_file, allow=AccessList(cn=["alice"]),
                                  ticket_key_file=key_file)
    deny = pki_dir.server_config(client_cafile=pki_dir.ca_file, allow=AccessList(cn=["bob"]),
                                 ticket_key_file=key_file)
    _, admit_port = await serve(handler, admit)
    _, deny_port = await serve(handler, deny)
    lb = await balancer([admit_port, admit_port, deny_port])
    client_cfg = pki_dir.client_config(certfile=alice[0], keyfile=alice[1])
    await talk(lb.port, client_cfg)
    await talk(lb.port, client_cfg)
    assert seen == [(False, "CN=alice"), (True, "CN=alice")]
    # A server whose access list does not admit alice re-checks the identity in the ticket: it
    # does not resume, and the full handshake then refuses alice with the usual error.
    with pytest.raises(securechan.AccessDeniedError):
        await talk(lb.port, client_cfg)
    assert deny.session_stats.fallbacks == {"mismatch": 1}
    assert deny.session_stats.resumed == 0


async def test_ticket_without_identity_does_not_resume_where_one_is_required(
    serve, pki_dir, alice, key_file, balancer
) -> None:
    open_cfg = pki_dir.server_config(ticket_key_file=key_file)
    strict = pki_dir.server_config(client_cafile=pki_dir.ca_file, ticket_key_file=key_file)
    _, open_port = await serve(echo, open_cfg)
    _, strict_port = await serve(echo, strict)
    lb = await balancer([open_port, strict_port])
    client_cfg = pki_dir.client_config(certfile=alice[0], keyfile=alice[1])
    await talk(lb.port, client_cfg)  # the open server asks for no certificate: its ticket names nobody
    info = await talk(lb.port, client_cfg)
    assert not info.resumed and info.peer_certificate is not None
    assert strict.session_stats.fallbacks == {"mismatch": 1}


# -- protocol edges through the sans-IO connection ------------------------------------------------


def test_unsolicited_resumption_is_refused(pki_dir) -> None:
    client = Connection(pki_dir.client_config(), server_name="localhost")
    client.data_to_send()
    sh = ServerHello(version=1, random=os.urandom(32), suite=1, key_wrap=1, x25519=os.urandom(32),
                     max_record=65536, resumed=True)
    with pytest.raises(IllegalParameterError, match="did not offer"):
        client.receive_data(handshake_frame(sh))


def test_client_may_not_send_tickets(pki_dir) -> None:
    client = Connection(pki_dir.client_config(), server_name="localhost")
    server = Connection(pki_dir.server_config())
    while not (client.handshake_complete and server.handshake_complete):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    assert client._sealer is not None
    bogus = NewTicket(ticket=b"t" * 40, lifetime=60, nonce=b"n" * 16)
    record = client._sealer.seal(FrameType.CONTROL, pack_map(bogus.encode()))
    with pytest.raises(UnexpectedMessageError, match="does not send session tickets"):
        server.receive_data(record)


def _resumable_pair(pki_dir) -> tuple[securechan.ClientConfig, securechan.ServerConfig]:
    """Configs after one full handshake over the sans-IO connection: the client holds one ticket."""
    client_cfg, server_cfg = pki_dir.client_config(), pki_dir.server_config()
    client = Connection(client_cfg, server_name="localhost", resume_key=("h", 1, "localhost"))
    server = Connection(server_cfg)
    while not (client.handshake_complete and server.handshake_complete):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    assert client_cfg.session_stats.tickets == 1
    return client_cfg, server_cfg


def test_a_resumed_servers_first_flight_carries_the_ticket(pki_dir) -> None:
    """ServerHello, Finished and the new ticket leave together (§13.4): the client holds its next ticket
    when its handshake completes, before the server has verified the client's Finished."""
    client_cfg, server_cfg = _resumable_pair(pki_dir)
    client = Connection(client_cfg, server_name="localhost", resume_key=("h", 1, "localhost"))
    server = Connection(server_cfg)
    server.receive_data(client.data_to_send())
    flight = server.data_to_send()
    assert frame_types(flight) == [FrameType.HANDSHAKE, FrameType.HANDSHAKE, FrameType.CONTROL]
    # Nothing else may be sent before the client's Finished verified: no 0.5-RTT application data.
    assert not server.handshake_complete and not server.can_send and server.session is None
    with pytest.raises(securechan.ConnectionClosedError, match="before the handshake"):
        server.send_data(b"early")
    client.receive_data(flight)
    assert client.handshake_complete and client.session is not None and client.session.resumed
    assert client_cfg.session_stats.tickets == 2  # the new ticket, stored
    assert len(client_cfg.session_cache.peek(("h", 1, "localhost"))) == 1
    server.receive_data(client.data_to_send())
    assert server.handshake_complete and server.can_send and server.session is not None and server.session.resumed
    assert server.data_to_send() == b""  # the ticket is not sent a second time
    assert server_cfg.session_stats.resumed == 1


def test_a_resumed_handshake_failing_at_the_clients_finished_sends_a_plaintext_alert(pki_dir) -> None:
    """The server's keys exist before the client's Finished verified, yet a failure there is still an
    unprotected alert, as in every handshake failure (a close before it is user_canceled), and the keys
    it already holds are wiped."""
    client_cfg, server_cfg = _resumable_pair(pki_dir)
    for how in ("tampered finished", "server closes", "server times out"):
        client = Connection(client_cfg, server_name="localhost", resume_key=("h", 1, "localhost"))
        server = Connection(server_cfg)
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        assert server._sealer is not None and server._sealer._aead is not None  # keys installed
        if how == "server closes":
            server.close()
        elif how == "server times out":
            server.abort(securechan.HandshakeTimeoutError("the handshake did not complete"))
        else:
            fin = bytearray(client.data_to_send())
            fin[-1] ^= 1  # the last byte of the Finished MAC
            with pytest.raises(securechan.HandshakeAuthError, match="resumed handshake"):
                server.receive_data(bytes(fin))
        out = server.data_to_send()
        assert frame_types(out) == [FrameType.ALERT]  # not a protected record
        assert server._sealer._aead is None and server._opener is not None and server._opener._aead is None
        assert server._hs is None and server._pending_session is None and server.session is None
        if how != "tampered finished":
            with pytest.raises((securechan.UserCanceledError, securechan.HandshakeTimeoutError)):
                client.receive_data(out)


_FUZZ_TICKETS = ServerTickets(lifetime=60, rotation=3600)
_GOOD_TICKET = _FUZZ_TICKETS.seal(TicketContents(psk=bytes(32), version=1, suite=1, server_name="x", client_chain=()))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_open_as_a_ticket(data: bytes) -> None:
    assert _FUZZ_TICKETS.open(data) == (None, TicketStatus.INVALID)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_invalidates_a_ticket(pos: int, mask: int) -> None:
    assert _GOOD_TICKET is not None
    t = bytearray(_GOOD_TICKET)
    t[pos % len(t)] ^= mask
    assert _FUZZ_TICKETS.open(bytes(t)) == (None, TicketStatus.INVALID)


def test_ticket_status_codes_are_stable() -> None:
    assert {s.name: int(s) for s in TicketStatus} == {
        "ACCEPTED": 0, "INVALID": 1, "EXPIRED": 2, "REPLAYED": 3, "MISMATCH": 4, "DISABLED": 5,
    }


# -- configuration and the key-file command ---------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "securechan", *args], capture_output=True, text=True, check=False)


def test_cli_new_writes_a_private_file_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k"
    done = run_cli("ticket-key", "new", "--out", str(path))
    assert done.returncode == 0, done.stderr
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert len(read_key_file(path)[0]) == 1
    again = run_cli("ticket-key", "new", "--out", str(path))
    assert again.returncode == 1 and "already exists" in again.stderr
    shown = run_cli("ticket-key", "show", str(path))
    assert shown.returncode == 0 and "seals and opens" in shown.stdout
    assert read_key_file(path)[0][0].hex() not in shown.stdout  # ids, never keys


def test_cli_rotate_keeps_previous_keys(tmp_path: Path) -> None:
    path = tmp_path / "k"
    run_cli("ticket-key", "new", "--out", str(path))
    first = read_key_file(path)[0]
    assert run_cli("ticket-key", "rotate", str(path)).returncode == 0
    second = read_key_file(path)[0]
    assert len(second) == 2 and second[1] == first[0] and second[0] != first[0]
    assert run_cli("ticket-key", "rotate", "--keep", "0", str(path)).returncode == 0
    assert len(read_key_file(path)[0]) == 1
    assert os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        (None, 0o600, "does not exist"),
        ("", 0o600, "holds no key"),
        ("hello\n", 0o600, "is not a ticket key"),
        ("sc1-ticket-key:AAAA\n", 0o600, "must be 32 bytes"),
        ("sc1-ticket-key:!!!!\n", 0o600, "not valid base64url"),
        ("VALID", 0o666, "writable by other users"),
        ("VALID", 0o620, "writable by other users"),
        ("FIFO", 0o600, "not a regular file"),
        ("SOCKET", 0o600, "cannot be read"),
        ("OTHER OWNER", 0o600, "belongs to uid 4242"),
    ],
)
def test_bad_key_files_are_config_errors(pki_dir, tmp_path: Path, content, mode, message) -> None:
    path = tmp_path / "k"
    if content == "VALID":
        write_key_file(str(path), [new_key_secret()])
    elif content == "FIFO":
        os.mkfifo(path)  # opened without blocking, then refused
    elif content == "SOCKET":
        import socket

        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))  # opening a socket fails with ENXIO: a ConfigError, not an OSError
        listener.close()
    elif content == "OTHER OWNER":
        if os.geteuid() != 0:
            pytest.skip("changing a file's owner needs root")
        write_key_file(str(path), [new_key_secret()])
        os.chown(path, 4242, -1)
    elif content is not None:
        path.write_text(content)
    if content is not None:
        os.chmod(path, mode)
    with pytest.raises(securechan.ConfigError, match=message):
        pki_dir.server_config(ticket_key_file=path)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"ticket_lifetime": 7200, "ticket_rotation": 3600}, "would outlive its key"),
        ({"ticket_lifetime": 0}, "ticket_lifetime must be between"),
        ({"ticket_rotation": 0.5, "ticket_lifetime": 0.5}, "ticket_lifetime must be between"),
        ({"tickets": False, "ticket_key_file": "x"}, "drop one of them"),
    ],
)
def test_bad_ticket_settings_are_config_errors(pki_dir, kw, message) -> None:
    with pytest.raises(securechan.ConfigError, match=message):
        pki_dir.server_config(**kw)


# -- hostile server hellos and tickets a fleet peer sealed -------------------------------------


def _offering_client(pki_dir) -> tuple[Connection, securechan.ServerConfig, securechan.ClientConfig]:
    """A client whose ClientHello offers a ticket (suite 1), and the server config that issued it."""
    client_cfg, server_cfg = _resumable_pair(pki_dir)
    (session,) = client_cfg.session_cache.peek(("h", 1, "localhost"))
    assert session.suite == 1
    client = Connection(client_cfg, server_name="localhost", resume_key=("h", 1, "localhost"))
    assert b"binder" in client.data_to_send()
    return client, server_cfg, client_cfg


def _server_hello(**fields: object) -> bytes:
    values: dict = dict(version=1, random=os.urandom(32), suite=1, key_wrap=1, x25519=os.urandom(32), max_record=65536)
    values.update(fields)
    return handshake_frame(ServerHello(**values))


@pytest.mark.parametrize("fields", [{"suite": 2}, {"client_auth": (0x0807,)}], ids=["other-suite", "client-auth"])
def test_resumed_server_hello_that_does_not_match_the_ticket_is_refused(pki_dir, fields: dict) -> None:
    client, _, _ = _offering_client(pki_dir)
    with pytest.raises(IllegalParameterError, match="does not match the ticket"):
        client.receive_data(_server_hello(resumed=True, **fields))
    assert client.state is securechan.State.FAILED and client.session is None
    out = client.data_to_send()
    assert frame_types(out) == [FrameType.ALERT]
    assert unpack_map(out[HEADER_LEN:], 64)["code"] == securechan.AlertCode.ILLEGAL_PARAMETER


def test_unknown_ticket_status_is_an_ordinary_refusal(pki_dir) -> None:
    """A ticket_status code from a later version is counted as 'invalid' and the full handshake goes on."""
    client, server_cfg, client_cfg = _offering_client(pki_dir)
    assert client.receive_data(_server_hello(certificates=server_cfg._chain_der, ticket_status=200)) == []
    assert client_cfg.session_stats.fallbacks == {"invalid": 1}
    assert client.state is securechan.State.CLIENT_WAIT_FINISHED
    assert frame_types(client.data_to_send()) == [FrameType.HANDSHAKE, FrameType.HANDSHAKE]  # KeyExchange, Finished


def _seal_raw(server_cfg: securechan.ServerConfig, plaintext: bytes) -> bytes:
    """Seal ``plaintext`` exactly as ServerTickets.seal would (as a fleet peer sharing the key could)."""
    from securechan.tickets import TICKET_FORMAT

    assert server_cfg.ticket_keys is not None
    key = server_cfg.ticket_keys.ring.current()[0]
    head, salt = bytes([TICKET_FORMAT]) + key.key_id, os.urandom(16)
    return head + salt + key.seal(salt, plaintext, head)


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({}, None),  # the control: a well-formed ticket sealed this way resumes
        ({"extension_from_a_later_version": 1}, "invalid"),
        ({"psk": b"p" * 31}, "invalid"),
        ({"server_name": b"localhost"}, "invalid"),
        ({"version": True}, "invalid"),
        ({"version": 2}, "mismatch"),
        ({"client_chain": [b"not a certificate"]}, "mismatch"),
    ],
    ids=["well-formed", "unknown-field", "short-psk", "name-not-str", "version-bool", "version-2", "bad-client-chain"],
)
async def test_authentic_ticket_with_bad_contents_falls_back(serve, pki_dir, change: dict, status: str | None) -> None:
    """A ticket that authenticates under our key but whose contents this server cannot use (written by a
    newer or broken server sharing the key file) is a refusal with a status, never a failure."""
    import msgpack

    server_cfg, client_cfg, port, key, session = await _served_with_a_ticket(serve, pki_dir)
    now_ms = int(time.time() * 1000)
    contents = {"psk": session.psk, "version": 1, "suite": session.suite, "issued": now_ms,
                "expires": now_ms + 600_000, "server_name": "localhost", **change}
    ticket = _seal_raw(server_cfg, msgpack.packb(contents, use_bin_type=True))
    # The client holds the ticket's PSK, so the binder verifies: only the contents decide.
    client_cfg.session_cache.restore(key, dataclasses.replace(session, ticket=ticket, psk=contents["psk"]))
    info = await talk(port, client_cfg)
    if status is None:
        assert info.resumed and not server_cfg.session_stats.fallbacks
        return
    assert not info.resumed
    assert server_cfg.session_stats.fallbacks == {status: 1}
    assert client_cfg.session_stats.fallbacks == {status: 1}
    assert (await talk(port, client_cfg)).resumed  # the full handshake brought a good ticket


def test_client_cache_keeps_at_most_64_tickets_per_server() -> None:
    from securechan import tickets as t

    cache = t.TicketCache()
    key = ("host", 1, None)
    for i in range(t.MAX_TICKETS_PER_KEY + 3):
        cache.put(key, i.to_bytes(2, "big") * 50, bytes(32), version=1, suite=1, server_chain=(), lifetime=600)
    kept = cache.peek(key)
    assert [int.from_bytes(s.ticket[:2], "big") for s in kept] == list(range(66, 2, -1))  # newest first
    assert cache._bytes == 64 * 100
    while cache.take(key) is not None:
        pass
    assert cache._bytes == 0
