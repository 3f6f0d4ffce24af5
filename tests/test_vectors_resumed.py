"""The resumed-handshake vector (tests/vectors/v1_resumed_handshake.json, docs/PROTOCOL.md A.5).

Both sans-IO ends are driven with fixed entropy (and the server with a fixed wall clock and a
ticket key file holding the vector's key) and must reproduce the recorded frames byte for byte:
the ClientHello with its ticket and binder, the server's one flight (ServerHello, Finished and
the sealed NewTicket record), the client's Finished and the first records. The key schedule is
recomputed from the recorded inputs with the library's own functions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import msgpack
import pytest
from cryptography import x509
from test_vectors import entropy_from

import securechan
from securechan.certs import format_pin, spki_sha256
from securechan.frames import HEADER_LEN, FrameType
from securechan.keyschedule import (
    SALT_BINDER,
    SALT_RESUMPTION,
    binder_mac,
    expand_label,
    extract,
    finished_mac,
    handshake_secrets,
    ticket_psk,
)
from securechan.pki import cert_pem
from securechan.tickets import KEY_FILE_PREFIX, TicketContents, TicketKey

HERE = Path(__file__).parent / "vectors"
VECTOR = json.loads((HERE / "v1_resumed_handshake.json").read_text())
FULL = json.loads((HERE / "v1_full_handshake.json").read_text())["inputs"]
IN = {k: (bytes.fromhex(v) if isinstance(v, str) else v) for k, v in VECTOR["inputs"].items()}
FR = {k: bytes.fromhex(v) for k, v in VECTOR["frames"].items()}
KS = {k: bytes.fromhex(v) for k, v in VECTOR["key_schedule"].items()}
REC = {k: bytes.fromhex(v) for k, v in VECTOR["records"].items()}
CERT_DER = bytes.fromhex(FULL["server_certificate_der"])
CERT = x509.load_der_x509_certificate(CERT_DER)
CACHE_KEY = (None, None, "localhost")


def test_key_schedule_from_inputs() -> None:
    psk = ticket_psk(IN["resumption_secret"], IN["first_ticket_nonce"])
    assert psk == KS["ticket_psk"]
    ch = FR["resumed_client_hello"]
    assert expand_label(extract(SALT_BINDER, psk), b"res binder", b"", 32) == KS["binder_key"]
    assert ch[-32:] == KS["binder"] == binder_mac(psk, hashlib.sha256(ch[:-32]).digest())
    th1 = hashlib.sha256(ch + FR["resumed_server_hello"]).digest()
    assert th1 == KS["resumed_transcript_hash_th1"]
    assert extract(SALT_RESUMPTION, psk + KS["resumed_x25519_shared_secret"]) == KS["resumed_handshake_secret"]
    secrets = handshake_secrets(psk + KS["resumed_x25519_shared_secret"], th1, SALT_RESUMPTION, resumption=True)
    for label, value in secrets.items():
        assert value == KS["resumed_" + label.replace(" ", "_")], label
    assert FR["resumed_server_finished"].endswith(finished_mac(KS["resumed_s_finished"], th1))
    th2 = hashlib.sha256(ch + FR["resumed_server_hello"] + FR["resumed_server_finished"]).digest()
    assert th2 == KS["resumed_transcript_hash_th2"]
    assert FR["resumed_client_finished"].endswith(finished_mac(KS["resumed_c_finished"], th2))
    assert ticket_psk(KS["resumed_resumption"], IN["new_ticket_nonce"]) == KS["new_ticket_psk"]


def test_tickets_open_with_the_vector_key() -> None:
    """docs/PROTOCOL.md §13.6: both tickets open under the key file's key and carry what the vector says."""
    key = TicketKey(IN["ticket_key_secret"])
    for name, salt, psk, issued in (
        ("first_ticket", IN["first_ticket_salt"], KS["ticket_psk"], IN["first_ticket_issued_ms"]),
        ("new_ticket", IN["new_ticket_salt"], KS["new_ticket_psk"], IN["server_clock_ms"]),
    ):
        ticket = KS[name]
        assert ticket[0] == 1 and ticket[1:9] == key.key_id and ticket[9:25] == salt
        plaintext = key.open(salt, ticket[25:], ticket[:9])
        assert plaintext is not None
        assert TicketContents.decode(plaintext) == TicketContents(
            psk, 1, 1, "localhost", (), issued, issued + IN["ticket_lifetime"] * 1000
        )


def test_new_ticket_record_opens_with_the_server_keys() -> None:
    from securechan.record import Opener
    from securechan.suites import Suite

    opener = Opener(Suite.AES_256_GCM, KS["resumed_s_ap_traffic"])
    record = FR["resumed_new_ticket_record"]
    assert record[1] == FrameType.CONTROL
    plaintext = opener.open(record[:HEADER_LEN], memoryview(record)[HEADER_LEN:])
    assert msgpack.unpackb(plaintext) == {
        "type": "new_ticket", "ticket": KS["new_ticket"], "lifetime": IN["ticket_lifetime"],
        "nonce": IN["new_ticket_nonce"],
    }


@pytest.fixture
def server_config(tmp_path) -> securechan.ServerConfig:
    (tmp_path / "v.crt").write_bytes(cert_pem(CERT))
    (tmp_path / "v.key").write_text(FULL["server_key_pem"])
    key_line = KEY_FILE_PREFIX + base64.urlsafe_b64encode(IN["ticket_key_secret"]).decode().rstrip("=")
    (tmp_path / "tickets.key").write_text(key_line + "\n")
    for name in ("v.key", "tickets.key"):
        os.chmod(tmp_path / name, 0o600)
    config = securechan.ServerConfig(
        certfile=tmp_path / "v.crt", keyfile=tmp_path / "v.key",
        ticket_key_file=tmp_path / "tickets.key", ticket_lifetime=IN["ticket_lifetime"],
    )
    assert config._tickets is not None
    config._tickets.clock = lambda: IN["server_clock_ms"] / 1000
    config._tickets.salt_source = entropy_from(IN["new_ticket_salt"])
    return config


def test_server_reproduces_the_resumed_transcript(server_config) -> None:
    server = securechan.Connection(server_config, entropy=entropy_from(
        IN["server_x25519_private"], IN["server_random"], IN["new_ticket_nonce"]
    ))
    assert server.receive_data(FR["resumed_client_hello"]) == []
    # One flight: ServerHello, Finished and the ticket (docs/PROTOCOL.md §13.3, §13.4).
    assert server.data_to_send() == (
        FR["resumed_server_hello"] + FR["resumed_server_finished"] + FR["resumed_new_ticket_record"]
    )
    events = server.receive_data(FR["resumed_client_finished"] + REC["resumed_client_first_record"])
    assert server.data_to_send() == b""
    assert isinstance(events[0], securechan.HandshakeComplete) and events[0].session.resumed
    assert events[1] == securechan.DataReceived(REC["resumed_client_first_record_plaintext"])
    assert bytes(server.seal(REC["resumed_server_second_record_plaintext"])) == REC["resumed_server_second_record"]


def test_client_reproduces_the_resumed_transcript() -> None:
    config = securechan.ClientConfig(pin=format_pin(spki_sha256(CERT)))
    config._session_cache.put(
        CACHE_KEY, ticket=KS["first_ticket"], psk=KS["ticket_psk"], version=1, suite=1,
        server_chain=(CERT,), lifetime=IN["ticket_lifetime"], server_der=(CERT_DER,),
    )
    client = securechan.Connection(
        config, server_name="localhost", entropy=entropy_from(IN["client_x25519_private"], IN["client_random"])
    )
    assert client.data_to_send() == FR["resumed_client_hello"]
    events = client.receive_data(
        FR["resumed_server_hello"] + FR["resumed_server_finished"] + FR["resumed_new_ticket_record"]
        + REC["resumed_server_second_record"]
    )
    assert isinstance(events[0], securechan.HandshakeComplete) and events[0].session.resumed
    assert events[1] == securechan.DataReceived(REC["resumed_server_second_record_plaintext"])
    assert client.data_to_send() == FR["resumed_client_finished"]
    assert bytes(client.seal(REC["resumed_client_first_record_plaintext"])) == REC["resumed_client_first_record"]
    # The ticket for the next connection, with the PSK the vector derives.
    (cached,) = config._session_cache.peek(CACHE_KEY)
    assert (cached.ticket, cached.psk) == (KS["new_ticket"], KS["new_ticket_psk"])


def test_pinned_connection_entropy_never_repeats_ticket_salts(server_config) -> None:
    """A ticket's salt is all that makes its AES key its own under a shared ticket key: it comes from
    the ticket keys' source, never from a connection's entropy, even one pinned to repeat itself."""
    server_config._tickets.salt_source = os.urandom
    tickets = []
    for _ in range(2):
        server = securechan.Connection(server_config, entropy=entropy_from(
            IN["server_x25519_private"], IN["server_random"], IN["new_ticket_nonce"]
        ))
        server.receive_data(FR["resumed_client_hello"])
        record = server.data_to_send()[len(FR["resumed_server_hello"]) + len(FR["resumed_server_finished"]):]
        opened = securechan.record.Opener(securechan.suites.Suite.AES_256_GCM, KS["resumed_s_ap_traffic"]).open(
            record[:HEADER_LEN], memoryview(record)[HEADER_LEN:]
        )
        tickets.append(msgpack.unpackb(opened)["ticket"])
    assert tickets[0][9:25] != tickets[1][9:25]  # same connection entropy, different salts
    server_config._tickets.salt_source = lambda n: bytes(n - 1)
    server = securechan.Connection(server_config, entropy=entropy_from(
        IN["server_x25519_private"], IN["server_random"], IN["new_ticket_nonce"]
    ))
    with pytest.raises(securechan.SecureChannelError, match="salt"):
        server.receive_data(FR["resumed_client_hello"])
