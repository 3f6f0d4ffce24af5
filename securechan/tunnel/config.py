"""``securechan run --config FILE.toml``: several tunnels in one file, read with ``tomllib``.

Layout::

    workers = 1             # optional, processes sharing each listening port
    drain_timeout = 30      # optional, seconds open connections get on SIGTERM/SIGINT

    [defaults]              # optional: any tunnel setting, applied to every tunnel
    idle_timeout = 600

    [[tunnel]]
    name = "redis"
    mode = "server"         # securechan in, plain out ("client": plain in, securechan out)
    listen = "0.0.0.0:6380"
    target = "127.0.0.1:6379"
    cert = "server.crt"     # relative paths are relative to this file's folder
    key = "server.key"

Every error names the file, the line when it can, and the key.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .addresses import parse_address
from .runner import DEFAULT_DRAIN_TIMEOUT
from .spec import TunnelSpec, resolve

_STR = ("name", "cert", "key", "key_pass_env", "key_pass_file", "client_ca", "cafile", "server_name")
_PATHS = ("cert", "key", "key_pass_file", "client_ca", "cafile")
_LIST = ("allow_cn", "allow_dns", "allow_uri", "allow_pin", "pin")
_BOOL = ("proxy_protocol", "quiet", "mux", "no_mux")
_INT = ("max_connections", "connect_retries")
_SECONDS = ("handshake_timeout", "connect_timeout", "retry_delay", "idle_timeout", "max_lifetime")
TUNNEL_KEYS = ("mode", "listen", "target", *_STR, *_LIST, *_BOOL, *_INT, *_SECONDS)
TOP_KEYS = ("workers", "drain_timeout", "defaults", "tunnel")


@dataclass(frozen=True)
class RunConfig:
    tunnels: tuple[TunnelSpec, ...]
    workers: int = 1
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT


class _Lines:
    """Where each key of each table is written, so errors can name a line."""

    _HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\"-]+)\s*\]\]?")
    _KEY = re.compile(r"^\s*\"?([A-Za-z0-9_-]+)\"?\s*=")

    def __init__(self, text: str) -> None:
        self.keys: dict[tuple[str, int, str], int] = {}
        self.tables: dict[tuple[str, int], int] = {}
        section, index, count = "", 0, 0
        for number, line in enumerate(text.splitlines(), 1):
            header = self._HEADER.match(line)
            if header:
                section = header.group(1).strip('"')
                if line.lstrip().startswith("[[") and section == "tunnel":
                    count += 1
                    index = count
                else:
                    index = 0
                self.tables.setdefault((section, index), number)
                continue
            key = self._KEY.match(line)
            if key:
                self.keys.setdefault((section, index, key.group(1)), number)

    def of(self, section: str, index: int, key: str | None = None) -> int | None:
        if key is not None and (section, index, key) in self.keys:
            return self.keys[(section, index, key)]
        return self.tables.get((section, index))


def load(path: str | os.PathLike[str]) -> RunConfig:
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(1024 * 1024 + 1)
    except OSError as exc:
        raise ConfigError(f"config file {where!r}: {exc.strerror or exc}") from None
    if len(raw) > 1024 * 1024:
        raise ConfigError(f"config file {where!r} is larger than 1 MiB; is it the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {where!r} is not UTF-8 text (byte {exc.start})") from None
    return parse(text, where, base=os.path.dirname(os.path.abspath(where)))


def parse(text: str, where: str = "<config>", base: str | None = None) -> RunConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    lines = _Lines(text)

    def fail(message: str, section: str = "", index: int = 0, key: str | None = None) -> ConfigError:
        line = lines.of(section, index, key)
        at = f"{where} line {line}" if line is not None else where
        return ConfigError(f"{at}: {message}")

    for key in doc:
        if key not in TOP_KEYS:
            raise fail(f"unknown top-level key {key!r}{_suggest(key, TOP_KEYS)}; tunnels go in [[tunnel]] tables",
                       key=key)
    workers = doc.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise fail(f"'workers' must be a whole number of at least 1, got {workers!r}", key="workers")
    drain = doc.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT)
    if not isinstance(drain, (int, float)) or isinstance(drain, bool) or drain < 0:
        raise fail(f"'drain_timeout' must be a number of seconds, got {drain!r}", key="drain_timeout")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        raise fail("'defaults' must be a table: [defaults]", key="defaults")
    tables = doc.get("tunnel", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise fail("'tunnel' must be an array of tables, written [[tunnel]]", key="tunnel")
    if not tables:
        raise fail("the config defines no tunnel; add a [[tunnel]] table with mode, listen and target")
    for key in defaults:
        if key not in TUNNEL_KEYS or key in ("name", "listen"):
            raise fail(f"[defaults]: {key!r} cannot be a default{_suggest(key, TUNNEL_KEYS)}", "defaults", 0, key)
    specs: list[TunnelSpec] = []
    names: dict[str, int] = {}
    for number, table in enumerate(tables, 1):
        merged = {**defaults, **table}
        label = f"[[tunnel]] #{number}" + (f" ({table['name']!r})" if isinstance(table.get("name"), str) else "")

        def bad(message: str, key: str | None = None, _n: int = number, _label: str = label) -> ConfigError:
            section, idx = ("tunnel", _n) if key is None or key in tables[_n - 1] else ("defaults", 0)
            return fail(f"{_label}: {message}", section, idx, key)

        for key in table:
            if key not in TUNNEL_KEYS:
                raise bad(f"unknown key {key!r}{_suggest(key, TUNNEL_KEYS)}", key)
        for required in ("mode", "listen", "target"):
            if required not in merged:
                raise bad(f"missing {required!r} (every tunnel needs mode, listen and target)")
        kw: dict[str, Any] = {}
        for key, value in merged.items():
            kw[key] = _typed(key, value, lambda m, k=key: bad(m, k))
            if key in _PATHS:
                kw[key] = resolve(kw[key], base)
        if kw["mode"] not in ("server", "client"):
            raise bad(f"'mode' must be \"server\" (securechan in, plain out) or \"client\" (plain in, securechan "
                      f"out), got {kw['mode']!r}", "mode")
        for key in ("listen", "target"):
            try:
                kw[key] = parse_address(kw[key], f"'{key}'")
            except ConfigError as exc:
                raise bad(str(exc), key) from None
        name = kw.get("name") or f"tunnel{number}"
        if name in names:
            raise bad(f"name {name!r} is already used by [[tunnel]] #{names[name]}", "name")
        names[name] = number
        kw["name"] = name
        spec = TunnelSpec(**kw)
        try:
            spec.check()
        except ConfigError as exc:
            raise bad(str(exc)) from None
        specs.append(spec)
    return RunConfig(tuple(specs), workers, float(drain))


def _typed(key: str, value: Any, bad: Any) -> Any:
    if key in ("mode", "listen", "target", *_STR):
        if not isinstance(value, str) or not value:
            raise bad(f"{key!r} must be a non-empty string, got {value!r}")
        return value
    if key in _LIST:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) and v for v in items):
            raise bad(f"{key!r} must be a string or a list of strings, got {value!r}")
        return tuple(items)
    if key in _BOOL:
        if not isinstance(value, bool):
            raise bad(f"{key!r} must be true or false, got {value!r}")
        return value
    if key in _INT:
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(f"{key!r} must be a whole number, got {value!r}")
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise bad(f"{key!r} must be a number of seconds, got {value!r}")
    return float(value)


def _suggest(key: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
