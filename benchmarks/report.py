"""The ratio table (securechan against each peer, with the targets) and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .stats import fmt_rate, fmt_summary


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _row(figure: str, ours: Any, peer: str, theirs: Any, target: float | None, lower_is_better: bool = False,
         absolute_limit: float | None = None) -> dict[str, Any] | None:
    if ours is None or (theirs is None and absolute_limit is None):
        return None
    row: dict[str, Any] = {"figure": figure, "securechan": ours["median"], "unit": ours["unit"],
                           "securechan_range": [ours["min"], ours["max"]], "peer": peer}
    if theirs is not None:
        ratio = ours["median"] / theirs["median"] if theirs["median"] else float("inf")
        row.update(peer_value=theirs["median"], peer_range=[theirs["min"], theirs["max"]], ratio=ratio)
        if target is not None:
            row["target"] = target
            row["met"] = ratio <= target if lower_is_better else ratio >= target
    if absolute_limit is not None:
        row["target"] = f"<= {fmt_rate(absolute_limit, ours['unit'])}"
        row["met"] = ours["median"] <= absolute_limit
    return row


def ratio_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any] | None] = []
    size = str(r["default_record_size"])
    for suite, per in (r.get("cipher") or {}).items():
        if size in per:
            rows.append(_row(f"cipher path seal, {suite}, {int(size) // 1024} KiB", per[size]["seal"],
                             "raw encrypt_into", per[size]["raw_encrypt"], 0.7))
            rows.append(_row(f"cipher path open, {suite}, {int(size) // 1024} KiB", per[size]["open"],
                             "raw decrypt_into", per[size]["raw_decrypt"], 0.7))
    for loop in ("uvloop", "asyncio"):
        for direction, label in (("up", "client→server"), ("down", "server→client")):
            b = _get(r, "bulk", loop, direction)
            if b:
                rows.append(_row(f"bulk {label}, {loop}", b["securechan"], "asyncio+ssl", b["ssl"], 1.5))
                rows.append(_row(f"bulk {label}, {loop}", b["securechan"], "plain TCP", b["tcp"], 0.7))
    for loop in ("uvloop", "asyncio"):
        lat = _get(r, "latency", loop)
        if lat:
            rows.append(_row(f"round trip p50, {loop}", lat["securechan"]["p50"], "asyncio+ssl", lat["ssl"]["p50"],
                             None, lower_is_better=True))
            rows.append(_row(f"round trip p99, {loop}", lat["securechan"]["p99"], "asyncio+ssl", lat["ssl"]["p99"],
                             None, lower_is_better=True))
    m = _get(r, "many", "uvloop")
    if m:
        rows.append(_row(f"{r['many']['streams']} streams aggregate", m["securechan"], "asyncio+ssl", m["ssl"], None))
        rows.append(_row(f"{r['many']['streams']} streams aggregate", m["securechan"], "plain TCP", m["tcp"], None))
    mem = r.get("memory")
    if mem:
        def per_conn(kind: str) -> dict[str, Any]:
            v = mem[kind]["server_per_conn"]
            return {"median": v, "min": v, "max": v, "unit": "B"}

        rows.append(_row(f"RSS per idle connection ({mem['connections']}), server", per_conn("securechan"),
                         "asyncio+ssl", per_conn("ssl"), None, lower_is_better=True, absolute_limit=64 * 1024))
        if "securechan_after_burst" in mem:
            rows.append(_row(f"RSS per connection idle after bulk ({mem['connections']}), server",
                             per_conn("securechan_after_burst"), "asyncio+ssl", per_conn("ssl"), None,
                             lower_is_better=True, absolute_limit=64 * 1024))
    hs = r.get("handshakes")
    if hs and "securechan" in hs:
        for conc in hs["securechan"]:
            rows.append(_row(f"full handshakes/s, concurrency {conc}", hs["securechan"][conc]["rate"], "TLS 1.3",
                             hs["ssl"][conc]["rate"], 1.5))
        first = min(hs["securechan"], key=int)
        rows.append(_row(f"handshake p50 latency, concurrency {first}", hs["securechan"][first]["p50"], "TLS 1.3",
                         hs["ssl"][first]["p50"], 1.0, lower_is_better=True))
        if "securechan-resumed" in hs:
            for conc in hs["securechan-resumed"]:
                rows.append(_row(f"resumed handshakes/s, concurrency {conc}", hs["securechan-resumed"][conc]["rate"],
                                 "securechan full", hs["securechan"][conc]["rate"], None))
    t = r.get("tunnel") or {}
    for fig, label, peer, target in (("iperf3", "tunnel iperf3", "stunnel", 1.0),
                                     ("redis_ping_c50", "tunnel redis PING c=50", "spiped", 1.0),
                                     ("redis_new_conn", "tunnel new connections (redis -k 0)", "spiped", 2.0)):
        per = t.get(fig) or {}
        for ours, mode in (("securechan", ""), ("securechan-no-mux", ", --no-mux")):
            if ours in per:
                for p in ("direct", "stunnel", "spiped"):
                    if p in per:
                        rows.append(_row(f"{label}{mode}", per[ours], p, per[p], target if p == peer else None))
    return [row for row in rows if row is not None]


def print_tables(console: Console, r: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    m = r["machine"]
    console.print(f"[bold]{m['cpu_model']}[/], {m['usable_cores']} cores, Python {m['python']}, "
                  f"{m['cryptography_openssl']}, pinned={r['pinned']}, mode={r['mode']}")
    table = Table(title="securechan against each peer (medians; min and max are in the JSON)")
    for col in ("figure", "securechan", "peer", "peer figure", "ratio", "target"):
        table.add_column(col)
    for row in rows:
        unit = row["unit"]
        ours = f"{fmt_rate(row['securechan'], unit)}"
        theirs = fmt_rate(row["peer_value"], unit) if "peer_value" in row else "—"
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "—"
        target = row.get("target")
        if target is None:
            tgt = ""
        else:
            mark = "[green]met[/]" if row.get("met") else "[red]missed[/]"
            if isinstance(target, str):
                tgt = f"{target} {mark}"
            else:
                tgt = f"{'<=' if 'latency' in row['figure'] else '>='} {target:g}x {mark}"
        table.add_row(row["figure"], ours, row["peer"], theirs, ratio, tgt)
    console.print(table)
    notes = dict(_get(r, "tunnel", "notes") or {})
    if "handshakes" in r:
        notes["resumed handshakes"] = r["handshakes"]["resumed"].get("note", "")
    for k, v in notes.items():
        if v:
            console.print(f"[yellow]skipped/note[/] {k}: {v}")
    if r.get("record_size"):
        console.print("record size sweep (securechan, uvloop, client→server): " + ", ".join(
            f"{int(s) // 1024} KiB {fmt_summary(v)}" for s, v in r["record_size"].items()))


def plots(r: dict[str, Any], out: Path, stamp: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    if r.get("cipher") or r.get("record_size"):
        fig, ax = plt.subplots(figsize=(8, 5))
        for suite, per in (r.get("cipher") or {}).items():
            sizes = sorted(int(s) for s in per)
            for key, label, style in (("seal", "seal", "-o"), ("open", "open", "-s"),
                                      ("raw_encrypt", "raw encrypt_into", ":")):
                med = [per[str(s)][key]["median"] / 1e9 for s in sizes]
                lo = [m - per[str(s)][key]["min"] / 1e9 for m, s in zip(med, sizes, strict=True)]
                hi = [per[str(s)][key]["max"] / 1e9 - m for m, s in zip(med, sizes, strict=True)]
                ax.errorbar([s / 1024 for s in sizes], med, yerr=[lo, hi], fmt=style, capsize=3,
                            label=f"cipher path {label}, {suite}")
        if r.get("record_size"):
            sizes = sorted(int(s) for s in r["record_size"])
            med = [r["record_size"][str(s)]["median"] / 1e9 for s in sizes]
            lo = [m - r["record_size"][str(s)]["min"] / 1e9 for m, s in zip(med, sizes, strict=True)]
            hi = [r["record_size"][str(s)]["max"] / 1e9 - m for m, s in zip(med, sizes, strict=True)]
            ax.errorbar([s / 1024 for s in sizes], med, yerr=[lo, hi], fmt="-D", capsize=3, linewidth=2,
                        label="channel, one connection (uvloop, loopback)")
        ax.axvline(r["default_record_size"] / 1024, color="grey", linestyle="--", linewidth=1,
                   label="default record size")
        ax.set_xscale("log", base=2)
        sizes_kib = {int(s) // 1024 for s in (r.get("record_size") or {})}
        for per in (r.get("cipher") or {}).values():
            sizes_kib |= {int(s) // 1024 for s in per}
        ticks = sorted(sizes_kib)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("record size (KiB)")
        ax.set_ylabel("GB/s (median; bars: min…max)")
        ax.set_title("securechan throughput vs record size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"throughput-vs-record-size-{stamp}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    hs = r.get("handshakes")
    if hs and "securechan" in hs:
        fig, ax = plt.subplots(figsize=(8, 5))
        for kind, label in (("securechan", "securechan full handshake"), ("ssl", "asyncio + ssl, TLS 1.3 full"),
                            ("securechan-resumed", "securechan resumed")):
            if kind not in hs:
                continue
            concs = sorted(int(c) for c in hs[kind])
            med = [hs[kind][str(c)]["rate"]["median"] for c in concs]
            lo = [m - hs[kind][str(c)]["rate"]["min"] for m, c in zip(med, concs, strict=True)]
            hi = [hs[kind][str(c)]["rate"]["max"] - m for m, c in zip(med, concs, strict=True)]
            ax.errorbar(concs, med, yerr=[lo, hi], fmt="-o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        concs = sorted({int(c) for c in hs["securechan"]})
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("handshakes per second (median; bars: min…max)")
        ax.set_title("handshake rate vs concurrency (RSA-2048, CA chain checked)")
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"handshakes-vs-concurrency-{stamp}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made
