"""Certificate authority and certificate issuance, built on ``cryptography.x509``.

Used by the ``securechan ca`` / ``securechan cert`` commands, by ``make demo`` and by the
tests. Certificates follow what ``cryptography.x509.verification`` (CA/B-style profile)
requires: SANs on every leaf, critical BasicConstraints, KeyUsage, SKI/AKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .certs import PrivateKey, check_key_matches, describe, load_certificates, load_private_key
from .errors import ConfigError

KeyType = Literal["rsa2048", "rsa3072", "rsa4096", "ec-p256", "ed25519"]
KEY_TYPES: tuple[str, ...] = ("rsa2048", "rsa3072", "rsa4096", "ec-p256", "ed25519")


def generate_key(key_type: str = "rsa2048") -> PrivateKey:
    if key_type.startswith("rsa") and key_type[3:] in ("2048", "3072", "4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r}; choose from {', '.join(KEY_TYPES)}")


def _sign_hash(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def make_ca(
    name: str = "securechan CA",
    *,
    key_type: str = "ec-p256",
    days: int = 3650,
    issuer: tuple[x509.Certificate, PrivateKey] | None = None,
    path_length: int | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A root CA, or an intermediate CA when ``issuer`` (cert, key) is given."""
    key = generate_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = not_before or _now() - datetime.timedelta(minutes=5)
    end = not_after or start + datetime.timedelta(days=days)
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    cert = builder.sign(issuer_key, _sign_hash(issuer_key))  # type: ignore[arg-type]
    return cert, key


def issue_cert(
    ca: tuple[x509.Certificate, PrivateKey],
    name: str,
    *,
    dns: Iterable[str] = (),
    ips: Iterable[str] = (),
    uris: Iterable[str] = (),
    client: bool = False,
    server: bool | None = None,
    key_type: str = "rsa2048",
    key: PrivateKey | None = None,
    days: int = 825,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """Issue a leaf certificate for ``name`` (added as a DNS or IP SAN) signed by ``ca``.

    ``client`` gives clientAuth; servers get serverAuth. A certificate can be both
    (``client=True, server=True``).
    """
    ca_cert, ca_key = ca
    key = key or generate_key(key_type)
    start = not_before or _now() - datetime.timedelta(minutes=5)
    end = not_after or start + datetime.timedelta(days=days)
    sans: list[x509.GeneralName] = []
    for value in (name, *dns, *ips):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(value)))
        except ValueError:
            if "@" in value:
                sans.append(x509.RFC822Name(value))
            else:
                sans.append(x509.DNSName(value))
    sans.extend(x509.UniformResourceIdentifier(u) for u in uris)
    # de-duplicate, keeping order
    unique: list[x509.GeneralName] = []
    for san in sans:
        if san not in unique:
            unique.append(san)
    is_server = (not client) if server is None else server
    usages = []
    if is_server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    is_rsa = isinstance(key, rsa.RSAPrivateKey)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(unique), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, _sign_hash(ca_key))  # type: ignore[arg-type]
    )
    return cert, key


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: PrivateKey, password: bytes | None = None) -> bytes:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


# -- CA folders (``securechan ca init`` / ``securechan cert issue``) ------------------------

CA_CERT = "ca.crt"
CA_KEY = "ca.key"


def is_self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def write_private(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write a private file created with mode 0600 (never briefly readable by others)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def write_public(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    with open(path, "wb" if overwrite else "xb") as f:
        f.write(data)


@dataclass(frozen=True)
class CAFolder:
    """A CA on disk: ``ca.crt`` (this CA first, then its issuers up to the root) and ``ca.key``."""

    dir: Path
    cert: x509.Certificate
    key: PrivateKey
    #: This CA's issuers, nearest first, ending with the root (empty for a root CA).
    issuers: tuple[x509.Certificate, ...]

    @property
    def root(self) -> x509.Certificate:
        return self.issuers[-1] if self.issuers else self.cert

    def chain_for_leaf(self) -> tuple[x509.Certificate, ...]:
        """What a leaf's PEM file carries after the leaf: every CA certificate except the root."""
        return tuple(c for c in (self.cert, *self.issuers) if not is_self_signed(c))


def load_ca_folder(directory: str | os.PathLike[str], password: bytes | None = None) -> CAFolder:
    d = Path(directory)
    if not (d / CA_CERT).exists() or not (d / CA_KEY).exists():
        raise ConfigError(
            f"{os.fspath(d)!r} holds no CA ({CA_CERT} and {CA_KEY}); create one with: securechan ca init --dir {d}"
        )
    chain = load_certificates(d / CA_CERT, what="CA certificate")
    key = load_private_key(d / CA_KEY, password, passphrase_hint="--ca-pass-env / --ca-pass-file")
    check_key_matches(chain[0], key, f"{os.fspath(d / CA_CERT)!r} / {os.fspath(d / CA_KEY)!r}")
    ca = chain[0]
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(
            f"{os.fspath(d / CA_CERT)!r} is not a CA certificate (it is a leaf for {describe(ca)!r}); "
            "point --ca at a folder made by 'securechan ca init'"
        )
    return CAFolder(d, ca, key, tuple(chain[1:]))


def path_length(cert: x509.Certificate) -> int | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length
    except x509.ExtensionNotFound:
        return None


def init_ca_folder(
    directory: str | os.PathLike[str],
    name: str,
    *,
    key_type: str = "ec-p256",
    days: int = 3650,
    parent: CAFolder | None = None,
    password: bytes | None = None,
    overwrite: bool = False,
) -> CAFolder:
    """Create a root CA, or an intermediate CA signed by ``parent``, in ``directory``."""
    d = Path(directory)
    if not overwrite and ((d / CA_CERT).exists() or (d / CA_KEY).exists()):
        raise ConfigError(
            f"{os.fspath(d)!r} already holds a CA; use --force to replace it "
            "(certificates it issued will no longer verify)"
        )
    if days < 1:
        raise ConfigError("--days must be at least 1")
    not_after = None
    if parent is not None:
        plen = path_length(parent.cert)
        if plen == 0:
            raise ConfigError(
                f"the CA in {os.fspath(parent.dir)!r} may not issue further CAs (its path length is 0); "
                "use the root CA as --parent"
            )
        not_after = min(_now() + datetime.timedelta(days=days), parent.cert.not_valid_after_utc)
    cert, key = make_ca(
        name,
        key_type=key_type,
        days=days,
        issuer=(parent.cert, parent.key) if parent else None,
        path_length=0 if parent else None,
        not_after=not_after,
    )
    d.mkdir(parents=True, exist_ok=True)
    issuers = (parent.cert, *parent.issuers) if parent else ()
    write_public(d / CA_CERT, cert_pem(cert, *issuers), overwrite=overwrite)
    write_private(d / CA_KEY, key_pem(key, password), overwrite=overwrite)
    return CAFolder(d, cert, key, issuers)


def issue_from_folder(
    ca: CAFolder,
    name: str,
    out: str | os.PathLike[str],
    *,
    ips: Iterable[str] = (),
    dns: Iterable[str] = (),
    uris: Iterable[str] = (),
    client: bool = False,
    server: bool | None = None,
    key_type: str | None = None,
    days: int = 825,
    password: bytes | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path, x509.Certificate]:
    """Issue a leaf from a CA folder; write ``<out>.crt`` (leaf + chain) and ``<out>.key`` (0600)."""
    is_server = (not client) if server is None else server
    if key_type is None:
        key_type = "rsa2048" if is_server else "ec-p256"
    if key_type not in KEY_TYPES:
        raise ConfigError(f"unknown key type {key_type!r}; choose from {', '.join(KEY_TYPES)}")
    if is_server and not key_type.startswith("rsa"):
        raise ConfigError(
            f"a server certificate needs an RSA key, because the securechan key wrap is RSA-OAEP; "
            f"use --key-type rsa2048, rsa3072 or rsa4096 (not {key_type}), or issue a client-only certificate "
            "with --client"
        )
    if days < 1:
        raise ConfigError("--days must be at least 1")
    for uri in uris:
        if ":" not in uri:
            raise ConfigError(f"--uri {uri!r} is not a URI; expected e.g. 'spiffe://example.org/web'")
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(f"--ip {ip!r} is not an IP address") from None
    prefix = Path(out)
    crt, keyfile = prefix.with_name(prefix.name + ".crt"), prefix.with_name(prefix.name + ".key")
    if not overwrite:
        for p in (crt, keyfile):
            if p.exists():
                raise ConfigError(f"{os.fspath(p)!r} already exists; use --force to replace it")
    # A leaf never outlives its CA: the verifier would refuse the chain after the CA expires.
    not_after = min(_now() + datetime.timedelta(days=days), ca.cert.not_valid_after_utc)
    try:
        cert, key = issue_cert(
            (ca.cert, ca.key), name, dns=dns, ips=ips, uris=uris, client=client, server=is_server,
            key_type=key_type, not_after=not_after,
        )
    except ValueError as exc:
        raise ConfigError(f"cannot issue a certificate for {name!r}: {exc}") from None
    if crt.parent != Path(""):
        crt.parent.mkdir(parents=True, exist_ok=True)
    write_public(crt, cert_pem(cert, *ca.chain_for_leaf()), overwrite=overwrite)
    write_private(keyfile, key_pem(key, password), overwrite=overwrite)
    return crt, keyfile, cert
