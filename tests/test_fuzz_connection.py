"""Fuzzing the sans-IO Connection: random bytes and mutations of valid transcripts.

Whatever arrives, only :class:`securechan.SecureChannelError` subclasses come out (never
another type), every call returns (no hang), the receive buffer stays bounded, and the
application is never handed a byte the honest peer did not send.

The transcripts are made deterministic with the ``entropy`` hook: a server built with the
same entropy as the recorded one answers a replayed client flight identically, so a
mutation can reach every state, including key update and close_notify.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import securechan
from securechan import Connection, DataReceived, HandshakeComplete, PeerClosed
from securechan.frames import HEADER_LEN, MAX_RECORD_SIZE, unpack_map

#: A hang fails the test instead of stalling the run.
pytestmark = pytest.mark.timeout(180)

#: Examples per fuzzer; raise SECURECHAN_FUZZ_EXAMPLES for longer runs.
EXAMPLES = int(os.environ.get("SECURECHAN_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
#: Upper bound of a connection's receive buffer: one largest frame plus the read chunk.
BUFFER_BOUND = MAX_RECORD_SIZE + 512 * 1024
UPLOAD = [b"GET /one", b"x" * 3000, b"", b"tail"]


def entropy(seed: bytes) -> Callable[[int], bytes]:
    counter = 0

    def draw(n: int) -> bytes:
        nonlocal counter
        counter += 1
        return hashlib.shake_256(seed + counter.to_bytes(8, "big")).digest(n)

    return draw


def feed(conn: Connection, data: bytes, cuts: list[int]) -> tuple[bytes, list[object], BaseException | None]:
    """Feed ``data`` in pieces; return (application bytes, events, the error that ended it)."""
    delivered = bytearray()
    events: list[object] = []
    pieces, pos = [], 0
    for cut in sorted(cuts):
        pieces.append(data[pos:cut])
        pos = max(pos, cut)
    pieces.append(data[pos:])
    error: BaseException | None = None
    try:
        for piece in pieces:
            for event in conn.receive_data(piece):
                events.append(event)
                if isinstance(event, DataReceived):
                    delivered += event.data
            assert len(conn._buf) <= BUFFER_BOUND, "the receive buffer grew beyond one frame"
        events.extend(conn.receive_eof())
    except securechan.SecureChannelError as exc:
        error = exc
    # Whatever happened, the connection stays usable as an object: more input only raises our errors.
    for late in (lambda: conn.receive_data(b"\x92\x03\xc6\x00\x00\x00\x00"), conn.receive_eof, conn.close):
        try:
            late()
        except securechan.SecureChannelError:
            pass
    conn.data_to_send()
    return bytes(delivered), events, error


@dataclass(frozen=True)
class Configs:
    server: securechan.ServerConfig
    server_no_tickets: securechan.ServerConfig
    client: securechan.ClientConfig


@pytest.fixture(scope="module")
def cfg(pki_dir) -> Configs:  # type: ignore[no-untyped-def]
    """Built once: loading a config reads and checks files, far slower than one fuzz example."""
    return Configs(pki_dir.server_config(), pki_dir.server_config(tickets=False), pki_dir.client_config(resume=False))


@dataclass
class Transcript:
    client_flight: bytes  # everything the client sent, in order
    server_flight: bytes
    client_seed: bytes
    server_seed: bytes


@pytest.fixture(scope="module")
def transcript(cfg: Configs) -> Transcript:
    """A complete honest conversation: handshake, data, a key update, more data, close_notify."""
    client_cfg = cfg.client
    server_cfg = cfg.server
    client = Connection(client_cfg, server_name="localhost", entropy=entropy(b"client"))
    server = Connection(server_cfg, entropy=entropy(b"server"))
    c_out, s_out = bytearray(), bytearray()

    def pump() -> None:
        for _ in range(4):
            data = client.data_to_send()
            c_out.extend(data)
            server.receive_data(data)
            data = server.data_to_send()
            s_out.extend(data)
            client.receive_data(data)

    pump()
    assert client.handshake_complete and server.handshake_complete
    client.send_data(UPLOAD[0] + UPLOAD[1])
    client.update_keys(request_peer=True)
    client.send_data(UPLOAD[3])
    server.send_data(b"reply")
    client.close()
    pump()
    server.close()
    pump()
    return Transcript(bytes(c_out), bytes(s_out), b"client", b"server")


def fresh_server(cfg: Configs, t: Transcript) -> Connection:
    return Connection(cfg.server, entropy=entropy(t.server_seed))


def test_replayed_transcript_is_accepted_whole(cfg: Configs, transcript: Transcript) -> None:
    """Control case: unmutated, the recorded flight completes on a fresh server with the same entropy."""
    delivered, events, error = feed(fresh_server(cfg, transcript), transcript.client_flight, [])
    assert error is None
    assert delivered == UPLOAD[0] + UPLOAD[1] + UPLOAD[3]
    assert any(isinstance(e, HandshakeComplete) for e in events) and isinstance(events[-1], PeerClosed)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 40)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("duplicate"), st.integers(0, 10**6), st.integers(1, 200)),
)


def mutate(data: bytes, mutations: list[tuple[str, int, object]]) -> bytes:
    out = bytearray(data)
    for kind, where, arg in mutations:
        pos = where % (len(out) + 1)
        if kind == "flip" and out:
            out[pos % len(out)] ^= 1 << int(arg)  # type: ignore[call-overload]
        elif kind == "set" and out:
            out[pos % len(out)] = int(arg)  # type: ignore[call-overload]
        elif kind == "delete":
            del out[pos : pos + int(arg)]  # type: ignore[call-overload]
        elif kind == "insert":
            out[pos:pos] = arg  # type: ignore[assignment]
        elif kind == "truncate":
            del out[pos:]
        elif kind == "duplicate":
            out[pos:pos] = out[pos : pos + int(arg)]  # type: ignore[call-overload]
    return bytes(out)


@FUZZ
@given(mutations=st.lists(mutation, min_size=1, max_size=3), cuts=st.lists(st.integers(0, 6000), max_size=4))
def test_mutated_client_flight_to_server(cfg: Configs, transcript: Transcript, mutations, cuts) -> None:  # type: ignore[no-untyped-def]
    data = mutate(transcript.client_flight, mutations)
    delivered, _, error = feed(fresh_server(cfg, transcript), data, cuts)
    honest = UPLOAD[0] + UPLOAD[1] + UPLOAD[3]
    assert honest.startswith(delivered), "a mutated flight delivered bytes the client never sent"
    if data != transcript.client_flight:
        assert error is not None or delivered == honest


@FUZZ
@given(mutations=st.lists(mutation, min_size=1, max_size=3), cuts=st.lists(st.integers(0, 3000), max_size=4))
def test_mutated_server_flight_to_client(cfg: Configs, transcript: Transcript, mutations, cuts) -> None:  # type: ignore[no-untyped-def]
    """The client re-draws its OAEP padding, so the recorded server Finished never verifies: every
    mutation must end in a typed error and deliver nothing."""
    client = Connection(cfg.client, server_name="localhost",
                        entropy=entropy(transcript.client_seed))
    delivered, _, error = feed(client, mutate(transcript.server_flight, mutations), cuts)
    assert delivered == b"" and isinstance(error, securechan.SecureChannelError)


@FUZZ
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=5),
       role=st.sampled_from(["client", "server"]))
def test_random_bytes(cfg: Configs, data: bytes, cuts: list[int], role: str) -> None:
    conn = Connection(cfg.client, server_name="localhost") if role == "client" else Connection(cfg.server)
    delivered, _, _ = feed(conn, data, cuts)
    assert delivered == b""


@FUZZ
@given(body=st.binary(max_size=600), ftype=st.integers(0, 255), declared=st.integers(0, 2**32 - 1))
def test_random_frames_with_any_head(cfg: Configs, body: bytes, ftype: int, declared: int) -> None:  # type: ignore[no-untyped-def]
    head = bytes([0x92, ftype, 0xC6]) + declared.to_bytes(4, "big")
    conn = Connection(cfg.server)
    delivered, _, _ = feed(conn, head + body, [])
    assert delivered == b""


@settings(max_examples=max(20, EXAMPLES // 3), deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=2), cuts=st.lists(st.integers(0, 9000), max_size=3))
def test_mutated_records_to_connected_client(cfg: Configs, mutations, cuts) -> None:  # type: ignore[no-untyped-def]
    """A fresh real handshake per example; then the server's records are mutated on the way to the client."""
    client = Connection(cfg.client, server_name="localhost")
    server = Connection(cfg.server_no_tickets)
    for _ in range(3):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    assert client.handshake_complete
    sent = b"first record " + bytes(4000) + b"second"
    server.send_data(sent[:2000])
    server.update_keys(request_peer=False)
    server.send_data(sent[2000:])
    server.close()
    flight = server.data_to_send()
    delivered, events, error = feed(client, mutate(flight, mutations), cuts)
    assert sent.startswith(delivered)
    if error is None:
        assert delivered == sent and isinstance(events[-1], PeerClosed)


def test_damaged_issuer_name_is_a_certificate_error(cfg: Configs, transcript: Transcript) -> None:  # type: ignore[no-untyped-def]
    """Found by the mutation fuzzer: a certificate whose issuer name does not parse (UTF8String tag
    turned into tag 13) used to escape as ValueError from the diagnostics; it is a CertificateError."""
    good = b"\x0c\x0cTest Root CA"
    assert good in transcript.server_flight
    damaged = transcript.server_flight.replace(good, b"\x0d\x0cTest Root CA", 1)
    client = Connection(cfg.client, server_name="localhost")
    with pytest.raises(securechan.CertificateError, match=r"not valid DER X\.509"):
        client.receive_data(damaged)
    out = client.data_to_send()
    alert = out[out.rindex(b"\x92\x02\xc6") :]  # the ClientHello, then the plaintext alert
    assert unpack_map(alert[HEADER_LEN:], 64) == {"type": "alert", "code": securechan.AlertCode.BAD_CERTIFICATE}
