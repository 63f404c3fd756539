"""What key rotation costs through the server, against a message in the same run.

    PYTHONPATH=. .venv/bin/python -m bench.e2e --rotation [--quick] [--write docs/PERFORMANCE.md]

One real server (`bench.e2e.start_server`) and ONE client process of real ShtalkClients
(real LocalStores, `synchronous=FULL`), on 127.0.0.1; each operation waits for the one
before it to be complete everywhere, so a window holds only that kind of work:

1. Alice and Bob: 500 DMs (``--quick``: 200), each sent once the previous one was
   received; then 200 (50) signed pre-key rotations of Bob's device (his E2EE
   clock moved a week on: rotate, commit, ``keys_count`` + ``keys_publish``, commit; then
   a grace period on: the previous pair deleted, committed, the WAL checkpointed).
2. A room of ``--room-n`` (set up as in `bench.e2e`): 100 (30) room messages from the
   members in turn, each sent once every other member received the previous one; then
   30 (10) sender-key rotations of the members in turn (`E2EE.rotate_room_key`: a new
   epoch handed out over the pairwise sessions), each waited for until every other
   member has installed it.

CPU is the server's and the client process's (which holds every client), from /proc, per
operation; amortised = the rotation's CPU / the messages between two rotations at the
defaults (`shtalk.client.rotation.RotationPolicy`: pre-keys weekly, counted against 100
DMs a week; a sender key every 100 messages).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import fingerprint, machine, record, sleep, workdir
from bench.e2e_parties import Party, Window, body, count_messages, log, setup_room
from bench.e2e_procs import run_worker, start_server

SECTION = "## Key rotation through the server (bench/e2e --rotation)"
WEEK_OF_DMS = 100  # messages a device sends and receives in a week: a light user


class Shifted:
    """An E2EE clock ``offset`` seconds ahead of the real one (the schedule reads it)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def _per_op(cpu: dict[str, float], ops: int) -> dict[str, Any]:
    """CPU microseconds per operation of the server and of the client process."""
    elapsed = cpu["elapsed_s"]
    return {
        "ops": ops,
        "elapsed_s": elapsed,
        "server_us": round(cpu["server_cpu"] * elapsed / ops * 1e6, 1),
        "client_us": round(cpu["client_cpu"] * elapsed / ops * 1e6, 1),
        "other_processes_cores": cpu.get("other_processes_cores"),
    }


async def _until(predicate: Callable[[], bool], what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await sleep(0.005)


def _at_least(counter: list[int], target: int) -> Callable[[], bool]:
    return lambda: counter[0] >= target


def _installed(others: list[Any], room: str, key: tuple[str, str], epoch: int
               ) -> Callable[[], bool]:
    """Every one of ``others`` holds the sender key ``key`` of ``epoch`` in ``room``."""
    return lambda: all(epoch in o.rooms[room].chains.get(key, {}) for o in others)


async def _dms_and_prekeys(spec: dict[str, Any]) -> dict[str, Any]:
    from shtalk.client.rotation import RotationPolicy

    alice = Party(spec, "rotalice", os.path.join(spec["home"], "rotalice"))
    bob = Party(spec, "rotbob", os.path.join(spec["home"], "rotbob"))
    await alice.register()
    await bob.register()
    received = count_messages([alice, bob])
    conv = "user:rotbob"
    # A session both ways first (not measured), as in any conversation after its start.
    await alice.client.send(conv, body(0))
    await _until(_at_least(received, 1), "the first DM")
    await bob.client.send("user:rotalice", body(0))
    await _until(_at_least(received, 2), "the answer")
    out: dict[str, Any] = {}
    n = spec["messages"]
    win = Window(spec["server_pid"])
    for i in range(n):
        await alice.client.send(conv, body(i))
        await _until(_at_least(received, 3 + i), "a DM")
    out["dm"] = _per_op(win.stop(), n)
    e2ee = bob.client.e2ee
    bob.client.key_timer.stop()  # the rotations below are the only ones
    clock = Shifted()
    e2ee.clock = clock
    policy = RotationPolicy()
    first = e2ee.ident.signed_prekey[0]
    r = spec["rotations"]
    win = Window(spec["server_pid"])
    for _ in range(r):
        clock.offset += policy.prekey_rotation
        await e2ee.maintain_keys()  # rotate, publish
        clock.offset += policy.prekey_grace
        await e2ee.maintain_keys()  # delete the previous pair, checkpoint the WAL
    out["prekeys"] = _per_op(win.stop(), r)
    if e2ee.ident.signed_prekey[0] == first or e2ee.ident.has_previous:
        raise RuntimeError("the pre-keys did not rotate")
    await alice.close()
    await bob.close()
    return out


async def _room_and_sender_keys(spec: dict[str, Any]) -> dict[str, Any]:
    room = spec["room"]
    parties, out = await setup_room(spec)
    n = len(parties)
    received = count_messages(parties)
    conv = f"room:{room}"
    m = spec["room_messages"]
    win = Window(spec["server_pid"])
    for i in range(m):
        target = received[0] + n - 1
        await parties[i % n].client.send(conv, body(i))
        await _until(_at_least(received, target), "a room message's receipts")
    out["room_message"] = _per_op(win.stop(), m)
    k = spec["room_rotations"]
    win = Window(spec["server_pid"])
    for i in range(k):
        sender = parties[i % n]
        await sender.client.e2ee.rotate_room_key(room)
        others = [p.client.e2ee for p in parties if p is not sender]
        epoch = sender.client.e2ee.rooms[room].epoch
        await _until(_installed(others, room, (sender.username, "e2e"), epoch),
                     "a new sender key at every member")
    out["sender_key"] = _per_op(win.stop(), k)
    for p in parties:
        await p.close()
    return out


async def e2ee_rotation(spec: dict[str, Any]) -> dict[str, Any]:
    """The worker's scenario (`bench.e2e` runs it in its client process)."""
    out = await _dms_and_prekeys(spec)
    log(f"rotation: DM {out['dm']}, pre-keys {out['prekeys']}")
    out.update(await _room_and_sender_keys(spec))
    log(f"rotation: room message {out['room_message']}, sender key {out['sender_key']}")
    return out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    server = start_server(work)
    try:
        fp = fingerprint(work / "e2e-data")
        spec = {
            "scenario": "e2ee_rotation", "port": server.port, "fingerprint": fp,
            "server_pid": server.pid, "home": str(work / "rotation"), "room": "rotroom",
            "users": [f"r{i:03d}" for i in range(args.room_n)], "setup_limit": 120,
            # Windows of a second or more: /proc counts CPU in 10 ms ticks.
            "messages": 200 if args.quick else 500, "rotations": 50 if args.quick else 200,
            "room_messages": 30 if args.quick else 100,
            "room_rotations": 10 if args.quick else 30,
        }
        result = run_worker(spec, 900)
    finally:
        server.stop()
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "room_n": args.room_n, "quick": args.quick, **result}


def report(res: dict[str, Any]) -> str:
    from shtalk.client.rotation import RotationPolicy

    bound = RotationPolicy().room_key_messages
    m = res["machine"]
    n = res["room_n"]

    def total(key: str) -> float:
        return float(res[key]["server_us"] + res[key]["client_us"])

    us = "{:,.0f}".format
    lines = [
        SECTION,
        "",
        f"Measured by `PYTHONPATH=. .venv/bin/python -m bench.e2e --rotation"
        f"{' --quick' if res['quick'] else ''} --write docs/PERFORMANCE.md` on {res['date']} "
        f"({m.get('nproc', '?')} cores, {m.get('cpu', '?')}, Python {m.get('python', '?')}, "
        f"revision {m.get('revision', '?')}). "
        "One server process and one client process holding every client (real LocalStores, "
        "`synchronous=FULL`); each operation waits until it is complete at every device "
        "before the next starts. CPU per operation, server and client process, from /proc.",
        "",
        "| operation | count | server CPU µs | client processes CPU µs | total µs |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, key in (
        ("DM, sent and received", "dm"),
        ("signed pre-key rotation (rotate, publish; later delete, checkpoint)", "prekeys"),
        (f"room message, {n} members, sent and received by all", "room_message"),
        (f"sender-key rotation, {n} members, installed by all", "sender_key"),
    ):
        r = res[key]
        lines.append(f"| {label} | {r['ops']} | {us(r['server_us'])} | {us(r['client_us'])} "
                     f"| {us(total(key))} |")
    lines += [
        "",
        "| rotation at the defaults | messages per rotation | amortised µs per message "
        "| one message µs | amortised / message |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, key, per, message in (
        ("signed pre-keys, weekly (counted against 100 DMs a week)", "prekeys",
         WEEK_OF_DMS, "dm"),
        (f"room sender key, every {bound} messages", "sender_key", bound, "room_message"),
    ):
        amortised = total(key) / per
        lines.append(f"| {label} | {per} | {us(amortised)} | {us(total(message))} "
                     f"| {amortised / total(message):.1%} |")
    per_member = total("sender_key") / (n - 1)
    lines += [
        "",
        "A sender-key rotation is one pairwise envelope per other member, sealed and "
        "committed by the sender, opened and committed by its receiver: "
        f"{us(per_member)} µs per member here, {per_member / total('dm'):.1f} DMs' worth; at "
        f"one rotation per {bound} room messages that is the share above of what the room's "
        "messages cost. A pre-key rotation is paid once a week per device. The core's share "
        "of both (no network, no store) is in the E2EE core section (bench/crypto).",
        "",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        with workdir("shtalk-bench-rotation-") as work:
            results = run(args, work)
    section = report(results)
    print(section)
    record(results, None if args.from_json else args.json, section, args.write, log)
