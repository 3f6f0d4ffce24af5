"""Listen and target addresses: ``HOST:PORT``, ``[IPv6]:PORT`` or ``unix:/path``; connecting with a timeout."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

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


async def connect(address: Address, timeout: float | None, retries: int = 0, retry_delay: float = 0.5) -> socket.socket:
    """A connected, non-blocking socket to ``address``; each attempt is bounded by ``timeout``.

    Raises ``OSError`` (``TimeoutError`` for a timeout) from the last attempt.
    """
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        try:
            return await asyncio.wait_for(_connect_once(loop, address), timeout)
        except OSError:
            if attempt >= retries:
                raise
            attempt += 1
            await asyncio.sleep(retry_delay)


async def _connect_once(loop: asyncio.AbstractEventLoop, address: Address) -> socket.socket:
    if address.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address.path)
        except BaseException:
            sock.close()
            raise
        return sock
    infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    last: OSError = OSError(f"{address} resolved to no address")
    for family, type_, proto, _, sockaddr in infos:
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise last
