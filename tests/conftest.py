"""Shared fixtures: a throwaway PKI written to a temp folder, configs built from it, and the tunnel log."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import securechan
from securechan import pki


@dataclass
class PKI:
    dir: Path
    ca: tuple  # (cert, key)
    ca_file: Path
    server_cert: Path
    server_key: Path

    def write(self, name: str, cert, key, *chain) -> tuple[Path, Path]:
        crt, k = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        crt.write_bytes(pki.cert_pem(cert, *chain))
        k.write_bytes(pki.key_pem(key))
        os.chmod(k, 0o600)
        return crt, k

    def issue(self, name: str, *, ca=None, chain=(), **kw) -> tuple[Path, Path]:
        cert, key = pki.issue_cert(ca or self.ca, name, **kw)
        return self.write(f"{name}-{len(list(self.dir.iterdir()))}", cert, key, *chain)

    def server_config(self, **kw) -> securechan.ServerConfig:
        return securechan.ServerConfig(certfile=self.server_cert, keyfile=self.server_key, **kw)

    def client_config(self, **kw) -> securechan.ClientConfig:
        return securechan.ClientConfig(cafile=self.ca_file, **kw)


#: Test modules whose every test runs on both event loops.
BOTH_LOOPS = {"test_streams", "test_tunnel_relay", "test_tunnel_attacks"}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object] | None:
    factories: dict[str, object] = {"asyncio": asyncio.new_event_loop}
    if item.module is None or item.module.__name__.rsplit(".", 1)[-1] not in BOTH_LOOPS:
        return factories  # pytest-asyncio 1.5 refuses None: one factory keeps test names unchanged
    try:
        import uvloop
    except ImportError:
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories


@pytest.fixture
def tunnel_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The tunnels' log lines, debug level included, in ``caplog``."""
    caplog.set_level(logging.DEBUG, logger="securechan.tunnel")
    return caplog


@pytest.fixture(params=[False, True], ids=["per-connection", "mux"])
def via(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a tunnel test twice: one securechan connection per connection (``--no-mux``), and all over one
    (the default)."""
    import tunnelkit

    monkeypatch.setattr(tunnelkit, "MUX", request.param)
    return bool(request.param)


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    d = tmp_path_factory.mktemp("pki")
    ca = pki.make_ca("Test Root CA", not_before=utcnow() - datetime.timedelta(days=365), days=3650)
    (d / "ca.crt").write_bytes(pki.cert_pem(ca[0]))
    cert, key = pki.issue_cert(ca, "localhost", ips=["127.0.0.1", "::1"])
    p = PKI(d, ca, d / "ca.crt", d / "server.crt", d / "server.key")
    p.write("server", cert, key)
    return p


@pytest.fixture
def server_config(pki_dir: PKI) -> securechan.ServerConfig:
    return pki_dir.server_config()


@pytest.fixture
def client_config(pki_dir: PKI) -> securechan.ClientConfig:
    return pki_dir.client_config()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[tuple[asyncio.Server, int]]]]:
    """Start securechan servers on 127.0.0.1:<ephemeral>; all are closed after the test."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler, config: securechan.ServerConfig, **kw: object) -> tuple[asyncio.Server, int]:
        server = await securechan.start_server(handler, "127.0.0.1", 0, config=config, **kw)
        servers.append(server)
        return server, server.sockets[0].getsockname()[1]

    yield start
    for s in servers:
        s.close()
    # Let connection handlers finish, then cancel stragglers so none outlive the loop.
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if others:
        _, pending = await asyncio.wait(others, timeout=2)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for s in servers:
        await s.wait_closed()


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
