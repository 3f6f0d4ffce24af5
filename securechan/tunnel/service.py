"""One running tunnel: its listener, the per-connection work (handshake, target connect, relay) and its logs.

Theory of operation
-------------------
A *server* tunnel listens for securechan and relays each authenticated connection to a
plain target; a *client* tunnel listens for plain TCP and relays each connection over
securechan to the target. Every accepted socket is counted from the moment it is
accepted (so connections still in the handshake count towards ``max_connections``);
above the limit the socket is reset at once.

Per connection: handshake (bounded by ``handshake_timeout``), connect to the target
(bounded by ``connect_timeout``, ``connect_retries`` extra attempts), optionally a PROXY v2
header, then a :class:`~securechan.tunnel.relay.Relay`. When it ends, one log line gives
peer, verified identity, suite, bytes each way, duration and why it closed. Connections
that never completed a handshake or moved no bytes are logged at DEBUG under ``quiet``
(load-balancer health checks).

Multiplexing (docs/PROTOCOL.md §14): a client tunnel (unless ``no_mux``) makes one
securechan connection (a carrier, :mod:`securechan.tunnel.mux`) for all its connections and
opens a stream on it per accepted socket, synchronously when the carrier exists, else after
the one task that makes it. A server tunnel offers ``securechan-mux/1`` to every client
(unless ``no_mux``); when it is chosen, the connection becomes a carrier whose streams are admitted, counted,
connected, relayed and logged like connections (the carrier keeps its own slot). Stopping,
reloading or an idle carrier send GOAWAY, so clients move to a new carrier. When the server
tunnel does not choose it, the connection made carries the first waiting connection alone,
and the client tunnel makes one connection per connection (offering no multiplexing) until
:data:`MUX_RECHECK` seconds have passed or it is reloaded; with ``mux`` it fails them instead.

Shutdown: :meth:`Tunnel.stop_accepting` closes the listener; :meth:`Tunnel.drain` waits
for open relays up to a deadline, then aborts the rest (RST / no close_notify, so neither
end mistakes a cut stream for a complete one).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import stat
from collections.abc import Coroutine
from typing import Any

from cryptography import x509

from ..certs import describe
from ..config import ClientConfig, ServerConfig
from ..connection import Connection
from ..errors import (
    ConnectionClosedError,
    HandshakeTimeoutError,
    ListenError,
    NameMismatchError,
    SecureChannelError,
    TruncationError,
)
from ..protocol import SecureProtocol
from . import mux, proxyproto
from .addresses import Address, connect
from .relay import End, Relay
from .relay import reset as _reset
from .spec import TunnelSpec

log = logging.getLogger("securechan.tunnel")

#: Seconds a client tunnel keeps a multiplexed connection without streams before closing it.
MUX_CLIENT_IDLE = 30.0
#: Seconds a client tunnel whose server tunnel refused multiplexing makes one connection per connection
#: before it offers multiplexing again (the server tunnel may have been restarted without --no-mux).
MUX_RECHECK = 600.0
#: Seconds a server tunnel waits on a multiplexed connection without streams before asking the client to close it.
MUX_SERVER_IDLE = 300.0


@functools.lru_cache(maxsize=256)
def _identity(cert: x509.Certificate) -> str:
    """How a peer certificate is named in the log lines (certificates hash and compare by their DER)."""
    return repr(describe(cert))


def _peer_text(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return f"unix:{peer}" if peer else "unix peer"


class _CarrierFailed(Exception):
    """The multiplexed connection to the server tunnel could not be made; the text says why."""


class _NotMultiplexed(Exception):
    """The server tunnel does not multiplex: the connection made carries ``relay`` alone (None: nobody waited)."""

    def __init__(self, relay: Relay | None) -> None:
        super().__init__()
        self.relay = relay


def _session_text(secure_end: End) -> tuple[str, str]:
    """The verified server identity and the suite of a client tunnel's secure end, for its log line."""
    assert secure_end.transport is not None
    return _session_text_of(secure_end.transport)


def _session_text_of(secure: asyncio.BaseTransport) -> tuple[str, str]:
    session = secure.get_extra_info("securechan")
    cert = secure.get_extra_info("peercert")
    identity = _identity(cert) if cert is not None else "pinned key"
    return identity, session.suite + (" resumed" if session.resumed else "")


class _TunnelProtocol(SecureProtocol):
    """A tunnel's SecureProtocol: what :meth:`Tunnel.cut_now` can reset while it is still in the handshake."""

    #: connection_made ran: the protocol has had its socket and is not handed to a retry.
    made = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True
        super().connection_made(transport)

    def abort(self) -> None:
        if self._tcp is not None:
            _reset(self._tcp)


class _CountedProtocol(_TunnelProtocol):
    """The server tunnel's SecureProtocol: counts the socket from accept, refuses above the limit."""

    def __init__(self, tunnel: Tunnel, *args: Any) -> None:
        super().__init__(*args)
        self._tunnel = tunnel
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._tunnel._admit(transport):
            return
        self._counted = True
        self._tunnel._protocols.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self._tunnel._release()
            self._tunnel._protocols.discard(self)
        super().connection_lost(exc)


class _ClientProtocol(_TunnelProtocol):
    """The client tunnel's SecureProtocol: its handshake's end is a callback, not an awaited future.

    Success starts the relay from inside ``connection_made`` (so the bytes the plain client
    sent meanwhile leave with the handshake's last flight); every other end (a failure, a
    reset, a cut) is reported to the tunnel exactly once, through :meth:`settle_failed`.
    """

    def __init__(self, tunnel: Tunnel, relay: Relay, peer: str, started: float, connection: Connection,
                 timeout: float | None) -> None:
        super().__init__(connection, lambda: relay.target, None, timeout)
        self._tunnel = tunnel
        self._relay = relay
        self._peer_text = peer
        self._started = started
        self._settled = False
        self.on_handshake_failed = lambda _proto, exc: self.settle_failed(tunnel._handshake_failure(exc))
        relay.target.on_connected = self._ready

    def _ready(self, end: End) -> None:
        if self._settled:  # reported as failed already (cannot happen: a cut aborts the socket first)
            end.abort()
            return
        self._settled = True
        self._tunnel._client_ready(self, self._started, end)

    def settle_failed(self, why: str) -> None:
        """The connection will not be relayed: stop the relay, log ``why``, free the slot (once)."""
        if self._settled:
            return
        self._settled = True
        self._tunnel._client_failed(self, self._relay, self._peer_text, self._started, why)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # Lost in the handshake without a reported failure: this tunnel cut it (cut_now).
        self.settle_failed(self._relay.reason or "securechan connection closed during the handshake")


class Tunnel:
    """A tunnel described by ``spec``. ``start()`` listens; ``stop_accepting()`` + ``drain()`` shut it down."""

    def __init__(self, spec: TunnelSpec, *, reuse_port: bool = False) -> None:
        spec.check()
        self.spec = spec
        self.reuse_port = reuse_port
        self._server_config: ServerConfig | None = spec.server_config() if spec.mode == "server" else None
        self._client_config: ClientConfig | None = None
        #: Client side: the config of connections that carry one connection each (multiplexing not offered).
        self._direct_config: ClientConfig | None = None
        #: Client side: new connections become streams of a multiplexed connection (the default, not
        #: --no-mux) until the server tunnel refuses that; MUX_RECHECK seconds later, or at a reload, it asks again.
        self._multiplex = False
        self._recheck_at = 0.0
        self._refusal_warned = False
        if spec.mode == "client":
            self._load_client_configs()
        self.server: asyncio.Server | None = None
        self.active = 0
        #: Relays running, and relays whose second connection (target connect, handshake) is still being made.
        self.relays: set[Relay] = set()
        self.connecting: set[Relay] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Server connections (all, from accept) and client connections in their handshake.
        self._protocols: set[_TunnelProtocol] = set()
        self._closing = False
        self._hurry = False
        #: Multiplexed connections (server: every one; client: those still in use) and, on a client
        #: tunnel, the one new streams go to and the task making the next one.
        self.carriers: set[mux.MuxSession] = set()
        #: The streams' receive-window growth, shared by all carriers (docs/SECURITY.md: memory per tunnel).
        self.window_budget = mux.WindowBudget()
        self._mux_current: mux.MuxSession | None = None
        self._mux_pending: asyncio.Future[mux.MuxSession] | None = None
        #: Client connections waiting for the multiplexed connection being made, and when each was accepted.
        self._mux_waiting: collections.deque[tuple[Relay, float]] = collections.deque()
        self._refusal_logged = -1e9
        self._refusals_unlogged = 0
        self._refusal_tail: asyncio.TimerHandle | None = None
        #: Totals since start, for the shutdown line and for tests.
        self.accepted = 0
        self.rejected = 0
        self.completed = 0
        self.cut = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        spec, loop = self.spec, asyncio.get_running_loop()
        try:
            if spec.mode == "server":
                if spec.listen.path is not None:
                    self.server = await loop.create_unix_server(self._make_protocol, spec.listen.path)
                else:
                    self.server = await loop.create_server(self._make_protocol, spec.listen.host, spec.listen.port or 0,
                                                           reuse_address=True, reuse_port=self.reuse_port or None)
            elif spec.listen.path is not None:
                self.server = await loop.create_unix_server(self._make_plain_protocol, spec.listen.path)
            else:
                self.server = await loop.create_server(self._make_plain_protocol, spec.listen.host,
                                                       spec.listen.port or 0, reuse_address=True,
                                                       reuse_port=self.reuse_port or None)
        except OSError as exc:
            hint = {98: "another process is listening there; stop it or choose another port",
                    13: "this user may not bind there; use a port above 1023 or grant CAP_NET_BIND_SERVICE",
                    99: "that address is not configured on this machine"}.get(exc.errno or 0, "")
            what = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ListenError(f"tunnel {spec.title!r} cannot listen on {spec.listen}: {what}"
                              + (f"; {hint}" if hint else "")) from None
        log.info("tunnel %r: %s on %s -> %s %s (max %d connections%s)", spec.title,
                 "securechan in" if spec.mode == "server" else "plain in", ", ".join(self.addresses),
                 "plain" if spec.mode == "server" else "securechan", spec.target, spec.max_connections,
                 ", PROXY v2" if spec.proxy_protocol else "")
        plain = spec.target if spec.mode == "server" else spec.listen
        if plain.is_unix:
            who = "the service" if spec.mode == "server" else "the client"
            log.warning("tunnel %r: the plain side (%s) is a Unix socket, which has no reset: a stream this tunnel "
                        "has to cut (a failed or truncated securechan connection, a timeout) reaches %s as a normal "
                        "end of stream. Use loopback TCP if %s must tell a cut stream from a complete one.",
                        spec.title, plain, who, who)

    @property
    def addresses(self) -> list[str]:
        if self.server is None:
            return []
        out = []
        for sock in self.server.sockets:
            name = sock.getsockname()
            out.append(_peer_text(name) if isinstance(name, tuple) else f"unix:{name}")
        return out

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def stop_accepting(self) -> None:
        self._closing = True
        self._log_refusal_tail()
        if self.server is not None:
            self.server.close()
        self._retire_carriers(refuse_now=True)

    def _retire_carriers(self, *, refuse_now: bool) -> None:
        """No new streams on today's multiplexed connections; each closes once its streams have ended."""
        self._mux_current = None
        for session in list(self.carriers):
            if self.spec.mode == "server":
                session.goaway(refuse_now=refuse_now)
            else:
                session.retire()

    async def drain(self, deadline: float | None) -> int:
        """Wait up to ``deadline`` seconds (None: forever) for open connections to finish; abort the rest.

        Returns how many relays were cut.
        """
        await self.wait_drained(deadline)
        return await self.cut_open(self.cut_reason(deadline))

    async def wait_drained(self, deadline: float | None) -> None:
        """Wait up to ``deadline`` seconds (None: forever) for open connections to finish (or :meth:`hurry`)."""
        loop = asyncio.get_running_loop()
        end = None if deadline is None else loop.time() + deadline
        while (self.active or self.relays) and not self._hurry and (end is None or loop.time() < end):
            await asyncio.sleep(0.05)

    def cut_reason(self, deadline: float | None) -> str:
        """How a cut at the end of :meth:`wait_drained` is logged."""
        if self._hurry:
            return "cut by a second stop signal"
        return f"shutdown deadline ({deadline:g} s) reached" if deadline is not None else "shutdown"

    async def cut_open(self, reason: str) -> int:
        """Abort every open connection now (RST / no close_notify); returns how many relays were cut.

        Connections still connecting to their target or still in their handshake are cut too
        (and logged as cut), not left to finish setting up after the tunnel said it stopped.
        """
        cut = self.open_count
        self.cut_now(reason)
        # Connections still being set up (a target connect, a handshake) and running relays are
        # logged and leave their sets once their connections are gone; no task waits on them.
        loop = asyncio.get_running_loop()
        end = loop.time() + 1
        while (self._tasks or self.relays or self.connecting) and loop.time() < end:
            await asyncio.sleep(0.005)
            self.cut_now(reason)  # a relay that got its second connection while being cut
        if self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        self.cut += cut
        return cut

    def cut_now(self, reason: str) -> None:
        """Abort every open connection (RST / no close_notify) without waiting; see :meth:`cut_open`.

        Also what a tunnel does when the program around it ends without :meth:`drain`.
        """
        for relay in list(self.relays | self.connecting):
            relay.stop(reason)
        for proto in list(self._protocols):
            proto.abort()
        for session in list(self.carriers):
            session.abort()
        if self._mux_pending is not None:
            self._mux_pending.cancel()

    @property
    def open_count(self) -> int:
        """Relays running or still being set up (the two sets never share a relay)."""
        return len(self.relays) + len(self.connecting)

    def hurry(self) -> None:
        """End a running :meth:`drain` now (a second SIGTERM/SIGINT)."""
        self._hurry = True

    async def close(self, deadline: float | None = 0) -> None:
        self.stop_accepting()
        await self.drain(deadline)
        if self.server is not None:
            await self.server.wait_closed()
        path = self.spec.listen.path
        if path is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)

    def reload(self) -> None:
        """Re-read certificate, key and CA files for new connections (SIGHUP); raises ConfigError if broken."""
        if self.spec.mode == "server":
            config = self.spec.server_config()
            config.continue_from(self._server_config)
            self._server_config = config
        else:
            self._load_client_configs()
        # Multiplexed connections move to the new certificates too: new streams go to new connections.
        self._retire_carriers(refuse_now=False)
        log.info("tunnel %r: reloaded certificates for new connections", self.spec.title)

    def _load_client_configs(self) -> None:
        """Both configs are read before either replaces the current one (a broken file changes neither)."""
        spec = self.spec
        config = spec.client_config()
        direct = spec.client_config(offer_mux=False) if spec.multiplexed else config
        self._client_config, self._direct_config = config, direct
        self._multiplex = spec.multiplexed
        self._refusal_warned = False

    # -- accounting -------------------------------------------------------------------------

    def _admit(self, transport: asyncio.BaseTransport) -> bool:
        if self._closing or self.active >= self.spec.max_connections:
            self.rejected += 1
            if not self._closing:
                log.warning("tunnel %r: connection limit (%d) reached; reset connection from %s "
                            "(raise --max-connections if this load is expected)", self.spec.title,
                            self.spec.max_connections, _peer_text(transport.get_extra_info("peername")))
            _reset(transport)
            return False
        self.active += 1
        self.accepted += 1
        return True

    def _release(self) -> None:
        self.active -= 1

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _log_end(self, peer: str, identity: str, suite: str, relay: Relay | None, reason: str,
                 started: float, *, failed: bool) -> None:
        up, down = (relay.up, relay.down) if relay is not None else (0, 0)
        duration = asyncio.get_running_loop().time() - started
        if failed and relay is None:
            level = logging.WARNING
        elif self.spec.quiet and up == 0 and down == 0:
            level = logging.DEBUG
        else:
            level = logging.INFO
        log.log(level, "tunnel %r: %s identity=%s suite=%s up=%d down=%d duration=%.3fs closed: %s",
                self.spec.title, peer, identity, suite, up, down, duration, reason)

    # -- server side: securechan in, plain out -------------------------------------------------

    def _new_relay(self, *, client_secure: bool) -> Relay:
        return Relay(client_secure=client_secure, idle_timeout=self.spec.idle_timeout,
                     max_lifetime=self.spec.max_lifetime)

    def _make_protocol(self) -> SecureProtocol:
        assert self._server_config is not None
        started = asyncio.get_running_loop().time()

        def app_protocol() -> asyncio.BaseProtocol:  # called once the handshake completed
            assert proto.app_transport is not None
            if proto.app_transport.get_extra_info("alpn_protocol") == mux.PROTOCOL:
                return self._accept_carrier(proto)
            relay = self._new_relay(client_secure=True)
            relay.client.on_connected = lambda _: self._spawn(self._serve_secure(relay, started, release=False))
            return relay.client

        proto = _CountedProtocol(self, Connection(self._server_config), app_protocol, None,
                                 self.spec.handshake_timeout)
        proto.on_handshake_failed = self._handshake_failed
        return proto

    def _accept_carrier(self, proto: SecureProtocol) -> mux.MuxSession:
        """A multiplexing client tunnel: its streams are this tunnel's connections (each counted and logged)."""
        session = mux.MuxSession(server=True, on_open=self._open_stream, on_lost=self._carrier_lost,
                                 idle_timeout=MUX_SERVER_IDLE, label=f"tunnel {self.spec.title!r}",
                                 budget=self.window_budget)
        self.carriers.add(session)
        log.debug("tunnel %r: %s multiplexed connection established", self.spec.title, _peer_text(proto._peer))
        if self._closing or proto._conn.config is not self._server_config:
            # Shutting down (refuse its streams), or its handshake began before a reload: the client
            # moves to a connection made under today's certificates and access list.
            asyncio.get_running_loop().call_soon(functools.partial(session.goaway, refuse_now=self._closing))
        return session

    def _open_stream(self, session: mux.MuxSession, stream_id: int) -> asyncio.Protocol | None:
        """An OPEN from a client tunnel: admit it like an accepted connection, or refuse it (None)."""
        if self._closing or self.active >= self.spec.max_connections:
            self.rejected += 1
            if not self._closing:
                self._log_refused_stream(session, stream_id)
            return None
        self.active += 1
        self.accepted += 1
        relay = self._new_relay(client_secure=True)
        started = asyncio.get_running_loop().time()
        relay.client.on_connected = lambda _: self._spawn(self._serve_secure(relay, started, release=True))
        return relay.client

    def _log_refused_stream(self, session: mux.MuxSession, stream_id: int) -> None:
        """One line per second at most: a client may open streams far faster than lines are worth writing.
        The first refusal is logged at once; those of the rest of that second are counted in one line at its end."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if now - self._refusal_logged < 1.0:
            self._refusals_unlogged += 1
            if self._refusal_tail is None:
                self._refusal_tail = loop.call_at(self._refusal_logged + 1.0, self._log_refusal_tail)
            return
        self._refusal_logged = now
        log.warning("tunnel %r: connection limit (%d) reached; refused stream %d from %s "
                    "(raise --max-connections if this load is expected)", self.spec.title,
                    self.spec.max_connections, stream_id, _peer_text(session.carrier_info("peername")))

    def _log_refusal_tail(self) -> None:
        if self._refusal_tail is not None:
            self._refusal_tail.cancel()
            self._refusal_tail = None
        count, self._refusals_unlogged = self._refusals_unlogged, 0
        if not count:
            return
        self._refusal_logged = asyncio.get_running_loop().time()
        log.warning("tunnel %r: connection limit (%d) reached; %d more stream%s refused since the last line "
                    "(raise --max-connections if this load is expected)", self.spec.title,
                    self.spec.max_connections, count, "" if count == 1 else "s")

    def _carrier_lost(self, session: mux.MuxSession, exc: Exception | None) -> None:
        self.carriers.discard(session)
        if self._mux_current is session:
            self._mux_current = None
        level = logging.DEBUG if exc is None or isinstance(session.error, mux.MuxProtocolError) else logging.INFO
        log.log(level, "tunnel %r: multiplexed connection with %s closed%s", self.spec.title,
                _peer_text(session.carrier_info("peername")), f": {exc}" if exc is not None else "")

    def _handshake_failed(self, proto: SecureProtocol, exc: BaseException) -> None:
        peer = _peer_text(proto._peer)
        # A socket that connects and hangs up (a TCP health check, a port scan) is routine.
        routine = isinstance(exc, (TruncationError, ConnectionClosedError))
        level = (logging.DEBUG if self.spec.quiet else logging.INFO) if routine else logging.WARNING
        log.log(level, "tunnel %r: %s handshake failed: %s", self.spec.title, peer, exc)

    async def _serve_secure(self, relay: Relay, started: float, *, release: bool) -> None:
        """``release``: the relay holds its own connection slot (a stream), not its securechan connection."""
        spec = self.spec
        secure = relay.client.transport
        assert secure is not None
        peer_addr = secure.get_extra_info("peername")
        peer = _peer_text(peer_addr)
        if isinstance(secure, mux.MuxStream):
            peer += f" stream {secure.stream_id}"
        session = secure.get_extra_info("securechan")
        cert = secure.get_extra_info("peercert")
        identity = _identity(cert) if cert is not None else "none"
        suite = session.suite + (" resumed" if session.resumed else "")
        self.connecting.add(relay)
        try:
            await connect(spec.target, lambda: relay.target, spec.connect_timeout, spec.connect_retries,
                          spec.retry_delay, connected=lambda: relay.target.transport is not None)
        except OSError as exc:
            if isinstance(relay.client.transport, mux.MuxStream):
                relay.client.transport.reset(mux.RESET_TARGET_FAILED)
            relay.stop("target connection failed")
            if release:
                self._release()
            self._log_end(peer, identity, suite, None, _target_failure(spec.target, spec.connect_timeout, exc),
                          started, failed=True)
            return
        except asyncio.CancelledError:
            relay.stop("cancelled")
            if release:
                self._release()
            self._log_end(peer, identity, suite, None, relay.reason or "cancelled", started, failed=True)
            raise
        finally:
            self.connecting.discard(relay)
        if spec.proxy_protocol and relay.reason is None:  # not when cut while connecting
            cn = None
            if cert is not None:
                from ..acl import common_names

                names = common_names(cert)
                cn = names[0] if names else describe(cert)
            assert relay.target.transport is not None
            relay.target.transport.write(proxyproto.header(
                peer_addr, secure.get_extra_info("sockname"),
                proxyproto.ssl_tlv(f"securechan/{session.version}", session.suite, cn)))
        self._start_relay(relay, peer, identity, suite, started, release=release)

    def _start_relay(self, relay: Relay, peer: str, identity: str, suite: str, started: float, *,
                     release: bool) -> None:
        """Both connections exist: relay, and log (and ``release`` the connection slot) when it ends.

        No task waits on a running relay: its end is a callback from the connections' own events.
        """
        def done(relay: Relay) -> None:
            self.relays.discard(relay)
            self.completed += 1
            if release:
                self._release()
            self._log_end(peer, identity, suite, relay, relay.reason or "closed", started, failed=relay.failed)

        self.connecting.discard(relay)
        self.relays.add(relay)
        relay.when_done(done)  # before start(): however the relay ends, it is logged and released
        relay.start()

    # -- client side: plain in, securechan out -------------------------------------------------

    def _make_plain_protocol(self) -> End:
        relay = self._new_relay(client_secure=False)
        relay.client.on_connected = self._plain_connected
        return relay.client

    def _plain_connected(self, end: End) -> None:
        assert end.transport is not None
        if not self._admit(end.transport):
            return
        if not self._multiplex and not self._mux_again():
            self._spawn(self._serve_plain(end.relay))
        elif self._mux_current is not None and self._mux_current.usable:
            # The usual case: a stream on the connection already made (no task, no round trip).
            self._open_mux_stream(self._mux_current, end.relay, asyncio.get_running_loop().time())
        else:
            self._spawn(self._serve_plain_mux(end.relay))

    def _mux_again(self) -> bool:
        """After a refusal: whether it is time to offer multiplexing again (then it is offered)."""
        if self._recheck_at == 0.0 or asyncio.get_running_loop().time() < self._recheck_at:
            return False
        self._recheck_at = 0.0
        self._multiplex = True
        return True

    async def _serve_plain_mux(self, relay: Relay) -> None:
        """Wait for the multiplexed connection to the server tunnel (made once for all waiting), then open a stream."""
        if not self._multiplex:  # refused between this task's creation and its first turn
            await self._serve_plain(relay)
            return
        started = asyncio.get_running_loop().time()
        self.connecting.add(relay)
        waiting = (relay, started)
        self._mux_waiting.append(waiting)
        session: mux.MuxSession | None = None
        try:
            # A carrier can stop taking streams between its handshake and this task's turn (a GOAWAY
            # in its first read, a loss): then the next one is made, once.
            for _ in range(2):
                session = await self._carrier()
                if session.usable:
                    break
            else:
                raise _CarrierFailed(f"two multiplexed connections to {self.spec.target} in a row stopped taking "
                                     "streams as soon as they were made (closed or sent away by the server tunnel, "
                                     "whose log says why, or replaced by a reload here)")
        except asyncio.CancelledError:
            if relay in self.connecting:  # not relaying yet (see _NotMultiplexed)
                relay.stop("cancelled")
                self._client_failed(None, relay, self._plain_peer(relay), started, relay.reason or "cancelled")
            raise
        except _CarrierFailed as exc:
            self._client_failed(None, relay, self._plain_peer(relay), started, str(exc))
            return
        except _NotMultiplexed as exc:
            if exc.relay is relay:  # the connection made is this one's own, and relays already
                return
            session = None
        finally:
            with contextlib.suppress(ValueError):
                self._mux_waiting.remove(waiting)
        if relay.reason is not None:  # the plain client went away (or the tunnel cut it) meanwhile
            self._client_failed(None, relay, self._plain_peer(relay), started, relay.reason)
        elif session is None:  # the server tunnel does not multiplex: a connection of its own
            await self._serve_plain(relay, started)
        else:
            self._open_mux_stream(session, relay, started)

    @staticmethod
    def _plain_peer(relay: Relay) -> str:
        transport = relay.client.transport
        return _peer_text(transport.get_extra_info("peername") if transport is not None else None)

    def _open_mux_stream(self, session: mux.MuxSession, relay: Relay, started: float) -> None:
        try:
            session.open_stream(relay.target)
            identity, suite = _session_text(relay.target)
        except Exception as exc:
            # A defect, not the peer: the connection is not left hanging with its slot taken.
            self._client_failed(None, relay, self._plain_peer(relay), started,
                                f"internal error while opening a stream ({type(exc).__name__})")
            asyncio.get_running_loop().call_exception_handler(
                {"message": "exception while opening a multiplexed stream", "exception": exc})
            return
        self._start_relay(relay, self._plain_peer(relay), identity, suite, started, release=True)

    async def _carrier(self) -> mux.MuxSession:
        """The multiplexed connection new streams go to: the current one, or the one being made."""
        current = self._mux_current
        if current is not None and current.usable:
            return current
        if self._mux_pending is None or self._mux_pending.done():
            pending = self._mux_pending = asyncio.ensure_future(self._make_carrier())
            # Waiters may all be gone (cut) when it fails: its error is theirs, not the loop's.
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(self._mux_pending)

    async def _make_carrier(self) -> mux.MuxSession:
        spec, cfg = self.spec, self._client_config
        assert cfg is not None
        target, name = spec.target, spec.effective_server_name
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        session = mux.MuxSession(server=False, on_lost=self._carrier_lost, idle_timeout=MUX_CLIENT_IDLE,
                                 label=f"tunnel {spec.title!r}", budget=self.window_budget)
        try:
            connection = Connection(cfg, server_name=name, resume_key=(target.path or target.host, target.port, name))
        except Exception as exc:
            raise _CarrierFailed(f"cannot start a securechan connection ({type(exc).__name__}: {exc})") from None
        direct: list[Relay] = []

        def app_protocol() -> asyncio.BaseProtocol:  # called once the handshake completed
            assert proto.app_transport is not None
            if spec.mux or proto.app_transport.get_extra_info("alpn_protocol") == mux.PROTOCOL:
                return session
            # The server tunnel does not multiplex: the connection is the first waiting one's own, and
            # relays from inside this call like a direct connection (_ClientProtocol).
            while self._mux_waiting:
                relay, started = self._mux_waiting.popleft()
                if relay.reason is None:
                    direct.append(relay)
                    relay.target.on_connected = functools.partial(self._client_ready, proto, started)
                    return relay.target
            return asyncio.Protocol()  # nobody waits any more: closed below

        proto = _TunnelProtocol(connection, app_protocol, waiter, cfg.handshake_timeout)
        self._protocols.add(proto)
        try:
            try:
                await connect(target, lambda: proto, spec.connect_timeout, spec.connect_retries, spec.retry_delay,
                              connected=lambda: proto.made)
            except OSError as exc:
                raise _CarrierFailed(_target_failure(target, spec.connect_timeout, exc)) from None
            try:
                await waiter
            except (SecureChannelError, OSError) as exc:
                raise _CarrierFailed(self._handshake_failure(exc)) from None
        except BaseException:
            proto.abort()
            raise
        finally:
            self._protocols.discard(proto)
        if session.carrier is None or session.carrier.get_extra_info("alpn_protocol") != mux.PROTOCOL:
            if spec.mux:
                proto.abort()
                raise _CarrierFailed(f"the server tunnel at {target} does not accept multiplexed connections "
                                     "(--mux): it runs with --no-mux, or is not a securechan server tunnel of this "
                                     "version; run this client tunnel without --mux (it then makes one securechan "
                                     "connection per connection), or the server tunnel without --no-mux")
            if cfg is self._client_config and self._multiplex:
                self._multiplex = False
                self._recheck_at = loop.time() + MUX_RECHECK
                # Once per start or reload: the periodic re-checks of a server that still refuses are not news.
                log.log(logging.DEBUG if self._refusal_warned else logging.WARNING,
                        "tunnel %r: the server at %s does not accept multiplexed connections (a server tunnel with "
                        "--no-mux, or a securechan server that is not a tunnel): this tunnel makes one securechan "
                        "connection per connection, and asks again in %g s; give it --no-mux to do so from the "
                        "start", spec.title, target, MUX_RECHECK)
                self._refusal_warned = True
            if not direct and proto.app_transport is not None:
                proto.app_transport.close()
            raise _NotMultiplexed(direct[0] if direct else None)
        if self._closing:
            session.close()
            raise _CarrierFailed("the tunnel is shutting down")
        if session.closed:
            raise _CarrierFailed(f"the multiplexed connection to {target} closed as soon as it was made "
                                 f"({session.error or 'closed by the server tunnel'})")
        self.carriers.add(session)
        if cfg is not self._client_config:
            session.retire()  # made with the configuration before a reload: new streams wait for the next one
        else:
            self._mux_current = session
        identity, suite = _session_text_of(session.carrier)
        log.info("tunnel %r: multiplexed securechan connection to %s established: identity=%s suite=%s",
                 spec.title, target, identity, suite)
        return session

    async def _serve_plain(self, relay: Relay, started: float | None = None) -> None:
        """Make the TCP connection to the server tunnel; the handshake and the relay go on in callbacks."""
        spec, cfg = self.spec, self._direct_config
        assert cfg is not None and relay.client.transport is not None
        if started is None:
            started = asyncio.get_running_loop().time()
        peer = _peer_text(relay.client.transport.get_extra_info("peername"))
        target, name = spec.target, spec.effective_server_name
        try:
            proto = _ClientProtocol(
                self, relay, peer, started,
                Connection(cfg, server_name=name, resume_key=(target.path or target.host, target.port, name)),
                cfg.handshake_timeout,
            )
        except Exception as exc:
            self._client_failed(None, relay, peer, started,
                                f"cannot start a securechan connection ({type(exc).__name__}: {exc})")
            raise
        self.connecting.add(relay)
        self._protocols.add(proto)
        try:
            await connect(target, lambda: proto, spec.connect_timeout, spec.connect_retries, spec.retry_delay,
                          connected=lambda: proto.made)
        except OSError as exc:
            proto.settle_failed(_target_failure(target, spec.connect_timeout, exc))
        except BaseException:
            relay.stop("cancelled")
            if proto._tcp is not None:
                proto.abort()  # its connection_lost reports the cut
            else:
                proto.settle_failed(relay.reason or "cancelled")
            raise

    def _client_ready(self, proto: _TunnelProtocol, started: float, end: End) -> None:
        """The handshake of the connection that carries ``end``'s relay alone completed (inside its
        ``connection_made``): relay at once."""
        relay, peer = end.relay, self._plain_peer(end.relay)
        try:
            identity, suite = _session_text(end)
        except Exception as exc:
            # A defect, not the peer: the connection is not left paused with its slot taken.
            self._client_failed(proto, relay, peer, started,
                                f"internal error while starting the relay ({type(exc).__name__})")
            asyncio.get_running_loop().call_exception_handler(
                {"message": "exception while starting a tunnel relay", "exception": exc})
            return
        self.connecting.discard(relay)
        self._protocols.discard(proto)
        # From here the relay owns the connection slot: it releases it when it ends.
        self._start_relay(relay, peer, identity, suite, started, release=True)

    def _client_failed(self, proto: _TunnelProtocol | None, relay: Relay, peer: str, started: float,
                       why: str) -> None:
        self.connecting.discard(relay)
        if proto is not None:
            self._protocols.discard(proto)
        relay.stop("securechan connection failed")
        self._release()
        self._log_end(peer, "-", "-", None, why, started, failed=True)

    def _handshake_failure(self, exc: BaseException) -> str:
        """What a failed handshake with the server tunnel means, for the log line of the connection it failed."""
        spec = self.spec
        where = f"securechan handshake with {spec.target} failed"
        if isinstance(exc, NameMismatchError):
            return (f"{where}: the server certificate does not match --server-name "
                    f"{spec.effective_server_name!r}: {exc}")
        if isinstance(exc, HandshakeTimeoutError):
            return f"{where}: {exc} (is {spec.target} a securechan server tunnel, not the plain service?)"
        if isinstance(exc, TruncationError):  # a close or a reset: its text says which
            return (f"{where}: {exc}; is {spec.target} a securechan server tunnel, and does it accept this "
                    "client (its log says why)?")
        return f"{where}: {exc}"


def _target_failure(target: Address, timeout: float, exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return f"target {target} did not accept the connection within {timeout:g} s; is it overloaded or firewalled?"
    if isinstance(exc, ConnectionRefusedError) or (target.is_unix and isinstance(exc, FileNotFoundError)):
        return f"target {target} refused the connection; is the service running and listening there?"
    return f"cannot connect to target {target}: {exc.strerror or exc}"
