"""Worker processes: ``python -m benchmarks.worker '<json spec>'``; prints one JSON line.

The driver starts a server worker and a client worker, each pinned to its own core, so
the two ends of a connection never compete for one CPU. A server worker prints its ports
and serves until its stdin closes; a client worker runs one measurement and prints it.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import securechan

from . import pkiutil
from .netproto import ClientProtocol, ServerProtocol
from .stats import percentile, rotated

Factory = Callable[[], asyncio.BaseProtocol]


def pin(cpu: int | None) -> None:
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return
    if cpu in os.sched_getaffinity(0) and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {cpu})


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found")


def run_loop(loop_name: str, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


class Contenders:
    """How each contender listens and connects, over the same PKI."""

    def __init__(self, pki: pkiutil.BenchPKI, max_record_size: int | None = None) -> None:
        self.pki = pki
        kw: dict[str, Any] = {"max_record_size": max_record_size} if max_record_size else {}
        self.server_cfg: Any = pki.server_config(**kw)
        #: Full handshakes only: a client that would resume is told not to (when resumption exists).
        self.resumption = "resume" in getattr(securechan.ClientConfig, "__dataclass_fields__", {})
        self.client_cfg: Any = pki.client_config(**kw, **({"resume": False} if self.resumption else {}))
        self.resuming_cfg: Any = pki.client_config(**kw) if self.resumption else None
        self.ssl_server = pki.ssl_server_context()
        self.ssl_client = pki.ssl_client_context()
        self.resumed = 0

    async def listen(self, kind: str, factory: Factory) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        if kind == "tcp":
            return await loop.create_server(factory, "127.0.0.1", 0, backlog=4096)
        if kind == "ssl":
            return await loop.create_server(factory, "127.0.0.1", 0, ssl=self.ssl_server, backlog=4096)
        if kind == "securechan":
            return await securechan.create_server(factory, "127.0.0.1", 0, config=self.server_cfg, backlog=4096)
        raise ValueError(kind)

    async def connect(self, kind: str, port: int, factory: Factory) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        if kind == "tcp":
            return await loop.create_connection(factory, "127.0.0.1", port)
        if kind == "ssl":
            return await loop.create_connection(factory, "127.0.0.1", port, ssl=self.ssl_client,
                                                server_hostname="127.0.0.1")
        if kind == "securechan":
            return await securechan.create_connection(factory, "127.0.0.1", port, config=self.client_cfg)
        if kind == "securechan-resumed":
            transport, proto = await securechan.create_connection(factory, "127.0.0.1", port,
                                                                   config=self.resuming_cfg)
            self.resumed += bool(transport.get_extra_info("securechan").resumed)
            return transport, proto
        raise ValueError(kind)

    async def close_after_tickets(self, transports: list[Any], tickets_before: int) -> None:
        """The server's ticket follows its Finished: resumed connections stay open until the tickets
        for as many next ones arrived (as real clients that outlive their handshake would), then close.
        Called after the timed window: a handshake is over before its ticket comes."""
        stats = self.resuming_cfg.session_stats
        for _ in range(2000):
            if stats.tickets - tickets_before >= len(transports):
                break
            await asyncio.sleep(0.0005)
        for transport in transports:
            transport.close()


# -- server -------------------------------------------------------------------------------


async def serve(spec: dict[str, Any]) -> None:
    c = Contenders(pkiutil.load(Path(spec["pki"])), spec.get("record_size"))
    servers = {kind: await c.listen(kind, ServerProtocol) for kind in spec["kinds"]}
    ports = {kind: s.sockets[0].getsockname()[1] for kind, s in servers.items()}
    print(json.dumps({"pid": os.getpid(), "ports": ports}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for s in servers.values():
        s.close()


# -- client measurements ------------------------------------------------------------------


async def _open(c: Contenders, kind: str, port: int) -> ClientProtocol:
    _, proto = await c.connect(kind, port, ClientProtocol)
    return proto  # type: ignore[no-any-return]


async def bulk(spec: dict[str, Any], c: Contenders) -> dict[str, Any]:
    """Single-connection throughput, kinds interleaved run by run."""
    kinds, ports, n = spec["kinds"], spec["ports"], spec["nbytes"]
    conns = {k: await _open(c, k, ports[k]) for k in kinds}
    out: dict[str, Any] = {k: [] for k in kinds}
    info = {k: _cipher(conns[k]) for k in kinds}
    for run in range(spec["warmup"] + spec["runs"]):
        for k in rotated(kinds, run):
            t0 = time.perf_counter()
            if spec["direction"] == "up":
                await conns[k].upload(n)
            else:
                await conns[k].download(n)
            dt = time.perf_counter() - t0
            if run >= spec["warmup"]:
                out[k].append(n / dt)
    for p in conns.values():
        p.transport.close()
    return {"rates": out, "cipher": info}


def _cipher(proto: ClientProtocol) -> Any:
    cipher = proto.transport.get_extra_info("cipher")
    return list(cipher) if cipher else None


async def latency(spec: dict[str, Any], c: Contenders) -> dict[str, Any]:
    kinds, ports = spec["kinds"], spec["ports"]
    conns = {k: await _open(c, k, ports[k]) for k in kinds}
    msg = b"x" * spec["size"]
    for p in conns.values():
        p.start_echo()
    out: dict[str, Any] = {k: {"p50": [], "p99": []} for k in kinds}
    for run in range(spec["warmup"] + spec["runs"]):
        for k in rotated(kinds, run):
            samples = []
            proto = conns[k]
            for _ in range(spec["count"]):
                t0 = time.perf_counter()
                await proto.ping(msg)
                samples.append(time.perf_counter() - t0)
            if run >= spec["warmup"]:
                out[k]["p50"].append(percentile(samples, 50))
                out[k]["p99"].append(percentile(samples, 99))
    for p in conns.values():
        p.transport.close()
    return out


async def many(spec: dict[str, Any], c: Contenders) -> dict[str, Any]:
    kinds, ports, streams = spec["kinds"], spec["ports"], spec["streams"]
    per = max(1, spec["nbytes"] // streams)
    conns = {k: [await _open(c, k, ports[k]) for _ in range(streams)] for k in kinds}
    out: dict[str, Any] = {k: [] for k in kinds}
    for run in range(spec["warmup"] + spec["runs"]):
        for k in rotated(kinds, run):
            t0 = time.perf_counter()
            await asyncio.gather(*(p.upload(per) for p in conns[k]))
            dt = time.perf_counter() - t0
            if run >= spec["warmup"]:
                out[k].append(per * streams / dt)
    for ps in conns.values():
        for p in ps:
            p.transport.close()
    return out


async def memory(spec: dict[str, Any], c: Contenders) -> dict[str, Any]:
    """RSS growth of both processes per idle established connection (the server is fresh)."""
    kind, port, n, server_pid = spec["kind"], spec["port"], spec["connections"], spec["server_pid"]
    warm = [await _open(c, kind, port) for _ in range(8)]
    for p in warm:
        await p.idle()
        p.transport.close()
    await asyncio.sleep(0.3)
    gc.collect()
    server_before, client_before = rss_bytes(server_pid), rss_bytes()
    conns: list[ClientProtocol] = []
    for start in range(0, n, 50):
        batch = await asyncio.gather(*(_open(c, kind, port) for _ in range(min(50, n - start))))
        await asyncio.gather(*(p.idle() for p in batch))
        if spec.get("burst"):
            # Bulk first, then idle: the receive buffers grow, and must be given back once idle.
            await asyncio.gather(*(p.upload(spec["burst"]) for p in batch))
        conns.extend(batch)
    await asyncio.sleep(2.5 if spec.get("burst") else 1.0)
    gc.collect()
    server_after, client_after = rss_bytes(server_pid), rss_bytes()
    for p in conns:
        p.transport.close()
    await asyncio.sleep(0.2)
    return {
        "connections": len(conns),
        "server_per_conn": (server_after - server_before) / len(conns),
        "client_per_conn": (client_after - client_before) / len(conns),
    }


def handshake_count(count: int, per_client: int, concurrency: int) -> int:
    """Handshakes per run at ``concurrency`` clients (shared by them): ``count``, or ``per_client`` times
    ``concurrency`` if that is more."""
    return max(count, per_client * concurrency)


async def handshakes(spec: dict[str, Any], c: Contenders) -> dict[str, Any]:
    """Handshake rate and latency per kind and concurrency; kinds interleaved run by run."""
    kinds, ports, count = spec["kinds"], dict(spec["ports"]), spec["count"]
    if "securechan-resumed" in kinds:
        ports["securechan-resumed"] = ports["securechan"]
        await c.connect("securechan-resumed", ports["securechan"], asyncio.Protocol)  # first ticket
        c.resumed = 0
    out: dict[str, Any] = {k: {str(cc): {"rate": [], "p50": [], "p99": []} for cc in spec["concurrency"]}
                           for k in kinds}

    held: list[Any] = []  # resumed connections, open until the run's tickets arrived

    async def one(k: str, lat: list[float]) -> None:
        t0 = time.perf_counter()
        transport, _ = await c.connect(k, ports[k], asyncio.Protocol)
        lat.append(time.perf_counter() - t0)
        if k == "securechan-resumed":
            held.append(transport)
        else:
            transport.close()

    for conc in spec["concurrency"]:
        # The clients make several handshakes each per run (on average), so the figure for n clients is
        # taken with n clients busy, not mostly from their start and their tail (where fewer are left).
        n = handshake_count(count, spec.get("per_client", 1), conc)
        for run in range(spec["warmup"] + spec["runs"]):
            for k in rotated(kinds, run):
                lat: list[float] = []
                left = [n]

                async def worker(k: str = k, lat: list[float] = lat, left: list[int] = left) -> None:
                    while left[0] > 0:
                        left[0] -= 1
                        await one(k, lat)

                tickets_before = c.resuming_cfg.session_stats.tickets if k == "securechan-resumed" else 0
                t0 = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(min(conc, n))))
                dt = time.perf_counter() - t0
                if held:
                    await c.close_after_tickets(held, tickets_before)
                    held.clear()
                await asyncio.sleep(0.05)  # let the closes finish outside the timed window
                if run >= spec["warmup"]:
                    o = out[k][str(conc)]
                    o["rate"].append(n / dt)
                    o["p50"].append(percentile(lat, 50))
                    o["p99"].append(percentile(lat, 99))
    if "securechan-resumed" in kinds:
        out["resumed_count"] = c.resumed  # how many "resumed" handshakes really resumed
    return out


CLIENT_TASKS: dict[str, Callable[[dict[str, Any], Contenders], Awaitable[dict[str, Any]]]] = {
    "bulk": bulk,
    "latency": latency,
    "many": many,
    "memory": memory,
    "handshakes": handshakes,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    pin(spec.get("cpu"))
    raise_fd_limit()
    if spec["role"] == "serve":
        run_loop(spec["loop"], lambda: serve(spec))
        return

    async def client() -> dict[str, Any]:
        c = Contenders(pkiutil.load(Path(spec["pki"])), spec.get("record_size"))
        return await CLIENT_TASKS[spec["task"]](spec, c)

    print(json.dumps(run_loop(spec["loop"], client)), flush=True)


if __name__ == "__main__":
    main()
