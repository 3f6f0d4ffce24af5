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

from .certs import (
    PrivateKey,
    Source,
    check_key_matches,
    load_certificates,
    load_private_key,
    make_store,
    parse_pin,
)
from .errors import ConfigError
from .frames import DEFAULT_RECORD_SIZE, MAX_RECORD_SIZE, MIN_RECORD_SIZE
from .suites import DEFAULT_SUITES, SUPPORTED_VERSIONS, Suite

#: A sender ratchets its traffic key after this many records or bytes under one key,
#: far inside the AES-GCM limits of RFC 8446 §5.5 (2^24.5 full 16 KiB records).
DEFAULT_KEY_UPDATE_RECORDS = 2**23
DEFAULT_KEY_UPDATE_BYTES = 2**34
MIN_RSA_BITS = 2048


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
    versions = tuple(cfg.versions)
    unknown = [v for v in versions if v not in SUPPORTED_VERSIONS]
    if not versions or unknown:
        raise ConfigError(f"versions must be a non-empty subset of {list(SUPPORTED_VERSIONS)}, got {list(versions)}")
    _set(cfg, "versions", versions)
    if not MIN_RECORD_SIZE <= cfg.max_record_size <= MAX_RECORD_SIZE:
        raise ConfigError(f"max_record_size must be between {MIN_RECORD_SIZE} and {MAX_RECORD_SIZE} bytes")
    if cfg.handshake_timeout is not None and cfg.handshake_timeout <= 0:
        raise ConfigError("handshake_timeout must be positive (or None for no limit)")
    if not 1 <= cfg.key_update_records <= DEFAULT_KEY_UPDATE_RECORDS * 2:
        raise ConfigError(f"key_update_records must be between 1 and {DEFAULT_KEY_UPDATE_RECORDS * 2}")
    if not 1 <= cfg.key_update_bytes <= DEFAULT_KEY_UPDATE_BYTES * 2:
        raise ConfigError(f"key_update_bytes must be between 1 and {DEFAULT_KEY_UPDATE_BYTES * 2}")


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

    _store: xv.Store | None = field(init=False, repr=False, compare=False, default=None)
    _ca_certs: tuple[x509.Certificate, ...] = field(init=False, repr=False, compare=False, default=())
    _pins: tuple[bytes, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        _common_checks(self)
        certs: list[x509.Certificate] = []
        if self.cafile is not None:
            certs += load_certificates(self.cafile, what="CA")
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
        if self._store is None and not self._pins:
            raise ConfigError(
                "ClientConfig needs cafile= (the CA that issued the server certificate) or pin= "
                "(the server's SPKI SHA-256, see 'securechan cert show'); verification is never skipped"
            )

    @property
    def trust_description(self) -> str:
        if self.cafile is not None:
            return f"CA file {os.fspath(self.cafile)!r}"
        return "the configured CA data"


@dataclass(frozen=True, kw_only=True)
class ServerConfig(_Common):
    """The server's identity: a PEM chain (leaf first) and the leaf's RSA private key.

    ``suites`` is in server preference order: the server picks the first of its suites
    that the client also offers.
    """

    certfile: Source
    keyfile: Source
    password: bytes | str | None = None

    _chain: tuple[x509.Certificate, ...] = field(init=False, repr=False, compare=False, default=())
    _chain_der: tuple[bytes, ...] = field(init=False, repr=False, compare=False, default=())
    _key: PrivateKey | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        _common_checks(self)
        chain = load_certificates(self.certfile, what="certificate")
        key = load_private_key(self.keyfile, self.password)
        check_key_matches(chain[0], key, f"{os.fspath(self.certfile)!r} / {os.fspath(self.keyfile)!r}")
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

    @property
    def certificate(self) -> x509.Certificate:
        return self._chain[0]


def _key_kind(key: PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"an EC {key.curve.name} key"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    return "not an RSA key"
