"""CPU per request of each tunnel end under redis-benchmark, against two floors written in Python.

    python -m benchmarks.tunnel_cpu [--requests 100000] [--new-requests 10000] [--runs 3]
                                    [--contenders securechan,securechan-no-mux,spiped,stunnel,relay,aead-relay]

The tunnel figures of ``python -m benchmarks`` are rates; on two cores a rate is set by
the CPU each tunnel end spends per request, since each end shares its core with the load
generator or the service. This reads that CPU: redis-server runs on the server core, each
contender's server end beside it and its client end on the client core with
redis-benchmark, and the user and system CPU time of both ends (``/proc/<pid>/stat``) is
read before and after each load. Loads: ``PING`` with 50 clients on kept-alive
connections (``ping``), and ``PING`` with a new connection per request (``new``,
redis-benchmark ``-k 0``). Contenders take turns round by round (a warm-up round first).

The two floors are ``benchmarks.relay_floor`` processes on uvloop, with nothing of a real
tunnel but the relaying:

* ``relay``: bytes relayed as they come (what Python and the loop cost per request);
* ``aead-relay``: the same with AES-256-GCM records (one AEAD call and one write per
  message, a frame parse per read), and no handshake, key schedule, alerts or close_notify:
  a plainly written relay, not a proven minimum.

Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import pkiutil, tunnel
from .procs import ROOT, SERVER_CPU
from .stats import rotated, summary
from .tunnel import Front, Procs, free_port, pair, wait_port

LOADS = ("ping", "new")


def _floor(mode: str) -> Callable[[int, pkiutil.BenchPKI, Path], contextlib.AbstractContextManager[Front]]:
    @contextlib.contextmanager
    def run(target: int, pki: pkiutil.BenchPKI, work: Path) -> Iterator[Front]:
        mid, front = free_port(), free_port()
        base = [sys.executable, "-m", "benchmarks.relay_floor"]
        server_argv = [*base, "--listen", str(mid), "--target", str(target)]
        client_argv = [*base, "--listen", str(front), "--target", str(mid)]
        if mode == "plain":
            server_argv += ["--mode", "plain"]
            client_argv += ["--mode", "plain"]
        else:
            key = work / f"relay-floor-{target}.key"
            key.write_bytes(os.urandom(64))
            os.chmod(key, 0o600)
            server_argv += ["--mode", "open", "--key", str(key)]
            client_argv += ["--mode", "seal", "--key", str(key)]
        with pair(work, server_argv, client_argv, mid, front, cwd=ROOT) as ends:
            yield ends

    return run


FLOORS = {"relay": _floor("plain"), "aead-relay": _floor("aead")}
CONTENDERS = ("securechan", "securechan-no-mux", "spiped", "stunnel", *FLOORS)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid``, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _one(front: Front, load: str, args: argparse.Namespace) -> dict[str, float]:
    """One window of ``load`` through ``front``: its rate and each end's µs of CPU per request."""
    requests = args.requests if load == "ping" else args.new_requests
    before = {end: cpu_seconds(pid) for end, pid in front.ends.items()}
    rate = tunnel.redis_rps(front.port, requests, args.clients, keepalive=load == "ping")
    figures = {"rate": rate}
    for end, pid in front.ends.items():
        after = cpu_seconds(pid)
        figures[f"{end}_user"] = (after[0] - before[end][0]) / requests * 1e6
        figures[f"{end}_sys"] = (after[1] - before[end][1]) / requests * 1e6
    return figures


def measure(args: argparse.Namespace, work: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    available, notes = tunnel.available()
    contexts = {name: FLOORS[name] if name in FLOORS else available[name]
                for name in args.contenders if name in FLOORS or name in available}
    notes = {name: why for name, why in notes.items() if name in args.contenders}
    pki = pkiutil.make(work / "pki")
    services = Procs(work)
    values: dict[str, dict[str, dict[str, list[float]]]] = {load: {} for load in LOADS}
    try:
        redis = free_port()
        services.start(["redis-server", "--bind", "127.0.0.1", "--port", str(redis), "--save", "",
                        "--appendonly", "no", "--protected-mode", "no", "--maxclients", "10000"], SERVER_CPU)
        wait_port(redis)
        with contextlib.ExitStack() as stack:
            fronts = {}
            for name, ctx in contexts.items():
                try:
                    fronts[name] = stack.enter_context(ctx(redis, pki, work))
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    raise SystemExit(f"{name} did not start: {exc}") from None
            names = list(fronts)
            for i in range(1 + args.runs):
                for load in LOADS:
                    progress(f"{'warm-up' if i == 0 else f'round {i}/{args.runs}'}: {load}")
                    for name in rotated(names, i):
                        try:
                            figures = _one(fronts[name], load, args)
                        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                            raise SystemExit(f"{name}, {load} load: {exc}") from None
                        if i > 0:
                            for key, value in figures.items():
                                values[load].setdefault(name, {}).setdefault(key, []).append(value)
    finally:
        services.stop()
    results = {load: {name: {key: summary(vals, "req/s" if key == "rate" else "µs/request")
                             for key, vals in figures.items()}
                      for name, figures in per_name.items()}
               for load, per_name in values.items()}
    return {"results": results, "notes": notes}


def report(results: dict[str, Any]) -> str:
    lines = []
    titles = {"ping": "PING, 50 clients, kept-alive connections", "new": "PING, a new connection per request"}
    for load, per_name in results.items():
        lines.append(f"{titles[load]}:")
        lines.append(f"  {'contender':<14} {'requests/s':>22} {'vs spiped':>10}   "
                     f"{'client end: user + sys':>24}   {'server end: user + sys':>24}")
        spiped = per_name.get("spiped", {}).get("rate", {}).get("median")
        for name, figures in per_name.items():
            rate = figures["rate"]
            ratio = f"{rate['median'] / spiped:9.2f}x" if spiped else f"{'-':>10}"
            ends = []
            for end in ("client", "server"):
                user, system = figures[f"{end}_user"]["median"], figures[f"{end}_sys"]["median"]
                ends.append(f"{user:8.1f} + {system:6.1f} µs/request")
            lines.append(f"  {name:<14} {rate['median']:>9,.0f} [{rate['min']:,.0f} … {rate['max']:,.0f}] {ratio}   "
                         f"{ends[0]:>24}   {ends[1]:>24}")
        if {"securechan", "aead-relay"} <= per_name.keys():
            diffs = [s - f for end in ("client", "server")
                     for s, f in zip(per_name["securechan"][f"{end}_user"]["values"],
                                     per_name["aead-relay"][f"{end}_user"]["values"], strict=True)]
            lines.append(f"  securechan minus aead-relay, user CPU per request and end, round by round: "
                         f"{statistics.median(diffs):.1f} µs [{min(diffs):.1f} … {max(diffs):.1f}]")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="PING requests per window, kept-alive")
    parser.add_argument("--new-requests", type=int, default=10_000, help="PING requests per window, -k 0")
    parser.add_argument("--clients", type=int, default=50, help="redis-benchmark clients")
    parser.add_argument("--runs", type=int, default=3, help="measured rounds (after one warm-up round)")
    parser.add_argument("--contenders", type=lambda v: v.split(","), default=list(CONTENDERS),
                        help=f"comma-separated subset of {','.join(CONTENDERS)}")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if unknown := set(args.contenders) - set(CONTENDERS):
        parser.error(f"unknown contender(s) {', '.join(sorted(unknown))}; choose from {', '.join(CONTENDERS)}")
    if len(set(args.contenders)) != len(args.contenders):
        parser.error("each contender may be named once in --contenders")
    if min(args.requests, args.new_requests, args.clients, args.runs) < 1:
        parser.error("--requests, --new-requests, --clients and --runs must be at least 1")
    if not os.path.exists("/proc/self/stat"):
        raise SystemExit("benchmarks.tunnel_cpu reads /proc/<pid>/stat: Linux only")
    if missing := tunnel.missing_programs("redis-server", "redis-benchmark"):
        raise SystemExit(f"{' and '.join(missing)} not installed (make bench-peers)")
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(args, Path(tmp), lambda text: print(f"  {text}", file=sys.stderr, flush=True))
    for name, why in figures["notes"].items():
        print(f"{name}: skipped: {why}")
    print(f"{args.requests} kept-alive and {args.new_requests} new-connection requests per window, "
          f"{args.clients} clients, {args.runs} rounds after a warm-up; CPU medians per request and tunnel end")
    print(report(figures["results"]))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
