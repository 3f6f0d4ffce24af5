"""Unmodified real programs through a client tunnel and a server tunnel: redis-server/redis-cli, http.server/curl."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import sys
from collections.abc import AsyncIterator

import pytest
from tunnelkit import free_port, no_connections, pair, until

pytestmark = pytest.mark.timeout(120)


async def wait_listening(port: int, proc: asyncio.subprocess.Process) -> None:
    for _ in range(500):
        if proc.returncode is not None:
            raise AssertionError(f"the service exited with code {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.asynccontextmanager
async def service(*argv: str, port: int, cwd: str | None = None) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_listening(port, proc)
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
        await proc.wait()


async def run(*argv: str, stdin: bytes | None = None) -> bytes:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(stdin)
    assert proc.returncode == 0, f"{argv[0]} failed ({proc.returncode}): {err.decode(errors='replace')}"
    return out


@pytest.mark.skipif(not shutil.which("redis-server") or not shutil.which("redis-cli"),
                    reason="redis-server/redis-tools not installed (.ci/run installs them)")
async def test_redis_set_get_and_pipeline_through_tunnels(pki_dir, via, tmp_path) -> None:
    port = free_port()
    async with service("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no", "--dir", str(tmp_path), port=port), \
            pair(pki_dir, f"127.0.0.1:{port}") as (srv, cli):
        cp = str(cli.port)
        assert await run("redis-cli", "-h", "127.0.0.1", "-p", cp, "SET", "greeting", "hello tunnel") == b"OK\n"
        assert await run("redis-cli", "-h", "127.0.0.1", "-p", cp, "GET", "greeting") == b"hello tunnel\n"
        # A real pipeline: 1000 commands written at once, replies read afterwards.
        commands = b"".join(
            b"*3\r\n$5\r\nRPUSH\r\n$4\r\nlist\r\n$%d\r\n%s\r\n" % (len(str(i)), str(i).encode()) for i in range(1000)
        )
        out = await run("redis-cli", "-h", "127.0.0.1", "-p", cp, "--pipe", stdin=commands)
        assert b"errors: 0, replies: 1000" in out
        assert await run("redis-cli", "-h", "127.0.0.1", "-p", cp, "LLEN", "list") == b"1000\n"
        assert await run("redis-cli", "-h", "127.0.0.1", "-p", cp, "LINDEX", "list", "999") == b"999\n"
        await until(lambda: no_connections(srv, cli))
        assert cli.completed == srv.completed == 5


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed (.ci/run installs it)")
async def test_http_50mb_download_checksum(pki_dir, via, tmp_path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    blob = www / "blob.bin"
    digest = hashlib.sha256()
    with blob.open("wb") as f:
        block = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB, varied content
        for i in range(50):
            chunk = i.to_bytes(4, "big") + block[4:]
            f.write(chunk)
            digest.update(chunk)
    port = free_port()
    async with service(sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(www),
                       str(port), port=port), pair(pki_dir, f"127.0.0.1:{port}") as (srv, cli):
        out = tmp_path / "downloaded.bin"
        await run("curl", "--silent", "--show-error", "--fail", "--max-time", "100", "-o", str(out),
                  f"http://127.0.0.1:{cli.port}/blob.bin")
        assert out.stat().st_size == 50 * 1024 * 1024
        got = hashlib.sha256()
        with out.open("rb") as f:
            while data := f.read(1 << 20):
                got.update(data)
        assert got.hexdigest() == digest.hexdigest()
