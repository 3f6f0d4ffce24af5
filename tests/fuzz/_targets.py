"""Fuzz targets shared by the atheris harnesses (and importable without atheris).

Each target takes arbitrary bytes and may raise only :class:`securechan.SecureChannelError`;
anything else is a finding.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import securechan
from securechan import messages, pki
from securechan.frames import HEADER_LEN, FrameType, parse_header, unpack_map


def _entropy(seed: bytes) -> Callable[[int], bytes]:
    counter = 0

    def draw(n: int) -> bytes:
        nonlocal counter
        counter += 1
        return hashlib.shake_256(seed + counter.to_bytes(8, "big")).digest(n)

    return draw


class World:
    """A throwaway PKI, configs built from it, and one recorded honest client flight."""

    def __init__(self) -> None:
        d = Path(tempfile.mkdtemp(prefix="securechan-fuzz-"))
        ca = pki.make_ca("Fuzz CA")
        cert, key = pki.issue_cert(ca, "localhost")
        (d / "ca.crt").write_bytes(pki.cert_pem(ca[0]))
        (d / "srv.crt").write_bytes(pki.cert_pem(cert))
        (d / "srv.key").write_bytes(pki.key_pem(key))
        os.chmod(d / "srv.key", 0o600)
        self.server_config = securechan.ServerConfig(certfile=d / "srv.crt", keyfile=d / "srv.key", tickets=False)
        self.client_config = securechan.ClientConfig(cafile=d / "ca.crt", resume=False)
        client = securechan.Connection(self.client_config, server_name="localhost", entropy=_entropy(b"c"))
        server = self.fresh_server()
        flight = bytearray()
        for _ in range(3):
            data = client.data_to_send()
            flight += data
            server.receive_data(data)
            client.receive_data(server.data_to_send())
        client.send_data(b"fuzz me")
        client.update_keys()
        client.send_data(b"again")
        client.close()
        flight += client.data_to_send()
        self.client_flight = bytes(flight)

    def fresh_server(self) -> securechan.Connection:
        return securechan.Connection(self.server_config, entropy=_entropy(b"s"))


def decoders(data: bytes) -> None:
    """The head parser, the strict map decoder and every message decoder."""
    if len(data) >= HEADER_LEN:
        try:
            parse_header(data[:HEADER_LEN], {int(t): 1 << 16 for t in FrameType})
        except securechan.SecureChannelError:
            pass
    try:
        m = unpack_map(data, 1 << 16)
    except securechan.SecureChannelError:
        return
    for table in (messages.HANDSHAKE_MESSAGES, messages.CONTROL_MESSAGES):
        try:
            messages.decode_message(m, table)
        except securechan.SecureChannelError:
            pass


def connection(world: World, data: bytes) -> None:
    """Byte 0 picks the victim: a client, a server fed raw bytes, or a server fed the recorded
    flight overwritten at an offset (bytes 1-2) by the rest of the input."""
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        conn = securechan.Connection(world.client_config, server_name="localhost")
        feed = rest
    elif mode == 1:
        conn = world.fresh_server()
        feed = rest
    else:
        conn = world.fresh_server()
        offset = int.from_bytes(rest[:2].ljust(2, b"\0"), "big") % (len(world.client_flight) + 1)
        patch = rest[2:]
        feed = world.client_flight[:offset] + patch + world.client_flight[offset + len(patch) :]
    try:
        step = max(1, (data[0] >> 2) * 37)
        for i in range(0, len(feed), step):
            conn.receive_data(feed[i : i + step])
        conn.receive_eof()
    except securechan.SecureChannelError:
        pass
