"""The benchmark's own tiny application protocol, identical for every contender.

A client opens a connection and sends commands of 9 bytes, ``<op> <u64 n>``:

* ``U n``: the client uploads n bytes; the server counts them and answers one byte.
* ``D n``: the server sends n bytes.
* ``E 0``: the server echoes everything from now on (round-trip latency).
* ``I 0``: the server answers one byte and the connection then stays idle (memory).

Both sides are plain ``asyncio.Protocol`` objects, so the only thing that differs
between contenders is the transport: plain TCP, asyncio + ssl, or securechan.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

CMD = struct.Struct(">cQ")
CHUNK = 256 * 1024
_PAYLOAD = memoryview(bytes(range(256)) * (CHUNK // 256))


class ServerProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.cmd = bytearray()
        self.mode = b""
        self.left = 0
        self.paused = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        mode = self.mode
        if mode == b"E":
            self.transport.write(data)
            return
        if mode == b"U":
            n = len(data)
            if n < self.left:
                self.left -= n
                return
            data = data[self.left :]
            self.left = 0
            self.mode = b""
            self.transport.write(b"K")
        if not data:
            return
        self.cmd += data
        while len(self.cmd) >= CMD.size and not self.mode:
            op, n = CMD.unpack_from(self.cmd)
            rest = bytes(self.cmd[CMD.size :])
            self.cmd = bytearray()
            if op == b"U":
                self.mode, self.left = b"U", n
                if rest:
                    self.data_received(rest)
                return
            if op == b"D":
                self.left = n
                self.mode = b"D"
                self._pump()
            elif op == b"E":
                self.mode = b"E"
                if rest:
                    self.transport.write(rest)
                return
            elif op == b"I":
                self.transport.write(b"K")
            self.cmd = bytearray(rest)

    def _pump(self) -> None:
        while self.left and not self.paused:
            n = min(self.left, CHUNK)
            self.transport.write(_PAYLOAD[:n])
            self.left -= n
        if not self.left and self.mode == b"D":
            self.mode = b""

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.mode == b"D":
            self._pump()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class ClientProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.got = 0
        self.expect = 0
        self.waiter: asyncio.Future[None] | None = None
        self.can_write: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= self.expect and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def pause_writing(self) -> None:
        self.can_write = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.can_write is not None and not self.can_write.done():
            self.can_write.set_result(None)
        self.can_write = None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost during a measurement: {exc}"))

    def expect_bytes(self, n: int) -> asyncio.Future[None]:
        self.got = 0
        self.expect = n
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    async def upload(self, n: int) -> None:
        done = self.expect_bytes(1)
        self.transport.write(CMD.pack(b"U", n))
        left = n
        while left:
            k = min(left, CHUNK)
            self.transport.write(_PAYLOAD[:k])
            left -= k
            if self.can_write is not None:
                await self.can_write
        await done

    async def download(self, n: int) -> None:
        done = self.expect_bytes(n)
        self.transport.write(CMD.pack(b"D", n))
        await done

    async def idle(self) -> None:
        done = self.expect_bytes(1)
        self.transport.write(CMD.pack(b"I", 0))
        await done

    def start_echo(self) -> None:
        self.transport.write(CMD.pack(b"E", 0))

    async def ping(self, message: bytes) -> None:
        done = self.expect_bytes(len(message))
        self.transport.write(message)
        await done
