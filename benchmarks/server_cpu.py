"""Server CPU time per full handshake, against TLS 1.3 and against the floor under securechan.

    python -m benchmarks.server_cpu [--count 3000] [--clients 32] [--runs 3] [--loop uvloop]

The handshake rate at many clients is set by the server's CPU: this measures that CPU
directly. One server process, pinned to the first core, hosts one listener per kind on
the suite's PKI (the same RSA-2048 key for all); this process, pinned to the second core,
runs ``--count`` handshakes with ``--clients`` concurrent clients per kind and reads the
server's user and system CPU time (``getrusage``) before and after each window. Kinds take
turns run by run (a warm-up run first), so a disturbance falls on all of them alike.

Kinds:

* ``tcp``: connect and close, no handshake (what the accept and the close cost).
* ``tls``: TLS 1.3 in ``asyncio`` + ``ssl``; the client checks the chain and the name.
* ``securechan``: a full handshake (no ticket), closed with close_notify.
* ``floor``: the protocol's work with nothing around it. The server makes an X25519 key
  and writes as many bytes as securechan's ServerHello flight when the client's first
  flight has arrived, then unwraps an RSA-OAEP key with the same RSA key, does the X25519
  exchange and writes a Finished-sized reply when the second has. Flight sizes are taken
  from a real securechan handshake on the same PKI. This is the least a Python server on
  this event loop spends per handshake of this protocol; what securechan spends above it is
  its framing, transcript, key schedule, state and objects.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519

import securechan

from . import pkiutil
from .stats import rotated, summary
from .worker import Contenders, pin, raise_fd_limit, run_loop

KINDS = ["tcp", "floor", "tls", "securechan"]
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def flight_sizes(pki: pkiutil.BenchPKI) -> list[int]:
    """Bytes of each flight of one full securechan handshake on this PKI: client, server, client, server."""
    client = securechan.Connection(pki.client_config(resume=False), server_name="127.0.0.1")  # type: ignore[arg-type]
    server = securechan.Connection(pki.server_config())  # type: ignore[arg-type]
    sizes = []
    for _ in range(2):
        out = client.data_to_send()
        server.receive_data(out)
        back = server.data_to_send()
        client.receive_data(back)
        sizes += [len(out), len(back)]
    if not client.handshake_complete:
        raise RuntimeError("in-memory handshake did not complete")
    return sizes


class FloorServer(asyncio.Protocol):
    """The server's crypto and I/O of a full handshake, and nothing else."""

    def __init__(self, key: rsa.RSAPrivateKey, wrapped: bytes, peer: x25519.X25519PublicKey,
                 sizes: list[int]) -> None:
        self.key, self.wrapped, self.peer = key, wrapped, peer
        self.first, self.flight, self.second, self.reply = sizes
        self.got = 0
        self.transport: Any = None
        self.share: x25519.X25519PrivateKey | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        before, self.got = self.got, self.got + len(data)
        if before < self.first <= self.got:
            self.share = x25519.X25519PrivateKey.generate()
            self.transport.write(bytes(self.flight))
        if before < self.first + self.second <= self.got:
            assert self.share is not None
            self.key.decrypt(self.wrapped, _OAEP)
            self.share.exchange(self.peer)
            self.transport.write(bytes(self.reply))


class FloorClient(asyncio.Protocol):
    def __init__(self, sizes: list[int], done: asyncio.Future[None]) -> None:
        self.first, self.flight, self.second, self.reply = sizes
        self.done, self.got = done, 0
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.transport.write(bytes(self.first))

    def data_received(self, data: bytes) -> None:
        before, self.got = self.got, self.got + len(data)
        if before < self.flight <= self.got:
            self.transport.write(bytes(self.second))
        if before < self.flight + self.reply <= self.got and not self.done.done():
            self.done.set_result(None)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def serve(pki: pkiutil.BenchPKI, sizes: list[int]) -> None:
    """Listen for every kind, print the ports, then answer each ``cpu`` line on stdin with this process's CPU."""
    loop = asyncio.get_running_loop()
    c = Contenders(pki)
    key = serialization.load_pem_private_key(pki.key.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    wrapped = key.public_key().encrypt(os.urandom(32), _OAEP)
    peer = x25519.X25519PrivateKey.generate().public_key()
    servers = {
        "tcp": await c.listen("tcp", asyncio.Protocol),
        "tls": await c.listen("ssl", asyncio.Protocol),
        "securechan": await c.listen("securechan", asyncio.Protocol),
        "floor": await c.listen("tcp", lambda: FloorServer(key, wrapped, peer, sizes)),
    }
    print(json.dumps({k: s.sockets[0].getsockname()[1] for k, s in servers.items()}), flush=True)
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "cpu":
        print(json.dumps({"cpu": _cpu()}), flush=True)
    for s in servers.values():
        s.close()


async def _one(c: Contenders, kind: str, port: int, sizes: list[int]) -> None:
    loop = asyncio.get_running_loop()
    if kind == "floor":
        done: asyncio.Future[None] = loop.create_future()
        transport, _ = await loop.create_connection(lambda: FloorClient(sizes, done), "127.0.0.1", port)
        await done
    else:
        transport, _ = await c.connect("ssl" if kind == "tls" else kind, port, asyncio.Protocol)
    transport.close()


async def drive(args: argparse.Namespace, pki: pkiutil.BenchPKI, sizes: list[int],
                server: subprocess.Popen[str]) -> dict[str, dict[str, Any]]:
    assert server.stdin is not None and server.stdout is not None
    first = server.stdout.readline()
    if not first:
        raise SystemExit("the server process ended before it listened (its error is printed above)")
    ports = json.loads(first)
    c = Contenders(pki)

    def server_cpu() -> float:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write("cpu\n")
        server.stdin.flush()
        return float(json.loads(server.stdout.readline())["cpu"])

    kinds = args.kinds
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    rate: dict[str, list[float]] = {k: [] for k in kinds}
    for run in range(1 + args.runs):
        for kind in rotated(kinds, run):
            left = [args.count]

            async def worker(kind: str = kind, left: list[int] = left) -> None:
                while left[0] > 0:
                    left[0] -= 1
                    await _one(c, kind, ports[kind], sizes)

            before = server_cpu()
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.clients)))
            elapsed = time.perf_counter() - t0
            await asyncio.sleep(0.2)  # the server finishes its closes; they belong to this window
            spent = server_cpu() - before
            if run:
                cpu[kind].append(spent / args.count)
                rate[kind].append(args.count / elapsed)
    return {k: {"server_cpu_per_handshake": summary(cpu[k], "s"), "rate": summary(rate[k], "handshakes/s")}
            for k in kinds}


def report(results: dict[str, dict[str, Any]]) -> str:
    def ms(k: str, key: str = "median") -> float:
        return float(results[k]["server_cpu_per_handshake"][key]) * 1e3

    has_tls = "tls" in results
    header = f"{'kind':<11} {'server CPU per handshake':>30} {'handshakes/s':>14}"
    lines = [header + ("  TLS CPU / this" if has_tls else "")]
    for k in results:
        r = results[k]["rate"]
        vs_tls = f"  {ms('tls') / ms(k):14.2f}x" if has_tls else ""
        lines.append(f"{k:<11} {ms(k):8.3f} ms [{ms(k, 'min'):.3f} … {ms(k, 'max'):.3f}] {r['median']:>14,.0f}{vs_tls}")
    if {"securechan", "floor", "tls"} <= results.keys():
        lines.append(f"securechan spends {ms('securechan') - ms('floor'):.3f} ms per handshake above the floor; "
                     f"1.5x TLS's server would mean {ms('tls') / 1.5:.3f} ms in all")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="handshakes per kind and run")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--runs", type=int, default=3, help="measured runs (after one warm-up run)")
    parser.add_argument("--kinds", type=lambda v: v.split(","), default=KINDS,
                        help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the server process: its PKI folder
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if unknown := set(args.kinds) - set(KINDS):
        parser.error(f"unknown kind(s) {', '.join(sorted(unknown))}; choose from {', '.join(KINDS)}")
    raise_fd_limit()
    if args.serve:
        pin(0)
        pki = pkiutil.load(args.serve)
        run_loop(args.loop, lambda: serve(pki, json.loads(args.sizes)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        pki = pkiutil.make(Path(tmp))
        sizes = flight_sizes(pki)
        cmd = [sys.executable, "-m", "benchmarks.server_cpu", "--serve", tmp, "--sizes", json.dumps(sizes),
               "--loop", args.loop]
        with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent) as server:
            try:
                pin(1)
                results = run_loop(args.loop, lambda: drive(args, pki, sizes, server))
            finally:
                if server.stdin is not None:
                    server.stdin.close()
                server.wait(timeout=30)
    print(f"{args.count} handshakes per kind and run, {args.clients} clients, {args.runs} runs, {args.loop}; "
          f"flights {sizes} bytes")
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes, "results": results}, indent=2))


if __name__ == "__main__":
    main()
