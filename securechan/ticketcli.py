"""``securechan ticket-key``: create, rotate and inspect a shared session-ticket key file.

A key file is the ticket key ring of every server configured with
``ServerConfig(ticket_key_file=...)``: the first key seals new tickets, every key listed
opens them. ``rotate`` puts a fresh key first and keeps the previous one, so tickets
sealed before the rotation still resume until they expire. Files are written with mode
0600 and replaced atomically (write to a temporary file, then rename), so a server that
re-reads the file never sees half of it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

from .errors import ConfigError
from .tickets import MAX_FILE_KEYS, TicketKey, format_key_file, new_key_secret, read_key_file


def register(sub: Any) -> None:
    p = sub.add_parser("ticket-key", help="create, rotate or inspect a shared session-ticket key file")
    actions = p.add_subparsers(dest="ticket_action", required=True, metavar="ACTION")
    new = actions.add_parser("new", help="write a new key file holding one fresh key (mode 0600)")
    new.add_argument("--out", required=True, metavar="FILE", help="where to write the key file")
    new.add_argument("--force", action="store_true", help="replace FILE if it exists")
    new.set_defaults(func=_new)
    rot = actions.add_parser("rotate", help="put a fresh key first; keep the previous key(s) for opening")
    rot.add_argument("file", metavar="FILE")
    rot.add_argument(
        "--keep", type=int, default=1, metavar="N",
        help="previous keys to keep accepting (default 1: tickets survive one rotation)",
    )
    rot.set_defaults(func=_rotate)
    show = actions.add_parser("show", help="print the key ids (not the keys) so a fleet's files can be compared")
    show.add_argument("file", metavar="FILE")
    show.set_defaults(func=_show)


def write_key_file(path: str, secrets: list[bytes]) -> None:
    """Write ``secrets`` atomically with mode 0600 (the temporary file is created 0600 too)."""
    try:
        _write_key_file(path, secrets)
    except OSError as exc:  # a folder in the file's place, a folder this user cannot write, a full disk, ...
        raise ConfigError(f"cannot write ticket key file {path!r}: {exc.strerror or exc}") from None


def _write_key_file(path: str, secrets: list[bytes]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ticket-key-", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(format_key_file(secrets))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _new(args: argparse.Namespace) -> int:
    if os.path.exists(args.out) and not args.force:
        raise ConfigError(f"{args.out!r} already exists; use 'securechan ticket-key rotate {args.out}' or --force")
    write_key_file(args.out, [new_key_secret()])
    print(f"wrote ticket key file {args.out} (1 key, mode 0600); copy it to every server of the fleet")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    if not 0 <= args.keep < MAX_FILE_KEYS:
        raise ConfigError(f"--keep must be between 0 and {MAX_FILE_KEYS - 1}")
    secrets, _ = read_key_file(args.file)
    write_key_file(args.file, [new_key_secret(), *secrets[: args.keep]])
    print(
        f"rotated {args.file}: a new key seals from now on; {min(args.keep, len(secrets))} previous key(s) still open. "
        "Copy the file to every server (they re-read it when it changes)."
    )
    return 0


def _show(args: argparse.Namespace) -> int:
    secrets, _ = read_key_file(args.file)
    for i, secret in enumerate(secrets):
        role = "seals and opens" if i == 0 else "opens"
        sys.stdout.write(f"{TicketKey(secret).key_id.hex()}  {role}\n")
    return 0
