"""Immutable client and server configuration. Files are read and checked when a config is built."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification as xv

from .acl import AccessList
from .certs import (
    PrivateKey,
    Source,
    VerifiedChains,
    check_key_matches,
    check_leaf_role,
    load_certificates,
    load_private_key,
    make_store,
    parse_pin,
    warn_if_not_ca,
    warn_if_not_current,
)
from .clientauth import scheme_for_key
from .errors import ConfigError
from .frames import DEFAULT_RECORD_SIZE, MAX_RECORD_SIZE, MIN_RECORD_SIZE
from .messages import MAX_LIST_LEN, is_protocol_name
from .suites import DEFAULT_SUITES, SUPPORTED_VERSIONS, Suite
from .tickets import ServerTickets, SessionStats, TicketCache

#: A sender ratchets its traffic key after this many records or bytes under one key,
#: far inside the AES-GCM limits of RFC 8446 §5.5 (2^24.5 full 16 KiB records).
DEFAULT_KEY_UPDATE_RECORDS = 2**23
DEFAULT_KEY_UPDATE_BYTES = 2**34
MIN_RSA_BITS = 2048
MAX_TICKET_LIFETIME = 7 * 24 * 3600


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _common_checks(cfg: _Common) -> None:
    try:
        suites = tuple(Suite.parse(s) for s in cfg.suites)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not suites:
        raise ConfigError("suites must name at least one AEAD suite")
    if len(set(suites)) != len(suites):
        raise ConfigError("suites lists a suite twice")
    _set(cfg, "suites", suites)
    _set(cfg, "_suite_codes", tuple(int(s) for s in suites))
    versions = tuple(cfg.versions)
    unknown = [v for v in versions if v not in SUPPORTED_VERSIONS]
    if not versions or unknown:
        raise ConfigError(f"versions must be a non-empty subset of {list(SUPPORTED_VERSIONS)}, got {list(versions)}")
    _set(cfg, "versions", versions)
    _set(cfg, "_versions_desc", tuple(sorted(versions, reverse=True)))
    if not MIN_RECORD_SIZE <= cfg.max_record_size <= MAX_RECORD_SIZE:
        raise ConfigError(f"max_record_size must be between {MIN_RECORD_SIZE} and {MAX_RECORD_SIZE} bytes")
    if cfg.handshake_timeout is not None and cfg.handshake_timeout <= 0:
        raise ConfigError("handshake_timeout must be positive (or None for no limit)")
    if not 1 <= cfg.key_update_records <= DEFAULT_KEY_UPDATE_RECORDS * 2:
        raise ConfigError(f"key_update_records must be between 1 and {DEFAULT_KEY_UPDATE_RECORDS * 2}")
    if not 1 <= cfg.key_update_bytes <= DEFAULT_KEY_UPDATE_BYTES * 2:
        raise ConfigError(f"key_update_bytes must be between 1 and {DEFAULT_KEY_UPDATE_BYTES * 2}")
    if cfg.key_update_interval is not None and not cfg.key_update_interval > 0:
        raise ConfigError("key_update_interval must be a positive number of seconds (or None to update by volume only)")
    if isinstance(cfg.alpn_protocols, str):
        raise ConfigError("alpn_protocols must be a list of protocol names, not one string")
    protocols = tuple(cfg.alpn_protocols)
    for name in protocols:
        if not isinstance(name, str) or not is_protocol_name(name):
            raise ConfigError(f"alpn_protocols: {name!r} is not a protocol name (1-64 printable ASCII characters, "
                              "no spaces)")
    if len(protocols) > MAX_LIST_LEN or len(set(protocols)) != len(protocols):
        raise ConfigError(f"alpn_protocols must list at most {MAX_LIST_LEN} distinct names")
    _set(cfg, "alpn_protocols", protocols)


@dataclass(frozen=True, kw_only=True)
class _Common:
    suites: Sequence[Suite | str | int] = DEFAULT_SUITES
    versions: Sequence[int] = SUPPORTED_VERSIONS
    #: Largest plaintext per record, sent and accepted; the two peers use the smaller of theirs.
    max_record_size: int = DEFAULT_RECORD_SIZE
    #: Seconds allowed for the whole handshake; None disables the limit.
    handshake_timeout: float | None = 10.0
    key_update_records: int = DEFAULT_KEY_UPDATE_RECORDS
    key_update_bytes: int = DEFAULT_KEY_UPDATE_BYTES
    #: Seconds after which the sending key is ratcheted before the next record (None: by volume only).
    key_update_interval: float | None = None
    #: Application protocols spoken over the channel, in preference order (negotiated like TLS ALPN:
    #: the server picks the first of its own that the client offered; see SessionInfo.alpn_protocol).
    alpn_protocols: Sequence[str] = ()

    # Derived once per config for the handshake: the suites' wire codes (preference order)
    # and the versions newest first.
    _suite_codes: tuple[int, ...] = field(init=False, repr=False, compare=False, default=())
    _versions_desc: tuple[int, ...] = field(init=False, repr=False, compare=False, default=())


@dataclass(frozen=True, kw_only=True)
class ClientConfig(_Common):
    """How a client verifies servers.

    ``cafile``/``cadata`` give trust anchors (PEM); ``pin`` gives one or more SHA-256 SPKI
    fingerprints (``sha256:<hex>``). With both, the server must pass both checks. With
    neither, building the config fails: verification is never skipped.
    """

    cafile: Source | None = None
    cadata: bytes | str | None = None
    pin: str | Sequence[str] | None = None
    #: The client's own identity (PEM chain, leaf first, and its key), presented when a server asks.
    certfile: Source | None = None
    keyfile: Source | None = None
    password: bytes | str | None = field(default=None, repr=False)

    _store: xv.Store | None = field(init=False, repr=False, compare=False, default=None)
    _ca_certs: tuple[x509.Certificate, ...] = field(init=False, repr=False, compare=False, default=())
    _pins: tuple[bytes, ...] = field(init=False, repr=False, compare=False, default=())
    _identity_chain: tuple[x509.Certificate, ...] = field(init=False, repr=False, compare=False, default=())
    _identity_der: tuple[bytes, ...] = field(init=False, repr=False, compare=False, default=())
    _identity_key: PrivateKey | None = field(init=False, repr=False, compare=False, default=None)
    #: Resume sessions with tickets the servers sent (cached in this config, see ``session_cache``).
    resume: bool = True
    _session_cache: TicketCache = field(init=False, repr=False, compare=False, default_factory=TicketCache)
    _verified_chains: VerifiedChains = field(init=False, repr=False, compare=False, default_factory=VerifiedChains)

    def __post_init__(self) -> None:
        _common_checks(self)
        self._load_identity()
        certs: list[x509.Certificate] = []
        if self.cafile is not None:
            certs += load_certificates(self.cafile, what="CA")
            warn_if_not_ca(certs, f"CA file {os.fspath(self.cafile)!r}")
        if self.cadata is not None:
            certs += load_certificates(data=self.cadata, what="CA")
        if certs:
            try:
                _set(self, "_store", make_store(certs))
            except Exception as exc:
                raise ConfigError(f"CA bundle is not usable as trust anchors: {exc}") from None
        _set(self, "_ca_certs", tuple(certs))
        pins: Sequence[str] = [self.pin] if isinstance(self.pin, str) else list(self.pin or ())
        _set(self, "_pins", tuple(parse_pin(p) for p in pins))
        _set(self, "_session_cache", TicketCache())
        if self._store is None and not self._pins:
            raise ConfigError(
                "ClientConfig needs cafile= (the CA that issued the server certificate) or pin= "
                "(the server's SPKI SHA-256, see 'securechan cert show'); verification is never skipped"
            )

    def _load_identity(self) -> None:
        if self.certfile is None and self.keyfile is None:
            if self.password is not None:
                raise ConfigError("ClientConfig: password= was given without certfile= and keyfile=")
            return
        if self.certfile is None or self.keyfile is None:
            raise ConfigError(
                "ClientConfig: a client identity needs both certfile= (its certificate chain) and keyfile= (its key)"
            )
        chain = load_certificates(self.certfile, what="client certificate")
        key = load_private_key(self.keyfile, self.password)
        where = f"{os.fspath(self.certfile)!r} / {os.fspath(self.keyfile)!r}"
        check_key_matches(chain[0], key, where)
        check_leaf_role(chain[0], "client", f"certificate file {os.fspath(self.certfile)!r}")
        warn_if_not_current(chain[0], f"client certificate {os.fspath(self.certfile)!r}")
        scheme_for_key(key)  # RSA 2048+, EC P-256 or Ed25519
        _set(self, "_identity_chain", tuple(chain))
        _set(self, "_identity_der", tuple(c.public_bytes(Encoding.DER) for c in chain))
        _set(self, "_identity_key", key)

    @property
    def trust_description(self) -> str:
        if self.cafile is not None:
            return f"CA file {os.fspath(self.cafile)!r}"
        return "the configured CA data"

    @property
    def session_cache(self) -> TicketCache:
        """Session tickets received with this config, keyed by (host, port, server name)."""
        return self._session_cache

    @property
    def session_stats(self) -> SessionStats:
        """Counters: resumed and full handshakes, tickets received, refused tickets by reason."""
        return self._session_cache.stats


@dataclass(frozen=True, kw_only=True)
class ServerConfig(_Common):
    """The server's identity: a PEM chain (leaf first) and the leaf's RSA private key.

    ``suites`` is in server preference order: the server picks the first of its suites
    that the client also offers.
    """

    certfile: Source
    keyfile: Source
    password: bytes | str | None = field(default=None, repr=False)
    #: Client CA bundle (PEM). When set, every client must present a certificate that chains to it.
    client_cafile: Source | None = None
    #: Which verified clients are admitted; None or an empty AccessList admits all of them.
    allow: AccessList | None = None

    _chain: tuple[x509.Certificate, ...] = field(init=False, repr=False, compare=False, default=())
    _chain_der: tuple[bytes, ...] = field(init=False, repr=False, compare=False, default=())
    _key: PrivateKey | None = field(init=False, repr=False, compare=False, default=None)
    _client_store: xv.Store | None = field(init=False, repr=False, compare=False, default=None)
    _client_cas: tuple[x509.Certificate, ...] = field(init=False, repr=False, compare=False, default=())
    #: Issue session tickets after each handshake (and accept them).
    tickets: bool = True
    #: Seconds a ticket stays valid (the client stops offering it a margin earlier).
    ticket_lifetime: float = 1800.0
    #: Shared ticket key file (``securechan ticket-key new``) so a fleet resumes each other's tickets;
    #: re-read whenever it changes. None: a random in-memory key rotated every ``ticket_rotation`` s.
    ticket_key_file: Source | None = None
    ticket_rotation: float = 3600.0
    #: Accept each ticket once (anti-replay, per process; see docs/SECURITY.md for the trade-off).
    ticket_single_use: bool = False
    _tickets: ServerTickets | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        _common_checks(self)
        self._load_client_auth()
        chain = load_certificates(self.certfile, what="certificate")
        key = load_private_key(self.keyfile, self.password)
        check_key_matches(chain[0], key, f"{os.fspath(self.certfile)!r} / {os.fspath(self.keyfile)!r}")
        check_leaf_role(chain[0], "server", f"certificate file {os.fspath(self.certfile)!r}")
        warn_if_not_current(chain[0], f"server certificate {os.fspath(self.certfile)!r}")
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ConfigError(
                f"server key {os.fspath(self.keyfile)!r} is {_key_kind(key)}; the securechan key wrap "
                "(RSA-OAEP) needs an RSA key of at least 2048 bits: issue the server certificate with "
                "--key-type rsa2048"
            )
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"server RSA key is {key.key_size} bits; at least {MIN_RSA_BITS} are required")
        _set(self, "_chain", tuple(chain))
        _set(self, "_chain_der", tuple(c.public_bytes(Encoding.DER) for c in chain))
        _set(self, "_key", key)
        self._load_tickets()

    def _load_tickets(self) -> None:
        if not self.tickets:
            if self.ticket_key_file is not None:
                raise ConfigError("ServerConfig: ticket_key_file= is set but tickets=False; drop one of them")
            return
        if not 1 <= self.ticket_lifetime <= MAX_TICKET_LIFETIME:
            raise ConfigError(f"ticket_lifetime must be between 1 and {MAX_TICKET_LIFETIME} seconds (7 days)")
        if not self.ticket_rotation >= 1:
            raise ConfigError("ticket_rotation must be at least 1 second")
        if self.ticket_key_file is None and self.ticket_lifetime > self.ticket_rotation:
            raise ConfigError(
                f"ticket_lifetime ({self.ticket_lifetime:g} s) exceeds ticket_rotation ({self.ticket_rotation:g} s): "
                "a ticket would outlive its key; lengthen ticket_rotation or shorten ticket_lifetime"
            )
        _set(self, "_tickets", ServerTickets(
            lifetime=self.ticket_lifetime,
            rotation=self.ticket_rotation,
            key_file=self.ticket_key_file,
            single_use=self.ticket_single_use,
        ))

    def continue_from(self, previous: ServerConfig | None) -> None:
        """Take over ``previous``'s ticket state when this config replaces it (reload).

        When both draw their ticket keys from the same source (both in memory, or the same key
        file), the single-use memory and the counters always carry over — tickets the old
        config accepted still open, so forgetting which were used would let each be used once
        more — and in-memory keys carry over too, so a reload does not invalidate tickets. A
        different key source starts fresh: the old tickets no longer open at all.
        """
        if previous is None or previous._tickets is None or self._tickets is None:
            return
        old, new = previous.ticket_key_file, self.ticket_key_file
        same_source = (old is None and new is None) or (
            old is not None and new is not None and os.path.realpath(old) == os.path.realpath(new)
        )
        if same_source:
            self._tickets.continue_from(previous._tickets)

    @property
    def session_stats(self) -> SessionStats:
        """Counters: resumed and full handshakes, tickets issued, fallbacks by reason."""
        return self._tickets.stats if self._tickets is not None else SessionStats()

    @property
    def ticket_keys(self) -> ServerTickets | None:
        """The ticket machinery of this config (None with ``tickets=False``)."""
        return self._tickets

    @property
    def certificate(self) -> x509.Certificate:
        return self._chain[0]

    def _load_client_auth(self) -> None:
        if self.allow is not None and not isinstance(self.allow, AccessList):
            raise ConfigError(
                "ServerConfig: allow= must be a securechan.AccessList(cn=..., dns=..., uri=..., pin=...)"
            )
        if self.client_cafile is None:
            if self.allow:
                raise ConfigError(
                    "ServerConfig: allow= restricts client certificates, so it needs client_cafile= "
                    "(the CA that issues them)"
                )
            return
        cas = load_certificates(self.client_cafile, what="client CA")
        try:
            store = make_store(cas)
        except Exception as exc:
            raise ConfigError(f"client CA file {os.fspath(self.client_cafile)!r} is not usable: {exc}") from None
        _set(self, "_client_store", store)
        _set(self, "_client_cas", tuple(cas))

    @property
    def requires_client_certificate(self) -> bool:
        return self._client_store is not None

    @property
    def client_ca_description(self) -> str:
        return f"client CA file {os.fspath(self.client_cafile or '')!r}"


def _key_kind(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC {key.curve.name} key"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    return "not an RSA key"
