"""Public asyncio API mirroring ``asyncio.open_connection``/``start_server`` and ``loop.create_*``."""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from .config import ClientConfig, ServerConfig
from .connection import Connection
from .errors import ConfigError, TruncationError
from .protocol import SecureProtocol, SecureTransport

log = logging.getLogger("securechan")

_DEFAULT_LIMIT = 2**16
ClientConnectedCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]


def _timeout(config: ClientConfig | ServerConfig, override: float | None) -> float | None:
    return override if override is not None else config.handshake_timeout


async def _connect(
    make_tcp: Callable[[Callable[[], asyncio.BaseProtocol]], Awaitable[tuple[asyncio.BaseTransport, Any]]],
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    config: ClientConfig,
    server_name: str | None,
    handshake_timeout: float | None,
    resume_key: tuple[object, object, str | None] | None = None,
) -> tuple[SecureTransport, asyncio.BaseProtocol]:
    if not isinstance(config, ClientConfig):
        raise ConfigError("config must be a securechan.ClientConfig for a client connection")
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    proto = SecureProtocol(
        Connection(config, server_name=server_name, resume_key=resume_key),
        protocol_factory,
        waiter,
        _timeout(config, handshake_timeout),
    )
    tcp, _ = await make_tcp(lambda: proto)
    try:
        await waiter
    except BaseException:
        tcp.abort() if isinstance(tcp, asyncio.Transport) else tcp.close()
        raise
    assert proto.app_transport is not None and proto.app_protocol is not None
    return proto.app_transport, proto.app_protocol


async def create_connection(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | None = None,
    port: int | None = None,
    *,
    config: ClientConfig,
    server_name: str | None = None,
    handshake_timeout: float | None = None,
    **kwds: Any,
) -> tuple[SecureTransport, asyncio.BaseProtocol]:
    """Like ``loop.create_connection(..., ssl=...)``: returns once the handshake is complete.

    ``server_name`` defaults to ``host``; it is the name the server certificate must carry.
    """
    if server_name is None:
        server_name = host
    if server_name is None and config._store is not None:
        raise ConfigError("server_name is required when connecting without a host (e.g. with sock=)")
    loop = asyncio.get_running_loop()
    return await _connect(
        lambda f: loop.create_connection(f, host, port, **kwds),  # type: ignore[arg-type]
        protocol_factory, config, server_name, handshake_timeout, (host, port, server_name),
    )


async def create_unix_connection(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    path: str | None = None,
    *,
    config: ClientConfig,
    server_name: str | None = None,
    handshake_timeout: float | None = None,
    **kwds: Any,
) -> tuple[SecureTransport, asyncio.BaseProtocol]:
    """securechan over a Unix socket; ``server_name`` is required when verifying against a CA."""
    if server_name is None and config._store is not None:
        raise ConfigError("server_name is required for a Unix-socket connection verified against a CA")
    loop = asyncio.get_running_loop()
    return await _connect(
        lambda f: loop.create_unix_connection(f, path, **kwds),
        protocol_factory, config, server_name, handshake_timeout, (path, None, server_name),
    )


async def _open_streams(
    create: Callable[..., Awaitable[tuple[SecureTransport, asyncio.BaseProtocol]]],
    *args: Any,
    limit: int,
    **kwds: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    transport, protocol = await create(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), *args, **kwds)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)  # type: ignore[arg-type]


async def open_connection(
    host: str | None = None,
    port: int | None = None,
    *,
    config: ClientConfig,
    server_name: str | None = None,
    limit: int = _DEFAULT_LIMIT,
    handshake_timeout: float | None = None,
    **kwds: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Like ``asyncio.open_connection``: returns (reader, writer) after the handshake completed."""
    return await _open_streams(
        create_connection, host, port, limit=limit, config=config, server_name=server_name,
        handshake_timeout=handshake_timeout, **kwds,
    )


async def open_unix_connection(
    path: str | None = None,
    *,
    config: ClientConfig,
    server_name: str | None = None,
    limit: int = _DEFAULT_LIMIT,
    handshake_timeout: float | None = None,
    **kwds: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Like ``asyncio.open_unix_connection``; ``server_name`` is required when verifying against a CA."""
    return await _open_streams(
        create_unix_connection, path, limit=limit, config=config, server_name=server_name,
        handshake_timeout=handshake_timeout, **kwds,
    )


def _log_handshake_failure(proto: SecureProtocol, exc: BaseException) -> None:
    peer = proto._peer
    who = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else (peer or "unix peer")
    # Probes and health checks that connect and hang up are routine; real failures are not.
    level = logging.INFO if isinstance(exc, TruncationError) else logging.WARNING
    log.log(level, "handshake with %s failed: %s", who, exc)


def _server_protocol_factory(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    config: ServerConfig,
    handshake_timeout: float | None,
) -> _ServerFactory:
    if not isinstance(config, ServerConfig):
        raise ConfigError("config must be a securechan.ServerConfig for a server")
    return _ServerFactory(protocol_factory, config, handshake_timeout)


class _ServerFactory:
    """Builds one SecureProtocol per accepted socket from the server's current config.

    ``config`` is the mutable holder :func:`reload_server` swaps: each new connection reads
    it once, so handshakes already under way and open connections keep the config they began with.
    """

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        config: ServerConfig,
        handshake_timeout: float | None,
    ) -> None:
        self.protocol_factory = protocol_factory
        self.config = config
        self.handshake_timeout = handshake_timeout

    def __call__(self) -> SecureProtocol:
        config = self.config
        proto = SecureProtocol(
            Connection(config), self.protocol_factory, None, _timeout(config, self.handshake_timeout)
        )
        proto.on_handshake_failed = _log_handshake_failure
        return proto


#: The protocol factory (config holder) of every server made by create_server/start_server.
_SERVER_FACTORIES: weakref.WeakKeyDictionary[asyncio.AbstractServer, _ServerFactory] = weakref.WeakKeyDictionary()


def reload_server(server: asyncio.AbstractServer, new_config: ServerConfig) -> None:
    """Serve NEW handshakes of ``server`` with ``new_config`` (certificate, key, client CA, access list).

    Open connections, and handshakes already under way, keep the config they started with.
    Build ``new_config`` first: a broken file makes ``ServerConfig(...)`` raise ConfigError,
    and the server keeps its current identity.
    """
    if not isinstance(new_config, ServerConfig):
        raise ConfigError("reload_server needs a securechan.ServerConfig")
    factory = _SERVER_FACTORIES.get(server)
    if factory is None:
        raise ConfigError("reload_server: this server was not created by securechan.start_server/create_server")
    new_config.continue_from(factory.config)
    factory.config = new_config
    log.info("server reloaded: now serving certificate for %s", new_config.certificate.subject.rfc4514_string())


def server_config(server: asyncio.AbstractServer) -> ServerConfig:
    """The config ``server`` uses for new handshakes."""
    factory = _SERVER_FACTORIES.get(server)
    if factory is None:
        raise ConfigError("this server was not created by securechan.start_server/create_server")
    return factory.config


async def create_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    host: str | list[str] | None = None,
    port: int | None = None,
    *,
    config: ServerConfig,
    handshake_timeout: float | None = None,
    **kwds: Any,
) -> asyncio.Server:
    """Like ``loop.create_server(..., ssl=...)``: each protocol sees ``connection_made`` after its handshake."""
    loop = asyncio.get_running_loop()
    factory = _server_protocol_factory(protocol_factory, config, handshake_timeout)
    server = await loop.create_server(factory, host, port, **kwds)
    _SERVER_FACTORIES[server] = factory
    return server


async def create_unix_server(
    protocol_factory: Callable[[], asyncio.BaseProtocol],
    path: str | None = None,
    *,
    config: ServerConfig,
    handshake_timeout: float | None = None,
    **kwds: Any,
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    factory = _server_protocol_factory(protocol_factory, config, handshake_timeout)
    server = await loop.create_unix_server(factory, path, **kwds)
    _SERVER_FACTORIES[server] = factory
    return server


def _stream_factory(cb: ClientConnectedCallback, limit: int) -> Callable[[], asyncio.BaseProtocol]:
    loop = asyncio.get_running_loop()

    def factory() -> asyncio.BaseProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, cb, loop=loop)

    return factory


async def start_server(
    client_connected_cb: ClientConnectedCallback,
    host: str | list[str] | None = None,
    port: int | None = None,
    *,
    config: ServerConfig,
    limit: int = _DEFAULT_LIMIT,
    handshake_timeout: float | None = None,
    **kwds: Any,
) -> asyncio.Server:
    """Like ``asyncio.start_server``: ``client_connected_cb(reader, writer)`` runs after each handshake."""
    return await create_server(
        _stream_factory(client_connected_cb, limit), host, port, config=config,
        handshake_timeout=handshake_timeout, **kwds,
    )


async def start_unix_server(
    client_connected_cb: ClientConnectedCallback,
    path: str | None = None,
    *,
    config: ServerConfig,
    limit: int = _DEFAULT_LIMIT,
    handshake_timeout: float | None = None,
    **kwds: Any,
) -> asyncio.Server:
    return await create_unix_server(
        _stream_factory(client_connected_cb, limit), path, config=config,
        handshake_timeout=handshake_timeout, **kwds,
    )

