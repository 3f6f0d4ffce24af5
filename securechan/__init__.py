"""securechan: a secure transport channel for asyncio."""
from .config import ClientConfig, ServerConfig
from .connection import Connection, Role, State
from .errors import *  # noqa: F403
from .errors import SecureChannelError
from .events import DataReceived, Event, HandshakeComplete, KeysUpdated, PeerClosed, SessionInfo
from .suites import Suite
