"""Running tunnels as a service: start, signals (SIGTERM/SIGINT drain, SIGHUP reload), exit codes, workers.

Exit codes (also in ``securechan server --help`` and the README):

* 0 — stopped by SIGTERM/SIGINT; open connections drained or, at the deadline, cut
* 1 — a runtime failure (a worker died, an unexpected error)
* 2 — bad command line
* 3 — bad configuration: config file, certificate, key or CA file
* 4 — cannot listen: address in use, permission denied, address not on this machine
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from ..errors import ConfigError, ListenError
from .service import Tunnel
from .spec import TunnelSpec

log = logging.getLogger("securechan.tunnel")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_LISTEN = 4

EXIT_CODES_HELP = """\
exit codes:
  0  stopped by SIGTERM/SIGINT (open connections drained, or cut at --drain-timeout)
  1  runtime failure (a worker process died, an unexpected error)
  2  bad command line
  3  bad configuration (config file, certificate, key or CA file)
  4  cannot listen (address in use, permission denied, address not on this machine)

signals: SIGTERM/SIGINT stop accepting and drain (a second one cuts at once);
SIGHUP re-reads certificate, key and CA files for new connections."""

DEFAULT_DRAIN_TIMEOUT = 30.0


async def serve(
    specs: Sequence[TunnelSpec],
    *,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    reuse_port: bool = False,
    parent_pid: int | None = None,
) -> int:
    """Run ``specs`` until SIGTERM/SIGINT. Raises ConfigError / ListenError before serving."""
    tunnels = [Tunnel(spec, reuse_port=reuse_port) for spec in specs]
    started: list[Tunnel] = []
    try:
        for tunnel in tunnels:
            await tunnel.start()
            started.append(tunnel)
    except BaseException:
        for tunnel in started:
            await tunnel.close(0)
        raise
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    why: list[str] = []

    def on_stop(signame: str) -> None:
        if stopping.is_set():
            log.warning("%s again: cutting open connections now", signame)
            for tunnel in tunnels:
                tunnel.hurry()
            return
        why.append(signame)
        stopping.set()

    def on_reload() -> None:
        for tunnel in tunnels:
            try:
                tunnel.reload()
            except ConfigError as exc:
                log.error("tunnel %r: reload failed, keeping the current certificates: %s", tunnel.spec.title, exc)

    handled = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig.name)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    watchdog = asyncio.ensure_future(_watch_parent(parent_pid, on_stop)) if parent_pid else None
    log.info("ready: %d tunnel%s (pid %d)", len(tunnels), "" if len(tunnels) == 1 else "s", os.getpid())
    try:
        await stopping.wait()
        for tunnel in tunnels:
            tunnel.stop_accepting()
        await asyncio.sleep(0)  # let the listening sockets close before saying so
        open_now = sum(t.active for t in tunnels)
        log.info("shutting down (%s): not accepting; %d connection%s open, waiting up to %g s",
                 why[0], open_now, "" if open_now == 1 else "s", drain_timeout)
        await asyncio.gather(*(t.wait_drained(drain_timeout) for t in tunnels))
        # Counted for all tunnels before any is cut: cutting one tunnel's relays ends the relays
        # that another tunnel of this process carries for the same connections.
        still_open = [t.open_count for t in tunnels]
        reasons = [t.cut_reason(drain_timeout) for t in tunnels]
        await asyncio.gather(*(t.cut_open(r) for t, r in zip(tunnels, reasons, strict=True)))
        cut = sum(still_open)
        for tunnel in tunnels:
            await tunnel.close(0)
    finally:
        for tunnel in tunnels:  # a no-op after a drain; after an error, nothing open may end looking clean
            tunnel.cut_now("the tunnel process stopped")
        if watchdog is not None:
            watchdog.cancel()
        for sig in handled:
            loop.remove_signal_handler(sig)
    served = sum(t.completed for t in tunnels)
    log.info("stopped: %d connection%s relayed, %d cut at the drain deadline", served,
             "" if served == 1 else "s", cut)
    return EXIT_OK


async def _watch_parent(parent_pid: int, on_stop: Callable[[str], None]) -> None:
    """A worker stops when its supervisor is gone (it was killed without forwarding a signal)."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(1)
    on_stop("supervisor exited")


def run(specs: Sequence[TunnelSpec], *, workers: int = 1, drain_timeout: float = DEFAULT_DRAIN_TIMEOUT) -> int:
    """Run in this process (``workers == 1``) or in ``workers`` forked processes sharing the port."""
    from ..cli import run_async

    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    for spec in specs:
        # Check every option and read every file once, before forking.
        try:
            Tunnel(spec)
        except ConfigError as exc:
            raise ConfigError(f"tunnel {spec.title!r}: {exc}") from None
        if workers > 1 and (spec.listen.is_unix or spec.listen.port == 0):
            raise ConfigError(f"tunnel {spec.title!r}: --workers {workers} shares the listening port through "
                              "SO_REUSEPORT, which needs a fixed TCP port (not port 0 or a Unix socket)")
    if workers == 1:
        return _guarded(lambda: run_async(lambda: serve(specs, drain_timeout=drain_timeout)))
    return _supervise(workers, lambda parent: _guarded(lambda: run_async(
        lambda: serve(specs, drain_timeout=drain_timeout, reuse_port=True, parent_pid=parent))))


def _guarded(body: Callable[[], int]) -> int:
    try:
        return body()
    except ConfigError as exc:
        _say_error(exc)
        return EXIT_CONFIG
    except ListenError as exc:
        _say_error(exc)
        return EXIT_LISTEN


def _say_error(exc: Exception) -> None:
    # One write for the whole line: workers share the supervisor's stderr, and a line must not be split.
    sys.stderr.write(f"securechan: error: {exc}\n")
    sys.stderr.flush()


def _supervise(workers: int, child: Callable[[int], int]) -> int:
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pids: list[int] = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker
            code = EXIT_FAILURE
            try:
                os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only, which forwards it once
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                code = child(parent)
            except BaseException:
                logging.getLogger("securechan.tunnel").exception("worker %d failed", os.getpid())
            finally:
                logging.shutdown()
                sys.stdout.flush()  # os._exit skips the interpreter's own flushing
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    log.info("supervisor %d: started %d workers sharing the port (SO_REUSEPORT): %s", parent, workers,
             " ".join(map(str, pids)))
    alive = set(pids)
    stopping = False

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = stopping or sig in (signal.SIGTERM, signal.SIGINT)
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    worst = EXIT_OK
    while alive:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid not in alive:
            continue
        alive.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        code = EXIT_FAILURE if code < 0 else code
        if code != EXIT_OK or not stopping:
            if not stopping:
                log.error("worker %d exited with code %d; stopping the other workers", pid, code)
                stopping = True
                for other in alive:
                    os.kill(other, signal.SIGTERM)
            worst = max(worst, code if code != EXIT_OK else EXIT_FAILURE)
    return worst
