"""atheris harness for the sans-IO Connection: random bytes to a client or a server, and
patches of a recorded honest client flight (handshake, data, key update, close_notify).

Run (atheris must be installed: pip install atheris)::

    .venv/bin/python tests/fuzz/fuzz_connection.py -atheris_runs=200000 [corpus_dir]

Only securechan.SecureChannelError may escape; a hang shows up as an atheris timeout
(-timeout=N), unbounded memory as -rss_limit_mb.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import _targets

    import securechan  # noqa: F401

WORLD = _targets.World()


def one(data: bytes) -> None:
    _targets.connection(WORLD, data)


def main() -> None:
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
