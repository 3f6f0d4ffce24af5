"""The key schedule: HKDF-SHA256 over the wrapped key and the X25519 secret, bound to the transcript.

Labels are encoded as in TLS 1.3's HKDF-Expand-Label (RFC 8446 §7.1) with the prefix
``"sc1 "``::

    HkdfLabel = uint16 length || uint8 len(label) || "sc1 " + label || uint8 len(context) || context

Full handshake::

    handshake_secret = HKDF-Extract(salt = "securechan v1", ikm = wrapped_key_secret || x25519_secret)
    th1 = SHA-256(ClientHello || ServerHello || [ClientCertificate] || KeyExchange)   (whole frames)
    c_finished_key   = Expand-Label(handshake_secret, "c finished", th1, 32)
    s_finished_key   = Expand-Label(handshake_secret, "s finished", th1, 32)
    c_traffic_secret = Expand-Label(handshake_secret, "c ap traffic", th1, 32)
    s_traffic_secret = Expand-Label(handshake_secret, "s ap traffic", th1, 32)
    exporter_secret  = Expand-Label(handshake_secret, "exporter", th1, 32)
    resumption_secret= Expand-Label(handshake_secret, "resumption", th1, 32)

Resumed handshake (docs/PROTOCOL.md, "Resumption")::

    psk              = Expand-Label(resumption_secret, "ticket psk", ticket_nonce, 32)   (per ticket)
    binder_key       = Expand-Label(HKDF-Extract("securechan v1 binder", psk), "res binder", "", 32)
    binder           = HMAC-SHA256(binder_key, SHA-256(ClientHello frame without its last 32 bytes))
    handshake_secret = HKDF-Extract(salt = "securechan v1 resumption", ikm = psk || x25519_secret)
    th1 = SHA-256(ClientHello || ServerHello); the six secrets above are derived from th1 alike.

Traffic keys: key = Expand-Label(secret, "key", "", key_len); iv = Expand-Label(secret, "iv", "", 12).
Key update: next_secret = Expand-Label(secret, "traffic upd", "", 32).
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from .suites import NONCE_LEN, Suite

HASH_LEN = 32
SALT_V1 = b"securechan v1"
SALT_RESUMPTION = b"securechan v1 resumption"
SALT_BINDER = b"securechan v1 binder"
LABEL_PREFIX = b"sc1 "


def hkdf_label(label: bytes, context: bytes, length: int) -> bytes:
    full = LABEL_PREFIX + label
    return struct.pack(">HB", length, len(full)) + full + struct.pack(">B", len(context)) + context


def expand_label(secret: bytes | bytearray, label: bytes, context: bytes, length: int) -> bytes:
    return HKDFExpand(hashes.SHA256(), length, hkdf_label(label, context, length)).derive(secret)


def extract(salt: bytes, ikm: bytes) -> bytes:
    return HKDF.extract(hashes.SHA256(), salt, ikm)


def finished_mac(finished_key: bytes, transcript_hash: bytes) -> bytes:
    return hmac.new(finished_key, transcript_hash, hashlib.sha256).digest()


def traffic_key_iv(secret: bytes | bytearray, suite: Suite) -> tuple[bytes, bytes]:
    return expand_label(secret, b"key", b"", suite.key_len), expand_label(secret, b"iv", b"", NONCE_LEN)


def next_traffic_secret(secret: bytes | bytearray) -> bytes:
    return expand_label(secret, b"traffic upd", b"", HASH_LEN)


def ticket_psk(resumption_secret: bytes, ticket_nonce: bytes) -> bytes:
    return expand_label(resumption_secret, b"ticket psk", ticket_nonce, HASH_LEN)


def binder_mac(psk: bytes, partial_hello_hash: bytes) -> bytes:
    binder_key = expand_label(extract(SALT_BINDER, psk), b"res binder", b"", HASH_LEN)
    return hmac.new(binder_key, partial_hello_hash, hashlib.sha256).digest()


class Transcript:
    """Running SHA-256 over whole handshake frames, in wire order."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, frame: bytes) -> None:
        self._hash.update(frame)

    def digest(self) -> bytes:
        return self._hash.copy().digest()


class KeySchedule:
    """Derives every secret of one connection from its handshake inputs."""

    def __init__(self, ikm: bytes, salt: bytes = SALT_V1) -> None:
        self._secret = extract(salt, ikm)

    def derive(self, label: bytes, transcript_hash: bytes) -> bytes:
        return expand_label(self._secret, label, transcript_hash, HASH_LEN)

    def wipe(self) -> None:
        self._secret = b""


def export_keying_material(exporter_secret: bytes | bytearray, label: bytes, context: bytes, length: int) -> bytes:
    """RFC 5705-style exporter for channel binding: same inputs on both ends give the same bytes."""
    if not 0 < length <= 255 * HASH_LEN:
        raise ValueError("exporter length must be between 1 and 8160 bytes")
    if len(label) > 200:
        raise ValueError("exporter label must be at most 200 bytes")
    derived = expand_label(exporter_secret, label, b"", HASH_LEN)
    info = hkdf_label(b"exporter", hashlib.sha256(context).digest(), length)
    return HKDFExpand(hashes.SHA256(), length, info).derive(derived)
