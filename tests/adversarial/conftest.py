"""Fixtures of the adversarial suite: a recording server and a man-in-the-middle proxy in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

import securechan

from .peers import RecordingServer, start_server
from .proxy import Attack, FrameProxy


@pytest.fixture
def client_config(pki_dir) -> securechan.ClientConfig:  # type: ignore[no-untyped-def]
    """Full handshakes only (no session tickets); resumption has its own attack tests."""
    return pki_dir.client_config(resume=False)


@pytest.fixture
async def recording_server(server_config: securechan.ServerConfig) -> AsyncIterator[RecordingServer]:
    server = await start_server(server_config)
    yield server
    await server.close()


@pytest.fixture
async def mitm() -> AsyncIterator[Callable[..., Awaitable[tuple[FrameProxy, int]]]]:
    """``await mitm(upstream_port, attack)`` starts a proxy and returns (proxy, its port)."""
    proxies: list[FrameProxy] = []

    async def start(upstream_port: int, attack: Attack | None = None) -> tuple[FrameProxy, int]:
        proxy = FrameProxy(upstream_port, attack)
        proxies.append(proxy)
        return proxy, await proxy.start()

    yield start
    for proxy in proxies:
        await proxy.close()
