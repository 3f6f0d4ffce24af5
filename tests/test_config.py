"""Configs are immutable and check their files when built, with errors that say what to do."""

from __future__ import annotations

import dataclasses
import os

import pytest

import securechan
from securechan import pki


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


@pytest.mark.parametrize("pin", ["sha256:zz", "md5:" + "00" * 16, "sha256:" + "00" * 31])
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
