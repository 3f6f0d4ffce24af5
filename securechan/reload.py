"""Reloading a running server's identity on a signal (SIGHUP by default), for command-line servers.

:func:`securechan.reload_server` swaps the ServerConfig that new handshakes use. This module
ties it to a signal: on SIGHUP the config is rebuilt from its files; a config that fails to
build (missing file, wrong passphrase, key that does not match) is logged and the server
keeps serving its current identity. Open connections are never touched.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable

from .config import ServerConfig
from .errors import SecureChannelError
from .streams import reload_server

log = logging.getLogger("securechan")

ReloadCallback = Callable[[BaseException | None], None]


def reload_servers(servers: Iterable[asyncio.AbstractServer], build: Callable[[], ServerConfig]) -> ServerConfig:
    """Build a new config and give it to every server; on error raise, leaving all of them unchanged."""
    config = build()
    for server in servers:
        reload_server(server, config)
    return config


def reload_on_signal(
    servers: asyncio.AbstractServer | Iterable[asyncio.AbstractServer],
    build: Callable[[], ServerConfig],
    *,
    signum: int = signal.SIGHUP,
    on_reload: ReloadCallback | None = None,
) -> Callable[[], None]:
    """On ``signum``, rebuild the config with ``build()`` and reload ``servers``. Returns an uninstaller.

    ``on_reload`` is called after each attempt with None (reloaded) or the error (kept the old config).
    """
    targets = [servers] if isinstance(servers, asyncio.AbstractServer) else list(servers)
    loop = asyncio.get_running_loop()

    def handler() -> None:
        error: BaseException | None = None
        try:
            config = reload_servers(targets, build)
        except SecureChannelError as exc:
            error = exc
            log.error("reload failed, still serving the previous certificate: %s", exc)
        except OSError as exc:
            error = exc
            log.error("reload failed, still serving the previous certificate: %s", exc)
        else:
            log.info(
                "reloaded on %s: serving certificate for %s (expires %s)",
                signal.Signals(signum).name, config.certificate.subject.rfc4514_string(),
                f"{config.certificate.not_valid_after_utc:%Y-%m-%d}",
            )
        if on_reload is not None:
            on_reload(error)

    loop.add_signal_handler(signum, handler)

    def uninstall() -> None:
        loop.remove_signal_handler(signum)

    return uninstall
