"""``securechan demo`` (``make demo``): a throwaway PKI, a server, a client, data both ways, a report."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from . import pki
from .certs import describe, format_pin, spki_sha256
from .config import ClientConfig, ServerConfig
from .streams import open_connection, start_server


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run a self-contained demo: CA, server, client, data both ways")
    p.add_argument("--megabytes", type=_megabytes, default=256, help="MiB to move each way (default 256)")
    p.set_defaults(func=_run)


def _megabytes(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of MiB, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run(args: argparse.Namespace) -> int:
    from .cli import run_async

    return run_async(lambda: demo(args.megabytes))


async def demo(megabytes: int = 256) -> int:
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    with tempfile.TemporaryDirectory(prefix="securechan-demo-") as tmp:
        d = Path(tmp)
        t0 = time.perf_counter()
        ca = pki.make_ca("securechan demo CA")
        cert, key = pki.issue_cert(ca, "localhost", ips=["127.0.0.1"])
        (d / "ca.crt").write_bytes(pki.cert_pem(ca[0]))
        (d / "server.crt").write_bytes(pki.cert_pem(cert))
        (d / "server.key").write_bytes(pki.key_pem(key))
        os.chmod(d / "server.key", 0o600)
        print(
            f"1. made a throwaway CA and an RSA-2048 server certificate for localhost/127.0.0.1 "
            f"({(time.perf_counter() - t0) * 1000:.0f} ms) in {d}"
        )

        size = megabytes * 1024 * 1024
        chunk = os.urandom(1 << 20)
        server_got: dict[str, Any] = {}

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            digest, n = hashlib.sha256(), 0
            while data := await reader.read(1 << 20):
                digest.update(data)
                n += len(data)
            server_got.update(n=n, sha=digest.hexdigest())
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
            writer.close()

        server = await start_server(
            handle, "127.0.0.1", 0, config=ServerConfig(certfile=d / "server.crt", keyfile=d / "server.key")
        )
        port = server.sockets[0].getsockname()[1]
        print(f"2. securechan server listening on 127.0.0.1:{port} (event loop: {loop_name})")
        async with server:
            t0 = time.perf_counter()
            reader, writer = await open_connection("127.0.0.1", port, config=ClientConfig(cafile=d / "ca.crt"))
            hs_ms = (time.perf_counter() - t0) * 1000
            info = writer.get_extra_info("securechan")
            peer = writer.get_extra_info("peercert")
            print(f"3. client connected and verified the server against the CA in {hs_ms:.1f} ms")
            print(f"   protocol version : securechan/{info.version}")
            print(f"   cipher suite     : {info.suite} (key wrap RSA-OAEP-SHA256, X25519 forward secrecy)")
            print(f"   peer certificate : CN/SAN {describe(peer)!r}, issued by {peer.issuer.rfc4514_string()!r}")
            print(
                f"                      valid until {peer.not_valid_after_utc:%Y-%m-%d}, "
                f"pin {format_pin(spki_sha256(peer))}"
            )
            print(f"   record size      : {info.max_record_size} bytes")

            sent = hashlib.sha256()
            t0 = time.perf_counter()
            for _ in range(size // len(chunk)):
                writer.write(chunk)
                sent.update(chunk)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
            got, n = hashlib.sha256(), 0
            t_up = time.perf_counter() - t0
            t1 = time.perf_counter()
            while data := await reader.read(1 << 20):
                got.update(data)
                n += len(data)
            t_down = time.perf_counter() - t1
            writer.close()
            await writer.wait_closed()
        up_ok = server_got.get("sha") == sent.hexdigest()
        down_ok = n == size and got.hexdigest() == hashlib.sha256(chunk * (size // len(chunk))).hexdigest()
        print(
            f"4. moved {megabytes} MiB each way, SHA-256 verified at the far end: "
            f"client->server {'OK' if up_ok else 'MISMATCH'}, server->client {'OK' if down_ok else 'MISMATCH'}"
        )
        print(
            f"   throughput       : client->server {size / t_up / 1e9:.2f} GB/s, "
            f"server->client {size / t_down / 1e9:.2f} GB/s (one connection, one process, loopback)"
        )
        return 0 if up_ok and down_ok else 1
