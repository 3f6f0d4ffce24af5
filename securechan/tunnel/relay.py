"""The bidirectional relay between a plain TCP (or Unix) connection and a securechan connection.

Theory of operation
-------------------
A relay is two asyncio protocols, one per connection (:class:`End`), each the other's
sink: what one end's transport delivers in ``data_received`` is written straight to the
other end's transport. No task, stream reader or intermediate buffer sits in between, so a
relayed message costs one callback and one ``write`` per hop (for the secure end, the write
seals the record).

Flow control is the transports' own: when one end's write buffer passes its high-water mark,
asyncio calls that end's ``pause_writing`` and the relay pauses *reading* on the other end;
``resume_writing`` resumes it. The bytes this process holds per connection are therefore
bounded by the two write buffers plus one read's worth, whatever the ends do.

Until both ends are connected (the target connect and the handshake take time), the
connection that exists first is paused; anything it delivered before the pause took effect
(at most one read) is kept and written as soon as the other end exists.

Half-close travels both ways. A plain EOF becomes ``write_eof()`` on the secure end
(close_notify, then TCP shutdown of the write side); a close_notify from the secure peer
becomes ``write_eof()`` (``shutdown(SHUT_WR)``) on the plain end. The other direction keeps
flowing until it ends too, so a client that shuts down its write side still gets the whole
reply. When both directions have ended, both transports are closed after their buffers
flushed (bounded by :data:`CLOSE_GRACE`); when the second EOF is bound for the secure end,
that close itself sends the close_notify (no separate shutdown before it).

Failures are never laundered into a clean EOF. A secure connection that ends without
close_notify (``TruncationError``), fails authentication, or is reset makes the relay abort
the plain end with an RST (``SO_LINGER`` 0), and a plain end that is reset makes the relay
reset the secure end without close_notify, which the far side reports as a reset (a
``ConnectionResetError``; ``TruncationError`` is one too). An application on either side can
therefore tell a complete stream from a cut one.

Idle timeout and maximum lifetime are one timer. Activity is progress in either direction:
a read, or a write buffer that drained (``resume_writing``). Both *abort* both ends: a stream
whose source never ended it (no EOF, no close_notify) is not complete, and this process
cannot see what the network or a withholding attacker still holds, so a clean close could
pass a prefix off as the whole stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import cast

from ..errors import SecureChannelError, TruncationError

#: How long a finished relay waits for its write buffers to reach the peers before aborting.
CLOSE_GRACE = 10.0


def reset(transport: asyncio.BaseTransport) -> None:
    """Close with an RST (``SO_LINGER`` 0) rather than a FIN; on securechan, also without close_notify."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    cast(asyncio.Transport, transport).abort()


class End(asyncio.Protocol):
    """One connection of a relay: the protocol asyncio (or securechan) delivers its events to."""

    def __init__(self, relay: Relay, label: str, secure: bool) -> None:
        self.relay = relay
        self.label = label
        self.secure = secure
        self.transport: asyncio.Transport | None = None
        self.peer: End | None = None
        #: This end's input ended cleanly (EOF on plain, close_notify on securechan).
        self.eof = False
        self.lost = False
        self.bytes_in = 0
        #: Input delivered before the other end existed (at most one read: reading is paused).
        self._early: list[bytes] = []
        #: This end's own write buffer is above its high-water mark (kept even before wiring).
        self.write_paused = False
        #: Called once this end's connection exists (the tunnel admits it and starts the other end).
        self.on_connected: Callable[[End], None] | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self.relay.wired:
            self.transport.pause_reading()
        self.relay._end_connected(self)
        if self.on_connected is not None:
            self.on_connected(self)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        relay = self.relay
        relay.last_activity = relay.loop.time()
        peer = self.peer
        if peer is None:
            self._early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()  # uvloop ignores a pause inside connection_made
            return
        out = peer.transport
        if out is not None and not peer.lost:
            out.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        relay = self.relay
        relay.last_activity = relay.loop.time()
        if relay.first_eof is None:
            relay.first_eof = self.label
        peer = self.peer
        if peer is not None:
            if not (peer.secure and peer.eof) or peer.lost or peer.transport is None or peer.transport.is_closing():
                peer.send_eof()
            # else both directions have ended and the peer is a securechan connection: the close in
            # _maybe_finish sends its close_notify, with no separate TCP shutdown. A plain peer still
            # gets its shutdown first: on a peer that reset after its EOF, that is what fails (ENOTCONN)
            # and makes the relay report the reset instead of a clean end.
            relay._maybe_finish()
        return True  # keep the other direction open (half-close)

    def pause_writing(self) -> None:
        self.write_paused = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        relay = self.relay
        relay.last_activity = relay.loop.time()
        peer = self.peer  # set only once the relay is wired
        if peer is not None and peer.transport is not None and not peer.transport.is_closing() and not peer.eof:
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay._end_lost(self, exc)

    # -- used by the relay ------------------------------------------------------------------

    def wire(self, peer: End) -> None:
        """Start relaying to ``peer``: hand over what arrived early (``peer`` already points back at us)."""
        if self.relay.reason is not None:
            return  # the other end's hand-over stopped the relay (e.g. an EOF towards a reset peer)
        early, self._early = self._early, []
        for data in early:
            peer.transport.write(data)  # type: ignore[union-attr]
        if self.eof:
            peer.send_eof()

    def start_reading(self) -> None:
        """Read unless our input ended or the other end cannot take more."""
        peer = self.peer
        assert peer is not None
        if self.eof or peer.write_paused or self.lost or self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()

    def send_eof(self) -> None:
        transport = self.transport
        if transport is None or self.relay.reason is not None:
            return
        if self.lost or transport.is_closing():
            # The relay closes an end only after both directions ended, so this one is going away
            # with an error (a failed write): no EOF is sent, so the stream cannot look complete, and its
            # connection_lost, which comes next, stops the relay and names the error.
            return
        try:
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()
        except OSError as exc:  # e.g. ENOTCONN: the plain peer reset while we were not reading it
            self.relay.stop(f"{self.label} connection reset ({_describe(exc)})")

    def held_bytes(self) -> int:
        transport = self.transport
        pending = 0 if transport is None or transport.is_closing() else transport.get_write_buffer_size()
        # A multiplexed stream also holds what arrived while it was paused.
        inbound = getattr(transport, "get_read_buffer_size", None)
        return pending + (inbound() if inbound is not None else 0) + sum(map(len, self._early))

    def abort(self) -> None:
        """Drop the connection: an RST on TCP, no close_notify on securechan."""
        if self.transport is not None and not self.lost:
            reset(self.transport)


class Relay:
    """Relay bytes between the ``client`` end and the ``target`` end until both directions ended or it is stopped.

    The owner creates the relay, hands :attr:`client` and :attr:`target` to asyncio as the
    protocols of the two connections, calls :meth:`start` once both are connected, and hears
    that it ended through :meth:`when_done` (no task waits on a running relay).
    """

    def __init__(
        self,
        *,
        client_secure: bool,
        idle_timeout: float | None = None,
        max_lifetime: float | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = End(self, "client", client_secure)
        self.target = End(self, "target", not client_secure)
        self.idle_timeout = idle_timeout
        self.max_lifetime = max_lifetime
        #: Why the relay ended; the first cause wins.
        self.reason: str | None = None
        self.failed = False
        self.first_eof: str | None = None
        self.started = self.loop.time()
        self.last_activity = self.started
        self._finishing = False
        #: Resolved only by _settle; waiters get it through shield(), so none can cancel it.
        self._done: asyncio.Future[str] = self.loop.create_future()
        self._on_done: list[Callable[[Relay], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._grace: asyncio.TimerHandle | None = None

    # -- public -----------------------------------------------------------------------------

    @property
    def wired(self) -> bool:
        """Both ends are connected and point at each other (:meth:`start` ran)."""
        return self.client.peer is not None

    @property
    def up(self) -> int:
        """Bytes relayed client -> target."""
        return self.client.bytes_in

    @property
    def down(self) -> int:
        """Bytes relayed target -> client."""
        return self.target.bytes_in

    def start(self) -> None:
        """Both ends are connected: relay what each delivered so far, then everything that follows."""
        if self.reason is not None:
            return  # stopped while connecting
        self.started = self.last_activity = self.loop.time()
        self.client.peer, self.target.peer = self.target, self.client
        self._arm_timer()
        self.client.wire(self.target)
        self.target.wire(self.client)
        if self.reason is not None:
            return  # stopped while handing over (a reset peer)
        self.client.start_reading()
        self.target.start_reading()
        self._maybe_finish()

    @property
    def settled(self) -> bool:
        """The relay ended and both of its connections are gone."""
        return self._done.done()

    def when_done(self, callback: Callable[[Relay], None]) -> None:
        """Call ``callback(relay)`` once the relay has ended and both connections are gone.

        At once if it already has. Callbacks run from the connections' own events (no task
        waits on a running relay); an exception in one goes to the loop's exception handler.
        """
        if self._done.done():
            self._call(callback)
        else:
            self._on_done.append(callback)

    async def wait(self) -> str:
        """Wait for the relay to end; returns why. Cancelling the wait stops the relay."""
        try:
            return await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.stop("cancelled")
            raise

    async def run(self) -> str:
        self.start()
        return await self.wait()

    def stop(self, reason: str) -> None:
        """End the relay now: drop both ends (RST on TCP, no close_notify on securechan)."""
        if self.reason is None:
            self.reason = reason
            self.failed = True
        elif self._finishing and not self._done.done() and not self.failed:
            # Both directions had ended, but their last bytes were still on their way out.
            self.reason += f", then cut before the last bytes were delivered ({reason})"
            self.failed = True
        self.client.abort()
        self.target.abort()
        self._settle()

    def held_bytes(self) -> int:
        """Bytes this process holds for the connection: unsent output and input not yet relayed."""
        return self.client.held_bytes() + self.target.held_bytes()

    # -- events from the ends ------------------------------------------------------------------

    def _end_connected(self, end: End) -> None:
        if self.reason is not None:  # stopped before this end was connected
            end.abort()

    def _end_lost(self, end: End, exc: Exception | None) -> None:
        if self._finishing or self.reason is not None:
            self._settle()
            return
        other = end.peer or (self.target if end is self.client else self.client)
        if end.secure:
            if isinstance(exc, TruncationError):
                why = f"{end.label} connection ended without close_notify (truncated)"
            elif isinstance(exc, SecureChannelError):
                why = f"{end.label} channel failed: {exc}"
            elif exc is not None:
                why = f"{end.label} connection reset ({_describe(exc)})"
            else:
                why = f"{end.label} connection closed before the end of the stream"
        elif exc is not None:
            why = f"{end.label} connection reset ({_describe(exc)})"
        elif end.eof:
            # Closed after its EOF: its input is complete; the other direction cannot finish.
            why = f"{end.label} went away before the end of the stream"
        else:
            why = f"{end.label} connection closed before the end of the stream"
        self.stop(f"{why}; {other.label} connection aborted")

    def _maybe_finish(self) -> None:
        if self._finishing or not (self.client.eof and self.target.eof) or self.reason is not None:
            return
        self._finishing = True
        self.reason = f"{self.first_eof or 'client'} closed first, then the other side"
        self._cancel_timer()
        for end in (self.client, self.target):
            if end.transport is not None and not end.lost:
                end.transport.close()  # after the buffer flushed
        self._grace = self.loop.call_later(CLOSE_GRACE, self._grace_over)
        self._settle()

    def _grace_over(self) -> None:
        self._grace = None
        self.stop(f"the last bytes were not taken within {CLOSE_GRACE:g} s")

    def _settle(self) -> None:
        """Once the relay ended and both connections are gone: resolve :meth:`wait`, call the
        :meth:`when_done` callbacks."""
        if self._done.done():
            return
        self._cancel_timer()
        client, target = self.client, self.target
        if (client.lost or client.transport is None) and (target.lost or target.transport is None):
            self._done.set_result(self.reason or "closed")
            if self._grace is not None:
                self._grace.cancel()
                self._grace = None
            callbacks, self._on_done = self._on_done, []
            for callback in callbacks:
                self._call(callback)

    def _call(self, callback: Callable[[Relay], None]) -> None:
        # _settle runs inside transport callbacks (connection_lost, a failed handshake's
        # teardown): an exception from the owner's callback must not cut those short.
        try:
            callback(self)
        except Exception as exc:
            self.loop.call_exception_handler(
                {"message": "exception in a relay's when_done callback", "exception": exc}
            )

    # -- timers ---------------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        deadlines = []
        if self.idle_timeout is not None:
            deadlines.append(self.last_activity + self.idle_timeout)
        if self.max_lifetime is not None:
            deadlines.append(self.started + self.max_lifetime)
        if deadlines:
            self._timer = self.loop.call_at(min(deadlines) + 0.001, self._check_timers)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_timers(self) -> None:
        self._timer = None
        if self.reason is not None or self._finishing:
            return
        now = self.loop.time()
        if self.max_lifetime is not None and now >= self.started + self.max_lifetime:
            self.stop(f"maximum connection lifetime ({self.max_lifetime:g} s) reached")
        elif self.idle_timeout is not None and now >= self.last_activity + self.idle_timeout:
            held = self.held_bytes()
            if held:
                self.stop(f"stalled for {self.idle_timeout:g} s with {held} bytes in flight; "
                          "both sides aborted so the cut cannot pass for a complete stream")
            else:
                self.stop(f"idle for {self.idle_timeout:g} s; both sides aborted (an unended stream is not complete)")
        else:
            self._arm_timer()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
