"""The cipher path without sockets: records sealed and opened per second, against the raw AEAD call.

Two in-memory :class:`securechan.Connection` objects complete a real handshake, then the
client seals records (``Connection.seal_parts``, what every ``write`` does) and the server
opens them (the buffer the event loop reads into, ``Connection._loop_buffer``, which
``SecureProtocol`` hands the loop in place of ``get_buffer``, and ``buffer_updated``, both
timed: the buffer and record code the socket path uses). The raw ``cryptography`` call on
the same sizes (``encrypt_into``/``decrypt_into`` into a reused buffer, the fastest form it
offers) is the limit for this path.

Opening: each record, distinct, is first copied into the receive buffer, as ``recv_into``
does on a socket; that copy is the kernel's work on a socket (plain TCP pays it too) and is
not timed, for securechan and for the raw call alike, so both decrypt a record that has just
arrived.
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
from .stats import rotated, summary


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


def _run(fn: Callable[[], object], iters: int) -> float:
    """Calls per second of ``fn`` over ``iters`` calls."""
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return iters / (time.perf_counter() - t0)


def _run_timed(prepare: Callable[[], memoryview] | None, arrive: Callable[[memoryview | None], tuple[Any, ...]],
               handle: Callable[..., object], iters: int) -> float:
    """Calls per second of ``prepare`` + ``handle``; ``arrive`` is not timed.

    ``prepare`` (securechan's ``get_buffer``, None for the raw call) returns where the next record
    goes; ``arrive`` puts it there (the kernel's copy on a socket, which every receiver pays, plain
    TCP too) and returns the arguments of ``handle``, which is called with them directly, so
    neither side pays an extra Python frame.
    """
    clock = time.perf_counter
    spent = 0.0
    for _ in range(iters):
        if prepare is None:
            args = arrive(None)
            t0 = clock()
            handle(*args)
            spent += clock() - t0
        else:
            t0 = clock()
            target = prepare()
            t1 = clock()
            args = arrive(target)
            t2 = clock()
            handle(*args)
            spent += (t1 - t0) + (clock() - t2)
    return iters / spent


def _interleaved(measures: dict[str, Callable[[], float]], runs: int, warmup: int) -> dict[str, list[float]]:
    """One value per measured run for each of ``measures``, taken in turn (rotating order) run by run,
    so a disturbance on the machine hits securechan and the raw call alike."""
    names = list(measures)
    out: dict[str, list[float]] = {name: [] for name in names}
    for run in range(warmup + runs):
        for name in rotated(names, run):
            value = measures[name]()
            if run >= warmup:
                out[name].append(value)
    return out


def _arrivals(records: list[bytes], args: tuple[Any, ...],
              fixed: memoryview | None = None) -> Callable[[memoryview | None], tuple[Any, ...]]:
    """Copy the next record into the receive buffer (``fixed``, or the one ``prepare`` gave), as
    ``recv_into`` does; return ``args``, the arguments that open it (every record has one size)."""
    it = iter(records)

    def arrive(target: memoryview | None) -> tuple[Any, ...]:
        record = next(it)
        buf = target if target is not None else fixed
        assert buf is not None
        buf[: len(record)] = record
        return args

    return arrive


def measure(pki: BenchPKI, suites: list[Suite], sizes: list[int], volume: int, runs: int, warmup: int,
            progress: Callable[[], None]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for suite in suites:
        per_suite: dict[str, Any] = {}
        for size in sizes:
            iters = max(20, volume // size)
            client, server = connected_pair(pki, suite, size)
            payload = os.urandom(size)
            count = iters * (runs + warmup)
            # The opener needs the records in sequence: a second pair, all records sealed ahead.
            # Per record, as on a socket: the loop's buffer (timed), the copy into it that recv_into
            # does (not timed), then ``buffer_updated`` (timed), which opens it.
            sender, server = connected_pair(pki, suite, size)
            server.receive_data(sender.seal(payload))  # the receive buffer grows to its bulk size
            records = [sender.seal(payload) for _ in range(count)]
            arrive = _arrivals(records, (len(records[0]),))
            aead: Any = suite.aead(os.urandom(suite.key_len))
            nonce, aad = os.urandom(12), client.seal(b"x")[:7]
            enc_buf, dec_buf = bytearray(size + 16), bytearray(size)
            # The raw call gets the same treatment: each ciphertext, distinct, is copied into a
            # receive buffer of exactly its size (not timed), then decrypted into a reused buffer (timed).
            rx = memoryview(bytearray(size + 16))
            raw_arrive = _arrivals([aead.encrypt(nonce, payload, aad) for _ in range(count)],
                                   (nonce, rx, aad, dec_buf), fixed=rx)
            rates = _interleaved({
                "seal": partial(_run, partial(client.seal_parts, payload), iters),
                "raw_seal": partial(_run, partial(aead.encrypt_into, nonce, payload, aad, enc_buf), iters),
                "open": partial(_run_timed, server._loop_buffer, arrive, server.buffer_updated, iters),
                "raw_open": partial(_run_timed, None, raw_arrive, aead.decrypt_into, iters),
            }, runs, warmup)
            del arrive, raw_arrive, records
            seal_rates, open_rates, raw_seal, raw_open = (rates[k] for k in ("seal", "open", "raw_seal", "raw_open"))
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
