"""The AEAD suites and key-wrap methods of protocol version 1, by wire code."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

#: Protocol versions this implementation speaks, newest first.
SUPPORTED_VERSIONS: tuple[int, ...] = (1,)


class Suite(enum.IntEnum):
    AES_256_GCM = 1
    AES_128_GCM = 2
    CHACHA20_POLY1305 = 3

    @property
    def label(self) -> str:
        return _SPECS[self].name

    @property
    def key_len(self) -> int:
        return _SPECS[self].key_len

    def aead(self, key: bytes) -> AESGCM | ChaCha20Poly1305:
        return _SPECS[self].cls(key)

    @classmethod
    def parse(cls, value: Suite | str | int) -> Suite:
        """Accept a Suite, its wire code, its enum name or its label ("AES-256-GCM")."""
        if isinstance(value, Suite):
            return value
        if isinstance(value, int):
            return cls(value)
        norm = value.strip().upper().replace("-", "_")
        for suite in cls:
            if norm in (suite.name, suite.label.upper().replace("-", "_")):
                return suite
        raise ValueError(f"unknown suite {value!r}; choose from {', '.join(s.label for s in cls)}")


@dataclass(frozen=True)
class _SuiteSpec:
    name: str
    key_len: int
    cls: type[AESGCM] | type[ChaCha20Poly1305]


_SPECS = {
    Suite.AES_256_GCM: _SuiteSpec("AES-256-GCM", 32, AESGCM),
    Suite.AES_128_GCM: _SuiteSpec("AES-128-GCM", 16, AESGCM),
    Suite.CHACHA20_POLY1305: _SuiteSpec("CHACHA20-POLY1305", 32, ChaCha20Poly1305),
}

DEFAULT_SUITES: tuple[Suite, ...] = (Suite.AES_256_GCM, Suite.AES_128_GCM, Suite.CHACHA20_POLY1305)


class KeyWrap(enum.IntEnum):
    RSA_OAEP_SHA256 = 1


NONCE_LEN = 12
