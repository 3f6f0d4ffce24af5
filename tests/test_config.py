"""Configs are immutable and check their files when built, with errors that say what to do."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import logging
import os
import signal
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, rsa

import securechan
from securechan import pki
from securechan.certs import VerifiedChains
from securechan.config import DEFAULT_KEY_UPDATE_BYTES, DEFAULT_KEY_UPDATE_RECORDS
from securechan.reload import reload_on_signal


def test_configs_are_immutable(server_config, client_config) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        server_config.max_record_size = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        client_config.cafile = "x"  # type: ignore[misc]


def test_missing_files(tmp_path, pki_dir) -> None:
    with pytest.raises(securechan.ConfigError, match="does not exist"):
        securechan.ServerConfig(certfile=tmp_path / "nope.crt", keyfile=pki_dir.server_key)
    with pytest.raises(securechan.ConfigError, match="does not exist"):
        securechan.ClientConfig(cafile=tmp_path / "nope.crt")


def test_key_does_not_match_certificate(pki_dir) -> None:
    _, other_key = pki_dir.issue("other.example")
    with pytest.raises(securechan.ConfigError, match="does not match the certificate"):
        securechan.ServerConfig(certfile=pki_dir.server_cert, keyfile=other_key)


def test_swapped_cert_and_key(pki_dir) -> None:
    with pytest.raises(securechan.ConfigError, match="swap certfile and keyfile"):
        securechan.ServerConfig(certfile=pki_dir.server_key, keyfile=pki_dir.server_cert)


@pytest.mark.parametrize("key_type", ["ec-p256", "ed25519"])
def test_server_key_must_be_rsa(pki_dir, key_type: str) -> None:
    crt, key = pki_dir.issue("ec.example", key_type=key_type)
    with pytest.raises(securechan.ConfigError, match="needs an RSA key"):
        securechan.ServerConfig(certfile=crt, keyfile=key)


def test_encrypted_key_needs_passphrase(pki_dir, tmp_path) -> None:
    cert, key = pki.issue_cert(pki_dir.ca, "enc.example")
    (tmp_path / "e.crt").write_bytes(pki.cert_pem(cert))
    (tmp_path / "e.key").write_bytes(pki.key_pem(key, b"s3cret"))
    os.chmod(tmp_path / "e.key", 0o600)
    with pytest.raises(securechan.ConfigError, match="is encrypted: give its passphrase"):
        securechan.ServerConfig(certfile=tmp_path / "e.crt", keyfile=tmp_path / "e.key")
    with pytest.raises(securechan.ConfigError, match="wrong passphrase") as info:
        securechan.ServerConfig(certfile=tmp_path / "e.crt", keyfile=tmp_path / "e.key", password="wrong")
    assert "wrong" not in str(info.value).replace("wrong passphrase", "")  # the passphrase is never echoed
    assert securechan.ServerConfig(certfile=tmp_path / "e.crt", keyfile=tmp_path / "e.key", password="s3cret")


def test_world_readable_key_warns(pki_dir, tmp_path, caplog) -> None:
    cert, key = pki.issue_cert(pki_dir.ca, "open.example")
    (tmp_path / "o.crt").write_bytes(pki.cert_pem(cert))
    (tmp_path / "o.key").write_bytes(pki.key_pem(key))
    os.chmod(tmp_path / "o.key", 0o644)
    securechan.ServerConfig(certfile=tmp_path / "o.crt", keyfile=tmp_path / "o.key")
    assert any("readable by other users" in r.message and "chmod 600" in r.message for r in caplog.records)


def test_client_needs_a_trust_source() -> None:
    with pytest.raises(securechan.ConfigError, match="verification is never skipped"):
        securechan.ClientConfig()


@pytest.mark.parametrize("pin", ["sha256:zz", "md5:" + "00" * 16, "sha256:" + "00" * 31, "sha256:" + "zz" * 32])
def test_bad_pin_format(pin: str) -> None:
    with pytest.raises(securechan.ConfigError, match="is not a SHA-256 SPKI fingerprint"):
        securechan.ClientConfig(pin=pin)


def test_pin_formats_accepted(server_config) -> None:
    import base64

    from securechan.certs import spki_sha256

    digest = spki_sha256(server_config.certificate)
    for form in ("sha256:" + digest.hex(), digest.hex(), "sha256/" + base64.b64encode(digest).decode()):
        assert securechan.ClientConfig(pin=form)._pins == (digest,)


def test_ca_file_that_is_not_a_certificate(tmp_path) -> None:
    (tmp_path / "junk.pem").write_text("hello\n")
    with pytest.raises(securechan.ConfigError, match="holds no readable PEM certificate"):
        securechan.ClientConfig(cafile=tmp_path / "junk.pem")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"suites": []}, "at least one"),
        ({"suites": ["AES-512-XYZ"]}, "unknown suite"),
        ({"suites": ["AES-256-GCM", "aes_256_gcm"]}, "twice"),
        ({"versions": [2]}, "subset"),
        ({"max_record_size": 10}, "max_record_size"),
        ({"handshake_timeout": 0}, "positive"),
        ({"key_update_records": 0}, f"key_update_records must be between 1 and {DEFAULT_KEY_UPDATE_RECORDS * 2}"),
        ({"key_update_records": DEFAULT_KEY_UPDATE_RECORDS * 2 + 1}, "key_update_records must be between 1 and"),
        ({"key_update_bytes": 0}, f"key_update_bytes must be between 1 and {DEFAULT_KEY_UPDATE_BYTES * 2}"),
        ({"key_update_bytes": DEFAULT_KEY_UPDATE_BYTES * 2 + 1}, "key_update_bytes must be between 1 and"),
    ],
)
def test_bad_common_settings(pki_dir, kw: dict, message: str) -> None:
    with pytest.raises(securechan.ConfigError, match=message):
        pki_dir.client_config(**kw)


def test_suite_names_are_flexible(pki_dir) -> None:
    cfg = pki_dir.client_config(suites=["chacha20-poly1305", 2, securechan.Suite.AES_256_GCM])
    assert cfg.suites == (
        securechan.Suite.CHACHA20_POLY1305,
        securechan.Suite.AES_128_GCM,
        securechan.Suite.AES_256_GCM,
    )


def test_wrong_config_role(pki_dir) -> None:
    import asyncio

    async def go() -> None:
        with pytest.raises(securechan.ConfigError, match="ClientConfig"):
            await securechan.open_connection("127.0.0.1", 1, config=pki_dir.server_config())  # type: ignore[arg-type]

    asyncio.run(go())


def test_own_expired_certificate_warns_at_startup(pki_dir, caplog) -> None:
    import datetime

    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    crt, key = pki_dir.issue("stale.example", not_before=past - datetime.timedelta(days=30), not_after=past)
    securechan.ServerConfig(certfile=crt, keyfile=key)
    assert any("expired on" in r.message and "peers will refuse it" in r.message for r in caplog.records)


def test_leaf_certificate_as_trust_anchor_warns(pki_dir, caplog) -> None:
    securechan.ClientConfig(cafile=pki_dir.server_cert)
    assert any("is not a CA certificate" in r.message for r in caplog.records)
    caplog.clear()
    pki_dir.client_config()
    assert not any("is not a CA certificate" in r.message for r in caplog.records)


# -- files that cannot be used, and why -------------------------------------------------------------


def test_certificate_path_that_is_a_directory(tmp_path: Path, pki_dir) -> None:
    with pytest.raises(securechan.ConfigError, match=r"CA file '.*' is a directory, not a PEM file"):
        securechan.ClientConfig(cafile=tmp_path)
    with pytest.raises(securechan.ConfigError, match=r"key file '.*' is a directory, not a PEM file"):
        securechan.ServerConfig(certfile=pki_dir.server_cert, keyfile=tmp_path)


def _error_as_unprivileged_user(build) -> str:
    """Run ``build`` in a forked child that dropped root (root reads any file); return its error as text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)  # "nobody": file permission bits apply again
            try:
                build()
                text = "no error"
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
        except BaseException as exc:  # anything the child hits goes to the parent
            text = f"child failed: {type(exc).__name__}: {exc}"
        os.write(write_end, text.encode())
        os._exit(0)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits and fork")
def test_unreadable_certificate_file(pki_dir) -> None:
    # Root reads any file whatever its mode, so as root the check runs in a child that dropped to
    # "nobody"; the folder is traversable for it, so the file's own mode is what refuses.
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        secret = Path(folder) / "ca.crt"
        secret.write_bytes(pki_dir.ca_file.read_bytes())
        os.chmod(secret, 0o000)

        def build() -> None:
            securechan.ClientConfig(cafile=secret)

        if os.geteuid() == 0:
            text = _error_as_unprivileged_user(build)
        else:
            with pytest.raises(securechan.ConfigError) as info:
                build()
            text = f"ConfigError: {info.value}"
    assert text == f"ConfigError: CA file {str(secret)!r} is not readable by this user"


def test_file_over_one_mebibyte(tmp_path: Path) -> None:
    big = tmp_path / "big.pem"
    big.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(securechan.ConfigError,
                       match=r"CA file '.*big.pem' is larger than 1 MiB; is it the right file\?"):
        securechan.ClientConfig(cafile=big)
    exactly = tmp_path / "exactly.pem"
    exactly.write_bytes(b"#" * (1024 * 1024))  # at the limit: read, then refused for its contents only
    with pytest.raises(securechan.ConfigError, match="holds no readable PEM certificate"):
        securechan.ClientConfig(cafile=exactly)


def test_passphrase_for_an_unencrypted_key(pki_dir) -> None:
    with pytest.raises(securechan.ConfigError, match=r"key file '.*' is not encrypted, but a passphrase was given"):
        pki_dir.server_config(password="s3cret")


def test_certificate_given_as_the_key(pki_dir) -> None:
    with pytest.raises(securechan.ConfigError,
                       match=r"key file '.*server.crt' holds a certificate, not a private key; "
                             "swap certfile and keyfile"):
        securechan.ServerConfig(certfile=pki_dir.server_cert, keyfile=pki_dir.server_cert)


def test_key_file_with_no_key(pki_dir, tmp_path: Path) -> None:
    (tmp_path / "junk.key").write_text("hello\n")
    with pytest.raises(securechan.ConfigError, match=r"key file '.*junk.key' holds no readable PEM private key"):
        securechan.ServerConfig(certfile=pki_dir.server_cert, keyfile=tmp_path / "junk.key")


def _der(tag: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([tag, len(body)]) + body


def test_key_on_a_curve_the_library_cannot_load(pki_dir, tmp_path: Path) -> None:
    # A SEC1 EC key on secp112r1 (OID 1.3.132.0.6), a legacy curve: the loader raises UnsupportedAlgorithm.
    curve = _der(0x06, bytes([0x2B, 0x81, 0x04, 0x00, 0x06]))
    sec1 = _der(0x30, _der(0x02, b"\x01") + _der(0x04, b"\x01" * 14) + _der(0xA0, curve))
    path = tmp_path / "legacy.key"
    path.write_text("-----BEGIN EC PRIVATE KEY-----\n" + base64.b64encode(sec1).decode()
                    + "\n-----END EC PRIVATE KEY-----\n")
    os.chmod(path, 0o600)
    with pytest.raises(securechan.ConfigError,
                       match=r"key file '.*legacy.key': unsupported key \(UnsupportedAlgorithm: .*1\.3\.132\.0\.6.*\); "
                             r"use RSA, EC P-256 or Ed25519"):
        securechan.ServerConfig(certfile=pki_dir.server_cert, keyfile=path)


def test_dsa_key_is_refused(pki_dir, tmp_path: Path) -> None:
    key = dsa.generate_private_key(2048)
    path = tmp_path / "dsa.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    with pytest.raises(securechan.ConfigError,
                       match=r"key file '.*dsa.key' holds a DSA key; use RSA, EC P-256 or Ed25519"):
        securechan.ServerConfig(certfile=pki_dir.server_cert, keyfile=path)


def test_rsa_key_under_2048_bits(pki_dir) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cert, key = pki.issue_cert(pki_dir.ca, "weak.example", key=weak)
    crt, key_path = pki_dir.write("weak", cert, key)
    with pytest.raises(securechan.ConfigError, match="server RSA key is 1024 bits; at least 2048 are required"):
        securechan.ServerConfig(certfile=crt, keyfile=key_path)


def _bare_certificate(pki_dir, name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A certificate with no extensions at all (no basicConstraints, no extended key usage), as old tools made."""
    ca_cert, ca_key = pki_dir.ca
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def test_certificate_without_constraints_or_usage(pki_dir, caplog) -> None:
    cert, key = _bare_certificate(pki_dir, "bare.example")
    crt, key_path = pki_dir.write("bare", cert, key)
    # as a server identity: no basicConstraints means not a CA, no extended key usage means any use
    assert securechan.ServerConfig(certfile=crt, keyfile=key_path).certificate == cert
    # as a trust anchor: without basicConstraints it is no CA, and the user is told so
    caplog.set_level(logging.WARNING, logger="securechan")
    securechan.ClientConfig(cafile=crt)
    assert any("holds 'bare.example', which is not a CA certificate" in r.getMessage() for r in caplog.records)


def test_password_without_client_identity(pki_dir) -> None:
    with pytest.raises(securechan.ConfigError, match="password= was given without certfile= and keyfile="):
        pki_dir.client_config(password="s3cret")


def test_ticket_rotation_under_one_second(pki_dir) -> None:
    with pytest.raises(securechan.ConfigError, match="ticket_rotation must be at least 1 second"):
        pki_dir.server_config(ticket_rotation=0.5, ticket_lifetime=1)


def test_continue_from_without_ticket_state(pki_dir) -> None:
    """A reload to or from a config without tickets (or from none at all) carries nothing over."""
    with_tickets = pki_dir.server_config()
    without = pki_dir.server_config(tickets=False)
    with_tickets.continue_from(None)
    with_tickets.continue_from(without)
    without.continue_from(with_tickets)
    assert without.ticket_keys is None
    assert with_tickets.ticket_keys is not None


def test_verified_chain_cache_forgets_the_oldest(pki_dir) -> None:
    ca_cert = pki_dir.ca[0]
    cache = VerifiedChains(size=2)
    for der in (b"one", b"two", b"three"):
        cache.put((der,), "localhost", [ca_cert], [ca_cert])
    assert cache.get((b"one",), "localhost") is None
    assert cache.get((b"two",), "localhost") == [ca_cert]
    assert cache.get((b"three",), "localhost") == [ca_cert]


# -- trust anchors given as data ------------------------------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read(100))
    await writer.drain()
    writer.close()


async def test_ca_given_as_data_over_loopback(serve, pki_dir, server_config) -> None:
    _, port = await serve(_echo, server_config)
    good = securechan.ClientConfig(cadata=pki_dir.ca_file.read_text())
    reader, writer = await securechan.open_connection("127.0.0.1", port, config=good, server_name="localhost")
    writer.write(b"ping")
    assert await reader.read(100) == b"ping"
    writer.close()
    other_ca = pki.make_ca("Some Other CA")
    wrong = securechan.ClientConfig(cadata=pki.cert_pem(other_ca[0]))
    with pytest.raises(securechan.UnknownCAError, match="does not chain to a CA trusted by the configured CA data"):
        await securechan.open_connection("127.0.0.1", port, config=wrong, server_name="localhost")


# -- reload on a signal -------------------------------------------------------------------------------------


async def test_reload_whose_build_hits_an_os_error_keeps_serving(serve, pki_dir, server_config, tmp_path,
                                                                  caplog) -> None:
    """The build callable may read files of its own; an OSError there is logged and the old identity kept."""
    pointer = tmp_path / "current-cert"
    pointer.write_text(str(pki_dir.server_cert))
    server, port = await serve(_echo, server_config)
    results: asyncio.Queue[BaseException | None] = asyncio.Queue()

    def build() -> securechan.ServerConfig:
        return securechan.ServerConfig(certfile=pointer.read_text(), keyfile=pki_dir.server_key)

    uninstall = reload_on_signal(server, build, on_reload=results.put_nowait)
    try:
        caplog.set_level(logging.ERROR, logger="securechan")
        pointer.unlink()
        os.kill(os.getpid(), signal.SIGHUP)
        error = await asyncio.wait_for(results.get(), 10)
        assert isinstance(error, FileNotFoundError)
        assert any(r.getMessage().startswith("reload failed, still serving the previous certificate: [Errno 2]")
                   for r in caplog.records)
        reader, writer = await securechan.open_connection("127.0.0.1", port, config=pki_dir.client_config(),
                                                          server_name="localhost")
        assert writer.get_extra_info("peercert") == server_config.certificate
        writer.close()
    finally:
        uninstall()


@pytest.mark.parametrize("kind", ["FIFO", "symlink loop"])
def test_a_pem_path_that_is_no_readable_file(pki_dir, tmp_path: Path, kind: str) -> None:
    # A FIFO in a certificate's place is refused without blocking (a reload runs on the event loop);
    # any other OS error (here ELOOP) is a ConfigError naming the file, not a raw OSError.
    path = tmp_path / "ca.crt"
    if kind == "FIFO":
        os.mkfifo(path)
        expected = r"CA file '.*ca\.crt' is not a regular file \(a FIFO, socket or device\); give a PEM file"
    else:
        path.symlink_to(path)
        expected = r"CA file '.*ca\.crt' cannot be read: Too many levels of symbolic links"
    with pytest.raises(securechan.ConfigError, match=expected):
        securechan.ClientConfig(cafile=path)


def test_files_refused_before_reading_leave_no_descriptor_open(pki_dir, tmp_path: Path) -> None:
    # A directory opens (O_RDONLY) and is then refused; a FIFO opens without blocking and is refused:
    # either way the descriptor is closed (a ticket ring re-reads its file on every ticket it seals).
    from securechan.tickets import read_key_file

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        for path in (tmp_path, fifo):
            with pytest.raises(securechan.ConfigError):
                securechan.ClientConfig(cafile=path)
            with pytest.raises(securechan.ConfigError):
                read_key_file(path)
    assert len(os.listdir("/proc/self/fd")) == before
