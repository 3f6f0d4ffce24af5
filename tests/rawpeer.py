"""A securechan peer that tests can make misbehave: the sans-IO Connection over plain asyncio streams.

The honest side under test is always the real asyncio API; this side lets a test alter
bytes on the wire (flip a bit, cut the stream, send an oversized head) at a chosen point.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import securechan
from securechan.frames import HEADER_LEN


def frame_types(data: bytes) -> list[int]:
    """The frame types of a run of whole frames, in order (asserting it is exactly whole frames)."""
    types, pos = [], 0
    while pos < len(data):
        assert data[pos] == 0x92 and data[pos + 2] == 0xC6, "not at a frame head"
        types.append(data[pos + 1])
        pos += HEADER_LEN + int.from_bytes(data[pos + 3 : pos + 7], "big")
    assert pos == len(data), "a partial frame at the end"
    return types


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readexactly(HEADER_LEN)
    return head + await reader.readexactly(int.from_bytes(head[3:7], "big"))


async def pump_handshake(
    conn: securechan.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> list[securechan.Event]:
    """Run the handshake of ``conn`` over the streams; return the events seen (ends at HandshakeComplete)."""
    events: list[securechan.Event] = []
    while not conn.handshake_complete:
        out = conn.data_to_send()
        if out:
            writer.write(out)
            await writer.drain()
        events += conn.receive_data(await read_frame(reader))
    out = conn.data_to_send()
    if out:
        writer.write(out)
        await writer.drain()
    return events


async def raw_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_alert(reader: asyncio.StreamReader) -> int:
    """Read frames until a plaintext ALERT frame arrives; return its code."""
    from securechan.frames import FrameType, unpack_map

    while True:
        frame = await read_frame(reader)
        if frame[1] == FrameType.ALERT:
            return int(unpack_map(frame[HEADER_LEN:], 64)["code"])
