"""A minimal tunnel end in Python on uvloop: a measurement floor, not a transport.

    python -m benchmarks.relay_floor --listen PORT --target PORT --mode plain|seal|open [--key FILE]

``plain`` relays bytes as they come (no protection at all). ``seal`` is a client end: plain
bytes in on ``--listen``, records out to ``--target``; ``open`` is the matching server end.
A record is a 4-byte big-endian length, then AES-256-GCM ciphertext and tag, with the
length as associated data and a per-direction counter as the nonce; the two directions'
keys are the 64 bytes of ``--key``. There is no handshake, no key schedule, no alert, no
close_notify and no limit besides the record size, and an EOF closes both sockets (no
half-close). It has only the per-message work every AEAD tunnel has (one AEAD call and one
write per message, a frame parse per read), written plainly (a ``Protocol``, records
copied out of a ``bytearray``) rather than tuned to the last call: a floor in the sense
of "this much is the language and the loop", not a proven minimum. ``benchmarks.tunnel_cpu``
runs it beside securechan, spiped and stunnel.

It listens and connects on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
from collections.abc import Callable
from pathlib import Path
from typing import cast

import uvloop
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

LOOPBACK = "127.0.0.1"
MAX_PLAIN = 65536
TAG = 16
_LEN = struct.Struct(">I")


class _Seal:
    def __init__(self, key: bytes) -> None:
        self._aead, self._seq = AESGCM(key), 0

    def __call__(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        for start in range(0, len(data), MAX_PLAIN):
            chunk = data[start : start + MAX_PLAIN]
            head = _LEN.pack(len(chunk) + TAG)
            self._seq += 1
            out += (head, self._aead.encrypt(self._seq.to_bytes(12, "big"), chunk, head))
        return out


class _Open:
    def __init__(self, key: bytes) -> None:
        self._aead, self._seq, self._buf = AESGCM(key), 0, bytearray()

    def __call__(self, data: bytes) -> list[bytes]:
        """The plaintexts of the records ``data`` completes (ValueError on a bad length, InvalidTag on a bad tag)."""
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        while len(buf) - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if not TAG <= size <= MAX_PLAIN + TAG:
                raise ValueError(f"record length {size} out of range")
            end = pos + 4 + size
            if end > len(buf):
                break
            self._seq += 1
            # A bad tag raises InvalidTag: the caller cuts the connection.
            out.append(self._aead.decrypt(self._seq.to_bytes(12, "big"), memoryview(buf)[pos + 4 : end],
                                          bytes(buf[pos : pos + 4])))
            pos = end
        del buf[:pos]
        return out


Convert = Callable[[bytes], list[bytes]]


def _identity(data: bytes) -> list[bytes]:
    return [data]


class _End(asyncio.Protocol):
    """One socket of a relayed connection; ``convert`` turns what it reads into what its peer writes."""

    def __init__(self, convert: Convert) -> None:
        self.convert = convert
        self.transport: asyncio.Transport | None = None
        self.peer: _End | None = None
        self.early: list[bytes] = []
        self.eof = False
        #: its peer may write to it: the target end once connected and the early bytes replayed
        self.ready = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or not peer.ready or peer.transport is None:
            self.early.append(data)  # in order: replayed before anything read later
            return
        try:
            parts = self.convert(data)
        except Exception:
            self._cut()
            return
        peer.transport.writelines(parts)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        return False

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def _cut(self) -> None:
        for end in (self, self.peer):
            if end is not None and end.transport is not None:
                end.transport.abort()


def _converters(mode: str, key: bytes) -> tuple[Convert, Convert]:
    """(inbound -> outbound, outbound -> inbound) for one connection."""
    up, down = key[:32], key[32:64]
    if mode == "plain":
        return _identity, _identity
    if mode == "seal":
        return _Seal(up), _Open(down)
    return _Open(up), _Seal(down)


async def serve(listen: int, target: int, mode: str, key: bytes) -> None:
    loop = asyncio.get_running_loop()
    connecting: set[asyncio.Task[None]] = set()  # referenced until done, or the loop may drop them

    def accepted() -> _End:
        to_target, to_client = _converters(mode, key)
        inbound, outbound = _End(to_target), _End(to_client)
        inbound.peer, outbound.peer = outbound, inbound
        inbound.ready = True

        async def connect() -> None:
            try:
                await loop.create_connection(lambda: outbound, LOOPBACK, target)
            except OSError:
                if inbound.transport is not None:
                    inbound.transport.abort()
                return
            outbound.ready = True
            early, inbound.early = inbound.early, []
            for data in early:
                inbound.data_received(data)
            if inbound.eof and outbound.transport is not None:
                outbound.transport.close()

        task = loop.create_task(connect())
        connecting.add(task)
        task.add_done_callback(connecting.discard)
        return inbound

    server = await loop.create_server(accepted, LOOPBACK, listen, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--target", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--mode", choices=["plain", "seal", "open"], required=True)
    parser.add_argument("--key", type=Path, help="64 bytes: the two directions' AES-256 keys (seal and open)")
    args = parser.parse_args()
    key = b""
    if args.mode != "plain":
        if args.key is None:
            parser.error(f"--mode {args.mode} needs --key")
        key = args.key.read_bytes()
        if len(key) != 64:
            parser.error(f"--key must hold exactly 64 bytes, not {len(key)}")
    uvloop.run(serve(args.listen, args.target, args.mode, key))


if __name__ == "__main__":
    main()
