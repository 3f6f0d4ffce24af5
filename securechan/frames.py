"""Frame layer: every frame is one msgpack value, ``[type, bin]``, with a fixed 7-byte head.

A frame is the msgpack array ``[frame_type, body]`` where ``frame_type`` is a positive
fixint and ``body`` is always encoded as ``bin 32``. On the wire that is::

    0x92  <type: 1 byte>  0xc6  <length: uint32 big-endian>  <body: length bytes>

Fixing the encoding makes the head exactly ``HEADER_LEN`` bytes, so a receiver learns the
body length from the first seven bytes and refuses an oversized frame before it buffers
the body. Any msgpack library decodes a frame; this module refuses every other encoding.

Handshake, plaintext-alert and control bodies are themselves msgpack maps, decoded
strictly by :func:`unpack_map`.
"""

from __future__ import annotations

import enum
import struct
import threading
from typing import Any

import msgpack

from .errors import DecodeError, RecordOverflowError, UnexpectedMessageError

HEADER_LEN = 7
_HEAD = struct.Struct(">BBBI")
_ARRAY2 = 0x92
_BIN32 = 0xC6


class FrameType(enum.IntEnum):
    HANDSHAKE = 1  # plaintext handshake message (msgpack map)
    ALERT = 2  # plaintext alert, only before the sender's handshake is complete (msgpack map)
    APPLICATION_DATA = 3  # AEAD-protected application bytes
    CONTROL = 4  # AEAD-protected control message (msgpack map)


#: Largest plaintext handshake or alert body accepted (certificate chains live here).
MAX_HANDSHAKE_BODY = 64 * 1024
#: Largest plaintext inside a CONTROL record.
MAX_CONTROL_PLAINTEXT = 16 * 1024
#: AEAD tag length of every suite.
TAG_LEN = 16
#: Hard bounds of the negotiable record size (plaintext bytes per APPLICATION_DATA record).
MIN_RECORD_SIZE = 1024
MAX_RECORD_SIZE = 1024 * 1024
#: Default chosen by measurement (benchmarks/README.md): large enough that per-record
#: overhead is small, small enough that the receive buffer stays modest.
DEFAULT_RECORD_SIZE = 64 * 1024


def header(frame_type: int, length: int) -> bytes:
    return _HEAD.pack(_ARRAY2, frame_type, _BIN32, length)


def encode_frame(frame_type: FrameType, body: bytes) -> bytes:
    return _HEAD.pack(_ARRAY2, frame_type, _BIN32, len(body)) + body


def parse_header(head: bytes | bytearray | memoryview, limits: dict[int, int]) -> tuple[FrameType, int]:
    """Validate a 7-byte frame head and return (type, body length).

    ``limits`` maps each acceptable frame type to its largest body; a type absent from it
    is refused. The length is checked here, before any body byte is buffered.
    """
    marker, ftype, binmark, length = _HEAD.unpack_from(head)
    if marker != _ARRAY2 or binmark != _BIN32:
        raise DecodeError(_not_securechan_hint(bytes(head[:HEADER_LEN])))
    limit = limits.get(ftype)
    if limit is None:
        try:
            name = FrameType(ftype).name
        except ValueError:
            raise DecodeError(f"unknown frame type {ftype}") from None
        raise UnexpectedMessageError(f"a {name} frame is not allowed at this point of the protocol")
    if length > limit:
        raise RecordOverflowError(
            f"peer sent a {FrameType(ftype).name} frame of {length} bytes; the limit is {limit}"
        )
    return FrameType(ftype), length


def _not_securechan_hint(head: bytes) -> str:
    if head[:1] == b"\x16" and head[1:2] == b"\x03":
        return "peer is speaking TLS, not securechan: point a securechan client at a securechan server"
    if head[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ", b"HTTP"):
        return "peer is speaking HTTP, not securechan: is this port the plain service rather than the tunnel?"
    if head[:4] == b"SSH-":
        return "peer is speaking SSH, not securechan"
    if head[:1] in (b"*", b"+", b"-", b"$", b":"):
        return "peer looks like a plain-text service (e.g. Redis), not a securechan endpoint"
    return "malformed frame header: the peer is not speaking securechan protocol v1"


_packers = threading.local()


def pack_map(message: dict[str, Any]) -> bytes:
    # One Packer per thread, reused: msgpack.packb builds a Packer, and its 256 KiB buffer, per call.
    # Our maps hold only builtin types (str, bytes, int, bool, lists), so packing never calls back
    # into Python code that could re-enter this packer; a failed pack resets its buffer.
    packer: msgpack.Packer | None = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(message)


def _no_ext(code: int, data: bytes) -> Any:
    raise DecodeError("msgpack extension types are not allowed")


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise DecodeError("a msgpack map repeats a key")
    return result


def unpack_map(body: bytes | memoryview, max_len: int) -> dict[str, Any]:
    """Decode one msgpack map strictly: str keys, no ext types, bounded sizes, no trailing bytes."""
    if len(body) > max_len:
        raise RecordOverflowError(f"message of {len(body)} bytes exceeds the limit of {max_len}")
    try:
        value = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_no_ext,
            object_pairs_hook=_pairs,
            max_bin_len=max_len,
            max_str_len=max_len,
            max_array_len=64,
            max_map_len=32,
        )
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types; all mean malformed input
        raise DecodeError(f"malformed msgpack message: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise DecodeError(f"expected a msgpack map, got {type(value).__name__}")
    return value
