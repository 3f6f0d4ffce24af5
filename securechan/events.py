"""Events that :class:`securechan.Connection` returns from ``receive_data``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509


@dataclass(frozen=True)
class SessionInfo:
    """What was negotiated; ``get_extra_info("securechan")`` returns this."""

    version: int
    suite: str
    resumed: bool
    role: str
    server_name: str | None
    #: The peer's verified chain, leaf first (empty for an unauthenticated client).
    peer_chain: tuple[x509.Certificate, ...]
    max_record_size: int
    _exporter: Callable[[bytes, bytes, int], bytes] = field(repr=False, compare=False)
    #: The application protocol both sides agreed on (``alpn_protocols`` in the configs), or None.
    alpn_protocol: str | None = None

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        return self.peer_chain[0] if self.peer_chain else None

    def export_keying_material(self, label: bytes, context: bytes = b"", length: int = 32) -> bytes:
        """Channel binding (RFC 5705 style): both ends get the same bytes for the same label/context."""
        return self._exporter(label, context, length)


class Event:
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    session: SessionInfo


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    data: bytes | bytearray


@dataclass(frozen=True, slots=True)
class PeerClosed(Event):
    """The peer sent close_notify: it will send no more data (it may still read)."""


@dataclass(frozen=True, slots=True)
class KeysUpdated(Event):
    """A traffic key was ratcheted. ``sending`` tells which direction; ``generation`` counts updates."""

    sending: bool
    generation: int
