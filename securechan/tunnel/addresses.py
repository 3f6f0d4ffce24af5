"""Listen and target addresses: ``HOST:PORT``, ``[IPv6]:PORT`` or ``unix:/path``; connecting with a timeout."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class Address:
    """A TCP ``host``/``port`` pair, or a Unix-socket ``path``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = self.host or ""
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def parse_address(text: str, what: str = "address") -> Address:
    """Parse ``HOST:PORT``, ``[::1]:PORT``, ``:PORT`` (all interfaces) or ``unix:/path/to/socket``."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{what} must be 'HOST:PORT' or 'unix:/path', got {text!r}")
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ConfigError(f"{what} {text!r} names no socket path; write it as 'unix:/run/app.sock'")
        return Address(path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ConfigError(
            f"{what} {text!r} has no port; write it as 'HOST:PORT' (e.g. '127.0.0.1:6379') or 'unix:/path'"
        )
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConfigError(f"{what} {text!r}: an IPv6 address needs brackets, e.g. '[::1]:6379'")
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{what} {text!r}: put an IPv6 address in brackets, e.g. '[{host}]:{port_text}'")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{what} {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{what} {text!r}: port {port} is outside 0-65535")
    return Address(host=host or None, port=port)


async def connect(
    address: Address,
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    timeout: float | None,
    retries: int = 0,
    retry_delay: float = 0.5,
    *,
    connected: Callable[[], bool],
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    """Connect to ``address`` with ``protocol_factory``, as ``loop.create_connection`` does.

    Each attempt is bounded by ``timeout``, and every resolved address is tried in turn.
    ``connected()`` tells whether the factory's protocol has seen ``connection_made``: a failed
    attempt is retried only while it has not (uvloop calls the factory before it connects, so
    whether the factory ran says nothing). Raises ``OSError`` (``TimeoutError`` for a timeout)
    from the last attempt.
    """
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        try:
            async with asyncio.timeout(timeout):
                return await _connect_once(loop, address, protocol_factory)
        except OSError:
            # A protocol that saw a connection (a timeout landing just after connection_made)
            # is not handed to a second one: the caller sees the failure instead.
            if attempt >= retries or connected():
                raise
            attempt += 1
            await asyncio.sleep(retry_delay)


async def _connect_once(
    loop: asyncio.AbstractEventLoop, address: Address, protocol_factory: Callable[[], asyncio.BaseProtocol]
) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
    if address.path is not None:
        return await loop.create_unix_connection(protocol_factory, address.path)
    infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    last: OSError = OSError(f"{address} resolved to no address")
    for family, _, _, _, sockaddr in infos:
        try:
            # One numeric address per attempt, so the error of each stays typed (refused, timeout).
            return await loop.create_connection(protocol_factory, numeric_host(family, sockaddr), int(sockaddr[1]),
                                                family=family)
        except OSError as exc:
            last = exc
    raise last


def numeric_host(family: int, sockaddr: tuple[Any, ...]) -> str:
    """The host of a resolved ``sockaddr`` as text that resolves back to it, IPv6 scope included
    (``fe80::1%2``: without the scope a link-local address cannot be connected to)."""
    host = str(sockaddr[0])
    if family == socket.AF_INET6 and len(sockaddr) > 3 and sockaddr[3] and "%" not in host:
        host = f"{host}%{sockaddr[3]}"
    return host
