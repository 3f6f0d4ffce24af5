"""A hostile peer that breaks the handshake state machine or sends illegal values (tlsfuzzer style).

Driven through the sans-IO Connection: each case feeds crafted frames and checks the typed
error and the exact alert the victim puts on the wire.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import securechan
from securechan import AlertCode, Connection
from securechan.frames import HEADER_LEN, FrameType, encode_frame, pack_map, unpack_map

from .proxy import rewrite, split_frames


def alert_sent(conn: Connection) -> int:
    out = split_frames(conn.data_to_send())
    assert out and out[-1][1] == FrameType.ALERT, "no plaintext alert was sent"
    return int(unpack_map(out[-1][HEADER_LEN:], 64)["code"])


def hs(message: dict[str, object]) -> bytes:
    return encode_frame(FrameType.HANDSHAKE, pack_map(message))


@pytest.fixture
def flights(server_config, client_config) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """One honest handshake's frames, by name."""
    client = Connection(client_config, server_name="localhost")
    server = Connection(server_config)
    ch = client.data_to_send()
    server.receive_data(ch)
    sh = server.data_to_send()
    client.receive_data(sh)
    kx, fin = split_frames(client.data_to_send())
    server.receive_data(kx + fin)
    sfin = split_frames(server.data_to_send())[0]
    return {"client_hello": ch, "server_hello": sh, "key_exchange": kx, "client_finished": fin,
            "server_finished": sfin}


SERVER_CASES: dict[str, tuple[Callable[[dict[str, bytes]], list[bytes]], type, AlertCode]] = {
    "finished-first": (lambda f: [f["client_finished"]], securechan.UnexpectedMessageError,
                       AlertCode.UNEXPECTED_MESSAGE),
    "key-exchange-first": (lambda f: [f["key_exchange"]], securechan.UnexpectedMessageError,
                           AlertCode.UNEXPECTED_MESSAGE),
    "server-hello-to-server": (lambda f: [f["server_hello"]], securechan.UnexpectedMessageError,
                               AlertCode.UNEXPECTED_MESSAGE),
    "client-hello-twice": (lambda f: [f["client_hello"], f["client_hello"]], securechan.UnexpectedMessageError,
                           AlertCode.UNEXPECTED_MESSAGE),
    "finished-before-key-exchange": (lambda f: [f["client_hello"], f["client_finished"]],
                                     securechan.UnexpectedMessageError, AlertCode.UNEXPECTED_MESSAGE),
    "data-before-handshake": (lambda f: [encode_frame(FrameType.APPLICATION_DATA, bytes(40))],
                              securechan.UnexpectedMessageError, AlertCode.UNEXPECTED_MESSAGE),
    "control-before-handshake": (lambda f: [encode_frame(FrameType.CONTROL, bytes(40))],
                                 securechan.UnexpectedMessageError, AlertCode.UNEXPECTED_MESSAGE),
    "plaintext-close-notify": (lambda f: [encode_frame(FrameType.ALERT, pack_map({"type": "alert", "code": 0}))],
                               securechan.UnexpectedMessageError, AlertCode.UNEXPECTED_MESSAGE),
    "empty-body": (lambda f: [encode_frame(FrameType.HANDSHAKE, b"")], securechan.DecodeError,
                   AlertCode.DECODE_ERROR),
    "array-body": (lambda f: [encode_frame(FrameType.HANDSHAKE, b"\x92\x01\x02")], securechan.DecodeError,
                   AlertCode.DECODE_ERROR),
    "unknown-message": (lambda f: [hs({"type": "client_hello2"})], securechan.DecodeError, AlertCode.DECODE_ERROR),
    "low-order-x25519": (lambda f: [rewrite(f["client_hello"], x25519=bytes(32))], securechan.IllegalParameterError,
                         AlertCode.ILLEGAL_PARAMETER),
    "unknown-suites-only": (lambda f: [rewrite(f["client_hello"], suites=[250, 251])], securechan.NoCommonSuiteError,
                            AlertCode.HANDSHAKE_FAILURE),
    "unknown-key-wraps-only": (lambda f: [rewrite(f["client_hello"], key_wraps=[9])], securechan.NoCommonSuiteError,
                               AlertCode.HANDSHAKE_FAILURE),
    "max-record-too-small": (lambda f: [rewrite(f["client_hello"], max_record=10)], securechan.DecodeError,
                             AlertCode.DECODE_ERROR),
    "random-too-short": (lambda f: [rewrite(f["client_hello"], random=bytes(31))], securechan.DecodeError,
                         AlertCode.DECODE_ERROR),
    "versions-not-ints": (lambda f: [rewrite(f["client_hello"], versions=["1"])], securechan.DecodeError,
                          AlertCode.DECODE_ERROR),
    "bool-for-int": (lambda f: [rewrite(f["client_hello"], max_record=True)], securechan.DecodeError,
                     AlertCode.DECODE_ERROR),
    "server-name-bad-chars": (lambda f: [rewrite(f["client_hello"], server_name="a\x00b")], securechan.DecodeError,
                              AlertCode.DECODE_ERROR),
    "tiny-wrapped-key": (lambda f: [f["client_hello"], rewrite(f["key_exchange"], wrapped_key=b"\x01"),
                                    f["client_finished"]], securechan.HandshakeAuthError, AlertCode.DECRYPT_ERROR),
    "max-size-wrapped-key": (lambda f: [f["client_hello"], rewrite(f["key_exchange"], wrapped_key=b"\xff" * 1024),
                                        f["client_finished"]], securechan.HandshakeAuthError, AlertCode.DECRYPT_ERROR),
    "oversized-wrapped-key": (lambda f: [f["client_hello"], rewrite(f["key_exchange"], wrapped_key=b"\xff" * 1025)],
                              securechan.DecodeError, AlertCode.DECODE_ERROR),
    "finished-mac-short": (lambda f: [f["client_hello"], f["key_exchange"], rewrite(f["client_finished"],
                                                                                      mac=bytes(31))],
                           securechan.DecodeError, AlertCode.DECODE_ERROR),
    "extra-field-in-finished": (lambda f: [f["client_hello"], f["key_exchange"], rewrite(f["client_finished"],
                                                                                           extra=1)],
                                securechan.DecodeError, AlertCode.DECODE_ERROR),
}


@pytest.mark.parametrize("case", sorted(SERVER_CASES))
def test_hostile_client(server_config, flights: dict[str, bytes], case: str) -> None:
    build, error, alert = SERVER_CASES[case]
    frames = build(flights)
    # A replayed ClientHello needs a server with the same answer; any fresh server answers it.
    server = Connection(server_config)
    with pytest.raises(securechan.SecureChannelError) as info:
        for frame in frames:
            server.receive_data(frame)
    assert type(info.value) is error, repr(info.value)
    assert not info.value.remote
    assert alert_sent(server) == alert
    assert not server.handshake_complete
    with pytest.raises(securechan.SecureChannelError):
        server.receive_data(frames[0])  # a failed connection accepts nothing more


CLIENT_CASES: dict[str, tuple[Callable[[dict[str, bytes]], bytes], type, AlertCode]] = {
    "finished-first": (lambda f: f["server_finished"], securechan.UnexpectedMessageError,
                       AlertCode.UNEXPECTED_MESSAGE),
    "client-hello-to-client": (lambda f: f["client_hello"], securechan.UnexpectedMessageError,
                               AlertCode.UNEXPECTED_MESSAGE),
    "version-not-offered": (lambda f: rewrite(f["server_hello"], version=2), securechan.NoCommonVersionError,
                            AlertCode.PROTOCOL_VERSION),
    "key-wrap-not-offered": (lambda f: rewrite(f["server_hello"], key_wrap=7), securechan.IllegalParameterError,
                             AlertCode.ILLEGAL_PARAMETER),
    "unsolicited-resumption": (lambda f: rewrite(f["server_hello"], resumed=True, certificates=None),
                               securechan.IllegalParameterError, AlertCode.ILLEGAL_PARAMETER),
    "no-certificates": (lambda f: rewrite(f["server_hello"], certificates=None), securechan.DecodeError,
                        AlertCode.DECODE_ERROR),
    "garbage-certificate": (lambda f: rewrite(f["server_hello"], certificates=[b"\x30\x03\x02\x01\x00"]),
                            securechan.CertificateError, AlertCode.BAD_CERTIFICATE),
    "nine-certificates": (lambda f: rewrite(f["server_hello"], certificates=[b"x"] * 9), securechan.DecodeError,
                          AlertCode.DECODE_ERROR),
    "unknown-field": (lambda f: rewrite(f["server_hello"], surprise=1), securechan.DecodeError,
                      AlertCode.DECODE_ERROR),
}


@pytest.mark.parametrize("case", sorted(CLIENT_CASES))
def test_hostile_server(client_config, flights: dict[str, bytes], case: str) -> None:
    build, error, alert = CLIENT_CASES[case]
    client = Connection(client_config, server_name="localhost")
    client.data_to_send()
    with pytest.raises(securechan.SecureChannelError) as info:
        client.receive_data(build(flights))
    assert type(info.value) is error, repr(info.value)
    assert alert_sent(client) == alert
    assert not client.handshake_complete and not client.can_send


def test_low_order_x25519_from_server(client_config, flights: dict[str, bytes]) -> None:
    """The server's share is used only after its certificate verified; an all-zero share is refused."""
    client = Connection(client_config, server_name="localhost")
    client.data_to_send()
    with pytest.raises(securechan.IllegalParameterError, match="low-order"):
        client.receive_data(rewrite(flights["server_hello"], x25519=bytes(32)))
    assert alert_sent(client) == AlertCode.ILLEGAL_PARAMETER


def test_unknown_alert_code_from_peer(server_config) -> None:
    server = Connection(server_config)
    with pytest.raises(securechan.ProtocolError, match="unknown alert code 200") as info:
        server.receive_data(encode_frame(FrameType.ALERT, pack_map({"type": "alert", "code": 200})))
    assert info.value.remote and not info.value.authenticated
    assert server.data_to_send() == b"", "an alert is never answered with an alert"


def _connected_pair(server_config, client_config) -> tuple[Connection, Connection]:  # type: ignore[no-untyped-def]
    client = Connection(client_config, server_name="localhost")
    server = Connection(server_config)
    for _ in range(3):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    assert client.handshake_complete and server.handshake_complete
    client.data_to_send()
    return client, server


def test_data_after_close_notify_is_refused(server_config, client_config) -> None:
    """After the peer's close_notify no frame is accepted at all: one more record is refused
    from its head, before any decryption, and nothing more is delivered."""
    client, server = _connected_pair(server_config, client_config)
    server.send_data(b"last words")
    server.close()
    data, closed = split_frames(server.data_to_send())[-2:]
    assert [type(e).__name__ for e in client.receive_data(data)] == ["DataReceived"]
    assert isinstance(client.receive_data(closed)[0], securechan.PeerClosed)
    with pytest.raises(securechan.UnexpectedMessageError, match="not allowed"):
        client.receive_data(encode_frame(FrameType.APPLICATION_DATA, bytes(40)))
    assert client.peer_closed
