"""The report of bench/e2e: the table, the E2EE / plaintext ratios against the 2x target,
the CPU per delivered message, and how it was measured.

Apart from the runs so that a saved run (``--from-json``) renders without starting
anything.
"""

from __future__ import annotations

from typing import Any

SECTION = "## End-to-end encryption through the server (bench/e2e)"
TARGET = 2.0


def _ms(v: float | None) -> str:
    if v is not None and v >= 2000:
        return ">= 2000"  # the histogram's last bucket
    return "-" if v is None else f"{v:.2f}"


def _x(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


def _fx(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def ratios(res: dict[str, Any]) -> dict[str, float | None]:
    pr, pe = res["pair_raw"], res["pair_e2ee"]
    rr, re_ = res["room_raw"], res["room_e2ee"]
    out: dict[str, float | None] = {
        "pair_rate": _x(pr["closed"]["delivered_per_s"], pe["closed"]["delivered_per_s"]),
        "pair_closed_p50": _x(pe["closed"]["latency"]["p50_ms"], pr["closed"]["latency"]["p50_ms"]),
        "pair_closed_p99": _x(pe["closed"]["latency"]["p99_ms"], pr["closed"]["latency"]["p99_ms"]),
        "pair_pingpong_p50": _x(pe["pingpong"]["latency"]["p50_ms"],
                                pr["pingpong"]["latency"]["p50_ms"]),
        "pair_pingpong_p99": _x(pe["pingpong"]["latency"]["p99_ms"],
                                pr["pingpong"]["latency"]["p99_ms"]),
        "room_rate": _x(rr["delivered_per_s"], re_["delivered_per_s"]),
        "room_paced_p50": _x(re_["paced"]["latency"]["p50_ms"],
                             res["room_raw_paced"]["latency"]["p50_ms"]),
        "room_paced_p99": _x(re_["paced"]["latency"]["p99_ms"],
                             res["room_raw_paced"]["latency"]["p99_ms"]),
        "room_p50": _x(re_["latency"]["p50_ms"], rr["latency"]["p50_ms"]),
        "room_p99": _x(re_["latency"]["p99_ms"], rr["latency"]["p99_ms"]),
        # The server, the shared resource, at the same offered load (the paced room).
        "room_paced_server_cpu": _x(_cpu_us(re_["paced"], "server_cpu"),
                                    _cpu_us(res["room_raw_paced"], "server_cpu")),
    }
    if "probe_e2ee" in res:
        pe2, pr2 = res["probe_e2ee"], res["probe_raw"]
        out.update({
            "probe_p50": _x(pe2["latency"]["p50_ms"], pr2["latency"]["p50_ms"]),
            "probe_p99": _x(pe2["latency"]["p99_ms"], pr2["latency"]["p99_ms"]),
            "probe_rate": _x(rr["delivered_per_s"], pr2["delivered_per_s"]),
        })
    mp = res.get("room_e2ee_mp")
    if mp:
        out.update({
            "room_mp_rate": _x(rr["delivered_per_s"], mp["delivered_per_s"]),
            "room_mp_paced_p50": _x(mp["paced"]["latency"]["p50_ms"],
                                    res["room_raw_paced"]["latency"]["p50_ms"]),
            "room_mp_paced_p99": _x(mp["paced"]["latency"]["p99_ms"],
                                    res["room_raw_paced"]["latency"]["p99_ms"]),
            "room_mp_paced_server_cpu": _x(_cpu_us(mp["paced"], "server_cpu"),
                                           _cpu_us(res["room_raw_paced"], "server_cpu")),
        })
    return out


def _cpu_us(r: dict[str, Any], key: str) -> float | None:
    """CPU microseconds per delivered message of one process (from its share of a core)."""
    rate = r.get("delivered_per_s")
    return None if not rate else r[key] / rate * 1e6


def build_report(res: dict[str, Any]) -> str:
    m = res["machine"]
    x = ratios(res)
    res["ratios"] = x
    pr, pe = res["pair_raw"], res["pair_e2ee"]
    rr, re_ = res["room_raw"], res["room_e2ee"]
    rp = res["room_raw_paced"]

    def row(what: str, mode: str, r: dict[str, Any], rate: bool = True) -> str:
        lat = r["latency"]
        cr = r.get("client_reactor_cpu")
        shown = f"{r['delivered_per_s']:,.0f}" if rate else "-"
        return (
            f"| {what} | {mode} | {shown} "
            f"| {_ms(lat['p50_ms'])} | {_ms(lat['p99_ms'])} | {_ms(lat['max_ms'])} "
            f"| {r['server_cpu']:.0%} | {r['client_cpu']:.0%}"
            f"{f' ({cr:.0%})' if cr is not None else ''} | {r['machine_busy_cores']:.2f} "
            f"({max(0.0, r['machine_busy_cores'] - r['server_cpu'] - r['client_cpu']):.2f}) |"
        )

    table = "\n".join([
        "| scenario | clients | delivered msg/s | p50 ms | p99 ms | max ms | server CPU "
        "| client process CPU (reactor thread) | machine busy, cores (other processes) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        row("DM, closed loop", "plaintext (raw JSON)", pr["closed"]),
        row("DM, closed loop", "E2EE (ShtalkClient)", pe["closed"]),
        row(f"DM, ping-pong ({res['pingpong']} msgs)", "plaintext (raw JSON)",
            pr["pingpong"], rate=False),
        row(f"DM, ping-pong ({res['pingpong']} msgs)", "E2EE (ShtalkClient)",
            pe["pingpong"], rate=False),
        row(f"room of {res['room_n']}, paced {rp['rate']:g} sends/s", "plaintext (raw JSON)",
            rp),
        row(f"room of {res['room_n']}, paced {rp['rate']:g} sends/s", "E2EE (ShtalkClient)",
            re_["paced"]),
        row(f"room of {res['room_n']}, closed loop", "plaintext (raw JSON)", rr),
        row(f"room of {res['room_n']}, closed loop", "E2EE (ShtalkClient)", re_),
    ])
    if "probe_e2ee" in res:
        pe2, pr2 = res["probe_e2ee"], res["probe_raw"]
        what = (f"room of {res['room_n']}: {res['room_n'] - 2} raw closed-loop senders + "
                "2 E2EE members")
        table += "\n" + "\n".join([
            row(what, "plaintext (raw JSON), the load", pr2),
            row(what, f"E2EE probes, {pe2['probe_rate']:g}/s (one process)", pe2),
        ])
    mp = res.get("room_e2ee_mp")
    if mp:
        procs = f"E2EE, members over {mp['procs']} client processes"
        table += "\n" + "\n".join([
            row(f"room of {res['room_n']}, paced {rp['rate']:g} sends/s", procs, mp["paced"]),
            row(f"room of {res['room_n']}, closed loop", procs, mp),
        ])
    experiment = ""
    if "pair_e2ee_nosync" in res:
        en, ern = res["pair_e2ee_nosync"], res["room_e2ee_nosync"]
        experiment = "\n".join([
            "Experiment, same run (not the product's setting): the E2EE clients' stores at "
            "`PRAGMA synchronous = NORMAL` (no fsync per commit; WAL still on):",
            "",
            "| scenario | clients | delivered msg/s | p50 ms | p99 ms | max ms | server CPU "
            "| client process CPU (reactor thread) | machine busy, cores (other processes) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            row("DM, closed loop", "E2EE, no fsync", en["closed"]),
            row(f"DM, ping-pong ({res['pingpong']} msgs)", "E2EE, no fsync", en["pingpong"],
                rate=False),
            row(f"room of {res['room_n']}, paced {rp['rate']:g} sends/s", "E2EE, no fsync",
                ern["paced"]),
            row(f"room of {res['room_n']}, closed loop", "E2EE, no fsync", ern),
            "",
            f"Ratios without the fsync: DM messages/s "
            f"{_fx(_x(pr['closed']['delivered_per_s'], en['closed']['delivered_per_s']))}, "
            f"DM ping-pong p50 "
            f"{_fx(_x(en['pingpong']['latency']['p50_ms'], pr['pingpong']['latency']['p50_ms']))}"
            f", room delivered/s {_fx(_x(rr['delivered_per_s'], ern['delivered_per_s']))}.",
            "",
        ])

    def ok(v: float | None) -> bool:
        return v is not None and v <= TARGET

    checks = [
        ("DM messages/s (baseline / E2EE)", x["pair_rate"]),
        ("DM closed-loop p50 (E2EE / baseline)", x["pair_closed_p50"]),
        ("DM closed-loop p99 (E2EE / baseline)", x["pair_closed_p99"]),
        ("DM ping-pong p50 (E2EE / baseline)", x["pair_pingpong_p50"]),
        ("DM ping-pong p99 (E2EE / baseline)", x["pair_pingpong_p99"]),
        (f"room of {res['room_n']} delivered/s (baseline / E2EE)", x["room_rate"]),
        (f"room of {res['room_n']} paced p50 (E2EE / baseline)", x["room_paced_p50"]),
        (f"room of {res['room_n']} paced p99 (E2EE / baseline)", x["room_paced_p99"]),
        (f"room of {res['room_n']} closed-loop p50 (E2EE / baseline; E2EE receivers "
         "overloaded)", x["room_p50"]),
        (f"room of {res['room_n']} closed-loop p99 (idem)", x["room_p99"]),
        (f"room of {res['room_n']} paced: server CPU per delivered message (E2EE / baseline)",
         x["room_paced_server_cpu"]),
    ]
    if "probe_e2ee" in res:
        checks += [
            ("E2EE probes through the loaded room: p50 (E2EE / raw, same window)",
             x["probe_p50"]),
            ("E2EE probes through the loaded room: p99 (E2EE / raw, same window)",
             x["probe_p99"]),
            ("room load delivered/s with 2 E2EE members (baseline room / this room)",
             x["probe_rate"]),
        ]
    if mp:
        k = mp["procs"]
        checks += [
            (f"room of {res['room_n']} over {k} processes: delivered/s (baseline / E2EE)",
             x["room_mp_rate"]),
            (f"room of {res['room_n']} over {k} processes: paced p50 (E2EE / baseline)",
             x["room_mp_paced_p50"]),
            (f"room of {res['room_n']} over {k} processes: paced p99 (E2EE / baseline)",
             x["room_mp_paced_p99"]),
            (f"room of {res['room_n']} over {k} processes: paced server CPU per delivered "
             "message (E2EE / baseline)", x["room_mp_paced_server_cpu"]),
        ]
    ratio_table = "\n".join(
        ["| E2EE cost | ratio | target <= 2x |", "|---|---:|---|"]
        + [f"| {name} | {_fx(v)} | {'met' if ok(v) else '**missed**'} |" for name, v in checks]
    )
    cpu_rows = []
    for what, r in (("DM closed loop, plaintext", pr["closed"]),
                    ("DM closed loop, E2EE", pe["closed"]),
                    (f"room of {res['room_n']}, plaintext", rr),
                    (f"room of {res['room_n']}, E2EE", re_),
                    *([(f"room of {res['room_n']}, E2EE over {mp['procs']} processes", mp)]
                      if mp else []),
                    (f"room of {res['room_n']} paced, plaintext", rp),
                    (f"room of {res['room_n']} paced, E2EE", re_["paced"]),
                    *([(f"room of {res['room_n']} paced, E2EE over {mp['procs']} processes",
                        mp["paced"])] if mp else [])):
        s, c = _cpu_us(r, "server_cpu"), _cpu_us(r, "client_cpu")
        cpu_rows.append(f"| {what} | {s:,.0f} | {c:,.0f} |" if s and c else f"| {what} | - | - |")
    cpu_table = "\n".join([
        "| CPU per delivered message | server µs | client processes µs |",
        "|---|---:|---:|",
        *cpu_rows,
    ])
    derived = ""
    per_delivery = _cpu_us(mp or re_, "client_cpu")
    if per_delivery:
        share = rr["delivered_per_s"] / res["room_n"]
        derived = (
            "Derived, not measured: the E2EE clients spent "
            f"{per_delivery:,.0f} µs of CPU per delivered room message (sending included, "
            f"{'over ' + str(mp['procs']) + ' processes' if mp else 'one process'}), so one "
            f"member with a core of its own could take {1e6 / per_delivery:,.0f} messages/s; "
            f"the plaintext room delivered {share:,.0f} messages/s to each member. "
            f"Per member, E2EE needs {share * per_delivery / 1e6:.2f} of a core at the "
            "baseline's rate (each member's store fsyncs on its own disk).\n"
        )
    missed = [name for name, v in checks if not ok(v)]
    verdict = (
        "**Target (E2EE at most 2x the plaintext baseline): met** on every figure."
        if not missed else
        f"**Target (E2EE at most 2x the plaintext baseline): missed** on {len(missed)} of "
        f"{len(checks)} figures ({'; '.join(missed)})."
    )
    return "\n".join([
        SECTION,
        "",
        "Measured by `PYTHONPATH=. .venv/bin/python -m bench.e2e"
        f"{' --quick' if res['quick'] else ''}"
        f" --write docs/PERFORMANCE.md` on {res['date']} ({m['nproc']} cores, {m['cpu']}, "
        f"Python {m['python']}, Twisted {m['twisted']}, revision {m['revision']}); "
        f"{res['warmup_s']} s warm-up, {res['duration_s']} s measured per closed-loop "
        "scenario. One server process (`twistd -n shtalk`, bcrypt cost 10 for the set-up "
        "only; no email verification or CAPTCHA; `[ratelimit]` and `[monitor]` off); "
        "each scenario's clients in ONE other "
        "process on one reactor (the \"over N client processes\" rows: the room's members "
        "spread round-robin over N processes, kept in step by barriers); all "
        "processes share the 2 cores. E2EE = `ShtalkClient` with its real `LocalStore` "
        "(SQLite, WAL, `synchronous=FULL`, one commit per message sent and per batch "
        "received, before the ack; a sent message leaves while its commit runs once a "
        "saved reserve covers it); plaintext = `bench.loadclient` raw JSON clients with "
        "200-byte envelopes. Latency: from the sender calling `send` (E2EE: before "
        "encryption; raw: before the write) to the recipient's `MessageReceived` event "
        "(E2EE: after verification and decryption, before the local commit, which the "
        "ack waits for; raw: `dataReceived`).",
        "",
        table,
        "",
        ratio_table,
        "",
        verdict,
        "",
        experiment,
        cpu_table,
        "",
        derived,
        "Set-up (not measured): the E2EE room needed "
        f"{re_.get('setup_register_s', '-')} s for {res['room_n']} key generations, "
        f"registrations and logins and {re_.get('setup_room_s', '-')} s for the room "
        f"({res['room_n'] * (res['room_n'] - 1)} PQXDH sessions, one sender key per member, "
        "and a first message from every member to all others). Messages lost: "
        f"DM {pe['closed'].get('lost', 0)}, room {re_.get('lost', 0)}.",
        "",
        "<!-- analysis -->",
        "",
    ])
