"""``securechan ca init``, ``securechan cert issue`` and ``securechan cert show``: a CA in a folder.

From an empty folder to mutual authentication::

    securechan ca init --dir ca
    securechan cert issue --ca ca --name localhost --ip 127.0.0.1 --out server
    securechan cert issue --ca ca --name alice --client --out alice
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from . import pki
from .certs import (
    check_key_permissions,
    format_pin,
    key_kind,
    load_certificates,
    load_private_key,
    public_key_der,
    read_passphrase,
    spki_sha256,
)
from .errors import ConfigError


def register(sub: Any) -> None:
    ca = sub.add_parser("ca", help="create a certificate authority in a folder")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True, metavar="ACTION")
    init = ca_sub.add_parser(
        "init",
        help="write DIR/ca.crt and DIR/ca.key (mode 0600): a root CA, or an intermediate CA with --parent",
        description="Create a CA. With --parent ROOTDIR the new CA is an intermediate signed by that CA; "
        "certificates it issues carry the intermediate in their chain, and clients keep trusting the root.",
    )
    init.add_argument("--dir", required=True, help="folder for ca.crt and ca.key (created if missing)")
    init.add_argument("--name", default=None, help="the CA's common name (default: 'securechan CA' / "
                      "'securechan intermediate CA')")
    init.add_argument("--parent", metavar="DIR", default=None, help="make an intermediate CA signed by the CA in DIR")
    init.add_argument("--key-type", choices=pki.KEY_TYPES, default="ec-p256", help="CA key type (default ec-p256)")
    init.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    init.add_argument("--force", action="store_true", help="replace an existing CA in DIR")
    _passphrase_args(init, "key", "encrypt the new ca.key with the passphrase in")
    _passphrase_args(init, "parent", "the passphrase of the --parent CA key is in")
    init.set_defaults(func=_ca_init)

    cert = sub.add_parser("cert", help="issue and inspect certificates")
    cert_sub = cert.add_subparsers(dest="cert_command", required=True, metavar="ACTION")
    issue = cert_sub.add_parser(
        "issue",
        help="issue a server or client certificate: PREFIX.crt (leaf + chain) and PREFIX.key (mode 0600)",
        description="Issue a leaf certificate from a CA folder. Server certificates (the default) get "
        "serverAuth and an RSA key, which the key wrap needs; --client gives clientAuth and an EC P-256 key.",
    )
    issue.add_argument("--ca", required=True, metavar="DIR", help="CA folder made by 'securechan ca init'")
    issue.add_argument("--name", required=True, help="host or client name: the CN and the first SAN")
    issue.add_argument("--ip", action="append", default=[], metavar="IP", help="an IP address SAN (repeatable)")
    issue.add_argument("--dns", action="append", default=[], metavar="NAME", help="another DNS SAN (repeatable)")
    issue.add_argument("--uri", action="append", default=[], metavar="URI",
                       help="a URI SAN such as spiffe://example.org/web (repeatable)")
    issue.add_argument("--client", action="store_true", help="a client certificate (clientAuth)")
    issue.add_argument("--server", action="store_true", help="with --client: valid for both roles")
    issue.add_argument("--days", type=int, default=825, help="validity in days (default 825; never past the CA's)")
    issue.add_argument("--key-type", choices=pki.KEY_TYPES, default=None,
                       help="default rsa2048 for servers (the key wrap needs RSA), ec-p256 for clients")
    issue.add_argument("--out", metavar="PREFIX", default=None, help="write PREFIX.crt and PREFIX.key "
                       "(default: the --name)")
    issue.add_argument("--force", action="store_true", help="replace existing files")
    _passphrase_args(issue, "ca", "the passphrase of the CA key is in")
    _passphrase_args(issue, "key", "encrypt the new key with the passphrase in")
    issue.set_defaults(func=_cert_issue)

    show = cert_sub.add_parser(
        "show",
        help="print subject, SANs, validity, key type, issuer and the SPKI pin of a certificate (or key) file",
    )
    show.add_argument("file", help="PEM certificate file (every certificate in it is shown), or a private key")
    show.add_argument("--pin", action="store_true", help="print only the leaf's pin (for --pin / pin=)")
    _passphrase_args(show, "key", "when FILE is an encrypted key, its passphrase is in")
    show.set_defaults(func=_cert_show)


def _passphrase_args(parser: argparse.ArgumentParser, prefix: str, what: str) -> None:
    parser.add_argument(f"--{prefix}-pass-env", metavar="NAME", default=None, help=f"{what} environment variable NAME")
    parser.add_argument(f"--{prefix}-pass-file", metavar="FILE", default=None, help=f"{what} FILE (first line)")


def _passphrase(args: argparse.Namespace, prefix: str) -> bytes | None:
    return read_passphrase(getattr(args, f"{prefix}_pass_env"), getattr(args, f"{prefix}_pass_file"))


def _ca_init(args: argparse.Namespace) -> int:
    parent = None
    if args.parent is not None:
        parent = pki.load_ca_folder(args.parent, _passphrase(args, "parent"))
    # A distinct default name, so an error that names the issuing CA tells two CAs apart.
    suffix = os.urandom(3).hex()
    name = args.name or (f"securechan intermediate CA {suffix}" if parent else f"securechan CA {suffix}")
    ca = pki.init_ca_folder(
        args.dir, name, key_type=args.key_type, days=args.days, parent=parent,
        password=_passphrase(args, "key"), overwrite=args.force,
    )
    d = Path(args.dir)
    kind = f"intermediate CA (signed by {parent.cert.subject.rfc4514_string()})" if parent else "root CA"
    print(f"created {kind} {ca.cert.subject.rfc4514_string()!r}")
    print(f"  {d / pki.CA_CERT}  certificate{' + chain' if parent else ''}; "
          f"give {'the root CA file' if parent else 'it'} to clients and servers as --cafile / --client-ca")
    print(f"  {d / pki.CA_KEY}  private key (mode 0600); keep it secret")
    print(f"  expires {ca.cert.not_valid_after_utc:%Y-%m-%d}")
    return 0


def _cert_issue(args: argparse.Namespace) -> int:
    if args.server and not args.client:
        raise ConfigError("--server only makes sense with --client (server certificates are the default)")
    ca = pki.load_ca_folder(args.ca, _passphrase(args, "ca"))
    out = args.out or _safe_prefix(args.name)
    crt, key, cert = pki.issue_from_folder(
        ca, args.name, out, ips=args.ip, dns=args.dns, uris=args.uri, client=args.client,
        server=True if args.server else None, key_type=args.key_type, days=args.days,
        password=_passphrase(args, "key"), overwrite=args.force,
    )
    role = _role(cert)
    print(f"issued {role} certificate for {args.name!r} by {ca.cert.subject.rfc4514_string()!r}")
    print(f"  {crt}  certificate + chain")
    print(f"  {key}  private key (mode 0600)")
    print(f"  names:   {', '.join(_names(cert)) or '(none)'}")
    print(f"  expires: {cert.not_valid_after_utc:%Y-%m-%d}")
    print(f"  pin:     {format_pin(spki_sha256(cert))}")
    return 0


def _safe_prefix(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "cert"


def _cert_show(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        certs = load_certificates(path, what="certificate")
    except ConfigError:
        raw = path.read_bytes() if path.is_file() else b""
        if b"PRIVATE KEY-----" not in raw:
            raise
        key = load_private_key(path, _passphrase(args, "key"))
        pin = "sha256:" + _sha256(public_key_der(key.public_key()))
        if args.pin:
            print(pin)
            return 0
        print(f"private key {os.fspath(path)!r}")
        print(f"  key type: {_key_type(key.public_key())}")
        print(f"  pin:      {pin}")
        check_key_permissions(path)
        return 0
    if args.pin:
        print(format_pin(spki_sha256(certs[0])))
        return 0
    for line in describe_certificates(certs):
        print(line)
    return 0


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def describe_certificates(certs: Sequence[x509.Certificate]) -> list[str]:
    lines: list[str] = []
    now = datetime.datetime.now(datetime.UTC)
    for i, cert in enumerate(certs):
        label = "leaf" if i == 0 and _role(cert) != "CA" else ("root CA" if pki.is_self_signed(cert) else "CA")
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        if now > end:
            state = f"EXPIRED {(now - end).days} days ago"
        elif now < start:
            state = "NOT YET VALID"
        else:
            state = f"valid, {(end - now).days} days left"
        lines += [
            f"certificate {i + 1} of {len(certs)} ({label})",
            f"  subject:  {cert.subject.rfc4514_string()}",
            f"  names:    {', '.join(_names(cert)) or '(none)'}",
            f"  issuer:   {cert.issuer.rfc4514_string()}",
            f"  validity: {start:%Y-%m-%d %H:%M:%S} UTC to {end:%Y-%m-%d %H:%M:%S} UTC ({state})",
            f"  key type: {_key_type(cert.public_key())}",
            f"  usage:    {_role(cert)}",
            f"  serial:   {cert.serial_number:x}",
            f"  pin:      {format_pin(spki_sha256(cert))}",
        ]
    return lines


def _names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    out = [f"DNS:{v}" for v in san.get_values_for_type(x509.DNSName)]
    out += [f"IP:{v}" for v in san.get_values_for_type(x509.IPAddress)]
    out += [f"URI:{v}" for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    out += [f"email:{v}" for v in san.get_values_for_type(x509.RFC822Name)]
    return out


def _role(cert: x509.Certificate) -> str:
    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "CA"
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return "server and client (no extended key usage)"
    roles = []
    if ExtendedKeyUsageOID.SERVER_AUTH in eku:
        roles.append("server")
    if ExtendedKeyUsageOID.CLIENT_AUTH in eku:
        roles.append("client")
    return " and ".join(roles) or "neither server nor client"


def _key_type(key: object) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return key_kind(key)  # e.g. Ed448, DSA
