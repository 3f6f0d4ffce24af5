"""Deterministic test vectors pin the wire format and key schedule (tests/vectors/, docs/PROTOCOL.md appendix).

The sans-IO server and client are driven with fixed entropy and must reproduce the recorded
frames byte for byte; the key schedule is recomputed from the recorded inputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import securechan
from securechan.frames import FrameType
from securechan.keyschedule import SALT_V1, expand_label, extract, finished_mac, traffic_key_iv
from securechan.suites import Suite

VECTOR = json.loads((Path(__file__).parent / "vectors" / "v1_full_handshake.json").read_text())
IN = {k: (bytes.fromhex(v) if k not in ("server_key_pem",) else v) for k, v in VECTOR["inputs"].items()}
FR = {k: bytes.fromhex(v) for k, v in VECTOR["frames"].items()}
KS = {k: bytes.fromhex(v) for k, v in VECTOR["key_schedule"].items()}
REC = {k: bytes.fromhex(v) for k, v in VECTOR["records"].items()}


def entropy_from(*chunks: bytes):
    queue = list(chunks)

    def entropy(n: int) -> bytes:
        value = queue.pop(0)
        assert len(value) == n
        return value

    return entropy


@pytest.fixture
def vector_server_config(tmp_path) -> securechan.ServerConfig:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(IN["server_certificate_der"])
    from securechan.pki import cert_pem

    (tmp_path / "v.crt").write_bytes(cert_pem(cert))
    (tmp_path / "v.key").write_text(IN["server_key_pem"])
    os.chmod(tmp_path / "v.key", 0o600)
    # The vector covers the full handshake only: no session ticket after it.
    return securechan.ServerConfig(certfile=tmp_path / "v.crt", keyfile=tmp_path / "v.key", tickets=False)


def test_key_schedule_from_inputs() -> None:
    th1 = __import__("hashlib").sha256(FR["client_hello"] + FR["server_hello"] + FR["key_exchange"]).digest()
    assert th1 == KS["transcript_hash_th1"]
    hs = extract(SALT_V1, IN["wrap_secret"] + KS["x25519_shared_secret"])
    assert hs == KS["handshake_secret"]
    for label in ("c finished", "s finished", "c ap traffic", "s ap traffic", "exporter", "resumption"):
        assert expand_label(hs, label.encode(), th1, 32) == KS[label.replace(" ", "_")]
    assert traffic_key_iv(KS["c_ap_traffic"], Suite.AES_256_GCM) == (KS["client_write_key"], KS["client_write_iv"])
    assert traffic_key_iv(KS["s_ap_traffic"], Suite.AES_256_GCM) == (KS["server_write_key"], KS["server_write_iv"])
    assert FR["client_finished"].endswith(finished_mac(KS["c_finished"], th1))


def test_client_hello_bytes(tmp_path) -> None:
    # The client never verifies anything before sending ClientHello, so a pin suffices here.
    client = securechan.Connection(
        securechan.ClientConfig(pin="sha256:" + "00" * 32, resume=False),
        server_name="localhost",
        entropy=entropy_from(IN["client_x25519_private"], IN["client_random"]),
    )
    assert client.data_to_send() == FR["client_hello"]


def test_server_reproduces_the_transcript(vector_server_config) -> None:
    server = securechan.Connection(
        vector_server_config,
        entropy=entropy_from(IN["server_x25519_private"], IN["server_random"], b"\x00" * 32),
    )
    assert server.receive_data(FR["client_hello"]) == []
    assert server.data_to_send() == FR["server_hello"]
    events = server.receive_data(
        FR["key_exchange"]
        + FR["client_finished"]
        + REC["client_first_record"]
        + REC["client_second_record_close_notify"]
    )
    assert server.data_to_send() == FR["server_finished"]
    assert isinstance(events[0], securechan.HandshakeComplete)
    assert events[1] == securechan.DataReceived(REC["client_first_record_plaintext"])
    assert isinstance(events[2], securechan.PeerClosed)
    assert bytes(server.seal(REC["server_first_record_plaintext"])) == REC["server_first_record"]


def test_records_open_with_recorded_keys() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    record = REC["client_first_record"]
    head, body = record[:7], record[7:]
    assert head == bytes([0x92, FrameType.APPLICATION_DATA, 0xC6]) + len(body).to_bytes(4, "big")
    nonce = KS["client_write_iv"]  # sequence number 0: iv XOR 0
    assert AESGCM(KS["client_write_key"]).decrypt(nonce, body, head) == REC["client_first_record_plaintext"]
    close = REC["client_second_record_close_notify"]
    nonce1 = (int.from_bytes(KS["client_write_iv"], "big") ^ 1).to_bytes(12, "big")
    import msgpack

    assert msgpack.unpackb(AESGCM(KS["client_write_key"]).decrypt(nonce1, close[7:], close[:7])) == {
        "type": "close_notify"
    }


def test_wrong_wrapped_key_fails_like_a_wrong_finished(vector_server_config) -> None:
    """A wrapped key that does not unwrap yields the same decrypt_error at the same step as a bad Finished."""
    from securechan.frames import HEADER_LEN, encode_frame, pack_map, unpack_map

    def run(kx: bytes, fin: bytes) -> tuple[type, bytes]:
        server = securechan.Connection(
            vector_server_config, entropy=entropy_from(IN["server_x25519_private"], IN["server_random"], os.urandom(32))
        )
        server.receive_data(FR["client_hello"])
        server.data_to_send()
        assert server.receive_data(kx) == []  # no reaction to the key exchange itself
        assert server.data_to_send() == b""
        with pytest.raises(securechan.SecureChannelError) as info:
            server.receive_data(fin)
        out = server.data_to_send()
        return type(info.value), out

    bad_wrap = encode_frame(FrameType.HANDSHAKE, pack_map({"type": "key_exchange", "wrapped_key": os.urandom(256)}))
    bad_fin = encode_frame(FrameType.HANDSHAKE, pack_map({"type": "finished", "mac": os.urandom(32)}))
    a = run(bad_wrap, FR["client_finished"])
    b = run(FR["key_exchange"], bad_fin)
    assert a == b == (securechan.HandshakeAuthError, a[1])
    assert unpack_map(a[1][HEADER_LEN:], 64) == {"type": "alert", "code": int(securechan.AlertCode.DECRYPT_ERROR)}


@pytest.mark.parametrize("vector_file", ["v1_full_handshake.json", "v1_resumed_handshake.json"])
def test_protocol_md_reproduces_the_vectors(vector_file: str) -> None:
    """docs/PROTOCOL.md's appendix stays in step with the vector files."""
    doc = (Path(__file__).parent.parent / "docs" / "PROTOCOL.md").read_text()
    flat = "".join(line.strip() for line in doc.splitlines())
    vector = json.loads((Path(__file__).parent / "vectors" / vector_file).read_text())
    inputs = {k: v for k, v in vector["inputs"].items() if k not in ("server_key_pem", "server_certificate_der")}
    for section, values in (("inputs", inputs), *((s, vector[s]) for s in ("frames", "key_schedule", "records"))):
        for name, value in values.items():
            assert name in doc, name
            assert str(value) in flat, f"docs/PROTOCOL.md does not reproduce {vector_file} {section}.{name}"
