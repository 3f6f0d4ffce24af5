"""atheris harness for the frame head parser, the strict msgpack map decoder and the message decoders.

Run (atheris must be installed: pip install atheris)::

    .venv/bin/python tests/fuzz/fuzz_decoders.py -atheris_runs=1000000 [corpus_dir]

Only securechan.SecureChannelError may escape a target; atheris reports anything else,
with the input that caused it.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["securechan"]):
    import securechan  # noqa: F401

import _targets


def main() -> None:
    atheris.Setup(sys.argv, _targets.decoders)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
