"""Mutual authentication, access lists and reload, over real loopback connections."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa

import securechan
from securechan import pki
from securechan.certs import format_pin, read_passphrase, spki_sha256
from securechan.connection import State
from securechan.reload import reload_on_signal
from securechan.streams import server_config

LOG = "securechan"


@dataclass
class Client:
    crt: Path
    key: Path
    cert: object


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory, pki_dir) -> dict[str, Client]:
    """Client identities: one per key type, an intermediate-issued one, an expired one, a foreign one."""
    d = tmp_path_factory.mktemp("ids")
    out: dict[str, Client] = {}

    def write(label: str, cert, key, *chain) -> None:
        crt, k = d / f"{label}.crt", d / f"{label}.key"
        crt.write_bytes(pki.cert_pem(cert, *chain))
        k.write_bytes(pki.key_pem(key))
        os.chmod(k, 0o600)
        out[label] = Client(crt, k, cert)

    for kt in ("ec-p256", "ed25519", "rsa2048"):
        cert, key = pki.issue_cert(
            pki_dir.ca, "alice", client=True, key_type=kt, dns=["alice.example.org"],
            uris=["spiffe://example.org/alice"],
        )
        write(kt, cert, key)
    inter = pki.make_ca("Test Intermediate CA", issuer=pki_dir.ca, path_length=0)
    cert, key = pki.issue_cert(inter, "carol", client=True, key_type="ec-p256")
    write("intermediate", cert, key, inter[0])
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    cert, key = pki.issue_cert(
        pki_dir.ca, "dave", client=True, key_type="ec-p256", not_before=past,
        not_after=past + datetime.timedelta(days=1),
    )
    write("expired", cert, key)
    other_ca = pki.make_ca("Some Other CA")
    cert, key = pki.issue_cert(other_ca, "mallory", client=True, key_type="ec-p256")
    write("foreign", cert, key)
    cert, key = pki.issue_cert(pki_dir.ca, "eve", client=True, key_type="ec-p256")
    write("eve", cert, key)
    return out


def client_cfg(pki_dir, who: Client | None, **kw) -> securechan.ClientConfig:
    if who is None:
        return securechan.ClientConfig(cafile=pki_dir.ca_file, **kw)
    return securechan.ClientConfig(cafile=pki_dir.ca_file, certfile=who.crt, keyfile=who.key, **kw)


def mtls_server(pki_dir, **kw) -> securechan.ServerConfig:
    return pki_dir.server_config(client_cafile=pki_dir.ca_file, **kw)


class Recorder:
    """A server handler that records the verified client and echoes one line."""

    def __init__(self) -> None:
        self.peers: list[object] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peercert"))
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
        writer.close()


async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, msg: bytes = b"ping\n") -> bytes:
    writer.write(msg)
    await writer.drain()
    return await reader.readline()


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (securechan.SecureChannelError, ConnectionError):
        pass


# -- success --------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec-p256", "ed25519", "rsa2048"])
async def test_mutual_auth_success(serve, pki_dir, ids, key_type: str) -> None:
    rec = Recorder()
    _, port = await serve(rec, mtls_server(pki_dir))
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_cfg(pki_dir, ids[key_type]))
    assert await echo_once(reader, writer) == b"ping\n"
    assert rec.peers[0] == ids[key_type].cert
    # The client sees the server, the server sees the client.
    assert writer.get_extra_info("peercert").subject.rfc4514_string() == "CN=localhost"
    await close(writer)


async def test_server_session_carries_client_chain(serve, pki_dir, ids) -> None:
    sessions: list[securechan.SessionInfo] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sessions.append(writer.get_extra_info("securechan"))
        await reader.read()
        writer.close()

    _, port = await serve(handler, mtls_server(pki_dir))
    _, writer = await securechan.open_connection("127.0.0.1", port, config=client_cfg(pki_dir, ids["intermediate"]))
    writer.write(b"x")
    await writer.drain()
    await asyncio.sleep(0)
    while not sessions:
        await asyncio.sleep(0.01)
    chain = sessions[0].peer_chain
    assert [c.subject.rfc4514_string() for c in chain] == ["CN=carol", "CN=Test Intermediate CA"]
    assert sessions[0].peer_certificate == ids["intermediate"].cert
    await close(writer)


async def test_intermediate_ca_chain_to_root(serve, pki_dir, ids) -> None:
    """The client CA file holds only the root; the client sends leaf + intermediate."""
    rec = Recorder()
    _, port = await serve(rec, mtls_server(pki_dir))
    reader, writer = await securechan.open_connection(
        "127.0.0.1", port, config=client_cfg(pki_dir, ids["intermediate"])
    )
    assert await echo_once(reader, writer) == b"ping\n"
    assert rec.peers == [ids["intermediate"].cert]
    await close(writer)


async def test_client_certificate_not_requested_is_not_sent(serve, pki_dir, ids) -> None:
    rec = Recorder()
    _, port = await serve(rec, pki_dir.server_config())
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_cfg(pki_dir, ids["ec-p256"]))
    assert await echo_once(reader, writer) == b"ping\n"
    assert rec.peers == [None]
    await close(writer)


@pytest.mark.parametrize(
    "allow",
    [
        securechan.AccessList(cn=["bob", "alice"]),
        securechan.AccessList(dns=["ALICE.example.org"]),
        securechan.AccessList(uri=["spiffe://example.org/alice"]),
        "pin",
    ],
    ids=["cn", "dns", "uri", "pin"],
)
async def test_access_list_admits_by_each_selector(serve, pki_dir, ids, allow) -> None:
    if allow == "pin":
        allow = securechan.AccessList(pin=[format_pin(spki_sha256(ids["ec-p256"].cert))])
    rec = Recorder()
    _, port = await serve(rec, mtls_server(pki_dir, allow=allow))
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_cfg(pki_dir, ids["ec-p256"]))
    assert await echo_once(reader, writer) == b"ping\n"
    await close(writer)


# -- refusals: each is a typed error on the client, a log line on the server, no handler call --


async def refused(serve, pki_dir, caplog, server_cfg, client_cfg_, expected: type[Exception]) -> tuple[Exception, str]:
    rec = Recorder()
    _, port = await serve(rec, server_cfg)
    caplog.set_level(logging.INFO, logger=LOG)

    async def attempt() -> None:
        reader, _ = await securechan.open_connection("127.0.0.1", port, config=client_cfg_)
        await reader.read()

    with pytest.raises(expected) as info:
        await asyncio.wait_for(attempt(), 10)
    for _ in range(200):
        lines = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
        if lines:
            break
        await asyncio.sleep(0.01)
    assert rec.peers == [], "the application must never see a refused client"
    assert len(lines) == 1
    assert "127.0.0.1:" in lines[0]
    return info.value, lines[0]


async def test_missing_client_certificate(serve, pki_dir, caplog) -> None:
    exc, line = await refused(
        serve, pki_dir, caplog, mtls_server(pki_dir), client_cfg(pki_dir, None), securechan.CertificateRequiredError
    )
    assert "server requires a client certificate; configure certfile= and keyfile=" in str(exc)
    assert not exc.remote
    assert "certificate_required" in line


async def test_untrusted_client_ca(serve, pki_dir, ids, caplog) -> None:
    exc, line = await refused(
        serve, pki_dir, caplog, mtls_server(pki_dir), client_cfg(pki_dir, ids["foreign"]), securechan.UnknownCAError
    )
    assert exc.remote and "does not trust the CA" in str(exc)
    assert "'mallory'" in line and "Some Other CA" in line and "does not chain" in line


async def test_expired_client_certificate(serve, pki_dir, ids, caplog) -> None:
    exc, line = await refused(
        serve, pki_dir, caplog, mtls_server(pki_dir), client_cfg(pki_dir, ids["expired"]),
        securechan.CertificateExpiredError,
    )
    assert exc.remote and "expired" in str(exc)
    assert "'dave'" in line and "expired on" in line


async def test_server_certificate_offered_as_client_identity_is_refused(pki_dir) -> None:
    with pytest.raises(securechan.ConfigError, match=r"cannot be used as a client certificate.*--client"):
        securechan.ClientConfig(cafile=pki_dir.ca_file, certfile=pki_dir.server_cert, keyfile=pki_dir.server_key)


@pytest.mark.parametrize(
    "allow",
    [
        securechan.AccessList(cn=["bob"]),
        securechan.AccessList(dns=["bob.example.org"]),
        securechan.AccessList(uri=["spiffe://example.org/bob"]),
        securechan.AccessList(pin=["sha256:" + "00" * 32]),
    ],
    ids=["cn", "dns", "uri", "pin"],
)
async def test_access_list_miss_by_each_selector(serve, pki_dir, ids, caplog, allow) -> None:
    exc, line = await refused(
        serve, pki_dir, caplog, mtls_server(pki_dir, allow=allow), client_cfg(pki_dir, ids["ec-p256"]),
        securechan.AccessDeniedError,
    )
    assert exc.remote and "access list" in str(exc)
    assert "CN=alice" in line and "URI:spiffe://example.org/alice" in line and "not on the access list" in line
    assert format_pin(spki_sha256(ids["ec-p256"].cert)) in line


async def test_signature_by_another_key_is_refused(serve, pki_dir, ids, caplog) -> None:
    """A client that presents alice's certificate without her key fails the signature check."""
    cfg = client_cfg(pki_dir, ids["ec-p256"])
    object.__setattr__(cfg, "_identity_key", pki.generate_key("ec-p256"))
    exc, line = await refused(serve, pki_dir, caplog, mtls_server(pki_dir), cfg, securechan.HandshakeAuthError)
    assert exc.remote
    assert "signature" in line and "'alice'" in line


# -- the sans-IO state machine: a client that skips ClientCertificate -----------------------


def pump(a: securechan.Connection, b: securechan.Connection) -> None:
    for _ in range(10):
        out = a.data_to_send()
        if out:
            b.receive_data(out)
        back = b.data_to_send()
        if back:
            a.receive_data(back)
        if not out and not back:
            return


def test_server_waits_for_client_certificate_then_refuses_a_client_that_skips_it(pki_dir) -> None:
    server = securechan.Connection(mtls_server(pki_dir))
    client = securechan.Connection(client_cfg(pki_dir, None), server_name="localhost")
    server.receive_data(client.data_to_send())
    assert server.state is State.SERVER_WAIT_CLIENT_CERTIFICATE
    hs = client._hs
    assert hs is not None
    hs._client_certificate = lambda schemes: None  # type: ignore[method-assign]
    client.receive_data(server.data_to_send())  # ServerHello; the client answers KeyExchange + Finished
    with pytest.raises(securechan.CertificateRequiredError, match="presented no certificate"):
        server.receive_data(client.data_to_send())
    assert server.state is State.FAILED and server.session is None
    with pytest.raises(securechan.CertificateRequiredError) as info:
        client.receive_data(server.data_to_send())
    assert info.value.remote


def test_mutual_auth_over_sans_io(pki_dir, ids) -> None:
    server = securechan.Connection(mtls_server(pki_dir))
    client = securechan.Connection(client_cfg(pki_dir, ids["ed25519"]), server_name="localhost")
    pump(client, server)
    assert server.handshake_complete and client.handshake_complete
    assert server.session is not None and server.session.peer_certificate == ids["ed25519"].cert
    assert server.session.export_keying_material(b"x") == client.session.export_keying_material(b"x")


# -- configuration errors -------------------------------------------------------------------


def test_client_identity_needs_both_files(pki_dir, ids) -> None:
    with pytest.raises(securechan.ConfigError, match="needs both certfile="):
        securechan.ClientConfig(cafile=pki_dir.ca_file, certfile=ids["ec-p256"].crt)
    with pytest.raises(securechan.ConfigError, match="needs both certfile="):
        securechan.ClientConfig(cafile=pki_dir.ca_file, keyfile=ids["ec-p256"].key)


def test_client_key_that_does_not_match(pki_dir, ids) -> None:
    with pytest.raises(securechan.ConfigError, match="does not match the certificate"):
        securechan.ClientConfig(cafile=pki_dir.ca_file, certfile=ids["ec-p256"].crt, keyfile=ids["ed25519"].key)


def test_client_certificate_as_server_identity_is_refused(pki_dir, ids, tmp_path) -> None:
    cert, key = pki.issue_cert(pki_dir.ca, "client-only", client=True, key_type="rsa2048")
    crt, k = pki_dir.write("client-only", cert, key)
    with pytest.raises(securechan.ConfigError, match="cannot be used as a server certificate"):
        securechan.ServerConfig(certfile=crt, keyfile=k)


def test_ca_certificate_as_identity_is_refused(pki_dir, tmp_path) -> None:
    key = tmp_path / "ca.key"
    key.write_bytes(pki.key_pem(pki_dir.ca[1]))
    os.chmod(key, 0o600)
    with pytest.raises(securechan.ConfigError, match="is a CA certificate"):
        securechan.ClientConfig(cafile=pki_dir.ca_file, certfile=pki_dir.ca_file, keyfile=key)


def test_allow_without_client_ca_is_refused(pki_dir) -> None:
    with pytest.raises(securechan.ConfigError, match="needs client_cafile="):
        pki_dir.server_config(allow=securechan.AccessList(cn=["alice"]))
    with pytest.raises(securechan.ConfigError, match=r"must be a securechan\.AccessList"):
        pki_dir.server_config(client_cafile=pki_dir.ca_file, allow=["alice"])


def test_access_list_validation() -> None:
    assert not securechan.AccessList()
    assert securechan.AccessList.from_args(cn=["a"], dns=None).cn == ("a",)
    assert securechan.AccessList(cn="solo").cn == ("solo",)
    with pytest.raises(securechan.ConfigError, match="not a URI"):
        securechan.AccessList(uri=["example.org/web"])
    with pytest.raises(securechan.ConfigError, match="not a SHA-256 SPKI fingerprint"):
        securechan.AccessList(pin=["sha256:abcd"])
    with pytest.raises(securechan.ConfigError, match="non-empty string"):
        securechan.AccessList(cn=[""])


def test_passphrases_never_in_repr(pki_dir, tmp_path) -> None:
    cert, key = pki.issue_cert(pki_dir.ca, "henry", client=True, key_type="ec-p256")
    crt, k = tmp_path / "henry.crt", tmp_path / "henry.key"
    crt.write_bytes(pki.cert_pem(cert))
    k.write_bytes(pki.key_pem(key, b"hunter2-secret"))
    os.chmod(k, 0o600)
    cfg = securechan.ClientConfig(cafile=pki_dir.ca_file, certfile=crt, keyfile=k, password="hunter2-secret")
    assert "hunter2" not in repr(cfg)
    assert "hunter2" not in repr(pki_dir.server_config(password=None))


def test_encrypted_client_key(pki_dir, tmp_path, monkeypatch) -> None:
    cert, key = pki.issue_cert(pki_dir.ca, "frank", client=True, key_type="ec-p256")
    crt, k = tmp_path / "frank.crt", tmp_path / "frank.key"
    crt.write_bytes(pki.cert_pem(cert))
    k.write_bytes(pki.key_pem(key, b"correct horse"))
    os.chmod(k, 0o600)
    with pytest.raises(securechan.ConfigError, match="is encrypted: give its passphrase"):
        securechan.ClientConfig(cafile=pki_dir.ca_file, certfile=crt, keyfile=k)
    with pytest.raises(securechan.ConfigError, match="wrong passphrase"):
        securechan.ClientConfig(cafile=pki_dir.ca_file, certfile=crt, keyfile=k, password="nope")
    monkeypatch.setenv("FRANK_PASS", "correct horse")
    pw = read_passphrase("FRANK_PASS", None)
    cfg = securechan.ClientConfig(cafile=pki_dir.ca_file, certfile=crt, keyfile=k, password=pw)
    assert cfg._identity_key is not None
    passfile = tmp_path / "pass.txt"
    passfile.write_text("correct horse\n")
    assert read_passphrase(None, passfile) == b"correct horse"


def test_read_passphrase_errors(tmp_path, monkeypatch) -> None:
    assert read_passphrase(None, None) is None
    monkeypatch.delenv("NO_SUCH_PASS", raising=False)
    with pytest.raises(securechan.ConfigError, match=r"'NO_SUCH_PASS'.*is not set"):
        read_passphrase("NO_SUCH_PASS", None)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(securechan.ConfigError, match="empty passphrase"):
        read_passphrase(None, empty)
    with pytest.raises(securechan.ConfigError, match="not both"):
        read_passphrase("X", empty)
    with pytest.raises(securechan.ConfigError, match="does not exist"):
        read_passphrase(None, tmp_path / "missing")


def test_world_readable_client_key_warns(pki_dir, tmp_path, caplog) -> None:
    cert, key = pki.issue_cert(pki_dir.ca, "gina", client=True, key_type="ec-p256")
    crt, k = tmp_path / "gina.crt", tmp_path / "gina.key"
    crt.write_bytes(pki.cert_pem(cert))
    k.write_bytes(pki.key_pem(key))
    os.chmod(k, 0o644)
    with caplog.at_level(logging.WARNING, logger=LOG):
        securechan.ClientConfig(cafile=pki_dir.ca_file, certfile=crt, keyfile=k)
    assert any("readable by other users" in r.getMessage() and "chmod 600" in r.getMessage() for r in caplog.records)


# -- reload ---------------------------------------------------------------------------------


def second_server_identity(pki_dir) -> tuple[Path, Path, object]:
    cert, key = pki.issue_cert(pki_dir.ca, "localhost", ips=["127.0.0.1"], dns=["reloaded.example.org"])
    crt, k = pki_dir.write("reloaded", cert, key)
    return crt, k, cert


async def test_reload_under_traffic(serve, pki_dir) -> None:
    rec = Recorder()
    server, port = await serve(rec, pki_dir.server_config())
    old_reader, old_writer = await securechan.open_connection("127.0.0.1", port, config=pki_dir.client_config())
    assert await echo_once(old_reader, old_writer) == b"ping\n"
    old_cert = old_writer.get_extra_info("peercert")

    crt, k, new_cert = second_server_identity(pki_dir)
    new_config = securechan.ServerConfig(certfile=crt, keyfile=k)
    securechan.reload_server(server, new_config)
    assert server_config(server) is new_config

    # The open connection keeps working, under its original session.
    for i in range(20):
        assert await echo_once(old_reader, old_writer, b"%d\n" % i) == b"%d\n" % i
    assert old_writer.get_extra_info("peercert") == old_cert
    # A new connection sees the new certificate.
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=pki_dir.client_config())
    assert writer.get_extra_info("peercert") == new_cert != old_cert
    assert await echo_once(reader, writer) == b"ping\n"
    await close(writer)
    await close(old_writer)


async def test_reload_with_broken_files_keeps_old_identity(serve, pki_dir, tmp_path) -> None:
    server, port = await serve(Recorder(), pki_dir.server_config())
    before = (await securechan.open_connection("127.0.0.1", port, config=pki_dir.client_config()))[1]
    broken = tmp_path / "broken.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(securechan.ConfigError):
        securechan.reload_server(server, securechan.ServerConfig(certfile=broken, keyfile=pki_dir.server_key))
    mismatched_key = tmp_path / "other.key"
    mismatched_key.write_bytes(pki.key_pem(pki.generate_key("rsa2048")))
    os.chmod(mismatched_key, 0o600)
    with pytest.raises(securechan.ConfigError, match="does not match"):
        securechan.reload_server(server, securechan.ServerConfig(certfile=pki_dir.server_cert, keyfile=mismatched_key))
    after = (await securechan.open_connection("127.0.0.1", port, config=pki_dir.client_config()))[1]
    assert after.get_extra_info("peercert") == before.get_extra_info("peercert")
    await close(before)
    await close(after)


async def test_reload_access_list(serve, pki_dir, ids) -> None:
    """A new access list applies to new handshakes; a client admitted before keeps its connection."""
    server, port = await serve(Recorder(), mtls_server(pki_dir))
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=client_cfg(pki_dir, ids["ec-p256"]))
    securechan.reload_server(server, mtls_server(pki_dir, allow=securechan.AccessList(cn=["eve"])))
    assert await echo_once(reader, writer) == b"ping\n"
    with pytest.raises(securechan.AccessDeniedError):
        r2, _ = await securechan.open_connection("127.0.0.1", port, config=client_cfg(pki_dir, ids["ec-p256"]))
        await r2.read()
    r3, w3 = await securechan.open_connection("127.0.0.1", port, config=client_cfg(pki_dir, ids["eve"]))
    assert await echo_once(r3, w3) == b"ping\n"
    await close(w3)
    await close(writer)


async def test_reload_server_refuses_foreign_servers_and_configs(pki_dir) -> None:
    plain = await asyncio.get_running_loop().create_server(asyncio.Protocol, "127.0.0.1", 0)
    try:
        with pytest.raises(securechan.ConfigError, match="not created by securechan"):
            securechan.reload_server(plain, pki_dir.server_config())
        with pytest.raises(securechan.ConfigError, match=r"needs a securechan\.ServerConfig"):
            securechan.reload_server(plain, pki_dir.client_config())  # type: ignore[arg-type]
    finally:
        plain.close()
        await plain.wait_closed()


async def test_reload_on_sighup(serve, pki_dir, tmp_path, caplog) -> None:
    """The CLI path: SIGHUP rebuilds the config from the same file names; a broken file keeps the old one."""
    crt, key = tmp_path / "live.crt", tmp_path / "live.key"
    crt.write_bytes(pki_dir.server_cert.read_bytes())
    key.write_bytes(pki_dir.server_key.read_bytes())
    os.chmod(key, 0o600)
    server, port = await serve(Recorder(), securechan.ServerConfig(certfile=crt, keyfile=key))
    results: asyncio.Queue[BaseException | None] = asyncio.Queue()
    uninstall = reload_on_signal(
        server, lambda: securechan.ServerConfig(certfile=crt, keyfile=key), on_reload=results.put_nowait
    )
    try:
        new_crt, new_key, new_cert = second_server_identity(pki_dir)
        crt.write_bytes(new_crt.read_bytes())
        key.write_bytes(new_key.read_bytes())
        os.kill(os.getpid(), signal.SIGHUP)
        assert await asyncio.wait_for(results.get(), 10) is None
        _, w = await securechan.open_connection("127.0.0.1", port, config=pki_dir.client_config())
        assert w.get_extra_info("peercert") == new_cert
        await close(w)

        caplog.set_level(logging.ERROR, logger=LOG)
        crt.write_text("garbage")
        os.kill(os.getpid(), signal.SIGHUP)
        error = await asyncio.wait_for(results.get(), 10)
        assert isinstance(error, securechan.ConfigError)
        assert any("still serving the previous certificate" in r.getMessage() for r in caplog.records)
        _, w = await securechan.open_connection("127.0.0.1", port, config=pki_dir.client_config())
        assert w.get_extra_info("peercert") == new_cert
        await close(w)
    finally:
        uninstall()


# -- misbehaving clients, through the sans-IO Connection ------------------------------------


def flight_refused(pki_dir, cfg: securechan.ClientConfig, expected: type[Exception]) -> Exception:
    """Run one handshake in memory; the server must refuse only after the client's whole flight."""
    server = securechan.Connection(mtls_server(pki_dir))
    client = securechan.Connection(cfg, server_name="localhost")
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    flight = client.data_to_send()
    assert all(t in flight for t in (b"client_certificate", b"key_exchange", b"finished"))  # the whole flight
    with pytest.raises(expected) as local:
        server.receive_data(flight)
    assert server.session is None and not server.handshake_complete
    with pytest.raises(expected) as remote:
        client.receive_data(server.data_to_send())
    assert remote.value.remote and not remote.value.authenticated
    return local.value


def test_client_signing_with_a_scheme_that_does_not_fit_its_key(pki_dir, ids, monkeypatch) -> None:
    from securechan import handshake
    from securechan.clientauth import SignatureScheme, sign

    def wrong(key, th):  # an Ed25519 signature labelled as ECDSA
        return SignatureScheme.ECDSA_SECP256R1_SHA256, sign(key, th)[1]

    monkeypatch.setattr(handshake, "sign", wrong)
    exc = flight_refused(pki_dir, client_cfg(pki_dir, ids["ed25519"]), securechan.IllegalParameterError)
    assert "holds a key for ED25519" in str(exc)


def test_client_signing_with_a_scheme_the_server_did_not_offer(pki_dir, ids, monkeypatch) -> None:
    from securechan import handshake
    from securechan.clientauth import sign

    monkeypatch.setattr(handshake, "sign", lambda key, th: (0x0999, sign(key, th)[1]))
    exc = flight_refused(pki_dir, client_cfg(pki_dir, ids["ec-p256"]), securechan.IllegalParameterError)
    assert "did not offer" in str(exc)


def test_client_certificate_that_is_not_der(pki_dir, ids) -> None:
    cfg = client_cfg(pki_dir, ids["ec-p256"])
    object.__setattr__(cfg, "_identity_der", (b"not a certificate",))
    exc = flight_refused(pki_dir, cfg, securechan.CertificateError)
    assert "not valid DER" in str(exc)


def test_tampered_client_flight_is_a_finished_failure_first(pki_dir, ids) -> None:
    """A client-auth verdict is never reported for a flight whose Finished does not verify."""
    server = securechan.Connection(mtls_server(pki_dir))
    client = securechan.Connection(client_cfg(pki_dir, ids["foreign"]), server_name="localhost")
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    flight = bytearray(client.data_to_send())
    flight[-1] ^= 1  # the last byte of the client's Finished MAC
    with pytest.raises(securechan.HandshakeAuthError):
        server.receive_data(bytes(flight))


def test_no_common_client_signature_scheme(pki_dir, ids, monkeypatch) -> None:
    from securechan import handshake

    monkeypatch.setattr(handshake, "SUPPORTED_SCHEMES", (0x0804,))  # a server accepting only RSA-PSS
    server = securechan.Connection(mtls_server(pki_dir))
    client = securechan.Connection(client_cfg(pki_dir, ids["ec-p256"]), server_name="localhost")
    server.receive_data(client.data_to_send())
    with pytest.raises(securechan.NoCommonSuiteError, match="none of which fits this client's key"):
        client.receive_data(server.data_to_send())
    with pytest.raises(securechan.NoCommonSuiteError) as info:
        server.receive_data(client.data_to_send())
    assert info.value.remote


@pytest.mark.parametrize(
    ("make_key", "message"),
    [
        (lambda: ec.generate_private_key(ec.SECP384R1()), "only P-256 is supported"),
        (lambda: rsa.generate_private_key(65537, 1024), "at least 2048"),
    ],
    ids=["ec-p384", "rsa1024"],
)
def test_unsupported_client_keys(pki_dir, tmp_path, make_key, message: str) -> None:
    key = make_key()
    cert, _ = pki.issue_cert(pki_dir.ca, "weak", client=True, key=key)
    crt, k = tmp_path / "weak.crt", tmp_path / "weak.key"
    crt.write_bytes(pki.cert_pem(cert))
    k.write_bytes(pki.key_pem(key))
    os.chmod(k, 0o600)
    with pytest.raises(securechan.ConfigError, match=message):
        securechan.ClientConfig(cafile=pki_dir.ca_file, certfile=crt, keyfile=k)


@pytest.mark.parametrize(
    ("make_key", "message"),
    [
        (lambda: ed448.Ed448PrivateKey.generate(), "client key must be RSA (2048+ bits), EC P-256 or Ed25519"),
        (lambda: ec.generate_private_key(ec.SECP384R1()), "client EC key is on curve secp384r1; only P-256"),
        (lambda: rsa.generate_private_key(65537, 1024), "client RSA key is 1024 bits; at least 2048"),
    ],
    ids=["ed448", "ec-p384", "rsa1024"],
)
def test_client_certificate_with_an_unsupported_key_is_insufficient_security(
    pki_dir, ids, make_key, message: str
) -> None:
    """A client presenting a CA-issued certificate whose key no scheme covers (ClientConfig would refuse to
    load it, so a client that swaps in its DER): refused after its Finished with insufficient_security."""
    import re

    from cryptography.hazmat.primitives.serialization import Encoding

    weak, _ = pki.issue_cert(pki_dir.ca, "weak", client=True, key=make_key())
    cfg = client_cfg(pki_dir, ids["ec-p256"])
    object.__setattr__(cfg, "_identity_der", (weak.public_bytes(Encoding.DER),))
    exc = flight_refused(pki_dir, cfg, securechan.InsufficientSecurityError)
    assert type(exc) is securechan.InsufficientSecurityError
    assert re.search("client certificate for 'weak': " + re.escape(message), str(exc))


def test_access_list_semantics_without_a_handshake(pki_dir) -> None:
    # An empty list admits every verified certificate; a DNS entry never matches a certificate that
    # has no subject alternative names at all (and the refusal names the client and the list).
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    ca_cert, ca_key = pki_dir.ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    no_san = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    everyone = securechan.AccessList()
    assert everyone.empty and everyone.describe() == "everyone with a verified certificate"
    assert everyone.admits(no_san)
    by_dns = securechan.AccessList(dns=["alice"])
    assert not by_dns.admits(no_san)
    with pytest.raises(securechan.AccessDeniedError, match=r"\(CN=alice, sha256:[0-9a-f]{64}\) is valid but not on "
                                                           r"the access list \(dns=\[alice\]\)"):
        by_dns.check(no_san)
    assert securechan.AccessList(cn=["alice"]).admits(no_san)
