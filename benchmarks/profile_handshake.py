"""CPU cost of one full handshake, both sides in memory (no sockets), and where it goes.

    python -m benchmarks.profile_handshake [--count 500] [--profile]

Drives a sans-IO client and server with one ClientConfig (as a reconnecting client would,
so the verified-chain cache is warm after the first handshake) and ``resume=False``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

import securechan
from securechan import pki


def configs(folder: Path) -> tuple[securechan.ServerConfig, securechan.ClientConfig]:
    ca = pki.make_ca("profile CA")
    cert, key = pki.issue_cert(ca, "localhost", ips=["127.0.0.1"])
    (folder / "s.crt").write_bytes(pki.cert_pem(cert))
    (folder / "s.key").write_bytes(pki.key_pem(key))
    os.chmod(folder / "s.key", 0o600)
    (folder / "ca.crt").write_bytes(pki.cert_pem(ca[0]))
    return (
        securechan.ServerConfig(certfile=folder / "s.crt", keyfile=folder / "s.key", tickets=False),
        securechan.ClientConfig(cafile=folder / "ca.crt", resume=False),
    )


def handshake(server_config: securechan.ServerConfig, client_config: securechan.ClientConfig) -> None:
    client = securechan.Connection(client_config, server_name="localhost")
    server = securechan.Connection(server_config)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert client.handshake_complete and server.handshake_complete


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--profile", action="store_true", help="also print the top functions by own time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server_config, client_config = configs(Path(tmp))
        for _ in range(50):  # warm-up
            handshake(server_config, client_config)
        start = time.perf_counter()
        for _ in range(args.count):
            handshake(server_config, client_config)
        per = (time.perf_counter() - start) / args.count
        print(f"{per * 1e6:.0f} µs per full handshake, both sides, in memory ({args.count} handshakes)")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(lambda: [handshake(server_config, client_config) for _ in range(args.count)])
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
