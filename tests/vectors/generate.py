"""Regenerate tests/vectors/v1_full_handshake.json (run from the repository root).

    python tests/vectors/generate.py

Every input is fixed except the RSA-OAEP encryption of the wrapped key, which is randomised
by design; the recorded ``wrapped_key`` is kept from the existing file when present so that
the vector is stable. Only regenerate when the wire format or key schedule deliberately
changes, and update docs/PROTOCOL.md's appendix with it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

HERE = Path(__file__).parent
OUT = HERE / "v1_full_handshake.json"
sys.path.insert(0, str(HERE.parent.parent))

from securechan import pki  # noqa: E402
from securechan.frames import FrameType, encode_frame, pack_map  # noqa: E402
from securechan.handshake import OAEP, handshake_frame  # noqa: E402
from securechan.keyschedule import (  # noqa: E402
    SALT_V1,
    expand_label,
    extract,
    finished_mac,
    traffic_key_iv,
)
from securechan.messages import ClientHello, Finished, KeyExchange, ServerHello  # noqa: E402
from securechan.record import Sealer  # noqa: E402
from securechan.suites import Suite  # noqa: E402


def fixed(label: str) -> bytes:
    return hashlib.sha256(b"securechan test vector " + label.encode()).digest()


def x25519_pub(private: bytes) -> bytes:
    return (
        x25519.X25519PrivateKey.from_private_bytes(private)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


def main() -> None:
    old: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() else {}
    if old:
        key = serialization.load_pem_private_key(old["inputs"]["server_key_pem"].encode(), None)
        cert_der = bytes.fromhex(old["inputs"]["server_certificate_der"])
    else:
        ca = pki.make_ca(
            "Vector CA", not_before=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), days=36500
        )
        cert, key = pki.issue_cert(
            ca, "localhost", not_before=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), days=36500
        )
        cert_der = cert.public_bytes(serialization.Encoding.DER)
    inputs = {
        "client_random": fixed("client random"),
        "client_x25519_private": fixed("client x25519"),
        "wrap_secret": fixed("wrap secret"),
        "server_random": fixed("server random"),
        "server_x25519_private": fixed("server x25519"),
    }
    ch = ClientHello(
        versions=(1,),
        random=inputs["client_random"],
        suites=(1, 2, 3),
        key_wraps=(1,),
        x25519=x25519_pub(inputs["client_x25519_private"]),
        max_record=65536,
        server_name="localhost",
    )
    sh = ServerHello(
        version=1,
        random=inputs["server_random"],
        suite=1,
        key_wrap=1,
        x25519=x25519_pub(inputs["server_x25519_private"]),
        max_record=65536,
        certificates=(cert_der,),
    )
    wrapped = (
        bytes.fromhex(old["inputs"]["wrapped_key"]) if old else key.public_key().encrypt(inputs["wrap_secret"], OAEP)
    )  # type: ignore[union-attr]
    ch_f, sh_f, kx_f = handshake_frame(ch), handshake_frame(sh), handshake_frame(KeyExchange(wrapped_key=wrapped))
    dhe = x25519.X25519PrivateKey.from_private_bytes(inputs["client_x25519_private"]).exchange(
        x25519.X25519PublicKey.from_public_bytes(x25519_pub(inputs["server_x25519_private"]))
    )
    th1 = hashlib.sha256(ch_f + sh_f + kx_f).digest()
    hs = extract(SALT_V1, inputs["wrap_secret"] + dhe)
    secrets = {
        label: expand_label(hs, label.encode(), th1, 32)
        for label in ("c finished", "s finished", "c ap traffic", "s ap traffic", "exporter", "resumption")
    }
    cf_f = handshake_frame(Finished(mac=finished_mac(secrets["c finished"], th1)))
    th2 = hashlib.sha256(ch_f + sh_f + kx_f + cf_f).digest()
    sf_f = handshake_frame(Finished(mac=finished_mac(secrets["s finished"], th2)))
    c_key, c_iv = traffic_key_iv(secrets["c ap traffic"], Suite.AES_256_GCM)
    s_key, s_iv = traffic_key_iv(secrets["s ap traffic"], Suite.AES_256_GCM)
    c_rec = Sealer(Suite.AES_256_GCM, secrets["c ap traffic"]).seal(FrameType.APPLICATION_DATA, b"hello, securechan")
    s_rec = Sealer(Suite.AES_256_GCM, secrets["s ap traffic"]).seal(FrameType.APPLICATION_DATA, b"hello, client")
    close = Sealer(Suite.AES_256_GCM, secrets["c ap traffic"])
    close.seal(FrameType.APPLICATION_DATA, b"hello, securechan")
    c_close = close.seal(FrameType.CONTROL, pack_map({"type": "close_notify"}))
    data = {
        "description": "securechan v1 full handshake, suite AES-256-GCM, server name 'localhost'",
        "inputs": {
            **{k: v.hex() for k, v in inputs.items()},
            "server_key_pem": key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,  # type: ignore[union-attr]
                serialization.NoEncryption(),
            ).decode(),
            "server_certificate_der": cert_der.hex(),
            "wrapped_key": wrapped.hex(),
        },
        "frames": {
            "client_hello": ch_f.hex(),
            "server_hello": sh_f.hex(),
            "key_exchange": kx_f.hex(),
            "client_finished": cf_f.hex(),
            "server_finished": sf_f.hex(),
        },
        "key_schedule": {
            "x25519_shared_secret": dhe.hex(),
            "handshake_secret": hs.hex(),
            "transcript_hash_th1": th1.hex(),
            "transcript_hash_th2": th2.hex(),
            **{label.replace(" ", "_"): v.hex() for label, v in secrets.items()},
            "client_write_key": c_key.hex(),
            "client_write_iv": c_iv.hex(),
            "server_write_key": s_key.hex(),
            "server_write_iv": s_iv.hex(),
        },
        "records": {
            "client_first_record_plaintext": b"hello, securechan".hex(),
            "client_first_record": c_rec.hex(),
            "client_second_record_close_notify": c_close.hex(),
            "server_first_record_plaintext": b"hello, client".hex(),
            "server_first_record": s_rec.hex(),
        },
    }
    assert encode_frame(FrameType.HANDSHAKE, pack_map(ch.encode())) == ch_f
    OUT.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
