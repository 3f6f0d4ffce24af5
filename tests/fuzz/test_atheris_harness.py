"""The atheris harnesses run (briefly) when atheris is installed; their targets run always."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import _targets  # noqa: E402


def test_targets_accept_honest_and_hostile_input() -> None:
    world = _targets.World()
    _targets.decoders(b"\x81\xa4type\xa5alert")
    _targets.decoders(b"\x92\x01\xc6\xff\xff\xff\xff")
    for data in (b"", b"\x00", b"\x01" + os.urandom(300), b"\x02\x00\x10" + os.urandom(64), b"\x02" + b"\xff" * 40):
        _targets.connection(world, data)
    # The unpatched flight is accepted whole, so patches start from a state deep in the protocol.
    server = world.fresh_server()
    events = server.receive_data(world.client_flight)
    assert server.handshake_complete and server.peer_closed and events


@pytest.mark.parametrize(("harness", "runs"), [("fuzz_decoders.py", 2000), ("fuzz_connection.py", 200)])
def test_harness_runs(harness: str, runs: int) -> None:
    pytest.importorskip("atheris")
    result = subprocess.run(
        [sys.executable, str(HERE / harness), f"-atheris_runs={runs}", "-max_len=4096", "-timeout=10"],
        capture_output=True, text=True, timeout=240, cwd=HERE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {runs} " in result.stderr
