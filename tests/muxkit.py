"""A hand-written client end of a multiplexed carrier (docs/PROTOCOL.md §14), and a plain target.

:class:`MuxPeer` writes raw frames to a real server tunnel and records what comes back, so
tests can send what a real client tunnel never would and check the server's every answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

from tunnelkit import running, server_spec, until

import securechan
from securechan.tunnel import Tunnel, mux

PROTOCOL = "securechan-mux/1"
OPEN, DATA, FIN, RESET, WINDOW_UPDATE, GOAWAY = 1, 2, 3, 4, 5, 6
WINDOW = 256 * 1024  # §14.3: initial credit of each stream in each direction
MAX_CREDIT = 2**31 - 1
OPEN_STATE = "open"  # MuxPeer.end while the carrier is up


def frame(kind: int, stream: int, payload: bytes = b"", *, length: int | None = None) -> bytes:
    """One mux frame (§14.1); ``length`` overrides the header's length field."""
    return struct.pack("!BII", kind, stream, len(payload) if length is None else length) + payload


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, stream, struct.pack("!I", increment))


class MuxPeer:
    """The client end of a carrier, driven by hand: frames out as raw bytes, frames in recorded."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.frames: list[tuple[int, int, bytes]] = []
        self.data: defaultdict[int, bytearray] = defaultdict(bytearray)
        #: Credit we gave the server per stream, and DATA received beyond it (must stay empty).
        self.granted: defaultdict[int, int] = defaultdict(lambda: WINDOW)
        self.violations: list[str] = []
        #: OPEN_STATE, then None (clean end: close_notify) or the exception the carrier ended with.
        self.end: BaseException | str | None = OPEN_STATE
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                kind, stream, length = struct.unpack("!BII", await self.reader.readexactly(9))
                payload = await self.reader.readexactly(length) if length else b""
                self.frames.append((kind, stream, payload))
                if kind == DATA:
                    self.data[stream] += payload
                    if len(self.data[stream]) > self.granted[stream]:
                        self.violations.append(f"stream {stream}: {len(self.data[stream])} bytes of DATA "
                                               f"with {self.granted[stream]} bytes of credit")
        except asyncio.IncompleteReadError as exc:
            self.end = None if not exc.partial else exc
        except Exception as exc:
            self.end = exc

    def send(self, *frames: bytes) -> None:
        """All ``frames`` in one write (one record)."""
        self.writer.write(b"".join(frames))

    def credit(self, stream: int, increment: int) -> None:
        self.granted[stream] += increment
        self.send(window_update(stream, increment))

    def server_credit(self, stream: int) -> int:
        """How many bytes of DATA the server allowed us on ``stream`` so far."""
        return WINDOW + sum(int(struct.unpack("!I", p)[0]) for _, _, p in self.of(stream, WINDOW_UPDATE))

    def of(self, stream: int, *kinds: int) -> list[tuple[int, int, bytes]]:
        return [f for f in self.frames if f[1] == stream and (not kinds or f[0] in kinds)]

    async def ending(self, stream: int) -> tuple[int, bytes]:
        """The FIN or RESET that ends the server's direction of ``stream``: (kind, payload)."""
        await until(lambda: bool(self.of(stream, FIN, RESET)) or self.end != OPEN_STATE)
        ends = self.of(stream, FIN, RESET)
        assert ends, f"the carrier ended ({self.end!r}) before stream {stream} did"
        return ends[0][0], ends[0][2]

    async def aborted(self) -> BaseException:
        """Wait for the carrier to end; it must be a cut (reset / no close_notify), not a clean close."""
        await until(lambda: self.end != OPEN_STATE)
        assert isinstance(self.end, ConnectionResetError), f"carrier ended with {self.end!r}, not a reset"
        return self.end

    async def closed_cleanly(self) -> None:
        await until(lambda: self.end != OPEN_STATE)
        assert self.end is None, f"carrier ended with {self.end!r} instead of close_notify"

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self.writer.transport.abort()


@contextlib.asynccontextmanager
async def mux_peer(pki_dir: Any, port: int) -> AsyncIterator[MuxPeer]:
    reader, writer = await securechan.open_connection(
        "127.0.0.1", port, config=pki_dir.client_config(alpn_protocols=[PROTOCOL]), server_name="localhost")
    assert writer.get_extra_info("alpn_protocol") == PROTOCOL  # a server tunnel always accepts it
    peer = MuxPeer(reader, writer)
    try:
        yield peer
    finally:
        await peer.close()
    assert peer.violations == [], "the server sent DATA beyond the credit we gave it"


@contextlib.asynccontextmanager
async def server_tunnel(pki_dir: Any, target_port: int, **kw: Any) -> AsyncIterator[tuple[Tunnel, MuxPeer]]:
    async with running(server_spec(pki_dir, f"127.0.0.1:{target_port}", **kw)) as (srv,), \
            mux_peer(pki_dir, srv.port) as peer:
        yield srv, peer


class Target:
    """A plain target recording, per connection, what it received and how its input ended."""

    def __init__(self, reply: Callable[[int, bytes], bytes] | None = None, *, read: bool = True) -> None:
        self.reply = reply
        self.read = read
        self.received: list[bytearray] = []
        self.endings: list[str] = []
        self.release = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(self.received)
        got = bytearray()
        self.received.append(got)
        try:
            if not self.read:
                await self.release.wait()
            while chunk := await reader.read(65536):
                got += chunk
            self.endings.append("eof")
            if self.reply is not None:
                writer.write(self.reply(index, bytes(got)))
            writer.write_eof()
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            self.endings.append(type(exc).__name__)
        finally:
            writer.close()


def the_carrier(srv: Tunnel) -> mux.MuxSession:
    (session,) = srv.carriers
    return session


async def credit_reaches(peer: MuxPeer, stream: int, amount: int, wait: float) -> bool:
    """Whether the server's credit for ``stream`` reaches ``amount`` bytes within ``wait`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + wait
    while peer.server_credit(stream) < amount:
        if loop.time() > end or peer.end != OPEN_STATE:
            return False
        await asyncio.sleep(0.02)
    return True
