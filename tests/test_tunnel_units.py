"""Tunnel building blocks without sockets: addresses, PROXY v2 bytes, TOML config errors, option checks."""

from __future__ import annotations

import socket

import pytest

from securechan.errors import ConfigError
from securechan.tunnel import TunnelSpec, parse_address, proxyproto
from securechan.tunnel import config as tomlconfig
from securechan.tunnel.addresses import numeric_host


@pytest.mark.parametrize(("text", "host", "port", "path"), [
    ("127.0.0.1:6379", "127.0.0.1", 6379, None),
    ("[::1]:443", "::1", 443, None),
    (":8080", None, 8080, None),
    ("db.internal:5432", "db.internal", 5432, None),
    ("unix:/run/redis.sock", None, None, "/run/redis.sock"),
])
def test_parse_address(text: str, host: str | None, port: int | None, path: str | None) -> None:
    addr = parse_address(text)
    assert (addr.host, addr.port, addr.path) == (host, port, path)


@pytest.mark.parametrize(("text", "message"), [
    ("6379", "has no port"),
    ("::1:443", "put an IPv6 address in brackets, e.g. '[::1]:443'"),
    ("[::1:443", "needs brackets"),
    ("host:http", "port 'http' is not a number"),
    ("host:70000", "outside 0-65535"),
    ("unix:", "names no socket path"),
    ("", "must be 'HOST:PORT' or 'unix:/path'"),
])
def test_parse_address_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_address(text, "--target")


def test_a_resolved_ipv6_address_keeps_its_scope() -> None:
    # A link-local target ("[fe80::1%eth0]:80") resolves with its interface in the scope id;
    # the host handed to create_connection must carry it, or connect fails with EINVAL.
    family, _, _, _, sockaddr = socket.getaddrinfo("fe80::1%1", 80, type=socket.SOCK_STREAM)[0]
    assert sockaddr[3] == 1
    host = numeric_host(family, sockaddr)
    assert host == "fe80::1%1"
    assert socket.getaddrinfo(host, 80, type=socket.SOCK_STREAM)[0][4] == sockaddr
    assert numeric_host(socket.AF_INET6, ("::1", 80, 0, 0)) == "::1"
    assert numeric_host(socket.AF_INET, ("127.0.0.1", 80)) == "127.0.0.1"


def test_proxy_v2_ipv4_header_bytes() -> None:
    got = proxyproto.header(("192.0.2.1", 56324), ("198.51.100.7", 443))
    assert got == (b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 1, 198, 51, 100, 7])
                   + b"\xdc\x04\x01\xbb")


def test_proxy_v2_ipv6_header_and_tlv() -> None:
    tlv = proxyproto.ssl_tlv("securechan/1", "AES-256-GCM", None)
    got = proxyproto.header(("2001:db8::1", 1, 0, 0), ("::1", 2, 0, 0), tlv)
    assert got[12:16] == b"\x21\x21" + (36 + len(tlv)).to_bytes(2, "big")
    assert got[16:32] == bytes.fromhex("20010db8000000000000000000000001")
    assert got[32:48] == bytes(15) + b"\x01"
    assert got[48:52] == b"\x00\x01\x00\x02"
    # PP2_TYPE_SSL: client=SSL only (no certificate), verify=0, version and cipher sub-TLVs
    assert got[52:] == (b"\x20" + (5 + 15 + 14).to_bytes(2, "big") + b"\x01\x00\x00\x00\x00"
                        + b"\x21\x00\x0csecurechan/1" + b"\x23\x00\x0bAES-256-GCM")


def test_proxy_v2_local_for_unix_peers() -> None:
    assert proxyproto.header("", "/run/tunnel.sock") == b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    assert proxyproto.header(("10.0.0.1", 1), ("::1", 2, 0, 0))[12:14] == b"\x20\x00"  # mixed families


@pytest.mark.parametrize("source", [("localhost", 1), ("10.0.0.1", "http")])
def test_proxy_v2_local_unless_both_ends_are_numeric_ip(source: tuple[str, object]) -> None:
    """An endpoint that is not a numeric address and port gets a LOCAL header, never an exception."""
    assert proxyproto.header(source, ("10.0.0.2", 443)) == b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    assert proxyproto.header(("10.0.0.2", 443), source) == b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"


def test_proxy_v2_tlv_longer_than_its_length_field_is_refused() -> None:
    with pytest.raises(ValueError, match="PROXY v2 TLV value longer than 65535 bytes"):
        proxyproto.ssl_tlv("securechan/1", "X" * 65536, None)
    assert len(proxyproto.ssl_tlv("securechan/1", "X" * 60000, None)) == 3 + 5 + 3 + 12 + 3 + 60000
    # the common name is cut to 1024 bytes, so a long one cannot make the header overflow
    assert len(proxyproto.ssl_tlv("v", "s", "n" * 70000)) == 3 + 5 + 4 + 4 + 3 + 1024


GOOD = """
workers = 2
drain_timeout = 5

[defaults]
idle_timeout = 300
quiet = true

[[tunnel]]
name = "redis"
mode = "server"
listen = ":6380"
target = "unix:/run/redis.sock"
cert = "certs/server.crt"
key = "/etc/keys/server.key"
client_ca = "clients.crt"
allow_cn = ["app1", "app2"]
proxy_protocol = true
no_mux = true

[[tunnel]]
mode = "client"
listen = "127.0.0.1:5432"
target = "db.internal:15432"
pin = "sha256:""" + "ab" * 32 + """"
idle_timeout = 60
mux = true
"""


def test_config_parses_two_tunnels_with_defaults_and_relative_paths() -> None:
    cfg = tomlconfig.parse(GOOD, "t.toml", base="/srv/conf")
    assert cfg.workers == 2 and cfg.drain_timeout == 5
    redis, db = cfg.tunnels
    assert redis.name == "redis" and redis.mode == "server" and redis.proxy_protocol
    assert redis.cert == "/srv/conf/certs/server.crt" and redis.key == "/etc/keys/server.key"
    assert redis.client_ca == "/srv/conf/clients.crt" and redis.allow_cn == ("app1", "app2")
    assert redis.listen.host is None and redis.listen.port == 6380 and redis.target.path == "/run/redis.sock"
    assert redis.idle_timeout == 300 and redis.quiet
    assert db.name == "tunnel2" and db.pin == ("sha256:" + "ab" * 32,) and db.idle_timeout == 60
    assert db.mux and not redis.mux and redis.no_mux and not db.no_mux
    assert db.client_config().alpn_protocols == ("securechan-mux/1",)
    assert db.client_config(offer_mux=False).alpn_protocols == ()
    assert db.effective_server_name == "db.internal"


@pytest.mark.parametrize(("text", "message"), [
    ("[[tunnel]]\nmode = 'server'\nlisten = ':1'\n  target = ':2'\nidle_timout = 5\n",
     "t.toml line 5: [[tunnel]] #1: unknown key 'idle_timout'; did you mean 'idle_timeout'?"),
    ("[[tunnel]]\nmode = 'server'\nlisten = ':1'\ntarget = 2\n",
     "t.toml line 4: [[tunnel]] #1: 'target' must be a non-empty string, got 2"),
    ("[[tunnel]]\nname='a'\nmode = 'client'\nlisten = ':1'\ntarget = 'h:2'\ncafile='ca'\nidle_timeout = 'x'\n",
     "t.toml line 7: [[tunnel]] #1 ('a'): 'idle_timeout' must be a number of seconds"),
    ("[[tunnel]]\nmode = 'sever'\nlisten = ':1'\ntarget = ':2'\n",
     "t.toml line 2: [[tunnel]] #1: 'mode' must be \"server\""),
    ("[[tunnel]]\nmode = 'client'\nlisten = ':1'\ntarget = 'h:2'\ncafile = 'x'\n"
     "[[tunnel]]\nmode = 'client'\nlisten = '1.2.3.4'\ntarget = 'h:2'\ncafile = 'x'\n",
     "t.toml line 8: [[tunnel]] #2: 'listen' '1.2.3.4' has no port"),
    ("[[tunnel]]\nmode = 'client'\nlisten = ':1'\n",
     "t.toml line 1: [[tunnel]] #1: missing 'target'"),
    ("[[tunnel]]\nmode = 'client'\nlisten = ':1'\ntarget = 'h:2'\n",
     "t.toml line 1: [[tunnel]] #1: a client tunnel must verify the server: give --cafile"),
    ("[[tunnel]]\nmode = 'server'\nlisten = ':1'\ntarget = 'h:2'\n",
     "a server tunnel needs its certificate and key"),
    ("[defaults]\nlisten = ':1'\n[[tunnel]]\nmode='client'\n",
     "t.toml line 2: [defaults]: 'listen' cannot be a default"),
    ("tunnels = []\n", "t.toml line 1: unknown top-level key 'tunnels'; did you mean 'tunnel'?"),
    ("workers = 0\n[[tunnel]]\n", "t.toml line 1: 'workers' must be a whole number of at least 1"),
    ("workers = 1\n", "t.toml: the config defines no tunnel"),
    ("drain_timeout = 'soon'\n[[tunnel]]\n", "t.toml line 1: 'drain_timeout' must be a number of seconds, got 'soon'"),
    ("drain_timeout = -1\n[[tunnel]]\n", "t.toml line 1: 'drain_timeout' must be a number of seconds, got -1"),
    ("workers = 1\ndefaults = 5\n", "t.toml line 2: 'defaults' must be a table: [defaults]"),
    ("tunnel = 'redis'\n", "t.toml line 1: 'tunnel' must be an array of tables, written [[tunnel]]"),
    ("tunnel = [1, 2]\n", "t.toml line 1: 'tunnel' must be an array of tables, written [[tunnel]]"),
    ("[[tunnel]]\nmode='server'\nlisten=':1'\ntarget=':2'\ncert='c'\nkey='k'\nclient_ca='ca'\nallow_cn = 5\n",
     "t.toml line 8: [[tunnel]] #1: 'allow_cn' must be a string or a list of strings, got 5"),
    ("[[tunnel]]\nmode='server'\nlisten=':1'\ntarget=':2'\ncert='c'\nkey='k'\nclient_ca='ca'\nallow_cn = ['a', '']\n",
     "t.toml line 8: [[tunnel]] #1: 'allow_cn' must be a string or a list of strings, got ['a', '']"),
    ("[defaults]\nquiet = 'yes'\n[[tunnel]]\nmode='client'\nlisten=':1'\ntarget='h:2'\ncafile='c'\n",
     "t.toml line 2: [[tunnel]] #1: 'quiet' must be true or false, got 'yes'"),
    ("[[tunnel]]\nmode='client'\nlisten=':1'\ntarget='h:2'\ncafile='c'\nmax_connections = 2.5\n",
     "t.toml line 6: [[tunnel]] #1: 'max_connections' must be a whole number, got 2.5"),
    ("[[tunnel]]\nmode='client'\nlisten=':1'\ntarget='h:2'\ncafile='c'\nconnect_retries = true\n",
     "t.toml line 6: [[tunnel]] #1: 'connect_retries' must be a whole number, got True"),
    ("[[tunnel]]\nmode = 'server\n", "t.toml: not valid TOML: "),
    ("[[tunnel]]\nname='x'\nmode='client'\nlisten=':1'\ntarget='h:2'\ncafile='c'\n"
     "[[tunnel]]\nname='x'\nmode='client'\nlisten=':3'\ntarget='h:2'\ncafile='c'\n",
     "t.toml line 8: [[tunnel]] #2 ('x'): name 'x' is already used by [[tunnel]] #1"),
])
def test_config_errors_name_line_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        tomlconfig.parse(text, "t.toml")
    assert message in str(info.value)


def test_config_whole_number_settings() -> None:
    cfg = tomlconfig.parse("[[tunnel]]\nmode='client'\nlisten=':1'\ntarget='h:2'\ncafile='c'\n"
                           "max_connections = 10\nconnect_retries = 0\n", "t.toml")
    assert (cfg.tunnels[0].max_connections, cfg.tunnels[0].connect_retries) == (10, 0)
    assert type(cfg.tunnels[0].max_connections) is int


def test_config_file_too_large_or_not_utf8(tmp_path) -> None:
    big = tmp_path / "big.toml"
    big.write_bytes(b"# padding\n" * (1024 * 1024 // 10) + b"#" * 20)
    assert big.stat().st_size > 1024 * 1024
    with pytest.raises(ConfigError, match=r"config file '.*big.toml' is larger than 1 MiB; is it the right file\?"):
        tomlconfig.load(big)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("# caf\u00e9\n[[tunnel]]\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"config file '.*latin1.toml' is not UTF-8 text \(byte 5\)"):
        tomlconfig.load(latin1)


def test_config_toml_syntax_error_names_the_line(tmp_path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[[tunnel]]\nmode = 'server'\nlisten = \n")
    with pytest.raises(ConfigError, match=r"broken.toml: not valid TOML: .*line 3"):
        tomlconfig.load(path)
    with pytest.raises(ConfigError, match="No such file or directory"):
        tomlconfig.load(tmp_path / "missing.toml")


@pytest.mark.parametrize(("kw", "message"), [
    ({"mode": "server", "cert": "c"}, "cert and key (--cert/--key) go together"),
    ({"mode": "server", "cert": "c", "key": "k", "allow_cn": ("a",)}, "give --client-ca FILE"),
    ({"mode": "server", "cert": "c", "key": "k", "cafile": "ca"}, "cafile (--cafile) is for client tunnels"),
    ({"mode": "client", "pin": ("p",), "proxy_protocol": True}, "proxy_protocol (--proxy-protocol) is for server"),
    ({"mode": "server", "cert": "c", "key": "k", "mux": True}, "mux (--mux) is for client tunnels"),
    ({"mode": "client", "pin": ("p",), "mux": True, "no_mux": True},
     "mux and no_mux (--mux/--no-mux) contradict each other: give --mux to require multiplexing"),
    ({"mode": "client", "cafile": "ca", "target": "unix:/s"}, "is a Unix socket: give --server-name NAME"),
    ({"mode": "client", "cafile": "ca", "target": ":9000"}, "target :9000 names no host: give --server-name NAME"),
    ({"mode": "client", "cafile": "ca", "server_name": "bad name"}, "server_name 'bad name' is neither a DNS name"),
    ({"mode": "client", "cafile": "ca", "max_connections": 0}, "--max-connections) must be at least 1"),
    ({"mode": "client", "cafile": "ca", "idle_timeout": 0}, "idle_timeout (--idle-timeout) must be a positive"),
    ({"mode": "client", "cafile": "ca", "connect_retries": -1}, "must not be negative"),
])
def test_spec_checks_name_the_option(kw: dict[str, object], message: str) -> None:
    target = parse_address(str(kw.pop("target", "127.0.0.1:1")))
    spec = TunnelSpec(listen=parse_address("127.0.0.1:0"), target=target, **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        spec.check()
