"""Start pinned worker processes and collect their JSON answers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU, CLIENT_CPU = 1, 0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _cmd(spec: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "benchmarks.worker", json.dumps(spec)]


def pinning_possible() -> bool:
    return hasattr(os, "sched_getaffinity") and {SERVER_CPU, CLIENT_CPU} <= os.sched_getaffinity(0)


@contextlib.contextmanager
def server(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A server worker pinned to the server core; yields its {"pid", "ports"}."""
    spec = {**spec, "role": "serve", "cpu": SERVER_CPU}
    proc = subprocess.Popen(_cmd(spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, env=_env(),
                            text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark server worker failed to start (exit code {proc.wait()})")
        yield json.loads(line)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client(spec: dict[str, Any], timeout: float = 600) -> Any:
    """Run one client measurement pinned to the client core; return its JSON answer."""
    spec = {**spec, "role": "client", "cpu": CLIENT_CPU}
    done = subprocess.run(_cmd(spec), capture_output=True, cwd=ROOT, env=_env(), text=True, timeout=timeout,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark client worker failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
