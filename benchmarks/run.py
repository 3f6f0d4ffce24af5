"""Driver: run the sections, show progress, then the ratio table, the JSON file and the plots."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import securechan
from securechan.frames import DEFAULT_RECORD_SIZE
from securechan.suites import Suite

from . import cipher, machine, pkiutil, procs, report, tunnel, worker
from .stats import summary

SECTIONS = ("cipher", "bulk", "record_size", "latency", "many", "memory", "handshakes", "tunnel")
KiB, MiB = 1024, 1024 * 1024


@dataclass(frozen=True)
class Plan:
    name: str
    runs: int
    warmup: int
    cipher_sizes: tuple[int, ...]
    cipher_suites: tuple[Suite, ...]
    cipher_volume: int
    bulk_bytes: int
    record_sizes: tuple[int, ...]
    latency_count: int
    many_bytes: int
    streams: int
    idle_connections: int
    handshake_count: int
    concurrency: tuple[int, ...]
    #: at n concurrent clients a run makes at least this many times n handshakes, shared by the clients
    handshakes_per_client: int
    loops: tuple[str, ...] = ("asyncio", "uvloop")


FULL = Plan(name="full", runs=5, warmup=1, cipher_sizes=(KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB),
            cipher_suites=tuple(Suite), cipher_volume=64 * MiB, bulk_bytes=256 * MiB,
            record_sizes=(16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, MiB), latency_count=2000,
            many_bytes=256 * MiB, streams=64, idle_connections=1000, handshake_count=300,
            concurrency=(1, 4, 8, 16, 32), handshakes_per_client=25)
QUICK = Plan(name="quick", runs=3, warmup=1, cipher_sizes=(KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB),
             cipher_suites=(Suite.AES_256_GCM,), cipher_volume=32 * MiB, bulk_bytes=64 * MiB,
             record_sizes=(16 * KiB, 64 * KiB, 256 * KiB), latency_count=500, many_bytes=64 * MiB, streams=64,
             idle_connections=1000, handshake_count=100, concurrency=(1, 32),
             handshakes_per_client=25)
#: For the smoke test: every code path, tiny sizes, meaningless numbers.
TINY = Plan(name="tiny", runs=1, warmup=1, cipher_sizes=(KiB, 64 * KiB), cipher_suites=(Suite.AES_256_GCM,),
            cipher_volume=256 * KiB, bulk_bytes=512 * KiB, record_sizes=(16 * KiB, 64 * KiB), latency_count=10,
            many_bytes=512 * KiB, streams=4, idle_connections=20, handshake_count=4, concurrency=(1, 2),
            handshakes_per_client=3)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer sizes and runs: finishes in under 2 minutes")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes (figures are meaningless)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections, from {','.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="folder for JSON and PNGs")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--record-sizes", help="record sizes in KiB for the record_size section, e.g. 16,64,256,1024")
    return p.parse_args(argv)


class Runner:
    def __init__(self, plan: Plan, pki: pkiutil.BenchPKI, work: Path, progress: Progress, task: Any) -> None:
        self.plan, self.pki, self.work = plan, pki, work
        self.progress, self.task = progress, task

    def step(self, what: str | None = None) -> None:
        self.progress.advance(self.task)
        if what:
            self.progress.update(self.task, description=what)

    def note(self, what: str) -> None:
        self.progress.update(self.task, description=what)

    def base(self, **kw: Any) -> dict[str, Any]:
        return {"pki": str(self.pki.dir), "runs": self.plan.runs, "warmup": self.plan.warmup, **kw}

    # -- sections -------------------------------------------------------------------------

    def cipher(self) -> Any:
        self.note("cipher path (no sockets)")
        p = self.plan
        return cipher.measure(self.pki, list(p.cipher_suites), list(p.cipher_sizes), p.cipher_volume, p.runs,
                              p.warmup, self.step)

    def bulk(self) -> Any:
        out: dict[str, Any] = {}
        kinds = ["tcp", "ssl", "securechan"]
        for loop in self.plan.loops:
            with procs.server(self.base(loop=loop, kinds=kinds)) as srv:
                for direction in ("up", "down"):
                    self.note(f"one connection, {loop}, {'client→server' if direction == 'up' else 'server→client'}")
                    got = procs.client(self.base(task="bulk", loop=loop, kinds=kinds, ports=srv["ports"],
                                                 direction=direction, nbytes=self.plan.bulk_bytes))
                    out.setdefault(loop, {})[direction] = {k: summary(v, "B/s") for k, v in got["rates"].items()}
                    out.setdefault("negotiated", {})[loop] = got["cipher"]
                    self.step()
        return out

    def record_size(self) -> Any:
        out: dict[str, Any] = {}
        for size in self.plan.record_sizes:
            self.note(f"record size {size // KiB} KiB (uvloop, client→server)")
            with procs.server(self.base(loop="uvloop", kinds=["securechan"], record_size=size)) as srv:
                got = procs.client(self.base(task="bulk", loop="uvloop", kinds=["securechan"], ports=srv["ports"],
                                             direction="up", nbytes=self.plan.bulk_bytes, record_size=size))
            out[str(size)] = summary(got["rates"]["securechan"], "B/s")
            self.step()
        return out

    def latency(self) -> Any:
        out: dict[str, Any] = {}
        kinds = ["tcp", "ssl", "securechan"]
        for loop in self.plan.loops:
            self.note(f"round-trip latency, 64-byte messages, {loop}")
            with procs.server(self.base(loop=loop, kinds=kinds)) as srv:
                got = procs.client(self.base(task="latency", loop=loop, kinds=kinds, ports=srv["ports"], size=64,
                                             count=self.plan.latency_count))
            out[loop] = {k: {q: summary(v[q], "s") for q in ("p50", "p99")} for k, v in got.items()}
            self.step()
        return out

    def many(self) -> Any:
        kinds = ["tcp", "ssl", "securechan"]
        self.note(f"{self.plan.streams} concurrent streams (uvloop)")
        with procs.server(self.base(loop="uvloop", kinds=kinds)) as srv:
            got = procs.client(self.base(task="many", loop="uvloop", kinds=kinds, ports=srv["ports"],
                                         streams=self.plan.streams, nbytes=self.plan.many_bytes))
        self.step()
        return {"streams": self.plan.streams, "uvloop": {k: summary(v, "B/s") for k, v in got.items()}}

    def memory(self) -> Any:
        out: dict[str, Any] = {"connections": self.plan.idle_connections}
        for kind in ("tcp", "ssl", "securechan"):
            self.note(f"memory: {self.plan.idle_connections} idle {kind} connections (asyncio)")
            with procs.server(self.base(loop="asyncio", kinds=[kind])) as srv:
                out[kind] = procs.client(self.base(task="memory", loop="asyncio", kind=kind,
                                                   port=srv["ports"][kind], server_pid=srv["pid"],
                                                   connections=self.plan.idle_connections))
            self.step()
        self.note(f"memory: {self.plan.idle_connections} securechan connections idle after a 256 KiB upload each")
        with procs.server(self.base(loop="asyncio", kinds=["securechan"])) as srv:
            out["securechan_after_burst"] = procs.client(self.base(
                task="memory", loop="asyncio", kind="securechan", port=srv["ports"]["securechan"],
                server_pid=srv["pid"], connections=self.plan.idle_connections, burst=256 * KiB))
        self.step()
        return out

    def handshakes(self) -> Any:
        resumption = "tickets" in getattr(securechan.ServerConfig, "__dataclass_fields__", {})
        kinds = ["ssl", "securechan", *(["securechan-resumed"] if resumption else [])]
        self.note("handshakes (uvloop)")
        with procs.server(self.base(loop="uvloop", kinds=["ssl", "securechan"])) as srv:
            got = procs.client(self.base(task="handshakes", loop="uvloop", kinds=kinds, ports=srv["ports"],
                                         count=self.plan.handshake_count, concurrency=list(self.plan.concurrency),
                                         per_client=self.plan.handshakes_per_client))
        self.step()
        counts = {c: worker.handshake_count(self.plan.handshake_count, self.plan.handshakes_per_client, c)
                  for c in self.plan.concurrency}
        out: dict[str, Any] = {"count_per_run": {str(c): n for c, n in counts.items()}}
        resumed_count = got.pop("resumed_count", None)
        for k, per in got.items():
            out[k] = {c: {"rate": summary(v["rate"], "handshakes/s"), "p50": summary(v["p50"], "s"),
                          "p99": summary(v["p99"], "s")} for c, v in per.items()}
        if resumption:
            attempted = sum(counts.values()) * (self.plan.runs + self.plan.warmup)
            out["resumed"] = {"note": f"{resumed_count} of {attempted} 'securechan-resumed' handshakes resumed; "
                                      "TLS resumption is not measured (asyncio cannot pass an SSLSession)"}
        else:
            out["resumed"] = {"note": "resumption is not available in this securechan yet (no ServerConfig.tickets)"}
        return out

    def tunnel(self) -> Any:
        tiny = self.plan.name == "tiny"
        runs, warmup = (1, 0) if tiny else (self.plan.runs if self.plan.name == "full" else 2, 1)
        res = tunnel.measure(self.pki, self.work, quick=self.plan.name != "full", runs=runs, warmup=warmup,
                             progress=self.note, tiny=tiny)
        self.step()
        return res


def steps(plan: Plan, sections: list[str]) -> int:
    per = {"cipher": len(plan.cipher_sizes) * len(plan.cipher_suites), "bulk": 2 * len(plan.loops),
           "record_size": len(plan.record_sizes), "latency": len(plan.loops), "many": 1, "memory": 4,
           "handshakes": 1, "tunnel": 1}
    return sum(per[s] for s in sections)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: stop every worker and peer program


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    args = parse_args(argv)
    plan = TINY if args.tiny else QUICK if args.quick else FULL
    if args.record_sizes:
        plan = dataclasses.replace(plan, record_sizes=tuple(int(k) * KiB for k in args.record_sizes.split(",")))
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    console = Console()
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": "tiny" if args.tiny else "quick" if args.quick else "full",
        "machine": machine.describe(),
        "pinned": procs.pinning_possible(),
        "default_record_size": DEFAULT_RECORD_SIZE,
        "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.__dict__.items()},
    }
    results["plan"]["cipher_suites"] = [s.label for s in plan.cipher_suites]
    if not results["pinned"]:
        console.print("[yellow]note: fewer than 2 usable cores; client and server are not pinned apart")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="securechan-bench-") as tmp:
        work = Path(tmp)
        pki = pkiutil.make(work / "pki")
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("starting", total=steps(plan, sections))
            runner = Runner(plan, pki, work, progress, task)
            for section in sections:
                fn: Callable[[], Any] = getattr(runner, section)
                results[section] = fn()
        progress.update(task, description="done")
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / f"bench-{results['mode']}-{stamp}.json"
    rows = report.ratio_rows(results)
    results["ratios"] = rows
    path.write_text(json.dumps(results, indent=1))
    report.print_tables(console, results, rows)
    if not args.no_plots:
        for png in report.plots(results, args.out, stamp):
            console.print(f"plot: {png}")
    console.print(f"results: {path}  ({results['elapsed_s']} s)")
    return 0
