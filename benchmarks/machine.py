"""The machine a run was made on: CPU model, cores, Python, OpenSSL, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import ssl
import sys
from typing import Any

_LIBS = ("securechan", "cryptography", "msgpack", "uvloop", "rich", "matplotlib")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"aes", "vaes", "avx2", "avx512f", "pclmulqdq", "vpclmulqdq", "sha_ni"})
    except OSError:
        pass
    return []


def describe() -> dict[str, Any]:
    from cryptography.hazmat.backends.openssl.backend import backend

    versions: dict[str, str | None] = {}
    for lib in _LIBS:
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "ssl_openssl": ssl.OPENSSL_VERSION,
        "cryptography_openssl": backend.openssl_version_text(),
        "libraries": versions,
    }
