"""The ``securechan`` command. Each feature module registers its own subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def run_async(coro_factory: object) -> int:
    """Run a coroutine on uvloop when it is installed (the CLI only; the library never changes the loop)."""
    import asyncio

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux/macOS dependency
        return int(asyncio.run(coro_factory()) or 0)  # type: ignore[operator]
    return int(uvloop.run(coro_factory()) or 0)  # type: ignore[operator]


#: Modules that provide subcommands through ``register(subparsers)``.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "securechan.demo",
    "securechan.pkicli",
    "securechan.tunnel.cli",
    "securechan.ticketcli",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="securechan", description="securechan: a secure transport channel")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .errors import SecureChannelError

    try:
        return int(args.func(args) or 0)
    except SecureChannelError as exc:
        print(f"securechan: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
