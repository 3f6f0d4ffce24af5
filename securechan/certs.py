"""Loading certificates and keys, SPKI pins, and chain validation with errors that name the cause.

Path validation is done only by ``cryptography.x509.verification``. When it refuses a
chain, :func:`_diagnose` asks the same verifier narrower questions (would it pass at a
time inside the certificate's validity? for the name the certificate does carry?) so
the error can say *why*: unknown CA, expired, name mismatch or wrong usage.
"""

from __future__ import annotations

import base64
import binascii
import collections
import datetime
import errno
import hashlib
import hmac
import ipaddress
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import verification as xv
from cryptography.x509.oid import ExtendedKeyUsageOID

from .errors import (
    CertificateError,
    CertificateExpiredError,
    ConfigError,
    NameMismatchError,
    PinMismatchError,
    UnknownCAError,
    WrongUsageError,
)

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
Source: TypeAlias = "str | os.PathLike[str]"

log = logging.getLogger("securechan")

MAX_FILE = 1024 * 1024
_Attempt = Callable[[str, datetime.datetime], bool]


def read_bounded(path: Source, limit: int) -> tuple[bytes | None, os.stat_result]:
    """At most ``limit + 1`` bytes of the file at ``path``, or None when it is not a regular file.

    Opened without blocking, so a FIFO put in a file's place cannot stall the caller (a reload
    runs on the event loop). ``OSError`` goes to the caller, which names the file in its message.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:  # the descriptor is closed here on every path (a directory opens, then is refused)
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(st.st_mode):
            return None, st
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1), st
    finally:
        os.close(fd)


def key_kind(key: object) -> str:
    """A key's algorithm as its class names it: ``DSA``, ``Ed448``, ... (for messages about unusual keys)."""
    return type(key).__name__.lstrip("_").removesuffix("PrivateKey").removesuffix("PublicKey")


def _read(path: Source, what: str) -> bytes:
    where = repr(os.fspath(path))
    try:
        data, _ = read_bounded(path, MAX_FILE)
    except FileNotFoundError:
        raise ConfigError(f"{what} file {where} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} file {where} is a directory, not a PEM file") from None
    except PermissionError:
        raise ConfigError(f"{what} file {where} is not readable by this user") from None
    except OSError as exc:  # a symlink loop, a name too long, a socket (ENXIO), an I/O error, ...
        raise ConfigError(f"{what} file {where} cannot be read: {exc.strerror or exc}") from None
    if data is None:
        raise ConfigError(f"{what} file {where} is not a regular file (a FIFO, socket or device); give a PEM file")
    if len(data) > MAX_FILE:
        raise ConfigError(f"{what} file {where} is larger than 1 MiB; is it the right file?")
    return data


def load_certificates(
    path: Source | None = None, *, data: bytes | str | None = None, what: str = "certificate"
) -> list[x509.Certificate]:
    """Every certificate in a PEM file (or PEM/DER ``data``), in file order."""
    raw = _read(path, what) if path is not None else (data.encode() if isinstance(data, str) else data or b"")
    where = repr(os.fspath(path)) if path is not None else "data"
    try:
        certs = x509.load_pem_x509_certificates(raw) if b"-----BEGIN" in raw else [x509.load_der_x509_certificate(raw)]
    except ValueError:
        if b"PRIVATE KEY-----" in raw:
            raise ConfigError(
                f"{what} {where} holds a private key, not a certificate; swap certfile and keyfile?"
            ) from None
        raise ConfigError(f"{what} {where} holds no readable PEM certificate") from None
    if not certs:
        raise ConfigError(f"{what} {where} holds no certificate")
    return certs


def load_private_key(
    path: Source,
    password: bytes | str | None = None,
    *,
    passphrase_hint: str = "password=..., or --key-pass-env / --key-pass-file",
) -> PrivateKey:
    raw = _read(path, "key")
    pw = password.encode() if isinstance(password, str) else password
    where = repr(os.fspath(path))
    try:
        key = serialization.load_pem_private_key(raw, password=pw)
    except TypeError:
        if pw is None:
            raise ConfigError(
                f"key file {where} is encrypted: give its passphrase ({passphrase_hint})"
            ) from None
        raise ConfigError(f"key file {where} is not encrypted, but a passphrase was given") from None
    except ValueError:
        if b"CERTIFICATE-----" in raw and b"PRIVATE KEY-----" not in raw:
            raise ConfigError(
                f"key file {where} holds a certificate, not a private key; swap certfile and keyfile?"
            ) from None
        if pw is not None and b"ENCRYPTED" in raw:
            raise ConfigError(f"could not decrypt key file {where}: wrong passphrase") from None
        raise ConfigError(f"key file {where} holds no readable PEM private key") from None
    except Exception as exc:  # unsupported algorithms surface as UnsupportedAlgorithm (it names the curve)
        raise ConfigError(
            f"key file {where}: unsupported key ({type(exc).__name__}: {exc}); use RSA, EC P-256 or Ed25519"
        ) from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise ConfigError(f"key file {where} holds a {key_kind(key)} key; use RSA, EC P-256 or Ed25519")
    check_key_permissions(path)
    return key


def warn_if_not_current(cert: x509.Certificate, where: str) -> None:
    """Log a warning when our own certificate is expired or not yet valid: peers will refuse it."""
    now = _utcnow()
    if now > cert.not_valid_after_utc:
        log.warning(
            "%s (%r) expired on %s UTC; peers will refuse it: issue a new one (securechan cert issue)",
            where, describe(cert), f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}",
        )
    elif now < cert.not_valid_before_utc:
        log.warning(
            "%s (%r) is not valid before %s UTC; peers will refuse it until then (check this machine's clock)",
            where, describe(cert), f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}",
        )


def warn_if_not_ca(certs: Sequence[x509.Certificate], where: str) -> None:
    """A trust anchor that is not a CA certificate is trusted as itself only; say so, it is rarely meant."""
    for cert in certs:
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            log.warning(
                "%s holds %r, which is not a CA certificate: it is trusted as an anchor for itself only; "
                "give the CA that issued the server certificate (or use pin= to trust one key)",
                where, describe(cert),
            )


def check_key_permissions(path: Source) -> None:
    """Warn (through logging) about a private key that other users can read."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if os.name == "posix" and mode & 0o077:
        log.warning(
            "private key %r is readable by other users (mode %o); run: chmod 600 %s",
            os.fspath(path),
            mode & 0o777,
            os.fspath(path),
        )


def public_key_der(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def spki_sha256(cert: x509.Certificate) -> bytes:
    return hashlib.sha256(public_key_der(cert.public_key())).digest()  # type: ignore[arg-type]


def format_pin(digest: bytes) -> str:
    return "sha256:" + digest.hex()


def parse_pin(pin: str) -> bytes:
    """Accept ``sha256:<64 hex>``, ``sha256/<base64>`` or bare hex; return the 32-byte digest."""
    text = pin.strip()
    body = text
    for prefix in ("sha256:", "sha256/", "SHA256:", "SHA256/"):
        if text.startswith(prefix):
            body = text[len(prefix) :]
            break
    digest: bytes | None = None
    try:
        digest = bytes.fromhex(body.replace(":", "")) if len(body.replace(":", "")) == 64 else None
    except ValueError:
        digest = None
    if digest is None:
        try:
            digest = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            digest = None
    if digest is None or len(digest) != 32:
        raise ConfigError(
            f"pin {pin!r} is not a SHA-256 SPKI fingerprint; expected 'sha256:<64 hex digits>' "
            "as printed by 'securechan cert show'"
        )
    return digest


def check_key_matches(cert: x509.Certificate, key: PrivateKey, where: str) -> None:
    if public_key_der(cert.public_key()) != public_key_der(key.public_key()):  # type: ignore[arg-type]
        raise ConfigError(
            f"the private key does not match the certificate in {where}; "
            "check that certfile and keyfile belong together"
        )


def describe(cert: x509.Certificate) -> str:
    """A short human name for a certificate: its first SAN, else its CN."""
    names = san_names(cert)
    if names:
        return names[0]
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


def san_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out: list[str] = [str(v) for v in san.get_values_for_type(x509.DNSName)]
    out += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    out += [str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    return out


def _subject(name: str) -> xv.Subject:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_store(certs: Sequence[x509.Certificate]) -> xv.Store:
    return xv.Store(list(certs))


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def parse_chain(chain_der: Sequence[bytes], who: str) -> list[x509.Certificate]:
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
        for cert in chain:
            # Fields are parsed lazily; touch those verification and its diagnostics read, so a
            # damaged name or extension is refused here rather than escaping later as ValueError.
            _ = (
                cert.subject.rfc4514_string(),
                cert.issuer.rfc4514_string(),
                cert.extensions,
                cert.not_valid_before_utc,
                cert.not_valid_after_utc,
                cert.public_key(),
            )
        return chain
    except Exception as exc:  # ValueError, DuplicateExtension, UnsupportedGeneralNameType, UnsupportedAlgorithm...
        raise CertificateError(
            f"the {who} sent a certificate that cannot be used ({type(exc).__name__}): "
            "it is not valid DER X.509, repeats an extension, or has an unsupported key or name type"
        ) from None


def check_pins(leaf: x509.Certificate, pins: Iterable[bytes], who: str) -> None:
    actual = spki_sha256(leaf)
    # Compare against every pin without an early exit.
    matched = False
    for pin in pins:
        matched |= hmac.compare_digest(actual, pin)
    if not matched:
        raise PinMismatchError(
            f"the {who}'s public key ({format_pin(actual)}, certificate for {describe(leaf)!r}) "
            "matches none of the configured pins; if the key was rotated on purpose, update the pin"
        )


def verify_server_chain(
    chain: Sequence[x509.Certificate],
    server_name: str,
    store: xv.Store,
    *,
    cafile_desc: str = "the configured CA bundle",
    now: datetime.datetime | None = None,
) -> list[x509.Certificate]:
    """Validate a server chain (leaf first) for ``server_name``; return the validated path (leaf to
    trust anchor), or raise a CertificateError naming the cause."""
    at = now or _utcnow()
    leaf, intermediates = chain[0], list(chain[1:])

    def attempt(subject_name: str, when: datetime.datetime) -> list[x509.Certificate] | str:
        builder = xv.PolicyBuilder().store(store).time(when)
        try:
            return builder.build_server_verifier(_subject(subject_name)).verify(leaf, intermediates)
        except xv.VerificationError as exc:
            return str(exc)
        except ValueError as exc:  # e.g. a server name that is not a valid DNS name
            return str(exc)

    result = attempt(server_name, at)
    if not isinstance(result, str):
        return result
    error = result
    _diagnose(
        leaf,
        "server",
        server_name,
        at,
        error,
        cafile_desc,
        lambda name, when: not isinstance(attempt(name, when), str),
        ExtendedKeyUsageOID.SERVER_AUTH,
    )
    raise AssertionError("unreachable")  # _diagnose always raises


class VerifiedChains:
    """Server chains one ClientConfig already validated, so reconnecting skips parsing and path validation.

    An entry is keyed by the chain's exact DER bytes and the server name, and is used only while
    the clock is inside the common validity window of the validated path (leaf to trust anchor):
    the verdict of path validation depends on nothing else for a fixed set of trust anchors,
    which a config never changes. Pins are checked again on every use (they are cheap).
    """

    def __init__(self, size: int = 32) -> None:
        self._size = size
        self._entries: collections.OrderedDict[
            tuple[tuple[bytes, ...], str | None], tuple[list[x509.Certificate], datetime.datetime, datetime.datetime]
        ] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, der: tuple[bytes, ...], name: str | None) -> list[x509.Certificate] | None:
        now = _utcnow()
        with self._lock:
            entry = self._entries.get((der, name))
            if entry is None:
                return None
            chain, start, end = entry
            if not start <= now <= end:
                del self._entries[(der, name)]
                return None
            self._entries.move_to_end((der, name))
            return chain

    def put(self, der: tuple[bytes, ...], name: str | None, chain: list[x509.Certificate],
            path: Sequence[x509.Certificate]) -> None:
        start = max(c.not_valid_before_utc for c in path)
        end = min(c.not_valid_after_utc for c in path)
        with self._lock:
            self._entries[(der, name)] = (chain, start, end)
            self._entries.move_to_end((der, name))
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


def verify_client_chain(
    chain: Sequence[x509.Certificate],
    store: xv.Store,
    *,
    cafile_desc: str = "the configured client CA bundle",
    now: datetime.datetime | None = None,
) -> xv.VerifiedClient:
    """Validate a client chain (leaf first) with the client verifier; raise a CertificateError naming the cause."""
    at = now or _utcnow()
    leaf, intermediates = chain[0], list(chain[1:])

    def attempt(_name: str, when: datetime.datetime) -> xv.VerifiedClient | str:
        try:
            return xv.PolicyBuilder().store(store).time(when).build_client_verifier().verify(leaf, intermediates)
        except xv.VerificationError as exc:
            return str(exc)

    result = attempt("", at)
    if not isinstance(result, str):
        return result
    _diagnose(
        leaf,
        "client",
        None,
        at,
        result,
        cafile_desc,
        lambda name, when: not isinstance(attempt(name, when), str),
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    raise AssertionError("unreachable")  # _diagnose always raises


def _diagnose(
    leaf: x509.Certificate,
    who: str,
    wanted_name: str | None,
    at: datetime.datetime,
    error: str,
    cafile_desc: str,
    passes: _Attempt,
    usage: x509.ObjectIdentifier,
) -> None:
    label = describe(leaf)
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and usage not in eku:
        have = ", ".join(getattr(u, "_name", u.dotted_string) for u in eku) or "none"
        want = "serverAuth" if who == "server" else "clientAuth"
        raise WrongUsageError(
            f"certificate for {label!r} is not valid for {who} authentication: its extended key usage "
            f"is {have}, and {want} is required; issue a {who} certificate"
            + (" (securechan cert issue --client)" if who == "client" else "")
        )
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    one_second = datetime.timedelta(seconds=1)
    # A moment when the leaf was (or will be) valid: the nearest edge of its window.
    inside = end - one_second if at > end else start + one_second if at < start else at
    name_ok_at = wanted_name if wanted_name is not None else ""
    if not start <= at <= end:
        also = (
            ""
            if passes(name_ok_at, inside)
            else (f"; it does not verify against {cafile_desc} even inside its validity period either")
        )
        if at > end:
            raise CertificateExpiredError(
                f"certificate for {label!r} expired on {end:%Y-%m-%d %H:%M:%S} UTC; renew it "
                f"(or check this machine's clock){also}"
            )
        raise CertificateExpiredError(
            f"certificate for {label!r} is not valid before {start:%Y-%m-%d %H:%M:%S} UTC; "
            f"check the clocks of both machines{also}"
        )
    if wanted_name is not None:
        names = san_names(leaf)
        own = next((n for n in names if not n.startswith(("spiffe:", "http:", "https:", "urn:"))), None)
        if own is not None and (passes(own, at) or (not start <= at <= end and passes(own, inside))):
            listed = ", ".join(repr(n) for n in names)
            raise NameMismatchError(
                f"certificate for {label!r} is not valid for server name {wanted_name!r} (it covers {listed}); "
                "connect using one of those names as the server name, or reissue the certificate with this name"
            )
    issuer = leaf.issuer.rfc4514_string()
    raise UnknownCAError(
        f"certificate for {label!r} (issued by {issuer!r}) does not chain to a CA trusted by "
        f"{cafile_desc}: {error}; check that the {who} sends its full chain and that the right CA file is configured"
    )


def read_passphrase(env: str | None = None, file: Source | None = None) -> bytes | None:
    """The passphrase of an encrypted PEM key, from an environment variable or a file (first line).

    For ``--key-pass-env NAME`` / ``--key-pass-file F``. Returns None when neither is given.
    """
    if env and file:
        raise ConfigError("give the key passphrase either from an environment variable or from a file, not both")
    if env:
        value = os.environ.get(env)
        if value is None:
            raise ConfigError(f"environment variable {env!r} (the key passphrase) is not set")
        secret = value.encode()
    elif file:
        raw = _read(file, "passphrase")
        secret = raw.splitlines()[0] if raw.strip() else b""
    else:
        return None
    if not secret:
        where = f"environment variable {env!r}" if env else f"passphrase file {os.fspath(file or '')!r}"
        raise ConfigError(f"{where} holds an empty passphrase")
    return secret


def check_leaf_role(cert: x509.Certificate, role: str, where: str) -> None:
    """Refuse a CA certificate, or a leaf whose extended key usage excludes ``role`` ("server"/"client")."""
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise ConfigError(
                f"{where} is a CA certificate ({describe(cert)!r}), not a {role} certificate; "
                f"issue one with: securechan cert issue{' --client' if role == 'client' else ''}"
            )
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    wanted = ExtendedKeyUsageOID.SERVER_AUTH if role == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    if wanted not in eku:
        have = ", ".join(getattr(u, "_name", u.dotted_string) for u in eku) or "none"
        hint = "with --client" if role == "client" else "without --client (or with --client --server)"
        raise ConfigError(
            f"{where} ({describe(cert)!r}) cannot be used as a {role} certificate: its extended key usage is "
            f"{have}, and {role}Auth is required; issue a {role} certificate ({'securechan cert issue ' + hint})"
        )
