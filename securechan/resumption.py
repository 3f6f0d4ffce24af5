"""The resumed handshake's pieces: the client's ticket offer and binder, the server's ticket verdict.

Theory of operation
-------------------
::

    client                                                     server
    ClientHello (..., x25519 = fresh share, ticket, binder)  ──►
                                 [open ticket; check binder, expiry, name, version, suite,
                                  client identity (CA + access list, re-checked now); use once]
                ◄──  ServerHello (resumed, fresh random + x25519), Finished(server)
    [verify server Finished]
    Finished(client)  [+ application data]  ──►
                                 [verify client Finished]

Keys come from HKDF over ``psk || x25519_secret`` bound to ``SHA-256(ClientHello ||
ServerHello)`` (see :mod:`securechan.keyschedule`), so a resumed session has fresh keys and
forward secrecy from the fresh X25519 shares; there is no certificate and no RSA operation.

A ticket the server will not use never fails the connection: :func:`server_verdict` returns
a :class:`~securechan.tickets.TicketStatus`, the server puts it in ServerHello.ticket_status
and runs the full handshake on the same connection. Unknown key, failed authentication,
malformed contents and a wrong binder are all ``INVALID``, one status, so they cannot be
told apart.

The binder is the last field of the ClientHello map, so it is the last 32 bytes of the
frame; it is an HMAC over the SHA-256 of everything before it (frame head included).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging

from cryptography import x509

from .certs import parse_chain
from .clientauth import authorize_chain
from .config import ServerConfig
from .errors import SecureChannelError
from .frames import FrameType, encode_frame, pack_map
from .keyschedule import binder_mac
from .messages import BINDER_LEN, ClientHello
from .tickets import CachedSession, TicketContents, TicketStatus

log = logging.getLogger("securechan")


def offer(hello: ClientHello, session: CachedSession) -> tuple[ClientHello, bytes]:
    """Attach ``session``'s ticket and its binder to ``hello``; return the hello and its frame."""
    draft = hello.with_ticket(session.ticket, bytes(BINDER_LEN))
    frame = encode_frame(FrameType.HANDSHAKE, pack_map(draft.encode()))
    partial = frame[:-BINDER_LEN]
    binder = binder_mac(session.psk, hashlib.sha256(partial).digest())
    return hello.with_ticket(session.ticket, binder), partial + binder


def _binder_ok(frame: bytes, binder: bytes, psk: bytes) -> bool:
    if frame[-BINDER_LEN:] != binder:  # decoding guarantees it is the last value; belt and braces
        return False
    expected = binder_mac(psk, hashlib.sha256(frame[:-BINDER_LEN]).digest())
    return hmac.compare_digest(expected, binder)


@dataclasses.dataclass
class Resumption:
    """An accepted ticket: what the resumed session is built from."""

    psk: bytes = dataclasses.field(repr=False)
    version: int
    suite: int
    client_chain: tuple[x509.Certificate, ...]
    #: ``client_chain`` as the DER the ticket carried.
    client_der: tuple[bytes, ...] = ()


def server_verdict(
    config: ServerConfig, ch: ClientHello, frame: bytes, versions: tuple[int, ...]
) -> tuple[Resumption | None, TicketStatus]:
    """Decide whether the ClientHello's ticket resumes a session. Never raises for a bad ticket.

    ``versions`` are the versions the ticket may have (the server passes only the version
    this handshake negotiates); a resumed session keeps the ticket's version and suite,
    which must still be acceptable to both sides.
    """
    assert ch.ticket is not None and ch.binder is not None
    tickets = config._tickets
    if tickets is None:
        return _refuse(config, TicketStatus.DISABLED, "this server does not accept tickets")
    contents, status = tickets.open(ch.ticket)
    if contents is None:
        return _refuse(config, status, "unknown ticket key, failed authentication or malformed ticket")
    if not _binder_ok(frame, ch.binder, contents.psk):
        return _refuse(config, TicketStatus.INVALID, "the binder does not match the ticket")
    if status is TicketStatus.EXPIRED:
        return _refuse(config, status, "the ticket expired")
    why = _mismatch(config, ch, contents, versions)
    chain: tuple[x509.Certificate, ...] = ()
    if why is None:
        chain, why = _client_identity(config, contents)
    if why is not None:
        return _refuse(config, TicketStatus.MISMATCH, why)
    if not tickets.consume(ch.ticket, contents):
        return _refuse(config, TicketStatus.REPLAYED, "the single-use ticket was already used")
    der = contents.client_chain if chain else ()
    return Resumption(contents.psk, contents.version, contents.suite, chain, der), TicketStatus.ACCEPTED


def _mismatch(config: ServerConfig, ch: ClientHello, t: TicketContents, versions: tuple[int, ...]) -> str | None:
    if t.server_name != ch.server_name:
        return "the ticket was issued for another server name"
    if t.version not in versions:
        return f"the ticket's protocol version {t.version} is not the version negotiated now"
    if t.suite not in ch.suites or t.suite not in config._suite_codes:
        return "the ticket's suite is no longer allowed by both sides"
    return None


def _client_identity(config: ServerConfig, t: TicketContents) -> tuple[tuple[x509.Certificate, ...], str | None]:
    """The client chain carried by the ticket, re-checked against today's client CA and access list."""
    try:
        chain = tuple(parse_chain(t.client_chain, "ticket")) if t.client_chain else ()
    except SecureChannelError:
        return (), "the ticket's client chain does not parse"
    if config._client_store is None:
        return chain, None  # no client authentication required: the identity, if any, is informational
    if not chain:
        return (), "client certificates are required, and the ticket carries none"
    try:
        authorize_chain(chain, config._client_store, config.allow, config.client_ca_description)
    except SecureChannelError as exc:
        return (), f"the client identity in the ticket no longer passes: {exc}"
    return chain, None


def _refuse(config: ServerConfig, status: TicketStatus, why: str) -> tuple[None, TicketStatus]:
    log.debug("session ticket not accepted (%s: %s); falling back to a full handshake", status.reason, why)
    if config._tickets is not None:
        config._tickets.count_fallback(status)
    return None, status
