"""``make demo`` (``securechan demo``), the main job, run as the real program it is."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "securechan", "demo", *args], capture_output=True, text=True,
                          timeout=120)


def test_demo_moves_data_both_ways_and_verifies_it() -> None:
    done = _demo("--megabytes", "3")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "1. made a throwaway CA and an RSA-2048 server certificate for localhost/127.0.0.1" in out
    assert "2. securechan server listening on 127.0.0.1:" in out
    assert "3. client connected and verified the server against the CA in" in out
    assert "protocol version : securechan/1" in out
    assert "cipher suite     : AES-256-GCM (key wrap RSA-OAEP-SHA256, X25519 forward secrecy)" in out
    assert "4. moved 3 MiB each way, SHA-256 verified at the far end: client->server OK, server->client OK" in out
    assert "throughput       : client->server " in out


@pytest.mark.parametrize(("value", "message"), [("0", "must be at least 1, got 0"),
                                                 ("lots", "expected a whole number of MiB, got 'lots'")])
def test_demo_refuses_a_size_it_cannot_move(value: str, message: str) -> None:
    done = _demo("--megabytes", value)
    assert done.returncode == 2
    assert f"argument --megabytes: {message}" in done.stderr
