"""An attacker in the middle of an established connection: every change to the record stream is fatal.

Each case checks the honest receiver's typed error, that the application got only an
untampered prefix of what was sent, the alert the other side received (encrypted, so
``authenticated`` is true), and that the server still serves a fresh client.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest

import securechan
from securechan import AlertCode
from securechan.frames import HEADER_LEN, FrameType, encode_frame, pack_map

from .peers import Recorder, RecordingServer, assert_prefix, assert_still_serving, connect, start_server
from .proxy import RESET, Attack, Direction, Flow, Verdict, flip, is_frame

MESSAGES = [os.urandom(700 + 131 * i) for i in range(6)]
SENT = b"".join(MESSAGES)
K = 2  # the record under attack


class OnRecords(Attack):
    """Calls ``fn(flow, n, frame)`` for the n-th APPLICATION_DATA frame sent in ``direction``."""

    def __init__(
        self,
        fn: Callable[[Flow, int, bytes], Verdict],
        direction: Direction = Direction.C2S,
        on_eof: Callable[[Flow], Verdict] | None = None,
        only_flow: int | None = None,
    ) -> None:
        self.fn, self.direction, self.on_eof, self.only_flow = fn, direction, on_eof, only_flow
        self.counts: dict[int, int] = {}

    def _mine(self, flow: Flow, direction: Direction) -> bool:
        return direction is self.direction and (self.only_flow is None or flow.index == self.only_flow)

    def frame(self, flow: Flow, direction: Direction, frame: bytes) -> Verdict:
        if not self._mine(flow, direction) or not is_frame(frame, FrameType.APPLICATION_DATA):
            return [frame]
        n = self.counts.get(flow.index, 0)
        self.counts[flow.index] = n + 1
        return self.fn(flow, n, frame)

    def eof(self, flow: Flow, direction: Direction) -> Verdict:
        if self.on_eof is not None and self._mine(flow, direction):
            return self.on_eof(flow)
        return []


async def upload(port: int, config: securechan.ClientConfig, *, key_update_at: int | None = None) -> Recorder:
    """Send MESSAGES as one record each, then close_notify; the server echoes."""
    app = await connect(port, config)
    assert app.transport is not None
    for i, message in enumerate(MESSAGES):
        if i == key_update_at:
            app.transport.update_keys(request_peer=False)
        app.transport.write(message)
    app.transport.write_eof()
    return app


async def server_app(server: RecordingServer) -> Recorder:
    for _ in range(1500):
        if server.apps:
            return server.apps[-1]
        await asyncio.sleep(0.01)
    raise AssertionError("the server never completed a handshake")


async def check_upload_attack(
    server: RecordingServer,
    config: securechan.ClientConfig,
    port: int,
    *,
    error: type[BaseException],
    delivered: bytes,
    alert: AlertCode | None = None,
    key_update_at: int | None = None,
) -> None:
    client = await upload(port, config, key_update_at=key_update_at)
    sapp = await server_app(server)
    exc = await sapp.ended()
    assert type(exc) is error, f"server ended with {exc!r}, expected {error.__name__}"
    assert isinstance(exc, securechan.SecureChannelError) and not exc.remote
    assert bytes(sapp.data) == delivered
    assert_prefix(sapp.data, SENT)
    cexc = await client.ended()
    if alert is not None:
        assert type(cexc) is securechan.ALERT_EXCEPTIONS[alert], f"client got {cexc!r}"
        assert isinstance(cexc, securechan.SecureChannelError)
        assert cexc.remote and cexc.authenticated
    assert_prefix(client.data, SENT)  # the echo the client got back is untampered too
    await assert_still_serving(server, config)


@pytest.mark.parametrize(
    ("where", "bit"),
    [(HEADER_LEN, 0), (HEADER_LEN + 100, 7), (-17, 3), (-1, 0), (6, 0), (6, 4), (3, 7)],
    ids=["first-ciphertext-byte", "mid-ciphertext", "first-tag-byte", "last-tag-byte", "length-lsb", "length-bit4",
         "length-msb"],
)
async def test_bit_flip_in_client_record(recording_server, client_config, mitm, where: int, bit: int) -> None:
    """A flipped ciphertext, tag or length bit: bad_record_mac (length changes the AAD), or record_overflow."""
    _, port = await mitm(recording_server.port, OnRecords(lambda f, n, fr: [flip(fr, where, bit) if n == K else fr]))
    overflow = where == 3
    await check_upload_attack(
        recording_server, client_config, port,
        error=securechan.RecordOverflowError if overflow else securechan.BadRecordMACError,
        delivered=b"".join(MESSAGES[:K]),
        alert=AlertCode.RECORD_OVERFLOW if overflow else AlertCode.BAD_RECORD_MAC,
    )


@pytest.mark.parametrize(
    ("bit", "error", "alert"),
    [
        (0, securechan.RecordOverflowError, AlertCode.RECORD_OVERFLOW),  # 3 -> 2: a plaintext ALERT far too long
        (1, securechan.UnexpectedMessageError, AlertCode.UNEXPECTED_MESSAGE),  # 3 -> 1: HANDSHAKE after handshake
        (2, securechan.DecodeError, AlertCode.DECODE_ERROR),  # 3 -> 7: unknown frame type
        (0x80, securechan.DecodeError, AlertCode.DECODE_ERROR),  # marker byte 0x92 -> 0x12
    ],
    ids=["type-to-alert", "type-to-handshake", "type-unknown", "marker"],
)
async def test_frame_head_flip_in_client_record(
    recording_server, client_config, mitm, bit: int, error: type, alert: AlertCode
) -> None:
    def attack(flow: Flow, n: int, frame: bytes) -> Verdict:
        if n != K:
            return [frame]
        if bit == 0x80:
            return [flip(frame, 0, 7)]
        return [flip(frame, 1, bit)]

    _, port = await mitm(recording_server.port, OnRecords(attack))
    await check_upload_attack(
        recording_server, client_config, port, error=error, delivered=b"".join(MESSAGES[:K]), alert=alert
    )


@pytest.mark.parametrize(
    ("name", "attack", "delivered_count"),
    [
        ("drop", lambda f, n, fr: [] if n == K else [fr], K),
        ("duplicate", lambda f, n, fr: [fr, fr] if n == K else [fr], K + 1),
        ("replay-earlier", lambda f, n, fr: [fr, f.of_type(Direction.C2S, FrameType.APPLICATION_DATA)[0]]
         if n == K else [fr], K + 1),
        ("inject-forged", lambda f, n, fr: [encode_frame(FrameType.APPLICATION_DATA, os.urandom(len(fr) - 7)), fr]
         if n == K else [fr], K),
    ],
)
async def test_drop_duplicate_replay_inject(
    recording_server, client_config, mitm, name: str, attack: Callable[[Flow, int, bytes], Verdict],
    delivered_count: int,
) -> None:
    _, port = await mitm(recording_server.port, OnRecords(attack))
    await check_upload_attack(
        recording_server, client_config, port,
        error=securechan.BadRecordMACError, delivered=b"".join(MESSAGES[:delivered_count]),
        alert=AlertCode.BAD_RECORD_MAC,
    )


async def test_reorder_two_records(recording_server, client_config, mitm) -> None:
    held: list[bytes] = []

    def attack(flow: Flow, n: int, frame: bytes) -> Verdict:
        if n == K:
            held.append(frame)
            return []
        if n == K + 1:
            return [frame, *held]
        return [frame]

    _, port = await mitm(recording_server.port, OnRecords(attack))
    await check_upload_attack(
        recording_server, client_config, port,
        error=securechan.BadRecordMACError, delivered=b"".join(MESSAGES[:K]), alert=AlertCode.BAD_RECORD_MAC,
    )


async def test_record_from_another_connection(recording_server, client_config, mitm) -> None:
    """Record K of connection 0 (same key schedule position, same length) spliced into connection 1."""
    proxy, port = await mitm(recording_server.port)
    first = await upload(port, client_config)
    await asyncio.wait_for(first.eof_event.wait(), 10)
    assert first.clean_eof and bytes(first.data) == SENT
    first.transport.close()  # type: ignore[union-attr]
    assert await first.ended() is None
    donor = proxy.flows[0].of_type(Direction.C2S, FrameType.APPLICATION_DATA)[K]
    proxy.attack = OnRecords(lambda f, n, fr: [donor] if n == K else [fr], only_flow=1)
    assert len(donor) == len(proxy.flows[0].of_type(Direction.C2S, FrameType.APPLICATION_DATA)[K])
    await check_upload_attack(
        recording_server, client_config, port,
        error=securechan.BadRecordMACError, delivered=b"".join(MESSAGES[:K]), alert=AlertCode.BAD_RECORD_MAC,
    )


class AfterRecords(Attack):
    """Once ``after`` client data records passed, inject ``frames`` (once) before the next client frame."""

    def __init__(self, after: int, frames: list[bytes]) -> None:
        self.after, self.frames, self.seen, self.done = after, frames, 0, False

    def frame(self, flow: Flow, direction: Direction, frame: bytes) -> Verdict:
        if direction is not Direction.C2S or self.done:
            return [frame]
        if self.seen == self.after:
            self.done = True
            return [*self.frames, frame]
        if is_frame(frame, FrameType.APPLICATION_DATA):
            self.seen += 1
        return [frame]


def _plain_alert(code: int) -> bytes:
    return encode_frame(FrameType.ALERT, pack_map({"type": "alert", "code": code}))


@pytest.mark.parametrize(
    ("name", "frame", "error", "remote"),
    [
        ("plaintext-close-notify", _plain_alert(0), securechan.UnexpectedMessageError, False),
        ("handshake-frame", encode_frame(FrameType.HANDSHAKE, pack_map({"type": "finished", "mac": bytes(32)})),
         securechan.UnexpectedMessageError, False),
        ("forged-control", encode_frame(FrameType.CONTROL, os.urandom(40)), securechan.BadRecordMACError, False),
        ("short-record", encode_frame(FrameType.APPLICATION_DATA, os.urandom(5)), securechan.DecodeError, False),
    ],
)
async def test_injected_frame_after_handshake(
    recording_server, client_config, mitm, name: str, frame: bytes, error: type, remote: bool
) -> None:
    _, port = await mitm(recording_server.port, AfterRecords(K, [frame]))
    await check_upload_attack(
        recording_server, client_config, port, error=error, delivered=b"".join(MESSAGES[:K]),
        alert=error.alert,  # type: ignore[attr-defined]
    )


async def test_injected_plaintext_alert_is_flagged_unauthenticated(recording_server, client_config, mitm) -> None:
    """An attacker can always end a connection (so can cutting TCP); a forged alert is marked as such."""
    _, port = await mitm(recording_server.port, AfterRecords(K, [_plain_alert(int(AlertCode.BAD_RECORD_MAC))]))
    client = await upload(port, client_config)
    sapp = await server_app(recording_server)
    exc = await sapp.ended()
    assert type(exc) is securechan.BadRecordMACError
    assert exc.remote and not exc.authenticated and "unauthenticated" in str(exc)
    assert bytes(sapp.data) == b"".join(MESSAGES[:K])
    await client.ended()
    assert_prefix(client.data, SENT)
    await assert_still_serving(recording_server, client_config)


@pytest.mark.parametrize("mode", ["drop", "duplicate"])
async def test_key_update_dropped_or_duplicated(recording_server, client_config, mitm, mode: str) -> None:
    """The KeyUpdate record is the only CONTROL record before close_notify."""
    state = {"controls": 0}

    def attack(flow: Flow, direction: Direction, frame: bytes) -> Verdict:
        if direction is Direction.C2S and is_frame(frame, FrameType.CONTROL):
            state["controls"] += 1
            if state["controls"] == 1:
                return [] if mode == "drop" else [frame, frame]
        return [frame]

    class KU(Attack):
        def frame(self, flow: Flow, direction: Direction, frame: bytes) -> Verdict:
            return attack(flow, direction, frame)

    _, port = await mitm(recording_server.port, KU())
    await check_upload_attack(
        recording_server, client_config, port, error=securechan.BadRecordMACError,
        delivered=b"".join(MESSAGES[:K]), alert=AlertCode.BAD_RECORD_MAC, key_update_at=K,
    )


async def test_key_update_passes_untouched(recording_server, client_config, mitm) -> None:
    """Control case for the test above: the same flow through a passive proxy succeeds."""
    _, port = await mitm(recording_server.port)
    client = await upload(port, client_config, key_update_at=K)
    sapp = await server_app(recording_server)
    await asyncio.wait_for(sapp.eof_event.wait(), 10)
    assert sapp.clean_eof and bytes(sapp.data) == SENT
    await asyncio.wait_for(client.eof_event.wait(), 10)
    assert client.clean_eof and bytes(client.data) == SENT
    client.transport.close()  # type: ignore[union-attr]
    assert await client.ended() is None


class StripCloseNotify(Attack):
    """Hold back each CONTROL record of ``direction`` until another frame follows it; drop the last one.

    The last CONTROL record before the FIN is close_notify (a session ticket or key update
    is always followed by more records in these tests)."""

    def __init__(self, direction: Direction) -> None:
        self.direction = direction
        self.held: list[bytes] = []

    def frame(self, flow: Flow, direction: Direction, frame: bytes) -> Verdict:
        if direction is not self.direction:
            return [frame]
        out, self.held = self.held, []
        if is_frame(frame, FrameType.CONTROL):
            self.held = [frame]
            return out
        return [*out, frame]

    def eof(self, flow: Flow, direction: Direction) -> Verdict:
        return []


class Truncate(Attack):
    """Client→server: pass records up to ``keep`` data records, then ``tail`` bytes of the next; drop the rest."""

    def __init__(self, keep: int | None, tail: int = 0) -> None:
        self.keep, self.tail, self.seen, self.partial = keep, tail, 0, b""

    def frame(self, flow: Flow, direction: Direction, frame: bytes) -> Verdict:
        if direction is not Direction.C2S:
            return [frame]
        if self.keep is None:  # keep all data, drop close_notify
            return [] if is_frame(frame, FrameType.CONTROL) else [frame]
        if is_frame(frame, FrameType.APPLICATION_DATA):
            self.seen += 1
            if self.seen == self.keep + 1 and self.tail:
                self.partial = frame[: self.tail]
            if self.seen > self.keep:
                return []
        if is_frame(frame, FrameType.CONTROL):
            return []
        return [frame]

    def eof(self, flow: Flow, direction: Direction) -> Verdict:
        return [self.partial] if direction is Direction.C2S and self.partial else []


@pytest.mark.parametrize(
    ("keep", "tail", "delivered"),
    [(None, 0, SENT), (K, 0, b"".join(MESSAGES[:K])), (K, 5, b"".join(MESSAGES[:K])),
     (K, 300, b"".join(MESSAGES[:K]))],
    ids=["close-notify-stripped", "at-record-boundary", "inside-head", "inside-body"],
)
async def test_truncation_is_never_a_clean_eof(
    recording_server, client_config, mitm, keep: int | None, tail: int, delivered: bytes
) -> None:
    _, port = await mitm(recording_server.port, Truncate(keep, tail))
    client = await upload(port, client_config)
    sapp = await server_app(recording_server)
    exc = await sapp.ended()
    assert type(exc) is securechan.TruncationError, repr(exc)
    assert not sapp.clean_eof
    assert bytes(sapp.data) == delivered
    await client.ended()
    assert_prefix(client.data, SENT)
    await assert_still_serving(recording_server, client_config)


async def _download(port: int, config: securechan.ClientConfig) -> Recorder:
    return await connect(port, config)


@pytest.fixture
async def greeting_server(server_config) -> RecordingServer:
    server = await start_server(server_config, lambda: Recorder(greeting=MESSAGES, close_after_greeting=True))
    yield server  # type: ignore[misc]
    await server.close()


@pytest.mark.parametrize("attack", ["flip", "drop", "duplicate", "strip-close-notify"])
async def test_server_to_client_records(greeting_server, client_config, mitm, attack: str) -> None:
    """The same attacks on the server's records: the client fails and only an untampered prefix is delivered."""

    def fn(flow: Flow, n: int, frame: bytes) -> Verdict:
        if n != K:
            return [frame]
        return {"flip": [flip(frame, 40, 2)], "drop": [], "duplicate": [frame, frame]}.get(attack, [frame])

    if attack == "strip-close-notify":
        _, port = await mitm(greeting_server.port, StripCloseNotify(Direction.S2C))
    else:
        _, port = await mitm(greeting_server.port, OnRecords(fn, Direction.S2C))
    client = await _download(port, client_config)
    exc = await client.ended()
    if attack == "strip-close-notify":
        assert type(exc) is securechan.TruncationError
        assert bytes(client.data) == SENT and not client.clean_eof
    else:
        assert type(exc) is securechan.BadRecordMACError and not exc.remote
        count = K + 1 if attack == "duplicate" else K
        assert bytes(client.data) == b"".join(MESSAGES[:count])
        sapp = await server_app(greeting_server)
        sexc = await sapp.ended()
        assert type(sexc) is securechan.BadRecordMACError and sexc.remote and sexc.authenticated
    await assert_still_serving_greeting(greeting_server, client_config)


async def assert_still_serving_greeting(server: RecordingServer, config: securechan.ClientConfig) -> None:
    app = await connect(server.port, config)
    await asyncio.wait_for(app.eof_event.wait(), 10)
    assert app.clean_eof and bytes(app.data) == SENT
    app.transport.close()  # type: ignore[union-attr]
    assert await app.ended() is None


async def test_reset_mid_stream_is_a_truncation(recording_server, client_config, mitm) -> None:
    """An RST after K records: both applications get TruncationError (still a ConnectionResetError)."""
    _, port = await mitm(recording_server.port, OnRecords(lambda f, n, fr: RESET if n == K else [fr]))
    client = await upload(port, client_config)
    sapp = await server_app(recording_server)
    exc = await sapp.ended()
    assert type(exc) is securechan.TruncationError and isinstance(exc, ConnectionResetError), repr(exc)
    assert not sapp.clean_eof and bytes(sapp.data) == b"".join(MESSAGES[:K])
    cexc = await client.ended()
    assert type(cexc) is securechan.TruncationError, repr(cexc)
    assert_prefix(client.data, SENT)
    await assert_still_serving(recording_server, client_config)
