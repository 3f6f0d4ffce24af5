"""Handshake, alert and control messages: dataclasses with strict to/from msgpack-map codecs.

Each ``decode`` checks every field's type and bounds and refuses missing required fields.
Unknown keys are refused everywhere except in ClientHello, where they are ignored so that
a later client can offer extensions to this server (the transcript still covers them).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import DecodeError
from .frames import MAX_RECORD_SIZE, MIN_RECORD_SIZE

MAX_CERT_LEN = 16 * 1024
MAX_CHAIN_LEN = 8
MAX_WRAPPED_KEY_LEN = 1024  # RSA-8192
MAX_SIGNATURE_LEN = 1024
MAX_TICKET_LEN = 12 * 1024  # room for a client chain of a few certificates
BINDER_LEN = 32
MAX_NAME_LEN = 253
_HOSTNAME = re.compile(r"[A-Za-z0-9_.-]+")
MAX_LIST_LEN = 16
MAX_PROTOCOL_LEN = 64
_PROTOCOL = re.compile(r"[\x21-\x7e]+")

# The fields each strictly decoded message may carry.
_SERVER_HELLO_KEYS = frozenset({
    "type", "version", "random", "suite", "key_wrap", "x25519", "max_record", "certificates",
    "client_auth", "resumed", "ticket_status", "alpn",
})
_KEY_EXCHANGE_KEYS = frozenset({"type", "wrapped_key"})
_CLIENT_CERTIFICATE_KEYS = frozenset({"type", "certificates", "scheme", "signature"})
_FINISHED_KEYS = frozenset({"type", "mac"})
_ALERT_KEYS = frozenset({"type", "code"})
_TYPE_ONLY = frozenset({"type"})
_KEY_UPDATE_KEYS = frozenset({"type", "request_update"})
_NEW_TICKET_KEYS = frozenset({"type", "ticket", "lifetime", "nonce"})


def is_dns_name(name: str) -> bool:
    """The ClientHello's rule for ``server_name``: 1-253 letters, digits, '-', '_' and '.'."""
    return 0 < len(name) <= MAX_NAME_LEN and _HOSTNAME.fullmatch(name) is not None


def is_protocol_name(name: str) -> bool:
    """The rule for an application protocol name (``alpn``): 1-64 printable ASCII characters, no spaces."""
    return 0 < len(name) <= MAX_PROTOCOL_LEN and _PROTOCOL.fullmatch(name) is not None


def _get(m: dict[str, Any], key: str, kind: type | tuple[type, ...], required: bool = True) -> Any:
    if key not in m:
        if required:
            raise DecodeError(f"{m.get('type', 'message')}: missing field {key!r}")
        return None
    value = m[key]
    # bool is an int subclass; never accept one for the other.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DecodeError(f"{m.get('type', 'message')}: field {key!r} has the wrong type")
    return value


def _int(m: dict[str, Any], key: str, lo: int, hi: int, required: bool = True) -> Any:
    value = _get(m, key, int, required)
    if value is not None and not lo <= value <= hi:
        raise DecodeError(f"{m.get('type', 'message')}: field {key!r} out of range")
    return value


def _bin(m: dict[str, Any], key: str, lo: int, hi: int, required: bool = True) -> Any:
    value = _get(m, key, bytes, required)
    if value is not None and not lo <= len(value) <= hi:
        raise DecodeError(f"{m.get('type', 'message')}: field {key!r} has a bad length")
    return value


def _int_list(m: dict[str, Any], key: str) -> tuple[int, ...]:
    value = _get(m, key, list)
    ok = 1 <= len(value) <= MAX_LIST_LEN
    for v in value:  # a plain loop: this runs for every hello, and a generator costs more
        if not ok:
            break
        ok = isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**16
    if not ok:
        raise DecodeError(f"{m.get('type', 'message')}: field {key!r} must be a list of 1-16 small integers")
    return tuple(value)


def _list(m: dict[str, Any], key: str, max_items: int, item_ok: Callable[[Any], bool], what: str,
          required: bool) -> tuple[Any, ...] | None:
    """A list field of 1..``max_items`` items, each passing ``item_ok``; None if optional and absent."""
    value = _get(m, key, list, required)
    if value is None:
        return None
    ok = 1 <= len(value) <= max_items
    for v in value:
        if not ok:
            break
        ok = item_ok(v)
    if not ok:
        raise DecodeError(f"{m.get('type', 'message')}: field {key!r} must be a list of 1-{max_items} {what}")
    return tuple(value)


def _bin_list(m: dict[str, Any], key: str, max_items: int, max_item: int, required: bool = True) -> Any:
    return _list(m, key, max_items, lambda v: isinstance(v, bytes) and 0 < len(v) <= max_item, "byte strings",
                 required)


def _protocol(m: dict[str, Any], key: str) -> str | None:
    value: str | None = _get(m, key, str, required=False)
    if value is not None and not is_protocol_name(value):
        raise DecodeError(f"{m.get('type', 'message')}: field {key!r} must be 1-64 printable ASCII characters")
    return value


def _protocol_list(m: dict[str, Any], key: str) -> tuple[str, ...]:
    return _list(m, key, MAX_LIST_LEN, _is_protocol_item, "protocol names", required=False) or ()


def _is_protocol_item(v: Any) -> bool:
    return isinstance(v, str) and is_protocol_name(v)


def _exact_keys(m: dict[str, Any], allowed: frozenset[str]) -> None:
    if not allowed.issuperset(m):
        extra = set(m) - allowed
        raise DecodeError(f"{m.get('type', 'message')}: unexpected fields {sorted(extra)}")


@dataclass(frozen=True)
class ClientHello:
    TYPE: ClassVar[str] = "client_hello"
    versions: tuple[int, ...]
    random: bytes
    suites: tuple[int, ...]
    key_wraps: tuple[int, ...]
    x25519: bytes
    max_record: int
    server_name: str | None = None
    #: The client keeps session tickets: the server may send new_ticket (see docs/PROTOCOL.md).
    accept_tickets: bool = False
    #: Application protocols the client speaks over this channel, in its preference order (empty: none offered).
    alpn: tuple[str, ...] = ()
    #: Opaque session ticket for resumption (see docs/PROTOCOL.md).
    ticket: bytes | None = None
    #: HMAC proving the client holds the ticket's PSK; present exactly when ``ticket`` is.
    #: Encoded as the LAST field, so it is the last 32 bytes of the frame (the binder covers
    #: the frame up to it). Fields added later must be encoded before it.
    binder: bytes | None = None

    def encode(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "type": self.TYPE,
            "versions": list(self.versions),
            "random": self.random,
            "suites": list(self.suites),
            "key_wraps": list(self.key_wraps),
            "x25519": self.x25519,
            "max_record": self.max_record,
        }
        if self.server_name is not None:
            m["server_name"] = self.server_name
        if self.accept_tickets:
            m["tickets"] = True
        if self.alpn:
            m["alpn"] = list(self.alpn)
        if self.ticket is not None:
            m["ticket"] = self.ticket
        if self.binder is not None:
            m["binder"] = self.binder
        return m

    def with_ticket(self, ticket: bytes, binder: bytes) -> ClientHello:
        """This hello offering ``ticket`` with ``binder`` (dataclasses.replace, without its introspection)."""
        return ClientHello(
            versions=self.versions, random=self.random, suites=self.suites, key_wraps=self.key_wraps,
            x25519=self.x25519, max_record=self.max_record, server_name=self.server_name,
            accept_tickets=self.accept_tickets, alpn=self.alpn, ticket=ticket, binder=binder,
        )

    @classmethod
    def decode(cls, m: dict[str, Any]) -> ClientHello:
        name = _get(m, "server_name", str, required=False)
        if name is not None and not is_dns_name(name):
            raise DecodeError("client_hello: server_name must be a DNS name of 1-253 letters, digits, '-', '_' and '.'")
        return cls(
            versions=_int_list(m, "versions"),
            random=_bin(m, "random", 32, 32),
            suites=_int_list(m, "suites"),
            key_wraps=_int_list(m, "key_wraps"),
            x25519=_bin(m, "x25519", 32, 32),
            max_record=_int(m, "max_record", MIN_RECORD_SIZE, MAX_RECORD_SIZE),
            server_name=name,
            accept_tickets=_get(m, "tickets", bool, required=False) or False,
            alpn=_protocol_list(m, "alpn"),
            ticket=_bin(m, "ticket", 1, MAX_TICKET_LEN, required=False),
            binder=_binder(m),
        )


def _binder(m: dict[str, Any]) -> bytes | None:
    binder: bytes | None = _bin(m, "binder", BINDER_LEN, BINDER_LEN, required=False)
    if (binder is None) != ("ticket" not in m):
        raise DecodeError("client_hello: a ticket and its binder come together")
    if binder is not None and next(reversed(m)) != "binder":
        raise DecodeError("client_hello: the binder must be the last field")
    return binder


@dataclass(frozen=True)
class ServerHello:
    TYPE: ClassVar[str] = "server_hello"
    version: int
    random: bytes
    suite: int
    key_wrap: int
    x25519: bytes
    max_record: int
    certificates: tuple[bytes, ...] = ()
    #: Signature schemes the server accepts for a client certificate; empty = none requested.
    client_auth: tuple[int, ...] = ()
    #: True when the server accepted the ClientHello's ticket (resumed handshake).
    resumed: bool = False
    #: Why an offered ticket was not used (securechan.tickets.TicketStatus; 0 = none offered or accepted).
    ticket_status: int = 0
    #: The application protocol chosen from the client's ``alpn`` list (None: none chosen).
    alpn: str | None = None

    def encode(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "type": self.TYPE,
            "version": self.version,
            "random": self.random,
            "suite": self.suite,
            "key_wrap": self.key_wrap,
            "x25519": self.x25519,
            "max_record": self.max_record,
        }
        if self.certificates:
            m["certificates"] = list(self.certificates)
        if self.client_auth:
            m["client_auth"] = list(self.client_auth)
        if self.resumed:
            m["resumed"] = True
        if self.ticket_status:
            m["ticket_status"] = self.ticket_status
        if self.alpn is not None:
            m["alpn"] = self.alpn
        return m

    @classmethod
    def decode(cls, m: dict[str, Any]) -> ServerHello:
        _exact_keys(m, _SERVER_HELLO_KEYS)
        resumed = _get(m, "resumed", bool, required=False) or False
        certs = _bin_list(m, "certificates", MAX_CHAIN_LEN, MAX_CERT_LEN, required=not resumed)
        if resumed and certs:
            raise DecodeError("server_hello: a resumed handshake carries no certificates")
        return cls(
            version=_int(m, "version", 0, 2**16 - 1),
            random=_bin(m, "random", 32, 32),
            suite=_int(m, "suite", 0, 2**16 - 1),
            key_wrap=_int(m, "key_wrap", 0, 2**16 - 1),
            x25519=_bin(m, "x25519", 32, 32),
            max_record=_int(m, "max_record", MIN_RECORD_SIZE, MAX_RECORD_SIZE),
            certificates=certs or (),
            client_auth=_int_list(m, "client_auth") if "client_auth" in m else (),
            resumed=resumed,
            ticket_status=_int(m, "ticket_status", 1, 255, required=False) or 0,
            alpn=_protocol(m, "alpn"),
        )


@dataclass(frozen=True)
class KeyExchange:
    TYPE: ClassVar[str] = "key_exchange"
    wrapped_key: bytes

    def encode(self) -> dict[str, Any]:
        return {"type": self.TYPE, "wrapped_key": self.wrapped_key}

    @classmethod
    def decode(cls, m: dict[str, Any]) -> KeyExchange:
        _exact_keys(m, _KEY_EXCHANGE_KEYS)
        return cls(wrapped_key=_bin(m, "wrapped_key", 1, MAX_WRAPPED_KEY_LEN))


@dataclass(frozen=True)
class ClientCertificate:
    """The client's chain and its signature over the transcript (mutual authentication)."""

    TYPE: ClassVar[str] = "client_certificate"
    certificates: tuple[bytes, ...]
    scheme: int
    signature: bytes

    def encode(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "certificates": list(self.certificates),
            "scheme": self.scheme,
            "signature": self.signature,
        }

    @classmethod
    def decode(cls, m: dict[str, Any]) -> ClientCertificate:
        _exact_keys(m, _CLIENT_CERTIFICATE_KEYS)
        return cls(
            certificates=_bin_list(m, "certificates", MAX_CHAIN_LEN, MAX_CERT_LEN),
            scheme=_int(m, "scheme", 0, 2**16 - 1),
            signature=_bin(m, "signature", 1, MAX_SIGNATURE_LEN),
        )


@dataclass(frozen=True)
class Finished:
    TYPE: ClassVar[str] = "finished"
    mac: bytes

    def encode(self) -> dict[str, Any]:
        return {"type": self.TYPE, "mac": self.mac}

    @classmethod
    def decode(cls, m: dict[str, Any]) -> Finished:
        _exact_keys(m, _FINISHED_KEYS)
        return cls(mac=_bin(m, "mac", 32, 32))


@dataclass(frozen=True)
class Alert:
    TYPE: ClassVar[str] = "alert"
    code: int

    def encode(self) -> dict[str, Any]:
        return {"type": self.TYPE, "code": self.code}

    @classmethod
    def decode(cls, m: dict[str, Any]) -> Alert:
        _exact_keys(m, _ALERT_KEYS)
        return cls(code=_int(m, "code", 0, 255))


@dataclass(frozen=True)
class CloseNotify:
    TYPE: ClassVar[str] = "close_notify"

    def encode(self) -> dict[str, Any]:
        return {"type": self.TYPE}

    @classmethod
    def decode(cls, m: dict[str, Any]) -> CloseNotify:
        _exact_keys(m, _TYPE_ONLY)
        return cls()


@dataclass(frozen=True)
class KeyUpdate:
    TYPE: ClassVar[str] = "key_update"
    request_update: bool

    def encode(self) -> dict[str, Any]:
        return {"type": self.TYPE, "request_update": self.request_update}

    @classmethod
    def decode(cls, m: dict[str, Any]) -> KeyUpdate:
        _exact_keys(m, _KEY_UPDATE_KEYS)
        return cls(request_update=_get(m, "request_update", bool))


@dataclass(frozen=True)
class NewTicket:
    """A session ticket the server issues after a full handshake (see docs/PROTOCOL.md)."""

    TYPE: ClassVar[str] = "new_ticket"
    ticket: bytes
    lifetime: int
    nonce: bytes = field(default=b"")

    def encode(self) -> dict[str, Any]:
        return {"type": self.TYPE, "ticket": self.ticket, "lifetime": self.lifetime, "nonce": self.nonce}

    @classmethod
    def decode(cls, m: dict[str, Any]) -> NewTicket:
        _exact_keys(m, _NEW_TICKET_KEYS)
        return cls(
            ticket=_bin(m, "ticket", 1, MAX_TICKET_LEN),
            lifetime=_int(m, "lifetime", 1, 7 * 24 * 3600),
            nonce=_bin(m, "nonce", 0, 32),
        )


HANDSHAKE_MESSAGES: dict[str, Any] = {
    cls.TYPE: cls for cls in (ClientHello, ServerHello, KeyExchange, ClientCertificate, Finished)
}
CONTROL_MESSAGES: dict[str, Any] = {cls.TYPE: cls for cls in (Alert, CloseNotify, KeyUpdate, NewTicket)}

HandshakeMessage = ClientHello | ServerHello | KeyExchange | ClientCertificate | Finished
ControlMessage = Alert | CloseNotify | KeyUpdate | NewTicket


def decode_message(m: dict[str, Any], table: dict[str, Any]) -> Any:
    kind = m.get("type")
    if not isinstance(kind, str):
        raise DecodeError("message has no 'type' field")
    cls = table.get(kind)
    if cls is None:
        raise DecodeError(f"unknown message type {kind[:32]!r}")
    return cls.decode(m)
