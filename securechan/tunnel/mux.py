"""Many tunnelled connections over one securechan connection (application protocol ``securechan-mux/1``).

Theory of operation
-------------------
A client tunnel (by default; not with ``--no-mux``) keeps one securechan connection (the
*carrier*) to its server tunnel and carries every plain connection it accepts as a
*stream* on it, so a new tunnelled connection costs an OPEN frame instead of a TCP
connect, a handshake and a close_notify exchange. The two ends agree on it in the handshake (``alpn_protocols``);
the wire format is docs/PROTOCOL.md §14.

:class:`MuxSession` is the carrier's application protocol. It parses the frames out of
the carrier's plaintext (a frame may span records; a DATA body is passed on as it arrives,
never reassembled) and writes the small frames of one event-loop iteration together (they
share a record and a system call), in groups of four DATA frames, so the far end can start
on the first while this end is still reading the others.
A DATA payload of 16 KiB or more leaves at once, with the frames queued before it, as
records of its own.

:class:`MuxStream` is an ``asyncio.Transport`` for one stream, so the tunnel's
:class:`~securechan.tunnel.relay.End` relays over a stream exactly as over a securechan
connection: ``write_eof()`` sends FIN (a clean end of that direction), ``abort()`` sends
RESET (the far side resets its plain connection), and a stream the carrier took down with
it reports the carrier's error through ``connection_lost``.

Flow control is per stream and direction: a sender may have at most its credit of DATA
unacknowledged (:data:`WINDOW` at first); the receiver returns credit (WINDOW_UPDATE) as
it hands the bytes on, and stops returning it while its reader is paused
(``pause_reading``: the plain connection it writes to is full). A stream that hands a
whole window on within :data:`GROW_WITHIN` seconds gets twice the window (more credit than
it passed on), up to :data:`MAX_WINDOW`, out of a :class:`WindowBudget` its tunnel's
carriers share: one window per round trip would hold a bulk stream far below what the
carrier can carry. Once its reader is paused, or a whole window takes it longer than
:data:`SHRINK_AFTER` seconds, a grown window shrinks back (less credit than it passed on)
and its growth goes back to the budget; an idle stream keeps its window (its peer may
still send that much). Bytes written beyond the credit wait in the sender's
:class:`MuxStream`, ``bytes`` as given (never copied again) and small writes gathered;
above 64 KiB of them it reports ``pause_writing`` to its protocol, which stops reading the
plain connection. They leave at the end of the loop iteration in which credit came (the
credit of many WINDOW_UPDATEs makes one DATA frame), and not while the carrier itself is
paused (its peer is not reading). So one slow reader stalls only its own stream, and the
bytes a process holds per stream stay below the window it granted plus 64 KiB (its plain
connection's write buffer), and 64 KiB plus one read on the sending side. A peer that
sends beyond the credit it was given breaks the protocol and loses the carrier.

Only the client opens streams, with strictly increasing identifiers. The server ends a
carrier with GOAWAY (shutdown, reload, idle): the client opens no more streams on it and
closes it once its streams have ended. After a shutdown GOAWAY the server refuses every
OPEN at once (RESET ``refused``); after an advisory one (reload, idle) it still serves
OPENs for :data:`GOAWAY_GRACE` seconds, the ones that crossed the GOAWAY on the wire.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import Any, cast

#: The application protocol name negotiated in the handshake.
PROTOCOL = "securechan-mux/1"

HEADER = struct.Struct("!BII")  # frame type, stream id, payload length
_WINDOW_INC = struct.Struct("!I")

OPEN, DATA, FIN, RESET, WINDOW_UPDATE, GOAWAY = 1, 2, 3, 4, 5, 6

#: Initial credit, in bytes, of each stream in each direction.
WINDOW = 256 * 1024
#: A stream's receive window doubles, up to this, each time a whole window is passed on within GROW_WITHIN
#: seconds: a fixed window per round trip would cap a fast stream far below the carrier's rate.
MAX_WINDOW = 2 * 1024 * 1024
#: Seconds: a stream that passes on a window at least this fast (256 KiB: 13 MB/s, 1 MiB: 52 MB/s) grows it.
GROW_WITHIN = 0.02
#: Seconds: a grown window whose stream takes longer than this to pass a whole window on shrinks back.
SHRINK_AFTER = 1.0
#: What the streams of one tunnel (all its carriers, in this process) may hold beyond their first windows.
MAX_GROWTH = 32 * 1024 * 1024
#: The largest credit a stream may hold (a WINDOW frame beyond it breaks the protocol).
MAX_CREDIT = 2**31 - 1
#: A writer is paused when this many bytes wait for credit, and resumed when none do.
_BACKLOG_HIGH = 64 * 1024
#: A payload this large leaves at once and is sealed as records of its own (SecureTransport.writelines
#: draws the same line), and waits for credit as it was written; smaller writes that wait share a buffer.
_LARGE = 16 * 1024
#: Small frames leave at the end of the loop iteration, or sooner in groups of this many output items (four
#: DATA frames): the far end starts on a group while this end reads the rest of a burst, where one record for
#: fifty streams' messages would make the two ends take turns (measured: PING c=50 +15-25 %, more CPU each).
_BATCH = 8
#: Credit is returned once this many bytes have been handed on.
_RETURN_AT = WINDOW // 4
#: Stream identifiers stop here: a client opens a new carrier well before they could wrap.
MAX_STREAM_ID = 2**31
#: Bytes of control frames (all but WINDOW_UPDATE) a side queues for a peer that is not reading before it gives up.
MAX_CONTROL_UNREAD = 64 * 1024
#: Seconds an advisory GOAWAY leaves for OPENs already on the wire.
GOAWAY_GRACE = 10.0

#: RESET codes: why a stream was reset (the far side's log line names it).
RESET_ABORTED, RESET_REFUSED, RESET_TARGET_FAILED = 0, 1, 2
_RESET_TEXT = {
    RESET_ABORTED: "stream reset by the other tunnel end (its connection was reset, aborted or timed out)",
    RESET_REFUSED: "stream refused by the server tunnel (connection limit reached, or it is shutting down)",
    RESET_TARGET_FAILED: "the server tunnel could not connect to its target (its log says why)",
}
#: What a stream's get_extra_info answers from its carrier.
_SHARED_INFO = frozenset({"securechan", "peercert", "peer_chain", "cipher", "alpn_protocol", "peername", "sockname"})
_PAYLOAD_LEN = {OPEN: 0, FIN: 0, RESET: 1, WINDOW_UPDATE: 4, GOAWAY: 0}

log = logging.getLogger("securechan.tunnel")


class MuxProtocolError(Exception):
    """The peer broke the multiplexing protocol; the carrier is aborted."""


class StreamResetError(ConnectionResetError):
    """A stream was reset by the other tunnel end (RESET), or went down with its carrier."""


def reset_text(code: int) -> str:
    return _RESET_TEXT.get(code, f"stream reset by the other tunnel end (code {code})")


class WindowBudget:
    """Receive window that streams may hold beyond their initial ones: one budget for all carriers of a tunnel."""

    __slots__ = ("available",)

    def __init__(self, size: int = MAX_GROWTH) -> None:
        self.available = size

    def lend(self, wanted: int) -> int:
        """Up to ``wanted`` bytes of growth, as far as the budget allows."""
        granted = min(wanted, self.available)
        self.available -= granted
        return granted

    def repay(self, size: int) -> None:
        self.available += size


class MuxStream(asyncio.Transport):
    """One stream of a :class:`MuxSession`, as an ``asyncio.Transport`` for its protocol."""

    def __init__(self, session: MuxSession, stream_id: int, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._session = session
        self.stream_id = stream_id
        self._protocol = protocol
        self._send_credit = WINDOW
        self._recv_credit = WINDOW
        self._consumed = 0
        #: Credit granted to the peer in all (outstanding + passed on but not yet returned + held): the
        #: most this side can be made to hold. It grows for a stream that moves it fast, and shrinks back
        #: once the stream slows down or its reader is paused.
        self._window = WINDOW
        self._passed_on = 0  # bytes of the current window passed on, since _window_began
        self._window_began = session.loop.time()
        #: A grown window whose reader was paused, or whose stream slowed down: the growth is given back
        #: (withheld from the credit returned) as the bytes are passed on.
        self._shrinking = False
        #: Credit arrived (WINDOW_UPDATE) for bytes in the backlog: they leave at the end of the loop iteration.
        self._credited = False
        #: Bytes written beyond the credit, in the order written: ``bytes`` as given (never copied
        #: again) and small writes gathered in bytearrays, so never one object per small write.
        self._backlog: deque[bytes | bytearray | memoryview] = deque()
        self._backlog_size = 0
        #: Bytes received while reading is paused: one buffer (never one object per frame), at most the window.
        self._inbox = bytearray()
        self._reading = True
        self._app_paused = False
        self._fin_sent = False
        self._fin_wanted = False  # write_eof/close called: FIN once the backlog is out
        self._fin_received = False
        self._eof_delivered = False
        self._closing = False
        self._lost = False

    # -- asyncio.Transport -------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """The carrier's session, peer and addresses; never its socket (a stream must not touch it)."""
        if name == "mux_stream":
            return self.stream_id
        if name in _SHARED_INFO:
            return self._session.carrier_info(name, default)
        return default

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        if self._closing or self._lost:
            return
        self._closing = True
        self._fin_wanted = True
        self._flush_backlog()

    def abort(self) -> None:
        self.reset(RESET_ABORTED)

    def reset(self, code: int) -> None:
        """Abort with RESET ``code`` (the other end's log line says why)."""
        if self._lost:
            return
        self._closing = True
        self._drop_buffers()
        session = self._session
        if session.streams.get(self.stream_id) is self:
            del session.streams[self.stream_id]
            session.send_control(RESET, self.stream_id, bytes((code,)))
        self._lose(None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = cast(asyncio.Protocol, protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_reading(self) -> bool:
        return self._reading and not self._lost

    def pause_reading(self) -> None:
        self._reading = False
        if self._window > WINDOW:
            self._shrinking = True  # its reader is the bottleneck: a large window would only be held here

    def resume_reading(self) -> None:
        if self._reading or self._lost:
            return
        self._reading = True
        self._hand_on_inbox()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._fin_wanted or self._lost:
            return
        self._fin_wanted = True
        self._flush_backlog()

    def get_write_buffer_size(self) -> int:
        return self._backlog_size

    def get_read_buffer_size(self) -> int:
        """Bytes received and held while reading is paused (at most the window)."""
        return len(self._inbox)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, _BACKLOG_HIGH)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Fixed: a stream pauses its writer above 64 KiB waiting for credit, resumes it when none waits."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._fin_wanted and not self._closing:
            raise RuntimeError("cannot write() after write_eof()")
        if self._closing or self._lost or not data:
            return
        if type(data) is not bytes:
            # The caller may reuse a mutable buffer once write() returns (and a memoryview's items may be
            # wider than a byte: credit and frame lengths count bytes).
            data = memoryview(data).cast("B").tobytes()
        credit = self._send_credit
        if not self._backlog_size:
            size = len(data)
            if credit >= size:
                self._send_credit = credit - size
                self._session.send_data(self.stream_id, data)
                return
            if credit > 0:
                self._send_credit = 0
                view = memoryview(data)
                self._session.send_data(self.stream_id, view[:credit])
                self._queue(view[credit:])
                self._update_pause()
                return
        self._queue(data)
        self._update_pause()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _queue(self, data: bytes | memoryview) -> None:
        """Keep ``data`` (immutable: its views are sent as they are) until there is credit for it."""
        backlog = self._backlog
        size = len(data)
        self._backlog_size += size
        if size >= _LARGE:
            backlog.append(data)
        elif backlog and type(last := backlog[-1]) is bytearray and len(last) < _LARGE:
            last += data
        else:
            backlog.append(bytearray(data))

    def _drop_buffers(self) -> None:
        self._backlog.clear()
        self._backlog_size = 0
        self._inbox.clear()

    # -- from the session ------------------------------------------------------------------

    def _data(self, chunk: bytes) -> None:
        if self._fin_received or self._lost:
            return
        if not self._reading or self._inbox:
            self._inbox += chunk
            return
        self._protocol.data_received(chunk)
        self._consumed += len(chunk)
        if self._consumed >= _RETURN_AT and self._reading:  # paused by this chunk: returned on resuming
            self._return_credit()

    def _return_credit(self) -> None:
        """Return the credit of the bytes passed on: with the window's growth if a whole window went by
        fast, or less the growth while the window shrinks back (its reader was paused, or it slowed down)."""
        increment, self._consumed = self._consumed, 0
        if self._shrinking:
            back = min(increment, self._window - WINDOW)
            self._session.budget.repay(back)
            self._window -= back
            increment -= back
            if self._window == WINDOW:
                self._shrinking = False
                self._passed_on = 0
                self._window_began = self._session.loop.time()
        else:
            self._passed_on += increment
            if self._passed_on >= self._window:
                now = self._session.loop.time()
                took = now - self._window_began
                if took < GROW_WITHIN and self._window < MAX_WINDOW and not self._lost:
                    extra = self._session.budget.lend(min(self._window, MAX_WINDOW - self._window))
                    self._window += extra
                    increment += extra
                elif took >= SHRINK_AFTER and self._window > WINDOW:
                    self._shrinking = True  # no longer moving fast: its growth goes back from the next bytes
                self._passed_on = 0
                self._window_began = now
        self._recv_credit += increment
        if increment and not self._fin_received and not self._lost:
            self._session.send_control(WINDOW_UPDATE, self.stream_id, _WINDOW_INC.pack(increment))

    def _hand_on_inbox(self) -> None:
        if self._inbox:
            chunk = bytes(self._inbox)  # all of it in one call, however many frames brought it
            self._inbox.clear()
            self._protocol.data_received(chunk)
            self._consumed += len(chunk)
        if self._lost or not self._reading:
            return
        if not self._inbox and self._fin_received and not self._eof_delivered:
            self._deliver_eof()
        elif self._reading and self._consumed >= _RETURN_AT:
            self._return_credit()

    def _credit(self, increment: int) -> None:
        credit = self._send_credit + increment
        if credit > MAX_CREDIT:
            raise MuxProtocolError(f"stream {self.stream_id}: WINDOW_UPDATE beyond {MAX_CREDIT} bytes of credit")
        self._send_credit = credit
        if self._backlog and not self._credited:
            # Sent at the end of this loop iteration: the WINDOW_UPDATEs of one read make one DATA frame.
            self._credited = True
            self._session.credit_arrived(self)

    def _flush_backlog(self) -> None:
        self._credited = False
        session = self._session
        backlog = self._backlog
        credit = self._send_credit
        while backlog and credit > 0 and not session.writing_paused:  # the carrier's buffer takes no more
            chunk = backlog[0]
            size = len(chunk)
            if size <= credit:
                backlog.popleft()  # a bytearray is not written to once it is no longer last
            else:
                view = memoryview(chunk)  # the rest stays a view: nothing appends to it again
                backlog[0] = view[credit:]
                chunk, size = view[:credit], credit
            session.send_data(self.stream_id, chunk)
            credit -= size
            self._backlog_size -= size
        self._send_credit = credit
        if backlog:
            self._update_pause()
            return
        if self._fin_wanted and not self._fin_sent and not self._lost:
            self._fin_sent = True
            session.send_control(FIN, self.stream_id, b"")
            session.forget_if_done(self)
        self._update_pause()
        if self._closing and self._fin_sent:
            self._lose(None)

    def _fin(self) -> None:
        if self._fin_received:
            raise MuxProtocolError(f"stream {self.stream_id}: FIN twice")
        self._fin_received = True
        if self._closing and self._fin_sent:
            return  # closed here already (its connection_lost is on its way)
        if not self._inbox:
            self._deliver_eof()

    def _deliver_eof(self) -> None:
        self._eof_delivered = True
        if self._lost:
            return
        if not self._protocol.eof_received():
            self.close()

    def _cut(self, exc: Exception | None) -> None:
        """Reset by the other end, or gone with the carrier: drop what is buffered, report ``exc``."""
        self._drop_buffers()
        self._closing = True
        self._lose(exc)

    def _update_pause(self) -> None:
        backlog = self._backlog_size
        paused = backlog > _BACKLOG_HIGH or (self._app_paused and backlog > 0) or self._session.writing_paused
        if paused == self._app_paused or self._lost:
            return
        self._app_paused = paused
        if paused:
            self._protocol.pause_writing()
        else:
            self._protocol.resume_writing()

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._session.budget.repay(self._window - WINDOW)  # late DATA is still checked against _recv_credit
        self._window = WINDOW
        self._session.stream_lost(self)
        self._session.loop.call_soon(self._protocol.connection_lost, exc)


class MuxSession(asyncio.Protocol):
    """The application protocol of a carrier: frames in and out, the streams, the carrier's lifetime.

    ``on_open(session, stream_id)`` (server) is called for each OPEN and returns the stream's
    protocol, or None to refuse it; ``on_lost(session, exc)`` is called once the carrier is
    gone. After ``idle_timeout`` seconds without a stream a client closes the carrier and a
    server sends an advisory GOAWAY (so the client closes it: no OPEN can cross the close).
    """

    def __init__(
        self,
        *,
        server: bool,
        on_open: Callable[[MuxSession, int], asyncio.Protocol | None] | None = None,
        on_lost: Callable[[MuxSession, Exception | None], None] | None = None,
        idle_timeout: float | None = None,
        label: str = "",
        budget: WindowBudget | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        #: Where the streams' window growth comes from (shared by a tunnel's carriers).
        self.budget = budget if budget is not None else WindowBudget()
        self.server = server
        #: How log lines name the owner (e.g. "tunnel 'redis'").
        self.label = label
        self._on_open = on_open
        self._on_lost = on_lost
        self.idle_timeout = idle_timeout
        self._idle_since = self.loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self.carrier: asyncio.Transport | None = None
        #: Streams frames are routed to (until both FINs, or a RESET, have passed).
        self.streams: dict[int, MuxStream] = {}
        #: Streams whose protocol has not yet been told connection_lost.
        self.live: set[MuxStream] = set()
        self.last_id = 0
        self.writing_paused = False
        #: A GOAWAY was sent (server) or received (client): no new streams on this carrier.
        self.going_away = False
        #: The server refuses OPENs from this loop time on (a GOAWAY's grace).
        self._refuse_after: float | None = None
        self.closed = False
        self.error: Exception | None = None
        self._out: list[bytes | bytearray | memoryview] = []
        #: Streams that got credit for their backlog in this loop iteration (sent at its end).
        self.credited: list[MuxStream] = []
        #: Bytes of control frames queued while the other end was not reading (RESETs for refused or
        #: failed streams, FINs): bounded, so a peer cannot make us queue frames it never takes.
        self._control_unread = 0
        self._overrun = False
        self._partial = b""
        self._body_left = 0
        self._body_stream: MuxStream | None = None

    # -- asyncio.Protocol (the carrier) -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.carrier = cast(asyncio.Transport, transport)
        self._became_idle()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self._parse(data)
        except MuxProtocolError as exc:
            self.fail(exc)

    def eof_received(self) -> bool:
        # The other end closed the carrier (close_notify): streams still open end with it, cut.
        self._end_streams(StreamResetError("the securechan connection carrying this stream was closed by the "
                                           "other tunnel end before the stream ended"))
        return False

    def pause_writing(self) -> None:
        self.writing_paused = True
        for stream in list(self.live):
            stream._update_pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._control_unread = 0
        for stream in list(self.live):
            stream._flush_backlog()  # what waited for the carrier (with credit) leaves now

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = self.error or exc
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._end_streams(exc if exc is not None else StreamResetError(
            "the securechan connection carrying this stream closed before the stream ended"))
        if self._on_lost is not None:
            self._on_lost(self, exc)

    # -- public -------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """A client may open a stream on this carrier."""
        return not (self.closed or self.going_away or self.carrier is None or self.carrier.is_closing())

    def open_stream(self, protocol: asyncio.Protocol) -> MuxStream:
        """Client: a new stream to the server tunnel's target; ``protocol.connection_made`` runs at once."""
        if self.server or not self.usable:
            raise ConnectionError("this multiplexed connection takes no new streams (closed, or going away)")
        self.last_id += 1
        if self.last_id >= MAX_STREAM_ID:
            self.going_away = True  # its last identifier: it closes once its streams have ended (retire)
        stream = MuxStream(self, self.last_id, protocol)
        self.streams[stream.stream_id] = stream
        self.live.add(stream)
        self.send_control(OPEN, stream.stream_id, b"")
        protocol.connection_made(stream)
        if self.writing_paused:
            stream._update_pause()
        return stream

    def goaway(self, *, refuse_now: bool) -> None:
        """Server: ask the client to move to a new carrier (``refuse_now``: and refuse its OPENs from now)."""
        if self.closed:
            return
        if not self.going_away:
            self.going_away = True
            self.send_control(GOAWAY, 0, b"")
        grace = 0.0 if refuse_now else GOAWAY_GRACE
        until = self.loop.time() + grace
        self._refuse_after = until if self._refuse_after is None else min(self._refuse_after, until)
        if refuse_now:
            if not self.live:
                self.close()
        else:
            # A client that ignores the GOAWAY: once its OPENs are refused, the carrier closes when idle.
            self.loop.call_later(grace, self._close_if_idle)

    def retire(self) -> None:
        """Client: open no more streams here; close the carrier (close_notify) once its streams have ended."""
        self.going_away = True
        if not self.live:
            self.close()

    def close(self) -> None:
        """Close the carrier cleanly (close_notify); its streams, if any, are cut."""
        if self.carrier is not None and not self.carrier.is_closing():
            self._flush()
            self.carrier.close()

    def abort(self) -> None:
        if self.carrier is not None:
            self.carrier.abort()

    def fail(self, exc: Exception) -> None:
        """The peer broke the protocol: log it, drop the carrier (no close_notify), cut the streams."""
        if self.closed:
            return
        self.closed = True
        self.error = exc
        log.warning("%smultiplexed securechan connection with %s broken: %s; connection and its %d streams aborted",
                    f"{self.label}: " if self.label else "", _peer(self.carrier), exc, len(self.live))
        self._out.clear()
        self._end_streams(StreamResetError(f"the multiplexed connection failed: {exc}"))
        self.abort()

    def carrier_info(self, name: str, default: Any = None) -> Any:
        if self.carrier is None:
            return default
        return self.carrier.get_extra_info(name, default)

    # -- used by the streams ------------------------------------------------------------------

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue a DATA frame; ``data`` must not change until the next flush (a stream never changes it again)."""
        out = self._out
        size = len(data)
        if size >= _LARGE:
            # A large payload leaves now, with what is queued before it: holding it to the end of the
            # iteration would keep every read's buffer alive until then, and gains no sharing of records.
            out.append(HEADER.pack(DATA, stream_id, size))
            out.append(data)
            self._flush()
            return
        if not out:
            self.loop.call_soon(self._flush)
        out.append(HEADER.pack(DATA, stream_id, size))
        out.append(data)
        if len(out) >= _BATCH:
            self._flush()

    def send_control(self, kind: int, stream_id: int, payload: bytes) -> None:
        out = self._out
        if not out:
            self.loop.call_soon(self._flush)
        out.append(HEADER.pack(kind, stream_id, len(payload)) + payload)
        if self.writing_paused and kind != WINDOW_UPDATE:  # credit is bounded by the data the peer sends
            self._control_unread += HEADER.size + len(payload)
            if self._control_unread > MAX_CONTROL_UNREAD and not self._overrun:
                self._overrun = True
                self.loop.call_soon(self.fail, _overrun_error())

    def _answer(self, kind: int, stream_id: int, payload: bytes) -> None:
        """A frame the other end's frame calls for: its input stops here once the limit is passed."""
        self.send_control(kind, stream_id, payload)
        if self._overrun:
            raise _overrun_error()

    def credit_arrived(self, stream: MuxStream) -> None:
        """``stream`` got credit for its backlog: send it at the end of the loop iteration, with the rest."""
        if not self.credited:
            self.loop.call_soon(self._send_credited)
        self.credited.append(stream)

    def _send_credited(self) -> None:
        streams, self.credited = self.credited, []
        for stream in streams:
            if not stream._lost:
                stream._flush_backlog()

    def forget_if_done(self, stream: MuxStream) -> None:
        if stream._fin_sent and stream._fin_received and self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]

    def stream_lost(self, stream: MuxStream) -> None:
        """``stream``'s protocol is being told connection_lost (its route may stay until the other end's FIN)."""
        self.live.discard(stream)
        if not self.live and not self.closed:
            if self.going_away and (not self.server or self._refusing()):
                self.close()
            else:
                self._became_idle()

    # -- internals ----------------------------------------------------------------------------

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out = []
        carrier = self.carrier
        if carrier is None or carrier.is_closing() or self.closed:
            return
        # One carrier write: small frames share a record, a large payload gets records of its own,
        # so the other end passes it on without copying it out of a record.
        carrier.writelines(out)

    def _refusing(self) -> bool:
        return self._refuse_after is not None and self.loop.time() >= self._refuse_after

    def _close_if_idle(self) -> None:
        if not self.live:
            self.close()

    def _became_idle(self) -> None:
        self._idle_since = self.loop.time()
        if self._idle_timer is None and self.idle_timeout is not None:
            self._idle_timer = self.loop.call_at(self._idle_since + self.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.live or self.closed or self.idle_timeout is None:
            return  # the next idle spell arms the timer again
        due = self._idle_since + self.idle_timeout
        if self.loop.time() < due:
            self._idle_timer = self.loop.call_at(due, self._idle_check)
        elif self.server:
            self.goaway(refuse_now=False)
        else:
            self.close()

    def _end_streams(self, exc: Exception | None) -> None:
        for stream in list(self.live):
            stream._cut(exc)
        self.streams.clear()

    def _parse(self, data: bytes) -> None:
        pos, end = 0, len(data)
        if self._body_left:
            take = min(self._body_left, end)
            stream = self._body_stream
            if stream is not None:
                stream._data(data if take == end else data[:take])
            self._body_left -= take
            pos = take
        elif self._partial:
            data = self._partial + data
            self._partial = b""
            end = len(data)
        header_size = HEADER.size
        unpack = HEADER.unpack_from
        while pos < end:
            if end - pos < header_size:
                self._partial = data[pos:]
                return
            kind, stream_id, length = unpack(data, pos)
            body = pos + header_size
            if kind == DATA:
                stream = self._data_target(stream_id, length)
                stop = body + length
                if stop > end:
                    self._body_left = stop - end
                    self._body_stream = stream
                    stop = end
                if stream is not None:
                    stream._data(data[body:stop])
                pos = stop
                continue
            expected = _PAYLOAD_LEN.get(kind)
            if expected is None:
                raise MuxProtocolError(f"unknown frame type {kind}")
            if length != expected:
                raise MuxProtocolError(f"frame type {kind} with a {length}-byte payload (expected {expected})")
            if body + length > end:
                self._partial = data[pos:]
                return
            self._control(kind, stream_id, data[body:body + length])
            pos = body + length

    def _data_target(self, stream_id: int, length: int) -> MuxStream | None:
        if length == 0:
            raise MuxProtocolError(f"stream {stream_id}: empty DATA frame")
        stream = self._route(stream_id, "DATA")
        if stream is None:
            return None
        if stream._fin_received:
            raise MuxProtocolError(f"stream {stream_id}: DATA after FIN")
        if length > stream._recv_credit:
            raise MuxProtocolError(f"stream {stream_id}: {length} bytes of DATA beyond its {stream._recv_credit} "
                                   "bytes of credit (flow control)")
        stream._recv_credit -= length
        if stream._lost:
            # Closed here with the other direction still open: like TCP, answer data with a reset.
            del self.streams[stream_id]
            self._answer(RESET, stream_id, bytes((RESET_ABORTED,)))
            return None
        return stream

    def _route(self, stream_id: int, what: str) -> MuxStream | None:
        if stream_id == 0:
            raise MuxProtocolError(f"{what} frame for stream 0")
        stream = self.streams.get(stream_id)
        if stream is None and stream_id > self.last_id:
            raise MuxProtocolError(f"{what} frame for stream {stream_id}, which was never opened")
        return stream  # None: a stream that ended here; frames already on their way are dropped

    def _control(self, kind: int, stream_id: int, payload: bytes) -> None:
        if kind == WINDOW_UPDATE:
            stream = self._route(stream_id, "WINDOW_UPDATE")
            increment = _WINDOW_INC.unpack(payload)[0]
            if increment == 0:
                raise MuxProtocolError(f"stream {stream_id}: WINDOW_UPDATE of 0 bytes")
            if stream is not None:
                stream._credit(increment)
        elif kind == FIN:
            stream = self._route(stream_id, "FIN")
            if stream is not None:
                stream._fin()
                self.forget_if_done(stream)
        elif kind == RESET:
            stream = self._route(stream_id, "RESET")
            if stream is not None:
                del self.streams[stream_id]
                stream._cut(StreamResetError(reset_text(payload[0])))
        elif kind == OPEN:
            self._open(stream_id)
        else:  # GOAWAY
            if self.server or stream_id != 0:
                raise MuxProtocolError("GOAWAY from the client" if self.server else "GOAWAY for a stream")
            self.going_away = True
            if not self.live:
                self.close()

    def _open(self, stream_id: int) -> None:
        if not self.server or self._on_open is None:
            raise MuxProtocolError("OPEN from the server (only the client opens streams)")
        if stream_id <= self.last_id:
            raise MuxProtocolError(f"OPEN for stream {stream_id}, not above the last one opened ({self.last_id})")
        self.last_id = stream_id
        protocol = None if self._refusing() else self._on_open(self, stream_id)
        if protocol is None:
            # Refused: the stream exists only long enough to be reset; what the client sent on it is dropped.
            self._answer(RESET, stream_id, bytes((RESET_REFUSED,)))
            return
        stream = MuxStream(self, stream_id, protocol)
        self.streams[stream_id] = stream
        self.live.add(stream)
        protocol.connection_made(stream)
        if self.writing_paused:
            stream._update_pause()


def _overrun_error() -> MuxProtocolError:
    return MuxProtocolError(f"the other end kept this side sending control frames (RESET, FIN) while not reading "
                            f"them (over {MAX_CONTROL_UNREAD} bytes queued)")


def _peer(carrier: asyncio.BaseTransport | None) -> str:
    peer = carrier.get_extra_info("peername") if carrier is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "a peer")
