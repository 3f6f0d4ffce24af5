"""An attacker between a client tunnel and a server tunnel.

The plain programs at either end cannot see alerts, so the tunnels must turn every attack
into a reset (never a clean FIN): a program that reads to EOF must not mistake a tampered or
truncated stream for a complete one, and it never receives a tampered byte.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from securechan.frames import FrameType

from .proxy import Attack, Direction, Flow, FrameProxy, Verdict, flip, is_frame

PAYLOAD = os.urandom(600_000)


class Session:
    """What the plain target received on one connection and how that stream ended."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.ending: list[str] = []
        self.done = asyncio.Event()


class Target:
    """A plain TCP service that records each connection."""

    def __init__(self) -> None:
        self.sessions: list[Session] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session()
        self.sessions.append(session)
        try:
            while chunk := await reader.read(65536):
                session.data += chunk
            session.ending.append("eof")
            writer.write(b"got it")
            writer.write_eof()
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            session.ending.append(type(exc).__name__)
        finally:
            writer.close()
            session.done.set()


async def plain_round_trip(port: int) -> tuple[bytes, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(PAYLOAD)
    writer.write_eof()
    try:
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 15)
        end = "eof"
    except (ConnectionError, OSError) as exc:
        reply, end = b"", type(exc).__name__
    writer.close()
    return reply, end


class FlipDataRecord(Attack):
    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def frame(self, flow: Flow, direction: Direction, frame: bytes) -> Verdict:
        if direction is Direction.C2S and is_frame(frame, FrameType.APPLICATION_DATA):
            self.seen += 1
            if self.seen == self.n:
                return [flip(frame, 30, 1)]
        return [frame]


class StripClientCloseNotify(Attack):
    """Hold each client CONTROL record until another client frame follows; drop the last (close_notify)."""

    def __init__(self) -> None:
        self.held: list[bytes] = []

    def frame(self, flow: Flow, direction: Direction, frame: bytes) -> Verdict:
        if direction is not Direction.C2S:
            return [frame]
        out, self.held = self.held, []
        if is_frame(frame, FrameType.CONTROL):
            self.held = [frame]
            return out
        return [*out, frame]


async def run_through_tunnels(pki_dir, attack: Attack) -> tuple[Session, bytes, str]:  # type: ignore[no-untyped-def]
    """One connection through client tunnel → attacking proxy → server tunnel → plain target, then a
    fresh honest connection along the same path, which must still work."""
    import tunnelkit

    target = Target()
    async with tunnelkit.plain_target(target.handle) as target_port, \
            tunnelkit.running(tunnelkit.server_spec(pki_dir, f"127.0.0.1:{target_port}")) as (server_tunnel,):
        proxy = FrameProxy(server_tunnel.port, attack)
        proxy_port = await proxy.start()
        try:
            async with tunnelkit.running(tunnelkit.client_spec(pki_dir, f"127.0.0.1:{proxy_port}")) as (client_tunnel,):
                reply, client_end = await plain_round_trip(client_tunnel.port)
                # The attack may end the secure stream before the server tunnel reached the target
                # (then the target saw no connection at all); wait until the tunnel is done with it.
                await tunnelkit.until(lambda: server_tunnel.active == 0, 15)
                if target.sessions:
                    attacked = target.sessions[0]
                    await asyncio.wait_for(attacked.done.wait(), 15)
                else:
                    attacked = Session()
                    attacked.ending.append("never connected")
                seen = len(target.sessions)
                proxy.attack = Attack()  # the attacker stops; the tunnels keep serving
                again, again_end = await plain_round_trip(client_tunnel.port)
                await tunnelkit.until(lambda: len(target.sessions) > seen, 15)
                honest = target.sessions[seen]
                await asyncio.wait_for(honest.done.wait(), 15)
                assert (again, again_end) == (b"got it", "eof")
                assert bytes(honest.data) == PAYLOAD and honest.ending == ["eof"]
        finally:
            await proxy.close()
    return attacked, reply, client_end


async def test_honest_tunnel_through_passive_proxy(pki_dir) -> None:
    """Control case: the same path without tampering delivers everything and ends with a clean EOF."""
    target, reply, client_end = await run_through_tunnels(pki_dir, Attack())
    assert bytes(target.data) == PAYLOAD and target.ending == ["eof"]
    assert reply == b"got it" and client_end == "eof"


@pytest.mark.parametrize("attack", ["flip", "strip-close-notify"])
async def test_attack_between_tunnels_resets_the_plain_ends(pki_dir, attack: str) -> None:
    target, reply, client_end = await run_through_tunnels(
        pki_dir, FlipDataRecord(2) if attack == "flip" else StripClientCloseNotify()
    )
    assert PAYLOAD.startswith(bytes(target.data)), "the target received bytes the client never sent"
    assert target.ending and target.ending[0] != "eof", "a tampered or truncated stream ended like a complete one"
    if attack == "flip":
        assert len(target.data) < len(PAYLOAD)
    assert reply == b""


async def test_forged_record_while_the_tunnel_cannot_flush_still_resets_the_target(pki_dir) -> None:
    """The path stops reading the server tunnel's output (its send buffer backs up), then injects a
    record that fails its tag. The channel's failure must reach the relay at once, so the target sees
    a reset, not the clean end an idle timeout would give a connection that merely looked quiet."""
    from tunnelkit import plain_target, running, server_spec

    import securechan
    from securechan.frames import encode_frame

    received = bytearray()
    ending: list[str] = []
    target_writers: list[asyncio.StreamWriter] = []

    async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        target_writers.append(writer)
        try:
            while data := await reader.read(65536):
                received.extend(data)
            ending.append("clean EOF")
        except ConnectionResetError:
            ending.append("reset")
        writer.close()

    stall, inject = asyncio.Event(), asyncio.Event()

    async def path(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, port: int) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", port)

        async def upstream() -> None:
            while True:
                read = asyncio.ensure_future(client_r.read(65536))
                forge = asyncio.ensure_future(inject.wait())
                done, _ = await asyncio.wait({read, forge}, return_when=asyncio.FIRST_COMPLETED)
                if forge in done:
                    read.cancel()
                    server_w.write(encode_frame(FrameType.APPLICATION_DATA, os.urandom(64)))
                    await asyncio.sleep(30)
                    return
                forge.cancel()
                if not (data := read.result()):
                    return
                server_w.write(data)
                await server_w.drain()

        async def downstream() -> None:
            while data := await server_r.read(65536):
                client_w.write(data)
                await client_w.drain()
                if stall.is_set():
                    await asyncio.sleep(30)  # stop reading: the server tunnel's send path backs up
                    return

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)

    async with plain_target(target) as tport, running(server_spec(pki_dir, f"127.0.0.1:{tport}", idle_timeout=1.0)) as (
        srv,
    ):
        mitm = await asyncio.start_server(lambda r, w: path(r, w, srv.port), "127.0.0.1", 0)
        reader, writer = await securechan.open_connection(
            "127.0.0.1", mitm.sockets[0].getsockname()[1], config=pki_dir.client_config(), server_name="localhost"
        )
        writer.write(b"A" * 1000)
        await writer.drain()
        while not target_writers or not srv.relays:
            await asyncio.sleep(0.01)
        stall.set()
        secure = next(iter(srv.relays)).client.transport
        for _ in range(5000):  # the target talks until the tunnel holds unsent records
            target_writers[0].write(b"r" * 4096)
            await target_writers[0].drain()
            await asyncio.sleep(0.002)
            if secure.get_write_buffer_size() > 0:
                break
        inject.set()
        for _ in range(60):
            if ending:
                break
            await asyncio.sleep(0.05)
        mitm.close()
        writer.transport.abort()
    assert bytes(received) == b"A" * 1000
    assert ending == ["reset"]
