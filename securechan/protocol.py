"""asyncio adapter: a BufferedProtocol on the TCP transport that gives the app protocol a transport.

Theory of operation
-------------------
:class:`SecureProtocol` is what asyncio's TCP transport talks to. It drives one sans-IO
:class:`~securechan.Connection`: the kernel reads straight into the connection's receive
buffer (``get_buffer``/``buffer_updated``), and whatever the connection queues is written
to the TCP transport at once, so the only write buffer is the TCP transport's own. One
exception: on the read that completes the handshake, our last handshake flight is held
back while the application's ``connection_made`` runs, so that it and whatever the
application writes there (a request, a relay's buffered bytes) leave in one write; anything
that closes or aborts the TCP transport writes or drops what is held first.

The application protocol is created when the connection object is, but it sees
``connection_made`` only after the handshake completed (the peer's Finished verified), with
a :class:`SecureTransport`. Until then nothing reaches it. A handshake failure resolves the
waiter future with the typed error (``create_connection`` raises it) and the app protocol
never hears of the connection.

Flow control is delegated in both directions: the app's ``pause_reading`` pauses the TCP
transport (at most one read's worth of records is still delivered), and the TCP
transport's ``pause_writing``/``resume_writing`` are forwarded to the app protocol, which
is what ``StreamWriter.drain()`` waits on.

Closing: ``write_eof()`` sends close_notify then shuts down the TCP write side;
``close()`` sends close_notify and closes. Receiving close_notify calls the app's
``eof_received``; a TCP EOF without it is a :class:`TruncationError`, delivered through
``connection_lost``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from .connection import Connection
from .errors import ConnectionClosedError, HandshakeTimeoutError, SecureChannelError, TruncationError
from .events import DataReceived, HandshakeComplete, PeerClosed, SessionInfo

log = logging.getLogger("securechan")

#: Seconds a failed connection may spend flushing its alert before the socket is aborted.
FATAL_CLOSE_GRACE = 2.0

#: In ``writelines``, a buffer at least this large gets its own record(s) instead of being joined with others.
_OWN_RECORD = 16 * 1024

#: Seconds without a read after which a connection's grown receive buffer is released.
IDLE_RELEASE_SECONDS = 1.0


class SecureProtocol(asyncio.BufferedProtocol):
    def __init__(
        self,
        connection: Connection,
        app_protocol_factory: Callable[[], asyncio.BaseProtocol],
        waiter: asyncio.Future[None] | None,
        handshake_timeout: float | None,
    ) -> None:
        self._conn = connection
        self._app_factory = app_protocol_factory
        self._waiter = waiter
        self._timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._tcp: asyncio.Transport | None = None
        self.app_protocol: asyncio.BaseProtocol | None = None
        self.app_transport: SecureTransport | None = None
        self._error: BaseException | None = None
        self._app_paused_writing = False
        self._app_lost_sent = False
        self._peer: Any = None
        self.on_handshake_failed: Callable[[SecureProtocol, BaseException], None] | None = None
        self._reads = 0
        self._reads_at_arm = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        #: Output held back while the handshake completes (see buffer_updated), else None.
        self._cork: list[bytes] | None = None
        if type(self).get_buffer is SecureProtocol.get_buffer:
            # The event loop reads into the connection's buffer directly (no call of ours in between).
            self.get_buffer = connection._loop_buffer  # type: ignore[method-assign]

    # -- asyncio.BaseProtocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the Transport interface without subclassing it.
        self._tcp = cast(asyncio.Transport, transport)
        self._peer = transport.get_extra_info("peername")
        if self._timeout is not None:
            self._timer = asyncio.get_running_loop().call_later(self._timeout, self._handshake_timed_out)
        self._flush()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._conn._loop_buffer(sizehint)  # replaced per instance by the connection's own (__init__)

    def buffer_updated(self, nbytes: int) -> None:
        # Runs for every read: the calls it makes are the ones it needs (see benchmarks/README.md).
        if self._error is not None:
            return  # already failed; the transport is closing
        conn = self._conn
        try:
            events = conn.buffer_updated(nbytes)
        except SecureChannelError as exc:
            self._fatal(exc)
            return
        app, transport = self.app_protocol, self.app_transport
        # The read that completes the handshake: our last handshake flight and whatever the
        # application writes from connection_made (a relay's buffered bytes, a request) leave
        # in one write instead of one each.
        corked = transport is None and conn.handshake_complete
        if corked:
            self._cork = []
        try:
            if conn._out:  # a handshake flight, a key update's answer, an alert: rare once established
                self._flush()
            for event in events:
                if type(event) is DataReceived:
                    if app is not None and transport is not None and not transport._closed:
                        app.data_received(event.data)  # type: ignore[attr-defined]
                elif isinstance(event, HandshakeComplete):
                    self._on_handshake_complete(event.session)
                    app, transport = self.app_protocol, self.app_transport
                elif isinstance(event, PeerClosed):
                    self._on_peer_closed()
                # KeysUpdated: logged by the connection at debug level
        finally:
            if corked:
                self._uncork()
        if conn.error is not None:
            self._fatal(conn.error)
            return
        self._reads += 1
        if self._idle_timer is None and conn._large and self._tcp is not None:
            self._arm_idle_release()

    def _arm_idle_release(self) -> None:
        self._reads_at_arm = self._reads
        self._idle_timer = asyncio.get_running_loop().call_later(IDLE_RELEASE_SECONDS, self._release_if_idle)

    def _release_if_idle(self) -> None:
        """Give the bulk receive buffer back once reads have stopped, so idle connections stay small."""
        self._idle_timer = None
        if self._reads != self._reads_at_arm:
            self._arm_idle_release()
        else:
            self._conn.release_buffer()

    def eof_received(self) -> bool:
        try:
            self._conn.receive_eof()
        except SecureChannelError as exc:
            self._fatal(exc)
            return False
        # Clean EOF after close_notify: like a plain TCP transport, stay open until the app closes.
        return self.app_transport is not None and not self.app_transport._closed

    def pause_writing(self) -> None:
        self._app_paused_writing = True
        if self.app_protocol is not None:
            self.app_protocol.pause_writing()

    def resume_writing(self) -> None:
        self._app_paused_writing = False
        if self.app_protocol is not None:
            self.app_protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        error = self._error or exc
        if isinstance(error, OSError) and not isinstance(error, SecureChannelError) and not self._conn.peer_closed:
            # A reset (or another socket error) before close_notify cut the stream: report it
            # as the truncation it is, in securechan's hierarchy (still a ConnectionResetError).
            if self._conn.handshake_complete:
                what = "the connection was cut by a TCP reset or socket error before close_notify"
                advice = "; treat what was received as incomplete"
            else:
                what, advice = "the handshake was cut by a TCP reset or socket error", ""
            error = TruncationError(f"{what} ({error.strerror or error}){advice}")
            if not self._conn.handshake_complete and self._error is None and self.on_handshake_failed is not None:
                self.on_handshake_failed(self, error)  # a reset handshake is reported like any other failure
        if self._waiter is not None and not self._waiter.done():
            if error is None:
                # The peer's EOF reaches eof_received first, which records it as the error; a
                # stream that ends here without one was closed on this side.
                error = ConnectionClosedError(
                    "the connection was closed on this side during the handshake (the transport was closed)"
                )
            self._waiter.set_exception(error)
            self._waiter = None
        try:
            self._notify_app_lost(error)  # application code: whatever it raises, the keys are wiped
        finally:
            self._conn.discard()
            self._tcp = None

    # -- internals ------------------------------------------------------------------------

    def _notify_app_lost(self, error: BaseException | None) -> None:
        """The application hears ``connection_lost`` exactly once, at the first of: failure, socket loss."""
        transport = self.app_transport
        if transport is None or self._app_lost_sent:
            return
        transport._closed = True
        self._app_lost_sent = True
        if self.app_protocol is not None:
            self.app_protocol.connection_lost(error)  # type: ignore[arg-type]

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if data and self._tcp is not None and not self._tcp.is_closing():
            if self._cork is not None:
                self._cork.append(data)
            else:
                self._tcp.write(data)

    def _uncork(self) -> None:
        """Write what was held back, in order, as one ``writelines`` (one system call)."""
        cork, self._cork = self._cork, None
        if cork and self._tcp is not None and not self._tcp.is_closing():
            self._tcp.writelines(cork)

    def _on_handshake_complete(self, session: SessionInfo) -> None:
        self._cancel_timer()
        assert self._tcp is not None
        self.app_transport = SecureTransport(self, self._tcp, self._conn, session)
        self.app_protocol = self._app_factory()
        self.app_protocol.connection_made(self.app_transport)
        if self._app_paused_writing:
            self.app_protocol.pause_writing()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._waiter = None

    def _on_peer_closed(self) -> None:
        app = self.app_protocol
        keep_open = bool(app.eof_received()) if isinstance(app, asyncio.Protocol) else False
        if not keep_open and self.app_transport is not None:
            self.app_transport.close()

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if self._conn.handshake_complete:
            return
        where = f" with {self._peer[0]}:{self._peer[1]}" if isinstance(self._peer, tuple) else ""
        self._fatal(
            HandshakeTimeoutError(
                f"the handshake{where} did not complete within {self._timeout:g} s "
                f"({self._conn.state.value}); is the peer a securechan endpoint, and is the path open?"
            ),
            abort_connection=True,
        )

    def _fatal(self, exc: SecureChannelError, abort_connection: bool = False) -> None:
        if self._error is None:
            self._error = exc
        if abort_connection:
            self._conn.abort(exc)
        self._flush()  # the alert, if any
        if not self._conn.handshake_complete and self.on_handshake_failed is not None:
            self.on_handshake_failed(self, exc)
        # Tell the application now, not when the socket has finished flushing: a peer that stops
        # reading must not keep a failed channel looking alive (a relay would treat it as idle).
        self._notify_app_lost(exc)
        self._close_tcp()
        if self._tcp is not None:
            # The alert gets a short grace to leave; a peer that does not read cannot hold the socket.
            asyncio.get_running_loop().call_later(FATAL_CLOSE_GRACE, self._tcp.abort)

    def _close_tcp(self) -> None:
        self._cancel_timer()
        self._uncork()
        if self._tcp is not None and not self._tcp.is_closing():
            self._tcp.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- called by SecureTransport ------------------------------------------------------

    def _app_write_eof(self) -> None:
        if self._conn.send_closed:
            return
        self._conn.close()
        self._flush()
        self._uncork()
        if self._tcp is not None and self._tcp.can_write_eof() and not self._tcp.is_closing():
            try:
                self._tcp.write_eof()
            except OSError:
                pass  # the peer is already gone; connection_lost reports it

    def _app_close(self) -> None:
        if not self._conn.send_closed and self._error is None:
            self._conn.close()
            self._flush()
        self._close_tcp()

    def _app_abort(self) -> None:
        self._cork = None  # an abort discards unsent output
        if self._tcp is not None:
            self._tcp.abort()


class SecureTransport(asyncio.Transport):
    """The transport an application protocol sees: plaintext in, records out."""

    def __init__(self, proto: SecureProtocol, tcp: asyncio.Transport, conn: Connection, session: SessionInfo) -> None:
        super().__init__()
        self._session = session
        self._proto = proto
        self._tcp = tcp
        self._conn = conn
        self._closed = False
        self._eof_written = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        session = self._session
        if name == "securechan":
            return session
        if name == "peercert":
            return session.peer_certificate
        if name == "peer_chain":
            return session.peer_chain
        if name == "alpn_protocol":
            return session.alpn_protocol
        if name == "cipher":  # the shape ssl transports use: (name, protocol, secret bits)
            bits = 128 if session.suite == "AES-128-GCM" else 256
            return (session.suite, f"securechan/{session.version}", bits)
        if name == "peername" and self._proto._peer is not None:
            return self._proto._peer  # read once at connection_made (on uvloop each read is a system call)
        return self._tcp.get_extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data: expecting a bytes-like instance, got {type(data).__name__}")
        if not data:
            return
        if self._eof_written:
            raise ConnectionClosedError("cannot write after write_eof()/close(): close_notify was already sent")
        if self._closed:
            return  # lost connection: as asyncio does, drop; drain() raises the cause
        proto = self._proto
        tcp = proto._tcp
        if tcp is None or proto._error is not None or self._conn.error is not None:
            # The connection is gone (or failed after the records being delivered now);
            # as with asyncio transports, drop the write: drain()/read() report why.
            return
        parts = self._conn.seal_parts(data)
        if proto._cork is not None:
            proto._cork.extend(parts)
        else:
            tcp.writelines(parts)

    def writelines(self, list_of_data: Any) -> None:
        """One TCP write for all: small buffers share a record, a large one is sealed as it is (not copied first)."""
        items = list(list_of_data)
        for data in items:  # checked before anything is sent, as one joined write would be
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"data: expecting a bytes-like instance, got {type(data).__name__}")
        proto = self._proto
        cork = proto._cork is None  # else the handshake's last flight is held already: join it
        if cork:
            proto._cork = []
        try:
            small: list[Any] = []
            for data in items:
                if len(data) < _OWN_RECORD:
                    small.append(data)
                    continue
                if small:
                    self.write(b"".join(small))
                    small = []
                self.write(data)
            if small:
                self.write(small[0] if len(small) == 1 else b"".join(small))
        finally:
            if cork:
                proto._uncork()

    def write_eof(self) -> None:
        if self._eof_written:
            return
        self._eof_written = True
        self._proto._app_write_eof()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._eof_written = True
        self._proto._app_close()

    def is_closing(self) -> bool:
        return self._closed or self._tcp.is_closing()

    def abort(self) -> None:
        self._closed = True
        self._eof_written = True
        self._proto._app_abort()

    def pause_reading(self) -> None:
        self._tcp.pause_reading()

    def resume_reading(self) -> None:
        self._tcp.resume_reading()

    def is_reading(self) -> bool:
        return self._tcp.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._tcp.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tcp.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._proto.app_protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._proto.app_protocol  # type: ignore[return-value]

    def update_keys(self, request_peer: bool = True) -> None:
        """Ratchet the traffic keys now (they are also ratcheted automatically by volume)."""
        self._conn.update_keys(request_peer)
        self._proto._flush()
