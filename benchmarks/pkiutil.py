"""One throwaway PKI shared by every contender: a CA and ONE RSA-2048 server key/certificate."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from securechan import pki


@dataclass(frozen=True)
class BenchPKI:
    dir: Path
    ca: Path
    cert: Path
    key: Path
    #: certificate and key in one file, for stunnel
    combined: Path

    def server_config(self, **kw: object) -> object:
        import securechan

        return securechan.ServerConfig(certfile=self.cert, keyfile=self.key, **kw)  # type: ignore[arg-type]

    def client_config(self, **kw: object) -> object:
        import securechan

        return securechan.ClientConfig(cafile=self.ca, **kw)  # type: ignore[arg-type]

    def ssl_server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.cert, self.key)
        # No session tickets: TLS resumption is not measured (asyncio cannot pass an SSLSession),
        # and securechan's server issues none to the full-handshake client (resume=False), so
        # neither server pays for tickets in a full handshake (OpenSSL sends two by default).
        ctx.num_tickets = 0
        return ctx

    def ssl_client_context(self) -> ssl.SSLContext:
        # TLS 1.3 with the full CA chain and host name check, as a real client does.
        # OpenSSL's TLS 1.3 preference is TLS_AES_256_GCM_SHA384 first; the run records the
        # negotiated cipher so the comparison is checked, not assumed.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(self.ca)
        return ctx


def make(directory: Path) -> BenchPKI:
    directory.mkdir(parents=True, exist_ok=True)
    ca = pki.make_ca("securechan bench CA")
    cert, key = pki.issue_cert(ca, "127.0.0.1", dns=["localhost"], key_type="rsa2048")
    paths = BenchPKI(directory, directory / "ca.crt", directory / "server.crt", directory / "server.key",
                     directory / "server.pem")
    paths.ca.write_bytes(pki.cert_pem(ca[0]))
    paths.cert.write_bytes(pki.cert_pem(cert))
    paths.key.write_bytes(pki.key_pem(key))
    paths.combined.write_bytes(pki.cert_pem(cert) + pki.key_pem(key))
    for p in (paths.key, paths.combined):
        os.chmod(p, 0o600)
    return paths


def load(directory: Path) -> BenchPKI:
    return BenchPKI(directory, directory / "ca.crt", directory / "server.crt", directory / "server.key",
                    directory / "server.pem")
