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
                 ◄──  ServerHello (version, random, suite, x25519, chain, [client_auth])
    [verify chain or pin; K = random(32); W = RSA-OAEP-SHA256(leaf key, K)]
    [ClientCertificate (chain, scheme, signature)]  (only when client_auth is set)
    KeyExchange (W), Finished(client)  [+ application data]  ──►
                                   [evaluate client certificate; keep the verdict]
                                   [unwrap W; on failure K = random(32)]
                                   [verify client Finished, then act on the verdict]
                 ◄──  Finished(server)  [+ application data]
    [verify server Finished; only now is server data delivered]

A wrapped key that fails to unwrap is replaced by a random key, so it shows up only as a
Finished mismatch, at the same point and with the same alert as a forged Finished: no
padding oracle.

A ClientHello that carries a session ticket may instead lead to the one-round-trip resumed
handshake (ServerHello(resumed) + server Finished, then client Finished); see
:mod:`securechan.resumption`. A ticket the server does not accept changes nothing above
except ServerHello.ticket_status.

Client authentication (see :mod:`securechan.clientauth`): every rejection of a client
certificate (missing, bad chain, bad signature, not on the access list) is raised after
the client's Finished verified, before the server's Finished, so all of them happen at
one point in the flow.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import logging
import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.serialization import Encoding

from .certs import check_pins, parse_chain, verify_server_chain
from .clientauth import SUPPORTED_SCHEMES, evaluate_client, scheme_for_key, sign
from .config import MIN_RSA_BITS, ClientConfig, ServerConfig
from .errors import (
    CertificateRequiredError,
    ConfigError,
    HandshakeAuthError,
    IllegalParameterError,
    InsufficientSecurityError,
    NoCommonSuiteError,
    NoCommonVersionError,
    SecureChannelError,
    UnexpectedMessageError,
)
from .frames import FrameType, encode_frame, pack_map
from .keyschedule import SALT_RESUMPTION, Transcript, finished_mac, handshake_secrets
from .messages import (
    ClientCertificate,
    ClientHello,
    Finished,
    HandshakeMessage,
    KeyExchange,
    ServerHello,
    is_dns_name,
)
from .resumption import Resumption, offer, server_verdict
from .suites import KeyWrap, Suite
from .tickets import CachedSession, TicketStatus

Entropy = Callable[[int], bytes]
OAEP = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
WRAPPED_KEY_LEN = 32
_KEY_WRAP = int(KeyWrap.RSA_OAEP_SHA256)
_KEY_WRAPS = (_KEY_WRAP,)
log = logging.getLogger("securechan")


@dataclass
class Secrets:
    """What a completed (or, for the client, nearly completed) handshake yields."""

    version: int
    suite: Suite
    # Secrets never appear in a repr (logs, tracebacks with locals).
    client_traffic: bytes = field(repr=False)
    server_traffic: bytes = field(repr=False)
    exporter: bytes = field(repr=False)
    resumption: bytes = field(repr=False)
    send_record_limit: int
    peer_chain: tuple[x509.Certificate, ...] = ()
    resumed: bool = False
    #: ``peer_chain`` as the DER it was parsed from (kept for tickets, so nothing is re-encoded).
    peer_der: tuple[bytes, ...] = ()
    #: The negotiated application protocol (None: none).
    alpn: str | None = None


@dataclass
class Step:
    frames: list[bytes] = field(default_factory=list)
    #: Set when traffic secrets become available (client: with its Finished; server: with its own
    #: Finished, i.e. after the client's in a full handshake, at once in a resumed one).
    secrets: Secrets | None = field(default=None, repr=False)
    #: True when the peer's Finished has been verified.
    complete: bool = False


def handshake_frame(message: HandshakeMessage) -> bytes:
    return encode_frame(FrameType.HANDSHAKE, pack_map(message.encode()))


@functools.lru_cache(maxsize=256)
def _sent_name(server_name: str | None) -> str | None:
    """The server name to put in ClientHello: IP addresses are verified but not sent, as with TLS SNI."""
    if server_name is None:
        return None
    try:
        ipaddress.ip_address(server_name)
    except ValueError:
        return server_name
    return None


def check_server_name(server_name: str | None) -> None:
    """Raise ConfigError for a name no server accepts (checked before connecting, not after a round trip)."""
    if server_name is not None and not isinstance(server_name, str):
        raise ConfigError(f"server_name must be a string, got {type(server_name).__name__}")
    sent = _sent_name(server_name)
    if sent is not None and not is_dns_name(sent):
        raise ConfigError(
            f"server_name {server_name!r} is neither a DNS name (1-253 letters, digits, '-', '_' and '.') "
            "nor an IP address; give the name the server certificate is issued for"
        )


def _ephemeral_key(entropy: Entropy) -> x25519.X25519PrivateKey:
    """A fresh X25519 key: from the library's generator, or from ``entropy`` when a test pins it."""
    if entropy is os.urandom:
        return x25519.X25519PrivateKey.generate()
    return x25519.X25519PrivateKey.from_private_bytes(entropy(32))


def _x25519_public(key: x25519.X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _dh(key: x25519.X25519PrivateKey, peer: bytes) -> bytes:
    try:
        return key.exchange(x25519.X25519PublicKey.from_public_bytes(peer))
    except ValueError:  # all-zero shared secret: a low-order point
        raise IllegalParameterError("peer sent an invalid X25519 public key (low-order point)") from None


class ClientHandshake:
    def __init__(
        self,
        config: ClientConfig,
        server_name: str | None,
        entropy: Entropy = os.urandom,
        resume_key: Hashable = None,
    ) -> None:
        check_server_name(server_name)
        if server_name is None and config._store is not None:
            # Refused here, not after a round trip: a local mistake, not the server's fault.
            raise ConfigError(
                "server_name is required for a client that verifies the server certificate against a CA: "
                "pass the name the certificate is issued for (e.g. server_name='db.internal')"
            )
        self.config = config
        self.server_name = server_name
        #: Where this connection's tickets are cached: (host, port, server name).
        self.resume_key = resume_key if resume_key is not None else (None, None, server_name)
        #: The cached session offered in the ClientHello, if any.
        self._offer: CachedSession | None = None
        self._resumed_keys: dict[str, bytes] = {}
        self._entropy = entropy
        self._transcript = Transcript()
        self._x25519 = _ephemeral_key(entropy)
        self._expect: type = ServerHello
        self._server_finished_key = b""
        self._secrets: Secrets | None = None
        self._alpn: str | None = None

    def start(self) -> Step:
        cfg = self.config
        hello = ClientHello(
            versions=cfg._versions_desc,
            random=self._entropy(32),
            suites=cfg._suite_codes,
            key_wraps=_KEY_WRAPS,
            x25519=_x25519_public(self._x25519),
            max_record=cfg.max_record_size,
            server_name=_sent_name(self.server_name),
            accept_tickets=cfg.resume,
            alpn=tuple(cfg.alpn_protocols),  # already a tuple once the config checked it: not copied
        )
        self._offer = self._cached_session()
        if self._offer is not None:
            hello, frame = offer(hello, self._offer)
        else:
            frame = handshake_frame(hello)
        self._hello = hello
        self._transcript.add(frame)
        return Step(frames=[frame])

    def _cached_session(self) -> CachedSession | None:
        """A ticket to offer: unexpired, for a version and suite we still offer, for a server we still trust."""
        cfg = self.config
        if not cfg.resume:
            return None
        session = cfg._session_cache.take(self.resume_key)
        if session is None or session.version not in cfg.versions or session.suite not in cfg._suite_codes:
            return None
        try:
            # Today's CA, pins and clock must still accept the server (usually a verified-chain cache hit).
            der = session.server_der or tuple(c.public_bytes(Encoding.DER) for c in session.server_chain)
            self._verified_chain(der)
        except SecureChannelError as exc:
            log.debug("not offering a cached session ticket: %s", exc)
            return None
        return session

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
        if sh.alpn is not None and sh.alpn not in self._hello.alpn:
            raise IllegalParameterError(
                f"server chose application protocol {sh.alpn!r}, which this client did not offer")
        self._alpn = sh.alpn
        if sh.resumed or sh.ticket_status:
            if self._offer is None or (sh.resumed and sh.ticket_status):
                raise IllegalParameterError("server answered a session ticket this client did not offer")
            if sh.resumed:
                return self._on_resumed_server_hello(sh)
            self._ticket_refused(sh.ticket_status)
        chain = self._verified_chain(sh.certificates)
        leaf_key = chain[0].public_key()
        if not isinstance(leaf_key, rsa.RSAPublicKey) or leaf_key.key_size < MIN_RSA_BITS:
            raise InsufficientSecurityError(
                "the server certificate's key is not RSA-2048 or larger, so the key wrap cannot use it; "
                "the server must use an RSA certificate"
            )
        dhe = _dh(self._x25519, sh.x25519)
        cc = self._client_certificate(sh.client_auth)
        frames = [cc] if cc else []
        wrap_secret = self._entropy(WRAPPED_KEY_LEN)
        kx = handshake_frame(KeyExchange(wrapped_key=leaf_key.encrypt(wrap_secret, OAEP)))
        self._transcript.add(kx)
        th1 = self._transcript.digest()
        s = handshake_secrets(wrap_secret + dhe, th1, resumption=self.config.resume)
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
            resumption=s.get("resumption", b""),
            send_record_limit=min(sh.max_record, self.config.max_record_size),
            peer_chain=tuple(chain),
            peer_der=sh.certificates,
            alpn=sh.alpn,
        )
        self._expect = Finished
        return Step(frames=[*frames, kx, fin], secrets=self._secrets)

    def _client_certificate(self, schemes: tuple[int, ...]) -> bytes | None:
        """The ClientCertificate frame when the server asked for one (added to the transcript)."""
        if not schemes:
            return None
        cfg = self.config
        key = cfg._identity_key
        if key is None:
            raise CertificateRequiredError(
                "server requires a client certificate; configure certfile= and keyfile= in ClientConfig "
                "(issue one with: securechan cert issue --client)"
            )
        scheme = scheme_for_key(key)
        if int(scheme) not in schemes:
            raise NoCommonSuiteError(
                f"the server accepts client signature schemes {[hex(s) for s in schemes]}, none of which fits "
                f"this client's key ({scheme.name}); issue the client certificate with another --key-type"
            )
        scheme, signature = sign(key, self._transcript.digest())
        frame = handshake_frame(
            ClientCertificate(certificates=cfg._identity_der, scheme=int(scheme), signature=signature)
        )
        self._transcript.add(frame)
        return frame

    def _verified_chain(self, der: tuple[bytes, ...]) -> list[x509.Certificate]:
        """The server's chain, parsed and validated (or taken from this config's cache of verified chains).

        Pins are checked on every handshake, cached chain or not; the cache only saves path validation.
        """
        cfg = self.config
        chain = cfg._verified_chains.get(der, self.server_name)
        cached = chain is not None
        if chain is None:
            chain = parse_chain(der, "server")
        if cfg._pins:
            check_pins(chain[0], cfg._pins, "server")
        if not cached and (path := self._verify_path(chain)) is not None:
            cfg._verified_chains.put(der, self.server_name, chain, path)
        return chain

    def _verify_path(self, chain: list[x509.Certificate]) -> list[x509.Certificate] | None:
        """Validate the chain against the CA; return the validated path (None when only pins are configured)."""
        cfg = self.config
        if cfg._store is None:
            return None
        name = self.server_name
        assert name is not None  # __init__ refuses a CA-verifying client without a server name
        return verify_server_chain(chain, name, cfg._store, cafile_desc=cfg.trust_description)

    def _ticket_refused(self, code: int) -> None:
        try:
            status = TicketStatus(code)
        except ValueError:
            status = TicketStatus.INVALID  # a code from a later version: still just a refusal
        log.debug("server did not accept our session ticket (%s); continuing with a full handshake", status.reason)
        self.config._session_cache.count_fallback(status)
        self._offer = None

    def _on_resumed_server_hello(self, sh: ServerHello) -> Step:
        session = self._offer
        assert session is not None
        if sh.version != session.version or sh.suite != session.suite or sh.client_auth:
            raise IllegalParameterError(
                "server resumed the session with a version, suite or client-auth request that does not match the ticket"
            )
        dhe = _dh(self._x25519, sh.x25519)
        self._resumed_keys = handshake_secrets(session.psk + dhe, self._transcript.digest(), SALT_RESUMPTION)
        self._resumed_max_record = sh.max_record
        self._expect = Finished
        return Step()

    def _on_resumed_finished(self, fin: Finished, frame: bytes) -> Step:
        s, session = self._resumed_keys, self._offer
        assert session is not None
        if not hmac.compare_digest(finished_mac(s["s finished"], self._transcript.digest()), fin.mac):
            raise HandshakeAuthError(
                "the server's Finished MAC did not verify in a resumed handshake: the server does not hold "
                "the session ticket's key, or the handshake was altered in transit"
            )
        self._transcript.add(frame)
        out = handshake_frame(Finished(mac=finished_mac(s["c finished"], self._transcript.digest())))
        secrets = Secrets(
            version=session.version,
            suite=Suite(session.suite),
            client_traffic=s["c ap traffic"],
            server_traffic=s["s ap traffic"],
            exporter=s["exporter"],
            resumption=s["resumption"],
            send_record_limit=min(self._resumed_max_record, self.config.max_record_size),
            peer_chain=session.server_chain,
            resumed=True,
            peer_der=session.server_der,
            alpn=self._alpn,
        )
        self._resumed_keys = {}
        self._expect = type(None)
        self.config._session_cache.count_handshake(resumed=True)
        return Step(frames=[out], secrets=secrets, complete=True)

    def _on_finished(self, fin: Finished, frame: bytes) -> Step:
        if self._resumed_keys:
            return self._on_resumed_finished(fin, frame)
        expected = finished_mac(self._server_finished_key, self._transcript.digest())
        if not hmac.compare_digest(expected, fin.mac):
            raise HandshakeAuthError(
                "the server's Finished MAC did not verify: the server could not unwrap our key with the "
                "certificate's private key, or the handshake was altered in transit"
            )
        self._transcript.add(frame)
        self._server_finished_key = b""
        self._expect = type(None)
        self.config._session_cache.count_handshake(resumed=False)
        return Step(complete=True)


class ServerHandshake:
    def __init__(self, config: ServerConfig, entropy: Entropy = os.urandom) -> None:
        self.config = config
        self._entropy = entropy
        self._transcript = Transcript()
        self._expect: type = ClientHello
        self.server_name: str | None = None
        self.client_accepts_tickets = False
        self._client_auth: tuple[int, ...] = ()
        #: Set when the ClientHello's ticket was accepted (resumed handshake).
        self._resumption: Resumption | None = None
        #: A resumed handshake's key for the client's Finished (its other secrets left with our Finished).
        self._client_finished_key = b""
        self._client_chain: tuple[x509.Certificate, ...] = ()
        self._client_der: tuple[bytes, ...] = ()
        #: The client-authentication verdict, acted on once the client's Finished verified.
        self._client_error: SecureChannelError | None = None
        #: th1, the transcript hash through KeyExchange (full handshake).
        self._th1 = b""
        self._alpn: str | None = None

    @property
    def issues_ticket(self) -> bool:
        """This connection will send a session ticket, so it needs its resumption secret."""
        return self.client_accepts_tickets and self.config._tickets is not None

    @property
    def expecting(self) -> str:
        """The wire type of the next handshake message this side waits for."""
        return str(getattr(self._expect, "TYPE", ""))

    def handle(self, message: HandshakeMessage, frame: bytes) -> Step:
        if self._expect is ClientCertificate and isinstance(message, KeyExchange):
            # A client without a certificate: refused with the other client-auth verdicts, after its Finished.
            self._client_error = CertificateRequiredError(
                "the client presented no certificate, and this server requires one (client_cafile= is set)"
            )
        elif not isinstance(message, self._expect):
            raise UnexpectedMessageError(
                f"expected {self._expect.TYPE} from the client, got {message.TYPE}"  # type: ignore[attr-defined]
            )
        if isinstance(message, Finished):
            return self._on_finished(message, frame)
        if isinstance(message, ClientCertificate):
            self._on_client_certificate(message)
            self._transcript.add(frame)
            self._expect = KeyExchange
            return Step()
        self._transcript.add(frame)
        if isinstance(message, ClientHello):
            return self._on_client_hello(message, frame)
        assert isinstance(message, KeyExchange)
        return self._on_key_exchange(message)

    def _on_client_certificate(self, cc: ClientCertificate) -> None:
        cfg = self.config
        assert cfg._client_store is not None
        self._client_chain, self._client_error = evaluate_client(
            cc.certificates, cc.scheme, cc.signature, self._transcript.digest(), self._client_auth,
            cfg._client_store, cfg.allow, cfg.client_ca_description,
        )
        self._client_der = cc.certificates if self._client_chain else ()

    def _on_client_hello(self, ch: ClientHello, hello_frame: bytes) -> Step:
        cfg = self.config
        offered_versions, offered_suites = ch.versions, ch.suites
        version = None
        for v in cfg._versions_desc:  # newest first
            if v in offered_versions:
                version = v
                break
        if version is None:
            raise NoCommonVersionError(
                f"client offered protocol versions {list(ch.versions)}; this server speaks {list(cfg.versions)}: "
                "upgrade the older side"
            )
        suite = None
        for s in cfg.suites:  # Suite members (ServerConfig checked them), in preference order
            if s in offered_suites:
                suite = cast(Suite, s)
                break
        if suite is None:
            offered = ", ".join(Suite(s).label if s in Suite._value2member_map_ else str(s) for s in ch.suites)
            raise NoCommonSuiteError(
                f"client offered suites [{offered}]; this server allows "
                f"[{', '.join(Suite(int(s)).label for s in cfg.suites)}]: align the suites settings"
            )
        if _KEY_WRAP not in ch.key_wraps:
            raise NoCommonSuiteError("client offered no key-wrap method this server supports (RSA-OAEP-SHA256)")
        self.server_name = ch.server_name
        self.client_accepts_tickets = ch.accept_tickets
        self._client_auth = SUPPORTED_SCHEMES if cfg.requires_client_certificate else ()
        self._client_max_record = ch.max_record
        if ch.alpn:  # the first of ours the client offered (a plain loop: this runs for every hello)
            for protocol in cfg.alpn_protocols:
                if protocol in ch.alpn:
                    self._alpn = protocol
                    break
        self._x25519 = _ephemeral_key(self._entropy)
        self._dhe = _dh(self._x25519, ch.x25519)
        ticket_status = TicketStatus.ACCEPTED
        if ch.ticket is not None:
            # Only the version this handshake negotiates: a ticket never resumes into an older version.
            resumption, ticket_status = server_verdict(cfg, ch, hello_frame, (version,))
            if resumption is not None:
                return self._resume(resumption)
        sh = ServerHello(
            version=version,
            random=self._entropy(32),
            suite=int(suite),
            key_wrap=_KEY_WRAP,
            x25519=_x25519_public(self._x25519),
            max_record=cfg.max_record_size,
            certificates=cfg._chain_der,
            client_auth=self._client_auth,
            ticket_status=int(ticket_status),
            alpn=self._alpn,
        )
        self._version, self._suite = version, suite
        frame = handshake_frame(sh)
        self._transcript.add(frame)
        self._expect = ClientCertificate if self._client_auth else KeyExchange
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
        self._th1 = th1 = self._transcript.digest()
        self._s = handshake_secrets(wrap_secret + self._dhe, th1, resumption=self.issues_ticket)
        self._dhe = b""
        self._expect = Finished
        return Step()

    def _resume(self, r: Resumption) -> Step:
        """Answer an accepted ticket: ServerHello(resumed) and our Finished at once (one round trip)."""
        self._resumption = r
        self._client_chain, self._client_der = r.client_chain, r.client_der
        self._client_auth = ()
        sh = ServerHello(
            version=r.version,
            random=self._entropy(32),
            suite=r.suite,
            key_wrap=_KEY_WRAP,
            x25519=_x25519_public(self._x25519),
            max_record=self.config.max_record_size,
            resumed=True,
            alpn=self._alpn,
        )
        self._version, self._suite = r.version, Suite(r.suite)
        sh_frame = handshake_frame(sh)
        self._transcript.add(sh_frame)
        th1 = self._transcript.digest()
        self._s = handshake_secrets(r.psk + self._dhe, th1, SALT_RESUMPTION, resumption=self.issues_ticket)
        self._dhe = b""
        fin = handshake_frame(Finished(mac=finished_mac(self._s["s finished"], th1)))
        self._transcript.add(fin)
        # The traffic secrets go to the record layer with our Finished, so the session ticket can
        # leave in this flight (docs/PROTOCOL.md §13.4); the client's Finished is still verified
        # before the handshake completes, and nothing but the ticket is sent before that.
        self._client_finished_key = self._s["c finished"]
        secrets = self._take_secrets(resumed=True)
        self._expect = Finished
        return Step(frames=[sh_frame, fin], secrets=secrets)

    def _take_secrets(self, resumed: bool) -> Secrets:
        """Hand the derived secrets to the record layer and forget them here (our Finished is sent)."""
        secrets = Secrets(
            version=self._version,
            suite=self._suite,
            client_traffic=self._s["c ap traffic"],
            server_traffic=self._s["s ap traffic"],
            exporter=self._s["exporter"],
            resumption=self._s.get("resumption", b""),
            send_record_limit=min(self._client_max_record, self.config.max_record_size),
            peer_chain=self._client_chain,
            resumed=resumed,
            peer_der=self._client_der,
            alpn=self._alpn,
        )
        self._s = {}
        self._expect = type(None)
        return secrets

    def _on_resumed_finished(self, fin: Finished, frame: bytes) -> Step:
        key, self._client_finished_key = self._client_finished_key, b""
        if not hmac.compare_digest(finished_mac(key, self._transcript.digest()), fin.mac):
            raise HandshakeAuthError(
                "the client's Finished MAC did not verify in a resumed handshake: the client does not hold "
                "the ticket's key, or the handshake was altered in transit"
            )
        self._transcript.add(frame)
        return Step(complete=True)

    def _on_finished(self, fin: Finished, frame: bytes) -> Step:
        if self._resumption is not None:
            return self._on_resumed_finished(fin, frame)
        # The transcript is still what it was at the key exchange: th1 (computed there).
        expected = finished_mac(self._s["c finished"], self._th1)
        if not hmac.compare_digest(expected, fin.mac):
            raise HandshakeAuthError(
                "the client's Finished MAC did not verify: the handshake was altered in transit, "
                "or the client used a different server key"
            )
        if self._client_error is not None:
            self._s = {}
            raise self._client_error
        self._transcript.add(frame)
        th2 = self._transcript.digest()
        out = handshake_frame(Finished(mac=finished_mac(self._s["s finished"], th2)))
        secrets = self._take_secrets(resumed=False)
        return Step(frames=[out], secrets=secrets, complete=True)

