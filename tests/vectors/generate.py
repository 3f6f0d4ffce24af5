"""Regenerate tests/vectors/v1_full_handshake.json and v1_resumed_handshake.json (from the repository root).

    python tests/vectors/generate.py

Every input is fixed except the RSA-OAEP encryption of the wrapped key, which is randomised
by design; the recorded ``wrapped_key`` is kept from the existing file when present so that
the vector is stable. The resumed vector is computed from the primitives and docs/PROTOCOL.md
§13 (ticket sealing included), not by running a server. Only regenerate when the wire format
or key schedule deliberately changes, and update docs/PROTOCOL.md's appendix with it.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import sys
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HERE = Path(__file__).parent
OUT = HERE / "v1_full_handshake.json"
OUT_RESUMED = HERE / "v1_resumed_handshake.json"
sys.path.insert(0, str(HERE.parent.parent))

from securechan import pki  # noqa: E402
from securechan.frames import FrameType, encode_frame, pack_map  # noqa: E402
from securechan.handshake import OAEP, handshake_frame  # noqa: E402
from securechan.keyschedule import (  # noqa: E402
    SALT_BINDER,
    SALT_RESUMPTION,
    SALT_V1,
    expand_label,
    extract,
    finished_mac,
    traffic_key_iv,
)
from securechan.messages import ClientHello, Finished, KeyExchange, NewTicket, ServerHello  # noqa: E402
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


def hellos(inputs: dict[str, bytes], **extra: Any) -> tuple[ClientHello, ServerHello]:
    """The vectors' ClientHello and ServerHello (AES-256-GCM, 'localhost', 64 KiB records);
    ``extra`` holds the ServerHello fields that differ (certificates, or resumed)."""
    accept_tickets = bool(extra.get("resumed"))
    ch = ClientHello(
        versions=(1,),
        random=inputs["client_random"],
        suites=(1, 2, 3),
        key_wraps=(1,),
        x25519=x25519_pub(inputs["client_x25519_private"]),
        max_record=65536,
        server_name="localhost",
        accept_tickets=accept_tickets,
    )
    sh = ServerHello(
        version=1,
        random=inputs["server_random"],
        suite=1,
        key_wrap=1,
        x25519=x25519_pub(inputs["server_x25519_private"]),
        max_record=65536,
        **extra,
    )
    return ch, sh


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
    ch, sh = hellos(inputs, certificates=(cert_der,))
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
    resumed()


#: The resumed vector's clocks: the first ticket's issue time and the server's clock when it is
#: offered (both Unix milliseconds; whole seconds, so a server clock in seconds reproduces them).
FIRST_ISSUED_MS = 1_800_000_000_000
SERVER_NOW_MS = FIRST_ISSUED_MS + 60_000
LIFETIME = 1800


def seal_ticket(key_secret: bytes, salt: bytes, psk: bytes, issued_ms: int) -> bytes:
    """docs/PROTOCOL.md §13.6, from the primitives."""
    contents = msgpack.packb(
        {"psk": psk, "version": 1, "suite": 1, "issued": issued_ms, "expires": issued_ms + LIFETIME * 1000,
         "server_name": "localhost"},
        use_bin_type=True,
    )
    key_id = expand_label(key_secret, b"ticket key id", b"", 8)
    seal_key = expand_label(expand_label(key_secret, b"ticket key", b"", 32), b"ticket seal", salt, 32)
    head = b"\x01" + key_id
    return head + salt + AESGCM(seal_key).encrypt(bytes(12), contents, head)


def resumed() -> None:
    inputs = {
        "resumption_secret": fixed("first session resumption"),
        "ticket_key_secret": fixed("ticket key secret"),
        "first_ticket_nonce": fixed("first ticket nonce")[:16],
        "first_ticket_salt": fixed("first ticket salt")[:16],
        "client_random": fixed("resumed client random"),
        "client_x25519_private": fixed("resumed client x25519"),
        "server_random": fixed("resumed server random"),
        "server_x25519_private": fixed("resumed server x25519"),
        "new_ticket_nonce": fixed("new ticket nonce")[:16],
        "new_ticket_salt": fixed("new ticket salt")[:16],
    }
    psk = expand_label(inputs["resumption_secret"], b"ticket psk", inputs["first_ticket_nonce"], 32)
    ticket = seal_ticket(inputs["ticket_key_secret"], inputs["first_ticket_salt"], psk, FIRST_ISSUED_MS)
    hello, server_hello = hellos(inputs, resumed=True)
    partial = encode_frame(FrameType.HANDSHAKE, pack_map(hello.with_ticket(ticket, bytes(32)).encode()))[:-32]
    binder_key = expand_label(extract(SALT_BINDER, psk), b"res binder", b"", 32)
    binder = hmac.digest(binder_key, hashlib.sha256(partial).digest(), "sha256")
    ch_f = partial + binder
    sh_f = handshake_frame(server_hello)
    dhe = x25519.X25519PrivateKey.from_private_bytes(inputs["client_x25519_private"]).exchange(
        x25519.X25519PublicKey.from_public_bytes(x25519_pub(inputs["server_x25519_private"]))
    )
    th1 = hashlib.sha256(ch_f + sh_f).digest()
    hs = extract(SALT_RESUMPTION, psk + dhe)
    secrets = {
        label: expand_label(hs, label.encode(), th1, 32)
        for label in ("c finished", "s finished", "c ap traffic", "s ap traffic", "exporter", "resumption")
    }
    sf_f = handshake_frame(Finished(mac=finished_mac(secrets["s finished"], th1)))
    th2 = hashlib.sha256(ch_f + sh_f + sf_f).digest()
    cf_f = handshake_frame(Finished(mac=finished_mac(secrets["c finished"], th2)))
    new_psk = expand_label(secrets["resumption"], b"ticket psk", inputs["new_ticket_nonce"], 32)
    new_ticket = seal_ticket(inputs["ticket_key_secret"], inputs["new_ticket_salt"], new_psk, SERVER_NOW_MS)
    server = Sealer(Suite.AES_256_GCM, secrets["s ap traffic"])
    nst = server.seal(FrameType.CONTROL, pack_map(
        NewTicket(ticket=new_ticket, lifetime=LIFETIME, nonce=inputs["new_ticket_nonce"]).encode()
    ))
    s_rec = server.seal(FrameType.APPLICATION_DATA, b"hello again, client")
    c_rec = Sealer(Suite.AES_256_GCM, secrets["c ap traffic"]).seal(FrameType.APPLICATION_DATA, b"hello again")
    data = {
        "description": "securechan v1 resumed handshake, suite AES-256-GCM, server name 'localhost', "
        "ticket key file with one key, ticket lifetime 1800 s",
        "inputs": {
            **{k: v.hex() for k, v in inputs.items()},
            "first_ticket_issued_ms": FIRST_ISSUED_MS,
            "server_clock_ms": SERVER_NOW_MS,
            "ticket_lifetime": LIFETIME,
        },
        "frames": {
            "resumed_client_hello": ch_f.hex(),
            "resumed_server_hello": sh_f.hex(),
            "resumed_server_finished": sf_f.hex(),
            "resumed_new_ticket_record": nst.hex(),
            "resumed_client_finished": cf_f.hex(),
        },
        "key_schedule": {
            "ticket_psk": psk.hex(),
            "first_ticket": ticket.hex(),
            "binder_key": binder_key.hex(),
            "binder": binder.hex(),
            "resumed_x25519_shared_secret": dhe.hex(),
            "resumed_handshake_secret": hs.hex(),
            "resumed_transcript_hash_th1": th1.hex(),
            "resumed_transcript_hash_th2": th2.hex(),
            **{"resumed_" + label.replace(" ", "_"): v.hex() for label, v in secrets.items()},
            "new_ticket_psk": new_psk.hex(),
            "new_ticket": new_ticket.hex(),
        },
        "records": {
            "resumed_client_first_record_plaintext": b"hello again".hex(),
            "resumed_client_first_record": c_rec.hex(),
            "resumed_server_second_record_plaintext": b"hello again, client".hex(),
            "resumed_server_second_record": s_rec.hex(),
        },
    }
    OUT_RESUMED.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {OUT_RESUMED}")


if __name__ == "__main__":
    main()
