"""One exception hierarchy, rooted at :class:`SecureChannelError`.

Every alert code on the wire maps to exactly one exception class (see
``ALERT_EXCEPTIONS``), so an alert received from the peer is raised as the same
type the peer raised locally. Messages say what happened and what to do; they
never contain key material.
"""

from __future__ import annotations

import enum


class AlertCode(enum.IntEnum):
    """Numeric alert codes carried in ALERT frames and encrypted alert messages."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_REVOKED = 44
    CERTIFICATE_EXPIRED = 45
    CERTIFICATE_UNKNOWN = 46
    ILLEGAL_PARAMETER = 47
    UNKNOWN_CA = 48
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    PROTOCOL_VERSION = 70
    INSUFFICIENT_SECURITY = 71
    INTERNAL_ERROR = 80
    USER_CANCELED = 90
    CERTIFICATE_REQUIRED = 116


class SecureChannelError(Exception):
    """Base class of every error securechan raises."""

    alert: AlertCode = AlertCode.INTERNAL_ERROR

    def __init__(self, message: str, *, remote: bool = False, authenticated: bool = True) -> None:
        super().__init__(message)
        #: True when this error was reported by the peer in an alert.
        self.remote = remote
        #: False when a remote alert arrived in plaintext (before keys existed);
        #: an on-path attacker could have forged it.
        self.authenticated = authenticated


class ConfigError(SecureChannelError, ValueError):
    """A ClientConfig/ServerConfig or a file it names is unusable. Never sent on the wire."""


# -- handshake ------------------------------------------------------------------------------


class HandshakeError(SecureChannelError):
    """The handshake could not complete."""

    alert = AlertCode.HANDSHAKE_FAILURE


class NoCommonSuiteError(HandshakeError):
    """Client and server share no AEAD suite or key-wrap method."""

    alert = AlertCode.HANDSHAKE_FAILURE


class NoCommonVersionError(HandshakeError):
    """Client and server share no protocol version."""

    alert = AlertCode.PROTOCOL_VERSION


class HandshakeAuthError(HandshakeError):
    """A Finished MAC or a handshake signature did not verify.

    The server raises this both for a wrong Finished and for a wrapped key that
    does not unwrap: the two are deliberately indistinguishable.
    """

    alert = AlertCode.DECRYPT_ERROR


class HandshakeTimeoutError(HandshakeError, TimeoutError):
    """The handshake did not finish within the configured time. Never sent on the wire."""

    alert = AlertCode.USER_CANCELED


class InsufficientSecurityError(HandshakeError):
    """The peer offered only parameters below this side's minimum (for example a short RSA key)."""

    alert = AlertCode.INSUFFICIENT_SECURITY


class AccessDeniedError(HandshakeError):
    """The peer authenticated, but the access list does not admit it."""

    alert = AlertCode.ACCESS_DENIED


# -- certificates ---------------------------------------------------------------------------


class CertificateError(SecureChannelError):
    """The peer's certificate chain was rejected. ``reason`` is a short machine-readable word."""

    alert = AlertCode.BAD_CERTIFICATE
    reason = "bad certificate"


class UnknownCAError(CertificateError):
    alert = AlertCode.UNKNOWN_CA
    reason = "unknown CA"


class CertificateExpiredError(CertificateError):
    alert = AlertCode.CERTIFICATE_EXPIRED
    reason = "expired"


class NameMismatchError(CertificateError):
    alert = AlertCode.CERTIFICATE_UNKNOWN
    reason = "name mismatch"


class WrongUsageError(CertificateError):
    alert = AlertCode.UNSUPPORTED_CERTIFICATE
    reason = "wrong usage"


class PinMismatchError(CertificateError):
    alert = AlertCode.CERTIFICATE_REVOKED
    reason = "pin mismatch"


class CertificateRequiredError(CertificateError):
    alert = AlertCode.CERTIFICATE_REQUIRED
    reason = "certificate required"


# -- record layer and framing ---------------------------------------------------------------


class ProtocolError(SecureChannelError):
    """The peer broke the protocol."""

    alert = AlertCode.UNEXPECTED_MESSAGE


class UnexpectedMessageError(ProtocolError):
    alert = AlertCode.UNEXPECTED_MESSAGE


class DecodeError(ProtocolError):
    """A frame or message is malformed (bad msgpack, wrong types, missing fields)."""

    alert = AlertCode.DECODE_ERROR


class IllegalParameterError(ProtocolError):
    """A message is well-formed but carries a value the protocol forbids."""

    alert = AlertCode.ILLEGAL_PARAMETER


class RecordOverflowError(ProtocolError):
    """A frame declared a length above the receiver's limit."""

    alert = AlertCode.RECORD_OVERFLOW


class BadRecordMACError(ProtocolError):
    """A record failed authentication: tampered, reordered, replayed or from another connection."""

    alert = AlertCode.BAD_RECORD_MAC


class TruncationError(SecureChannelError, ConnectionResetError):
    """The TCP stream ended without close_notify: the data may have been cut short."""

    alert = AlertCode.INTERNAL_ERROR


class ConnectionClosedError(SecureChannelError, ConnectionError):
    """An operation was attempted on a channel that is closed or failed."""

    alert = AlertCode.INTERNAL_ERROR


class InternalError(SecureChannelError):
    alert = AlertCode.INTERNAL_ERROR


class UserCanceledError(SecureChannelError):
    alert = AlertCode.USER_CANCELED


class ListenError(SecureChannelError):
    """A tunnel could not open its listening socket (address in use, no permission). Never sent on the wire."""


#: Which exception a received alert code raises. Codes that several local errors share
#: (e.g. HANDSHAKE_FAILURE) map to the most general class.
ALERT_EXCEPTIONS: dict[AlertCode, type[SecureChannelError]] = {
    AlertCode.UNEXPECTED_MESSAGE: UnexpectedMessageError,
    AlertCode.BAD_RECORD_MAC: BadRecordMACError,
    AlertCode.RECORD_OVERFLOW: RecordOverflowError,
    AlertCode.HANDSHAKE_FAILURE: NoCommonSuiteError,
    AlertCode.BAD_CERTIFICATE: CertificateError,
    AlertCode.UNSUPPORTED_CERTIFICATE: WrongUsageError,
    AlertCode.CERTIFICATE_REVOKED: PinMismatchError,
    AlertCode.CERTIFICATE_EXPIRED: CertificateExpiredError,
    AlertCode.CERTIFICATE_UNKNOWN: NameMismatchError,
    AlertCode.ILLEGAL_PARAMETER: IllegalParameterError,
    AlertCode.UNKNOWN_CA: UnknownCAError,
    AlertCode.ACCESS_DENIED: AccessDeniedError,
    AlertCode.DECODE_ERROR: DecodeError,
    AlertCode.DECRYPT_ERROR: HandshakeAuthError,
    AlertCode.PROTOCOL_VERSION: NoCommonVersionError,
    AlertCode.INSUFFICIENT_SECURITY: InsufficientSecurityError,
    AlertCode.INTERNAL_ERROR: InternalError,
    AlertCode.USER_CANCELED: UserCanceledError,
    AlertCode.CERTIFICATE_REQUIRED: CertificateRequiredError,
}

#: What the local user should hear when the *peer* sends an alert.
_REMOTE_HINTS: dict[AlertCode, str] = {
    AlertCode.UNEXPECTED_MESSAGE: "the peer received a message it did not expect",
    AlertCode.BAD_RECORD_MAC: "the peer could not authenticate a record we sent; the path may be altering traffic",
    AlertCode.RECORD_OVERFLOW: "the peer received a record larger than it accepts",
    AlertCode.HANDSHAKE_FAILURE: "the peer shares no cipher suite or key-wrap method with us",
    AlertCode.BAD_CERTIFICATE: "the peer rejected our certificate",
    AlertCode.UNSUPPORTED_CERTIFICATE: "the peer rejected our certificate: it is not valid for this use "
    "(check its extended key usage)",
    AlertCode.CERTIFICATE_REVOKED: "the peer rejected our certificate: its public key does not match "
    "the pin the peer expects",
    AlertCode.CERTIFICATE_EXPIRED: "the peer rejected our certificate as expired or not yet valid",
    AlertCode.CERTIFICATE_UNKNOWN: "the peer rejected our certificate: it is not valid for the name the peer asked for",
    AlertCode.ILLEGAL_PARAMETER: "the peer received a message with a forbidden value",
    AlertCode.UNKNOWN_CA: "the peer does not trust the CA that issued our certificate",
    AlertCode.ACCESS_DENIED: "the peer's access list does not admit our identity",
    AlertCode.DECODE_ERROR: "the peer could not decode a message we sent",
    AlertCode.DECRYPT_ERROR: "the handshake failed authentication (Finished MAC or signature mismatch); "
    "the path may be altering traffic, or the server's key does not match its certificate",
    AlertCode.PROTOCOL_VERSION: "the peer shares no protocol version with us",
    AlertCode.INSUFFICIENT_SECURITY: "the peer requires stronger parameters than we offered",
    AlertCode.INTERNAL_ERROR: "the peer hit an internal error",
    AlertCode.USER_CANCELED: "the peer gave up on the handshake (timeout or cancellation)",
    AlertCode.CERTIFICATE_REQUIRED: "the server requires a client certificate and the client has none; "
    "configure the client's certfile= and keyfile= (--cert/--key)",
}


def error_from_alert(code: int, *, authenticated: bool) -> SecureChannelError:
    """Build the exception to raise locally for an alert the peer sent."""
    try:
        alert = AlertCode(code)
    except ValueError:
        return ProtocolError(f"peer sent unknown alert code {code}", remote=True, authenticated=authenticated)
    cls = ALERT_EXCEPTIONS.get(alert, ProtocolError)
    hint = _REMOTE_HINTS.get(alert, "")
    suffix = "" if authenticated else " (unauthenticated plaintext alert)"
    return cls(
        f"peer sent alert {alert.name.lower()} ({int(alert)}): {hint}{suffix}",
        remote=True,
        authenticated=authenticated,
    )
