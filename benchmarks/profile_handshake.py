"""CPU cost of one handshake, both sides in memory (no sockets), and where it goes.

    python -m benchmarks.profile_handshake [--count 500] [--repeat 1] [--resume] [--profile]

Drives a sans-IO client and server with one ClientConfig (as a reconnecting client would,
so the verified-chain cache is warm after the first handshake). By default a full handshake
(client ``resume=False``, server ``tickets=False``); with ``--resume`` the server issues
tickets, the client keeps them, and every measured handshake is a resumed one. ``--repeat``
runs the measurement several times and reports the fastest (the machine is often shared).
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


def configs(folder: Path, resume: bool = False) -> tuple[securechan.ServerConfig, securechan.ClientConfig]:
    ca = pki.make_ca("profile CA")
    cert, key = pki.issue_cert(ca, "localhost", ips=["127.0.0.1"])
    (folder / "s.crt").write_bytes(pki.cert_pem(cert))
    (folder / "s.key").write_bytes(pki.key_pem(key))
    os.chmod(folder / "s.key", 0o600)
    (folder / "ca.crt").write_bytes(pki.cert_pem(ca[0]))
    return (
        securechan.ServerConfig(certfile=folder / "s.crt", keyfile=folder / "s.key", tickets=resume),
        securechan.ClientConfig(cafile=folder / "ca.crt", resume=resume),
    )


def handshake(server_config: securechan.ServerConfig, client_config: securechan.ClientConfig) -> bool:
    """One handshake (and, when the server issues one, the ticket delivered); True if it resumed."""
    client = securechan.Connection(client_config, server_name="localhost")
    server = securechan.Connection(server_config)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    assert client.handshake_complete and server.handshake_complete
    assert client.session is not None
    return client.session.resumed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=1, help="measure this many times and report the fastest")
    parser.add_argument("--resume", action="store_true", help="resumed handshakes (tickets) instead of full ones")
    parser.add_argument("--profile", action="store_true", help="also print the top functions by own time")
    args = parser.parse_args()
    kind = "resumed" if args.resume else "full"
    with tempfile.TemporaryDirectory() as tmp:
        server_config, client_config = configs(Path(tmp), resume=args.resume)
        for _ in range(50):  # warm-up (and, with --resume, the first ticket)
            handshake(server_config, client_config)
        best = float("inf")
        for _ in range(max(1, args.repeat)):
            start = time.perf_counter()
            resumed = sum(handshake(server_config, client_config) for _ in range(args.count))
            best = min(best, (time.perf_counter() - start) / args.count)
            if resumed != (args.count if args.resume else 0):
                raise SystemExit(f"{resumed} of {args.count} handshakes resumed; expected every one to be {kind}")
        print(f"{best * 1e6:.0f} µs per {kind} handshake, both sides, in memory ({args.count} handshakes)")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(lambda: [handshake(server_config, client_config) for _ in range(args.count)])
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
