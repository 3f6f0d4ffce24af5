"""The sans-IO connection: bytes in, events out, the state machine as data.

Theory of operation
-------------------
A :class:`Connection` owns no socket, task or clock. The I/O layer

* feeds received bytes with :meth:`receive_data` (or, zero-copy, writes them into
  :meth:`get_buffer` and calls :meth:`buffer_updated`) and gets a list of events back;
* sends application bytes with :meth:`send_data`, closes its direction with
  :meth:`close`, and writes out whatever :meth:`data_to_send` returns after each call.

Incoming bytes accumulate in one buffer. Frames are cut from it by their 7-byte head; a
head is validated against the limits of the current state (which frame types are allowed,
how long each may be) before any body byte is waited for, so a hostile length costs
nothing. A protected record is decrypted only once it is complete, and its plaintext is
returned only after its tag verified.

Any protocol violation is fatal: the connection queues an alert (plaintext while its own
handshake is incomplete, encrypted after), moves to ``FAILED`` and records the typed
:class:`~securechan.SecureChannelError` in :attr:`error`. If the same call had already
verified earlier frames, their events are returned first and the error is raised by the
next call; otherwise it is raised at once. Callers that want the error immediately check
:attr:`error` after handling the events (the asyncio adapter does).
"""

from __future__ import annotations

import enum
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable, Hashable, Sequence
from typing import NoReturn

from .config import ClientConfig, ServerConfig
from .errors import (
    AlertCode,
    ConnectionClosedError,
    InternalError,
    SecureChannelError,
    TruncationError,
    UnexpectedMessageError,
    error_from_alert,
)
from .events import DataReceived, Event, HandshakeComplete, KeysUpdated, PeerClosed, SessionInfo
from .frames import (
    HEADER_LEN,
    MAX_CONTROL_PLAINTEXT,
    MAX_HANDSHAKE_BODY,
    TAG_LEN,
    FrameType,
    encode_frame,
    pack_map,
    parse_header,
    unpack_map,
)
from .handshake import ClientHandshake, Secrets, ServerHandshake, Step
from .keyschedule import export_keying_material, ticket_psk
from .messages import (
    CONTROL_MESSAGES,
    HANDSHAKE_MESSAGES,
    Alert,
    CloseNotify,
    KeyUpdate,
    NewTicket,
    decode_message,
)
from .record import Opener, Sealer
from .tickets import TicketContents

log = logging.getLogger("securechan")

#: Bytes reserved in the receive buffer beyond one whole frame, so reads stay large.
_READ_CHUNK = 256 * 1024
_SMALL_BUFFER = 16 * 1024
_MIN_FREE = 4096
_HEAD = struct.Struct(">BBBI")
_unpack_head = _HEAD.unpack_from
_ALERT_BODY = 64
_APPLICATION_DATA = int(FrameType.APPLICATION_DATA)
_HANDSHAKE = int(FrameType.HANDSHAKE)


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    CLIENT_WAIT_SERVER_HELLO = "client: waiting for ServerHello"
    CLIENT_WAIT_FINISHED = "client: waiting for the server's Finished"
    SERVER_WAIT_CLIENT_HELLO = "server: waiting for ClientHello"
    SERVER_WAIT_CLIENT_CERTIFICATE = "server: waiting for the client's certificate"
    SERVER_WAIT_KEY_EXCHANGE = "server: waiting for KeyExchange"
    SERVER_WAIT_FINISHED = "server: waiting for the client's Finished"
    CONNECTED = "connected"
    CLOSED = "closed"
    FAILED = "failed"


#: Read once per received chunk; a module constant is a plain global lookup, an enum member is not.
_FAILED = State.FAILED
_HANDSHAKE_LIMITS: dict[int, int] = {FrameType.HANDSHAKE: MAX_HANDSHAKE_BODY, FrameType.ALERT: _ALERT_BODY}
_HANDSHAKE_STATES = {
    State.CLIENT_WAIT_SERVER_HELLO,
    State.CLIENT_WAIT_FINISHED,
    State.SERVER_WAIT_CLIENT_HELLO,
    State.SERVER_WAIT_CLIENT_CERTIFICATE,
    State.SERVER_WAIT_KEY_EXCHANGE,
    State.SERVER_WAIT_FINISHED,
}
#: The server's state follows the message its handshake waits for (client auth adds a step).
_SERVER_WAIT_STATES = {
    "client_certificate": State.SERVER_WAIT_CLIENT_CERTIFICATE,
    "key_exchange": State.SERVER_WAIT_KEY_EXCHANGE,
    "finished": State.SERVER_WAIT_FINISHED,
}
_NEXT_HANDSHAKE_STATE = {
    State.SERVER_WAIT_CLIENT_HELLO: State.SERVER_WAIT_KEY_EXCHANGE,
    State.SERVER_WAIT_KEY_EXCHANGE: State.SERVER_WAIT_FINISHED,
    State.CLIENT_WAIT_SERVER_HELLO: State.CLIENT_WAIT_FINISHED,
}


#: Zeros to overwrite a small receive buffer from, without allocating a fresh zeroed object each time.
_ZEROS = memoryview(bytes(_SMALL_BUFFER))


def _zero(buf: bytearray | mmap.mmap, start: int, end: int) -> None:
    """Overwrite ``buf[start:end]`` with zeros, in place.

    Through a view of ``buf``: a bytearray's own slice assignment would first copy a
    non-bytearray source into a temporary bytearray.
    """
    n = end - start
    if n <= 0:
        return
    memoryview(buf)[start:end] = _ZEROS[:n] if n <= _SMALL_BUFFER else bytes(n)


def _exporter_of(secret: bytearray) -> Callable[[bytes, bytes, int], bytes]:
    """SessionInfo's exporter. It holds the exporter secret, not the connection: a bound method
    would make every connection a reference cycle (connection -> session -> connection), kept
    with its buffers and keys until the garbage collector runs."""

    def export(label: bytes, context: bytes, length: int) -> bytes:
        if not secret:  # emptied when the connection wipes its secrets
            raise ConnectionClosedError("the exporter is gone: the connection was closed and its secrets wiped")
        return export_keying_material(secret, label, context, length)

    return export


class Connection:
    """One securechan connection, client or server, chosen by the type of ``config``.

    ``server_name`` (client only) is the name the server certificate must carry.
    ``entropy`` supplies every random byte the handshake draws (tests pin it for vectors),
    except a session ticket's salt, which comes from the server's ticket keys
    (``ServerTickets.salt_source``): a connection must never be able to repeat salts under a
    ticket key that other connections and servers share.
    ``resume_key`` (client only) names the session-ticket cache entry, normally
    (host, port, server_name); the default is (None, None, server_name).
    ``clock`` (monotonic seconds) is read only for ``key_update_interval``: once per record
    sealed while that setting is on, never otherwise. The connection has no timer; an idle
    connection updates its key before the next record it sends.
    """

    # Slots: attribute reads on the per-record path stay fast (an instance dict with more keys
    # than CPython shares between instances falls back to slower lookups), and each idle
    # connection is smaller.
    __slots__ = (
        "_buf", "_clock", "_end", "_entropy", "_error_raised", "_exporter_secret", "_handshake_done", "_hs",
        "_large", "_live_sealer", "_need", "_opener", "_out", "_peer_der", "_pending_session", "_recv_closed",
        "_recv_limits", "_rekey_bytes", "_rekey_records", "_resume_key", "_sealer", "_send_closed", "_send_limit",
        "_start", "_update_at", "_view", "config", "error", "resumption_secret", "role", "session", "state",
    )

    def __init__(
        self,
        config: ClientConfig | ServerConfig,
        *,
        server_name: str | None = None,
        entropy: Callable[[int], bytes] = os.urandom,
        resume_key: Hashable = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(config, (ClientConfig, ServerConfig)):
            raise TypeError("config must be a securechan.ClientConfig or securechan.ServerConfig")
        self.config = config
        self._entropy = entropy
        self._clock = clock
        self._update_at: float | None = None  # clock reading when the sending key is due for an update
        self._out: list[bytes | bytearray] = []
        self._buf: bytearray | mmap.mmap = bytearray(_SMALL_BUFFER)
        #: A view of all of ``_buf``, made once per buffer: what ``_loop_buffer`` hands the event loop when
        #: nothing is pending, and what every other view of the buffer is sliced from.
        self._view = memoryview(self._buf)
        #: ``holds_large_buffer``, kept as a slot: the I/O layer reads it after every read.
        self._large = False
        self._start = 0
        self._end = 0
        self._need = 0  # size of the frame being assembled, once its head is validated
        self._error_raised = False
        self._sealer: Sealer | None = None
        #: The sealer while sending is allowed: keys installed, our direction open, not failed or
        #: closed. Set once, by ``_install`` on a client and by ``_complete`` on a server (whose keys
        #: arrive with its Finished, before the client's is verified); cleared by ``close`` and by
        #: ``_wipe``, which every path to FAILED or CLOSED after ``_install`` runs.
        self._live_sealer: Sealer | None = None
        self._rekey_records = config.key_update_records
        self._rekey_bytes = config.key_update_bytes
        self._opener: Opener | None = None
        self._send_limit = config.max_record_size
        self._recv_limits: dict[int, int] = _HANDSHAKE_LIMITS
        self._handshake_done = False  # we have verified the peer's Finished
        self._send_closed = False
        self._recv_closed = False
        self.session: SessionInfo | None = None
        #: A server's session between its keys (with its Finished) and the client's verified Finished.
        self._pending_session: SessionInfo | None = None
        #: The fatal error, once the connection has failed.
        self.error: SecureChannelError | None = None
        self._exporter_secret = bytearray()
        self.resumption_secret = b""
        self._peer_der: tuple[bytes, ...] = ()
        self._hs: ClientHandshake | ServerHandshake | None
        if isinstance(config, ClientConfig):
            self.role = Role.CLIENT
            self._hs = ClientHandshake(config, server_name, entropy, resume_key)
            self._resume_key = self._hs.resume_key
            self.state = State.CLIENT_WAIT_SERVER_HELLO
            self._out.extend(self._hs.start().frames)
        else:  # a ServerConfig (the type was checked on entry)
            self.role = Role.SERVER
            self._hs = ServerHandshake(config, entropy)
            self.state = State.SERVER_WAIT_CLIENT_HELLO

    # -- state queries ------------------------------------------------------------------

    @property
    def handshake_complete(self) -> bool:
        return self._handshake_done

    @property
    def can_send(self) -> bool:
        """True while application data may be sent (keys installed and our direction open)."""
        return self._live_sealer is not None

    @property
    def send_closed(self) -> bool:
        return self._send_closed

    @property
    def peer_closed(self) -> bool:
        return self._recv_closed

    # -- output -------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the wire since the last call."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 and isinstance(out[0], bytes) else b"".join(out)

    def send_data(self, data: bytes | bytearray | memoryview) -> None:
        """Protect application bytes (split into records of at most the negotiated size)."""
        self._out.extend(self.seal_parts(data))

    def seal(self, data: bytes | bytearray | memoryview) -> bytes:
        """Return the records protecting ``data`` without queueing them."""
        return b"".join(self.seal_parts(data))

    def seal_parts(self, data: bytes | bytearray | memoryview) -> Sequence[bytes]:
        """Like :meth:`seal`, as buffers to send in order: the fast path (``transport.writelines``).

        Each record is two buffers, its head, then its ciphertext and tag; the ciphertext is the
        object the AEAD call allocated, so no byte of the payload is copied or zero-filled on the way.
        """
        sealer = self._live_sealer
        if sealer is None:
            self._raise_cannot_send()
        view = data if type(data) is bytes else memoryview(data).cast("B")
        if (
            0 < len(view) <= self._send_limit
            and sealer.seq < self._rekey_records
            and sealer.bytes < self._rekey_bytes
            and self._update_at is None
        ):
            # One record, no key update due: the common case, kept to a handful of operations.
            return sealer.seal_parts(_APPLICATION_DATA, view)
        if type(view) is bytes:
            view = memoryview(view)  # records are slices of it: no copy
        limit = self._send_limit
        parts: list[bytes] = []
        for start in range(0, len(view), limit):
            if (
                sealer.seq >= self._rekey_records
                or sealer.bytes >= self._rekey_bytes
                or (self._update_at is not None and self._clock() >= self._update_at)
            ):
                # Rare: ratchet first. The KeyUpdate record must precede what follows it.
                parts.append(self._key_update_frame(request_update=False))
            parts += sealer.seal_parts(_APPLICATION_DATA, view[start : start + limit])
        return parts

    def _raise_cannot_send(self) -> NoReturn:
        if self.state is State.FAILED:
            raise ConnectionClosedError("cannot send: the connection failed")
        if self._send_closed:
            raise ConnectionClosedError("cannot send: this side already closed its direction (close_notify sent)")
        raise ConnectionClosedError(
            "cannot send before the handshake allows it (a client: once its Finished is queued; "
            "a server: once the client's Finished verified)"
        )

    def close(self) -> None:
        """Send close_notify: we will send nothing more. Reading may continue (half-close)."""
        if self._send_closed or self.state is State.FAILED:
            return
        sealer = self._live_sealer
        if sealer is None:
            # Handshake not far enough to send protected records: abandon it with an alert (a
            # resumed server already holds its keys here: they are wiped with the rest).
            self._queue_alert(AlertCode.USER_CANCELED)
            self._send_closed = True
            self._fail_silently()
            return
        self._out.append(sealer.seal(FrameType.CONTROL, pack_map(CloseNotify().encode())))
        self._send_closed = True
        self._live_sealer = None
        if self._recv_closed:
            self.state = State.CLOSED
            self._wipe()

    def update_keys(self, request_peer: bool = True) -> None:
        """Ratchet our sending key now; with ``request_peer`` the peer ratchets its own too."""
        if not self.can_send:
            self._raise_cannot_send()
        self._out.append(self._key_update_frame(request_update=request_peer))

    def _key_update_frame(self, request_update: bool) -> bytes:
        sealer = self._sealer
        assert sealer is not None
        frame = sealer.seal(FrameType.CONTROL, pack_map(KeyUpdate(request_update=request_update).encode()))
        sealer.update()
        self._schedule_time_update()
        log.debug("%s: sending key updated (generation %d)", self.role.value, sealer.generation)
        return frame

    def discard(self) -> None:
        """The transport is gone: wipe secrets and refuse further use."""
        if self.state is not State.CLOSED:
            self.state = State.FAILED
        self._recv_limits = {}
        self._start = self._end = 0  # nothing is left to read: _wipe overwrites the whole buffer
        self._wipe()

    def abort(self, error: SecureChannelError) -> None:
        """Fail the connection from outside (e.g. a timeout): queue the alert for ``error``."""
        if self.state is not State.FAILED:
            self._fail(error)

    # -- input --------------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable view to receive into; follow with :meth:`buffer_updated`.

        Each call returns a new view, which the caller may release (``with`` or ``release()``).
        """
        return self._loop_buffer(sizehint)[:]

    def _loop_buffer(self, sizehint: int = -1) -> memoryview:
        """``get_buffer`` for the event loop, which :class:`~securechan.protocol.SecureProtocol` hands it.

        With nothing pending (so no frame awaits its body) this is the whole buffer, as the one
        view made per buffer: no allocation per read. The loop never releases what it is given;
        other callers use :meth:`get_buffer`.
        """
        end = self._end
        if end == 0:
            return self._view
        if len(self._buf) - end < _MIN_FREE or self._need > len(self._buf) - self._start:
            self._make_room()
        return self._view[self._end :]

    def _make_room(self) -> None:
        buf, start, end = self._buf, self._start, self._end
        pending = end - start
        # ``_need`` is the whole size of a frame whose head was already validated.
        bulk = len(buf) > _SMALL_BUFFER or self._need > _SMALL_BUFFER
        size = max(pending + _MIN_FREE, self._need + _MIN_FREE, _READ_CHUNK if bulk else _SMALL_BUFFER)
        if size <= len(buf):
            # Non-overlapping regions move straight from a view; overlapping ones via a temporary copy.
            buf[:pending] = memoryview(buf)[start:end] if pending <= start else buf[start:end]
        else:
            # A grown buffer is its own anonymous mapping, so releasing it returns the memory
            # to the OS at once (a heap block would stay in the process after a burst).
            new = mmap.mmap(-1, size)
            new[:pending] = memoryview(buf)[start:end]
            self._buf, self._view, self._large = new, memoryview(new), True
        self._start, self._end = 0, pending

    @property
    def holds_large_buffer(self) -> bool:
        """The receive buffer grew past its small size for a large record or a burst."""
        return self._large

    def release_buffer(self) -> None:
        """Shrink the receive buffer to its small size if it holds no pending bytes (idle connection)."""
        if self._start == self._end and self._large:
            self._start = self._end = 0
            self._buf = bytearray(_SMALL_BUFFER)
            self._view, self._large = memoryview(self._buf), False

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the transport; returns the events they complete."""
        if self.state is State.FAILED:
            raise self._raise_after_failure()
        view = memoryview(data).cast("B")
        events: list[Event] = []
        while view:
            target = self._loop_buffer(len(view))
            n = min(len(target), len(view))
            target[:n] = view[:n]
            view = view[n:]
            try:
                events.extend(self.buffer_updated(n))
            except SecureChannelError:
                if not events:
                    raise
                # Records verified from an earlier chunk of ``data`` are returned, as buffer_updated
                # returns what it verified before a failure; the error is raised by the next call.
                self._error_raised = False
                break
            if self.state is _FAILED:
                break  # failed after the records it returned; the error is raised by the next call
        return events

    def _raise_after_failure(self) -> SecureChannelError:
        if self.error is not None and not self._error_raised:
            self._error_raised = True
            return self.error
        return ConnectionClosedError("the connection has failed; no more data is accepted")

    def receive_eof(self) -> list[Event]:
        """The transport reached EOF. Without a prior close_notify that is a truncation."""
        if self.state is State.FAILED and self.error is not None and not self._error_raised:
            raise self._raise_after_failure()
        if self._recv_closed or self.state is State.FAILED:
            return []
        if self._end > self._start:
            error = TruncationError("the connection ended in the middle of a frame (truncated stream)")
        elif not self._handshake_done:
            error = TruncationError(
                f"the peer closed the connection during the handshake ({self.state.value}); "
                "it may not be a securechan endpoint, or it rejected us without an alert"
            )
        else:
            error = TruncationError(
                "the peer's TCP stream ended without close_notify: the data may have been cut short by the network "
                "or an attacker; treat what was received as incomplete"
            )
        self._fail_silently()
        self.error, self._error_raised = error, True
        raise error

    def buffer_updated(self, nbytes: int) -> list[Event]:
        if self.state is _FAILED:
            raise self._raise_after_failure()
        self._end = stop = self._end + nbytes
        events: list[Event] = []
        buf, view = self._buf, self._view  # ``_view`` is the view of ``_buf``, made once per buffer
        pos = self._start
        need = 0  # the whole size of a frame whose head is validated but whose body is still due
        try:
            while stop - pos >= HEADER_LEN:
                marker, ftype, binmark, length = _unpack_head(buf, pos)
                # Fast path: a well-formed head of a frame type allowed now, within its limit (the
                # limits hold only FrameType values). Anything else gets parse_header's checks and messages.
                if marker != 0x92 or binmark != 0xC6 or length > self._recv_limits.get(ftype, -1):
                    ftype, length = parse_header(buf[pos : pos + HEADER_LEN], self._recv_limits)
                body = pos + HEADER_LEN
                end = body + length
                if end > stop:
                    need = end - pos
                    break
                if ftype == _APPLICATION_DATA:
                    # The head is the AAD as is and the body is opened in place: both are views into
                    # the receive buffer, no copy.
                    opener = self._opener
                    assert opener is not None  # APPLICATION_DATA is allowed only once the keys exist
                    data = opener.open(view[pos:body], view[body:end])
                    if data:
                        events.append(DataReceived(data))
                    pos = end
                    continue
                self._start = pos
                if ftype == _HANDSHAKE:
                    # The whole frame, copied once: it is both the transcript input and what is decoded.
                    self._on_handshake(bytes(memoryview(buf)[pos:end]), events)
                else:
                    self._dispatch(ftype, buf[pos:body], memoryview(buf)[body:end], events)
                pos = end
                buf, view, stop = self._buf, self._view, self._end
        except Exception as exc:
            self._start, self._need = pos, 0  # the frame that failed; what precedes it was consumed
            # Only typed errors leave the connection: anything else is a defect, but it still
            # fails closed (alert, FAILED, secrets wiped) rather than leaving a half-updated state.
            error = exc if isinstance(exc, SecureChannelError) else InternalError(
                f"internal error while processing a frame from the peer ({type(exc).__name__})"
            )
            self._fail(error)
            if events:
                return events  # verified before the failure; ``error`` is raised next time
            self._error_raised = True
            if error is exc:
                raise
            raise error from exc
        self._need = need
        if pos == stop:
            # Keep a grown buffer while traffic flows (reallocating it per read cost more than the
            # cipher, benchmarks/README.md); the I/O layer calls release_buffer() once idle.
            self._start = self._end = 0
        else:
            self._start = pos
        return events

    def _dispatch(self, ftype: int, head: bytes | bytearray, body: memoryview, events: list[Event]) -> None:
        """CONTROL and ALERT frames (APPLICATION_DATA and HANDSHAKE are handled in buffer_updated)."""
        if ftype == FrameType.CONTROL:
            opener = self._opener
            assert opener is not None  # CONTROL is allowed only once the keys exist
            self._on_control(opener.open(head, body), events)
        else:  # FrameType.ALERT: plaintext, unauthenticated, always fatal
            alert = Alert.decode(unpack_map(body, _ALERT_BODY))
            if alert.code == AlertCode.CLOSE_NOTIFY:
                raise UnexpectedMessageError(
                    "peer sent close_notify in plaintext; only a protected close_notify ends a stream"
                )
            self._fail_silently()
            raise error_from_alert(alert.code, authenticated=False)

    def _on_handshake(self, frame: bytes, events: list[Event]) -> None:
        hs = self._hs
        if hs is None or self.state not in _HANDSHAKE_STATES:
            raise UnexpectedMessageError("handshake message after the handshake completed")
        message = decode_message(unpack_map(memoryview(frame)[HEADER_LEN:], MAX_HANDSHAKE_BODY), HANDSHAKE_MESSAGES)
        step: Step = hs.handle(message, frame)
        if step.frames:
            self._out.extend(step.frames)
        if step.secrets is not None:
            self._install(step.secrets)
        if step.complete:
            self._complete(events)
        elif isinstance(hs, ServerHandshake) and (wait := _SERVER_WAIT_STATES.get(hs.expecting)) is not None:
            self.state = wait
        elif self.state in _NEXT_HANDSHAKE_STATE:
            self.state = _NEXT_HANDSHAKE_STATE[self.state]

    def _install(self, s: Secrets) -> None:
        client = self.role is Role.CLIENT
        assert not self._send_closed and self._sealer is None  # traffic keys arrive once
        self._sealer = Sealer(s.suite, s.client_traffic if client else s.server_traffic)
        if client:
            # A client may send application data right behind its Finished; a server only once
            # the client's Finished verified (_complete), although its keys arrive with its own.
            self._live_sealer = self._sealer
        self._opener = Opener(s.suite, s.server_traffic if client else s.client_traffic)
        self._send_limit = s.send_record_limit
        self._exporter_secret = bytearray(s.exporter)
        self.resumption_secret = s.resumption
        self._peer_der = s.peer_der
        self._schedule_time_update()
        hs = self._hs
        assert hs is not None
        session = SessionInfo(
            version=s.version,
            suite=s.suite.label,
            resumed=s.resumed,
            role=self.role.value,
            server_name=hs.server_name,
            peer_chain=s.peer_chain,
            max_record_size=s.send_record_limit,
            _exporter=_exporter_of(self._exporter_secret),
            alpn_protocol=s.alpn,
        )
        s.client_traffic = s.server_traffic = s.exporter = s.resumption = b""
        if client:
            self.session = session
        else:
            # Published (with its exporter) only once the client's Finished verified (_complete).
            self._pending_session = session
            self._issue_ticket(session, isinstance(hs, ServerHandshake) and hs.issues_ticket)

    def _complete(self, events: list[Event]) -> None:
        if self.session is None:
            self.session, self._pending_session = self._pending_session, None
        assert self.session is not None
        self._handshake_done = True
        self._hs = None
        if self._live_sealer is None and not self._send_closed:
            self._live_sealer = self._sealer  # a server may send from now on
        self.state = State.CONNECTED
        self._recv_limits = {
            FrameType.APPLICATION_DATA: self.config.max_record_size + TAG_LEN,
            FrameType.CONTROL: MAX_CONTROL_PLAINTEXT + TAG_LEN,
            FrameType.ALERT: _ALERT_BODY,
        }
        events.append(HandshakeComplete(self.session))
        if self.role is Role.SERVER and isinstance(self.config, ServerConfig) and self.config._tickets is not None:
            self.config._tickets.count_handshake(self.session.resumed)

    def _schedule_time_update(self) -> None:
        interval = self.config.key_update_interval
        self._update_at = None if interval is None else self._clock() + interval

    def _issue_ticket(self, session: SessionInfo, send_ticket: bool) -> None:
        """Queue a session ticket behind our Finished if the client keeps them (docs/PROTOCOL.md §13.4)."""
        config, sealer = self.config, self._sealer
        assert isinstance(config, ServerConfig) and sealer is not None
        tickets = config._tickets
        secret, self.resumption_secret = self.resumption_secret, b""
        if tickets is None or not send_ticket:
            return
        # The handshake derived the resumption secret exactly when it would issue a ticket
        # (ServerHandshake.issues_ticket, the same test as send_ticket): never a PSK from nothing.
        assert secret, "a ticket needs the resumption secret"
        nonce = self._entropy(16)
        ticket = tickets.seal(TicketContents(
            psk=ticket_psk(secret, nonce),
            version=session.version,
            suite=int(sealer.suite),
            server_name=session.server_name,
            client_chain=self._peer_der,
        ))
        if ticket is not None:
            message = NewTicket(ticket=ticket, lifetime=max(1, int(tickets.lifetime)), nonce=nonce)
            self._out.append(sealer.seal(FrameType.CONTROL, pack_map(message.encode())))

    def _on_new_ticket(self, message: NewTicket) -> None:
        config, session, sealer = self.config, self.session, self._sealer
        if not isinstance(config, ClientConfig):
            raise UnexpectedMessageError("a client does not send session tickets")
        if not config.resume or not self.resumption_secret or session is None or sealer is None:
            return
        config._session_cache.put(
            self._resume_key,
            ticket=message.ticket,
            psk=ticket_psk(self.resumption_secret, message.nonce),
            version=session.version,
            suite=int(sealer.suite),
            server_chain=session.peer_chain,
            lifetime=message.lifetime,
            server_der=self._peer_der,
        )
        self.resumption_secret = b""  # one ticket per connection
        log.debug("session ticket received (valid for %d s)", message.lifetime)

    def _on_control(self, plaintext: bytes, events: list[Event]) -> None:
        message = decode_message(unpack_map(plaintext, MAX_CONTROL_PLAINTEXT), CONTROL_MESSAGES)
        if isinstance(message, CloseNotify):
            self._recv_closed = True
            self._recv_limits = {}  # nothing may follow close_notify
            events.append(PeerClosed())
            if self._send_closed:
                self.state = State.CLOSED
                self._wipe()
        elif isinstance(message, KeyUpdate):
            opener = self._opener
            assert opener is not None
            opener.update()
            log.debug("%s: receiving key updated (generation %d)", self.role.value, opener.generation)
            events.append(KeysUpdated(sending=False, generation=opener.generation))
            if message.request_update and self.can_send:
                self._out.append(self._key_update_frame(request_update=False))
                assert self._sealer is not None
                events.append(KeysUpdated(sending=True, generation=self._sealer.generation))
        elif isinstance(message, NewTicket):
            self._on_new_ticket(message)
        elif isinstance(message, Alert):
            self._fail_silently()
            raise error_from_alert(message.code, authenticated=True)
        else:
            raise UnexpectedMessageError(f"{message.TYPE} is not valid on this connection")

    # -- failure ------------------------------------------------------------------------

    def _queue_alert(self, code: AlertCode) -> None:
        if self._send_closed:
            return  # close_notify already ended our direction; the peer accepts nothing more
        body = pack_map(Alert(code=int(code)).encode())
        if self._handshake_done and self._sealer is not None:
            self._out.append(self._sealer.seal(FrameType.CONTROL, body))
        else:
            self._out.append(encode_frame(FrameType.ALERT, body))

    def _fail(self, error: SecureChannelError) -> None:
        if self.error is None:
            self.error = error
        if self.state is State.FAILED:
            return
        if not error.remote:
            self._queue_alert(error.alert)
        self._fail_silently()

    def _fail_silently(self) -> None:
        self.state = State.FAILED
        self._recv_limits = {}
        self._wipe()

    def _wipe(self) -> None:
        """Drop references to key material (see docs/SECURITY.md for what Python can promise)."""
        self._live_sealer = None
        for direction in (self._sealer, self._opener):
            if direction is not None:
                direction.wipe()
        # Zeroed, then emptied in place: the session's exporter holds this same bytearray.
        self._exporter_secret[:] = bytes(len(self._exporter_secret))
        self._exporter_secret.clear()
        self.resumption_secret = b""
        self._hs = None
        self._pending_session = None
        # Overwrite what was received and is no longer needed (everything but an unread frame tail).
        buf = self._buf
        _zero(buf, 0, self._start)
        _zero(buf, self._end, len(buf))
