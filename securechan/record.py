"""Record protection, one object per direction.

nonce = iv XOR seq (seq is a 64-bit big-endian counter in the last 8 bytes of the 12-byte
iv); the counter starts at 0 for every traffic secret and is never reset otherwise, so a
(key, nonce) pair is never used twice. The frame head is the AAD, so a record's type and
length are authenticated along with its body. A sequence mismatch (dropped, reordered,
replayed or foreign record) surfaces as a tag failure.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from .errors import BadRecordMACError, DecodeError, InternalError, ProtocolError
from .frames import TAG_LEN
from .keyschedule import next_traffic_secret, traffic_key_iv
from .suites import Suite

_HEAD = struct.Struct(">BBBI")
_SEQ_LIMIT = 2**64 - 1
#: A peer must update its key before it sends this much under one key (hard ceiling).
RECV_LIMIT_RECORDS = 2**25
RECV_LIMIT_BYTES = 2**36


class _Direction:
    def __init__(self, suite: Suite, secret: bytes) -> None:
        self.suite = suite
        self.generation = 0
        self._install(secret)

    def _install(self, secret: bytes) -> None:
        key, iv = traffic_key_iv(secret, self.suite)
        #: A bytearray securechan owns, so it can be overwritten on update and on wipe.
        self._secret = bytearray(secret)
        self._aead: AESGCM | ChaCha20Poly1305 | None = self.suite.aead(key)
        self._iv = int.from_bytes(iv, "big")
        #: records and plaintext bytes protected under the current key
        self.seq = 0
        self.bytes = 0

    def update(self) -> None:
        """Ratchet to the next traffic secret (KeyUpdate)."""
        old = self._secret
        self._install(next_traffic_secret(old))
        old[:] = bytes(len(old))
        self.generation += 1

    def wipe(self) -> None:
        """Overwrite the traffic secret and drop the AEAD object (its key copy lives inside OpenSSL)."""
        self._secret[:] = bytes(len(self._secret))
        self._secret = bytearray()
        self._iv = 0
        self._aead = None


class Sealer(_Direction):
    """Protects outgoing records."""

    def seal_parts(self, ftype: int, payload: memoryview | bytes) -> tuple[bytes, bytes]:
        """One whole frame as two buffers: its head, then ciphertext and tag (the head is the AAD)."""
        # The nonce is computed inline (no call per record): this runs for every record sent.
        seq = self.seq
        if seq >= _SEQ_LIMIT:  # unreachable with automatic key updates; never wrap
            raise InternalError("record sequence number exhausted; the connection must be re-established")
        n = len(payload)
        head = _HEAD.pack(0x92, ftype, 0xC6, n + TAG_LEN)
        self.seq = seq + 1
        sealed = self._aead.encrypt((self._iv ^ seq).to_bytes(12, "big"), payload, head)  # type: ignore[union-attr]
        self.bytes += n
        return head, sealed

    def seal(self, ftype: int, payload: bytes) -> bytes:
        head, sealed = self.seal_parts(ftype, payload)
        return head + sealed


class Opener(_Direction):
    """Authenticates and decrypts incoming records. Nothing is returned unless the tag verifies."""

    def open(self, head: bytes | bytearray | memoryview, body: memoryview) -> bytes:
        if len(body) < TAG_LEN:
            raise DecodeError("protected record shorter than its tag")
        seq = self.seq
        # RECV_LIMIT_RECORDS is far below 2**64, so this check also keeps the counter from wrapping.
        if seq >= RECV_LIMIT_RECORDS or self.bytes >= RECV_LIMIT_BYTES:
            raise ProtocolError("the peer exceeded the per-key usage limit without a key update")
        self.seq = seq + 1
        # ``decrypt`` allocates the plaintext itself and returns it only once the tag verified;
        # the fresh bytes object goes to the application as is (no zeroed buffer, no second copy).
        try:
            out = self._aead.decrypt((self._iv ^ seq).to_bytes(12, "big"), body, head)  # type: ignore[union-attr]
        except InvalidTag:
            raise BadRecordMACError(
                "a record failed authentication (tampered, reordered, replayed or injected); "
                "the connection was closed and none of this record's bytes were delivered"
            ) from None
        self.bytes += len(out)
        return out
