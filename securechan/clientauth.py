"""Client authentication: signature schemes, the signed content, and the server's verdict.

Theory of operation
-------------------
A server built with ``ServerConfig(client_cafile=...)`` lists in ServerHello.client_auth
the signature schemes it accepts. The client answers with a ClientCertificate message
(its chain, leaf first, the scheme, and a signature) before its KeyExchange. The signature
proves possession of the leaf's private key and binds it to this handshake::

    content = 0x20 * 64 || "securechan v1, client signature" || 0x00 || SHA-256(ClientHello || ServerHello)

(whole frames, as for the transcript). The ServerHello carries the server's fresh random,
X25519 share and certificate chain, so a signature is never valid for another connection
or another server. The ClientCertificate frame then enters the transcript, so the key
schedule and both Finished MACs cover it.

The server evaluates the client in :func:`evaluate_client` (chain with the
``cryptography.x509.verification`` client verifier, then the signature, then the access
list) but acts on the verdict only after the client's Finished verified: every
client-authentication rejection happens at that one point, with the alert for its cause.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import verification as xv

from .acl import AccessList, describe_identity
from .certs import PrivateKey, describe, parse_chain, verify_client_chain
from .errors import (
    CertificateError,
    ConfigError,
    HandshakeAuthError,
    IllegalParameterError,
    InsufficientSecurityError,
    SecureChannelError,
)

CONTEXT = b" " * 64 + b"securechan v1, client signature" + b"\x00"
MIN_RSA_BITS = 2048


class SignatureScheme(enum.IntEnum):
    """Wire codes (the TLS 1.3 SignatureScheme registry values)."""

    ECDSA_SECP256R1_SHA256 = 0x0403
    RSA_PSS_RSAE_SHA256 = 0x0804
    ED25519 = 0x0807


#: What a server offers in ServerHello.client_auth, in preference order.
SUPPORTED_SCHEMES: tuple[int, ...] = (
    int(SignatureScheme.ED25519),
    int(SignatureScheme.ECDSA_SECP256R1_SHA256),
    int(SignatureScheme.RSA_PSS_RSAE_SHA256),
)

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def signed_content(transcript_hash: bytes) -> bytes:
    return CONTEXT + transcript_hash


def scheme_for_key(key: PrivateKey | object) -> SignatureScheme:
    """The one scheme a key signs with; raise ConfigError for keys that cannot authenticate a client."""
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"client RSA key is {key.key_size} bits; at least {MIN_RSA_BITS} are required")
        return SignatureScheme.RSA_PSS_RSAE_SHA256
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError(
                f"client EC key is on curve {key.curve.name}; only P-256 is supported (--key-type ec-p256)"
            )
        return SignatureScheme.ECDSA_SECP256R1_SHA256
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return SignatureScheme.ED25519
    raise ConfigError("client key must be RSA (2048+ bits), EC P-256 or Ed25519")


def sign(key: PrivateKey, transcript_hash: bytes) -> tuple[SignatureScheme, bytes]:
    scheme = scheme_for_key(key)
    data = signed_content(transcript_hash)
    if isinstance(key, rsa.RSAPrivateKey):
        return scheme, key.sign(data, _PSS, hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return scheme, key.sign(data, ec.ECDSA(hashes.SHA256()))
    return scheme, key.sign(data)


def verify_signature(leaf: x509.Certificate, scheme: int, signature: bytes, transcript_hash: bytes) -> None:
    """Check the client's signature with its leaf key; raise a typed error naming the client."""
    key = leaf.public_key()
    try:
        expected = scheme_for_key(key)
    except ConfigError as exc:
        raise InsufficientSecurityError(f"client certificate for {describe(leaf)!r}: {exc}") from None
    if scheme != expected:
        raise IllegalParameterError(
            f"client certificate for {describe(leaf)!r} holds a key for {expected.name}, "
            f"but the client signed with scheme {scheme:#06x}"
        )
    data = signed_content(transcript_hash)
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, _PSS, hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            assert isinstance(key, ed25519.Ed25519PublicKey)
            key.verify(signature, data)
    except InvalidSignature:
        raise HandshakeAuthError(
            f"the signature of the client presenting the certificate for {describe(leaf)!r} did not verify: "
            "it does not hold that certificate's private key, or the handshake was altered"
        ) from None


def authorize_chain(
    chain: Sequence[x509.Certificate], store: xv.Store, allow: AccessList | None, ca_description: str
) -> None:
    """Validate a client chain against the client CA store, then the access list.

    Also the check to repeat for a client identity carried across connections (resumption):
    it applies the server's current CA bundle and access list.
    """
    verify_client_chain(chain, store, cafile_desc=ca_description)
    if allow is not None:
        allow.check(chain[0])


def evaluate_client(
    certificates: Sequence[bytes],
    scheme: int,
    signature: bytes,
    transcript_hash: bytes,
    offered: Sequence[int],
    store: xv.Store,
    allow: AccessList | None,
    ca_description: str,
) -> tuple[tuple[x509.Certificate, ...], SecureChannelError | None]:
    """The verdict on a ClientCertificate: (chain, None) when admitted, else ((), the error to raise)."""
    try:
        if scheme not in offered:
            raise IllegalParameterError(f"client signed with scheme {scheme:#06x}, which this server did not offer")
        chain = parse_chain(certificates, "client")
        authorize_chain(chain, store, None, ca_description)
        verify_signature(chain[0], scheme, signature, transcript_hash)
        if allow is not None:
            allow.check(chain[0])
    except SecureChannelError as exc:
        return (), exc
    except Exception as exc:  # a hostile certificate must end in a refusal, never in an unexpected error
        return (), CertificateError(f"the client's certificate could not be processed ({type(exc).__name__})")
    return tuple(chain), None


__all__ = [
    "SUPPORTED_SCHEMES",
    "SignatureScheme",
    "authorize_chain",
    "describe_identity",
    "evaluate_client",
    "scheme_for_key",
    "sign",
    "signed_content",
    "verify_signature",
]
