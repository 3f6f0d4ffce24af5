"""Fuzzing the frame head parser, the strict msgpack map decoder and every message decoder.

Only :class:`securechan.SecureChannelError` subclasses may come out of them, whatever the
input; hostile lengths and nesting are refused before anything large is allocated.
"""

from __future__ import annotations

import os
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import securechan
from securechan import messages
from securechan.frames import (
    HEADER_LEN,
    MAX_HANDSHAKE_BODY,
    FrameType,
    encode_frame,
    header,
    pack_map,
    parse_header,
    unpack_map,
)

#: A hang fails the test instead of stalling the run.
pytestmark = pytest.mark.timeout(180)

#: Examples per fuzzer; raise SECURECHAN_FUZZ_EXAMPLES for longer runs.
EXAMPLES = int(os.environ.get("SECURECHAN_FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats()
    | st.text(max_size=40) | st.binary(max_size=64),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)

FIELD_NAMES = sorted(
    {
        "type", "versions", "random", "suites", "key_wraps", "x25519", "max_record", "server_name", "ticket",
        "binder", "version", "suite", "key_wrap", "certificates", "client_auth", "resumed", "ticket_status",
        "wrapped_key", "scheme", "signature", "mac", "code", "request_update", "lifetime", "nonce", "tickets",
    }
)
MESSAGE_TYPES = sorted({*messages.HANDSHAKE_MESSAGES, *messages.CONTROL_MESSAGES, "bogus"})

field_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**40), max_value=2**40),
    st.binary(max_size=40), st.binary(min_size=32, max_size=32), st.text(max_size=20),
    st.lists(st.integers(min_value=-5, max_value=70000), max_size=20),
    st.lists(st.binary(min_size=1, max_size=8), max_size=10),
)
message_maps = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from(MESSAGE_TYPES),
    st.dictionaries(st.sampled_from(FIELD_NAMES[1:]), field_values, max_size=10),
)


@FUZZ
@given(head=st.binary(min_size=HEADER_LEN, max_size=HEADER_LEN),
       limits=st.dictionaries(st.integers(0, 255), st.integers(0, 2**32 - 1), max_size=4))
def test_parse_header_only_raises_protocol_errors(head: bytes, limits: dict[int, int]) -> None:
    try:
        ftype, length = parse_header(head, limits)
    except securechan.SecureChannelError:
        return
    assert head[0] == 0x92 and head[2] == 0xC6
    assert ftype in limits and length <= limits[ftype]


@pytest.mark.parametrize("ftype", list(FrameType))
def test_huge_declared_length_is_refused_from_the_head(ftype: FrameType) -> None:
    limits = {int(t): MAX_HANDSHAKE_BODY for t in FrameType}
    with pytest.raises(securechan.RecordOverflowError, match="limit"):
        parse_header(header(ftype, 2**32 - 1), limits)
    assert parse_header(header(ftype, MAX_HANDSHAKE_BODY), limits) == (ftype, MAX_HANDSHAKE_BODY)


@FUZZ
@given(body=st.binary(max_size=300))
def test_unpack_map_random_bytes(body: bytes) -> None:
    try:
        value = unpack_map(body, 256)
    except securechan.SecureChannelError:
        return
    assert isinstance(value, dict) and len(body) <= 256


@FUZZ
@given(value=msgpack_values)
def test_unpack_map_structured_values(value: Any) -> None:
    body = msgpack.packb(value, use_bin_type=True)
    try:
        out = unpack_map(body, 1024)
    except securechan.SecureChannelError:
        return
    assert isinstance(out, dict) and all(isinstance(k, str) for k in out)


@FUZZ
@given(value=msgpack_values, cut=st.integers(min_value=0, max_value=64), flip=st.integers(min_value=0, max_value=511))
def test_unpack_map_mutated_values(value: Any, cut: int, flip: int) -> None:
    body = bytearray(msgpack.packb({"type": "x", "v": value}, use_bin_type=True))
    if body:
        body[flip % len(body)] ^= 1 << (flip % 8)
    try:
        unpack_map(bytes(body[: max(0, len(body) - cut)]), 1024)
    except securechan.SecureChannelError:
        pass


@pytest.mark.parametrize("depth", [1_100, 20_000])
@pytest.mark.parametrize("opener", [b"\x91", b"\x81\xa1k"], ids=["arrays", "maps"])
def test_deeply_nested_msgpack_is_refused(depth: int, opener: bytes) -> None:
    """Nesting beyond the decoder's stack bound (1024 levels) is refused by the map decoder itself."""
    body = b"\x81\xa1k" + opener * depth + b"\xc0"  # {"k": [[[...nil...]]]}, complete and well-formed
    assert len(body) <= MAX_HANDSHAKE_BODY
    with pytest.raises(securechan.DecodeError):
        unpack_map(body, MAX_HANDSHAKE_BODY)


@pytest.mark.parametrize("depth", [2, 50, 900])
def test_nested_handshake_message_is_refused_by_the_connection(server_config, depth: int) -> None:
    """Shallower nesting decodes as msgpack but no message field accepts it: decode_error on the wire."""
    body = b"\x82\xa4type\xacclient_hello\xa8versions" + b"\x91" * depth + b"\x01"
    conn = securechan.Connection(server_config)
    with pytest.raises(securechan.DecodeError):
        conn.receive_data(encode_frame(FrameType.HANDSHAKE, body))
    out = conn.data_to_send()
    assert out[1] == FrameType.ALERT and unpack_map(out[HEADER_LEN:], 64)["code"] == securechan.AlertCode.DECODE_ERROR


def test_nested_values_in_message_fields_are_refused() -> None:
    body = pack_map({"type": "finished", "mac": [[[[b"x" * 32]]]]})
    with pytest.raises(securechan.DecodeError, match="mac"):
        messages.decode_message(unpack_map(body, MAX_HANDSHAKE_BODY), messages.HANDSHAKE_MESSAGES)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (pack_map({f"k{i}": i for i in range(1000)}), securechan.DecodeError),  # too many keys
        (pack_map({"type": "x", "l": list(range(10_000))}), securechan.DecodeError),  # array too long
        (b"\x81\xa1k\xdd\xff\xff\xff\xff", securechan.DecodeError),  # array header claims 4 G entries
        (b"\x81\xa1k\xc6\xff\xff\xff\xff", securechan.DecodeError),  # bin header claims 4 GiB
        (b"\xdf\xff\xff\xff\xff", securechan.DecodeError),  # map header claims 4 G entries
        (b"\x81\xa1k\xc7\x01\x05\x00", securechan.DecodeError),  # ext type
        (b"\x81\x01\x02", securechan.DecodeError),  # non-string key
        (b"\x81\xa1k\xc0\xc0", securechan.DecodeError),  # trailing bytes
        (b"\x92\x01\x02", securechan.DecodeError),  # an array, not a map
        (b"\x81\xa1k" + b"\xc5\xff\xff" + bytes(100), securechan.DecodeError),  # truncated bin
        (bytes(MAX_HANDSHAKE_BODY + 1), securechan.RecordOverflowError),  # over the message limit
    ],
    ids=["many-keys", "long-array", "array-4G", "bin-4G", "map-4G", "ext", "int-key", "trailing", "not-map",
         "truncated", "oversized"],
)
def test_oversized_or_malformed_msgpack_is_refused(body: bytes, error: type) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(error):
            unpack_map(body, MAX_HANDSHAKE_BODY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(body) + 1024 * 1024, f"decoding a {len(body)}-byte body allocated {peak} bytes"


@FUZZ
@given(m=message_maps)
def test_message_decoders_only_raise_decode_errors(m: dict[str, Any]) -> None:
    for table in (messages.HANDSHAKE_MESSAGES, messages.CONTROL_MESSAGES):
        try:
            decoded = messages.decode_message(m, table)
        except securechan.SecureChannelError:
            continue
        # Whatever decodes re-encodes to a map that decodes to the same message.
        again = messages.decode_message(unpack_map(pack_map(decoded.encode()), MAX_HANDSHAKE_BODY), table)
        assert again == decoded


@FUZZ
@given(m=message_maps, junk=st.binary(max_size=8))
def test_message_decoders_through_the_wire_encoding(m: dict[str, Any], junk: bytes) -> None:
    body = pack_map(m) + junk
    frame = encode_frame(FrameType.HANDSHAKE, body)
    try:
        _, length = parse_header(frame[:HEADER_LEN], {FrameType.HANDSHAKE: MAX_HANDSHAKE_BODY})
        m = unpack_map(frame[HEADER_LEN : HEADER_LEN + length], length)
        messages.decode_message(m, messages.HANDSHAKE_MESSAGES)
    except securechan.SecureChannelError:
        pass


def test_valid_messages_round_trip() -> None:
    """Control case for the fuzzers: well-formed messages do decode (the fuzzers are not vacuous)."""
    hello = messages.ClientHello(
        versions=(1,), random=bytes(32), suites=(1, 2), key_wraps=(1,), x25519=bytes(32), max_record=65536,
        server_name="db.internal",
    )
    for msg, table in (
        (hello, messages.HANDSHAKE_MESSAGES),
        (messages.Finished(mac=bytes(32)), messages.HANDSHAKE_MESSAGES),
        (messages.KeyExchange(wrapped_key=b"w" * 256), messages.HANDSHAKE_MESSAGES),
        (messages.Alert(code=20), messages.CONTROL_MESSAGES),
        (messages.KeyUpdate(request_update=True), messages.CONTROL_MESSAGES),
        (messages.CloseNotify(), messages.CONTROL_MESSAGES),
    ):
        assert messages.decode_message(unpack_map(pack_map(msg.encode()), MAX_HANDSHAKE_BODY), table) == msg
