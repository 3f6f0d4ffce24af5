"""securechan: a secure transport channel for asyncio.

Quick start::

    server = await securechan.start_server(handle, "127.0.0.1", 8443,
                                           config=securechan.ServerConfig(certfile="srv.crt", keyfile="srv.key"))
    reader, writer = await securechan.open_connection("127.0.0.1", 8443,
                                                      config=securechan.ClientConfig(cafile="ca.crt"))
"""

from .acl import AccessList
from .config import ClientConfig, ServerConfig
from .connection import Connection, Role, State
from .errors import (
    ALERT_EXCEPTIONS,
    AccessDeniedError,
    AlertCode,
    BadRecordMACError,
    CertificateError,
    CertificateExpiredError,
    CertificateRequiredError,
    ConfigError,
    ConnectionClosedError,
    DecodeError,
    HandshakeAuthError,
    HandshakeError,
    HandshakeTimeoutError,
    IllegalParameterError,
    InsufficientSecurityError,
    InternalError,
    NameMismatchError,
    NoCommonSuiteError,
    NoCommonVersionError,
    PinMismatchError,
    ProtocolError,
    RecordOverflowError,
    SecureChannelError,
    TruncationError,
    UnexpectedMessageError,
    UnknownCAError,
    UserCanceledError,
    WrongUsageError,
)
from .events import DataReceived, Event, HandshakeComplete, KeysUpdated, PeerClosed, SessionInfo
from .protocol import SecureProtocol, SecureTransport
from .streams import (
    create_connection,
    create_server,
    create_unix_connection,
    create_unix_server,
    open_connection,
    open_unix_connection,
    reload_server,
    start_server,
    start_unix_server,
)
from .suites import DEFAULT_SUITES, SUPPORTED_VERSIONS, Suite

__version__ = "1.0.0"

__all__ = [
    "ALERT_EXCEPTIONS",
    "DEFAULT_SUITES",
    "SUPPORTED_VERSIONS",
    "AccessDeniedError",
    "AccessList",
    "AlertCode",
    "BadRecordMACError",
    "CertificateError",
    "CertificateExpiredError",
    "CertificateRequiredError",
    "ClientConfig",
    "ConfigError",
    "Connection",
    "ConnectionClosedError",
    "DataReceived",
    "DecodeError",
    "Event",
    "HandshakeAuthError",
    "HandshakeComplete",
    "HandshakeError",
    "HandshakeTimeoutError",
    "IllegalParameterError",
    "InsufficientSecurityError",
    "InternalError",
    "KeysUpdated",
    "NameMismatchError",
    "NoCommonSuiteError",
    "NoCommonVersionError",
    "PeerClosed",
    "PinMismatchError",
    "ProtocolError",
    "RecordOverflowError",
    "Role",
    "SecureChannelError",
    "SecureProtocol",
    "SecureTransport",
    "ServerConfig",
    "SessionInfo",
    "State",
    "Suite",
    "TruncationError",
    "UnexpectedMessageError",
    "UnknownCAError",
    "UserCanceledError",
    "WrongUsageError",
    "create_connection",
    "create_server",
    "create_unix_connection",
    "create_unix_server",
    "open_connection",
    "open_unix_connection",
    "reload_server",
    "start_server",
    "start_unix_server",
]
