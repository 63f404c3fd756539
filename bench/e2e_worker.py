"""bench/e2e's client process (``python -m bench.e2e --worker``, its spec as JSON on
stdin): one scenario's clients on one reactor, its result as a ``RESULT {...}`` line.

Kept apart from the orchestrator (bench/e2e.py) because it runs in another process:
nothing here starts a server or writes the report.  The scenarios are built from
bench/e2e_parties.py (E2EE clients) and bench/loadproto.py (the plaintext baseline).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from bench.common import bounded, child_main, sleep
from bench.e2e_parties import (
    ClosedLoop,
    Coordinator,
    Paced,
    Party,
    Window,
    body,
    first_messages,
    hand_out_sender_keys,
    hist_state,
    log,
    measured,
    parties,
    record_latency,
    setup_room,
    until,
)
from bench.loadproto import ACK_INTERVAL, Histogram, LoadClient, Run, monotonic_ns, recorded
from shtalk.wire.requests import RoomCreate, RoomJoin

# -- raw plaintext two-party -----------------------------------------------------------


class Watched(LoadClient):
    """A LoadClient that can tell when the next message has arrived."""

    waiter: Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:
        before = self.run.total_delivered
        super().dataReceived(data)
        if self.run.total_delivered != before and self.waiter is not None:
            d, self.waiter = self.waiter, None
            d.callback(None)


def _fail(what: str) -> Any:
    raise RuntimeError(what)


async def raw_pair(spec: dict[str, Any]) -> dict[str, Any]:
    from twisted.internet import endpoints, reactor, task

    from shtalk.server.tls import client_options_pinned

    async def one(run: Run, index: int, token: str, to: str) -> Watched:
        options = client_options_pinned(spec["fingerprint"], "127.0.0.1")
        endpoint = endpoints.SSL4ClientEndpoint(  # type: ignore[no-untyped-call]
            reactor, "127.0.0.1", spec["port"], options, timeout=30
        )
        client = Watched(run, index, "unused")
        client.to = json.dumps({"user": to}, separators=(",", ":")).encode()
        await endpoints.connectProtocol(endpoint, client)
        (await client.request("hello", version=1))["ok"] or _fail("hello")
        reply = await client.request("resume", access_token=token)
        reply["ok"] or _fail(f"resume: {reply}")
        await client.backlog_d
        return client

    out: dict[str, Any] = {}
    # Closed loop: Alice keeps one send outstanding; Bob acknowledges in batches.
    run = Run(ceiling=False)
    alice = await one(run, 0, spec["tokens"][0], spec["users"][1])
    bob = await one(run, 1, spec["tokens"][1], spec["users"][0])
    acker = task.LoopingCall(bob.flush_acks)
    acker.clock = reactor  # type: ignore[assignment]
    acker.start(ACK_INTERVAL, now=False)  # as ShtalkClient acks
    run.closed_loop = run.sending = True
    alice.send_one()
    cpu = await recorded(run, spec, Window)
    run.sending = False
    await until(lambda: not alice.inflight, 5, 0.02)
    await sleep(0.1)
    out["closed"] = {
        **cpu,
        "delivered": run.delivered,
        "delivered_per_s": round(run.delivered / cpu["elapsed_s"], 1),
        "sends_per_s": round(run.sends_acked / cpu["elapsed_s"], 1),
        "latency": run.hist.summary(),
        "errors": run.errors,
        "first_error": run.first_error,
    }
    # Ping-pong: the next send once Bob has the previous message.
    run.closed_loop = False
    run.hist = Histogram()
    run.recording = True
    win = Window(spec["server_pid"])
    for _ in range(spec["pingpong"]):
        bob.waiter = Deferred()
        alice.send_one()
        await bob.waiter
    run.recording = False
    cpu = win.stop()
    out["pingpong"] = {**cpu, "latency": run.hist.summary(), "errors": run.errors}
    bob.flush_acks()
    await sleep(0.1)
    acker.stop()
    await alice.close()
    await bob.close()
    return out


# -- E2EE two-party ----------------------------------------------------------------------


async def e2ee_pair(spec: dict[str, Any]) -> dict[str, Any]:
    a_name, b_name = spec["users"]
    alice, bob = parties(spec, [a_name, b_name])
    t = time.monotonic()
    await alice.register()
    await bob.register()
    setup_s = time.monotonic() - t
    conv = f"user:{b_name}"
    state = record_latency([bob])
    state["waiter"] = None
    recorded = bob.on_message

    def got(e: Any) -> None:
        recorded(e)
        w = state["waiter"]
        if w is not None:
            state["waiter"] = None
            w.callback(None)

    bob.on_message = got
    # The first message starts the PQXDH session; not measured.
    w0: Deferred[None] = Deferred()
    state["waiter"] = w0
    await alice.client.send(conv, body(monotonic_ns()))
    await w0
    # Bob answers once, so Alice's next messages are ordinary ratchet messages (not
    # pre-key messages), as in any conversation after its first exchange.
    w1: Deferred[None] = Deferred()

    def answered(e: Any) -> None:
        if not w1.called:
            w1.callback(None)

    alice.on_message = answered
    await bob.client.send(f"user:{a_name}", "hi")
    await w1
    out: dict[str, Any] = {"setup_s": round(setup_s, 2)}

    loop = ClosedLoop([alice], conv, state, tolerate=False)
    loop.start()
    cpu = await measured(spec, state, profile=spec.get("profile"))
    await loop.stop()
    await until(lambda: state["received"] >= loop.sent + 1, 10, 0.02)
    out["closed"] = {
        **cpu,
        "delivered": state["delivered"],
        "delivered_per_s": round(state["delivered"] / cpu["elapsed_s"], 1),
        "sends_per_s": round(loop.recorded_sends / cpu["elapsed_s"], 1),
        "latency": state["hist"].summary(),
        "lost": loop.sent + 1 - state["received"],
    }
    # Ping-pong.
    state["hist"] = Histogram()
    state["recording"] = True
    win = Window(spec["server_pid"])
    for _ in range(spec["pingpong"]):
        w: Deferred[None] = Deferred()
        state["waiter"] = w
        await alice.client.send(conv, body(monotonic_ns()))
        await w
    state["recording"] = False
    cpu = win.stop()
    out["pingpong"] = {**cpu, "latency": state["hist"].summary()}
    await alice.close()
    await bob.close()
    return out


# -- E2EE room, one process ------------------------------------------------------------


async def e2ee_room(spec: dict[str, Any]) -> dict[str, Any]:
    members, out = await setup_room(spec)
    n = len(members)
    state = record_latency(members)
    conv = f"room:{spec['room']}"

    paced = Paced(members, conv, float(spec["room_rate"]))
    received0 = state["received"]
    paced.start()
    cpu = await measured(spec, state)
    paced.stop()
    await until(lambda: paced.settled and state["received"] - received0 >= paced.done * (n - 1),
                20)
    out["paced"] = {
        **cpu,
        "rate": paced.rate,
        "delivered": state["delivered"],
        "delivered_per_s": round(state["delivered"] / cpu["elapsed_s"], 1),
        "latency": state["hist"].summary(),
        "lost": paced.done * (n - 1) - (state["received"] - received0),
        "send_errors": paced.errors,
    }
    log(f"room paced {paced.rate:g} sends/s: p50 {out['paced']['latency']['p50_ms']} p99 "
        f"{out['paced']['latency']['p99_ms']} ms")
    state["hist"] = Histogram()
    state["delivered"] = 0

    received0 = state["received"]
    loop = ClosedLoop(members, conv, state)
    loop.start()
    cpu = await measured(spec, state, profile=spec.get("profile"))
    await loop.stop()
    want = loop.sent * (n - 1)
    await until(lambda: state["received"] - received0 >= want, 20)
    out.update({
        **cpu,
        "delivered": state["delivered"],
        "delivered_per_s": round(state["delivered"] / cpu["elapsed_s"], 1),
        "sends_per_s": round(loop.recorded_sends / cpu["elapsed_s"], 1),
        "latency": state["hist"].summary(),
        "expected_deliveries": want,
        "lost": want - (state["received"] - received0),
        "send_errors": loop.errors,
    })
    await bounded(10, [p.close for p in members])
    return out


# -- E2EE room spread over several processes ---------------------------------------------


async def e2ee_room_part(spec: dict[str, Any]) -> dict[str, Any]:
    """One of several client processes of one E2EE room (``--room-procs``)."""
    co = Coordinator()
    part = spec["part"]
    room, n = spec["room"], len(spec["users"])
    local = parties(spec, spec["local"])
    mine = len(local)
    await bounded(8, [p.register for p in local])
    await co.step("registered")
    if part == 0:
        await local[0].client.session.request(RoomCreate(room=room))
        for p in local[1:]:
            await p.client.session.request(RoomJoin(room=room))
    await co.step("created")
    if part != 0:
        for p in local:
            await p.client.session.request(RoomJoin(room=room))
    await co.step("joined")
    await hand_out_sender_keys(local, room, expect=n)
    await co.step("keys_sent")
    state = record_latency(local)
    conv = f"room:{room}"
    await first_messages(local, room)
    want = mine * (n - 1)
    if not await until(lambda: state["received"] >= want, spec["setup_limit"], 0.1):
        raise RuntimeError(f"room set-up: {state['received']} of {want} first messages")
    await co.step("keys_received")

    def expected(local_sent: int, total_sent: int) -> int:
        return local_sent * (mine - 1) + (total_sent - local_sent) * mine

    async def drain(received0: int, local_sent: int, name: str) -> dict[str, Any]:
        go = await co.step(f"{name}_stopped", {"sent": local_sent})
        want = expected(local_sent, int(go["total_sent"]))
        await until(lambda: state["received"] - received0 >= want, 20)
        return {"lost": want - (state["received"] - received0)}

    # Paced: this process's share of `room_rate`, round-robin over its members.
    paced = Paced(local, conv, float(spec["room_rate"]) * mine / n)
    received0 = state["received"]
    paced.start()
    cpu = await measured(spec, state)
    paced.stop()
    await until(lambda: paced.settled, float("inf"))
    out_paced = {**cpu, "delivered": state["delivered"], "hist": hist_state(state["hist"]),
                 "send_errors": paced.errors,
                 **(await drain(received0, paced.done, "paced"))}
    state["hist"] = Histogram()
    state["delivered"] = 0

    # Closed loop: every member a sender with one send outstanding.
    await co.step("closed_ready")
    received0 = state["received"]
    loop = ClosedLoop(local, conv, state)
    loop.start()
    cpu = await measured(spec, state)
    await loop.stop()
    out_closed = {**cpu, "delivered": state["delivered"], "hist": hist_state(state["hist"]),
                  "sends": loop.recorded_sends, "send_errors": loop.errors,
                  **(await drain(received0, loop.sent, "closed"))}
    await bounded(10, [p.close for p in local])
    return {"paced": out_paced, "closed": out_closed}


# -- E2EE probes through a server loaded by the plaintext room ---------------------------


async def e2ee_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Two E2EE members (a sender and a receiver, in this process) in the raw load's room.

    The room is made first with the raw accounts (`bench.loadclient.open_room`), then the
    two E2EE members join and hand out their sender keys (the raw members have no keys
    and are skipped). While the raw load runs (another process), the sender sends
    ``probe_rate`` E2EE messages per second; the receiver's latency for them is the E2EE
    figure, under the same server load as the raw clients' latency.  Both E2EE members
    also receive the raw load's messages and refuse them (not envelopes) like any client."""
    import shtalk.client.e2ee.common as e2ee_module
    from bench.loadclient import open_room
    from shtalk.client.events import BadMessage

    # The raw load clients read a send time from every room message's client_id
    # ("<anything>.<monotonic ns>"): give the E2EE messages that shape too, or they
    # cannot parse them. (The E2EE latency is measured at the E2EE receiver, from the body.)
    ids = iter(range(1 << 62))
    e2ee_module.new_client_id = lambda: f"p{next(ids)}.{monotonic_ns()}"
    co = Coordinator()
    room = spec["room"]
    sender, receiver = parties(spec, spec["users"][:2])
    await bounded(2, [sender.register, receiver.register])
    raw = await open_room({**spec, "mode": "shtalk", "n": len(spec["tokens"])},
                          Run(ceiling=False), room)
    for c in raw:
        await c.close()
    for p in (sender, receiver):
        await p.client.session.request(RoomJoin(room=room))
    members = [m["user"] for m in await sender.client.members(room)]
    for p in (sender, receiver):
        await p.client.e2ee.joined_room(room, members)
    state: dict[str, Any] = {"hist": Histogram(), "recording": False, "got": 0,
                             "delivered": 0, "refused": 0, "waiter": None}

    def got(e: Any) -> None:
        now = monotonic_ns()
        state["got"] += 1
        if state["recording"]:
            state["delivered"] += 1
            state["hist"].add(now - int(e.body.split("|", 1)[0]), now)
        w, state["waiter"] = state["waiter"], None
        if w is not None:
            w.callback(None)

    receiver.on_message = got
    real_emit = receiver.client.e2ee.emit

    def emit(event: Any) -> None:
        if isinstance(event, BadMessage):
            state["refused"] += 1
        real_emit(event)

    receiver.client.e2ee.emit = emit
    conv = f"room:{room}"
    w0: Deferred[None] = Deferred()
    state["waiter"] = w0
    await sender.client.send(conv, body(monotonic_ns()))
    await w0  # the sender key reached the receiver
    go = await co.step("ready", {"members": len(members)})
    # The raw load starts now (its own set-up, then its warm-up and window): wait for its
    # messages, then measure within its window.
    await until(lambda: state["refused"] >= 100, 60)
    await sleep(float(go.get("delay", spec["warmup"])))
    probes = Paced([sender], conv, float(spec["probe_rate"]))
    refused0 = state["refused"]
    win = Window(spec["server_pid"])
    state["hist"].t0 = monotonic_ns()
    state["recording"] = True
    probes.start()
    await sleep(spec["window"])
    probes.stop()
    state["recording"] = False
    cpu = win.stop()
    refused = state["refused"] - refused0
    await until(lambda: state["got"] >= probes.issued + 1, 20)
    await bounded(2, [sender.close, receiver.close])
    return {
        **cpu,
        "probe_rate": probes.rate,
        "delivered": state["delivered"],
        "delivered_per_s": round(state["delivered"] / cpu["elapsed_s"], 1),
        "raw_refused_per_s": round(refused / cpu["elapsed_s"], 1),
        "latency": state["hist"].summary(),
        "lost": probes.issued + 1 - state["got"],
        "send_errors": probes.errors,
    }


async def e2ee_rotation(spec: dict[str, Any]) -> dict[str, Any]:
    from bench.e2e_rotation import e2ee_rotation as scenario

    return await scenario(spec)


SCENARIOS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "e2ee_rotation": e2ee_rotation,
    "raw_pair": raw_pair,
    "e2ee_pair": e2ee_pair,
    "e2ee_room": e2ee_room,
    "e2ee_room_part": e2ee_room_part,
    "e2ee_probe": e2ee_probe,
}


def client_pragma_experiment(pragmas: list[str]) -> None:
    """An experiment (not the product's setting): the E2EE clients' stores run these
    ``PRAGMA``s after their own set-up, e.g. ``synchronous = NORMAL`` (no fsync per
    commit) to show how much of the E2EE cost is the durable local commit."""
    from shtalk.client import localschema

    original = localschema.setup_connection

    def setup(conn: Any) -> None:
        original(conn)
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")

    localschema.setup_connection = setup


def worker() -> None:
    spec = json.loads(sys.stdin.readline())  # the first line (more may follow: GO lines)
    pragmas = list(spec.get("client_pragmas", []))
    if spec.get("client_sync"):
        pragmas.append(f"synchronous = {spec['client_sync']}")
    if pragmas:
        client_pragma_experiment(pragmas)
    ok = child_main(spec, SCENARIOS)
    # Do not wait for adbapi threads of an aborted run.
    os._exit(0 if ok else 1)


__all__ = ["SCENARIOS", "Party", "worker"]
