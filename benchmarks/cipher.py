"""The cipher path without sockets: records sealed and opened per second, against the raw AEAD call.

Two in-memory :class:`securechan.Connection` objects complete a real handshake, then the
client seals records (``Connection.seal``, what every ``write`` does) and the server opens
them (``receive_data``: the same buffer and record code the socket path uses). The raw
``cryptography`` call on the same sizes (``encrypt_into``/``decrypt_into`` into a reused
buffer, the fastest form it offers) is the limit for this path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from securechan import Connection
from securechan.suites import Suite

from .pkiutil import BenchPKI
from .stats import summary


def connected_pair(pki: BenchPKI, suite: Suite, record_size: int) -> tuple[Connection, Connection]:
    client = Connection(pki.client_config(suites=[suite], max_record_size=record_size),  # type: ignore[arg-type]
                        server_name="127.0.0.1")
    server = Connection(pki.server_config(suites=[suite], max_record_size=record_size))  # type: ignore[arg-type]
    for _ in range(4):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    if not (client.handshake_complete and server.handshake_complete):
        raise RuntimeError("in-memory handshake did not complete")
    return client, server


def _rate(fn: Callable[[], None], iters: int, runs: int, warmup: int) -> list[float]:
    """Calls per second of ``fn``, one value per measured run."""
    out = []
    for run in range(warmup + runs):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        dt = time.perf_counter() - t0
        if run >= warmup:
            out.append(iters / dt)
    return out


def measure(pki: BenchPKI, suites: list[Suite], sizes: list[int], volume: int, runs: int, warmup: int,
            progress: Callable[[], None]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for suite in suites:
        per_suite: dict[str, Any] = {}
        for size in sizes:
            iters = max(20, volume // size)
            client, server = connected_pair(pki, suite, size)
            payload = os.urandom(size)
            frame = bytes(client.seal(payload))

            def seal(client: Connection = client, payload: bytes = payload) -> None:
                client.seal(payload)

            seal_rates = _rate(seal, iters, runs, warmup)
            # The opener needs the records in sequence: a fresh pair, all records sealed ahead.
            client, server = connected_pair(pki, suite, size)
            frames = [bytes(client.seal(payload)) for _ in range(iters * (runs + warmup))]
            it = iter(frames)
            open_rates = _rate(lambda it=it, server=server: server.receive_data(next(it)) and None,  # type: ignore[misc]
                               iters, runs, warmup)
            aead = suite.aead(os.urandom(suite.key_len))
            nonce, aad = os.urandom(12), frame[:7]
            enc_buf, dec_buf = bytearray(size + 16), bytearray(size)
            raw_seal = _rate(partial(aead.encrypt_into, nonce, payload, aad, enc_buf), iters, runs, warmup)  # type: ignore[union-attr]
            # Like the opened records, the raw call reads each ciphertext once from a stream of
            # distinct records (memory, not cache), so the two figures compare like with like.
            del frames
            cts = iter([aead.encrypt(nonce, payload, aad) for _ in range(iters * (runs + warmup))])
            decrypt_into = aead.decrypt_into  # type: ignore[union-attr]
            raw_open = _rate(lambda: decrypt_into(nonce, next(cts), aad, dec_buf), iters, runs, warmup)  # noqa: B023
            per_suite[str(size)] = {
                "records_sealed_per_s": summary(seal_rates, "records/s"),
                "records_opened_per_s": summary(open_rates, "records/s"),
                "seal": summary([r * size for r in seal_rates], "B/s"),
                "open": summary([r * size for r in open_rates], "B/s"),
                "raw_encrypt": summary([r * size for r in raw_seal], "B/s"),
                "raw_decrypt": summary([r * size for r in raw_open], "B/s"),
            }
            progress()
        results[suite.label] = per_suite
    return results
