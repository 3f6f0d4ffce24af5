"""Every error path of the v1 channel, over real loopback sockets, with the typed error and its message."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os

import pytest
from rawpeer import pump_handshake, raw_server, read_alert, read_frame

import securechan
from securechan import pki
from securechan.frames import HEADER_LEN, FrameType, encode_frame, header, pack_map
from securechan.messages import ClientHello


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def expect_client_error(
    port: int, config: securechan.ClientConfig, exc_type: type, **kw: object
) -> BaseException:
    with pytest.raises(exc_type) as info:
        await securechan.open_connection("127.0.0.1", port, config=config, **kw)
    return info.value


async def hello_from_raw_server(
    client_config: securechan.ClientConfig, exc_type: type, **fields: object
) -> tuple[BaseException, list[int]]:
    """A raw server answers the ClientHello with a ServerHello built from ``fields``; return the
    client's error and the alerts the server received."""
    from securechan.messages import ServerHello

    alerts: list[int] = []
    values: dict = dict(version=1, random=os.urandom(32), suite=1, key_wrap=1, x25519=os.urandom(32), max_record=65536)
    values.update(fields)

    async def bad_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.write(encode_frame(FrameType.HANDSHAKE, pack_map(ServerHello(**values).encode())))
        await writer.drain()
        alerts.append(await read_alert(reader))

    server, port = await raw_server(bad_server)
    async with server:
        err = await expect_client_error(port, client_config, exc_type)
        await asyncio.sleep(0.1)
    return err, alerts


# -- certificate checks ---------------------------------------------------------------------


async def test_untrusted_ca(serve, server_config, tmp_path, caplog) -> None:
    other = pki.make_ca("Some Other CA")
    (tmp_path / "other.crt").write_bytes(pki.cert_pem(other[0]))
    _, port = await serve(echo, server_config)
    with caplog.at_level(logging.INFO, logger="securechan"):
        err = await expect_client_error(
            port, securechan.ClientConfig(cafile=tmp_path / "other.crt"), securechan.UnknownCAError
        )
        await asyncio.sleep(0.1)
    assert err.reason == "unknown CA" and "does not chain to a CA trusted by" in str(err)
    assert "Test Root CA" in str(err) and "other.crt" in str(err)
    # The server was told why, and its log line names the peer and the reason.
    assert any("handshake with 127.0.0.1" in r.message and "does not trust the CA" in r.message for r in caplog.records)


async def test_expired_certificate(serve, pki_dir) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    crt, key = pki_dir.issue(
        "localhost", ips=["127.0.0.1"], not_before=past - datetime.timedelta(days=10), not_after=past
    )
    _, port = await serve(echo, securechan.ServerConfig(certfile=crt, keyfile=key))
    err = await expect_client_error(port, pki_dir.client_config(), securechan.CertificateExpiredError)
    assert "expired on" in str(err) and err.reason == "expired"


async def test_not_yet_valid_certificate(serve, pki_dir) -> None:
    future = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3)
    crt, key = pki_dir.issue("localhost", ips=["127.0.0.1"], not_before=future, days=30)
    _, port = await serve(echo, securechan.ServerConfig(certfile=crt, keyfile=key))
    err = await expect_client_error(port, pki_dir.client_config(), securechan.CertificateExpiredError)
    assert "not valid before" in str(err) and "clocks" in str(err)


async def test_wrong_name(serve, pki_dir) -> None:
    crt, key = pki_dir.issue("db.internal")
    _, port = await serve(echo, securechan.ServerConfig(certfile=crt, keyfile=key))
    err = await expect_client_error(port, pki_dir.client_config(), securechan.NameMismatchError, server_name="db")
    assert "certificate for 'db.internal' is not valid for server name 'db'" in str(err)
    assert err.reason == "name mismatch"
    # and the same certificate passes for the right name
    reader, writer = await securechan.open_connection(
        "127.0.0.1", port, config=pki_dir.client_config(), server_name="db.internal"
    )
    writer.close()


async def test_wrong_usage_client_certificate_presented_by_server(pki_dir, client_config) -> None:
    """ServerConfig refuses a client-only certificate, so a raw server presents one on the wire."""
    from cryptography.hazmat.primitives.serialization import Encoding

    cert, _ = pki.issue_cert(pki_dir.ca, "localhost", ips=["127.0.0.1"], client=True)
    err, alerts = await hello_from_raw_server(
        client_config, securechan.WrongUsageError, certificates=(cert.public_bytes(Encoding.DER),)
    )
    assert "clientAuth" in str(err) and "serverAuth is required" in str(err) and err.reason == "wrong usage"
    assert alerts == [securechan.AlertCode.UNSUPPORTED_CERTIFICATE]


async def test_pin_mismatch_and_match(serve, pki_dir, server_config) -> None:
    _, port = await serve(echo, server_config)
    wrong = "sha256:" + "00" * 32
    err = await expect_client_error(port, securechan.ClientConfig(pin=wrong), securechan.PinMismatchError)
    assert "matches none of the configured pins" in str(err)
    from securechan.certs import format_pin, spki_sha256

    right = format_pin(spki_sha256(server_config.certificate))
    # a list of pins (a backup pin and the real one) is accepted
    reader, writer = await securechan.open_connection(
        "127.0.0.1", port, config=securechan.ClientConfig(pin=[wrong, right])
    )
    writer.close()


async def test_intermediate_chain_and_missing_intermediate(serve, pki_dir, tmp_path) -> None:
    inter = pki.make_ca("Test Intermediate", issuer=pki_dir.ca, path_length=0)
    cert, key = pki.issue_cert(inter, "localhost", ips=["127.0.0.1"])
    full = pki_dir.write("chain-full", cert, key, inter[0])
    bare = pki_dir.write("chain-bare", cert, key)
    _, port = await serve(echo, securechan.ServerConfig(certfile=full[0], keyfile=full[1]))
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=pki_dir.client_config())
    assert len(writer.get_extra_info("securechan").peer_chain) == 2
    writer.close()
    _, port2 = await serve(echo, securechan.ServerConfig(certfile=bare[0], keyfile=bare[1]))
    err = await expect_client_error(port2, pki_dir.client_config(), securechan.UnknownCAError)
    assert "sends its full chain" in str(err)


# -- negotiation ----------------------------------------------------------------------------


async def test_no_common_suite(serve, pki_dir, caplog) -> None:
    _, port = await serve(echo, pki_dir.server_config(suites=["AES-256-GCM"]))
    with caplog.at_level(logging.WARNING, logger="securechan"):
        err = await expect_client_error(
            port, pki_dir.client_config(suites=["CHACHA20-POLY1305"]), securechan.NoCommonSuiteError
        )
        await asyncio.sleep(0.1)
    assert err.remote and "no cipher suite" in str(err)
    assert any("CHACHA20-POLY1305" in r.message and "AES-256-GCM" in r.message for r in caplog.records)


async def test_no_common_version_refused_cleanly(serve, server_config) -> None:
    """A client from the future that offers only version 2 gets a protocol_version alert."""
    _, port = await serve(echo, server_config)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    hello = ClientHello(
        versions=(2,), random=os.urandom(32), suites=(1,), key_wraps=(1,), x25519=os.urandom(32), max_record=65536
    )
    writer.write(encode_frame(FrameType.HANDSHAKE, pack_map(hello.encode())))
    assert await read_alert(reader) == securechan.AlertCode.PROTOCOL_VERSION
    assert await reader.read() == b""  # and the server hung up
    writer.close()


async def test_client_rejects_server_choosing_unoffered_version(server_config, client_config) -> None:
    """A server answering with a version the client did not offer is refused with a typed error."""
    _, alerts = await hello_from_raw_server(
        client_config, securechan.NoCommonVersionError, certificates=server_config._chain_der, version=9
    )
    assert alerts == [securechan.AlertCode.PROTOCOL_VERSION]


# -- record layer ---------------------------------------------------------------------------


async def _sansio_server(server_config, act):
    """A raw server speaking securechan through the sans-IO Connection; ``act`` misbehaves after the handshake."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = securechan.Connection(server_config)
        await pump_handshake(conn, reader, writer)
        await act(conn, reader, writer)

    return await raw_server(handler)


async def test_tampered_record_is_fatal_and_not_delivered(server_config, client_config) -> None:
    alerts: list[int] = []

    async def act(conn, reader, writer) -> None:
        good = conn.seal(b"good record")
        bad = bytearray(conn.seal(b"tampered record"))
        bad[HEADER_LEN + 3] ^= 0x01
        writer.write(bytes(good) + bytes(bad))
        await writer.drain()
        # the client answers with an encrypted bad_record_mac alert
        try:
            conn.receive_data(await read_frame(reader))
        except securechan.SecureChannelError as exc:
            alerts.append(exc.alert)

    server, port = await _sansio_server(server_config, act)
    async with server:
        reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
        got = b""
        with pytest.raises(securechan.BadRecordMACError):
            while chunk := await reader.read(100):
                got += chunk
        assert b"tampered" not in got
        await asyncio.sleep(0.1)
    assert alerts == [securechan.AlertCode.BAD_RECORD_MAC]


async def test_truncated_stream_is_an_error_not_eof(server_config, client_config) -> None:
    async def act(conn, reader, writer) -> None:
        writer.write(conn.seal(b"partial answer"))
        await writer.drain()
        writer.close()  # TCP FIN without close_notify

    server, port = await _sansio_server(server_config, act)
    async with server:
        reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
        assert await reader.readexactly(14) == b"partial answer"
        with pytest.raises(securechan.TruncationError, match="without close_notify"):
            await reader.read()
        writer.close()


async def test_truncated_mid_frame(server_config, client_config) -> None:
    async def act(conn, reader, writer) -> None:
        writer.write(bytes(conn.seal(b"x" * 1000))[:500])
        await writer.drain()
        writer.close()

    server, port = await _sansio_server(server_config, act)
    async with server:
        reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
        with pytest.raises(securechan.TruncationError, match="middle of a frame"):
            await reader.read()
        writer.close()


async def test_oversized_frame_refused_before_buffering(serve, server_config, client_config) -> None:
    """A head declaring a huge body is refused at once with record_overflow: nothing is buffered."""
    _, port = await serve(echo, server_config)
    # before the handshake: a 4 GiB handshake frame
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(header(FrameType.HANDSHAKE, 2**32 - 1))
    assert await read_alert(reader) == securechan.AlertCode.RECORD_OVERFLOW
    writer.close()

    # after the handshake: a data record over the negotiated limit
    async def act(conn, reader, writer) -> None:
        writer.write(header(FrameType.APPLICATION_DATA, 65536 + 16 + 1))
        await writer.drain()
        try:
            conn.receive_data(await read_frame(reader))
        except securechan.SecureChannelError as exc:
            alerts.append(exc.alert)

    alerts: list[int] = []
    server, port2 = await _sansio_server(server_config, act)
    async with server:
        reader, writer = await securechan.open_connection("127.0.0.1", port2, config=client_config)
        with pytest.raises(securechan.RecordOverflowError, match="the limit is 65552"):
            await reader.read()
        await asyncio.sleep(0.1)
    assert alerts == [securechan.AlertCode.RECORD_OVERFLOW]


@pytest.mark.parametrize(
    ("greeting", "expected"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "speaking HTTP"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "peer is speaking SSH, not securechan"),
    ],
)
async def test_not_a_securechan_peer(client_config, greeting: bytes, expected: str) -> None:
    async def other(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        await reader.read()

    server, port = await raw_server(other)
    async with server:
        err = await expect_client_error(port, client_config, securechan.DecodeError)
    assert expected in str(err)


async def test_handshake_timeout_server_side(serve, server_config, caplog) -> None:
    _, port = await serve(echo, server_config, handshake_timeout=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    with caplog.at_level(logging.WARNING, logger="securechan"):
        # a silent client is cut off with a user_canceled alert after the timeout
        assert await asyncio.wait_for(read_alert(reader), 5) == securechan.AlertCode.USER_CANCELED
        assert await reader.read() == b""
    assert any("did not complete within 0.3 s" in r.message for r in caplog.records)
    writer.close()


async def test_handshake_timeout_client_side(client_config) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server, port = await raw_server(silent)
    async with server:
        err = await expect_client_error(port, client_config, securechan.HandshakeTimeoutError, handshake_timeout=0.3)
    assert "did not complete within 0.3 s" in str(err) and isinstance(err, TimeoutError)


async def test_server_hangs_up_during_handshake(client_config) -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.close()

    server, port = await raw_server(rude)
    async with server:
        err = await expect_client_error(port, client_config, securechan.TruncationError)
    assert "during the handshake" in str(err)


async def test_server_keeps_serving_after_failures(serve, server_config, client_config) -> None:
    _, port = await serve(echo, server_config)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    assert await read_alert(reader) == securechan.AlertCode.DECODE_ERROR
    writer.close()
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
    writer.write(b"still here")
    assert await reader.readexactly(10) == b"still here"
    writer.close()


# -- hostile certificates -------------------------------------------------------------------


def _self_signed_der(*extension_oids: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "hostile")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for oid in extension_oids:
        builder = builder.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), b"\x05\x00"), False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def hostile_certificates() -> dict[str, bytes]:
    """DER that parses at first sight but breaks later: a repeated extension, an unknown key algorithm."""
    two = _self_signed_der("1.2.3.4.77", "1.2.3.4.78")
    i = two.find(bytes([0x2A, 0x03, 0x04, 0x4E]))  # encoded OID 1.2.3.4.78
    duplicate = two[:i] + bytes([0x2A, 0x03, 0x04, 0x4D]) + two[i + 4 :]  # ... rewritten to 1.2.3.4.77
    plain = _self_signed_der()
    j = plain.find(bytes([0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01]))  # id-ecPublicKey
    unknown_key = plain[: j + 6] + b"\x09" + plain[j + 7 :]
    return {"duplicate extension": duplicate, "unknown key algorithm": unknown_key}


@pytest.mark.parametrize("kind", ["duplicate extension", "unknown key algorithm"])
async def test_hostile_server_certificate_is_a_typed_refusal(kind: str, client_config, server_config) -> None:
    """Whatever certificate bytes a path attacker substitutes, the client fails with a CertificateError
    and a bad_certificate alert, never with another exception type."""
    der = hostile_certificates()[kind]
    for config in (client_config, securechan.ClientConfig(pin="sha256:" + "00" * 32)):
        err, alerts = await hello_from_raw_server(config, securechan.CertificateError, certificates=(der,))
        assert type(err) is securechan.CertificateError and "cannot be used" in str(err)
        assert alerts == [securechan.AlertCode.BAD_CERTIFICATE]


@pytest.mark.parametrize("kind", ["duplicate extension", "unknown key algorithm"])
def test_hostile_client_certificate_is_a_refusal_verdict(kind: str, pki_dir) -> None:
    from securechan.certs import make_store
    from securechan.clientauth import SUPPORTED_SCHEMES, evaluate_client

    chain, error = evaluate_client(
        [hostile_certificates()[kind]],
        int(SUPPORTED_SCHEMES[0]),
        b"sig",
        b"\x00" * 32,
        [int(s) for s in SUPPORTED_SCHEMES],
        make_store([pki_dir.ca[0]]),
        None,
        "test CA",
    )
    assert chain == () and isinstance(error, securechan.CertificateError)


def test_unexpected_exception_fails_closed(server_config, monkeypatch) -> None:
    """A defect inside frame processing still ends in a typed error, an alert and a FAILED state."""
    from securechan import handshake

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("defect")

    monkeypatch.setattr(handshake.ServerHandshake, "handle", broken)
    server = securechan.Connection(server_config)
    client = securechan.Connection(securechan.ClientConfig(pin="sha256:" + "00" * 32), server_name="localhost")
    with pytest.raises(securechan.InternalError, match="KeyError"):
        server.receive_data(client.data_to_send())
    assert server.state is securechan.State.FAILED
    assert read_alert_code(server.data_to_send()) == securechan.AlertCode.INTERNAL_ERROR


def read_alert_code(wire: bytes) -> int:
    from securechan.frames import unpack_map

    assert wire[1] == FrameType.ALERT
    return int(unpack_map(wire[HEADER_LEN:], 64)["code"])


# -- hostile hellos -------------------------------------------------------------------------


async def test_client_hello_with_the_binder_not_last_is_a_decode_error(serve, server_config) -> None:
    """The binder covers the frame up to its own 32 bytes, so it must be the last field (PROTOCOL.md §13.1)."""
    _, port = await serve(echo, server_config)
    hello = ClientHello(
        versions=(1,), random=os.urandom(32), suites=(1,), key_wraps=(1,), x25519=os.urandom(32), max_record=65536,
        server_name="localhost", ticket=os.urandom(80), binder=os.urandom(32),
    ).encode()
    hello["later_extension"] = 1  # an unknown (ignored) key, but encoded after the binder
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode_frame(FrameType.HANDSHAKE, pack_map(hello)))
    assert await read_alert(reader) == securechan.AlertCode.DECODE_ERROR
    assert await reader.read() == b""  # and the server hung up instead of answering with a ServerHello
    writer.close()


async def test_resumed_server_hello_with_certificates_is_a_decode_error(client_config, server_config) -> None:
    err, alerts = await hello_from_raw_server(
        client_config, securechan.DecodeError, certificates=server_config._chain_der, resumed=True
    )
    assert type(err) is securechan.DecodeError
    assert str(err) == "server_hello: a resumed handshake carries no certificates"
    assert alerts == [securechan.AlertCode.DECODE_ERROR]


async def test_server_certificate_without_an_rsa_key_is_insufficient_security(pki_dir, client_config) -> None:
    """A chain that validates but whose leaf key cannot take the RSA-OAEP key wrap (PROTOCOL.md §5.1)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    cert, _ = pki.issue_cert(pki_dir.ca, "localhost", ips=["127.0.0.1"], key_type="ec-p256")
    err, alerts = await hello_from_raw_server(
        client_config, securechan.InsufficientSecurityError, certificates=(cert.public_bytes(Encoding.DER),)
    )
    assert "server certificate's key is not RSA-2048 or larger" in str(err) and not err.remote
    assert alerts == [securechan.AlertCode.INSUFFICIENT_SECURITY]
