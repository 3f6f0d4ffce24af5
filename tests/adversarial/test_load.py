"""Load with integrity: many clients stream several MB each way at once, through the channel and
through a tunnel pair; every stream's SHA-256 matches at the far end and every connection
closes cleanly (close_notify both ways, no error on either side).

Sizes for longer runs: SECURECHAN_LOAD_CLIENTS (default 12), SECURECHAN_LOAD_MB (default 4, per
direction per client).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct

import securechan

CLIENTS = int(os.environ.get("SECURECHAN_LOAD_CLIENTS", "12"))
SIZE = int(float(os.environ.get("SECURECHAN_LOAD_MB", "4")) * 1024 * 1024)
CHUNK = 256 * 1024


def stream(direction: bytes, ident: int) -> bytes:
    """The deterministic payload of one direction of one client (both ends can compute its hash)."""
    return hashlib.shake_256(direction + struct.pack(">I", ident)).digest(SIZE + ident * 4099)


async def send_all(writer: asyncio.StreamWriter, data: bytes) -> None:
    view = memoryview(data)
    for i in range(0, len(view), CHUNK):
        writer.write(view[i : i + CHUNK])
        await writer.drain()
    writer.write_eof()
    await writer.drain()


async def read_all(reader: asyncio.StreamReader) -> hashlib._Hash:
    digest = hashlib.sha256()
    while chunk := await reader.read(CHUNK):
        digest.update(chunk)
    assert reader.at_eof()
    return digest


async def serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, results: dict[int, bool]) -> None:
    """Far end: read the client's id, stream the download while hashing the upload."""
    ident = struct.unpack(">I", await reader.readexactly(4))[0]
    sender = asyncio.create_task(send_all(writer, stream(b"down", ident)))
    up = await read_all(reader)
    await sender
    results[ident] = up.digest() == hashlib.sha256(stream(b"up", ident)).digest()
    writer.close()
    await writer.wait_closed()


async def client_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ident: int) -> bool:
    writer.write(struct.pack(">I", ident))
    sender = asyncio.create_task(send_all(writer, stream(b"up", ident)))
    down = await read_all(reader)
    await sender
    writer.close()
    await writer.wait_closed()
    return down.digest() == hashlib.sha256(stream(b"down", ident)).digest()


async def test_many_clients_stream_both_ways_through_the_channel(serve, server_config, client_config) -> None:
    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await serve_one(reader, writer, results)
        except BaseException as exc:
            errors.append(exc)
            raise

    _, port = await serve(handler, server_config)

    async def one(ident: int) -> bool:
        reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_config)
        return await client_one(reader, writer, ident)

    downs = await asyncio.gather(*(one(i) for i in range(CLIENTS)))
    for _ in range(1500):
        if len(results) == CLIENTS or errors:
            break
        await asyncio.sleep(0.01)
    assert not errors, errors
    assert all(downs), "a download arrived with a different SHA-256"
    assert results == dict.fromkeys(range(CLIENTS), True), "an upload arrived with a different SHA-256"


async def test_many_clients_stream_both_ways_through_a_tunnel(pki_dir) -> None:
    import tunnelkit  # the tunnel tests' kit (tests/ is on sys.path)

    results: dict[int, bool] = {}
    errors: list[BaseException] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await serve_one(reader, writer, results)
        except BaseException as exc:
            errors.append(exc)
            raise

    async with tunnelkit.plain_target(target) as target_port:
        tunnels = tunnelkit.pair(pki_dir, f"127.0.0.1:{target_port}")
        async with tunnels as (server_tunnel, client_tunnel):

            async def one(ident: int) -> bool:
                reader, writer = await asyncio.open_connection("127.0.0.1", client_tunnel.port)
                return await client_one(reader, writer, ident)

            downs = await asyncio.gather(*(one(i) for i in range(CLIENTS)))
            for _ in range(1500):
                if len(results) == CLIENTS or errors:
                    break
                await asyncio.sleep(0.01)
    assert not errors, errors
    assert all(downs), "a download arrived through the tunnel with a different SHA-256"
    assert results == dict.fromkeys(range(CLIENTS), True), "an upload through the tunnel has a different SHA-256"
    assert server_tunnel.completed == CLIENTS and server_tunnel.cut == 0
    assert client_tunnel.completed == CLIENTS and client_tunnel.cut == 0
