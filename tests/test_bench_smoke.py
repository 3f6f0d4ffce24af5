"""Smoke test of the benchmark suite: every section runs on tiny sizes and writes its outputs.

No timing is asserted: the figures from tiny sizes mean nothing. What is checked is that
each section produced figures of the right shape, the ratio table and the JSON file exist,
and the JSON records the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(tmp_path: Path, only: str, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--tiny", "--only", only, "--out", str(tmp_path), *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = list(tmp_path.glob("bench-tiny-*.json"))
    assert len(files) == 1, done.stdout
    return json.loads(files[0].read_text())


def _is_summary(s: dict) -> bool:
    return s["min"] <= s["median"] <= s["max"] and s["runs"] >= 1 and s["median"] > 0


def test_channel_sections_and_outputs(tmp_path: Path) -> None:
    r = run_bench(tmp_path, "cipher,bulk,record_size,latency,many,handshakes")
    assert r["machine"]["cpu_model"] and r["machine"]["python"] and r["machine"]["libraries"]["cryptography"]
    aes = r["cipher"]["AES-256-GCM"]
    for size in ("1024", "65536"):
        for key in ("seal", "open", "raw_encrypt", "raw_decrypt"):
            assert _is_summary(aes[size][key])
    for loop in ("asyncio", "uvloop"):
        for direction in ("up", "down"):
            assert set(r["bulk"][loop][direction]) == {"tcp", "ssl", "securechan"}
            assert all(_is_summary(s) for s in r["bulk"][loop][direction].values())
        assert _is_summary(r["latency"][loop]["securechan"]["p99"])
    # the TLS peer really negotiated TLS 1.3 with AES-256-GCM
    assert r["bulk"]["negotiated"]["asyncio"]["ssl"][0] == "TLS_AES_256_GCM_SHA384"
    assert set(r["record_size"]) == {"16384", "65536"}
    assert _is_summary(r["many"]["uvloop"]["securechan"])
    assert _is_summary(r["handshakes"]["securechan"]["2"]["rate"])
    # At 2 clients each makes handshakes_per_client (3 in the tiny plan): 6, more than the 4 run sequentially.
    assert r["handshakes"]["count_per_run"] == {"1": 4, "2": 6}
    if "securechan-resumed" in r["handshakes"]:
        assert _is_summary(r["handshakes"]["securechan-resumed"]["2"]["rate"])
    figures = {row["figure"] for row in r["ratios"]}
    assert "bulk client→server, uvloop" in figures
    assert any(f.startswith("full handshakes/s") for f in figures)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == 2 and pngs[0].startswith("handshakes-vs-concurrency")


def test_memory_section(tmp_path: Path) -> None:
    r = run_bench(tmp_path, "memory", "--no-plots")
    for kind in ("tcp", "ssl", "securechan"):
        assert r["memory"][kind]["connections"] == 20
    assert not list(tmp_path.glob("*.png"))


def test_tunnel_section_runs_or_explains(tmp_path: Path) -> None:
    r = run_bench(tmp_path, "tunnel", "--no-plots")
    t = r["tunnel"]
    for peer in ("direct", "stunnel", "spiped", "securechan", "securechan-no-mux"):
        ran = any(peer in t[fig] for fig in ("iperf3", "redis_ping_c50", "redis_new_conn"))
        assert ran or peer in t["notes"], f"{peer}: neither measured nor explained"
    if "direct" in t["iperf3"]:
        assert _is_summary(t["iperf3"]["direct"])


def test_unknown_section_is_refused(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "nonsense", "--out", str(tmp_path)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode != 0
    assert "unknown section(s) nonsense" in done.stderr


@pytest.mark.parametrize("module", ["benchmarks.worker", "benchmarks.tunnel"])
def test_modules_import(module: str) -> None:
    __import__(module)


def test_handshake_profile_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_handshake", "--count", "5", "--profile"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert "per full handshake, both sides, in memory (5 handshakes)" in done.stdout
    assert "decrypt" in done.stdout  # the profile lists the RSA unwrap among the top functions


def test_server_cpu_runs(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.server_cpu", "--count", "3", "--clients", "2", "--runs", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    # The flights of a real handshake (ClientHello, the server's flight with its certificate,
    # KeyExchange + Finished, Finished) and the two close_notify records.
    hello, flight, key_exchange, finished, close, close_reply = figures["sizes"]
    assert flight > 600 > hello  # an RSA-2048 certificate alone is over 600 bytes of DER
    assert key_exchange > 256 > finished  # the RSA-2048 wrapped key, then a 32-byte MAC in a frame
    assert close == close_reply < finished
    assert set(figures["results"]) == {"tcp", "floor", "tls", "securechan"}
    for kind in figures["results"].values():
        assert _is_summary(kind["server_cpu_per_handshake"]) and _is_summary(kind["rate"])
    assert "securechan minus floor, round by round:" in done.stdout
    for kind in figures["results"].values():
        assert _is_summary(kind["busy"])


def test_server_cpu_refuses_an_unknown_kind() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.server_cpu", "--kinds", "tls,quic"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode != 0
    assert "unknown kind(s) quic" in done.stderr


@pytest.mark.skipif(any(shutil.which(p) is None for p in ("redis-server", "redis-benchmark")),
                    reason="redis-server and redis-benchmark are needed (make bench-peers)")
def test_tunnel_cpu_runs(tmp_path: Path) -> None:
    out = tmp_path / "tunnel-cpu.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.tunnel_cpu", "--requests", "300", "--new-requests", "60", "--runs", "1",
         "--contenders", "securechan,securechan-no-mux,relay,aead-relay", "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert set(figures["results"]) == {"ping", "new"}
    for per_name in figures["results"].values():
        assert set(per_name) == {"securechan", "securechan-no-mux", "relay", "aead-relay"}
        for kind in per_name.values():
            assert _is_summary(kind["rate"])
            # CPU is read in clock ticks: a tiny window may round to zero, never below it.
            assert all(kind[f"{end}_{what}"]["min"] >= 0 for end in ("client", "server") for what in ("user", "sys"))
    assert "securechan minus aead-relay, user CPU per request and end, round by round:" in done.stdout


def test_tunnel_cpu_refuses_an_unknown_contender() -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks.tunnel_cpu", "--contenders", "spiped,nonesuch"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode != 0
    assert "unknown contender(s) nonesuch" in done.stderr


def test_relay_floor_records_round_trip_and_reject_tampering() -> None:
    from cryptography.exceptions import InvalidTag

    from benchmarks import relay_floor

    key = os.urandom(32)
    seal, open_ = relay_floor._Seal(key), relay_floor._Open(key)
    big = os.urandom(relay_floor.MAX_PLAIN + 10)  # two records
    wire = b"".join(seal(b"ping") + seal(big))
    # Fed a byte at a time and then the rest: nothing comes out before a record is whole.
    assert open_(wire[:1]) == [] and open_(wire[1:3]) == []
    assert open_(wire[3:]) == [b"ping", big[: relay_floor.MAX_PLAIN], big[relay_floor.MAX_PLAIN :]]
    tampered = bytearray(b"".join(seal(b"pong")))
    tampered[-1] ^= 1
    with pytest.raises(InvalidTag):
        open_(bytes(tampered))
    with pytest.raises(ValueError, match="out of range"):
        relay_floor._Open(key)((relay_floor.MAX_PLAIN + relay_floor.TAG + 1).to_bytes(4, "big"))


def test_tunnel_instructions_loads_run(tmp_path: Path) -> None:
    """Both loads of benchmarks.tunnel_instructions run to the end through a real tunnel pair."""
    from benchmarks import pkiutil

    pkiutil.make(tmp_path / "pki")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for kind, count in (("request", "20"), ("connection", "3")):
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.tunnel_instructions", "--worker", kind, count, str(tmp_path / "pki")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (make bench-peers installs it)")
def test_tunnel_instructions_counts() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.tunnel_instructions", "--requests", "200", "--connections", "6"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = [int(m.replace(",", "")) for m in re.findall(r":\s+([\d,]+)\s+\(", done.stdout)]
    assert len(figures) == 2 and all(f > 1000 for f in figures), done.stdout
