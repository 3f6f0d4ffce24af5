"""Application-protocol negotiation (``alpn``, docs/PROTOCOL.md §3.1, §3.2, §4): choice, wire format, refusals."""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any

import msgpack
import pytest
from rawpeer import read_alert, read_frame

import securechan
from securechan.frames import HEADER_LEN, FrameType, encode_frame, pack_map, unpack_map
from securechan.messages import ClientHello, ServerHello

HOST = "127.0.0.1"
Seen = list[tuple[str | None, str | None]]


# -- helpers --------------------------------------------------------------------------------


def recording_echo(seen: Seen) -> Any:
    """A server handler that records (extra info, SessionInfo) alpn of each connection, then echoes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append((writer.get_extra_info("alpn_protocol"), writer.get_extra_info("securechan").alpn_protocol))
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return handler


async def talk(port: int, config: securechan.ClientConfig) -> tuple[str | None, securechan.SessionInfo]:
    """Connect, echo a few bytes (the channel works), close; return the client's view of the session."""
    reader, writer = await securechan.open_connection(HOST, port, config=config, server_name="localhost")
    try:
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        return writer.get_extra_info("alpn_protocol"), writer.get_extra_info("securechan")
    finally:
        writer.close()
        await writer.wait_closed()


async def negotiate(serve: Any, pki_dir: Any, server: list[str], client: list[str]) -> tuple[str | None, Seen]:
    """One loopback connection with these lists; returns (client's extra info, server's [(extra info, session)])."""
    seen: Seen = []
    _, port = await serve(recording_echo(seen), pki_dir.server_config(alpn_protocols=server))
    got, session = await talk(port, pki_dir.client_config(alpn_protocols=client))
    assert session.alpn_protocol == got
    return got, seen


def hello_map(**changes: Any) -> dict[str, Any]:
    hello = ClientHello(versions=(1,), random=os.urandom(32), suites=(1,), key_wraps=(1,), x25519=os.urandom(32),
                        max_record=65536, server_name="localhost")
    m: dict[str, Any] = hello.encode()
    m.update(changes)
    return m


def server_hello_map(server_config: securechan.ServerConfig, **changes: Any) -> dict[str, Any]:
    hello = ServerHello(version=1, random=os.urandom(32), suite=1, key_wrap=1, x25519=os.urandom(32),
                        max_record=65536, certificates=server_config._chain_der)
    m: dict[str, Any] = hello.encode()
    m.update(changes)
    return m


def handshake(m: dict[str, Any]) -> bytes:
    frame: bytes = encode_frame(FrameType.HANDSHAKE, pack_map(m))
    return frame


def rewrite(frame: bytes, **changes: Any) -> bytes:
    """A plaintext HANDSHAKE frame with fields of its map replaced (None removes the field)."""
    m = msgpack.unpackb(frame[HEADER_LEN:], raw=False)
    for key, value in changes.items():
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value
    return handshake(m)


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


def alert_of(wire: bytes) -> int:
    assert wire[1] == FrameType.ALERT
    return int(unpack_map(wire[HEADER_LEN:], 64)["code"])


# -- negotiation over loopback ----------------------------------------------------------------


async def test_server_preference_order_wins(serve: Any, pki_dir: Any) -> None:
    got, seen = await negotiate(serve, pki_dir, server=["beta", "alpha"], client=["alpha", "beta", "gamma"])
    assert got == "beta"
    assert seen == [("beta", "beta")]


async def test_first_server_protocol_the_client_offered_is_chosen(serve: Any, pki_dir: Any) -> None:
    """Protocols of the server's list that the client did not offer are skipped, not chosen."""
    got, seen = await negotiate(serve, pki_dir, server=["spdy/3", "h2", "http/1.1"], client=["http/1.1", "h2"])
    assert got == "h2"
    assert seen == [("h2", "h2")]


async def test_no_common_protocol_gives_none_and_the_handshake_succeeds(serve: Any, pki_dir: Any) -> None:
    got, seen = await negotiate(serve, pki_dir, server=["h2"], client=["http/1.1"])
    assert got is None
    assert seen == [(None, None)]


async def test_names_are_compared_exactly(serve: Any, pki_dir: Any) -> None:
    got, seen = await negotiate(serve, pki_dir, server=["H2"], client=["h2"])
    assert got is None and seen == [(None, None)]


async def test_client_offers_but_server_has_none(serve: Any, pki_dir: Any) -> None:
    got, seen = await negotiate(serve, pki_dir, server=[], client=["h2"])
    assert got is None
    assert seen == [(None, None)]


async def test_server_has_protocols_but_client_offers_none(serve: Any, pki_dir: Any) -> None:
    got, seen = await negotiate(serve, pki_dir, server=["h2"], client=[])
    assert got is None
    assert seen == [(None, None)]


async def test_resumed_handshakes_negotiate_again(serve: Any, pki_dir: Any) -> None:
    """The choice is made in every handshake: a resumed one follows the server's current list (§4)."""
    seen: Seen = []
    server, port = await serve(recording_echo(seen), pki_dir.server_config(alpn_protocols=["a"]))
    client_cfg = pki_dir.client_config(alpn_protocols=["b", "a"])
    got, session = await talk(port, client_cfg)
    assert (got, session.resumed) == ("a", False)
    securechan.reload_server(server, pki_dir.server_config(alpn_protocols=["b", "a"]))
    got, session = await talk(port, client_cfg)
    assert (got, session.resumed) == ("b", True)
    securechan.reload_server(server, pki_dir.server_config())
    got, session = await talk(port, client_cfg)
    assert (got, session.resumed) == (None, True)
    assert seen == [("a", "a"), ("b", "b"), (None, None)]


async def test_resumed_handshake_keeps_the_same_choice(serve: Any, pki_dir: Any) -> None:
    seen: Seen = []
    _, port = await serve(recording_echo(seen), pki_dir.server_config(alpn_protocols=["p", "q"]))
    client_cfg = pki_dir.client_config(alpn_protocols=["q", "p"])
    results = [await talk(port, client_cfg) for _ in range(2)]
    assert [(got, s.resumed) for got, s in results] == [("p", False), ("p", True)]
    assert seen == [("p", "p"), ("p", "p")]


# -- a server that chooses what the client did not offer ----------------------------------------


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [(["a"], "b"), ([], "a"), (["h2"], "H2")],
    ids=["other-name", "nothing-offered", "case-differs"],
)
async def test_server_choosing_a_protocol_not_offered_is_illegal_parameter(
    pki_dir: Any, offered: list[str], chosen: str
) -> None:
    """A real server's ServerHello with its ``alpn`` rewritten in transit: the client refuses it at once."""
    alerts: list[int] = []
    server_cfg = pki_dir.server_config(alpn_protocols=["a", "b", "h2"])

    async def tampering_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server = securechan.Connection(server_cfg)
        server.receive_data(await read_frame(reader))
        writer.write(rewrite(server.data_to_send(), alpn=chosen))
        await writer.drain()
        alerts.append(await read_alert(reader))
        writer.close()

    listener = await asyncio.start_server(tampering_server, HOST, 0)
    async with listener:
        port = listener.sockets[0].getsockname()[1]
        with pytest.raises(securechan.IllegalParameterError) as info:
            await securechan.open_connection(HOST, port, config=pki_dir.client_config(alpn_protocols=offered),
                                             server_name="localhost")
        await asyncio.wait_for(_until(lambda: bool(alerts)), 10)
    assert type(info.value) is securechan.IllegalParameterError and not info.value.remote
    assert f"server chose application protocol {chosen!r}, which this client did not offer" in str(info.value)
    assert alerts == [securechan.AlertCode.ILLEGAL_PARAMETER]


def test_server_choice_of_an_offered_protocol_passes_the_check(pki_dir: Any) -> None:
    """Control for the test above: the same path with a name the client offered goes on to KeyExchange."""
    client = securechan.Connection(pki_dir.client_config(alpn_protocols=["a", "b"]), server_name="localhost")
    client.data_to_send()
    cfg = pki_dir.server_config()
    assert client.receive_data(handshake(server_hello_map(cfg, alpn="b"))) == []
    assert client.state is securechan.State.CLIENT_WAIT_FINISHED


def _full_handshake(client: securechan.Connection, server: securechan.Connection,
                    tamper_ch: Any = None, tamper_sh: Any = None) -> None:
    ch = client.data_to_send()
    server.receive_data(tamper_ch(ch) if tamper_ch else ch)
    sh = server.data_to_send()
    client.receive_data(tamper_sh(sh) if tamper_sh else sh)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())


@pytest.mark.parametrize(
    ("where", "change"),
    [("server_hello", "b"), ("server_hello", None), ("client_hello", None), ("client_hello", ["b"])],
    ids=["sh-changed", "sh-stripped", "ch-stripped", "ch-rewritten"],
)
def test_alpn_changed_in_transit_fails_the_finished(pki_dir: Any, where: str, change: Any) -> None:
    """Both hellos are in the transcript: a change the client accepts is still caught by the Finished MACs."""
    client = securechan.Connection(pki_dir.client_config(alpn_protocols=["a", "b"]), server_name="localhost")
    server = securechan.Connection(pki_dir.server_config(alpn_protocols=["a", "b"]))
    tamper = {f"tamper_{where[0]}h": functools.partial(rewrite, alpn=change)}
    with pytest.raises(securechan.HandshakeAuthError):
        _full_handshake(client, server, **tamper)
    assert not (client.handshake_complete and server.handshake_complete)


def test_untampered_sans_io_pair_agrees(pki_dir: Any) -> None:
    client = securechan.Connection(pki_dir.client_config(alpn_protocols=["a", "b"]), server_name="localhost")
    server = securechan.Connection(pki_dir.server_config(alpn_protocols=["b", "a"]))
    _full_handshake(client, server)
    assert client.session is not None and server.session is not None
    assert client.session.alpn_protocol == server.session.alpn_protocol == "b"


# -- decoding ------------------------------------------------------------------------------------

BAD_SERVER_ALPN = {
    "int": 1,
    "bool": True,
    "nil": None,
    "bin": b"h2",
    "list": ["h2"],
    "empty": "",
    "65-chars": "x" * 65,
    "space": "h 2",
    "tab": "h\t2",
    "del": "h2\x7f",
    "non-ascii": "h\u00e9",
}


@pytest.mark.parametrize("value", list(BAD_SERVER_ALPN.values()), ids=list(BAD_SERVER_ALPN))
def test_server_hello_with_a_bad_alpn_is_a_decode_error(pki_dir: Any, value: Any) -> None:
    client = securechan.Connection(pki_dir.client_config(alpn_protocols=["h2"]), server_name="localhost")
    client.data_to_send()
    m = server_hello_map(pki_dir.server_config(), alpn=value)
    with pytest.raises(securechan.DecodeError, match="server_hello: field 'alpn'"):
        client.receive_data(handshake(m))
    assert alert_of(client.data_to_send()) == securechan.AlertCode.DECODE_ERROR


@pytest.mark.parametrize("value", ["x" * 64, "!", "~" * 10, "a/b.c-d_1"], ids=["64-chars", "bang", "tilde", "mixed"])
def test_server_hello_alpn_edge_values_decode(value: str) -> None:
    m = {"type": "server_hello", "version": 1, "random": bytes(32), "suite": 1, "key_wrap": 1, "x25519": bytes(32),
         "max_record": 65536, "certificates": [b"c"], "alpn": value}
    assert ServerHello.decode(unpack_map(pack_map(m), 1 << 16)).alpn == value


async def test_server_hello_with_a_bad_alpn_over_loopback(pki_dir: Any) -> None:
    """Over a real socket the client raises DecodeError and tells the server why."""
    alerts: list[int] = []
    server_cfg = pki_dir.server_config()

    async def bad_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader)
        writer.write(handshake(server_hello_map(server_cfg, alpn="h 2")))
        await writer.drain()
        alerts.append(await read_alert(reader))
        writer.close()

    listener = await asyncio.start_server(bad_server, HOST, 0)
    async with listener:
        port = listener.sockets[0].getsockname()[1]
        with pytest.raises(securechan.DecodeError, match="'alpn' must be 1-64 printable ASCII"):
            await securechan.open_connection(HOST, port, config=pki_dir.client_config(alpn_protocols=["h2"]),
                                             server_name="localhost")
        await asyncio.wait_for(_until(lambda: bool(alerts)), 10)
    assert alerts == [securechan.AlertCode.DECODE_ERROR]


BAD_CLIENT_ALPN = {
    "empty-list": [],
    "17-entries": [f"p{i}" for i in range(17)],
    "int-entry": [1],
    "bin-entry": [b"h2"],
    "nil-entry": [None],
    "empty-name": [""],
    "65-chars": ["x" * 65],
    "space": ["h2", "http 1.1"],
    "non-ascii": ["h\u00e9"],
    "control-char": ["h2\n"],
    "a-string": "h2",
    "a-map": {"h2": 1},
    "bin": b"h2",
}


@pytest.mark.parametrize("value", list(BAD_CLIENT_ALPN.values()), ids=list(BAD_CLIENT_ALPN))
def test_client_hello_with_a_bad_alpn_is_a_decode_error(server_config: securechan.ServerConfig, value: Any) -> None:
    server = securechan.Connection(server_config)
    with pytest.raises(securechan.DecodeError, match="client_hello: field 'alpn'"):
        server.receive_data(handshake(hello_map(alpn=value)))
    assert alert_of(server.data_to_send()) == securechan.AlertCode.DECODE_ERROR


def test_client_hello_alpn_at_its_limits_is_accepted(pki_dir: Any) -> None:
    """16 names of 64 characters decode, and the server picks from them."""
    names = [f"{i:02d}" + "~" * 62 for i in range(16)]
    server = securechan.Connection(pki_dir.server_config(alpn_protocols=[names[15]]))
    server.receive_data(handshake(hello_map(alpn=names)))
    sh = unpack_map(server.data_to_send()[HEADER_LEN:], 1 << 16)
    assert sh["type"] == "server_hello" and sh["alpn"] == names[15]


async def test_client_hello_with_a_bad_alpn_over_loopback(serve: Any, server_config: securechan.ServerConfig) -> None:
    _, port = await serve(recording_echo([]), server_config)
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(handshake(hello_map(alpn=["ok", "not ok"])))
    assert await read_alert(reader) == securechan.AlertCode.DECODE_ERROR
    assert await reader.read() == b""  # the server hung up instead of answering with a ServerHello
    writer.close()


# -- configuration -------------------------------------------------------------------------------

BAD_CONFIGS = {
    "a-string": ("h2", "alpn_protocols must be a list of protocol names, not one string"),
    "duplicates": (["h2", "http/1.1", "h2"], "at most 16 distinct names"),
    "17-names": ([f"p{i}" for i in range(17)], "at most 16 distinct names"),
    "space": (["h2", "http 1.1"], "'http 1.1' is not a protocol name"),
    "empty-name": ([""], "'' is not a protocol name"),
    "65-chars": (["x" * 65], "is not a protocol name"),
    "non-ascii": (["h\u00e9"], "'h\u00e9' is not a protocol name"),
    "bytes-entry": ([b"h2"], "b'h2' is not a protocol name"),
    "int-entry": ([2], "2 is not a protocol name"),
}


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize(("value", "message"), list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_bad_alpn_protocols_config_is_refused(pki_dir: Any, side: str, value: Any, message: str) -> None:
    make = pki_dir.client_config if side == "client" else pki_dir.server_config
    with pytest.raises(securechan.ConfigError) as info:
        make(alpn_protocols=value)
    assert message in str(info.value)


@pytest.mark.parametrize("side", ["client", "server"])
def test_alpn_protocols_config_at_its_limits(pki_dir: Any, side: str) -> None:
    names = [f"{i:02d}" + "!" * 62 for i in range(16)]
    make = pki_dir.client_config if side == "client" else pki_dir.server_config
    assert make(alpn_protocols=names).alpn_protocols == tuple(names)
    assert make(alpn_protocols=iter(["h2"])).alpn_protocols == ("h2",)  # any iterable, kept as a tuple
    assert make().alpn_protocols == ()


# -- wire format ---------------------------------------------------------------------------------


def test_client_hello_encoding_vector() -> None:
    """alpn goes after tickets and before ticket and binder (§3.1, §4): byte-exact msgpack."""
    hello = ClientHello(versions=(1,), random=bytes(32), suites=(1,), key_wraps=(1,), x25519=bytes(32),
                        max_record=65536, server_name="a", accept_tickets=True, alpn=("h2", "x/1"),
                        ticket=b"\x01", binder=bytes(32))
    expected = bytes.fromhex(
        "8c"  # map of 12 entries
        "a474797065" "ac636c69656e745f68656c6c6f"  # "type": "client_hello"
        "a876657273696f6e73" "9101"  # "versions": [1]
        "a672616e646f6d" "c420" + "00" * 32 +  # "random": bin 32
        "a6737569746573" "9101"  # "suites": [1]
        "a96b65795f7772617073" "9101"  # "key_wraps": [1]
        "a6783235353139" "c420" + "00" * 32 +  # "x25519": bin 32
        "aa6d61785f7265636f7264" "ce00010000"  # "max_record": 65536
        "ab7365727665725f6e616d65" "a161"  # "server_name": "a"
        "a77469636b657473" "c3"  # "tickets": true
        "a4616c706e" "92" "a26832" "a3782f31"  # "alpn": ["h2", "x/1"]
        "a67469636b6574" "c40101"  # "ticket": bin 1
        "a662696e646572" "c420" + "00" * 32  # "binder": bin 32, last
    )
    assert pack_map(hello.encode()) == expected
    assert ClientHello.decode(unpack_map(expected, 1 << 16)) == hello


def test_client_hello_without_alpn_has_no_alpn_key() -> None:
    hello = ClientHello(versions=(1,), random=bytes(32), suites=(1,), key_wraps=(1,), x25519=bytes(32),
                        max_record=65536)
    assert "alpn" not in hello.encode()
    assert b"alpn" not in pack_map(hello.encode())


def _first_flight_keys(client: securechan.Connection) -> list[str]:
    wire = client.data_to_send()
    return list(msgpack.unpackb(wire[HEADER_LEN:], raw=False))


def test_a_resuming_client_sends_alpn_between_tickets_and_ticket(pki_dir: Any) -> None:
    """The real client's first flight: alpn after tickets, before ticket; binder last."""
    client_cfg = pki_dir.client_config(alpn_protocols=["h2"])
    server_cfg = pki_dir.server_config(alpn_protocols=["h2"])
    client = securechan.Connection(client_cfg, server_name="localhost", resume_key=("h", 1, "localhost"))
    assert _first_flight_keys(client)[-3:] == ["server_name", "tickets", "alpn"]
    client = securechan.Connection(client_cfg, server_name="localhost", resume_key=("h", 1, "localhost"))
    server = securechan.Connection(server_cfg)
    _full_handshake(client, server)
    assert client_cfg.session_stats.tickets == 1
    resuming = securechan.Connection(client_cfg, server_name="localhost", resume_key=("h", 1, "localhost"))
    assert _first_flight_keys(resuming)[-5:] == ["server_name", "tickets", "alpn", "ticket", "binder"]


def test_server_hello_carries_alpn_only_when_chosen(pki_dir: Any) -> None:
    for server_list, expected in ((["h2"], "h2"), (["other"], None)):
        client = securechan.Connection(pki_dir.client_config(alpn_protocols=["h2"]), server_name="localhost")
        server = securechan.Connection(pki_dir.server_config(alpn_protocols=server_list))
        server.receive_data(client.data_to_send())
        sh = msgpack.unpackb(server.data_to_send()[HEADER_LEN:], raw=False)
        assert sh.get("alpn") == expected
        assert ("alpn" in sh) == (expected is not None)
