"""``securechan server``, ``securechan client`` and ``securechan run``: the tunnel commands."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..errors import ConfigError
from .addresses import parse_address
from .runner import DEFAULT_DRAIN_TIMEOUT, EXIT_CODES_HELP, EXIT_CONFIG, run
from .spec import DEFAULT_CONNECT_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, TunnelSpec

_SERVER_EXAMPLE = """\
example: put securechan in front of a local redis
  securechan server --listen 0.0.0.0:6380 --target 127.0.0.1:6379 --cert server.crt --key server.key

"""
_CLIENT_EXAMPLE = """\
example: a local plain port that reaches that redis over securechan
  securechan client --listen 127.0.0.1:6379 --target db.example.com:6380 --cafile ca.crt

"""


def register(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    server = sub.add_parser(
        "server", help="accept securechan connections and relay each to a plain TCP/Unix target",
        description="Accept securechan connections on --listen and relay each one, as plain TCP, to --target.",
        epilog=_SERVER_EXAMPLE + EXIT_CODES_HELP, formatter_class=fmt,
    )
    _common(server)
    auth = server.add_argument_group("client authentication")
    auth.add_argument("--client-ca", metavar="FILE", help="require client certificates issued by this CA (PEM)")
    auth.add_argument("--allow-cn", action="append", default=[], metavar="CN", help="admit this CN (repeatable)")
    auth.add_argument("--allow-dns", action="append", default=[], metavar="NAME", help="admit this DNS SAN")
    auth.add_argument("--allow-uri", action="append", default=[], metavar="URI", help="admit this URI SAN (SPIFFE)")
    auth.add_argument("--allow-pin", action="append", default=[], metavar="SHA256", help="admit this SPKI pin")
    server.add_argument("--proxy-protocol", action="store_true",
                        help="send a PROXY protocol v2 header to the target with the real client address")
    server.add_argument("--no-mux", action="store_true",
                        help="refuse multiplexed client tunnels (by default they are accepted: many connections "
                             "over one securechan connection); they fall back to one connection each, or fail "
                             "with --mux")
    server.set_defaults(func=_run_server)

    client = sub.add_parser(
        "client", help="accept plain TCP/Unix connections and relay each over securechan",
        description="Accept plain connections on --listen and relay each one over securechan to --target.",
        epilog=_CLIENT_EXAMPLE + EXIT_CODES_HELP, formatter_class=fmt,
    )
    _common(client)
    verify = client.add_argument_group("server verification (one of --cafile / --pin is required)")
    verify.add_argument("--cafile", metavar="FILE", help="CA that issued the server certificate (PEM)")
    verify.add_argument("--pin", action="append", default=[], metavar="SHA256",
                        help="accept the server key with this SPKI pin, sha256:<hex> (repeatable)")
    verify.add_argument("--server-name", metavar="NAME",
                        help="name the server certificate must carry (default: the --target host)")
    mux_group = client.add_argument_group(
        "multiplexing", "By default every connection is a stream of one securechan connection to the server tunnel "
        "(no TCP connect, handshake or close per connection), or, if the server tunnel refuses that (--no-mux "
        "there), a securechan connection of its own.")
    modes = mux_group.add_mutually_exclusive_group()
    modes.add_argument("--mux", action="store_true",
                       help="multiplex or fail: a server tunnel that refuses fails every connection")
    modes.add_argument("--no-mux", action="store_true",
                       help="one securechan connection per connection, never multiplexed (as stunnel does)")
    client.set_defaults(func=_run_client)

    runner = sub.add_parser(
        "run", help="run the tunnels of a TOML config file in one process",
        description="Run every [[tunnel]] of a TOML config file (see the README, 'Wrap an existing service').",
        epilog=EXIT_CODES_HELP, formatter_class=fmt,
    )
    runner.add_argument("--config", required=True, metavar="FILE.toml", help="the config file")
    runner.add_argument("--check", action="store_true", help="check the config and its files, then exit")
    runner.add_argument("--workers", type=int, metavar="N", help="override the file's workers setting")
    runner.set_defaults(func=_run_config)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="where to accept connections "
                   "(HOST:PORT, [IPv6]:PORT, :PORT for all interfaces, or unix:/path)")
    p.add_argument("--target", required=True, metavar="HOST:PORT", help="where to relay them (or unix:/path)")
    p.add_argument("--name", default="", help="tunnel name in log lines")
    ident = p.add_argument_group("identity")
    ident.add_argument("--cert", metavar="FILE", help="certificate chain, PEM, leaf first")
    ident.add_argument("--key", metavar="FILE", help="private key, PEM")
    ident.add_argument("--key-pass-env", metavar="VAR", help="read the key passphrase from this environment variable")
    ident.add_argument("--key-pass-file", metavar="FILE", help="read the key passphrase from this file")
    lim = p.add_argument_group("limits and timeouts (seconds)")
    lim.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                     help=f"at once, handshakes included; more are reset (default {DEFAULT_MAX_CONNECTIONS})")
    lim.add_argument("--handshake-timeout", type=float, default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="S",
                     help=f"default {DEFAULT_HANDSHAKE_TIMEOUT:g}")
    lim.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT, metavar="S",
                     help=f"per attempt to reach the target (default {DEFAULT_CONNECT_TIMEOUT:g})")
    lim.add_argument("--connect-retries", type=int, default=0, metavar="N",
                     help="extra attempts to reach the target (default 0: no retries)")
    lim.add_argument("--retry-delay", type=float, default=0.5, metavar="S", help="between attempts (default 0.5)")
    lim.add_argument("--idle-timeout", type=float, metavar="S", help="cut (reset) a connection idle this long")
    lim.add_argument("--max-lifetime", type=float, metavar="S", help="cut a connection open this long")
    svc = p.add_argument_group("service")
    svc.add_argument("--workers", type=int, default=1, metavar="N",
                     help="processes sharing the listening port through SO_REUSEPORT (default 1)")
    svc.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT, metavar="S",
                     help=f"on SIGTERM/SIGINT, time open connections get (default {DEFAULT_DRAIN_TIMEOUT:g})")
    svc.add_argument("-q", "--quiet", action="store_true",
                     help="log connections that moved no bytes or never completed a handshake (health checks) "
                          "at debug level only")


def _spec(args: argparse.Namespace, mode: str) -> TunnelSpec:
    server = mode == "server"
    return TunnelSpec(
        mode="server" if server else "client",
        listen=parse_address(args.listen, "--listen"),
        target=parse_address(args.target, "--target"),
        name=args.name,
        cert=args.cert, key=args.key, key_pass_env=args.key_pass_env, key_pass_file=args.key_pass_file,
        client_ca=args.client_ca if server else None,
        allow_cn=tuple(args.allow_cn) if server else (),
        allow_dns=tuple(args.allow_dns) if server else (),
        allow_uri=tuple(args.allow_uri) if server else (),
        allow_pin=tuple(args.allow_pin) if server else (),
        proxy_protocol=args.proxy_protocol if server else False,
        cafile=None if server else args.cafile,
        pin=() if server else tuple(args.pin),
        server_name=None if server else args.server_name,
        mux=False if server else args.mux,
        no_mux=args.no_mux,
        max_connections=args.max_connections, handshake_timeout=args.handshake_timeout,
        connect_timeout=args.connect_timeout, connect_retries=args.connect_retries, retry_delay=args.retry_delay,
        idle_timeout=args.idle_timeout, max_lifetime=args.max_lifetime, quiet=args.quiet,
    )


def _log_setup() -> None:
    # Connection and lifecycle lines are the point of a tunnel: show them unless -v asked for more.
    logger = logging.getLogger("securechan.tunnel")
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)


def _fail(exc: ConfigError) -> int:
    print(f"securechan: error: {exc}", file=sys.stderr)
    return EXIT_CONFIG


def _run_server(args: argparse.Namespace) -> int:
    return _run_cli(args, "server")


def _run_client(args: argparse.Namespace) -> int:
    return _run_cli(args, "client")


def _run_cli(args: argparse.Namespace, mode: str) -> int:
    _log_setup()
    try:
        spec = _spec(args, mode)
        return run([spec], workers=args.workers, drain_timeout=args.drain_timeout)
    except ConfigError as exc:
        return _fail(exc)


def _run_config(args: argparse.Namespace) -> int:
    from .config import load

    _log_setup()
    try:
        cfg = load(args.config)
        workers = args.workers if args.workers is not None else cfg.workers
        if args.check:
            from .service import Tunnel

            for spec in cfg.tunnels:
                try:
                    Tunnel(spec)
                except ConfigError as exc:
                    raise ConfigError(f"tunnel {spec.title!r}: {exc}") from None
            print(f"{args.config}: OK, {len(cfg.tunnels)} tunnel(s): " + ", ".join(
                f"{s.name} ({s.mode} {s.listen} -> {s.target})" for s in cfg.tunnels))
            return 0
        return run(cfg.tunnels, workers=workers, drain_timeout=cfg.drain_timeout)
    except ConfigError as exc:
        return _fail(exc)
