"""What the typed wire costs a client per message, against writing and reading dicts.

Run:  .venv/bin/python -m bench.wire [--quick] [--write docs/PERFORMANCE.md]

The client builds every request as a record of `shtalk.wire.requests` and reads every
push as a record of `shtalk.wire.pushes`.  The baseline, measured in the same run, is
what it did before: a dict written with ``json.dumps`` (the envelope base64-encoded by
the caller) and a push read with ``json.loads`` only.  Each figure is the best of
several batches of CPU time (``time.process_time``) with the garbage collector paused,
in microseconds per operation.  Also shown for scale: the server's ``parse_line`` of
the same ``send`` line (unchanged by the records), and the E2EE seal and open of one
200-byte message, which every one of these messages also pays.
"""

from __future__ import annotations

import base64
import gc
import json
import os
import time
from collections.abc import Callable
from typing import Any

from bench.common import report_main
from shtalk.crypto import DeviceIdentity, PreKeyBundle, Recipient, Session, seal
from shtalk.wire import frames
from shtalk.wire.pushes import parse_push
from shtalk.wire.requests import Ack, Send, Target

SECTION = "## The typed wire on the client (bench/wire)"
ENVELOPE = os.urandom(420)  # a 200-byte message sealed: header, ciphertext, signature
MESSAGE = os.urandom(200)


def best_us(op: Callable[[], object], number: int, repeat: int) -> float:
    """Microseconds of CPU per call: the least disturbed of ``repeat`` batches."""
    times = []
    for _ in range(repeat):
        gc.disable()
        start = time.process_time()
        for _ in range(number):
            op()
        times.append(time.process_time() - start)
        gc.enable()
    return min(times) / number * 1e6


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def cases() -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(what, the dict way, the typed way) for the client's per-message operations."""
    b64 = base64.b64encode
    room = {"client_id": "Zq3x9PLkT0aE4mJc", "to": {"room": "general"}}
    dm = {"client_id": "Zq3x9PLkT0aE4mJc", "to": {"user": "bob"}}
    devices = {"bob/phone": ENVELOPE, "bob/laptop": ENVELOPE, "alice/tablet": ENVELOPE}
    seqs = list(range(1000, 1200))
    push_line = frames.push(
        "message", seq=42, ts=1764091234567, to={"room": "general"},
        client_id="Zq3x9PLkT0aE4mJc", envelope=b64(ENVELOPE).decode(),
        **{"from": {"user": "alice", "device": "laptop"}})
    return [
        ("send to a room: request line",
         lambda: _dumps({"id": 7, "type": "send", **room,
                         "envelope": b64(ENVELOPE).decode("ascii")}),
         lambda: frames.request_line(7, Send(to=Target(room="general"), envelope=ENVELOPE,
                                             client_id="Zq3x9PLkT0aE4mJc"))),
        ("send to 3 devices: request line",
         lambda: _dumps({"id": 7, "type": "send", **dm, "envelopes": {
             k: b64(v).decode("ascii") for k, v in devices.items()}}),
         lambda: frames.request_line(7, Send(to=Target(user="bob"), envelopes=devices,
                                             client_id="Zq3x9PLkT0aE4mJc"))),
        ("ack of 200 seqs: request line",
         lambda: _dumps({"id": 7, "type": "ack", "seqs": seqs}),
         lambda: frames.request_line(7, Ack(seqs=tuple(seqs)))),
        ("message push: read",
         lambda: json.loads(push_line),
         lambda: parse_push(frames.read_server_line(push_line.rstrip(b"\n")) or {})),
    ]


def seal_scale(number: int, repeat: int) -> float:
    """Sealing one 200-byte message on an established session (for scale)."""
    alice, bob = DeviceIdentity.generate(), DeviceIdentity.generate()
    session = Session.initiate(alice, PreKeyBundle.from_bytes(bob.public_bundle().to_bytes()))
    to = Recipient.user("bob", "phone")

    def one() -> None:
        seal(alice, session, MESSAGE, sender_user="alice", sender_device="laptop",
             recipient=to, timestamp=1)

    return best_us(one, max(1, number // 20), repeat)


def report(quick: bool) -> str:
    number, repeat = (2000, 3) if quick else (20000, 7)
    rows = []
    for what, plain, typed in cases():
        base, ours = best_us(plain, number, repeat), best_us(typed, number, repeat)
        rows.append(f"| {what} | {base:,.1f} | {ours:,.1f} | {ours / base:.2f}x | "
                    f"{ours - base:+,.1f} |")
    send_line = frames.request_line(7, Send(to=Target(room="general"), envelope=ENVELOPE,
                                            client_id="Zq3x9PLkT0aE4mJc"))
    parse = best_us(lambda: frames.parse_line(send_line), number, repeat)
    as_record = best_us(lambda: frames.parse_line(send_line).typed(), number, repeat)
    seal_us = seal_scale(number, repeat)
    return "\n".join([
        SECTION,
        "",
        f"Measured by `.venv/bin/python -m bench.wire` on {time.strftime('%Y-%m-%d %H:%M')} "
        f"({os.cpu_count()} cores shared with other work); best of {repeat} batches of "
        f"{number}, CPU µs per operation. Baseline (same run): the dict written with "
        "`json.dumps` and the push read with `json.loads`, as the client did before the "
        "records.",
        "",
        "| per message | dict (µs) | typed record (µs) | ratio | difference (µs) |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"For scale, same run: the server's `parse_line` of that room `send` line "
        f"{parse:,.1f} µs (the same validators as before, read off the records, their "
        f"patterns now compiled once), {as_record:,.1f} µs with `Request.typed()` on top; "
        f"sealing one 200-byte message {seal_us:,.0f} µs.",
    ])


def main(argv: list[str] | None = None) -> None:
    report_main(__doc__, report, argv)


if __name__ == "__main__":
    main()
