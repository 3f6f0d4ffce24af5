"""Client and server handshakes (full handshake, protocol version 1).

Theory of operation
-------------------
Each side is a small state machine driven by :class:`securechan.Connection`: it is handed
one decoded handshake message plus the exact frame bytes (for the transcript) and answers
with a :class:`Step`: frames to send, and traffic secrets once they exist. Nothing here
touches sockets, clocks or the record layer.

::

    client                                           server
    ClientHello  (versions, random, suites, key wraps, x25519, server_name)  ──►
                 ◄──  ServerHello (version, random, suite, x25519, chain)
    [verify chain or pin; K = random(32); W = RSA-OAEP-SHA256(leaf key, K)]
    KeyExchange (W), Finished(client)  [+ application data]  ──►
                                   [unwrap W; on failure K = random(32)]
                                   [verify client Finished]
                 ◄──  Finished(server)  [+ application data]
    [verify server Finished; only now is server data delivered]

A wrapped key that fails to unwrap is replaced by a random key, so it shows up only as a
Finished mismatch, at the same point and with the same alert as a forged Finished: no
padding oracle.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .certs import check_pins, parse_chain, verify_server_chain
from .config import MIN_RSA_BITS, ClientConfig, ServerConfig
from .errors import (
    HandshakeAuthError,
    IllegalParameterError,
    InsufficientSecurityError,
    NoCommonSuiteError,
    NoCommonVersionError,
    UnexpectedMessageError,
)
from .frames import FrameType, encode_frame, pack_map
from .keyschedule import KeySchedule, Transcript, finished_mac
from .messages import ClientHello, Finished, HandshakeMessage, KeyExchange, ServerHello
from .suites import KeyWrap, Suite

Entropy = Callable[[int], bytes]
OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
WRAPPED_KEY_LEN = 32


@dataclass
class Secrets:
    """What a completed (or, for the client, nearly completed) handshake yields."""

    version: int
    suite: Suite
    client_traffic: bytes
    server_traffic: bytes
    exporter: bytes
    resumption: bytes
    send_record_limit: int
    peer_chain: tuple[x509.Certificate, ...] = ()
    resumed: bool = False


@dataclass
class Step:
    frames: list[bytes] = field(default_factory=list)
    #: Set when traffic secrets become available (client: after its Finished; server: after the client's).
    secrets: Secrets | None = None
    #: True when the peer's Finished has been verified.
    complete: bool = False


def handshake_frame(message: HandshakeMessage) -> bytes:
    return encode_frame(FrameType.HANDSHAKE, pack_map(message.encode()))


def _x25519_public(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(key: x25519.X25519PrivateKey, peer: bytes) -> bytes:
    try:
        return key.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
    except ValueError:  # all-zero shared secret: a low-order point
        raise IllegalParameterError("peer sent an invalid X25519 public key (low-order point)") from None


def _derive(ikm: bytes, transcript_hash: bytes) -> tuple[KeySchedule, dict[str, bytes]]:
    ks = KeySchedule(ikm)
    labels = ("c finished", "s finished", "c ap traffic", "s ap traffic", "exporter", "resumption")
    return ks, {label: ks.derive(label.encode(), transcript_hash) for label in labels}


class ClientHandshake:
    def __init__(self, config: ClientConfig, server_name: str | None, entropy: Entropy = os.urandom) -> None:
        self.config = config
        self.server_name = server_name
        self._entropy = entropy
        self._transcript = Transcript()
        self._x25519 = x25519.X25519PrivateKey.from_private_bytes(entropy(32))
        self._expect: type = ServerHello
        self._server_finished_key = b""
        self._secrets: Secrets | None = None

    def start(self) -> Step:
        name = self.server_name
        if name is not None:
            try:
                ipaddress.ip_address(name)
                name = None  # IP addresses are verified but not sent, as with TLS SNI
            except ValueError:
                pass
        hello = ClientHello(
            versions=tuple(sorted(self.config.versions, reverse=True)),
            random=self._entropy(32),
            suites=tuple(int(s) for s in self.config.suites),
            key_wraps=(int(KeyWrap.RSA_OAEP_SHA256),),
            x25519=_x25519_public(self._x25519),
            max_record=self.config.max_record_size,
            server_name=name,
        )
        self._hello = hello
        frame = handshake_frame(hello)
        self._transcript.add(frame)
        return Step(frames=[frame])

    def handle(self, message: HandshakeMessage, frame: bytes) -> Step:
        if not isinstance(message, self._expect):
            raise UnexpectedMessageError(
                f"expected {self._expect.TYPE} from the server, got {message.TYPE}"  # type: ignore[attr-defined]
            )
        if isinstance(message, Finished):
            return self._on_finished(message, frame)
        self._transcript.add(frame)
        assert isinstance(message, ServerHello)
        return self._on_server_hello(message)

    def _on_server_hello(self, sh: ServerHello) -> Step:
        if sh.version not in self._hello.versions:
            raise NoCommonVersionError(f"server chose protocol version {sh.version}, which this client did not offer")
        if sh.suite not in self._hello.suites:
            raise IllegalParameterError(f"server chose suite {sh.suite}, which this client did not offer")
        if sh.key_wrap not in self._hello.key_wraps:
            raise IllegalParameterError(f"server chose key wrap {sh.key_wrap}, which this client did not offer")
        if sh.resumed or sh.client_auth:
            raise IllegalParameterError("server asked for a feature this client did not offer")
        chain = parse_chain(sh.certificates, "server")
        self._verify(chain)
        leaf_key = chain[0].public_key()
        if not isinstance(leaf_key, rsa.RSAPublicKey) or leaf_key.key_size < MIN_RSA_BITS:
            raise InsufficientSecurityError(
                "the server certificate's key is not RSA-2048 or larger, so the key wrap cannot use it; "
                "the server must use an RSA certificate"
            )
        dhe = _dh(self._x25519, sh.x25519)
        wrap_secret = self._entropy(WRAPPED_KEY_LEN)
        kx = handshake_frame(KeyExchange(wrapped_key=leaf_key.encrypt(wrap_secret, OAEP)))
        self._transcript.add(kx)
        th1 = self._transcript.digest()
        ks, s = _derive(wrap_secret + dhe, th1)
        ks.wipe()
        fin = handshake_frame(Finished(mac=finished_mac(s["c finished"], th1)))
        self._transcript.add(fin)
        self._server_finished_key = s["s finished"]
        suite = Suite(sh.suite)
        self._secrets = Secrets(
            version=sh.version,
            suite=suite,
            client_traffic=s["c ap traffic"],
            server_traffic=s["s ap traffic"],
            exporter=s["exporter"],
            resumption=s["resumption"],
            send_record_limit=min(sh.max_record, self.config.max_record_size),
            peer_chain=tuple(chain),
        )
        self._expect = Finished
        return Step(frames=[kx, fin], secrets=self._secrets)

    def _verify(self, chain: list[x509.Certificate]) -> None:
        cfg = self.config
        if cfg._pins:
            check_pins(chain[0], cfg._pins, "server")
        if cfg._store is not None:
            name = self.server_name
            if name is None:
                raise IllegalParameterError("a server name is required to verify the server certificate against a CA")
            verify_server_chain(chain, name, cfg._store, cafile_desc=cfg.trust_description)

    def _on_finished(self, fin: Finished, frame: bytes) -> Step:
        expected = finished_mac(self._server_finished_key, self._transcript.digest())
        if not hmac.compare_digest(expected, fin.mac):
            raise HandshakeAuthError(
                "the server's Finished MAC did not verify: the server could not unwrap our key with the "
                "certificate's private key, or the handshake was altered in transit"
            )
        self._transcript.add(frame)
        self._server_finished_key = b""
        self._expect = type(None)
        return Step(complete=True)


class ServerHandshake:
    def __init__(self, config: ServerConfig, entropy: Entropy = os.urandom) -> None:
        self.config = config
        self._entropy = entropy
        self._transcript = Transcript()
        self._expect: type = ClientHello
        self.server_name: str | None = None

    def handle(self, message: HandshakeMessage, frame: bytes) -> Step:
        if not isinstance(message, self._expect):
            raise UnexpectedMessageError(
                f"expected {self._expect.TYPE} from the client, got {message.TYPE}"  # type: ignore[attr-defined]
            )
        if isinstance(message, Finished):
            return self._on_finished(message, frame)
        self._transcript.add(frame)
        if isinstance(message, ClientHello):
            return self._on_client_hello(message)
        assert isinstance(message, KeyExchange)
        return self._on_key_exchange(message)

    def _on_client_hello(self, ch: ClientHello) -> Step:
        cfg = self.config
        version = next((v for v in sorted(cfg.versions, reverse=True) if v in ch.versions), None)
        if version is None:
            raise NoCommonVersionError(
                f"client offered protocol versions {list(ch.versions)}; this server speaks {list(cfg.versions)}: "
                "upgrade the older side"
            )
        suite = next((s for s in cfg.suites if int(s) in ch.suites), None)
        if suite is None:
            offered = ", ".join(Suite(s).label if s in Suite._value2member_map_ else str(s) for s in ch.suites)
            raise NoCommonSuiteError(
                f"client offered suites [{offered}]; this server allows "
                f"[{', '.join(Suite(s).label for s in cfg.suites)}]: align the suites settings"
            )
        if int(KeyWrap.RSA_OAEP_SHA256) not in ch.key_wraps:
            raise NoCommonSuiteError("client offered no key-wrap method this server supports (RSA-OAEP-SHA256)")
        self.server_name = ch.server_name
        self._client_max_record = ch.max_record
        self._x25519 = x25519.X25519PrivateKey.from_private_bytes(self._entropy(32))
        self._dhe = _dh(self._x25519, ch.x25519)
        sh = ServerHello(
            version=version,
            random=self._entropy(32),
            suite=int(suite),
            key_wrap=int(KeyWrap.RSA_OAEP_SHA256),
            x25519=_x25519_public(self._x25519),
            max_record=cfg.max_record_size,
            certificates=cfg._chain_der,
        )
        self._version, self._suite = version, suite
        frame = handshake_frame(sh)
        self._transcript.add(frame)
        self._expect = KeyExchange
        return Step(frames=[frame])

    def _on_key_exchange(self, kx: KeyExchange) -> Step:
        # Draw the substitute first so success and failure do the same work.
        substitute = self._entropy(WRAPPED_KEY_LEN)
        key = self.config._key
        assert isinstance(key, rsa.RSAPrivateKey)
        try:
            unwrapped = key.decrypt(kx.wrapped_key, OAEP)
            ok = len(unwrapped) == WRAPPED_KEY_LEN
        except ValueError:
            unwrapped, ok = substitute, False
        wrap_secret = unwrapped if ok else substitute
        th1 = self._transcript.digest()
        ks, self._s = _derive(wrap_secret + self._dhe, th1)
        ks.wipe()
        self._dhe = b""
        self._expect = Finished
        return Step()

    def _on_finished(self, fin: Finished, frame: bytes) -> Step:
        th1 = self._transcript.digest()
        expected = finished_mac(self._s["c finished"], th1)
        if not hmac.compare_digest(expected, fin.mac):
            raise HandshakeAuthError(
                "the client's Finished MAC did not verify: the handshake was altered in transit, "
                "or the client used a different server key"
            )
        self._transcript.add(frame)
        th2 = self._transcript.digest()
        out = handshake_frame(Finished(mac=finished_mac(self._s["s finished"], th2)))
        secrets = Secrets(
            version=self._version,
            suite=self._suite,
            client_traffic=self._s["c ap traffic"],
            server_traffic=self._s["s ap traffic"],
            exporter=self._s["exporter"],
            resumption=self._s["resumption"],
            send_record_limit=min(self._client_max_record, self.config.max_record_size),
        )
        self._s = {}
        self._expect = type(None)
        return Step(frames=[out], secrets=secrets, complete=True)

