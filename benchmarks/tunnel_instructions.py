"""Instructions per tunnelled request and per tunnelled connection, counted, not timed.

    python -m benchmarks.tunnel_instructions [--requests 10000] [--connections 200] [--no-mux]

A PING/PONG target, a ``securechan server`` tunnel end in front of it, a ``securechan
client`` end in front of that, and a client all run in one uvloop process, with the tunnel
ends' connection log on (formatted as the CLI does, written to ``os.devnull``). Two loads:
``request``, kept-alive requests on one connection (the per-message path: one seal and one
open per message and end, the relay, the transports), and ``connection``, one request per
new connection (accept, an OPEN on the multiplexed connection, relay, FIN both ways; with
``--no-mux``, a connection of its own: connect, resumed handshake, ticket, relay,
close_notify, teardown).

Each load runs twice under ``valgrind --tool=cachegrind`` (a short and a long run, after the
same warm-up), and the figure is the difference in user-space instructions divided by the
difference in work, so start-up, imports and the warm-up cancel out. On a shared or small
machine no timing resolves a change of a few per cent, and this count does: it moves by a
few instructions between runs of the same code. It counts all four parties, so compare two
versions of securechan with it, not securechan with another program. Kernel work (system
calls, loopback TCP) is not in it. Needs valgrind (``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import pkiutil
from .procs import ROOT, _env

LOOPBACK = "127.0.0.1"
PING = b"*1\r\n$4\r\nPING\r\n"
PONG = b"+PONG\r\n"
WARMUP = 30
#: The short run of each load is this fraction of the long one.
SHORT = 5


class _Target(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.transport.write(PONG)

    def eof_received(self) -> bool:
        self.transport.close()
        return False


class _Client(asyncio.Protocol):
    """Sends ``count`` PINGs one after the other, then closes; ``done`` resolves when it is closed."""

    def __init__(self, count: int, done: asyncio.Future[None]) -> None:
        self.count, self.done = count, done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        transport.write(PING)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.count -= 1
        if self.count > 0:
            self.transport.write(PING)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _one_connection(port: int, requests: int) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    await loop.create_connection(lambda: _Client(requests, done), LOOPBACK, port)
    await done


async def _load(kind: str, count: int, pki_dir: Path, no_mux: bool) -> None:
    from securechan.tunnel import Tunnel, TunnelSpec, parse_address

    loop = asyncio.get_running_loop()
    bench = pkiutil.load(pki_dir)
    target = await loop.create_server(_Target, LOOPBACK, 0)
    target_port = target.sockets[0].getsockname()[1]
    server = Tunnel(TunnelSpec(mode="server", listen=parse_address(f"{LOOPBACK}:0"),
                               target=parse_address(f"{LOOPBACK}:{target_port}"), name="server",
                               cert=str(bench.cert), key=str(bench.key)))
    await server.start()
    client = Tunnel(TunnelSpec(mode="client", listen=parse_address(f"{LOOPBACK}:0"),
                               target=parse_address(f"{LOOPBACK}:{server.port}"), name="client",
                               cafile=str(bench.ca), server_name=LOOPBACK, no_mux=no_mux))
    await client.start()
    port = client.port
    try:
        for _ in range(WARMUP):  # the first connection is a full handshake; the rest resume
            await _one_connection(port, 1)
        await _one_connection(port, WARMUP)
        if kind == "request":
            await _one_connection(port, count)
        else:
            for _ in range(count):
                await _one_connection(port, 1)
    finally:
        await client.close()
        await server.close()
        target.close()


def _worker(kind: str, count: int, pki_dir: Path, no_mux: bool) -> None:
    import uvloop

    # The CLI's log line per connection end, formatted as the CLI formats it (securechan/cli.py).
    logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"),  # noqa: SIM115 (lives as long as the process)
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(_load(kind, count, pki_dir, no_mux))


def _instructions(kind: str, count: int, pki_dir: Path, no_mux: bool) -> int:
    argv = ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
            sys.executable, "-m", "benchmarks.tunnel_instructions", "--worker", kind, str(count), str(pki_dir),
            *(["--no-mux"] if no_mux else [])]
    # A fixed hash seed: the same dict layouts in every run, so the two runs differ only in work.
    env = dict(_env(), PYTHONHASHSEED="0")
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
    if done.returncode != 0 or found is None:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"the {kind} load failed under valgrind (exit {done.returncode}):\n{tail}")
    return int(found.group(1).replace(",", ""))


def per_unit(kind: str, count: int, pki_dir: Path, no_mux: bool) -> float:
    """User-space instructions per request or connection: (long run - short run) / (their difference)."""
    short = max(1, count // SHORT)
    return ((_instructions(kind, count, pki_dir, no_mux) - _instructions(kind, short, pki_dir, no_mux))
            / (count - short))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000, help="kept-alive requests in the long run")
    parser.add_argument("--connections", type=int, default=200, help="new connections in the long run")
    parser.add_argument("--no-mux", action="store_true",
                        help="a client tunnel with --no-mux (a securechan connection per connection)")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "COUNT", "PKI"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, count, pki_dir = args.worker
        _worker(kind, int(count), Path(pki_dir), args.no_mux)
        return 0
    if args.requests < SHORT + 1 or args.connections < SHORT + 1:
        parser.error(f"--requests and --connections must be at least {SHORT + 1}")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: apt-get install valgrind (this count needs cachegrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="securechan-instr-") as tmp:
        pki_dir = Path(tmp) / "pki"
        pkiutil.make(pki_dir)
        request = per_unit("request", args.requests, pki_dir, args.no_mux)
        connection = per_unit("connection", args.connections, pki_dir, args.no_mux)
    mode = "client tunnel with --no-mux" if args.no_mux else "client tunnel multiplexing (the default)"
    print(f"user-space instructions, all four parties in one process (client, both tunnel ends, target), {mode}:")
    print(f"  per kept-alive request:   {request:12,.0f}   ({args.requests:,} requests minus "
          f"{args.requests // SHORT:,})")
    print(f"  per new connection:       {connection:12,.0f}   ({args.connections:,} connections minus "
          f"{args.connections // SHORT:,})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
