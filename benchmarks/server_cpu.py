"""Server CPU time per full handshake, against TLS 1.3 and against the floor under securechan.

    python -m benchmarks.server_cpu [--count 3000] [--clients 32] [--runs 3] [--loop uvloop]

The handshake rate at many clients is set by the server's CPU: this measures that CPU
directly. One server process, pinned to the first core, hosts one listener per kind on
the suite's PKI (the same RSA-2048 key for all); this process, pinned to the second core,
runs ``--count`` handshakes with ``--clients`` concurrent clients per kind and reads the
server's user and system CPU time (``getrusage``) before and after each window. Kinds take
turns run by run (a warm-up run first), so a disturbance falls on all of them alike.

Kinds:

* ``tcp``: connect and close, no handshake (what the accept and the close cost).
* ``tls``: TLS 1.3 in ``asyncio`` + ``ssl``; the client checks the chain and the name.
* ``securechan``: a full handshake (no ticket), closed with close_notify.
* ``floor``: every call a full handshake's server makes into ``cryptography``, ``hashlib``
  and ``os`` (random values, X25519 key, share and exchange, the RSA-OAEP unwrap with the
  same RSA key, the transcript hash, HKDF-Extract and nine HKDF-Expand, both Finished MACs,
  two AES-GCM contexts, opening the client's close_notify and sealing its own), the same
  reads and writes with the sizes of a real securechan handshake on this PKI, and as
  little Python around them as it takes: no framing, decoding, checks, state or objects.
  What securechan spends above the floor is the cost of being a real implementation of the
  protocol in Python; no Python server of this protocol on this loop spends less than it.

Besides CPU per handshake and the rate, the report gives how busy the server was (CPU per
handshake x rate; a server below about 95 % is waiting for its clients, and then spends a
little more per handshake) and round-by-round differences, which hold up better than the
medians on a noisy machine, since the kinds of one round run back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

import securechan
from securechan.frames import HEADER_LEN, TAG_LEN
from securechan.keyschedule import HANDSHAKE_LABELS, HASH_LEN, SALT_V1, hkdf_label
from securechan.suites import NONCE_LEN, Suite

from . import pkiutil
from .stats import rotated, summary
from .worker import Contenders, pin, raise_fd_limit, run_loop

KINDS = ["tcp", "floor", "tls", "securechan"]
_SHA256 = hashes.SHA256()
#: The HKDF infos a server without tickets expands, from the key schedule's own encoding: the five
#: handshake secrets (up to their th1 context, appended per handshake), then the traffic key and iv.
_LABELS = tuple(hkdf_label(label.encode(), bytes(HASH_LEN), HASH_LEN)[:-HASH_LEN]
                for label in HANDSHAKE_LABELS if label != "resumption")
_KEY_INFO = hkdf_label(b"key", b"", Suite.AES_256_GCM.key_len)
_IV_INFO = hkdf_label(b"iv", b"", NONCE_LEN)
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def flight_sizes(pki: pkiutil.BenchPKI) -> list[int]:
    """Bytes of each flight of one full securechan handshake on this PKI, and of each close_notify:
    ClientHello, the server's flight, KeyExchange + Finished, Finished, the client's close, the server's."""
    client = securechan.Connection(pki.client_config(resume=False), server_name="127.0.0.1")  # type: ignore[arg-type]
    server = securechan.Connection(pki.server_config())  # type: ignore[arg-type]
    sizes = []
    for _ in range(2):
        out = client.data_to_send()
        server.receive_data(out)
        back = server.data_to_send()
        client.receive_data(back)
        sizes += [len(out), len(back)]
    if not client.handshake_complete:
        raise RuntimeError("in-memory handshake did not complete")
    client.close()
    close = client.data_to_send()
    server.receive_data(close)
    server.close()
    return [*sizes, len(close), len(server.data_to_send())]


def _expand(secret: bytes, info: bytes, length: int = HASH_LEN) -> bytes:
    return HKDFExpand(_SHA256, length, info).derive(secret)


class _Record:
    """A close_notify-sized record any floor server can open: the cost of opening the client's close."""

    def __init__(self, size: int) -> None:
        self.aead, self.nonce, self.aad = AESGCM(os.urandom(32)), os.urandom(NONCE_LEN), os.urandom(HEADER_LEN)
        self.sealed = self.aead.encrypt(self.nonce, os.urandom(size - HEADER_LEN - TAG_LEN), self.aad)


class FloorServer(asyncio.Protocol):
    """Every call into ``cryptography``, ``hashlib`` and ``os`` a full handshake's server makes, the
    same writes, and as little Python around them as possible (no framing, decoding or checks)."""

    def __init__(self, key: rsa.RSAPrivateKey, wrapped: bytes, share: bytes, record: _Record,
                 sizes: list[int]) -> None:
        self.key, self.wrapped, self.share, self.record = key, wrapped, share, record
        self.first, self.flight, self.second, self.reply, self.close, self.close_reply = sizes
        self.got = 0
        self.transport: Any = None
        self.transcript = hashlib.sha256()
        self.dhe = b""
        self.keys: tuple[AESGCM, AESGCM] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        before, self.got = self.got, self.got + len(data)
        self.transcript.update(data)
        if before < self.first <= self.got:  # ClientHello: random, key share, DH, ServerHello
            os.urandom(32)
            ephemeral = x25519.X25519PrivateKey.generate()
            self.dhe = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(self.share))
            ephemeral.public_key().public_bytes_raw()
            flight = bytes(self.flight)
            self.transcript.update(flight)
            self.transport.write(flight)
        done = self.first + self.second
        if before < done <= self.got:  # KeyExchange + Finished: unwrap, key schedule, both Finished
            os.urandom(32)
            wrapped = self.key.decrypt(self.wrapped, _OAEP)
            th1 = self.transcript.copy().digest()
            secret = HKDF.extract(_SHA256, SALT_V1, wrapped + self.dhe)
            c_fin, s_fin, c_ap, s_ap, _ = (_expand(secret, label + th1) for label in _LABELS)
            hmac.compare_digest(hmac.digest(c_fin, th1, "sha256"), bytes(32))
            th2 = self.transcript.copy().digest()
            reply = bytearray(self.reply)
            reply[-32:] = hmac.digest(s_fin, th2, "sha256")
            self.keys = (AESGCM(_expand(c_ap, _KEY_INFO)), AESGCM(_expand(s_ap, _KEY_INFO)))
            _expand(c_ap, _IV_INFO, NONCE_LEN)
            _expand(s_ap, _IV_INFO, NONCE_LEN)
            self.transport.write(bytes(reply))
        if before < done + self.close <= self.got:  # close_notify: open the client's, seal and send ours
            r = self.record
            r.aead.decrypt(r.nonce, r.sealed, r.aad)
            assert self.keys is not None
            sealed = self.keys[1].encrypt(r.nonce, bytes(self.close_reply - HEADER_LEN - TAG_LEN), r.aad)
            self.transport.write(r.aad + sealed)
            self.transport.close()


class FloorClient(asyncio.Protocol):
    def __init__(self, sizes: list[int], done: asyncio.Future[None]) -> None:
        self.first, self.flight, self.second, self.reply, self.close, _ = sizes
        self.done, self.got = done, 0
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.transport.write(bytes(self.first))

    def data_received(self, data: bytes) -> None:
        before, self.got = self.got, self.got + len(data)
        if before < self.flight <= self.got:
            self.transport.write(bytes(self.second))
        if before < self.flight + self.reply <= self.got and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"the floor server closed the connection early ({exc})"))

    def send_close(self) -> None:
        """Send a close_notify-sized record and close, as a securechan client's ``close()`` does."""
        self.transport.write(bytes(self.close))
        self.transport.close()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def serve(pki: pkiutil.BenchPKI, sizes: list[int]) -> None:
    """Listen for every kind, print the ports, then answer each ``cpu`` line on stdin with this process's CPU."""
    loop = asyncio.get_running_loop()
    c = Contenders(pki)
    key = serialization.load_pem_private_key(pki.key.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    wrapped = key.public_key().encrypt(os.urandom(32), _OAEP)
    share = x25519.X25519PrivateKey.generate().public_key().public_bytes_raw()
    record = _Record(sizes[4])
    servers = {
        "tcp": await c.listen("tcp", asyncio.Protocol),
        "tls": await c.listen("ssl", asyncio.Protocol),
        "securechan": await c.listen("securechan", asyncio.Protocol),
        "floor": await c.listen("tcp", lambda: FloorServer(key, wrapped, share, record, sizes)),
    }
    print(json.dumps({k: s.sockets[0].getsockname()[1] for k, s in servers.items()}), flush=True)
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "cpu":
        print(json.dumps({"cpu": _cpu()}), flush=True)
    for s in servers.values():
        s.close()


async def _one(c: Contenders, kind: str, port: int, sizes: list[int]) -> None:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(30):  # a server that stops answering fails the run, not hangs it
        if kind == "floor":
            done: asyncio.Future[None] = loop.create_future()
            _, client = await loop.create_connection(lambda: FloorClient(sizes, done), "127.0.0.1", port)
            await done
            client.send_close()
        else:
            transport, _ = await c.connect("ssl" if kind == "tls" else kind, port, asyncio.Protocol)
            transport.close()


async def drive(args: argparse.Namespace, pki: pkiutil.BenchPKI, sizes: list[int],
                server: subprocess.Popen[str]) -> dict[str, dict[str, Any]]:
    assert server.stdin is not None and server.stdout is not None
    first = server.stdout.readline()
    if not first:
        raise SystemExit(f"the server process ended (exit {server.wait()}) before it listened; its error is above")
    ports = json.loads(first)
    c = Contenders(pki)

    def server_cpu() -> float:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write("cpu\n")
        server.stdin.flush()
        line = server.stdout.readline()
        if not line:
            raise SystemExit(f"the server process ended (exit {server.wait()}) during the run; its error is above")
        return float(json.loads(line)["cpu"])

    kinds = args.kinds
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    rate: dict[str, list[float]] = {k: [] for k in kinds}
    for run in range(1 + args.runs):
        for kind in rotated(kinds, run):
            left = [args.count]

            async def worker(kind: str = kind, left: list[int] = left) -> None:
                while left[0] > 0:
                    left[0] -= 1
                    await _one(c, kind, ports[kind], sizes)

            before = server_cpu()
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(args.clients)))
            elapsed = time.perf_counter() - t0
            await asyncio.sleep(0.2)  # the server finishes its closes; they belong to this window
            spent = server_cpu() - before
            if run:
                cpu[kind].append(spent / args.count)
                rate[kind].append(args.count / elapsed)
    # Runs are aligned: the i-th value of every kind comes from the same round.
    return {k: {"server_cpu_per_handshake": summary(cpu[k], "s"), "rate": summary(rate[k], "handshakes/s"),
                "busy": summary([c * r for c, r in zip(cpu[k], rate[k], strict=True)], "fraction")}
            for k in kinds}


def report(results: dict[str, dict[str, Any]]) -> str:
    def ms(k: str, key: str = "median") -> float:
        return float(results[k]["server_cpu_per_handshake"][key]) * 1e3

    def paired(a: str, b: str) -> str:
        """Round-by-round difference of server CPU per handshake, a minus b (ms): median [min … max]."""
        diffs = [(x - y) * 1e3 for x, y in zip(results[a]["server_cpu_per_handshake"]["values"],
                                               results[b]["server_cpu_per_handshake"]["values"], strict=True)]
        return f"{statistics.median(diffs):.3f} ms [{min(diffs):.3f} … {max(diffs):.3f}]"

    has_tls = "tls" in results
    header = f"{'kind':<11} {'server CPU per handshake':>30} {'handshakes/s':>14} {'server busy':>12}"
    lines = [header + ("  TLS CPU / this" if has_tls else "")]
    for k in results:
        r, busy = results[k]["rate"], results[k]["busy"]["median"]
        vs_tls = f"  {ms('tls') / ms(k):14.2f}x" if has_tls else ""
        lines.append(f"{k:<11} {ms(k):8.3f} ms [{ms(k, 'min'):.3f} … {ms(k, 'max'):.3f}] {r['median']:>14,.0f} "
                     f"{busy:>11.0%}{vs_tls}")
    if {"securechan", "floor"} <= results.keys():
        lines.append(f"securechan minus floor, round by round: {paired('securechan', 'floor')}")
    if {"securechan", "tls"} <= results.keys():
        tls_rate = float(results["tls"]["rate"]["median"])
        lines.append(f"TLS minus securechan, round by round: {paired('tls', 'securechan')}; "
                     f"1.5x TLS's rate ({tls_rate:,.0f}/s) needs a server spending at most "
                     f"{1e3 / (1.5 * tls_rate):.3f} ms per handshake")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="handshakes per kind and run")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--runs", type=int, default=3, help="measured runs (after one warm-up run)")
    parser.add_argument("--kinds", type=lambda v: v.split(","), default=KINDS,
                        help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the server process: its PKI folder
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if unknown := set(args.kinds) - set(KINDS):
        parser.error(f"unknown kind(s) {', '.join(sorted(unknown))}; choose from {', '.join(KINDS)}")
    if len(set(args.kinds)) != len(args.kinds):
        parser.error("each kind may be named once in --kinds")
    if min(args.count, args.clients, args.runs) < 1:
        parser.error("--count, --clients and --runs must be at least 1")
    raise_fd_limit()
    if args.serve:
        pin(0)
        pki = pkiutil.load(args.serve)
        run_loop(args.loop, lambda: serve(pki, json.loads(args.sizes)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        pki = pkiutil.make(Path(tmp))
        sizes = flight_sizes(pki)
        cmd = [sys.executable, "-m", "benchmarks.server_cpu", "--serve", tmp, "--sizes", json.dumps(sizes),
               "--loop", args.loop]
        with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parent.parent) as server:
            try:
                pin(1)
                results = run_loop(args.loop, lambda: drive(args, pki, sizes, server))
            finally:
                if server.stdin is not None:
                    server.stdin.close()  # the server's cue to stop
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()  # stuck: it must not outlive the run (nor hide the run's own error)
                    server.wait()
    print(f"{args.count} handshakes per kind and run, {args.clients} clients, {args.runs} runs after a warm-up, "
          f"{args.loop}; flights and closes {sizes} bytes")
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps({"sizes": sizes, "results": results}, indent=2))


if __name__ == "__main__":
    main()
