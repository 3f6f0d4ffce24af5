"""What one tunnel is: its side, addresses, credentials and limits, with the checks that give useful errors."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from ..acl import AccessList
from ..certs import read_passphrase
from ..config import ClientConfig, ServerConfig
from ..errors import ConfigError
from ..handshake import check_server_name
from .addresses import Address
from .mux import PROTOCOL as MUX_PROTOCOL

Mode = Literal["server", "client"]

DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True, kw_only=True)
class TunnelSpec:
    """One tunnel. ``server``: securechan in, plain out. ``client``: plain in, securechan out."""

    mode: Mode
    listen: Address
    target: Address
    name: str = ""
    # the securechan identity (server side: required; client side: optional client certificate)
    cert: str | None = None
    key: str | None = None
    key_pass_env: str | None = None
    key_pass_file: str | None = None
    # server side: who may connect
    client_ca: str | None = None
    allow_cn: tuple[str, ...] = ()
    allow_dns: tuple[str, ...] = ()
    allow_uri: tuple[str, ...] = ()
    allow_pin: tuple[str, ...] = ()
    proxy_protocol: bool = False
    # client side: how the server is verified
    cafile: str | None = None
    pin: tuple[str, ...] = ()
    server_name: str | None = None
    #: Client side, by default: carry every connection as a stream of one multiplexed securechan connection
    #: when the server tunnel accepts that, else make one securechan connection per connection.
    #: ``mux``: multiplex or fail (a server tunnel that refuses fails every connection, naming the option).
    mux: bool = False
    #: Client side: one securechan connection per connection, never multiplexed (what stunnel does).
    #: Server side: refuse multiplexed clients (a client tunnel then falls back to one connection each).
    no_mux: bool = False
    # limits
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    connect_retries: int = 0
    retry_delay: float = 0.5
    idle_timeout: float | None = None
    max_lifetime: float | None = None
    quiet: bool = False

    @property
    def title(self) -> str:
        return self.name or self.mode

    def check(self) -> None:
        """Raise ConfigError naming the option when the combination cannot work."""
        if self.mode not in ("server", "client"):
            raise ConfigError(f"mode must be 'server' or 'client', got {self.mode!r}")
        if self.max_connections < 1:
            raise ConfigError("max_connections (--max-connections) must be at least 1")
        timeouts: tuple[tuple[str, float | None], ...] = (
            ("handshake_timeout", self.handshake_timeout), ("connect_timeout", self.connect_timeout),
                           ("idle_timeout", self.idle_timeout), ("max_lifetime", self.max_lifetime))
        for opt, value in timeouts:
            if value is not None and value <= 0:
                raise ConfigError(f"{opt} (--{opt.replace('_', '-')}) must be a positive number of seconds")
        if self.connect_retries < 0 or self.retry_delay < 0:
            raise ConfigError("connect_retries and retry_delay (--connect-retries/--retry-delay) must not be negative")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("cert and key (--cert/--key) go together: give both (a client tunnel may give neither)")
        if self.mode == "server":
            if self.cert is None:
                raise ConfigError("a server tunnel needs its certificate and key: --cert FILE --key FILE")
            allow = self.allow_cn or self.allow_dns or self.allow_uri or self.allow_pin
            if allow and self.client_ca is None:
                raise ConfigError("--allow-cn/--allow-dns/--allow-uri/--allow-pin check client certificates: "
                                  "give --client-ca FILE (the CA that issues them)")
            client_only: tuple[tuple[str, object], ...] = (
                ("cafile", self.cafile), ("pin", self.pin), ("server_name", self.server_name))
            for opt, other in client_only:
                if other:
                    raise ConfigError(f"{opt} (--{opt.replace('_', '-')}) is for client tunnels; "
                                      "a server tunnel proves itself with --cert/--key")
            if self.mux:
                raise ConfigError("mux (--mux) is for client tunnels; a server tunnel accepts multiplexed and "
                                  "one-per-connection clients alike (no_mux, --no-mux, refuses multiplexed ones)")
        else:
            if self.cafile is None and not self.pin:
                raise ConfigError("a client tunnel must verify the server: give --cafile FILE (the CA that "
                                  "issued the server certificate) or --pin sha256:... (see 'securechan cert show')")
            if self.cafile is not None and self.effective_server_name is None:
                what = "is a Unix socket" if self.target.is_unix else "names no host"
                raise ConfigError(f"target {self.target} {what}: give --server-name NAME, the name the server "
                                  "certificate carries")
            try:
                check_server_name(self.effective_server_name)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (--server-name, or the target's host)") from None
            server_only: tuple[tuple[str, object], ...] = (
                ("client_ca", self.client_ca), ("proxy_protocol", self.proxy_protocol))
            for opt, other in server_only:
                if other:
                    raise ConfigError(f"{opt} (--{opt.replace('_', '-')}) is for server tunnels")
            if self.mux and self.no_mux:
                raise ConfigError("mux and no_mux (--mux/--no-mux) contradict each other: give --mux to require "
                                  "multiplexing, --no-mux for one securechan connection per connection, or neither "
                                  "to multiplex whenever the server tunnel accepts it")

    @property
    def effective_server_name(self) -> str | None:
        return self.server_name or self.target.host

    def server_config(self) -> ServerConfig:
        """Read the certificate, key and client CA now; a broken file raises ConfigError naming it."""
        assert self.cert is not None and self.key is not None
        allow = None
        if self.allow_cn or self.allow_dns or self.allow_uri or self.allow_pin:
            allow = AccessList(cn=self.allow_cn, dns=self.allow_dns, uri=self.allow_uri, pin=self.allow_pin)
        return ServerConfig(
            certfile=self.cert, keyfile=self.key, password=read_passphrase(self.key_pass_env, self.key_pass_file),
            handshake_timeout=self.handshake_timeout, client_cafile=self.client_ca, allow=allow,
            alpn_protocols=() if self.no_mux else (MUX_PROTOCOL,),
        )

    @property
    def multiplexed(self) -> bool:
        """A client tunnel that offers multiplexing to its server tunnel (``mux`` or the default)."""
        return self.mode == "client" and not self.no_mux

    def client_config(self, *, offer_mux: bool | None = None) -> ClientConfig:
        """One per tunnel, reused for every connection (it keeps the session-ticket cache).

        ``offer_mux=False``: the config of the connections that carry one connection each.
        """
        if offer_mux is None:
            offer_mux = self.multiplexed
        return ClientConfig(
            cafile=self.cafile, pin=list(self.pin) or None, handshake_timeout=self.handshake_timeout,
            certfile=self.cert, keyfile=self.key, password=read_passphrase(self.key_pass_env, self.key_pass_file),
            alpn_protocols=(MUX_PROTOCOL,) if offer_mux else (),
        )


def resolve(path: str | None, base: str | None) -> str | None:
    """A path from a config file is relative to the file's folder."""
    if path is None or base is None or os.path.isabs(path):
        return path
    return os.path.join(base, path)
