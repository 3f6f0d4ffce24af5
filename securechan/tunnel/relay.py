"""The bidirectional relay between a plain TCP (or Unix) stream and a securechan stream.

Theory of operation
-------------------
One pump per direction: read at most ``chunk`` bytes, write them, ``await drain()``. A
pump never reads again until the far side accepted what it wrote, so a slow reader on
either end pauses reading on the other and the bytes this process holds per connection
stay bounded (two stream-reader buffers, two transport write buffers, one chunk each way),
whatever the ends do.

Half-close travels both ways. A plain EOF becomes ``write_eof()`` on the secure stream
(close_notify, then TCP shutdown of the write side); a close_notify from the secure
peer becomes ``shutdown(SHUT_WR)`` on the plain socket. The other direction keeps flowing
until it ends too, so a client that shuts down its write side still gets the whole reply.

Failures are never laundered into a clean EOF. A secure stream that ends without
close_notify (``TruncationError``), fails authentication, or is reset makes the relay
abort the plain side with an RST (``SO_LINGER`` 0), and a plain side that is reset makes
the relay reset the secure side without close_notify, which the far end reports as a
reset (a ``ConnectionResetError``; ``TruncationError`` is one too). An application on
either end can therefore tell a complete stream from a cut one.

Idle timeout, maximum lifetime and the shutdown deadline are enforced by the task that
awaits the two pumps. Activity is progress in either direction: a read, or a write that
the far side accepted (``drain()`` returned). All three *abort* both sides: a stream whose
source never ended it (no EOF, no close_notify) is not complete, and this process cannot
see what the network or a withholding attacker still holds, so a clean close could pass a
prefix off as the whole stream. A pump that dies of an unexpected error aborts too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from typing import cast

from ..errors import SecureChannelError, TruncationError

CHUNK = 64 * 1024
#: How long a finished relay waits for its write buffers to reach the peers before aborting.
CLOSE_GRACE = 10.0


def reset(transport: asyncio.BaseTransport) -> None:
    """Close with an RST (``SO_LINGER`` 0) rather than a FIN; on securechan, also without close_notify."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    cast(asyncio.Transport, transport).abort()


@dataclass
class Side:
    """One end of a relay: a stream pair, whether it is the securechan side, and its name in logs."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    secure: bool
    label: str
    eof: bool = field(default=False, init=False)

    def held_bytes(self) -> int:
        """Bytes this process holds for this end: unread input plus unsent output."""
        transport = self.writer.transport
        pending = 0 if transport.is_closing() else transport.get_write_buffer_size()
        return len(self.reader._buffer) + pending  # type: ignore[attr-defined]

    def abort(self) -> None:
        """Drop the connection: an RST on TCP, no close_notify on securechan."""
        reset(self.writer.transport)

    def write_eof(self) -> None:
        transport = self.writer.transport
        if transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()


class Relay:
    """Relay bytes between ``client`` and ``target`` until both directions ended or the relay is stopped."""

    def __init__(
        self,
        client: Side,
        target: Side,
        *,
        idle_timeout: float | None = None,
        max_lifetime: float | None = None,
        chunk: int = CHUNK,
    ) -> None:
        self.client = client
        self.target = target
        self.idle_timeout = idle_timeout
        self.max_lifetime = max_lifetime
        self.chunk = chunk
        #: Bytes relayed client -> target and target -> client.
        self.up = 0
        self.down = 0
        #: Why the relay ended; the first cause wins.
        self.reason: str | None = None
        self.failed = False
        self._loop = asyncio.get_running_loop()
        self.started = self._loop.time()
        self._last_activity = self.started
        self._pumps: list[asyncio.Task[None]] = []
        self._first_eof: str | None = None
        self._writing = 0  # pumps waiting for the far side to accept a chunk

    # -- public -----------------------------------------------------------------------------

    async def run(self) -> str:
        self._pumps = [
            asyncio.ensure_future(self._pump(self.client, self.target, up=True)),
            asyncio.ensure_future(self._pump(self.target, self.client, up=False)),
        ]
        pending: set[asyncio.Task[None]] = set(self._pumps)
        try:
            while pending:
                done, pending = await asyncio.wait(pending, timeout=self._next_check())
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        self.stop(f"relay failed: {_describe(task.exception())}")  # type: ignore[arg-type]
                if pending:
                    self._check_timers()
            if self.reason is None:
                self.reason = f"{self._first_eof or 'client'} closed first, then the other side"
            await self._close_both()
        except asyncio.CancelledError:
            self.stop("cancelled")
            raise
        finally:
            for task in self._pumps:
                task.cancel()
        return self.reason

    def stop(self, reason: str) -> None:
        """End the relay now: drop both ends (RST on TCP, no close_notify on securechan)."""
        if self.reason is None:
            self.reason = reason
            self.failed = True
        self.client.abort()
        self.target.abort()
        current = asyncio.current_task()
        for task in self._pumps:
            if task is not current:
                task.cancel()

    def held_bytes(self) -> int:
        return self.client.held_bytes() + self.target.held_bytes()

    @property
    def duration(self) -> float:
        return self._loop.time() - self.started

    # -- internals ----------------------------------------------------------------------------

    async def _pump(self, src: Side, dst: Side, *, up: bool) -> None:
        while True:
            try:
                data = await src.reader.read(self.chunk)
            except TruncationError:
                self.stop(f"{src.label} connection ended without close_notify (truncated); "
                          f"{dst.label} connection aborted")
                return
            except SecureChannelError as exc:
                self.stop(f"{src.label} channel failed: {exc}")
                return
            except OSError as exc:
                self.stop(f"{src.label} connection reset ({exc.strerror or type(exc).__name__})")
                return
            if not data:
                break
            self._last_activity = self._loop.time()
            if up:
                self.up += len(data)
            else:
                self.down += len(data)
            self._writing += 1
            try:
                dst.writer.write(data)
                await dst.writer.drain()
            except (OSError, SecureChannelError) as exc:
                self.stop(f"{dst.label} went away while receiving ({_describe(exc)})")
                return
            finally:
                self._writing -= 1
            self._last_activity = self._loop.time()
        src.eof = True
        if self._first_eof is None:
            self._first_eof = src.label
        try:
            dst.write_eof()
            await dst.writer.drain()
        except (OSError, SecureChannelError) as exc:
            self.stop(f"{dst.label} went away before the end of the stream ({_describe(exc)})")

    def _next_check(self) -> float | None:
        deadlines = []
        if self.idle_timeout is not None:
            deadlines.append(self._last_activity + self.idle_timeout)
        if self.max_lifetime is not None:
            deadlines.append(self.started + self.max_lifetime)
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self._loop.time()) + 0.001

    def _check_timers(self) -> None:
        now = self._loop.time()
        if self.max_lifetime is not None and now >= self.started + self.max_lifetime:
            self.stop(f"maximum connection lifetime ({self.max_lifetime:g} s) reached")
        elif self.idle_timeout is not None and now >= self._last_activity + self.idle_timeout:
            held = self.held_bytes()
            if self._writing or held:
                self.stop(f"stalled for {self.idle_timeout:g} s with {held} bytes in flight; "
                          "both sides aborted so the cut cannot pass for a complete stream")
            else:
                self.stop(f"idle for {self.idle_timeout:g} s; both sides aborted (an unended stream is not complete)")

    async def _close_both(self) -> None:
        for side in (self.client, self.target):
            side.writer.close()
        try:
            await asyncio.wait_for(
                asyncio.gather(self.client.writer.wait_closed(), self.target.writer.wait_closed(),
                               return_exceptions=True),
                CLOSE_GRACE,
            )
        except TimeoutError:
            self.client.abort()
            self.target.abort()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
