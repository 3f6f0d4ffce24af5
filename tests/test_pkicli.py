"""``securechan ca`` / ``securechan cert``: round trips in a temporary folder, then real connections.

Also the error paths of ``securechan ticket-key`` (key files, like certificates and keys).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import stat
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import securechan
from securechan import pki
from securechan.certs import format_pin, load_certificates, spki_sha256
from securechan.cli import main


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "securechan", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The same entry point in-process (faster, for the many error paths)."""
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


async def mutual_round_trip(server_crt: Path, server_key: Path, client_ca: Path,
                            client_crt: Path, client_key: Path, trust: Path) -> x509.Certificate:
    seen: list[x509.Certificate] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peercert"))
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await securechan.start_server(
        handler, "127.0.0.1", 0,
        config=securechan.ServerConfig(certfile=server_crt, keyfile=server_key, client_cafile=client_ca),
    )
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await securechan.open_connection(
            "127.0.0.1", port,
            config=securechan.ClientConfig(cafile=trust, certfile=client_crt, keyfile=client_key),
        )
        writer.write(b"hello\n")
        assert await reader.readline() == b"hello\n"
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return seen[0]


async def test_three_commands_from_an_empty_folder(tmp_path: Path) -> None:
    r = run("ca", "init", "--dir", "ca", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert mode(tmp_path / "ca" / "ca.key") == 0o600
    r = run("cert", "issue", "--ca", "ca", "--name", "localhost", "--ip", "127.0.0.1", "--out", "server", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run("cert", "issue", "--ca", "ca", "--name", "alice", "--client",
            "--uri", "spiffe://example.org/alice", "--out", "alice", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert mode(tmp_path / "server.key") == 0o600 and mode(tmp_path / "alice.key") == 0o600

    server = load_certificates(tmp_path / "server.crt")[0]
    alice = load_certificates(tmp_path / "alice.crt")[0]
    assert eku(server) == {ExtendedKeyUsageOID.SERVER_AUTH}
    assert eku(alice) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert server.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment
    ca = tmp_path / "ca" / "ca.crt"
    peer = await mutual_round_trip(tmp_path / "server.crt", tmp_path / "server.key", ca,
                                   tmp_path / "alice.crt", tmp_path / "alice.key", ca)
    assert peer == alice


def test_cert_show_prints_everything_and_the_pin_is_accepted(tmp_path: Path) -> None:
    assert run("ca", "init", "--dir", "ca", "--name", "Show CA", cwd=tmp_path).returncode == 0
    assert run("cert", "issue", "--ca", "ca", "--name", "db.internal", "--dns", "db", "--ip", "10.0.0.5",
               "--days", "30", "--out", "db", cwd=tmp_path).returncode == 0
    r = run("cert", "show", "db.crt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cert = load_certificates(tmp_path / "db.crt")[0]
    pin = format_pin(spki_sha256(cert))
    for expected in ("subject:  CN=db.internal", "DNS:db.internal, DNS:db, IP:10.0.0.5", "issuer:   CN=Show CA",
                     "key type: RSA 2048", "usage:    server", "29 days left", f"pin:      {pin}"):
        assert expected in r.stdout
    r = run("cert", "show", "--pin", "db.crt", cwd=tmp_path)
    assert r.stdout.strip() == pin
    securechan.ClientConfig(pin=r.stdout.strip())  # the printed pin is what pin= accepts
    # The key file shows the same pin.
    r = run("cert", "show", "db.key", cwd=tmp_path)
    assert r.returncode == 0 and pin in r.stdout and "RSA 2048" in r.stdout


async def test_intermediate_ca(tmp_path: Path, capsys) -> None:
    assert cli(capsys, "ca", "init", "--dir", str(tmp_path / "root"))[0] == 0
    code, out, _ = cli(capsys, "ca", "init", "--dir", str(tmp_path / "issuing"), "--parent", str(tmp_path / "root"),
                       "--name", "Issuing CA")
    assert code == 0 and "intermediate CA" in out
    for name, extra in (("localhost", ["--ip", "127.0.0.1"]), ("bob", ["--client", "--key-type", "ed25519"])):
        code, _, err = cli(capsys, "cert", "issue", "--ca", str(tmp_path / "issuing"), "--name", name, *extra,
                           "--out", str(tmp_path / name))
        assert code == 0, err
    chain = load_certificates(tmp_path / "bob.crt")
    assert [c.subject.rfc4514_string() for c in chain] == ["CN=bob", "CN=Issuing CA"]
    root = tmp_path / "root" / "ca.crt"
    peer = await mutual_round_trip(tmp_path / "localhost.crt", tmp_path / "localhost.key", root,
                                   tmp_path / "bob.crt", tmp_path / "bob.key", root)
    assert peer == chain[0]
    # An intermediate made here may not issue another CA (path length 0).
    code, _, err = cli(capsys, "ca", "init", "--dir", str(tmp_path / "deeper"), "--parent", str(tmp_path / "issuing"))
    assert code == 1 and "path length is 0" in err


def test_client_and_server_certificate(tmp_path: Path, capsys) -> None:
    cli(capsys, "ca", "init", "--dir", str(tmp_path / "ca"))
    code, _, err = cli(capsys, "cert", "issue", "--ca", str(tmp_path / "ca"), "--name", "peer", "--client", "--server",
                       "--out", str(tmp_path / "peer"))
    assert code == 0, err
    cert = load_certificates(tmp_path / "peer.crt")[0]
    assert eku(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert pki.path_length(cert) is None


def test_refuses_to_overwrite(tmp_path: Path, capsys) -> None:
    ca = str(tmp_path / "ca")
    assert cli(capsys, "ca", "init", "--dir", ca)[0] == 0
    code, _, err = cli(capsys, "ca", "init", "--dir", ca)
    assert code == 1 and "already holds a CA; use --force" in err
    assert cli(capsys, "ca", "init", "--dir", ca, "--force")[0] == 0
    out = str(tmp_path / "s")
    assert cli(capsys, "cert", "issue", "--ca", ca, "--name", "s", "--out", out)[0] == 0
    code, _, err = cli(capsys, "cert", "issue", "--ca", ca, "--name", "s", "--out", out)
    assert code == 1 and "already exists; use --force" in err
    assert cli(capsys, "cert", "issue", "--ca", ca, "--name", "s", "--out", out, "--force")[0] == 0


def test_usage_errors(tmp_path: Path, capsys) -> None:
    ca = str(tmp_path / "ca")
    code, _, err = cli(capsys, "cert", "issue", "--ca", ca, "--name", "x")
    assert code == 1 and "holds no CA" in err and "securechan ca init" in err
    cli(capsys, "ca", "init", "--dir", ca)
    cases = [
        (["--key-type", "ec-p256"], "needs an RSA key"),
        (["--server"], "--server only makes sense with --client"),
        (["--ip", "not-an-ip"], "is not an IP address"),
        (["--uri", "example.org"], "is not a URI"),
        (["--days", "0"], "--days must be at least 1"),
    ]
    for extra, message in cases:
        code, _, err = cli(capsys, "cert", "issue", "--ca", ca, "--name", "x", "--out", str(tmp_path / "x"), *extra)
        assert code == 1 and message in err, (extra, err)
        assert not (tmp_path / "x.key").exists()


def test_leaf_as_ca_and_mismatched_ca_key(tmp_path: Path, capsys) -> None:
    ca = tmp_path / "ca"
    cli(capsys, "ca", "init", "--dir", str(ca))
    cli(capsys, "cert", "issue", "--ca", str(ca), "--name", "leaf", "--out", str(tmp_path / "leaf"))
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "ca.crt").write_bytes((tmp_path / "leaf.crt").read_bytes())
    pki.write_private(fake / "ca.key", (tmp_path / "leaf.key").read_bytes())
    code, _, err = cli(capsys, "cert", "issue", "--ca", str(fake), "--name", "y", "--out", str(tmp_path / "y"))
    assert code == 1 and "is not a CA certificate" in err
    other = tmp_path / "other"
    cli(capsys, "ca", "init", "--dir", str(other))
    (ca / "ca.key").write_bytes((other / "ca.key").read_bytes())
    code, _, err = cli(capsys, "cert", "issue", "--ca", str(ca), "--name", "y", "--out", str(tmp_path / "y"))
    assert code == 1 and "does not match the certificate" in err


def test_encrypted_keys_with_passphrase_from_env_or_file(tmp_path: Path, capsys, monkeypatch) -> None:
    ca = str(tmp_path / "ca")
    monkeypatch.setenv("CA_PASS", "ca secret")
    assert cli(capsys, "ca", "init", "--dir", ca, "--key-pass-env", "CA_PASS")[0] == 0
    assert b"ENCRYPTED" in (tmp_path / "ca" / "ca.key").read_bytes()
    out = str(tmp_path / "a")
    code, _, err = cli(capsys, "cert", "issue", "--ca", ca, "--name", "a", "--client", "--out", out)
    # the hint names the flags for the CA's key (--key-pass-* would encrypt the new key instead)
    assert code == 1 and "is encrypted: give its passphrase (--ca-pass-env / --ca-pass-file)" in err
    monkeypatch.setenv("WRONG", "nope")
    code, _, err = cli(capsys, "cert", "issue", "--ca", ca, "--name", "a", "--client", "--out", out,
                       "--ca-pass-env", "WRONG")
    assert code == 1 and "wrong passphrase" in err
    passfile = tmp_path / "ca.pass"
    passfile.write_text("ca secret\n")
    monkeypatch.setenv("LEAF_PASS", "leaf secret")
    code, _, err = cli(capsys, "cert", "issue", "--ca", ca, "--name", "a", "--client", "--out", out,
                       "--ca-pass-file", str(passfile), "--key-pass-env", "LEAF_PASS")
    assert code == 0, err
    with pytest.raises(securechan.ConfigError, match="is encrypted"):
        securechan.ClientConfig(pin="sha256:" + "00" * 32, certfile=out + ".crt", keyfile=out + ".key")
    cfg = securechan.ClientConfig(pin="sha256:" + "00" * 32, certfile=out + ".crt", keyfile=out + ".key",
                                  password="leaf secret")
    assert cfg._identity_key is not None
    code, _, err = cli(capsys, "cert", "show", out + ".key")
    assert code == 1 and "is encrypted" in err
    code, out_text, _ = cli(capsys, "cert", "show", out + ".key", "--key-pass-env", "LEAF_PASS")
    assert code == 0 and "EC secp256r1" in out_text
    code, _, err = cli(capsys, "cert", "issue", "--ca", ca, "--name", "b", "--client", "--out", str(tmp_path / "b"),
                       "--ca-pass-env", "UNSET_VARIABLE_FOR_TEST")
    assert code == 1 and "is not set" in err


def test_world_readable_key_warns(tmp_path: Path) -> None:
    assert run("ca", "init", "--dir", "ca", cwd=tmp_path).returncode == 0
    assert run("cert", "issue", "--ca", "ca", "--name", "c", "--client", "--out", "c", cwd=tmp_path).returncode == 0
    os.chmod(tmp_path / "c.key", 0o644)
    r = run("cert", "show", "c.key", cwd=tmp_path)
    assert r.returncode == 0
    assert "readable by other users" in r.stderr and "chmod 600" in r.stderr
    os.chmod(tmp_path / "ca" / "ca.key", 0o640)
    r = run("cert", "issue", "--ca", "ca", "--name", "d", "--client", "--out", "d", cwd=tmp_path)
    assert r.returncode == 0 and "readable by other users" in r.stderr


def test_cert_show_errors(tmp_path: Path, capsys) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    code, _, err = cli(capsys, "cert", "show", str(junk))
    assert code == 1 and "no readable PEM certificate" in err
    code, _, err = cli(capsys, "cert", "show", str(tmp_path / "missing.crt"))
    assert code == 1 and "does not exist" in err


def test_wrong_role_certificates_are_refused_by_configs(tmp_path: Path, capsys) -> None:
    ca = str(tmp_path / "ca")
    cli(capsys, "ca", "init", "--dir", ca)
    cli(capsys, "cert", "issue", "--ca", ca, "--name", "srv", "--out", str(tmp_path / "srv"))
    cli(capsys, "cert", "issue", "--ca", ca, "--name", "cl", "--client", "--key-type", "rsa2048",
        "--out", str(tmp_path / "cl"))
    with pytest.raises(securechan.ConfigError, match="cannot be used as a server certificate"):
        securechan.ServerConfig(certfile=tmp_path / "cl.crt", keyfile=tmp_path / "cl.key")
    with pytest.raises(securechan.ConfigError, match="cannot be used as a client certificate"):
        securechan.ClientConfig(cafile=tmp_path / "ca" / "ca.crt", certfile=tmp_path / "srv.crt",
                                keyfile=tmp_path / "srv.key")


def test_default_ca_names_are_distinct(tmp_path: Path, capsys) -> None:
    """Errors name the issuing CA; two CAs made with the defaults must not share a name."""
    names = []
    for d in ("one", "two"):
        assert cli(capsys, "ca", "init", "--dir", str(tmp_path / d))[0] == 0
        cert = x509.load_pem_x509_certificate((tmp_path / d / "ca.crt").read_bytes())
        names.append(cert.subject.rfc4514_string())
    assert names[0] != names[1] and all(n.startswith("CN=securechan CA ") for n in names)


def test_cert_issue_without_out_names_the_files_after_a_sanitised_name(tmp_path: Path) -> None:
    assert run("ca", "init", "--dir", "ca", cwd=tmp_path).returncode == 0
    r = run("cert", "issue", "--ca", "ca", "--name", "web 1/../x", "--ip", "127.0.0.1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "  web_1_.._x.crt  certificate + chain" in r.stdout.splitlines()
    assert (tmp_path / "web_1_.._x.crt").is_file() and mode(tmp_path / "web_1_.._x.key") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca", "web_1_.._x.crt", "web_1_.._x.key"]
    # Nothing of the name survives the cleaning: the files are called 'cert'.
    r = run("cert", "issue", "--ca", "ca", "--name", "...", "--client", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "  cert.crt  certificate + chain" in r.stdout.splitlines()
    assert load_certificates(tmp_path / "cert.crt")[0].subject.rfc4514_string() == "CN=..."
    assert mode(tmp_path / "cert.key") == 0o600


def test_cert_show_pin_of_a_key_file_is_the_certificate_pin(tmp_path: Path) -> None:
    assert run("ca", "init", "--dir", "ca", cwd=tmp_path).returncode == 0
    assert run("cert", "issue", "--ca", "ca", "--name", "k", "--client", "--out", "k", cwd=tmp_path).returncode == 0
    pin = format_pin(spki_sha256(load_certificates(tmp_path / "k.crt")[0]))
    r = run("cert", "show", "--pin", "k.key", cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, pin + "\n", "")


def odd_certificate(
    path: Path,
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey,
    *,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    extensions: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    """A certificate cut by hand (cert issue never makes these), signed by a throwaway EC issuer."""
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd issuer")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    path.write_bytes(pki.cert_pem(cert))
    return cert


def show_lines(path: Path) -> list[str]:
    r = run("cert", "show", path.name, cwd=path.parent)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout.splitlines()


def test_cert_show_expired_and_not_yet_valid(tmp_path: Path) -> None:
    now = datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    # Ten days and twelve hours ago: whole days are counted, so the 12 h margin absorbs any test delay.
    end = now - datetime.timedelta(days=10, hours=12)
    odd_certificate(tmp_path / "old.crt", key, not_before=now - datetime.timedelta(days=40), not_after=end)
    lines = show_lines(tmp_path / "old.crt")
    assert lines[0] == "certificate 1 of 1 (leaf)"
    assert [x for x in lines if x.startswith("  validity: ")] == [
        f"  validity: {now - datetime.timedelta(days=40):%Y-%m-%d %H:%M:%S} UTC to {end:%Y-%m-%d %H:%M:%S} UTC "
        "(EXPIRED 10 days ago)"
    ]
    start = now + datetime.timedelta(days=2)
    odd_certificate(tmp_path / "early.crt", key, not_before=start, not_after=now + datetime.timedelta(days=30))
    lines = show_lines(tmp_path / "early.crt")
    assert [x for x in lines if x.startswith("  validity: ")] == [
        f"  validity: {start:%Y-%m-%d %H:%M:%S} UTC to {now + datetime.timedelta(days=30):%Y-%m-%d %H:%M:%S} UTC "
        "(NOT YET VALID)"
    ]


def test_cert_show_a_bare_certificate_and_unusual_key_types(tmp_path: Path) -> None:
    """No SAN, no basic constraints, no extended key usage; Ed25519 and Ed448 subject keys."""
    now = datetime.datetime.now(datetime.UTC)
    valid = {"not_before": now - datetime.timedelta(days=1), "not_after": now + datetime.timedelta(days=100)}
    odd_certificate(tmp_path / "bare.crt", ed25519.Ed25519PrivateKey.generate(), **valid)
    lines = show_lines(tmp_path / "bare.crt")
    assert lines[0] == "certificate 1 of 1 (leaf)"
    assert "  names:    (none)" in lines
    assert "  key type: Ed25519" in lines
    assert "  usage:    server and client (no extended key usage)" in lines
    # A CA flag that is false, with an extended key usage naming neither role.
    odd_certificate(tmp_path / "other.crt", ed448.Ed448PrivateKey.generate(), **valid, extensions=[
        x509.BasicConstraints(ca=False, path_length=None),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
    ])
    lines = show_lines(tmp_path / "other.crt")
    assert "  key type: Ed448" in lines
    assert "  usage:    neither server nor client" in lines


def test_cert_show_a_ca_folder_certificate(tmp_path: Path) -> None:
    assert run("ca", "init", "--dir", "ca", "--name", "Shown CA", cwd=tmp_path).returncode == 0
    lines = show_lines(tmp_path / "ca" / "ca.crt")
    assert lines[:3] == ["certificate 1 of 1 (root CA)", "  subject:  CN=Shown CA", "  names:    (none)"]
    assert "  usage:    CA" in lines and "  key type: EC secp256r1" in lines


def test_ticket_key_rotate_keep_out_of_range(tmp_path: Path) -> None:
    assert run("ticket-key", "new", "--out", "t.key", cwd=tmp_path).returncode == 0
    before = (tmp_path / "t.key").read_bytes()
    for keep in ("-1", "8"):
        r = run("ticket-key", "rotate", f"--keep={keep}", "t.key", cwd=tmp_path)
        assert (r.returncode, r.stdout, r.stderr) == (1, "", "securechan: error: --keep must be between 0 and 7\n")
    assert (tmp_path / "t.key").read_bytes() == before
    assert run("ticket-key", "rotate", "--keep=7", "t.key", cwd=tmp_path).returncode == 0  # the upper bound itself


def test_ticket_key_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    """The rename onto FILE fails (FILE is a folder): the half-made temporary key file must not stay behind."""
    (tmp_path / "folder").mkdir()
    r = run("ticket-key", "new", "--out", "folder", "--force", cwd=tmp_path)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "securechan: error: cannot write ticket key file 'folder': Is a directory\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
    assert list((tmp_path / "folder").iterdir()) == []
