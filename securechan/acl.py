"""Access lists: which verified client identities a server admits.

An :class:`AccessList` names identities by certificate subject CN, DNS SAN, URI SAN
(SPIFFE IDs such as ``spiffe://example.org/web``) or SHA-256 SPKI pin. A client is
admitted when ANY entry matches its verified leaf certificate. An empty list admits
every client whose chain verified against ``ServerConfig(client_cafile=...)``.
The list is consulted only after the chain and the client's signature were verified.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.x509.oid import NameOID

from .certs import format_pin, parse_pin, spki_sha256
from .errors import AccessDeniedError, ConfigError

Names = str | Sequence[str]


def _names(value: Names | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"access list: every {what} entry must be a non-empty string, got {item!r}")
    return tuple(item.strip() for item in items)


def common_names(cert: x509.Certificate) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def dns_names(cert: x509.Certificate) -> list[str]:
    san = _san(cert)
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] if san else []


def uri_names(cert: x509.Certificate) -> list[str]:
    san = _san(cert)
    return [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)] if san else []


def describe_identity(cert: x509.Certificate) -> str:
    """A one-line identity for logs: CN, DNS and URI SANs, and the SPKI pin."""
    parts = [f"CN={cn}" for cn in common_names(cert)]
    parts += [f"DNS:{n}" for n in dns_names(cert)]
    parts += [f"URI:{u}" for u in uri_names(cert)]
    parts.append(format_pin(spki_sha256(cert)))
    return ", ".join(parts)


@dataclass(frozen=True)
class AccessList:
    """Identities a server admits; any matching entry admits the client.

    ``cn``: subject common names (exact); ``dns``: DNS SANs (case-insensitive); ``uri``:
    URI SANs (exact, e.g. SPIFFE IDs); ``pin``: SPKI fingerprints (``sha256:<hex>``, as
    printed by ``securechan cert show``).
    """

    cn: Names = ()
    dns: Names = ()
    uri: Names = ()
    pin: Names = ()

    _pins: tuple[bytes, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "cn", _names(self.cn, "cn"))
        object.__setattr__(self, "dns", tuple(n.lower().rstrip(".") for n in _names(self.dns, "dns")))
        uris = _names(self.uri, "uri")
        for u in uris:
            if ":" not in u:
                raise ConfigError(f"access list: uri {u!r} is not a URI; expected e.g. 'spiffe://example.org/web'")
        object.__setattr__(self, "uri", uris)
        pins = _names(self.pin, "pin")
        object.__setattr__(self, "pin", pins)
        object.__setattr__(self, "_pins", tuple(parse_pin(p) for p in pins))

    @classmethod
    def from_args(
        cls,
        cn: Iterable[str] | None = None,
        dns: Iterable[str] | None = None,
        uri: Iterable[str] | None = None,
        pin: Iterable[str] | None = None,
    ) -> AccessList:
        """Build from repeatable CLI flags (``--allow-cn``, ``--allow-dns``, ``--allow-uri``, ``--allow-pin``)."""
        return cls(cn=tuple(cn or ()), dns=tuple(dns or ()), uri=tuple(uri or ()), pin=tuple(pin or ()))

    @property
    def empty(self) -> bool:
        return not (self.cn or self.dns or self.uri or self.pin)

    def __bool__(self) -> bool:
        return not self.empty

    def describe(self) -> str:
        parts = []
        for label, values in (("cn", self.cn), ("dns", self.dns), ("uri", self.uri), ("pin", self.pin)):
            if values:
                parts.append(f"{label}=[{', '.join(values)}]")
        return "; ".join(parts) or "everyone with a verified certificate"

    def admits(self, cert: x509.Certificate) -> bool:
        if self.empty:
            return True
        if self.cn and any(cn in self.cn for cn in common_names(cert)):
            return True
        if self.dns and any(n.lower().rstrip(".") in self.dns for n in dns_names(cert)):
            return True
        if self.uri and any(u in self.uri for u in uri_names(cert)):
            return True
        if self._pins:
            actual = spki_sha256(cert)
            matched = False
            for pin in self._pins:
                matched |= hmac.compare_digest(actual, pin)
            return matched
        return False

    def check(self, cert: x509.Certificate) -> None:
        """Raise :class:`AccessDeniedError` naming the client when the list does not admit it."""
        if not self.admits(cert):
            raise AccessDeniedError(
                f"client certificate ({describe_identity(cert)}) is valid but not on the access list "
                f"({self.describe()}); to admit it, add one of its names or its pin to allow="
            )
