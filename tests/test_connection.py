"""The sans-IO Connection on its own: state machine, ordering rules, failure semantics."""

from __future__ import annotations

import os

import pytest

import securechan
from securechan.frames import HEADER_LEN, FrameType, encode_frame, pack_map, unpack_map
from securechan.messages import ClientHello


def pair(server_config, client_config, **kw):
    client = securechan.Connection(client_config, server_name="localhost", **kw)
    server = securechan.Connection(server_config)
    return client, server


def handshake(client, server) -> None:
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert client.handshake_complete and server.handshake_complete


def alert_code(wire: bytes) -> int:
    assert wire[1] == FrameType.ALERT
    return int(unpack_map(wire[HEADER_LEN:], 64)["code"])


def test_states_progress(server_config, client_config) -> None:
    client, server = pair(server_config, client_config)
    assert client.state is securechan.State.CLIENT_WAIT_SERVER_HELLO
    assert server.state is securechan.State.SERVER_WAIT_CLIENT_HELLO
    server.receive_data(client.data_to_send())
    assert server.state is securechan.State.SERVER_WAIT_KEY_EXCHANGE
    client.receive_data(server.data_to_send())
    assert client.state is securechan.State.CLIENT_WAIT_FINISHED and client.can_send
    events = server.receive_data(client.data_to_send())
    assert server.state is securechan.State.CONNECTED and isinstance(events[0], securechan.HandshakeComplete)
    events = client.receive_data(server.data_to_send())
    assert client.state is securechan.State.CONNECTED and isinstance(events[0], securechan.HandshakeComplete)
    client.close()
    server.receive_data(client.data_to_send())
    server.close()
    client.receive_data(server.data_to_send())
    assert client.state is server.state is securechan.State.CLOSED


def test_client_data_right_after_its_finished(server_config, client_config) -> None:
    """The client may send data after its Finished; the server delivers it after verifying that Finished."""
    client, server = pair(server_config, client_config)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.send_data(b"early")
    events = server.receive_data(client.data_to_send())
    assert [type(e) for e in events] == [securechan.HandshakeComplete, securechan.DataReceived]
    assert events[1].data == b"early"


def test_client_refuses_server_data_before_server_finished(server_config, client_config) -> None:
    client, server = pair(server_config, client_config)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    finished = server.data_to_send()
    server.send_data(b"data")
    data = server.data_to_send()
    with pytest.raises(securechan.UnexpectedMessageError):
        client.receive_data(data + finished)  # data first: not allowed before Finished
    assert alert_code(client.data_to_send()) == securechan.AlertCode.UNEXPECTED_MESSAGE


def test_send_before_keys_is_refused(client_config) -> None:
    client = securechan.Connection(client_config, server_name="localhost")
    with pytest.raises(securechan.ConnectionClosedError, match="before the handshake"):
        client.send_data(b"x")


def test_message_out_of_order(server_config, client_config) -> None:
    server = securechan.Connection(server_config)
    fin = encode_frame(FrameType.HANDSHAKE, pack_map({"type": "finished", "mac": b"\x00" * 32}))
    with pytest.raises(securechan.UnexpectedMessageError, match="expected client_hello"):
        server.receive_data(fin)
    assert alert_code(server.data_to_send()) == securechan.AlertCode.UNEXPECTED_MESSAGE
    with pytest.raises(securechan.ConnectionClosedError):
        server.receive_data(b"more")


def test_low_order_x25519_share_refused(server_config) -> None:
    server = securechan.Connection(server_config)
    hello = ClientHello(
        versions=(1,), random=os.urandom(32), suites=(1,), key_wraps=(1,), x25519=b"\x00" * 32, max_record=65536
    )
    with pytest.raises(securechan.IllegalParameterError, match="low-order"):
        server.receive_data(encode_frame(FrameType.HANDSHAKE, pack_map(hello.encode())))
    assert alert_code(server.data_to_send()) == securechan.AlertCode.ILLEGAL_PARAMETER


def test_plaintext_close_notify_is_refused(server_config, client_config) -> None:
    client, server = pair(server_config, client_config)
    handshake(client, server)
    with pytest.raises(securechan.UnexpectedMessageError, match="plaintext"):
        client.receive_data(encode_frame(FrameType.ALERT, pack_map({"type": "alert", "code": 0})))


def test_plaintext_alert_is_fatal_but_marked_unauthenticated(server_config, client_config) -> None:
    client, server = pair(server_config, client_config)
    handshake(client, server)
    with pytest.raises(securechan.AccessDeniedError) as info:
        client.receive_data(encode_frame(FrameType.ALERT, pack_map({"type": "alert", "code": 49})))
    assert info.value.remote and not info.value.authenticated
    assert client.data_to_send() == b""  # alerts are never answered


def test_encrypted_alert_is_authenticated(server_config, client_config) -> None:
    client, server = pair(server_config, client_config)
    handshake(client, server)
    server.abort(securechan.InternalError("local failure"))
    with pytest.raises(securechan.InternalError) as info:
        client.receive_data(server.data_to_send())
    assert info.value.remote and info.value.authenticated


def test_nothing_after_close_notify(server_config, client_config) -> None:
    client, server = pair(server_config, client_config)
    handshake(client, server)
    client.close()
    wire = client.data_to_send()
    # closing our side does not stop reading
    server.send_data(b"still flowing")
    assert client.receive_data(server.data_to_send())[0] == securechan.DataReceived(b"still flowing")
    with pytest.raises(securechan.ConnectionClosedError, match="close_notify sent"):
        client.send_data(b"x")
    # a record injected after close_notify is refused
    events = server.receive_data(bytes(wire) + bytes(wire))
    assert events == [securechan.PeerClosed()]
    assert isinstance(server.error, securechan.UnexpectedMessageError)
    with pytest.raises(securechan.UnexpectedMessageError):
        server.receive_eof()


@pytest.mark.parametrize("path", ["receive_data", "get_buffer + buffer_updated"])
def test_events_before_a_failure_are_delivered_then_the_error(server_config, client_config, path: str) -> None:
    """A failure behind verified records: the records are returned, the error is raised by the next call
    (on both input paths), and every call after that refuses."""
    client, server = pair(server_config, client_config)
    handshake(client, server)
    server.send_data(b"good")
    good = server.data_to_send()
    bad = bytearray(server.seal(b"bad"))
    bad[-1] ^= 1
    wire = good + bytes(bad)

    def feed(data: bytes) -> list[securechan.Event]:
        if path == "receive_data":
            return client.receive_data(data)
        target = client.get_buffer(len(data))
        target[: len(data)] = data
        return client.buffer_updated(len(data))

    assert feed(wire) == [securechan.DataReceived(b"good")]
    assert isinstance(client.error, securechan.BadRecordMACError)
    assert client.state is securechan.State.FAILED
    with pytest.raises(securechan.BadRecordMACError):
        feed(b"")  # raised by the next call
    with pytest.raises(securechan.ConnectionClosedError, match="no more data is accepted"):
        feed(b"x")


def test_receive_eof_semantics(server_config, client_config) -> None:
    client, server = pair(server_config, client_config)
    with pytest.raises(securechan.TruncationError, match="during the handshake"):
        server.receive_eof()
    client, server = pair(server_config, client_config)
    handshake(client, server)
    server.close()
    client.receive_data(server.data_to_send())
    assert client.receive_eof() == []  # clean: close_notify came first


def test_close_during_handshake_sends_user_canceled(client_config) -> None:
    client = securechan.Connection(client_config, server_name="localhost")
    client.data_to_send()
    client.close()
    assert alert_code(client.data_to_send()) == securechan.AlertCode.USER_CANCELED
    assert client.state is securechan.State.FAILED


def test_record_size_is_negotiated_down(server_config, pki_dir) -> None:
    client, server = pair(server_config, pki_dir.client_config(max_record_size=2048))
    handshake(client, server)
    assert server.session.max_record_size == 2048
    server.send_data(os.urandom(10_000))
    wire = server.data_to_send()
    assert wire[3:7] == (2048 + 16).to_bytes(4, "big")
    assert sum(len(e.data) for e in client.receive_data(wire)) == 10_000


def test_secrets_wiped_on_close(server_config, client_config) -> None:
    client, server = pair(server_config, client_config)
    handshake(client, server)
    assert client.session.export_keying_material(b"l", b"", 16)
    client.close()
    server.receive_data(client.data_to_send())
    server.close()
    client.receive_data(server.data_to_send())
    with pytest.raises(securechan.ConnectionClosedError, match="wiped"):
        client.session.export_keying_material(b"l", b"", 16)


def test_rejects_wrong_config_type() -> None:
    with pytest.raises(TypeError):
        securechan.Connection(object())  # type: ignore[arg-type]


def test_tickets_only_for_clients_that_keep_them(server_config, pki_dir) -> None:
    """A client with resume=False does not say `tickets: true`, so the server sends no new_ticket."""
    from securechan.messages import ClientHello as CH

    for resume, expect_ticket in ((True, True), (False, False)):
        client, server = pair(server_config, pki_dir.client_config(resume=resume))
        hello = client.data_to_send()
        assert CH.decode(unpack_map(hello[HEADER_LEN:], 1 << 16)).accept_tickets is resume
        server.receive_data(hello)
        client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())
        after_finished = server.data_to_send()
        # the server's Finished frame, then (only when asked) one protected CONTROL record
        finished_len = HEADER_LEN + int.from_bytes(after_finished[3:7], "big")
        assert (len(after_finished) > finished_len) is expect_ticket
        client.receive_data(after_finished)
        assert len(pki_dir.client_config().session_cache) == 0  # a fresh config starts cold


def test_secrets_never_in_reprs(server_config, pki_dir) -> None:
    """Key material stays out of reprs, so logs and tracebacks with locals cannot leak it."""
    from securechan.handshake import Secrets, Step
    from securechan.resumption import Resumption
    from securechan.suites import Suite
    from securechan.tickets import CachedSession, TicketContents

    marker = b"\xde\xad\xbe\xef" * 8
    secrets = Secrets(
        version=1,
        suite=Suite.AES_256_GCM,
        client_traffic=marker,
        server_traffic=marker,
        exporter=marker,
        resumption=marker,
        send_record_limit=1024,
    )
    objects = [
        secrets,
        Step(secrets=secrets),
        Resumption(psk=marker, version=1, suite=1, client_chain=()),
        TicketContents(psk=marker, version=1, suite=1, server_name=None, client_chain=()),
        CachedSession(ticket=b"t", psk=marker, version=1, suite=1, server_chain=(), expires=0.0),
        pki_dir.client_config(),
    ]
    for obj in objects:
        text = repr(obj)
        assert repr(marker)[2:-1] not in text and marker.hex() not in text, type(obj).__name__
    # a live connection: its session info and the configs carry no secrets in their reprs
    client, server = pair(server_config, pki_dir.client_config())
    handshake(client, server)
    assert "exporter" not in repr(client.session).lower().replace("export_keying_material", "")


def test_verified_chain_cache_is_per_chain_name_and_validity(server_config, pki_dir, monkeypatch) -> None:
    """A config re-verifies nothing it already verified for the same chain and name while the path is
    valid; a different name, a different chain, or a moment outside the path's validity is checked anew."""
    import datetime

    from securechan import certs

    calls: list[str] = []
    real = certs.verify_server_chain

    def counting(chain, name, store, **kw):
        calls.append(name)
        return real(chain, name, store, **kw)

    from securechan import handshake as hs_module

    monkeypatch.setattr(hs_module, "verify_server_chain", counting)
    config = pki_dir.client_config(resume=False)
    for _ in range(3):
        client, server = pair(server_config, config)
        handshake(client, server)
    assert calls == ["localhost"]  # verified once, then served from the cache

    # another server name for the same chain is a different question
    client = securechan.Connection(config, server_name="127.0.0.1")
    server = securechan.Connection(server_config)
    handshake(client, server)
    assert calls == ["localhost", "127.0.0.1"]

    # a chain the cache has not seen is verified (and refused) as usual
    crt, key = pki_dir.issue("db.internal")
    other = securechan.ServerConfig(certfile=crt, keyfile=key)
    client, server = securechan.Connection(config, server_name="localhost"), securechan.Connection(other)
    server.receive_data(client.data_to_send())
    with pytest.raises(securechan.NameMismatchError):
        client.receive_data(server.data_to_send())

    # outside the validated path's validity window an entry is dropped and the chain re-verified
    der = server_config._chain_der
    assert config._verified_chains.get(der, "localhost") is not None
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365 * 20)
    monkeypatch.setattr(certs, "_utcnow", lambda: later)
    assert config._verified_chains.get(der, "localhost") is None


def test_ticket_not_offered_once_the_server_chain_no_longer_validates(server_config, pki_dir, monkeypatch) -> None:
    """Resumption never outlives the server's certificate: with the clock past the chain's validity the
    cached ticket is withheld (and the full handshake then refuses the expired certificate)."""
    import datetime

    from securechan import certs
    from securechan.messages import ClientHello as CH

    config = pki_dir.client_config()
    client, server = pair(server_config, config)
    handshake(client, server)
    client.receive_data(server.data_to_send())  # the session ticket
    (kept,) = config.session_cache.peek(client._resume_key)

    def offered_ticket() -> bool:
        hello = securechan.Connection(config, server_name="localhost", resume_key=client._resume_key).data_to_send()
        return CH.decode(unpack_map(hello[HEADER_LEN:], 1 << 16)).ticket is not None

    assert offered_ticket()  # today: the cached chain is valid, the ticket is offered
    config.session_cache.restore(client._resume_key, kept)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365 * 20)
    monkeypatch.setattr(certs, "_utcnow", lambda: later)
    assert not offered_ticket()


def test_send_and_key_update_refused_with_the_reason(server_config, client_config) -> None:
    """send_data/update_keys say why they cannot send: too early, or the connection failed."""
    client = securechan.Connection(client_config, server_name="localhost")
    with pytest.raises(securechan.ConnectionClosedError, match="cannot send before the handshake allows it"):
        client.update_keys()
    client, server = pair(server_config, client_config)
    handshake(client, server)
    with pytest.raises(securechan.BadRecordMACError):
        client.receive_data(bytes(encode_frame(FrameType.APPLICATION_DATA, b"\x00" * 40)))
    assert client.state is securechan.State.FAILED
    with pytest.raises(securechan.ConnectionClosedError, match="cannot send: the connection failed"):
        client.send_data(b"x")
    with pytest.raises(securechan.ConnectionClosedError, match="cannot send: the connection failed"):
        client.update_keys()


def test_no_alert_after_our_close_notify(server_config, client_config) -> None:
    """Once we sent close_notify the peer accepts nothing more from us: a later failure queues no alert."""
    client, server = pair(server_config, client_config)
    handshake(client, server)
    client.close()
    assert client.data_to_send()  # the close_notify
    bad = bytearray(server.seal(b"reply"))
    bad[-1] ^= 1
    with pytest.raises(securechan.BadRecordMACError):
        client.receive_data(bytes(bad))
    assert client.state is securechan.State.FAILED
    assert client.data_to_send() == b""


def test_only_the_first_session_ticket_is_kept(server_config, pki_dir) -> None:
    """A server sending a second new_ticket on one connection gets it ignored: one ticket per connection."""
    from securechan.messages import NewTicket

    config = pki_dir.client_config()
    client, server = pair(server_config, config)
    handshake(client, server)
    client.receive_data(server.data_to_send())  # the real ticket
    assert config.session_stats.tickets == 1
    extra = NewTicket(ticket=b"T" * 64, lifetime=600, nonce=b"n" * 16)
    assert server._sealer is not None
    assert client.receive_data(server._sealer.seal(FrameType.CONTROL, pack_map(extra.encode()))) == []
    assert config.session_stats.tickets == 1 and client.state is securechan.State.CONNECTED
    (kept,) = config.session_cache.peek(client._resume_key)
    assert kept.ticket != extra.ticket


def test_exporter_bounds(server_config, client_config) -> None:
    client, server = pair(server_config, client_config)
    handshake(client, server)
    session = client.session
    assert len(session.export_keying_material(b"l" * 200, b"", 8160)) == 8160  # both limits inclusive
    for length in (0, 8161):
        with pytest.raises(ValueError, match="exporter length must be between 1 and 8160 bytes"):
            session.export_keying_material(b"label", b"", length)
    with pytest.raises(ValueError, match="exporter label must be at most 200 bytes"):
        session.export_keying_material(b"l" * 201, b"", 32)


def test_pin_only_client_without_a_server_name(server_config) -> None:
    """With pins and no server name the ClientHello names no server and the handshake completes."""
    from securechan.certs import format_pin, spki_sha256

    pin = format_pin(spki_sha256(server_config.certificate))
    client = securechan.Connection(securechan.ClientConfig(pin=pin))
    hello = client.data_to_send()
    assert ClientHello.decode(unpack_map(hello[HEADER_LEN:], 1 << 16)).server_name is None
    server = securechan.Connection(server_config)
    server.receive_data(hello)
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert client.handshake_complete and server.handshake_complete
    assert server.session.server_name is None


def test_ca_client_without_a_server_name_is_refused(client_config) -> None:
    """A CA-verifying client needs a name to check the certificate against: without one it is a
    configuration error, raised before anything is sent (not an alert blamed on the server)."""
    with pytest.raises(securechan.ConfigError, match="server_name is required for a client that verifies"):
        securechan.Connection(client_config)


@pytest.mark.parametrize("name", ["bad name", "db\udcff", "x" * 254, ""])
def test_a_server_name_no_server_accepts_is_a_config_error(client_config, name: str) -> None:
    # Refused when the connection is made, before a ClientHello the server would answer with decode_error.
    with pytest.raises(securechan.ConfigError, match=r"is neither a DNS name .* nor an IP address"):
        securechan.Connection(client_config, server_name=name)


@pytest.mark.parametrize("name", ["db.internal", "127.0.0.1", "::1", "_svc.example-1"])
def test_names_and_addresses_a_server_accepts(client_config, name: str) -> None:
    securechan.Connection(client_config, server_name=name)  # no error: IP addresses are verified, not sent


def test_a_server_name_that_is_not_text_is_a_config_error(client_config) -> None:
    with pytest.raises(securechan.ConfigError, match="server_name must be a string, got int"):
        securechan.Connection(client_config, server_name=2130706433)  # type: ignore[arg-type]
