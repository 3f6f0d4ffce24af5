"""Frame and message codecs: hypothesis round trips and strict refusals."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

import securechan
from securechan.frames import HEADER_LEN, FrameType, encode_frame, pack_map, parse_header, unpack_map
from securechan.messages import (
    CONTROL_MESSAGES,
    HANDSHAKE_MESSAGES,
    Alert,
    ClientHello,
    Finished,
    KeyExchange,
    KeyUpdate,
    ServerHello,
    decode_message,
)

ALL = {t: 1 << 20 for t in FrameType}

b32 = st.binary(min_size=32, max_size=32)
small_ints = st.lists(st.integers(0, 2**16 - 1), min_size=1, max_size=16).map(tuple)

tickets = st.none() | st.tuples(st.binary(min_size=1, max_size=4096), b32)
client_hellos = st.builds(
    lambda ticket, **kw: ClientHello(**kw, ticket=ticket and ticket[0], binder=ticket and ticket[1]),
    versions=small_ints,
    random=b32,
    suites=small_ints,
    key_wraps=small_ints,
    x25519=b32,
    max_record=st.integers(1024, 1 << 20),
    server_name=st.none() | st.from_regex(r"[A-Za-z0-9_.-]{1,253}", fullmatch=True),
    ticket=tickets,
)
server_hellos = st.builds(
    ServerHello,
    version=st.integers(0, 2**16 - 1),
    random=b32,
    suite=st.integers(0, 2**16 - 1),
    key_wrap=st.integers(0, 2**16 - 1),
    x25519=b32,
    max_record=st.integers(1024, 1 << 20),
    certificates=st.lists(st.binary(min_size=1, max_size=2000), min_size=1, max_size=8).map(tuple),
    client_auth=st.lists(st.integers(0, 2**16 - 1), max_size=16).map(tuple),
)
handshake_messages = (
    client_hellos
    | server_hellos
    | st.builds(KeyExchange, wrapped_key=st.binary(min_size=1, max_size=1024))
    | st.builds(Finished, mac=b32)
)


@given(st.sampled_from(list(FrameType)), st.binary(max_size=5000))
def test_frame_round_trip(ftype: FrameType, body: bytes) -> None:
    frame = encode_frame(ftype, body)
    assert parse_header(frame[:HEADER_LEN], ALL) == (ftype, len(body))
    # any msgpack library reads a frame as [type, body]
    assert msgpack.unpackb(frame) == [int(ftype), body]


@given(handshake_messages)
def test_handshake_message_round_trip(message) -> None:
    assert decode_message(unpack_map(pack_map(message.encode()), 1 << 20), HANDSHAKE_MESSAGES) == message


@given(st.builds(Alert, code=st.integers(0, 255)) | st.builds(KeyUpdate, request_update=st.booleans()))
def test_control_message_round_trip(message) -> None:
    assert decode_message(unpack_map(pack_map(message.encode()), 1 << 20), CONTROL_MESSAGES) == message


@given(st.binary(max_size=300))
def test_unpack_map_random_bytes_only_raise_securechan_errors(data: bytes) -> None:
    try:
        decode_message(unpack_map(data, 1 << 16), HANDSHAKE_MESSAGES)
    except securechan.SecureChannelError:
        pass


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ([1, 2], "expected a msgpack map"),
        ({"type": "finished", "mac": b"x" * 31}, "bad length"),
        ({"type": "finished", "mac": "not bytes" * 4}, "wrong type"),
        ({"type": "finished"}, "missing field 'mac'"),
        ({"type": "finished", "mac": b"x" * 32, "extra": 1}, "unexpected fields"),
        ({"type": "no_such_message"}, "unknown message type"),
        ({"type": "key_exchange", "wrapped_key": b""}, "bad length"),
        ({"versions": [1]}, "no 'type' field"),
    ],
)
def test_strict_decoding(value, error: str) -> None:
    with pytest.raises(securechan.DecodeError, match=error):
        decode_message(unpack_map(msgpack.packb(value), 1 << 16), HANDSHAKE_MESSAGES)


@pytest.mark.parametrize("name", ["", "a\nb", "x" * 254, "bad name", "caf\u00e9"])
def test_server_name_must_be_a_dns_name(name: str) -> None:
    hello = ClientHello(
        versions=(1,),
        random=b"r" * 32,
        suites=(1,),
        key_wraps=(1,),
        x25519=b"x" * 32,
        max_record=65536,
        server_name=name,
    )
    with pytest.raises(securechan.DecodeError, match="server_name"):
        ClientHello.decode(unpack_map(pack_map(hello.encode()), 1 << 16))


def test_duplicate_keys_and_non_string_keys_refused() -> None:
    with pytest.raises(securechan.DecodeError, match="repeats a key"):
        unpack_map(b"\x82\xa4type\xa5alert\xa4type\xa5alert", 1 << 16)
    with pytest.raises(securechan.DecodeError):
        unpack_map(msgpack.packb({1: 2}), 1 << 16)


def test_bool_is_not_an_int() -> None:
    hello = ClientHello(
        versions=(1,), random=b"r" * 32, suites=(1,), key_wraps=(1,), x25519=b"x" * 32, max_record=65536
    ).encode()
    hello["max_record"] = True
    with pytest.raises(securechan.DecodeError, match="wrong type"):
        ClientHello.decode(hello)


def test_deep_nesting_and_ext_types_refused() -> None:
    deep = b"\x91" * 5000 + b"\xc0"
    with pytest.raises(securechan.DecodeError):
        unpack_map(deep, 1 << 16)
    with pytest.raises(securechan.DecodeError):
        unpack_map(msgpack.packb({"type": msgpack.ExtType(1, b"x")}), 1 << 16)
    with pytest.raises(securechan.DecodeError):
        unpack_map(msgpack.packb({"type": "alert", "code": 0}) + b"\x00", 1 << 16)  # trailing bytes


def test_oversized_and_malformed_heads() -> None:
    with pytest.raises(securechan.RecordOverflowError):
        parse_header(b"\x92\x01\xc6\xff\xff\xff\xff", {FrameType.HANDSHAKE: 65536})
    with pytest.raises(securechan.DecodeError, match="unknown frame type"):
        parse_header(b"\x92\x09\xc6\x00\x00\x00\x01", ALL)
    with pytest.raises(securechan.UnexpectedMessageError):
        parse_header(b"\x92\x03\xc6\x00\x00\x00\x01", {FrameType.HANDSHAKE: 10})
    with pytest.raises(securechan.DecodeError, match="TLS"):
        parse_header(b"\x16\x03\x01\x02\x00\x01\x00", ALL)
    with pytest.raises(securechan.DecodeError, match=r"bin 32|not speaking securechan"):
        parse_header(b"\x92\x01\xc4\x00\x00\x00\x01", ALL)  # bin8 instead of bin32


def _hello_map(**changes: object) -> dict:
    m = ClientHello(
        versions=(1,), random=b"r" * 32, suites=(1,), key_wraps=(1,), x25519=b"x" * 32, max_record=65536
    ).encode()
    m.update(changes)
    return m


@pytest.mark.parametrize(
    "versions",
    [["x", 1], [True, 1], [70000, 1], list(range(17))],
    ids=["str-then-int", "bool-then-int", "too-big-then-int", "17-entries"],
)
def test_a_bad_list_entry_is_not_hidden_by_good_ones_after_it(versions: list) -> None:
    """The list check stops at the first bad entry: a good entry after it does not make the list acceptable."""
    with pytest.raises(securechan.DecodeError, match=r"field 'versions' must be a list of 1-16 small integers"):
        ClientHello.decode(_hello_map(versions=versions))


def test_binder_must_be_the_last_client_hello_field() -> None:
    m = _hello_map(ticket=b"t" * 40, binder=b"b" * 32)
    assert ClientHello.decode(m).binder == b"b" * 32  # binder last: accepted
    m["later_extension"] = 1  # an unknown key (ignored in ClientHello) placed after the binder
    with pytest.raises(securechan.DecodeError, match="the binder must be the last field"):
        ClientHello.decode(unpack_map(pack_map(m), 1 << 16))


def test_a_resumed_server_hello_carries_no_certificates() -> None:
    sh = ServerHello(version=1, random=b"r" * 32, suite=1, key_wrap=1, x25519=b"x" * 32, max_record=65536,
                     certificates=(b"cert",), resumed=True)
    with pytest.raises(securechan.DecodeError, match="a resumed handshake carries no certificates"):
        ServerHello.decode(unpack_map(pack_map(sh.encode()), 1 << 16))
    # without certificates the same resumed hello decodes
    plain = ServerHello(version=1, random=b"r" * 32, suite=1, key_wrap=1, x25519=b"x" * 32, max_record=65536,
                        resumed=True)
    assert ServerHello.decode(unpack_map(pack_map(plain.encode()), 1 << 16)).resumed
