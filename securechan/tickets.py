"""Session tickets: sealing under rotating ticket keys, shared key files, the client cache.

Theory of operation
-------------------
Server side (:class:`ServerTickets`, one per :class:`~securechan.ServerConfig`). After a
handshake the connection derives a per-ticket PSK from its resumption secret and a fresh
ticket nonce, and asks :meth:`ServerTickets.seal` for a ticket. A ticket is::

    ticket = format (1 byte, = 1) || key_id (8) || salt (16) || AES-256-GCM(seal_key, nonce = 0^96,
             plaintext, aad = format || key_id),   seal_key = HKDF(ticket_key, "ticket seal", salt)

``plaintext`` is a msgpack map holding the PSK, protocol version, suite, server name, the
client's verified certificate chain (DER, when it authenticated) and issue/expiry times in
wall-clock milliseconds (wall clock, so every server of a fleet agrees). The ticket is opaque
to the client.

Ticket keys come from a :class:`TicketKeyRing`. Each key is a 32-byte secret; its AEAD key
and key id are derived from it with HKDF (labels "ticket key" and "ticket key id"). The first
key of the ring seals; every key of the ring opens. Without a key file the ring lives in
memory: a random secret, replaced every ``ticket_rotation`` seconds, the previous one still
opening for one more period. With a key file, the file is the ring (first line seals), and
it is re-read whenever its size, mtime or inode changes; rotation is done by rewriting the
file (``securechan ticket-key rotate``).

:meth:`ServerTickets.open` never raises on a bad ticket: it returns a :class:`TicketStatus`
(unknown key, failed tag and malformed contents are one status, ``INVALID``, so they cannot
be told apart). With ``ticket_single_use`` each ticket id (key id + salt) is remembered
until the ticket expires, and a second use is ``REPLAYED``; the ids live in a dict plus a
heap ordered by expiry, so expired ones are dropped first and no id pins others in memory.

Client side (:class:`TicketCache`, one per :class:`~securechan.ClientConfig`). Tickets are
kept per (host, port, server name), newest first, each used at most once (the server sends a
fresh ticket on every connection). A ticket counts as expired on the client a margin before
the server would refuse it: ``lifetime - min(60 s, lifetime / 10)`` after it arrived.
"""

from __future__ import annotations

import base64
import binascii
import collections
import enum
import heapq
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .certs import read_bounded
from .errors import ConfigError, DecodeError, InternalError
from .frames import unpack_map
from .keyschedule import expand_label
from .messages import MAX_TICKET_LEN

log = logging.getLogger("securechan")

#: Version byte at the start of every ticket. A later format changes this byte; a server
#: treats a ticket of a format it does not know as INVALID and runs a full handshake.
TICKET_FORMAT = 1
KEY_ID_LEN = 8
SALT_LEN = 16
_ZERO_NONCE = bytes(12)
TICKET_SECRET_LEN = 32
_HEAD_LEN = 1 + KEY_ID_LEN + SALT_LEN
_TAG_LEN = 16

#: Key file syntax: one key per line, ``sc1-ticket-key:<base64url of 32 bytes>``; ``#`` starts a comment.
KEY_FILE_PREFIX = "sc1-ticket-key:"
MAX_KEY_FILE = 64 * 1024
MAX_FILE_KEYS = 8
#: Upper bound of remembered ticket ids for single-use tickets; when full, tickets are refused (fail safe).
MAX_SEEN_TICKETS = 200_000
#: Client cache bounds.
MAX_CACHE_KEYS = 256
MAX_TICKETS_PER_KEY = 64
#: Bytes of tickets one client cache holds at most, whatever size the servers make them.
MAX_CACHE_BYTES = 4 * 1024 * 1024
CLIENT_MARGIN_MAX = 60.0


class TicketStatus(enum.IntEnum):
    """Why a ticket was not used; sent as ``ticket_status`` in ServerHello (0 = no ticket or accepted)."""

    ACCEPTED = 0
    #: Unknown key id, failed authentication, unknown format or malformed contents, wrong binder.
    INVALID = 1
    EXPIRED = 2
    #: Single-use tickets: this ticket was already used.
    REPLAYED = 3
    #: A valid ticket this server cannot resume: other server name, version or suite no longer
    #: allowed, or the client identity in it no longer passes this server's checks.
    MISMATCH = 4
    #: This server does not accept tickets (``tickets=False``).
    DISABLED = 5

    @property
    def reason(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class TicketContents:
    """What a ticket carries (the plaintext inside the AEAD)."""

    psk: bytes = field(repr=False)
    version: int
    suite: int
    server_name: str | None
    #: The client's verified chain, DER, leaf first; empty when the client did not authenticate.
    client_chain: tuple[bytes, ...]
    issued_ms: int = 0
    expires_ms: int = 0

    def encode(self) -> bytes:
        m: dict[str, Any] = {
            "psk": self.psk,
            "version": self.version,
            "suite": self.suite,
            "issued": self.issued_ms,
            "expires": self.expires_ms,
        }
        if self.server_name is not None:
            m["server_name"] = self.server_name
        if self.client_chain:
            m["client_chain"] = list(self.client_chain)
        # Its own packer, not the shared one: that one's buffer lives on, and this map holds the PSK.
        return bytes(msgpack.packb(m, use_bin_type=True))

    @classmethod
    def decode(cls, data: bytes) -> TicketContents:
        m = unpack_map(data, MAX_TICKET_LEN)
        extra = set(m) - {"psk", "version", "suite", "issued", "expires", "server_name", "client_chain"}
        if extra:
            raise DecodeError("ticket: unexpected fields")
        psk, name, chain = m.get("psk"), m.get("server_name"), m.get("client_chain", [])
        ints = [m.get(k) for k in ("version", "suite", "issued", "expires")]
        if not (
            isinstance(psk, bytes) and len(psk) == 32
            and (name is None or isinstance(name, str))
            and isinstance(chain, list) and all(isinstance(c, bytes) and c for c in chain)
        ):
            raise DecodeError("ticket: malformed contents")
        version, suite, issued, expires = (_ticket_int(v) for v in ints)
        return cls(psk, version, suite, name, tuple(chain), issued, expires)


def _ticket_int(value: object) -> int:
    if type(value) is not int:
        raise DecodeError("ticket: malformed contents")
    return value


class TicketKey:
    """One ticket key: the key that per-ticket AES-256-GCM keys come from, and the 8-byte id that names it."""

    __slots__ = ("_secret", "key_id")

    def __init__(self, secret: bytes) -> None:
        if len(secret) != TICKET_SECRET_LEN:
            raise ConfigError(f"a ticket key must be {TICKET_SECRET_LEN} bytes")
        self.key_id = expand_label(secret, b"ticket key id", b"", KEY_ID_LEN)
        self._secret = expand_label(secret, b"ticket key", b"", 32)

    def _aead(self, salt: bytes) -> AESGCM:
        # One AES-256-GCM key per ticket, derived from a 128-bit random salt: a key is used for
        # one encryption only, so no nonce bound applies however many tickets a key file seals.
        return AESGCM(expand_label(self._secret, b"ticket seal", salt, 32))

    def seal(self, salt: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead(salt).encrypt(_ZERO_NONCE, plaintext, aad)

    def open(self, salt: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
        try:
            return self._aead(salt).decrypt(_ZERO_NONCE, ciphertext, aad)
        except InvalidTag:
            return None


def new_key_secret() -> bytes:
    return os.urandom(TICKET_SECRET_LEN)


def format_key_file(secrets: list[bytes]) -> str:
    lines = [
        "# securechan ticket keys (format 1). Keep this file secret (mode 0600).",
        "# The first key seals new tickets; every key listed opens tickets.",
    ]
    lines += [KEY_FILE_PREFIX + base64.urlsafe_b64encode(s).decode().rstrip("=") for s in secrets]
    return "\n".join(lines) + "\n"


def parse_key_file(text: str, where: str) -> list[bytes]:
    """Return the key secrets of a key file, first (sealing) key first; ConfigError when unusable."""
    secrets: list[bytes] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith(KEY_FILE_PREFIX):
            raise ConfigError(
                f"ticket key file {where} line {lineno} is not a ticket key; "
                f"create the file with 'securechan ticket-key new --out FILE'"
            )
        encoded = line[len(KEY_FILE_PREFIX):]
        try:
            secret = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"ticket key file {where} line {lineno}: the key is not valid base64url") from None
        if len(secret) != TICKET_SECRET_LEN:
            raise ConfigError(
                f"ticket key file {where} line {lineno}: a key must be {TICKET_SECRET_LEN} bytes, not {len(secret)}"
            )
        secrets.append(secret)
    if not secrets:
        raise ConfigError(
            f"ticket key file {where} holds no key; create it with 'securechan ticket-key new --out FILE'"
        )
    if len(secrets) > MAX_FILE_KEYS:
        raise ConfigError(f"ticket key file {where} holds {len(secrets)} keys; at most {MAX_FILE_KEYS} are allowed")
    return secrets


def read_key_file(path: str | os.PathLike[str]) -> tuple[list[bytes], tuple[int, int, int]]:
    """Read and parse a key file; returns (secrets, (inode, size, mtime_ns)) for change detection."""
    where = repr(os.fspath(path))
    try:
        data, st = read_bounded(path, MAX_KEY_FILE)  # never blocks on a FIFO in the file's place
    except FileNotFoundError:
        raise ConfigError(
            f"ticket key file {where} does not exist; create it with 'securechan ticket-key new --out FILE'"
        ) from None
    except OSError as exc:  # a directory, no permission, a socket (ENXIO), ...
        raise ConfigError(f"ticket key file {where} cannot be read: {exc.strerror or exc}") from None
    if data is None:
        raise ConfigError(f"ticket key file {where} is not a regular file")
    if len(data) > MAX_KEY_FILE:
        raise ConfigError(f"ticket key file {where} is larger than {MAX_KEY_FILE} bytes; is it the right file?")
    # Whoever can write the file can add a key and mint tickets for any client identity: only
    # this process's user (or root) may own it, and no one else may write it.
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(
            f"ticket key file {where} belongs to uid {st.st_uid}, not to this server's user or root; "
            "whoever owns it can mint tickets: chown it"
        )
    if st.st_mode & (stat.S_IWOTH | stat.S_IWGRP):
        raise ConfigError(f"ticket key file {where} is writable by other users; chmod 600 it")
    if st.st_mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("ticket key file %s is readable by other users; chmod 600 it", where)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"ticket key file {where} has a byte that is not ASCII on line {line}; a key file holds "
            f"'{KEY_FILE_PREFIX}' lines and '#' comments in ASCII ('securechan ticket-key new' writes one)"
        ) from None
    return parse_key_file(text, where), (st.st_ino, st.st_size, st.st_mtime_ns)


class TicketKeyRing:
    """The keys that seal and open tickets: in memory with timed rotation, or from a shared key file."""

    def __init__(
        self,
        *,
        rotation: float,
        key_file: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rotation = rotation
        self.key_file = key_file
        self.clock = clock
        self._lock = threading.Lock()
        self._keys: list[TicketKey] = []
        self._rotated_at = 0.0
        self._file_sig: tuple[int, int, int] | None = None
        #: How many times the ring changed its sealing key (rotation or file change).
        self.rotations = 0
        if key_file is not None:
            secrets, self._file_sig = read_key_file(key_file)
            self._keys = [TicketKey(s) for s in secrets]

    def current(self) -> list[TicketKey]:
        """The current ring, first key seals. Rotates or reloads first when due."""
        with self._lock:
            if self.key_file is None:
                self._rotate_if_due()
            else:
                self._reload_if_changed()
            return self._keys

    def rotate(self) -> None:
        """In-memory rings: start a new sealing key now; the old one keeps opening for one period."""
        if self.key_file is not None:
            raise ConfigError("a ring loaded from a key file is rotated by rewriting the file")
        with self._lock:
            self._new_key(self.clock())

    def _rotate_if_due(self) -> None:
        now = self.clock()
        if not self._keys or now - self._rotated_at >= self.rotation or now < self._rotated_at:
            self._new_key(now)

    def _new_key(self, now: float) -> None:
        fresh = TicketKey(new_key_secret())
        # A long idle period skips more than one rotation: then the old key is too old to keep.
        keep = self._keys[:1] if self._keys and now - self._rotated_at < 2 * self.rotation else []
        self._keys = [fresh, *keep]
        if self._rotated_at:
            self.rotations += 1
            log.debug("ticket key rotated")
        self._rotated_at = now

    def _reload_if_changed(self) -> None:
        assert self.key_file is not None
        try:
            st = os.stat(self.key_file)
        except OSError as exc:
            log.warning("ticket key file %r is unreadable (%s); keeping the keys loaded before",
                        os.fspath(self.key_file), exc.strerror)
            return
        if (st.st_ino, st.st_size, st.st_mtime_ns) == self._file_sig:
            return
        try:
            secrets, sig = read_key_file(self.key_file)
        except ConfigError as exc:
            log.warning("%s; keeping the keys loaded before", exc)
            return
        self._keys = [TicketKey(s) for s in secrets]
        self._file_sig = sig
        self.rotations += 1
        log.debug("ticket key file %r reloaded (%d keys)", os.fspath(self.key_file), len(secrets))


@dataclass
class SessionStats:
    """Counters of one ServerConfig or ClientConfig (reads are safe from any thread)."""

    #: Handshakes completed by resumption.
    resumed: int = 0
    #: Full handshakes completed.
    full: int = 0
    #: Server: tickets issued. Client: tickets received.
    tickets: int = 0
    #: Offered tickets that were not accepted, by reason ("expired", "invalid", ...); each led to a full handshake.
    fallbacks: collections.Counter[str] = field(default_factory=collections.Counter)


class _Counted:
    """Shared counters of a ServerTickets or TicketCache (``stats``), guarded by ``_lock``."""

    stats: SessionStats
    _lock: threading.Lock

    def count_handshake(self, resumed: bool) -> None:
        with self._lock:
            if resumed:
                self.stats.resumed += 1
            else:
                self.stats.full += 1

    def count_fallback(self, status: TicketStatus) -> None:
        with self._lock:
            self.stats.fallbacks[status.reason] += 1


class ServerTickets(_Counted):
    """Issues and checks the tickets of one ServerConfig."""

    def __init__(
        self,
        *,
        lifetime: float,
        rotation: float,
        key_file: str | os.PathLike[str] | None = None,
        single_use: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lifetime = lifetime
        self.single_use = single_use
        self.ring = TicketKeyRing(rotation=rotation, key_file=key_file, clock=clock)
        #: Where ticket salts come from. Per ticket key ring, not per connection: a connection's
        #: pinned test entropy must never repeat salts under a key other servers share.
        #: Replaceable for test vectors only.
        self.salt_source: Callable[[int], bytes] = os.urandom
        self.stats = SessionStats()
        self._lock = threading.Lock()
        self._seen: dict[bytes, int] = {}
        self._seen_order: list[tuple[int, bytes]] = []  # heap by expiry

    @property
    def clock(self) -> Callable[[], float]:
        """Wall clock in seconds (``time.time``); replaceable for simulations and tests."""
        return self.ring.clock

    @clock.setter
    def clock(self, value: Callable[[], float]) -> None:
        self.ring.clock = value

    def seal(self, contents: TicketContents) -> bytes | None:
        """Seal a ticket (stamped with issue and expiry time); None when it would exceed the size limit."""
        now_ms = int(self.clock() * 1000)
        stamped = TicketContents(
            contents.psk, contents.version, contents.suite, contents.server_name, contents.client_chain,
            issued_ms=now_ms, expires_ms=now_ms + int(self.lifetime * 1000),
        )
        plaintext = stamped.encode()
        if _HEAD_LEN + len(plaintext) + _TAG_LEN > MAX_TICKET_LEN:
            log.debug("no ticket issued: the client's chain makes it larger than %d bytes", MAX_TICKET_LEN)
            return None
        key = self.ring.current()[0]
        head = bytes([TICKET_FORMAT]) + key.key_id
        # The salt alone makes each ticket's AES key its own (the nonce is fixed): it must never repeat.
        salt = self.salt_source(SALT_LEN)
        if len(salt) != SALT_LEN:
            raise InternalError("the ticket salt source returned the wrong number of bytes")
        ticket = head + salt + key.seal(salt, plaintext, head)
        with self._lock:
            self.stats.tickets += 1
        return ticket

    def open(self, ticket: bytes) -> tuple[TicketContents | None, TicketStatus]:
        """Authenticate and decode a ticket. Never raises for a bad ticket; does not consume it."""
        if len(ticket) < _HEAD_LEN + _TAG_LEN or ticket[0] != TICKET_FORMAT:
            return None, TicketStatus.INVALID
        head, salt, sealed = ticket[: 1 + KEY_ID_LEN], ticket[1 + KEY_ID_LEN : _HEAD_LEN], ticket[_HEAD_LEN:]
        key_id = head[1:]
        plaintext = None
        for key in self.ring.current():
            if key.key_id == key_id:  # key ids are public; no secret is compared here
                plaintext = key.open(salt, sealed, head)
                break
        if plaintext is None:
            return None, TicketStatus.INVALID
        try:
            contents = TicketContents.decode(plaintext)
        except DecodeError:
            return None, TicketStatus.INVALID
        now_ms = int(self.clock() * 1000)
        if now_ms >= contents.expires_ms or now_ms < contents.issued_ms - 60_000:
            return contents, TicketStatus.EXPIRED
        return contents, TicketStatus.ACCEPTED

    def continue_from(self, previous: ServerTickets) -> None:
        """Carry on from ``previous`` (same key source): its single-use memory, counters and in-memory keys."""
        with previous._lock:
            self._seen, self._seen_order = previous._seen, previous._seen_order
            self.stats = previous.stats
            if self.ring.key_file is None and previous.ring.key_file is None:
                previous.ring.rotation = self.ring.rotation
                self.ring = previous.ring
            self._lock = previous._lock

    def consume(self, ticket: bytes, contents: TicketContents) -> bool:
        """Single-use bookkeeping: True the first time a ticket is used (always True when reuse is allowed)."""
        if not self.single_use:
            return True
        ticket_id = ticket[1:_HEAD_LEN]
        now_ms = int(self.clock() * 1000)
        with self._lock:
            # Forget expired ids, soonest expiry first (a heap): O(log n) per id, never a rebuild.
            order, seen = self._seen_order, self._seen
            while order and order[0][0] <= now_ms:
                seen.pop(heapq.heappop(order)[1], None)
            if ticket_id in seen:
                return False
            if len(seen) >= MAX_SEEN_TICKETS:
                return False  # cannot remember another one: refuse (full handshake) rather than allow a replay
            seen[ticket_id] = contents.expires_ms
            heapq.heappush(order, (contents.expires_ms, ticket_id))
            return True


@dataclass
class CachedSession:
    """A ticket as the client keeps it."""

    ticket: bytes
    psk: bytes = field(repr=False)
    version: int
    suite: int
    #: The server's chain as verified in the handshake that led to this ticket.
    server_chain: tuple[x509.Certificate, ...]
    #: Client clock (monotonic) after which the ticket is no longer offered.
    expires: float
    #: ``server_chain`` as the DER it was received in (empty: re-encode it when needed).
    server_der: tuple[bytes, ...] = ()


def client_expiry(received: float, lifetime: float) -> float:
    return received + lifetime - min(CLIENT_MARGIN_MAX, lifetime / 10)


class TicketCache(_Counted):
    """The client's tickets, keyed by (host, port, server name); each ticket is handed out once."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        #: Monotonic clock in seconds; replaceable for simulations and tests.
        self.clock = clock
        self.stats = SessionStats()
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[Hashable, list[CachedSession]] = collections.OrderedDict()
        self._bytes = 0

    def _store(self, key: Hashable, entry: CachedSession) -> None:
        """Insert ``entry`` newest-first under ``key`` and trim to every bound (caller holds the lock)."""
        sessions = self._entries.pop(key, [])
        sessions.insert(0, entry)
        self._bytes += len(entry.ticket)
        for dropped in sessions[MAX_TICKETS_PER_KEY:]:
            self._bytes -= len(dropped.ticket)
        del sessions[MAX_TICKETS_PER_KEY:]
        self._entries[key] = sessions
        while len(self._entries) > MAX_CACHE_KEYS or self._bytes > MAX_CACHE_BYTES:
            oldest_key, oldest = next(iter(self._entries.items()))
            self._bytes -= len(oldest.pop().ticket)  # the oldest ticket of the least recently used server
            if not oldest:
                del self._entries[oldest_key]

    def put(self, key: Hashable, ticket: bytes, psk: bytes, version: int, suite: int,
            server_chain: tuple[x509.Certificate, ...], lifetime: float, server_der: tuple[bytes, ...] = ()) -> None:
        entry = CachedSession(
            ticket, psk, version, suite, server_chain, client_expiry(self.clock(), lifetime), server_der
        )
        with self._lock:
            self.stats.tickets += 1
            self._store(key, entry)

    def restore(self, key: Hashable, session: CachedSession) -> None:
        """Put a session back (newest first), e.g. one taken for a connection that never got going."""
        with self._lock:
            self._store(key, session)

    def take(self, key: Hashable) -> CachedSession | None:
        """Remove and return the newest unexpired ticket for ``key`` (expired ones are dropped)."""
        now = self.clock()
        with self._lock:
            sessions = self._entries.get(key)
            if not sessions:
                return None
            found = None
            while sessions and found is None:
                entry = sessions.pop(0)
                self._bytes -= len(entry.ticket)
                if now < entry.expires:
                    found = entry
            if not sessions:
                del self._entries[key]
            return found

    def peek(self, key: Hashable) -> list[CachedSession]:
        """The tickets held for ``key``, newest first (without removing them)."""
        with self._lock:
            return list(self._entries.get(key, ()))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._entries.values())
