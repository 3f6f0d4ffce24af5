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
#: The secrets every handshake derives from its handshake secret and th1, in this order.
HANDSHAKE_LABELS = ("c finished", "s finished", "c ap traffic", "s ap traffic", "exporter", "resumption")

# One hash-algorithm object for every KDF call: it is an immutable descriptor, and building a
# new one per call was a measurable part of each HKDF-Expand-Label.
_SHA256 = hashes.SHA256()


def _label_head(label: bytes, length: int) -> bytes:
    """HkdfLabel up to (not including) the context length byte."""
    full = LABEL_PREFIX + label
    return struct.pack(">HB", length, len(full)) + full


def hkdf_label(label: bytes, context: bytes, length: int) -> bytes:
    return _label_head(label, length) + struct.pack(">B", len(context)) + context


def expand_label(secret: bytes | bytearray, label: bytes, context: bytes, length: int) -> bytes:
    return HKDFExpand(_SHA256, length, hkdf_label(label, context, length)).derive(secret)


def extract(salt: bytes, ikm: bytes) -> bytes:
    return HKDF.extract(_SHA256, salt, ikm)


# HkdfLabel of the fixed labels, encoded once. The handshake labels are stored up to and
# including the context length byte (the context, th1, is always HASH_LEN bytes).
_HANDSHAKE_INFO = tuple(
    (label, _label_head(label.encode(), HASH_LEN) + struct.pack(">B", HASH_LEN)) for label in HANDSHAKE_LABELS
)
_KEY_INFO = {n: hkdf_label(b"key", b"", n) for n in (16, 32)}
_IV_INFO = hkdf_label(b"iv", b"", NONCE_LEN)
_UPDATE_INFO = hkdf_label(b"traffic upd", b"", HASH_LEN)


def handshake_secrets(
    ikm: bytes, transcript_hash: bytes, salt: bytes = SALT_V1, *, resumption: bool = True
) -> dict[str, bytes]:
    """Extract the handshake secret and expand the secrets of HANDSHAKE_LABELS from it (bound to th1).

    ``resumption=False`` leaves out the resumption secret when this side will never use it
    (no tickets on this connection). The handshake secret itself is not kept.
    """
    if len(transcript_hash) != HASH_LEN:
        raise ValueError("the transcript hash must be a SHA-256 digest")
    secret = extract(salt, ikm)
    return {
        label: HKDFExpand(_SHA256, HASH_LEN, info + transcript_hash).derive(secret)
        for label, info in _HANDSHAKE_INFO
        if resumption or label != "resumption"
    }


def finished_mac(finished_key: bytes, transcript_hash: bytes) -> bytes:
    return hmac.digest(finished_key, transcript_hash, "sha256")


def traffic_key_iv(secret: bytes | bytearray, suite: Suite) -> tuple[bytes, bytes]:
    key_len = suite.key_len
    key_info = _KEY_INFO.get(key_len) or hkdf_label(b"key", b"", key_len)
    return (
        HKDFExpand(_SHA256, key_len, key_info).derive(secret),
        HKDFExpand(_SHA256, NONCE_LEN, _IV_INFO).derive(secret),
    )


def next_traffic_secret(secret: bytes | bytearray) -> bytes:
    return HKDFExpand(_SHA256, HASH_LEN, _UPDATE_INFO).derive(secret)


def ticket_psk(resumption_secret: bytes, ticket_nonce: bytes) -> bytes:
    return expand_label(resumption_secret, b"ticket psk", ticket_nonce, HASH_LEN)


def binder_mac(psk: bytes, partial_hello_hash: bytes) -> bytes:
    binder_key = expand_label(extract(SALT_BINDER, psk), b"res binder", b"", HASH_LEN)
    return hmac.digest(binder_key, partial_hello_hash, "sha256")


class Transcript:
    """Running SHA-256 over whole handshake frames, in wire order."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def add(self, frame: bytes) -> None:
        self._hash.update(frame)

    def digest(self) -> bytes:
        return self._hash.copy().digest()


def export_keying_material(exporter_secret: bytes | bytearray, label: bytes, context: bytes, length: int) -> bytes:
    """RFC 5705-style exporter for channel binding: same inputs on both ends give the same bytes."""
    if not 0 < length <= 255 * HASH_LEN:
        raise ValueError("exporter length must be between 1 and 8160 bytes")
    if len(label) > 200:
        raise ValueError("exporter label must be at most 200 bytes")
    derived = expand_label(exporter_secret, label, b"", HASH_LEN)
    info = hkdf_label(b"exporter", hashlib.sha256(context).digest(), length)
    return HKDFExpand(_SHA256, length, info).derive(derived)
