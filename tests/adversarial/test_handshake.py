"""An attacker in the middle of the handshake: tampering, downgrade, substitution, replay and cuts.

Every case ends with both honest sides raising a typed :class:`securechan.SecureChannelError`;
the side that detected the attack sent the alert of its error class (seen in plaintext by
the proxy), the other side raised the class that alert maps to, no application on either
side received a byte, and the server still serves a fresh client.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.serialization import Encoding

import securechan
from securechan import AlertCode, pki
from securechan.frames import HEADER_LEN

from .peers import RecordingServer, assert_still_serving, connect, start_server
from .proxy import CUT, RESET, Attack, Direction, Flow, FrameProxy, Verdict, flip, message_of, message_type, rewrite

# (direction, index within that direction) of each handshake frame of the full handshake
CLIENT_HELLO = (Direction.C2S, 0)
SERVER_HELLO = (Direction.S2C, 0)
KEY_EXCHANGE = (Direction.C2S, 1)
CLIENT_FINISHED = (Direction.C2S, 2)
SERVER_FINISHED = (Direction.S2C, 1)
HANDSHAKE_FRAMES = {
    "client_hello": CLIENT_HELLO,
    "server_hello": SERVER_HELLO,
    "key_exchange": KEY_EXCHANGE,
    "client_finished": CLIENT_FINISHED,
    "server_finished": SERVER_FINISHED,
}


class OnHandshakeFrame(Attack):
    """Replace the handshake frame at ``target`` with ``fn(frame)``."""

    def __init__(self, target: tuple[Direction, int], fn: Callable[[bytes], Verdict]) -> None:
        self.target, self.fn = target, fn
        self.counts = {d: 0 for d in Direction}

    def frame(self, flow: Flow, direction: Direction, frame: bytes) -> Verdict:
        n = self.counts[direction]
        self.counts[direction] = n + 1
        return self.fn(frame) if (direction, n) == self.target else [frame]


async def server_outcome(server: RecordingServer, timeout: float = 10.0) -> BaseException | None:
    """How the server's side of the (single) attacked connection ended."""

    async def wait() -> BaseException | None:
        while True:
            if server.handshake_failures:
                return server.handshake_failures[0]
            if server.apps and server.apps[0].lost.done():
                return server.apps[0].lost.result()
            await asyncio.sleep(0.01)

    return await asyncio.wait_for(wait(), timeout)


async def attacked_handshake(
    server_config: securechan.ServerConfig,
    client_config: securechan.ClientConfig,
    attack: Attack,
    *,
    server_name: str = "localhost",
) -> tuple[BaseException, BaseException | None, Flow, RecordingServer, FrameProxy]:
    """Run one handshake through ``attack``; return (client error, server outcome, flow, server, proxy).

    The client sends a request as soon as its keys exist, so a server that wrongly
    completed would have something to deliver.
    """
    server = await start_server(server_config)
    proxy = FrameProxy(server.port, attack)
    port = await proxy.start()
    try:
        with pytest.raises(securechan.SecureChannelError) as info:
            app = await connect(port, client_config, server_name=server_name)
            app.transport.write(b"request")  # type: ignore[union-attr]
            await app.ended()
            raise AssertionError(f"the handshake succeeded under attack: {app.error!r}")
        outcome = await server_outcome(server)
        for app in server.apps:
            assert not app.data, "the server application received data from an attacked handshake"
        await asyncio.wait_for(proxy.flows[0].done.wait(), 10)
        return info.value, outcome, proxy.flows[0], server, proxy
    finally:
        await proxy.close()


def check_alerts(client_error: BaseException, server_error: BaseException | None, flow: Flow) -> None:
    """The detecting side sent its error's alert; the other side raised the class that alert maps to."""
    assert isinstance(client_error, securechan.SecureChannelError)
    assert isinstance(server_error, securechan.SecureChannelError), f"server ended with {server_error!r}"
    for error, sent, received in (
        (client_error, Direction.C2S, Direction.S2C),
        (server_error, Direction.S2C, Direction.C2S),
    ):
        if error.remote:
            codes = flow.alerts[received]
            if codes:  # a plaintext alert (an encrypted one is not visible to the proxy)
                assert type(error) is securechan.ALERT_EXCEPTIONS[AlertCode(codes[0])]
        elif not isinstance(error, securechan.TruncationError):
            assert int(error.alert) in flow.alerts[sent] or flow.cut, (
                f"{error!r} was raised but alert {error.alert.name} was not sent ({flow.alerts})"
            )
        assert "Traceback" not in str(error)


async def finish(server: RecordingServer, client_config: securechan.ClientConfig) -> None:
    try:
        await assert_still_serving(server, client_config)
    finally:
        await server.close()


def _flip_positions(frame: bytes) -> list[tuple[int, int]]:
    head = [(0, 7), (0, 1), (1, 0), (1, 2), (2, 0), (3, 7), (4, 0), (5, 7), (6, 0), (6, 7)]
    body_len = len(frame) - HEADER_LEN
    step = max(1, body_len // 16)
    body = [(HEADER_LEN + i, i % 8) for i in range(0, body_len, step)] + [(len(frame) - 1, 5)]
    return head + body


async def sweep(
    server_config: securechan.ServerConfig,
    client_config: securechan.ClientConfig,
    frames: dict[str, tuple[Direction, int]],
) -> int:
    """Flip one bit at a time across every frame in ``frames``; every case must fail on both sides
    with consistent alerts, and the server must then serve an honest client. Returns the case count."""
    # Record one honest handshake to learn the frame sizes.
    cases: list[tuple[str, int, int]] = []
    server = await start_server(server_config)
    proxy = FrameProxy(server.port)
    port = await proxy.start()
    app = await connect(port, client_config)
    app.transport.close()  # type: ignore[union-attr]
    await app.ended()
    await asyncio.wait_for(proxy.flows[0].done.wait(), 10)
    for name, (direction, index) in frames.items():
        frame = proxy.flows[0].frames[direction][index]
        assert message_type(frame) == ("finished" if name.endswith("_finished") else name), name
        cases += [(name, pos, bit) for pos, bit in _flip_positions(frame)]
    await proxy.close()
    await server.close()

    limit = asyncio.Semaphore(8)
    failures: list[str] = []

    async def one(name: str, pos: int, bit: int) -> None:
        async with limit:
            target = frames[name]
            try:
                cerr, serr, flow, srv, _ = await attacked_handshake(
                    server_config, client_config, OnHandshakeFrame(target, lambda f: [flip(f, pos, bit)])
                )
                check_alerts(cerr, serr, flow)
                await finish(srv, client_config)
            except BaseException as exc:  # collect every broken case, not just the first
                failures.append(f"{name} byte {pos} bit {bit}: {exc!r}")

    await asyncio.gather(*(one(*case) for case in cases))
    assert not failures, "\n".join(failures)
    return len(cases)


async def test_bit_flip_sweep_every_handshake_frame(server_config, client_config) -> None:
    """One flipped bit anywhere in any handshake frame (head and a spread of body bytes) never completes."""
    assert await sweep(server_config, client_config, HANDSHAKE_FRAMES) > 60


async def test_bit_flip_sweep_mutual_authentication(pki_dir, tmp_path) -> None:
    """The same with client certificates: the ClientCertificate frame (chain, scheme, signature) too."""
    cert, key = pki.issue_cert(pki_dir.ca, "alice", client=True, key_type="ec-p256")
    crt, k = tmp_path / "alice.crt", tmp_path / "alice.key"
    crt.write_bytes(pki.cert_pem(cert))
    k.write_bytes(pki.key_pem(key))
    os.chmod(k, 0o600)
    server_config = pki_dir.server_config(client_cafile=pki_dir.ca_file)
    client_config = pki_dir.client_config(certfile=crt, keyfile=k, resume=False)
    frames = {
        "client_hello": (Direction.C2S, 0),
        "server_hello": (Direction.S2C, 0),
        "client_certificate": (Direction.C2S, 1),
        "key_exchange": (Direction.C2S, 2),
        "client_finished": (Direction.C2S, 3),
        "server_finished": (Direction.S2C, 1),
    }
    assert await sweep(server_config, client_config, frames) > 70


@pytest.mark.parametrize(
    ("name", "field", "client_error", "server_error"),
    [
        ("client_hello", "random", securechan.HandshakeAuthError, securechan.HandshakeAuthError),
        ("client_hello", "x25519", securechan.HandshakeAuthError, securechan.HandshakeAuthError),
        ("server_hello", "random", securechan.HandshakeAuthError, securechan.HandshakeAuthError),
        ("server_hello", "x25519", securechan.HandshakeAuthError, securechan.HandshakeAuthError),
        ("key_exchange", "wrapped_key", securechan.HandshakeAuthError, securechan.HandshakeAuthError),
        ("client_finished", "mac", securechan.HandshakeAuthError, securechan.HandshakeAuthError),
        ("server_finished", "mac", securechan.HandshakeAuthError, securechan.HandshakeAuthError),
    ],
)
async def test_flipped_field_gives_documented_error(
    server_config, client_config, name: str, field: str, client_error: type, server_error: type
) -> None:
    """A flipped bit in a field covered only by the transcript or the key shows up as decrypt_error."""

    def attack(frame: bytes) -> Verdict:
        value = bytearray(message_of(frame)[field])  # type: ignore[arg-type]
        value[len(value) // 2] ^= 0x10
        return [rewrite(frame, **{field: bytes(value)})]

    cerr, serr, flow, server, _ = await attacked_handshake(
        server_config, client_config, OnHandshakeFrame(HANDSHAKE_FRAMES[name], attack)
    )
    assert type(cerr) is client_error and type(serr) is server_error, (cerr, serr)
    detector_is_client = name == "server_finished"
    local, remote = (cerr, serr) if detector_is_client else (serr, cerr)
    assert not local.remote and remote.remote and not remote.authenticated
    sent = Direction.C2S if detector_is_client else Direction.S2C
    assert flow.alerts[sent] == [AlertCode.DECRYPT_ERROR]
    if not detector_is_client:
        assert not server.apps, "the server completed a handshake it should have refused"
    check_alerts(cerr, serr, flow)
    await finish(server, client_config)


# -- a wrapped key that fails OAEP is indistinguishable from a wrong Finished --------------


def _random_wrapped_key(frame: bytes) -> Verdict:
    return [rewrite(frame, wrapped_key=os.urandom(len(message_of(frame)["wrapped_key"])))]  # type: ignore[arg-type]


def _wrong_finished(frame: bytes) -> Verdict:
    return [rewrite(frame, mac=os.urandom(32))]


def _short_key_wrap(server_config: securechan.ServerConfig) -> Callable[[bytes], Verdict]:
    """A wrapped key that OAEP-decrypts fine but holds 16 bytes instead of 32."""
    public = server_config.certificate.public_key()

    def attack(frame: bytes) -> Verdict:
        oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
        return [rewrite(frame, wrapped_key=public.encrypt(os.urandom(16), oaep))]  # type: ignore[union-attr]

    return attack


async def test_bad_oaep_is_indistinguishable_from_wrong_finished(server_config, client_config) -> None:
    outcomes = []
    for target, fn in (
        (KEY_EXCHANGE, _random_wrapped_key),
        (KEY_EXCHANGE, _short_key_wrap(server_config)),
        (CLIENT_FINISHED, _wrong_finished),
    ):
        attack = OnHandshakeFrame(target, fn)
        cerr, serr, flow, server, _ = await attacked_handshake(server_config, client_config, attack)
        s2c = flow.frames[Direction.S2C]
        outcomes.append(
            (
                type(cerr), str(cerr), type(serr), str(serr),
                [message_type(f) for f in s2c],  # what the server sent, in order
                [len(f) for f in s2c[1:]],  # the alert frame, byte for byte the same size
                flow.alerts[Direction.S2C],
                len(flow.frames[Direction.C2S]),  # the server answered only after the client's Finished
            )
        )
        await finish(server, client_config)
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert outcomes[0][0] is securechan.HandshakeAuthError and outcomes[0][6] == [AlertCode.DECRYPT_ERROR]
    assert outcomes[0][4] == ["server_hello", "alert"]


def test_bad_oaep_fails_only_at_finished_sans_io(server_config, client_config) -> None:
    """Driving the sans-IO server: a garbage wrapped key is accepted silently; the Finished then fails
    with exactly the bytes a wrong Finished gets."""
    from .proxy import split_frames

    def run(tamper_kx: bool) -> tuple[bytes, bytes, str]:
        client = securechan.Connection(client_config, server_name="localhost")
        server = securechan.Connection(server_config)
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        kx, fin = split_frames(client.data_to_send())
        if tamper_kx:
            kx = _random_wrapped_key(kx)[0]  # type: ignore[index]
        else:
            fin = _wrong_finished(fin)[0]  # type: ignore[index]
        assert server.receive_data(kx) == []
        after_kx = server.data_to_send()
        with pytest.raises(securechan.HandshakeAuthError) as info:
            server.receive_data(fin)
        return after_kx, server.data_to_send(), str(info.value)

    assert run(True) == run(False)
    assert run(True)[0] == b""


# -- downgrade -------------------------------------------------------------------------


async def test_suites_stripped_from_client_hello(server_config, client_config) -> None:
    """Offering only the weakest suite on the client's behalf breaks the transcript: decrypt_error."""
    attack = OnHandshakeFrame(CLIENT_HELLO, lambda f: [rewrite(f, suites=[int(securechan.Suite.AES_128_GCM)])])
    cerr, serr, flow, server, _ = await attacked_handshake(server_config, client_config, attack)
    assert type(serr) is securechan.HandshakeAuthError and not serr.remote
    assert type(cerr) is securechan.HandshakeAuthError and cerr.remote
    assert message_of(flow.frames[Direction.S2C][0])["suite"] == int(securechan.Suite.AES_128_GCM)
    check_alerts(cerr, serr, flow)
    await finish(server, client_config)


async def test_versions_rewritten_in_client_hello(server_config, client_config) -> None:
    """An unknown version list makes the server refuse with protocol_version; nothing completes."""
    attack = OnHandshakeFrame(CLIENT_HELLO, lambda f: [rewrite(f, versions=[0])])
    cerr, serr, flow, server, _ = await attacked_handshake(server_config, client_config, attack)
    assert type(serr) is securechan.NoCommonVersionError and not serr.remote
    assert type(cerr) is securechan.NoCommonVersionError and cerr.remote and not cerr.authenticated
    assert flow.alerts[Direction.S2C] == [AlertCode.PROTOCOL_VERSION]
    await finish(server, client_config)


async def test_server_hello_suite_rewritten(server_config, client_config) -> None:
    """The server's choice rewritten to another suite the client offered: the Finished MACs catch it."""
    attack = OnHandshakeFrame(SERVER_HELLO, lambda f: [rewrite(f, suite=int(securechan.Suite.CHACHA20_POLY1305))])
    cerr, serr, flow, server, _ = await attacked_handshake(server_config, client_config, attack)
    assert type(serr) is securechan.HandshakeAuthError and type(cerr) is securechan.HandshakeAuthError
    check_alerts(cerr, serr, flow)
    await finish(server, client_config)


async def test_server_hello_suite_not_offered(server_config, pki_dir) -> None:
    strict = pki_dir.client_config(suites=["AES-256-GCM"], resume=False)
    attack = OnHandshakeFrame(SERVER_HELLO, lambda f: [rewrite(f, suite=int(securechan.Suite.AES_128_GCM))])
    cerr, serr, flow, server, _ = await attacked_handshake(server_config, strict, attack)
    assert type(cerr) is securechan.IllegalParameterError and not cerr.remote
    assert type(serr) is securechan.IllegalParameterError and serr.remote
    assert flow.alerts[Direction.C2S] == [AlertCode.ILLEGAL_PARAMETER]
    await finish(server, strict)


async def test_alpn_offer_stripped_from_client_hello(pki_dir) -> None:
    """Removing the client's application-protocol offer breaks the transcript: decrypt_error."""
    server_config = pki_dir.server_config(alpn_protocols=["securechan-mux/1"])
    client_config = pki_dir.client_config(alpn_protocols=["securechan-mux/1"], resume=False)
    attack = OnHandshakeFrame(CLIENT_HELLO, lambda f: [rewrite(f, alpn=None)])
    cerr, serr, flow, server, _ = await attacked_handshake(server_config, client_config, attack)
    assert "alpn" not in message_of(flow.frames[Direction.S2C][0])  # the server chose nothing ...
    assert type(serr) is securechan.HandshakeAuthError and type(cerr) is securechan.HandshakeAuthError  # ... in vain
    check_alerts(cerr, serr, flow)
    await finish(server, client_config)


async def test_alpn_offer_replaced_in_client_hello(pki_dir) -> None:
    """An offer rewritten to a protocol the client never offered: the client refuses the server's choice."""
    server_config = pki_dir.server_config(alpn_protocols=["other/1", "securechan-mux/1"])
    client_config = pki_dir.client_config(alpn_protocols=["securechan-mux/1"], resume=False)
    attack = OnHandshakeFrame(CLIENT_HELLO, lambda f: [rewrite(f, alpn=["other/1"])])
    cerr, serr, flow, server, _ = await attacked_handshake(server_config, client_config, attack)
    assert message_of(flow.frames[Direction.S2C][0])["alpn"] == "other/1"
    assert type(cerr) is securechan.IllegalParameterError and "'other/1'" in str(cerr)
    assert type(serr) is securechan.IllegalParameterError and serr.remote
    await finish(server, client_config)


async def test_alpn_choice_stripped_from_server_hello(pki_dir) -> None:
    """The server's choice removed (so the client would run without it): the Finished MACs catch it."""
    server_config = pki_dir.server_config(alpn_protocols=["securechan-mux/1"])
    client_config = pki_dir.client_config(alpn_protocols=["securechan-mux/1"], resume=False)
    attack = OnHandshakeFrame(SERVER_HELLO, lambda f: [rewrite(f, alpn=None)])
    cerr, serr, flow, server, _ = await attacked_handshake(server_config, client_config, attack)
    assert type(serr) is securechan.HandshakeAuthError and type(cerr) is securechan.HandshakeAuthError
    check_alerts(cerr, serr, flow)
    await finish(server, client_config)


async def test_alpn_choice_not_offered_is_illegal(pki_dir) -> None:
    server_config = pki_dir.server_config(alpn_protocols=["securechan-mux/1"])
    client_config = pki_dir.client_config(alpn_protocols=["securechan-mux/1"], resume=False)
    attack = OnHandshakeFrame(SERVER_HELLO, lambda f: [rewrite(f, alpn="other/1")])
    cerr, serr, flow, server, _ = await attacked_handshake(server_config, client_config, attack)
    assert type(cerr) is securechan.IllegalParameterError and not cerr.remote
    assert "application protocol 'other/1'" in str(cerr)
    assert type(serr) is securechan.IllegalParameterError and serr.remote
    assert flow.alerts[Direction.C2S] == [AlertCode.ILLEGAL_PARAMETER]
    await finish(server, client_config)


# -- certificate substitution -------------------------------------------------------------


def _substitute(chain_pem_path: object) -> Callable[[bytes], Verdict]:
    certs = securechan.certs.load_certificates(chain_pem_path)  # type: ignore[arg-type]
    ders = [c.public_bytes(Encoding.DER) for c in certs]
    return lambda frame: [rewrite(frame, certificates=ders)]


def _utc(days: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)


@pytest.mark.parametrize(
    ("case", "error", "alert"),
    [
        ("other-name", securechan.NameMismatchError, AlertCode.CERTIFICATE_UNKNOWN),
        ("other-ca", securechan.UnknownCAError, AlertCode.UNKNOWN_CA),
        ("expired", securechan.CertificateExpiredError, AlertCode.CERTIFICATE_EXPIRED),
        ("not-yet-valid", securechan.CertificateExpiredError, AlertCode.CERTIFICATE_EXPIRED),
        ("client-usage", securechan.WrongUsageError, AlertCode.UNSUPPORTED_CERTIFICATE),
    ],
)
async def test_substituted_server_certificate(
    server_config, client_config, pki_dir, case: str, error: type, alert: AlertCode
) -> None:
    """The attacker presents another valid certificate (whose key it holds) in place of the server's."""
    if case == "other-name":
        path, _ = pki_dir.issue("other.example")
    elif case == "other-ca":
        path, _ = pki_dir.issue("localhost", ca=pki.make_ca("Attacker CA"), ips=["127.0.0.1"])
    elif case == "expired":
        path, _ = pki_dir.issue("localhost", not_before=_utc(-30), not_after=_utc(-1))
    elif case == "not-yet-valid":
        path, _ = pki_dir.issue("localhost", not_before=_utc(1), not_after=_utc(30))
    else:
        path, _ = pki_dir.issue("localhost", client=True)
    cerr, serr, flow, server, _ = await attacked_handshake(
        server_config, client_config, OnHandshakeFrame(SERVER_HELLO, _substitute(path))
    )
    assert type(cerr) is error and not cerr.remote, repr(cerr)
    assert type(serr) is error and serr.remote and not serr.authenticated
    assert flow.alerts[Direction.C2S] == [alert]
    assert len(flow.frames[Direction.C2S]) == 2, "the client sent its key exchange to an unverified server"
    await finish(server, client_config)


async def test_substituted_certificate_same_ca_fails_pin(server_config, pki_dir) -> None:
    """With a pin, even a certificate the CA did issue for the right name is refused."""
    pin = securechan.certs.format_pin(securechan.certs.spki_sha256(server_config.certificate))
    pinned = pki_dir.client_config(pin=pin, resume=False)
    path, _ = pki_dir.issue("localhost", ips=["127.0.0.1"])
    cerr, serr, flow, server, _ = await attacked_handshake(
        server_config, pinned, OnHandshakeFrame(SERVER_HELLO, _substitute(path))
    )
    assert type(cerr) is securechan.PinMismatchError and type(serr) is securechan.PinMismatchError
    assert flow.alerts[Direction.C2S] == [AlertCode.CERTIFICATE_REVOKED]
    await finish(server, pinned)


async def test_right_certificate_attacker_cannot_unwrap(server_config, client_config, pki_dir) -> None:
    """A CA-valid certificate for the right name but another key (mis-issuance aside, a stolen
    certificate without its key): the client's key is wrapped to a key the real server lacks,
    so the Finished fails; the attacker, lacking that certificate's key too, learns nothing."""
    path, _ = pki_dir.issue("localhost", ips=["127.0.0.1"])
    cerr, serr, flow, server, _ = await attacked_handshake(
        server_config, client_config, OnHandshakeFrame(SERVER_HELLO, _substitute(path))
    )
    assert type(serr) is securechan.HandshakeAuthError and type(cerr) is securechan.HandshakeAuthError
    check_alerts(cerr, serr, flow)
    await finish(server, client_config)


# -- cuts -------------------------------------------------------------------------------------


class CutAfter(Attack):
    """Forward ``n`` frames (counting both directions), then cut (FIN) or reset (RST) both connections."""

    def __init__(self, n: int, reset: bool = False) -> None:
        self.n, self.seen, self.reset = n, 0, reset

    def frame(self, flow: Flow, direction: Direction, frame: bytes) -> Verdict:
        if self.seen >= self.n:
            return RESET if self.reset else CUT
        self.seen += 1
        return [frame]


@pytest.mark.parametrize("forwarded", [0, 1, 2, 3, 4], ids=["before-client-hello", "before-server-hello",
                                                            "before-key-exchange", "before-client-finished",
                                                            "before-server-finished"])
@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_cut_at_every_handshake_step(server_config, client_config, forwarded: int, how: str) -> None:
    """A FIN or an RST at any point of the handshake is a TruncationError on both sides."""
    attack = CutAfter(forwarded, reset=how == "rst")
    cerr, serr, flow, server, _ = await attacked_handshake(server_config, client_config, attack)
    assert type(cerr) is securechan.TruncationError, repr(cerr)
    if forwarded == 0:
        assert serr is None or type(serr) is securechan.TruncationError
    else:
        assert type(serr) is securechan.TruncationError, repr(serr)
    assert flow.cut
    await finish(server, client_config)


# -- replay -----------------------------------------------------------------------------------


async def test_replayed_client_handshake_is_refused(server_config, client_config) -> None:
    """A whole recorded client flight (hello, key exchange, Finished, data, close_notify) replayed
    against the server: the server's fresh randomness makes the old Finished wrong."""
    server = await start_server(server_config)
    proxy = FrameProxy(server.port)
    port = await proxy.start()
    app = await connect(port, client_config)
    app.transport.write(b"transfer 100 to mallory")  # type: ignore[union-attr]
    app.transport.write_eof()  # type: ignore[union-attr]
    await asyncio.wait_for(app.eof_event.wait(), 10)
    app.transport.close()  # type: ignore[union-attr]
    await asyncio.wait_for(proxy.flows[0].done.wait(), 10)
    await proxy.close()
    recorded = b"".join(proxy.flows[0].frames[Direction.C2S])
    assert len(server.apps) == 1 and bytes(server.apps[0].data) == b"transfer 100 to mallory"

    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(recorded)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # until the server closes
    writer.close()
    from .proxy import alert_code, split_frames

    frames = split_frames(answer)
    assert [message_type(f) for f in frames] == ["server_hello", "alert"]
    assert alert_code(frames[1]) == AlertCode.DECRYPT_ERROR
    failure = await server.next_failure()
    assert type(failure) is securechan.HandshakeAuthError and not failure.remote
    assert len(server.apps) == 1, "the replayed handshake reached the application"
    await finish(server, client_config)
