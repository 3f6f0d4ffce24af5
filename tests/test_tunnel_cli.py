"""The tunnel CLI as a real subprocess: config-file runs, SIGTERM draining, exit codes, workers, SIGHUP."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest
from tunnelkit import free_port, plain_target

import securechan

pytestmark = pytest.mark.timeout(60)


class Cli:
    """``python -m securechan ...`` with its stderr collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self._reader = asyncio.ensure_future(self._collect())

    @classmethod
    async def start(cls, *args: str) -> Cli:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "securechan", *args, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        return cls(proc)

    async def _collect(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._new.set()
        self._new.set()

    async def wait_for(self, text: str, limit: float = 20) -> str:
        async def scan() -> str:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if self._reader.done():
                    raise AssertionError(f"exited without logging {text!r}:\n" + self.output)
                self._new.clear()
                await self._new.wait()

        return await asyncio.wait_for(scan(), limit)

    async def wait_for_count(self, text: str, count: int, limit: float = 20) -> None:
        """Until ``count`` lines contain ``text`` (several workers log the same line)."""
        async def scan() -> None:
            while sum(text in line for line in self.lines) < count:
                if self._reader.done():
                    raise AssertionError(f"exited without logging {text!r} {count} times:\n" + self.output)
                self._new.clear()
                await self._new.wait()

        await asyncio.wait_for(scan(), limit)

    async def exit_code(self, limit: float = 30) -> int:
        code = await asyncio.wait_for(self.proc.wait(), limit)
        await self._reader
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        await self._reader


def two_tunnels(pki_dir, tmp_path: Path, target_port: int, *, drain: float, extra: str = "") -> tuple[Path, int]:
    """A config with a server tunnel in front of the target and a client tunnel in front of that."""
    secure_port, plain_port = free_port(), free_port()
    cfg = tmp_path / "tunnels.toml"
    cfg.write_text(f"""
drain_timeout = {drain}

[defaults]
handshake_timeout = 5
{extra}

[[tunnel]]
name = "backend"
mode = "server"
listen = "127.0.0.1:{secure_port}"
target = "127.0.0.1:{target_port}"
cert = "{pki_dir.server_cert}"
key = "{pki_dir.server_key}"

[[tunnel]]
name = "frontend"
mode = "client"
listen = "127.0.0.1:{plain_port}"
target = "127.0.0.1:{secure_port}"
cafile = "{pki_dir.ca_file}"
server_name = "localhost"
""")
    return cfg, plain_port


async def test_config_run_two_tunnels_and_sigterm_drains_relays_in_flight(pki_dir, tmp_path) -> None:
    chunks = 30

    async def slow_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(chunks):
            writer.write(b"chunk %03d\n" % i)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()

    async with plain_target(slow_stream) as target:
        cfg, port = two_tunnels(pki_dir, tmp_path, target, drain=20)
        cli = await Cli.start("run", "--config", str(cfg))
        try:
            await cli.wait_for("ready: 2 tunnels")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            first = await reader.readline()
            cli.proc.send_signal(signal.SIGTERM)  # relays in flight
            await cli.wait_for("shutting down (SIGTERM)")
            with pytest.raises(OSError):  # no longer accepting
                await asyncio.open_connection("127.0.0.1", port)
            rest = await reader.read()  # ... but the open one runs to its end, with a clean EOF
            writer.close()
            assert first + rest == b"".join(b"chunk %03d\n" % i for i in range(chunks))
            assert await cli.exit_code() == 0
        finally:
            await cli.stop()
    out = cli.output
    assert "tunnel 'backend': securechan in on 127.0.0.1:" in out
    assert "tunnel 'frontend': plain in on 127.0.0.1:" in out
    assert "stopped: 2 connections relayed, 0 cut at the drain deadline" in out
    assert "identity='localhost'" in out and "down=300" in out


async def test_sigterm_cuts_relays_at_the_drain_deadline(pki_dir, tmp_path) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                writer.write(b"data\n")
                await writer.drain()
                await asyncio.sleep(0.02)
        except ConnectionError:
            writer.close()

    async with plain_target(endless) as target:
        cfg, port = two_tunnels(pki_dir, tmp_path, target, drain=0.5)
        cli = await Cli.start("run", "--config", str(cfg))
        try:
            await cli.wait_for("ready: 2 tunnels")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            cli.proc.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionResetError):  # cut: an RST, never a clean end of stream
                while await reader.read(65536):
                    pass
            writer.close()
            assert await cli.exit_code() == 0
        finally:
            await cli.stop()
    assert "shutdown deadline (0.5 s) reached" in cli.output
    assert "2 cut at the drain deadline" in cli.output


async def test_second_signal_cuts_at_once(pki_dir, tmp_path) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                writer.write(b"data\n")
                await writer.drain()
                await asyncio.sleep(0.02)
        except ConnectionError:
            writer.close()

    async with plain_target(endless) as target:
        cfg, port = two_tunnels(pki_dir, tmp_path, target, drain=600)
        cli = await Cli.start("run", "--config", str(cfg))
        try:
            await cli.wait_for("ready: 2 tunnels")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            cli.proc.send_signal(signal.SIGINT)
            await cli.wait_for("shutting down (SIGINT)")
            cli.proc.send_signal(signal.SIGINT)
            assert await cli.exit_code() == 0
            writer.close()
        finally:
            await cli.stop()
    assert "SIGINT again: cutting open connections now" in cli.output
    assert "closed: cut by a second stop signal" in cli.output


async def test_bad_config_names_the_line_and_exits_3(tmp_path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[tunnel]]\nname = "db"\nmode = "client"\nlisten = "127.0.0.1:1"\ntargt = "db:5432"\n')
    cli = await Cli.start("run", "--config", str(cfg))
    assert await cli.exit_code() == 3
    assert f"{cfg} line 5: [[tunnel]] #1 ('db'): unknown key 'targt'; did you mean 'target'?" in cli.output


async def test_config_check_reads_the_files(pki_dir, tmp_path) -> None:
    cfg, _ = two_tunnels(pki_dir, tmp_path, free_port(), drain=1)
    cli = await Cli.start("run", "--config", str(cfg), "--check")
    assert await cli.exit_code() == 0
    assert "OK, 2 tunnel(s): backend (server" in cli.output
    cfg.write_text(cfg.read_text().replace(str(pki_dir.ca_file), str(tmp_path / "nope.crt")))
    cli = await Cli.start("run", "--config", str(cfg), "--check")
    assert await cli.exit_code() == 3
    assert f"tunnel 'frontend': CA file '{tmp_path / 'nope.crt'}' does not exist" in cli.output


async def test_exit_codes_usage_config_listen(pki_dir) -> None:
    cli = await Cli.start("server", "--listen", "127.0.0.1:1")  # --target missing
    assert await cli.exit_code() == 2
    cli = await Cli.start("client", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--mux", "--no-mux")
    assert await cli.exit_code() == 2
    assert "argument --no-mux: not allowed with argument --mux" in cli.output
    cli = await Cli.start("client", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1")
    assert await cli.exit_code() == 3
    assert "a client tunnel must verify the server: give --cafile FILE" in cli.output
    cli = await Cli.start("server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1",
                          "--cert", str(pki_dir.server_key), "--key", str(pki_dir.server_key))
    assert await cli.exit_code() == 3
    assert "holds a private key, not a certificate" in cli.output
    busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = busy.sockets[0].getsockname()[1]
    try:
        cli = await Cli.start("server", "--listen", f"127.0.0.1:{port}", "--target", "127.0.0.1:1",
                              "--cert", str(pki_dir.server_cert), "--key", str(pki_dir.server_key))
        assert await cli.exit_code() == 4
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use; another process is listening" in cli.output
    finally:
        busy.close()


async def test_help_documents_exit_codes() -> None:
    cli = await Cli.start("server", "--help")
    assert await cli.exit_code() == 0
    assert "exit codes:" in cli.output and "4  cannot listen" in cli.output


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


async def test_workers_share_the_port_and_stop_on_sigterm(pki_dir) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"pong")
        writer.close()

    port = free_port()
    async with plain_target(answer) as target:
        cli = await Cli.start("server", "--workers", "2", "--listen", f"127.0.0.1:{port}",
                              "--target", f"127.0.0.1:{target}", "--cert", str(pki_dir.server_cert),
                              "--key", str(pki_dir.server_key))
        try:
            await cli.wait_for("started 2 workers")
            for _ in range(2):
                await cli.wait_for("ready: 1 tunnel")
            while sum("ready: 1 tunnel" in line for line in cli.lines) < 2:
                await cli.wait_for("ready: 1 tunnel")
                await asyncio.sleep(0.05)
            workers = children_of(cli.proc.pid)
            assert len(workers) == 2
            config = pki_dir.client_config()
            for _ in range(6):
                reader, writer = await securechan.open_connection("127.0.0.1", port, config=config,
                                                                  server_name="localhost")
                assert await reader.read() == b"pong"
                writer.close()
            cli.proc.send_signal(signal.SIGTERM)
            assert await cli.exit_code() == 0
        finally:
            await cli.stop()
    assert sum("stopped:" in line for line in cli.lines) == 2


async def test_sighup_reloads_the_certificate(pki_dir, tmp_path) -> None:
    cert, key = pki_dir.issue("localhost", ips=["127.0.0.1"])
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(cert.read_bytes())
    live_key.write_bytes(key.read_bytes())
    live_key.chmod(0o600)
    port = free_port()
    async with plain_target(lambda r, w: w.close()) as target:  # type: ignore[arg-type,return-value]
        cli = await Cli.start("server", "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{target}",
                              "--cert", str(live_cert), "--key", str(live_key))
        try:
            await cli.wait_for("ready: 1 tunnel")
            config = pki_dir.client_config()
            _, w = await securechan.open_connection("127.0.0.1", port, config=config, server_name="localhost")
            first = w.get_extra_info("peercert").serial_number
            w.close()
            new_cert, new_key = pki_dir.issue("localhost", ips=["127.0.0.1"])
            live_cert.write_bytes(new_cert.read_bytes())
            live_key.write_bytes(new_key.read_bytes())
            cli.proc.send_signal(signal.SIGHUP)
            await cli.wait_for("reloaded certificates")
            _, w = await securechan.open_connection("127.0.0.1", port, config=pki_dir.client_config(),
                                                    server_name="localhost")
            assert w.get_extra_info("peercert").serial_number != first
            w.close()
            live_key.write_text("not a key")
            cli.proc.send_signal(signal.SIGHUP)
            await cli.wait_for("reload failed, keeping the current certificates")
            cli.proc.send_signal(signal.SIGTERM)
            assert await cli.exit_code() == 0
        finally:
            await cli.stop()


async def test_encrypted_key_passphrase_from_environment(pki_dir, tmp_path, monkeypatch) -> None:
    from cryptography.hazmat.primitives import serialization

    from securechan import pki

    key = serialization.load_pem_private_key(pki_dir.server_key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(pki.key_pem(key, b"correct horse"))  # type: ignore[arg-type]
    locked.chmod(0o600)
    base = ["server", "--listen", "127.0.0.1:0", "--target", "127.0.0.1:1", "--cert", str(pki_dir.server_cert),
            "--key", str(locked)]
    cli = await Cli.start(*base)
    assert await cli.exit_code() == 3
    assert "is encrypted: give its passphrase" in cli.output
    monkeypatch.setenv("TUNNEL_TEST_PASS", "wrong")
    cli = await Cli.start(*base, "--key-pass-env", "TUNNEL_TEST_PASS")
    assert await cli.exit_code() == 3
    assert "wrong passphrase" in cli.output
    monkeypatch.setenv("TUNNEL_TEST_PASS", "correct horse")
    cli = await Cli.start(*base, "--key-pass-env", "TUNNEL_TEST_PASS")
    try:
        await cli.wait_for("ready: 1 tunnel")
        cli.proc.send_signal(signal.SIGTERM)
        assert await cli.exit_code() == 0
    finally:
        await cli.stop()
    assert "correct horse" not in cli.output


async def test_workers_option_errors_exit_3(pki_dir, tmp_path) -> None:
    base = ["server", "--target", "127.0.0.1:1", "--cert", str(pki_dir.server_cert), "--key", str(pki_dir.server_key)]
    cases = [
        (["--workers", "0", "--listen", f"127.0.0.1:{free_port()}"], "securechan: error: --workers must be at least 1"),
        *((["--workers", "2", "--listen", listen],
           "securechan: error: tunnel 'server': --workers 2 shares the listening port through SO_REUSEPORT, "
           "which needs a fixed TCP port (not port 0 or a Unix socket)")
          for listen in ("127.0.0.1:0", f"unix:{tmp_path / 'tunnel.sock'}")),
    ]
    for extra, message in cases:
        cli = await Cli.start(*base, *extra)
        try:
            assert await cli.exit_code() == 3, cli.output
        finally:
            await cli.stop()
        assert cli.lines == [message], extra


async def start_workers(pki_dir, port: int, workers: int = 2) -> tuple[Cli, list[int]]:
    """``securechan server --workers N`` on a fixed port, once every worker is ready; returns the worker pids."""
    cli = await Cli.start("server", "--workers", str(workers), "--listen", f"127.0.0.1:{port}",
                          "--target", "127.0.0.1:1", "--cert", str(pki_dir.server_cert),
                          "--key", str(pki_dir.server_key))
    try:
        started = await cli.wait_for(f"started {workers} workers")
        pids = [int(p) for p in started.rsplit(": ", 1)[1].split()]
        await cli.wait_for_count("ready: 1 tunnel", workers)
    except BaseException:
        await cli.stop()
        raise
    assert sorted(pids) == sorted(children_of(cli.proc.pid))
    return cli, pids


def kill_leftovers(pids: list[int]) -> None:
    """After a failed test: end the workers this test started (by pid), so the output pipe closes."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


async def test_a_worker_that_dies_stops_the_others_and_the_supervisor_exits_1(pki_dir) -> None:
    cli, pids = await start_workers(pki_dir, free_port())
    finished = False
    try:
        victim, survivor = pids
        os.kill(victim, signal.SIGKILL)  # e.g. the OOM killer
        assert await cli.exit_code() == 1
        finished = True
    finally:
        if not finished:
            kill_leftovers(pids)
        await cli.stop()
    assert any(line.endswith(f"worker {victim} exited with code 1; stopping the other workers") for line in cli.lines)
    assert sum("exited with code" in line for line in cli.lines) == 1
    assert sum("shutting down (SIGTERM)" in line for line in cli.lines) == 1  # the survivor drained
    assert sum("stopped: 0 connections relayed" in line for line in cli.lines) == 1


async def test_workers_that_cannot_listen_make_the_supervisor_exit_4(pki_dir) -> None:
    busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # no SO_REUSEPORT: no worker can join
    port = busy.sockets[0].getsockname()[1]
    try:
        cli = await Cli.start("server", "--workers", "2", "--listen", f"127.0.0.1:{port}", "--target", "127.0.0.1:1",
                              "--cert", str(pki_dir.server_cert), "--key", str(pki_dir.server_key))
        try:
            assert await cli.exit_code() == 4, cli.output
        finally:
            await cli.stop()
    finally:
        busy.close()
        await busy.wait_closed()
    # The first worker's failure is logged and stops the other (which may fail the same way or be stopped first).
    assert sum(line.endswith("exited with code 4; stopping the other workers") for line in cli.lines) == 1
    errors = [line for line in cli.lines if line.startswith("securechan: error:")]
    assert 1 <= len(errors) <= 2 and set(errors) == {
        f"securechan: error: tunnel 'server' cannot listen on 127.0.0.1:{port}: Address already in use; "
        "another process is listening there; stop it or choose another port"
    }, cli.output
    assert "ready:" not in cli.output


async def test_workers_stop_when_the_supervisor_is_killed(pki_dir) -> None:
    cli, pids = await start_workers(pki_dir, free_port())
    finished = False
    try:
        cli.proc.kill()  # SIGKILL: no signal is forwarded; each worker must notice on its own
        # (within its 1 s check). The output pipe closes only when both workers have exited.
        assert await cli.exit_code() == -signal.SIGKILL
        finished = True
    finally:
        if not finished:
            kill_leftovers(pids)
        await cli.stop()
    assert sum("shutting down (supervisor exited)" in line for line in cli.lines) == 2, cli.output
    assert sum("stopped: 0 connections relayed" in line for line in cli.lines) == 2, cli.output


async def mux_client_and_server(pki_dir, mid: int, front: int, target: int, *server_args: str,
                                client_args: tuple[str, ...] = ()) -> tuple[Cli, Cli]:
    """``securechan server`` on ``mid`` in front of ``target``, and ``securechan client`` (multiplexing by
    default) on ``front``."""
    server = await Cli.start("server", "--listen", f"127.0.0.1:{mid}", "--target", f"127.0.0.1:{target}", *server_args)
    client = await Cli.start("client", "--listen", f"127.0.0.1:{front}", "--target", f"127.0.0.1:{mid}",
                             "--cafile", str(pki_dir.ca_file), "--server-name", "localhost", *client_args)
    return server, client


async def test_mux_client_program_carries_connections_and_moves_to_new_certificates_on_sighup(
        pki_dir, tmp_path) -> None:
    """``securechan client`` against ``securechan server``, both as they come: one carrier for many
    connections; a SIGHUP on the server sends the client to a new carrier while open streams go on."""
    cert, key = pki_dir.issue("localhost", ips=["127.0.0.1"])
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    live_cert.write_bytes(cert.read_bytes())
    live_key.write_bytes(key.read_bytes())
    live_key.chmod(0o600)
    mid, front = free_port(), free_port()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    async def round_trip(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, data: bytes) -> None:
        writer.write(data)
        assert await reader.readexactly(len(data)) == data

    async with plain_target(echo) as target:
        server, client = await mux_client_and_server(pki_dir, mid, front, target, "--cert", str(live_cert),
                                                     "--key", str(live_key))
        try:
            await server.wait_for("ready: 1 tunnel")
            await client.wait_for("ready: 1 tunnel")
            long_reader, long_writer = await asyncio.open_connection("127.0.0.1", front)
            await round_trip(long_writer, long_reader, b"first")
            for i in range(5):
                reader, writer = await asyncio.open_connection("127.0.0.1", front)
                await round_trip(writer, reader, b"short %d" % i)
                writer.write_eof()
                assert await reader.read() == b""  # a clean end, stream by stream
                writer.close()
            await server.wait_for_count("stream ", 5)
            assert sum("multiplexed securechan connection to" in line for line in client.lines) == 1, client.output
            new_cert, new_key = pki_dir.issue("localhost", ips=["127.0.0.1"])
            live_cert.write_bytes(new_cert.read_bytes())
            live_key.write_bytes(new_key.read_bytes())
            server.proc.send_signal(signal.SIGHUP)
            await server.wait_for("reloaded certificates")
            def carriers() -> int:
                return sum("multiplexed securechan connection to" in line for line in client.lines)

            for _ in range(200):  # new connections go on the old carrier only until its GOAWAY arrives
                reader, writer = await asyncio.open_connection("127.0.0.1", front)
                await round_trip(writer, reader, b"after the reload")
                writer.close()
                if carriers() == 2:
                    break
                await asyncio.sleep(0.05)
            assert carriers() == 2, client.output
            await round_trip(long_writer, long_reader, b"the stream opened before the reload goes on")
            long_writer.close()
            for cli in (client, server):
                cli.proc.send_signal(signal.SIGTERM)
                assert await cli.exit_code() == 0, cli.output
            assert "Traceback" not in client.output + server.output
        finally:
            await client.stop()
            await server.stop()


@pytest.mark.parametrize("client_args", [(), ("--no-mux",)], ids=["default", "no-mux"])
async def test_server_program_with_no_mux_serves_a_client_that_falls_back_or_does_not_multiplex(
        pki_dir, client_args: tuple[str, ...]) -> None:
    """The default client program falls back to a connection each (and says so once, naming --no-mux);
    one with --no-mux does that from the start, without the line."""
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    mid, front = free_port(), free_port()
    async with plain_target(echo) as target:
        server, client = await mux_client_and_server(pki_dir, mid, front, target, "--cert", str(pki_dir.server_cert),
                                                     "--key", str(pki_dir.server_key), "--no-mux",
                                                     client_args=client_args)
        try:
            await server.wait_for("ready: 1 tunnel")
            await client.wait_for("ready: 1 tunnel")
            for i in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", front)
                writer.write(b"hello %d" % i)
                writer.write_eof()
                assert await reader.read() == b"hello %d" % i
                writer.close()
            await client.wait_for_count("closed: ", 3)
            fallback = [line for line in client.lines if "does not accept multiplexed connections" in line]
            if client_args:
                assert not fallback, client.output
            else:
                (line,) = fallback
                assert "WARNING" in line and "makes one securechan connection per connection" in line
                assert "give it --no-mux to do so from the start" in line
            assert not [line for line in client.lines if "multiplexed securechan connection to" in line]
        finally:
            await client.stop()
            await server.stop()


async def test_server_program_with_no_mux_turns_a_mux_client_away_with_a_clear_line(pki_dir) -> None:
    mid, front = free_port(), free_port()
    async with plain_target(lambda r, w: w.close()) as target:
        server, client = await mux_client_and_server(pki_dir, mid, front, target, "--cert", str(pki_dir.server_cert),
                                                     "--key", str(pki_dir.server_key), "--no-mux",
                                                     client_args=("--mux",))
        try:
            await server.wait_for("ready: 1 tunnel")
            await client.wait_for("ready: 1 tunnel")
            reader, writer = await asyncio.open_connection("127.0.0.1", front)
            with pytest.raises(ConnectionResetError):
                await reader.read()
            writer.close()
            line = await client.wait_for("does not accept multiplexed connections")
            assert "it runs with --no-mux" in line and "run this client tunnel without --mux" in line
        finally:
            await client.stop()
            await server.stop()
