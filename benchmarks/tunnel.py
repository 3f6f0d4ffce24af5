"""The tunnel against direct, stunnel (TLS 1.3) and spiped: iperf3 and redis-benchmark through each.

Each contender is a client-side listener that forwards to a server-side listener that
forwards to the real service (iperf3 or redis-server). The client-side programs (the
load generator and the tunnel's client end) run on one core, the server-side programs
(the tunnel's server end and the service) on the other. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from .pkiutil import BenchPKI
from .procs import CLIENT_CPU, ROOT, SERVER_CPU
from .stats import rotated, summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """True when a socket listens on ``port``, read from /proc/net/tcp so nothing connects to it.

    (A probe connection would travel through a tunnel to the service: iperf3, which serves
    one test at a time, then refuses the real client.)
    """
    try:
        with open("/proc/net/tcp") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    return any(r.split()[1].endswith(f":{port:04X}") and r.split()[3] == "0A" for r in rows)


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s")


def _pinned(cpu: int) -> Callable[[], None]:
    def pre() -> None:
        if hasattr(os, "sched_setaffinity") and cpu in os.sched_getaffinity(0):
            os.sched_setaffinity(0, {cpu})

    return pre


class Procs:
    """Background programs started for one contender; all stopped on exit.

    Their output goes to log files in ``logdir`` (an unread pipe would fill up and stall
    a program that logs each connection).
    """

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], cpu: int, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        name = Path(argv[0]).name if argv[0] != sys.executable else "-".join(argv[2:4])
        with open(self.logdir / f"{name}-{len(self.procs)}.log", "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=_pinned(cpu), cwd=cwd)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- availability -------------------------------------------------------------------------


def securechan_tunnel_missing() -> str | None:
    """None when the ``securechan server``/``client`` commands exist, else why not."""
    for cmd in ("server", "client"):
        done = subprocess.run([sys.executable, "-m", "securechan", cmd, "--help"], capture_output=True, text=True,
                              cwd=ROOT, check=False)
        if done.returncode != 0:
            return f"'securechan {cmd}' is not available yet ({done.stderr.strip().splitlines()[-1:] or 'no output'})"
    return None


def missing_programs(*names: str) -> list[str]:
    return [n for n in names if shutil.which(n) is None]


# -- contenders: each yields the client-side port that reaches ``target`` ----------------


class Front(NamedTuple):
    """Where a contender takes connections, and the pids of its two ends (none for ``direct``)."""

    port: int
    ends: dict[str, int]


@contextlib.contextmanager
def pair(work: Path, server_argv: list[str], client_argv: list[str], mid: int, front: int,
         cwd: Path | None = None) -> Iterator[Front]:
    """Run a tunnel's server end (pinned to the server core) and client end (client core)."""
    procs = Procs(work)
    try:
        server = procs.start(server_argv, SERVER_CPU, cwd=cwd)
        client = procs.start(client_argv, CLIENT_CPU, cwd=cwd)
        wait_port(mid)
        wait_port(front)
        yield Front(front, {"client": client.pid, "server": server.pid})
    finally:
        procs.stop()


@contextlib.contextmanager
def direct(target: int, pki: BenchPKI, work: Path) -> Iterator[Front]:
    yield Front(target, {})


@contextlib.contextmanager
def stunnel(target: int, pki: BenchPKI, work: Path) -> Iterator[Front]:
    exe = shutil.which("stunnel4") or shutil.which("stunnel")
    assert exe is not None
    mid, front = free_port(), free_port()
    common = "foreground = yes\npid =\nsyslog = no\ndebug = 3\nsslVersionMin = TLSv1.3\n" \
             "ciphersuites = TLS_AES_256_GCM_SHA384\n"
    server_conf, client_conf = work / f"stunnel-server-{target}.conf", work / f"stunnel-client-{target}.conf"
    server_conf.write_text(
        common + f"[srv]\naccept = 127.0.0.1:{mid}\nconnect = 127.0.0.1:{target}\ncert = {pki.combined}\n")
    client_conf.write_text(
        common + f"client = yes\n[cli]\naccept = 127.0.0.1:{front}\nconnect = 127.0.0.1:{mid}\n"
        f"CAfile = {pki.ca}\nverifyChain = yes\ncheckIP = 127.0.0.1\n")
    with pair(work, [exe, str(server_conf)], [exe, str(client_conf)], mid, front) as ends:
        yield ends


@contextlib.contextmanager
def spiped(target: int, pki: BenchPKI, work: Path) -> Iterator[Front]:
    key = work / f"spiped-{target}.key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o600)
    mid, front = free_port(), free_port()
    with pair(work,
              ["spiped", "-d", "-F", "-n", "0", "-s", f"[127.0.0.1]:{mid}", "-t", f"[127.0.0.1]:{target}",
               "-k", str(key)],
              ["spiped", "-e", "-F", "-n", "0", "-s", f"[127.0.0.1]:{front}", "-t", f"[127.0.0.1]:{mid}",
               "-k", str(key)], mid, front) as ends:
        yield ends


@contextlib.contextmanager
def securechan_tunnel(target: int, pki: BenchPKI, work: Path, *, no_mux: bool = False) -> Iterator[Front]:
    """A securechan tunnel pair: the client tunnel carries every connection over one securechan connection
    (the default), or, with ``no_mux``, makes one per connection (``--no-mux``)."""
    mid, front = free_port(), free_port()
    sc = [sys.executable, "-m", "securechan"]
    server_argv = [*sc, "server", "--listen", f"127.0.0.1:{mid}", "--target", f"127.0.0.1:{target}",
                   "--cert", str(pki.cert), "--key", str(pki.key)]
    client_argv = [*sc, "client", "--listen", f"127.0.0.1:{front}", "--target", f"127.0.0.1:{mid}",
                   "--cafile", str(pki.ca), "--server-name", "127.0.0.1", *(["--no-mux"] if no_mux else [])]
    with pair(work, server_argv, client_argv, mid, front, cwd=ROOT) as ends:
        yield ends


CONTENDERS = {"direct": direct, "stunnel": stunnel, "spiped": spiped, "securechan": securechan_tunnel,
              "securechan-no-mux": functools.partial(securechan_tunnel, no_mux=True)}


def available() -> tuple[dict[str, Any], dict[str, str]]:
    """The contenders that can run here, and a note for each that cannot."""
    ok: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for name, ctx in CONTENDERS.items():
        if name == "stunnel" and missing_programs("stunnel4") and missing_programs("stunnel"):
            notes[name] = "stunnel4 not installed (make bench-peers)"
        elif name == "spiped" and missing_programs("spiped"):
            notes[name] = "spiped not installed (make bench-peers)"
        elif name.startswith("securechan") and (why := securechan_tunnel_missing()):
            notes[name] = why
        else:
            ok[name] = ctx
    return ok, notes


# -- loads --------------------------------------------------------------------------------


def iperf3(port: int, seconds: float) -> float:
    done = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", f"{seconds:g}", "-J"],
                          capture_output=True, text=True, timeout=seconds + 30, preexec_fn=_pinned(CLIENT_CPU),
                          check=False)
    data = json.loads(done.stdout or "{}")
    if "error" in data or done.returncode != 0:
        raise RuntimeError(f"iperf3 failed: {data.get('error') or done.stderr.strip()}")
    return float(data["end"]["sum_received"]["bits_per_second"])


def redis_rps(port: int, requests: int, clients: int, keepalive: bool) -> float:
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "ping_mbulk", "-n", str(requests),
            "-c", str(clients), "-q", "--csv"]
    if not keepalive:
        argv += ["-k", "0"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60 + requests / 100,
                          preexec_fn=_pinned(CLIENT_CPU), check=False)
    for line in done.stdout.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells and cells[0].startswith("PING") and len(cells) > 1:
            return float(cells[1])
    raise RuntimeError(f"redis-benchmark gave no PING figure: {done.stdout.strip()} {done.stderr.strip()}")


def _interleaved(contenders: dict[str, Any], target: int, pki: BenchPKI, work: Path, count: int, warmup: int,
                 notes: dict[str, str], load: Callable[[int], float], unit: str,
                 progress: Callable[[int], None]) -> dict[str, Any]:
    """Run ``load`` through every contender at once, round by round, the order rotating each round.

    All contenders for ``target`` are started before the first round, so load from elsewhere
    on the machine, and the TIME_WAIT sockets earlier rounds leave, fall on all of them alike.
    Each contender's first ``warmup`` rounds are not counted.
    """
    values: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        ports: dict[str, int] = {}
        for name, ctx in contenders.items():
            try:
                ports[name] = stack.enter_context(ctx(target, pki, work)).port
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                notes[name] = f"failed to start: {exc}"
        names = list(ports)
        for i in range(count):
            progress(i + 1)
            for name in rotated(names, i):
                if name not in ports:
                    continue  # failed in an earlier round
                try:
                    value = load(ports[name])
                except subprocess.TimeoutExpired as exc:
                    notes[name] = f"failed: {Path(exc.cmd[0]).name} did not finish within {exc.timeout:g} s"
                    del ports[name]
                    continue
                except (RuntimeError, subprocess.SubprocessError, OSError, KeyError, ValueError) as exc:
                    notes[name] = f"failed: {exc}"
                    del ports[name]
                    continue
                if i >= warmup:
                    values.setdefault(name, []).append(value)
    return {name: summary(vals, unit) for name, vals in values.items() if name in ports}


def _rounds(progress: Callable[[str], None], title: str, count: int) -> Callable[[int], None]:
    return lambda i: progress(f"tunnel: {title}, round {i}/{count}")


def measure(pki: BenchPKI, work: Path, quick: bool, runs: int, warmup: int,
            progress: Callable[[str], None], tiny: bool = False) -> dict[str, Any]:
    contenders, notes = available()
    results: dict[str, Any] = {"notes": dict(notes), "iperf3": {}, "redis_ping_c50": {}, "redis_new_conn": {}}
    services = Procs(work)
    try:
        have_iperf = not missing_programs("iperf3")
        have_redis = not missing_programs("redis-server", "redis-benchmark")
        if not have_iperf:
            results["notes"]["iperf3"] = "iperf3 not installed (make bench-peers)"
        if not have_redis:
            results["notes"]["redis"] = "redis-server/redis-benchmark not installed (make bench-peers)"
        iperf_port, redis_port = free_port(), free_port()
        if have_iperf:
            services.start(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)], SERVER_CPU)
            wait_port(iperf_port)
        if have_redis:
            services.start(["redis-server", "--bind", "127.0.0.1", "--port", str(redis_port), "--save", "",
                            "--appendonly", "no", "--protected-mode", "no", "--maxclients", "10000"], SERVER_CPU)
            wait_port(redis_port)
        seconds = 1.0 if tiny or quick else 3.0
        requests = 500 if tiny else 10_000 if quick else 50_000
        new_conn_requests = 100 if tiny else 500 if quick else 2_000
        count = warmup + runs
        if have_iperf:
            results["iperf3"] = _interleaved(
                contenders, iperf_port, pki, work, count, warmup, results["notes"],
                lambda port: iperf3(port, seconds), "bit/s", _rounds(progress, "iperf3", count))
        if have_redis:
            loads = {
                "redis_ping_c50": (lambda port: redis_rps(port, requests, 50, True), "req/s", "redis PING"),
                "redis_new_conn": (lambda port: redis_rps(port, new_conn_requests, 50, False), "conn/s",
                                   "redis new connections"),
            }
            for key, (load, unit, title) in loads.items():
                results[key] = _interleaved(contenders, redis_port, pki, work, count, warmup, results["notes"],
                                            load, unit, _rounds(progress, title, count))
    finally:
        services.stop()
    return results
