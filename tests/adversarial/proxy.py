"""A frame-aware man-in-the-middle TCP proxy on 127.0.0.1, for attack tests.

Theory of operation
-------------------
:class:`FrameProxy` listens on 127.0.0.1:<ephemeral>. For every client it accepts it opens
a connection to the upstream server and runs two pumps, client→server and server→client.
Each pump cuts its byte stream into frames by the fixed 7-byte head
(``0x92 <type> 0xc6 <u32 length>``) and hands every frame to the :class:`Attack`, which
answers with what to forward instead:

* ``[frame]`` — unchanged; ``[modified]`` — tampered; ``[]`` — dropped;
* several frames — duplicated, reordered (hold one back, emit it later) or injected;
* :data:`CUT` — close both TCP connections at once (the peers see FIN, no alert);
  :data:`RESET` — the same with an RST.

When a side closes its write direction the attack's :meth:`Attack.eof` may emit held
frames (or a truncated frame) before the FIN is passed on. Bytes that do not start with a
frame head are forwarded raw. Every frame seen is recorded per :class:`Flow`, so a test can
replay a record from another connection, and the proxy decodes plaintext ALERT frames so a
test can check which alert code each side sent.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgpack

from securechan.frames import HEADER_LEN, FrameType

_HEAD = struct.Struct(">BBBI")
#: The proxy refuses to buffer a frame larger than this (the honest peers never send one).
_MAX_PROXY_FRAME = 4 * 1024 * 1024


class Direction(enum.Enum):
    C2S = "client->server"
    S2C = "server->client"


class _Cut:
    def __init__(self, reset: bool) -> None:
        self.reset = reset

    def __repr__(self) -> str:
        return "RESET" if self.reset else "CUT"


#: Returned by an attack to tear down both TCP connections (each peer sees a FIN).
CUT = _Cut(reset=False)
#: Returned by an attack to reset both TCP connections (each peer sees an RST).
RESET = _Cut(reset=True)
Verdict = Sequence[bytes] | _Cut


def frame_type(frame: bytes) -> int:
    return frame[1]


def is_frame(frame: bytes, ftype: FrameType) -> bool:
    return len(frame) >= HEADER_LEN and frame[0] == 0x92 and frame[1] == ftype and frame[2] == 0xC6


def flip(frame: bytes, pos: int, bit: int = 0) -> bytes:
    """``frame`` with one bit flipped (``pos`` may be negative, counting from the end)."""
    out = bytearray(frame)
    out[pos] ^= 1 << bit
    return bytes(out)


def alert_code(frame: bytes) -> int | None:
    """The code of a plaintext ALERT frame, or None."""
    if not is_frame(frame, FrameType.ALERT):
        return None
    try:
        body = msgpack.unpackb(frame[HEADER_LEN:], raw=False)
    except Exception:
        return None
    return body.get("code") if isinstance(body, dict) else None


@dataclass
class Flow:
    """One proxied client connection."""

    index: int
    #: Every frame received from each honest side, in order, before the attack saw it.
    frames: dict[Direction, list[bytes]] = field(default_factory=lambda: {d: [] for d in Direction})
    #: (direction, frame) in the order the proxy received them, across both directions.
    sequence: list[tuple[Direction, bytes]] = field(default_factory=list)
    #: Plaintext alert codes forwarded in each direction.
    alerts: dict[Direction, list[int]] = field(default_factory=lambda: {d: [] for d in Direction})
    cut: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def tear_down(self, reset: bool = False) -> None:
        self.cut = True
        for w in self.writers:
            if reset:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()
            else:
                w.transport.close()

    def of_type(self, direction: Direction, ftype: FrameType) -> list[bytes]:
        return [f for f in self.frames[direction] if is_frame(f, ftype)]


class Attack:
    """Pass-through; subclasses override :meth:`frame` and :meth:`eof`."""

    def frame(self, flow: Flow, direction: Direction, frame: bytes) -> Verdict:
        return [frame]

    def eof(self, flow: Flow, direction: Direction) -> Verdict:
        """``direction``'s sender closed its write side; return what to send before the FIN."""
        return []


class OnFrame(Attack):
    """An attack from a function ``(flow, direction, n, frame) -> verdict``; ``n`` counts per direction."""

    def __init__(self, fn: Callable[[Flow, Direction, int, bytes], Verdict]) -> None:
        self._fn = fn
        self._counts: dict[tuple[int, Direction], int] = {}

    def frame(self, flow: Flow, direction: Direction, frame: bytes) -> Verdict:
        key = (flow.index, direction)
        n = self._counts.get(key, 0)
        self._counts[key] = n + 1
        return self._fn(flow, direction, n, frame)


class FrameProxy:
    def __init__(self, upstream_port: int, attack: Attack | None = None, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.attack = attack or Attack()
        self.flows: list[Flow] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for flow in self.flows:
            flow.tear_down()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        flow = Flow(len(self.flows))
        self.flows.append(flow)
        try:
            sreader, swriter = await asyncio.open_connection(*self.upstream)
        except OSError:
            cwriter.transport.close()
            flow.done.set()
            self._tasks.discard(task)
            return
        flow.writers = [cwriter, swriter]
        try:
            await asyncio.gather(
                self._pump(flow, Direction.C2S, creader, swriter),
                self._pump(flow, Direction.S2C, sreader, cwriter),
            )
        finally:
            for w in flow.writers:
                w.transport.close()
            flow.done.set()
            self._tasks.discard(task)

    async def _pump(
        self, flow: Flow, direction: Direction, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while not flow.cut:
                try:
                    head = await reader.readexactly(HEADER_LEN)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial and not flow.cut:
                        writer.write(exc.partial)
                    break
                marker, _ftype, binmark, length = _HEAD.unpack(head)
                if marker != 0x92 or binmark != 0xC6 or length > _MAX_PROXY_FRAME:
                    writer.write(head + await reader.read(1 << 16))  # not a frame: pass raw
                    continue
                try:
                    body = await reader.readexactly(length)
                except asyncio.IncompleteReadError as exc:
                    if not flow.cut:
                        writer.write(head + exc.partial)
                    break
                frame = head + body
                flow.frames[direction].append(frame)
                flow.sequence.append((direction, frame))
                verdict = self.attack.frame(flow, direction, frame)
                if not self._emit(flow, direction, writer, verdict):
                    return
                await writer.drain()
            if not flow.cut and self._emit(flow, direction, writer, self.attack.eof(flow, direction)):
                await writer.drain()
                if writer.can_write_eof() and not writer.transport.is_closing():
                    writer.write_eof()
        except (ConnectionError, OSError):
            flow.tear_down()

    def _emit(self, flow: Flow, direction: Direction, writer: asyncio.StreamWriter, verdict: Verdict) -> bool:
        if isinstance(verdict, _Cut):
            flow.tear_down(reset=verdict.reset)
            return False
        if flow.cut or writer.transport.is_closing():
            return False
        for out in verdict:
            code = alert_code(out)
            if code is not None:
                flow.alerts[direction].append(code)
            writer.write(out)
        return True


def split_frames(data: bytes) -> list[bytes]:
    """Cut a byte string made of whole frames into frames."""
    frames, pos = [], 0
    while pos < len(data):
        length = _HEAD.unpack_from(data, pos)[3]
        frames.append(data[pos : pos + HEADER_LEN + length])
        pos += HEADER_LEN + length
    return frames


def message_of(frame: bytes) -> dict[str, object]:
    """The msgpack map inside a plaintext HANDSHAKE or ALERT frame."""
    value = msgpack.unpackb(frame[HEADER_LEN:], raw=False)
    assert isinstance(value, dict)
    return value


def rewrite(frame: bytes, **changes: object) -> bytes:
    """A plaintext frame with fields of its msgpack map replaced (a value of None removes the field)."""
    m = message_of(frame)
    for key, value in changes.items():
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value
    body = msgpack.packb(m, use_bin_type=True)
    return frame[:2] + bytes([0xC6]) + len(body).to_bytes(4, "big") + body


def message_type(frame: bytes) -> str | None:
    if not (is_frame(frame, FrameType.HANDSHAKE) or is_frame(frame, FrameType.ALERT)):
        return None
    try:
        kind = message_of(frame).get("type")
    except Exception:
        return None
    return kind if isinstance(kind, str) else None
