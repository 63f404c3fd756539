"""End-to-end encryption through the server: real ShtalkClients against plaintext clients.

    PYTHONPATH=. .venv/bin/python -m bench.e2e [--quick] [--json FILE] [--write docs/PERFORMANCE.md]

(``--rotation`` runs the key-rotation measurement instead: bench/e2e_rotation.py.)

What it does (everything on 127.0.0.1, bounded in time, stops by itself, removes its
server and temporary directories):

1. Starts ONE real server (``twistd -n shtalk``, `bench.fanout.start_shtalk`: fresh data
   directory, ``max_connections_per_address = 1000``, ``bcrypt_cost = 10``; the rate
   limits and the abuse monitor off: they would throttle exactly this load).
2. Two parties, a direct message from Alice to Bob:
   * baseline: two raw JSON clients (`bench.loadclient.LoadClient`) sending plaintext
     200-byte envelopes to ``{"user": bob}``;
   * E2EE: two `ShtalkClient`s (real LocalStore, Argon2id cheap for set-up only, PQXDH
     session, Double Ratchet, ECDSA-signed envelopes, SQLite commit per message).
   Each in two variants: *closed loop* (Alice sends the next message as soon as the
   previous ``send`` completes: the server's ``ok`` for raw, ``ShtalkClient.send`` returning
   for E2EE) for messages/s and latency under load, and *ping-pong* (the next message only
   after Bob received the previous one) for the unloaded latency.
3. A room of 50: the baseline is `bench.loadclient`'s ``fanout`` scenario (50 raw clients,
   every one a closed-loop sender, one send outstanding each); E2EE is 50 ShtalkClients in
   one room (Sender Keys), every one a closed-loop sender. Delivered messages/s = every
   message received by any member, summed.
4. The same E2EE room with its members spread round-robin over ``--room-procs`` client
   processes (default 4), kept in step by barriers (``STEP``/``GO`` lines on the workers'
   stdout/stdin): removes the one-process GIL limit, not the 2 cores' limit.
5. E2EE probes through the loaded server (``--probe-rate``, default 20/s): two E2EE
   members (one process) in the room of 48 raw closed-loop senders; the E2EE receiver's
   latency against the raw clients' latency in the same window, i.e. what E2EE adds when
   the server, the shared resource, carries the baseline's load.
6. Prints the table, the ratios (baseline rate / E2EE rate, E2EE latency / baseline
   latency; target <= 2x) and the CPU split, writes ``--json`` and, with ``--write``, the
   section "End-to-end encryption through the server (bench/e2e)" of docs/PERFORMANCE.md.

Latency is send -> receipt, one machine, one monotonic clock: for E2EE from Alice calling
``send`` (before encryption) to Bob's ``MessageReceived`` event (after verification and
decryption; the local commit runs after it, the ack after the commit); for the baseline
from just before the raw client's ``write`` to the recipient's ``dataReceived``.

Processes: the server (one process; reactor thread + SQLite writer + bcrypt threads) and,
for each scenario, ONE fresh client process holding every client of that scenario on one
Twisted reactor (the E2EE clients' SQLite stores each have their own adbapi thread). The
machine has 2 cores shared by both processes; the CPU of each (and of the client process's
reactor thread alone) is measured from /proc over the measured window.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from shtalk.client.client import ACK_DELAY as ACK_INTERVAL
from shtalk.wire.requests import RoomCreate, RoomJoin

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "PERFORMANCE.md"
SECTION = "## End-to-end encryption through the server (bench/e2e)"
TARGET = 2.0
BODY_BYTES = 200
ROOM_N = 50


def log(msg: str) -> None:
    sys.stderr.write(f"[e2e {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


# =====================================================================================
# The client process (python -m bench.e2e --worker, spec as JSON on stdin)
# =====================================================================================


def _thread_cpu(tid: int) -> float:
    from bench.loadclient import cpu_seconds_of

    return cpu_seconds_of(os.getpid(), tid)


class Window:
    """CPU of the server, of this process and of its reactor thread over a window."""

    def __init__(self, server_pid: int) -> None:
        from bench.loadclient import CpuWindow

        self.cpu = CpuWindow(server_pid)
        self.tid = threading.get_native_id()
        self.reactor0 = _thread_cpu(self.tid)

    def stop(self) -> dict[str, float]:
        out = self.cpu.stop()
        out["client_reactor_cpu"] = round(
            (_thread_cpu(self.tid) - self.reactor0) / out["elapsed_s"], 3
        )
        out["client_cpu"] = out.pop("loadgen_cpu")
        return out


def _sleep(seconds: float) -> Any:
    from bench.loadclient import sleep

    return sleep(seconds)


def _body(t0: int) -> str:
    head = f"{t0}|"
    return head + "x" * (BODY_BYTES - len(head))


# -- raw plaintext two-party -----------------------------------------------------------


async def _raw_pair(spec: dict[str, Any]) -> dict[str, Any]:
    from twisted.internet import endpoints, reactor, task
    from twisted.internet.defer import Deferred

    from bench.loadclient import Histogram, LoadClient, Run, monotonic_ns
    from shtalk.server.tls import client_options_pinned

    class Watched(LoadClient):
        """A LoadClient that can tell when the next message has arrived."""

        waiter: Deferred[None] | None = None

        def dataReceived(self, data: bytes) -> None:
            before = self.run.total_delivered
            super().dataReceived(data)
            if self.run.total_delivered != before and self.waiter is not None:
                d, self.waiter = self.waiter, None
                d.callback(None)

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
    await _sleep(spec["warmup"])
    win = Window(spec["server_pid"])
    run.hist.t0 = monotonic_ns()
    run.recording = True
    await _sleep(spec["duration"])
    run.recording = False
    cpu = win.stop()
    run.sending = False
    deadline = time.monotonic() + 5
    while alice.inflight and time.monotonic() < deadline:
        await _sleep(0.02)
    await _sleep(0.1)
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
    await _sleep(0.1)
    acker.stop()
    await alice.close()
    await bob.close()
    return out


def _fail(what: str) -> Any:
    raise RuntimeError(what)


# -- E2EE clients ----------------------------------------------------------------------


class Party:
    """One ShtalkClient (like tests/clientkit.Person) with a latency hook."""

    def __init__(self, spec: dict[str, Any], username: str, home: str) -> None:
        self.spec = spec
        self.username = username
        self.home = home
        self.client: Any = None
        self.store: Any = None
        self.on_message: Callable[[Any], None] = lambda event: None

    async def register(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.defer import succeed

        from shtalk.client.client import ShtalkClient
        from shtalk.client.events import MessageReceived
        from shtalk.client.knownhosts import KnownHosts
        from shtalk.client.localstore import KdfParams, LocalStore
        from shtalk.client.session import Credentials

        os.makedirs(self.home, exist_ok=True)
        kh = KnownHosts(os.path.join(self.home, "known_hosts"))
        kh.remember("127.0.0.1", self.spec["port"], self.spec["fingerprint"])
        # Argon2id is only paid when the store is opened, never per message: cheap here.
        self.store = await LocalStore.create(
            os.path.join(self.home, "local.sqlite3"), "bench passphrase", reactor,
            kdf=KdfParams(memory_kib=8192, iterations=1, lanes=1),
        )

        def event(e: Any) -> None:
            if isinstance(e, MessageReceived):
                self.on_message(e)

        self.client = ShtalkClient(
            reactor, self.store, "127.0.0.1", self.spec["port"], kh,
            Credentials(self.username, "e2e", "bench"),
            confirm_fingerprint=lambda fp: succeed(False),
            ask_password=lambda: succeed(PASSWORD),
            on_event=event,
        )
        await self.client.register(PASSWORD, f"{self.username}@bench.invalid")
        await self.client.login(PASSWORD)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.store is not None:
            await self.store.close()


PASSWORD = "bench-tangerine-quokka-43"


async def _bounded(n: int, jobs: list[Callable[[], Any]]) -> list[Any]:
    from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults

    sem = DeferredSemaphore(n)

    def start(job: Callable[[], Any]) -> Deferred[Any]:
        return Deferred.fromCoroutine(job())

    return await gatherResults([sem.run(start, j) for j in jobs], consumeErrors=True)


async def _e2ee_pair(spec: dict[str, Any]) -> dict[str, Any]:
    from twisted.internet.defer import Deferred

    from bench.loadclient import Histogram, monotonic_ns

    a_name, b_name = spec["users"]
    alice = Party(spec, a_name, os.path.join(spec["home"], a_name))
    bob = Party(spec, b_name, os.path.join(spec["home"], b_name))
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
    await alice.client.send(conv, _body(monotonic_ns()))
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

    # Closed loop.
    sending = {"on": True, "sent": 0, "recorded_sends": 0}

    async def sender() -> None:
        while sending["on"]:
            await alice.client.send(conv, _body(monotonic_ns()))
            sending["sent"] += 1
            if state["recording"]:
                sending["recorded_sends"] += 1

    loop = Deferred.fromCoroutine(sender())
    await _sleep(spec["warmup"])
    win = Window(spec["server_pid"])
    state["hist"].t0 = monotonic_ns()
    state["recording"] = True
    await _sleep(spec["duration"])
    state["recording"] = False
    cpu = win.stop()
    sending["on"] = False
    await loop
    deadline = time.monotonic() + 10
    while state["received"] < sending["sent"] + 1 and time.monotonic() < deadline:
        await _sleep(0.02)
    out["closed"] = {
        **cpu,
        "delivered": state["delivered"],
        "delivered_per_s": round(state["delivered"] / cpu["elapsed_s"], 1),
        "sends_per_s": round(sending["recorded_sends"] / cpu["elapsed_s"], 1),
        "latency": state["hist"].summary(),
        "lost": sending["sent"] + 1 - state["received"],
    }
    # Ping-pong.
    state["hist"] = Histogram()
    state["recording"] = True
    win = Window(spec["server_pid"])
    for _ in range(spec["pingpong"]):
        w: Deferred[None] = Deferred()
        state["waiter"] = w
        await alice.client.send(conv, _body(monotonic_ns()))
        await w
    state["recording"] = False
    cpu = win.stop()
    out["pingpong"] = {**cpu, "latency": state["hist"].summary()}
    await alice.close()
    await bob.close()
    return out


def count_messages(parties: list[Party]) -> list[int]:
    """From now on ``[0]`` of the result counts the messages the parties receive."""
    received = [0]

    def got(e: Any) -> None:
        received[0] += 1

    for p in parties:
        p.on_message = got
    return received


def record_latency(parties: list[Party]) -> dict[str, Any]:
    """Count what the parties receive and, while ``recording`` is true, each message's
    latency (send time in its body) into ``hist`` and ``delivered``."""
    from bench.loadclient import Histogram, monotonic_ns

    state: dict[str, Any] = {"hist": Histogram(), "recording": False, "delivered": 0,
                             "received": 0}

    def got(e: Any) -> None:
        now = monotonic_ns()
        state["received"] += 1
        if state["recording"]:
            state["delivered"] += 1
            state["hist"].add(now - int(e.body.split("|", 1)[0]), now)

    for p in parties:
        p.on_message = got
    return state


async def setup_room(spec: dict[str, Any]) -> tuple[list[Party], dict[str, Any]]:
    """``spec["users"]`` registered, logged in and in ``spec["room"]``, every member
    holding every other member's sender key (one first message from each has reached
    all others); returns the parties and the set-up times."""
    from twisted.internet.defer import Deferred, gatherResults

    from bench.loadclient import monotonic_ns

    names = spec["users"]
    room = spec["room"]
    n = len(names)
    parties = [Party(spec, u, os.path.join(spec["home"], u)) for u in names]
    out: dict[str, Any] = {"n": n}
    t = time.monotonic()
    await _bounded(8, [p.register for p in parties])
    out["setup_register_s"] = round(time.monotonic() - t, 2)
    log(f"room: {n} clients registered and logged in ({out['setup_register_s']} s)")
    # Membership straight through the server (no rotation per join: nobody has a room
    # session yet), then one sender key per member, handed to the 49 others pairwise.
    t = time.monotonic()
    await parties[0].client.session.request(RoomCreate(room=room))
    for p in parties[1:]:
        await p.client.session.request(RoomJoin(room=room))
    members = [m["user"] for m in await parties[0].client.members(room)]
    await _sleep(0.5)
    def joiner(p: Party) -> Callable[[], Any]:
        return lambda: p.client.e2ee.joined_room(room, members)

    await _bounded(n, [joiner(p) for p in parties])
    # Everyone has every sender key when one message from each member reaches all others.
    expected = n * (n - 1)
    received = count_messages(parties)
    conv = f"room:{room}"
    await gatherResults([
        Deferred.fromCoroutine(p.client.send(conv, _body(monotonic_ns()))) for p in parties
    ])
    deadline = time.monotonic() + spec["setup_limit"]
    while received[0] < expected and time.monotonic() < deadline:
        await _sleep(0.1)
    if received[0] < expected:
        raise RuntimeError(
            f"room set-up: only {received[0]} of {expected} first messages arrived"
        )
    out["setup_room_s"] = round(time.monotonic() - t, 2)
    log(f"room: sender keys distributed, {expected} first messages delivered "
        f"({out['setup_room_s']} s)")
    return parties, out


async def _e2ee_room(spec: dict[str, Any]) -> dict[str, Any]:
    from twisted.internet.defer import Deferred, gatherResults

    from bench.loadclient import Histogram, monotonic_ns

    room = spec["room"]
    parties, out = await setup_room(spec)
    n = len(parties)
    state = record_latency(parties)
    conv = f"room:{room}"

    # Paced: `room_rate` sends/s in total, round-robin over the members, from a 1 ms timer
    # (like bench.loadclient's open loop), for the latency at a load both sides sustain.
    from twisted.internet import reactor, task

    paced = {"issued": 0, "errors": 0, "done": 0}
    rate = float(spec["room_rate"])

    def sent_one(_: Any) -> None:
        paced["done"] += 1

    def send_failed(_: Any) -> None:
        paced["errors"] += 1

    start_ns = monotonic_ns()

    def tick() -> None:
        due = int((monotonic_ns() - start_ns) * rate / 1e9) + 1 - paced["issued"]
        for k in range(paced["issued"], paced["issued"] + max(0, due)):
            d = Deferred.fromCoroutine(
                parties[k % n].client.send(conv, _body(monotonic_ns())))
            d.addCallbacks(sent_one, send_failed)
        paced["issued"] += max(0, due)

    pacer = task.LoopingCall(tick)
    pacer.clock = reactor  # type: ignore[assignment]
    received0 = state["received"]
    pacer.start(0.001, now=True)
    await _sleep(spec["warmup"])
    win = Window(spec["server_pid"])
    state["hist"].t0 = monotonic_ns()
    state["recording"] = True
    await _sleep(spec["duration"])
    state["recording"] = False
    cpu = win.stop()
    pacer.stop()
    deadline = time.monotonic() + 20
    while (paced["done"] + paced["errors"] < paced["issued"]
           or state["received"] - received0 < paced["done"] * (n - 1)):
        if time.monotonic() > deadline:
            break
        await _sleep(0.05)
    out["paced"] = {
        **cpu,
        "rate": rate,
        "delivered": state["delivered"],
        "delivered_per_s": round(state["delivered"] / cpu["elapsed_s"], 1),
        "latency": state["hist"].summary(),
        "lost": paced["done"] * (n - 1) - (state["received"] - received0),
        "send_errors": paced["errors"],
    }
    log(f"room paced {rate:g} sends/s: p50 {out['paced']['latency']['p50_ms']} p99 "
        f"{out['paced']['latency']['p99_ms']} ms")
    state["hist"] = Histogram()
    state["delivered"] = 0

    sending = {"on": True, "sent": 0, "recorded_sends": 0, "errors": 0}

    async def sender(p: Party) -> None:
        while sending["on"]:
            try:
                await p.client.send(conv, _body(monotonic_ns()))
            except Exception:
                sending["errors"] += 1
                await _sleep(0.1)
                continue
            sending["sent"] += 1
            if state["recording"]:
                sending["recorded_sends"] += 1

    received0 = state["received"]
    loops = [Deferred.fromCoroutine(sender(p)) for p in parties]
    await _sleep(spec["warmup"])
    win = Window(spec["server_pid"])
    state["hist"].t0 = monotonic_ns()
    state["recording"] = True
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    await _sleep(spec["duration"])
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(spec["profile"])
    state["recording"] = False
    cpu = win.stop()
    sending["on"] = False
    await gatherResults(loops)
    deadline = time.monotonic() + 20
    want = sending["sent"] * (n - 1)
    while state["received"] - received0 < want and time.monotonic() < deadline:
        await _sleep(0.05)
    out.update({
        **cpu,
        "delivered": state["delivered"],
        "delivered_per_s": round(state["delivered"] / cpu["elapsed_s"], 1),
        "sends_per_s": round(sending["recorded_sends"] / cpu["elapsed_s"], 1),
        "latency": state["hist"].summary(),
        "expected_deliveries": want,
        "lost": want - (state["received"] - received0),
        "send_errors": sending["errors"],
    })
    await _bounded(10, [p.close for p in parties])
    return out


# -- E2EE room spread over several processes ---------------------------------------------


class Coordinator:
    """Barriers with the orchestrator: ``STEP name {json}`` out, ``GO {json}`` back in."""

    def __init__(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred

        self.waiter: Deferred[dict[str, Any]] | None = None
        r = cast(Any, reactor)

        def reader() -> None:
            for line in sys.stdin:
                if line.startswith("GO "):
                    r.callFromThread(self._go, json.loads(line[3:]))

        threading.Thread(target=reader, daemon=True).start()

    def _go(self, data: dict[str, Any]) -> None:
        w, self.waiter = self.waiter, None
        if w is not None:
            w.callback(data)

    def step(self, name: str, data: dict[str, Any] | None = None) -> Any:
        from twisted.internet.defer import Deferred

        self.waiter = Deferred()
        sys.stdout.write(f"STEP {name} {json.dumps(data or {})}\n")
        sys.stdout.flush()
        return self.waiter


def _hist_state(h: Any) -> dict[str, Any]:
    return {"n": h.n, "max_ns": h.max_ns,
            "counts": {str(b): c for b, c in enumerate(h.counts) if c}}


async def _e2ee_room_part(spec: dict[str, Any]) -> dict[str, Any]:
    """One of several client processes of one E2EE room (``--room-procs``)."""
    from twisted.internet import reactor, task
    from twisted.internet.defer import Deferred, gatherResults

    from bench.loadclient import Histogram, monotonic_ns

    co = Coordinator()
    part = spec["part"]
    room, n = spec["room"], len(spec["users"])
    local = [Party(spec, u, os.path.join(spec["home"], u)) for u in spec["local"]]
    mine = len(local)
    await _bounded(8, [p.register for p in local])
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
    members = [m["user"] for m in await local[0].client.members(room)]
    if len(members) != n:
        raise RuntimeError(f"room has {len(members)} members, not {n}")
    await _sleep(0.5)

    def joiner(p: Party) -> Callable[[], Any]:
        return lambda: p.client.e2ee.joined_room(room, members)

    await _bounded(mine, [joiner(p) for p in local])
    await co.step("keys_sent")
    state = record_latency(local)
    conv = f"room:{room}"
    await gatherResults([
        Deferred.fromCoroutine(p.client.send(conv, _body(monotonic_ns()))) for p in local
    ])
    want = mine * (n - 1)
    deadline = time.monotonic() + spec["setup_limit"]
    while state["received"] < want and time.monotonic() < deadline:
        await _sleep(0.1)
    if state["received"] < want:
        raise RuntimeError(f"room set-up: {state['received']} of {want} first messages")
    await co.step("keys_received")

    def expected(local_sent: int, total_sent: int) -> int:
        return local_sent * (mine - 1) + (total_sent - local_sent) * mine

    async def drain(received0: int, local_sent: int, name: str) -> dict[str, Any]:
        go = await co.step(f"{name}_stopped", {"sent": local_sent})
        want = expected(local_sent, int(go["total_sent"]))
        deadline = time.monotonic() + 20
        while state["received"] - received0 < want and time.monotonic() < deadline:
            await _sleep(0.05)
        return {"lost": want - (state["received"] - received0)}

    # Paced: this process's share of `room_rate`, round-robin over its members.
    rate = float(spec["room_rate"]) * mine / n
    paced = {"issued": 0, "done": 0, "errors": 0}

    def sent_one(_: Any) -> None:
        paced["done"] += 1

    def send_failed(_: Any) -> None:
        paced["errors"] += 1

    start_ns = monotonic_ns()

    def tick() -> None:
        due = int((monotonic_ns() - start_ns) * rate / 1e9) + 1 - paced["issued"]
        for k in range(paced["issued"], paced["issued"] + max(0, due)):
            d = Deferred.fromCoroutine(local[k % mine].client.send(conv, _body(monotonic_ns())))
            d.addCallbacks(sent_one, send_failed)
        paced["issued"] += max(0, due)

    pacer = task.LoopingCall(tick)
    pacer.clock = reactor  # type: ignore[assignment]
    received0 = state["received"]
    pacer.start(0.001, now=True)
    await _sleep(spec["warmup"])
    win = Window(spec["server_pid"])
    state["hist"].t0 = monotonic_ns()
    state["recording"] = True
    await _sleep(spec["duration"])
    state["recording"] = False
    cpu = win.stop()
    pacer.stop()
    while paced["done"] + paced["errors"] < paced["issued"]:
        await _sleep(0.05)
    out_paced = {**cpu, "delivered": state["delivered"], "hist": _hist_state(state["hist"]),
                 "send_errors": paced["errors"],
                 **(await drain(received0, paced["done"], "paced"))}
    state["hist"] = Histogram()
    state["delivered"] = 0

    # Closed loop: every member a sender with one send outstanding.
    sending = {"on": True, "sent": 0, "recorded_sends": 0, "errors": 0}

    async def sender(p: Party) -> None:
        while sending["on"]:
            try:
                await p.client.send(conv, _body(monotonic_ns()))
            except Exception:
                sending["errors"] += 1
                await _sleep(0.1)
                continue
            sending["sent"] += 1
            if state["recording"]:
                sending["recorded_sends"] += 1

    await co.step("closed_ready")
    received0 = state["received"]
    loops = [Deferred.fromCoroutine(sender(p)) for p in local]
    await _sleep(spec["warmup"])
    win = Window(spec["server_pid"])
    state["hist"].t0 = monotonic_ns()
    state["recording"] = True
    await _sleep(spec["duration"])
    state["recording"] = False
    cpu = win.stop()
    sending["on"] = False
    await gatherResults(loops)
    out_closed = {**cpu, "delivered": state["delivered"], "hist": _hist_state(state["hist"]),
                  "sends": sending["recorded_sends"], "send_errors": sending["errors"],
                  **(await drain(received0, sending["sent"], "closed"))}
    await _bounded(10, [p.close for p in local])
    return {"paced": out_paced, "closed": out_closed}


# -- E2EE probes through a server loaded by the plaintext room ---------------------------


async def _e2ee_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Two E2EE members (a sender and a receiver, in this process) in the raw load's room.

    The room is made first with the raw accounts (`bench.loadclient.open_room`), then the
    two E2EE members join and hand out their sender keys (the raw members have no keys
    and are skipped). While the raw load runs (another process), the sender sends
    ``probe_rate`` E2EE messages per second; the receiver's latency for them is the E2EE
    figure, under the same server load as the raw clients' latency.  Both E2EE members
    also receive the raw load's messages and refuse them (not envelopes) like any client."""
    from twisted.internet import reactor, task
    from twisted.internet.defer import Deferred

    import shtalk.client.e2ee.common as e2ee_module
    from bench.loadclient import Histogram, Run, monotonic_ns, open_room
    from shtalk.client.events import BadMessage

    # The raw load clients read a send time from every room message's client_id
    # ("<anything>.<monotonic ns>"): give the E2EE messages that shape too, or they
    # cannot parse them. (The E2EE latency is measured at the E2EE receiver, from the body.)
    ids = iter(range(1 << 62))
    e2ee_module.new_client_id = lambda: f"p{next(ids)}.{monotonic_ns()}"
    co = Coordinator()
    room = spec["room"]
    sender = Party(spec, spec["users"][0], os.path.join(spec["home"], spec["users"][0]))
    receiver = Party(spec, spec["users"][1], os.path.join(spec["home"], spec["users"][1]))
    await _bounded(2, [sender.register, receiver.register])
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
                             "delivered": 0, "refused": 0, "waiter": None, "errors": 0}

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
    await sender.client.send(conv, _body(monotonic_ns()))
    await w0  # the sender key reached the receiver
    go = await co.step("ready", {"members": len(members)})
    # The raw load starts now (its own set-up, then its warm-up and window): wait for its
    # messages, then measure within its window.
    deadline = time.monotonic() + 60
    while state["refused"] < 100 and time.monotonic() < deadline:
        await _sleep(0.05)
    await _sleep(float(go.get("delay", spec["warmup"])))
    rate = float(spec["probe_rate"])
    issued = {"n": 0}
    start_ns = monotonic_ns()

    def tick() -> None:
        due = int((monotonic_ns() - start_ns) * rate / 1e9) + 1 - issued["n"]
        for _ in range(max(0, due)):
            d = Deferred.fromCoroutine(sender.client.send(conv, _body(monotonic_ns())))
            d.addErrback(lambda _: state.__setitem__("errors", state["errors"] + 1))
        issued["n"] += max(0, due)

    pacer = task.LoopingCall(tick)
    pacer.clock = reactor  # type: ignore[assignment]
    refused0 = state["refused"]
    win = Window(spec["server_pid"])
    state["hist"].t0 = monotonic_ns()
    state["recording"] = True
    pacer.start(0.001, now=True)
    await _sleep(spec["window"])
    pacer.stop()
    state["recording"] = False
    cpu = win.stop()
    refused = state["refused"] - refused0
    deadline = time.monotonic() + 20
    while state["got"] < issued["n"] + 1 and time.monotonic() < deadline:
        await _sleep(0.05)
    await _bounded(2, [sender.close, receiver.close])
    return {
        **cpu,
        "probe_rate": rate,
        "delivered": state["delivered"],
        "delivered_per_s": round(state["delivered"] / cpu["elapsed_s"], 1),
        "raw_refused_per_s": round(refused / cpu["elapsed_s"], 1),
        "latency": state["hist"].summary(),
        "lost": issued["n"] + 1 - state["got"],
        "send_errors": state["errors"],
    }


async def _e2ee_rotation(spec: dict[str, Any]) -> dict[str, Any]:
    from bench.e2e_rotation import e2ee_rotation

    return await e2ee_rotation(spec)


SCENARIOS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "e2ee_rotation": _e2ee_rotation,
    "raw_pair": _raw_pair,
    "e2ee_pair": _e2ee_pair,
    "e2ee_room": _e2ee_room,
    "e2ee_room_part": _e2ee_room_part,
    "e2ee_probe": _e2ee_probe,
}


def client_sync_experiment(mode: str) -> None:
    """An experiment (not the product's setting): the E2EE clients' stores commit with
    ``PRAGMA synchronous = <mode>`` instead of FULL, i.e. without an fsync per commit, to
    show how much of the E2EE cost is the durable local commit."""
    from shtalk.client import localschema

    original = localschema.setup_connection

    def setup(conn: Any) -> None:
        original(conn)
        conn.execute(f"PRAGMA synchronous = {mode}")

    localschema.setup_connection = setup


def worker() -> None:
    spec = json.loads(sys.stdin.readline())  # the first line (more may follow: GO lines)
    if spec.get("client_sync"):
        client_sync_experiment(spec["client_sync"])
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    r = cast(Any, reactor)
    outcome: dict[str, Any] = {}

    def done(result: Any) -> None:
        outcome["result"] = result

    def failed(failure: Failure) -> None:
        failure.printTraceback(file=sys.stderr)
        outcome["error"] = failure.getErrorMessage()

    def start() -> None:
        d = Deferred.fromCoroutine(SCENARIOS[spec["scenario"]](spec))
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: r.stop())

    def overrun() -> None:
        failed(Failure(TimeoutError("time limit")))
        r.stop()

    limit = r.callLater(float(spec["time_limit"]), overrun)
    r.callWhenRunning(start)
    r.run()
    if limit.active():
        limit.cancel()
    sys.stdout.write("RESULT " + json.dumps(outcome) + "\n")
    sys.stdout.flush()
    # Do not wait for adbapi threads of an aborted run.
    os._exit(0 if "result" in outcome else 1)


# =====================================================================================
# The orchestrator
# =====================================================================================


class BenchError(Exception):
    pass


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    spec = dict(spec, time_limit=timeout)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.e2e", "--worker"], input=json.dumps(spec).encode(),
            stdout=subprocess.PIPE, stderr=None, env=env, cwd=str(REPO), timeout=timeout + 30,
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"client process ({spec['scenario']}) overran its time limit") from e
    for line in proc.stdout.decode().splitlines():
        if line.startswith("RESULT "):
            outcome = json.loads(line[7:])
            if "result" in outcome:
                return cast(dict[str, Any], outcome["result"])
            raise BenchError(f"client process ({spec['scenario']}) failed: {outcome}")
    raise BenchError(f"client process ({spec['scenario']}) exited {proc.returncode}")


def _read_step(p: subprocess.Popen[str]) -> tuple[str, dict[str, Any]]:
    """The next ``STEP name {json}`` (or ``RESULT {json}``) line of a client process."""
    assert p.stdout is not None
    while True:
        line = p.stdout.readline()
        if not line:
            raise BenchError(f"client process {p.pid} exited {p.wait()}")
        if line.startswith("STEP "):
            name, _, data = line[5:].partition(" ")
            return name, json.loads(data)
        if line.startswith("RESULT "):
            return "RESULT", json.loads(line[7:])


def _spawn_worker(spec: dict[str, Any]) -> subprocess.Popen[str]:
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.e2e", "--worker"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=None, env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=str(REPO), text=True,
    )
    assert p.stdin is not None
    p.stdin.write(json.dumps(spec) + "\n")
    p.stdin.flush()
    return p


def _go(p: subprocess.Popen[str], data: dict[str, Any]) -> None:
    assert p.stdin is not None
    p.stdin.write("GO " + json.dumps(data) + "\n")
    p.stdin.flush()


def run_probe(spec: dict[str, Any], load_spec: dict[str, Any], timeout: float
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """E2EE probes (one client process) through the raw room load (another process)."""
    from bench import fanout

    p = _spawn_worker({**spec, "scenario": "e2ee_probe", "time_limit": timeout})
    try:
        step, data = _read_step(p)
        if step != "ready":
            raise BenchError(f"probe process: {data}")
        raw: dict[str, Any] = {}

        def load() -> None:
            try:
                raw["result"] = fanout.load(load_spec, timeout=timeout)
            except Exception as e:
                raw["error"] = e

        t = threading.Thread(target=load)
        t.start()
        _go(p, {"delay": spec["warmup"]})
        step, outcome = _read_step(p)
        t.join()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if "error" in raw:
        raise BenchError(f"raw load with the probes failed: {raw['error']}")
    if step != "RESULT" or "result" not in outcome:
        raise BenchError(f"probe process failed: {outcome}")
    return outcome["result"], raw["result"]


def run_room_procs(spec: dict[str, Any], procs: int, timeout: float) -> dict[str, Any]:
    """One E2EE room whose members are spread round-robin over ``procs`` client processes,
    kept in step by barriers (each process says ``STEP name``, all get ``GO``)."""
    names = spec["users"]
    started: list[subprocess.Popen[str]] = []
    try:
        for i in range(procs):
            started.append(_spawn_worker({**spec, "scenario": "e2ee_room_part", "part": i,
                                          "local": names[i::procs], "time_limit": timeout}))

        while True:
            got = [_read_step(p) for p in started]
            steps = {name for name, _ in got}
            if steps == {"RESULT"}:
                break
            if len(steps) != 1 or "RESULT" in steps:
                raise BenchError(f"room processes out of step: {got}")
            step = steps.pop()
            go: dict[str, Any] = {}
            if step.endswith("_stopped"):
                go["total_sent"] = sum(int(d["sent"]) for _, d in got)
            log(f"  room processes: {step}")
            for p in started:
                _go(p, go)
        parts = []
        for _, outcome in got:
            if "result" not in outcome:
                raise BenchError(f"a room process failed: {outcome}")
            parts.append(outcome["result"])
        for p in started:
            p.wait(timeout=30)
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"procs": procs, "paced": _merge(parts, "paced"), **_merge(parts, "closed")}


def _merge(parts: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """One window's figures over the processes: sums of counts and CPU, one histogram."""
    from bench.loadclient import Histogram

    rs = [p[key] for p in parts]
    h = Histogram()
    for r in rs:
        for b, c in r["hist"]["counts"].items():
            h.counts[int(b)] += c
        h.n += r["hist"]["n"]
        h.max_ns = max(h.max_ns, r["hist"]["max_ns"])
    latency = h.summary()
    latency.pop("timeline_max_ms")
    elapsed = sum(r["elapsed_s"] for r in rs) / len(rs)
    delivered = sum(r["delivered"] for r in rs)
    out = {
        "elapsed_s": round(elapsed, 3),
        "delivered": delivered,
        "delivered_per_s": round(delivered / elapsed, 1),
        "latency": latency,
        "lost": sum(r["lost"] for r in rs),
        "send_errors": sum(r["send_errors"] for r in rs),
        # the processes' own CPU summed; server and machine as seen by each, averaged
        "client_cpu": round(sum(r["client_cpu"] for r in rs), 3),
        "client_reactor_cpu": round(sum(r["client_reactor_cpu"] for r in rs), 3),
        "client_cpu_per_process": [r["client_cpu"] for r in rs],
        "server_cpu": round(sum(r["server_cpu"] for r in rs) / len(rs), 3),
        "machine_busy_cores": round(sum(r["machine_busy_cores"] for r in rs) / len(rs), 3),
    }
    if "sends" in rs[0]:
        out["sends_per_s"] = round(sum(r["sends"] for r in rs) / elapsed, 1)
    return out


def start_server(work: Path) -> Any:
    """The real server, like `bench.fanout.start_shtalk` (fresh data directory, bcrypt cost
    10, 1000 connections per address), accounts active at once (no email code, no
    CAPTCHA: the closed-deployment switches the system tests use too) and the abuse
    defences off: 50 accounts sending
    hundreds of messages per second from one address and fetching 49 pre-key bundles each
    are exactly what the per-account/per-address token buckets and the monitor throttle.
    This benchmark measures the message path, not those defences."""
    from bench import fanout

    cfg = work / "e2e.ini"
    cfg.write_text(
        "[server]\n"
        "max_connections_per_address = 1000\n"
        "max_pending_handshakes_per_address = 1000\n"
        "idle_timeout = 3600\n"
        "pre_auth_timeout = 600\n"
        "[accounts]\n"
        "bcrypt_cost = 10\n"
        "require_email_verification = false\n"
        "require_captcha = false\n"
        "[tokens]\n"
        "access_ttl = 7200\n"
        "[ratelimit]\n"
        "enabled = false\n"
        "[monitor]\n"
        "enabled = false\n"
    )
    argv = [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
        "-n", "--pidfile=", "--logfile", str(work / "e2e-twistd.log"),
        "shtalk", "--port", "0", "--data-dir", str(work / "e2e-data"), "--config", str(cfg),
    ]
    return fanout.Server("shtalk", argv, r"shtalk listening on [^:]+:(\d+)",
                         work / "e2e.stderr")


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bench import fanout

    results: dict[str, Any] = {"machine": fanout.machine(), "date": time.strftime("%Y-%m-%d"),
                               "quick": args.quick, "warmup_s": args.warmup,
                               "duration_s": args.duration, "pingpong": args.pingpong,
                               "room_n": args.room_n}
    server = start_server(work)
    try:
        fp = fanout.fingerprint(work / "e2e-data")
        log(f"server pid {server.pid} port {server.port}")
        base = {"port": server.port, "fingerprint": fp, "server_pid": server.pid,
                "warmup": args.warmup, "duration": args.duration, "pingpong": args.pingpong}
        raw_users = ["rawalice", "rawbob"] + [f"raw{i:03d}" for i in range(args.room_n)]
        setup = fanout.load({"scenario": "setup", "mode": "shtalk", "port": server.port,
                             "fingerprint": fp, "users": raw_users}, timeout=300)
        tokens = [setup["tokens"][u] for u in raw_users]
        log(f"raw accounts set up in {setup['seconds']} s")
        limit = args.warmup + args.duration + 120

        log("two parties, plaintext baseline ...")
        results["pair_raw"] = run_worker(
            {**base, "scenario": "raw_pair", "users": raw_users[:2], "tokens": tokens[:2]},
            limit)
        fanout.wait_idle(server)
        _show("pair raw", results["pair_raw"])

        log("two parties, E2EE ...")
        results["pair_e2ee"] = run_worker(
            {**base, "scenario": "e2ee_pair", "users": ["alice", "bob"],
             "home": str(work / "pair")}, limit + 60)
        fanout.wait_idle(server)
        _show("pair e2ee", results["pair_e2ee"])

        log(f"room of {args.room_n}, plaintext baseline, paced {args.room_rate:g} sends/s ...")
        r = fanout.load({**base, "scenario": "fanout", "mode": "shtalk", "n": args.room_n,
                         "rate": args.room_rate, "window": 1, "room": "rawroom-paced",
                         "tokens": tokens[2:]}, timeout=limit)
        r["client_cpu"] = r.pop("loadgen_cpu")
        r["rate"] = args.room_rate
        results["room_raw_paced"] = r
        fanout.wait_idle(server)
        log(f"  p50 {r['latency']['p50_ms']} p99 {r['latency']['p99_ms']} ms")
        log(f"room of {args.room_n}, plaintext baseline, closed loop ...")
        r = fanout.load({**base, "scenario": "fanout", "mode": "shtalk", "n": args.room_n,
                         "rate": 0, "window": 1, "room": "rawroom",
                         "tokens": tokens[2:]}, timeout=limit)
        r["client_cpu"] = r.pop("loadgen_cpu")
        results["room_raw"] = r
        r["drain_s"] = fanout.wait_idle(server)
        log(f"  {r['delivered_per_s']:.0f} delivered/s, p50 {r['latency']['p50_ms']} "
            f"p99 {r['latency']['p99_ms']} ms, server {r['server_cpu']:.2f}, "
            f"clients {r['client_cpu']:.2f}")

        log(f"room of {args.room_n}, E2EE (set-up: {args.room_n} registrations, "
            f"{args.room_n * (args.room_n - 1)} pairwise sessions) ...")
        r = run_worker({**base, "scenario": "e2ee_room", "room": "e2eroom",
                        "users": [f"m{i:03d}" for i in range(args.room_n)],
                        "room_rate": args.room_rate, "profile": args.profile,
                        "home": str(work / "room"), "setup_limit": 120}, 2 * limit + 240)
        r["drain_s"] = fanout.wait_idle(server)
        results["room_e2ee"] = r
        log(f"  {r['delivered_per_s']:.0f} delivered/s, p50 {r['latency']['p50_ms']} "
            f"p99 {r['latency']['p99_ms']} ms, server {r['server_cpu']:.2f}, "
            f"clients {r['client_cpu']:.2f} (reactor {r['client_reactor_cpu']:.2f}), "
            f"lost {r['lost']}")
        if args.room_procs > 1:
            log(f"room of {args.room_n}, E2EE, members spread over {args.room_procs} client "
                "processes ...")
            r = run_room_procs({**base, "room": "e2eroommp", "room_rate": args.room_rate,
                                "users": [f"q{i:03d}" for i in range(args.room_n)],
                                "home": str(work / "roommp"), "setup_limit": 120},
                               args.room_procs, 2 * limit + 240)
            r["drain_s"] = fanout.wait_idle(server)
            results["room_e2ee_mp"] = r
            log(f"  {r['delivered_per_s']:.0f} delivered/s, p50 {r['latency']['p50_ms']} "
                f"p99 {r['latency']['p99_ms']} ms, server {r['server_cpu']:.2f}, "
                f"clients {r['client_cpu']:.2f} {r['client_cpu_per_process']}, "
                f"paced p50 {r['paced']['latency']['p50_ms']} p99 "
                f"{r['paced']['latency']['p99_ms']} ms, lost {r['lost']}")
        if args.probe_rate > 0:
            n_raw = args.room_n - 2
            log(f"room of {args.room_n}: {n_raw} raw clients in a closed loop and 2 E2EE "
                f"members, {args.probe_rate:g} E2EE messages/s through the loaded server ...")
            probe, raw = run_probe(
                {**base, "room": "proberoom", "users": ["probesender", "probereceiver"],
                 "tokens": tokens[2:2 + n_raw], "probe_rate": args.probe_rate,
                 "home": str(work / "probe"), "window": round(0.6 * args.duration, 2)},
                {**base, "scenario": "fanout", "mode": "shtalk", "n": n_raw, "rate": 0,
                 "window": 1, "room": "proberoom", "tokens": tokens[2:2 + n_raw]},
                limit + 120)
            raw["client_cpu"] = raw.pop("loadgen_cpu")
            fanout.wait_idle(server)
            results["probe_e2ee"], results["probe_raw"] = probe, raw
            log(f"  raw: {raw['delivered_per_s']:.0f} delivered/s, p50 "
                f"{raw['latency']['p50_ms']} p99 {raw['latency']['p99_ms']} ms; E2EE probes: "
                f"{probe['delivered_per_s']:.1f}/s p50 {probe['latency']['p50_ms']} p99 "
                f"{probe['latency']['p99_ms']} ms, refused {probe['raw_refused_per_s']:.0f}/s, "
                f"lost {probe['lost']}")
        if args.experiment:
            for key, scen, extra in (
                ("pair_e2ee_nosync", "e2ee_pair", {"users": ["carol", "dave"],
                                                   "home": str(work / "pair2")}),
                ("room_e2ee_nosync", "e2ee_room", {"room": "e2eroom2", "setup_limit": 120,
                                                   "users": [f"n{i:03d}"
                                                             for i in range(args.room_n)],
                                                   "room_rate": args.room_rate,
                                                   "home": str(work / "room2")}),
            ):
                log(f"experiment: {scen} with the client stores at synchronous=NORMAL ...")
                r = run_worker({**base, "scenario": scen, "client_sync": "NORMAL", **extra},
                               2 * limit + 240)
                fanout.wait_idle(server)
                results[key] = r
                c = r.get("closed", r)
                log(f"  {c['delivered_per_s']:.0f} delivered/s, p50 {c['latency']['p50_ms']} "
                    f"p99 {c['latency']['p99_ms']} ms, server {c['server_cpu']:.2f}, "
                    f"clients {c['client_cpu']:.2f}")
    finally:
        server.stop()
    return results


def _show(what: str, r: dict[str, Any]) -> None:
    c, p = r["closed"], r["pingpong"]
    log(f"  {what}: closed {c['delivered_per_s']:.0f} msg/s p50 {c['latency']['p50_ms']} "
        f"p99 {c['latency']['p99_ms']} ms (server {c['server_cpu']:.2f}, clients "
        f"{c['client_cpu']:.2f}); ping-pong p50 {p['latency']['p50_ms']} p99 "
        f"{p['latency']['p99_ms']} ms")


# -- report ------------------------------------------------------------------------------


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


def write_section(path: Path, section: str) -> None:
    """Replace (or append) only our section; keep the analysis paragraphs under it."""
    text = path.read_text() if path.exists() else "# Performance\n"
    start = text.find(SECTION)
    body = section.rstrip("\n")
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + body + "\n")
        return
    end = text.find("\n## ", start + len(SECTION))
    end = len(text) if end < 0 else end + 1
    old = text[start:end]
    marker = old.find("<!-- analysis -->")
    if marker >= 0:
        analysis = old[marker + len("<!-- analysis -->"):].strip("\n")
        if analysis:
            body += "\n" + analysis
    # In place: the sections after ours stay where they are.
    path.write_text(text[:start] + body + "\n" + ("\n" if end < len(text) else "") + text[end:])


def main() -> None:
    if "--worker" in sys.argv[1:]:
        sys.path.insert(0, str(REPO))
        worker()
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short windows (about 1 minute)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--write", type=Path, help="replace our section of this markdown file")
    p.add_argument("--room-n", type=int, default=ROOM_N)
    p.add_argument("--duration", type=float)
    p.add_argument("--warmup", type=float)
    p.add_argument("--pingpong", type=int)
    p.add_argument("--room-rate", type=float, default=5.0,
                   help="paced room: sends/s in total (latency at a sustainable load)")
    p.add_argument("--room-procs", type=int, default=4,
                   help="also run the E2EE room with its members spread over this many "
                   "client processes (1: skip)")
    p.add_argument("--probe-rate", type=float, default=20.0,
                   help="E2EE messages/s through the server loaded by the raw room (0: skip)")
    p.add_argument("--profile", help="cProfile the E2EE room's reactor thread during the "
                   "closed loop into this file (perturbs the figures)")
    p.add_argument("--from-json", type=Path,
                   help="re-render the report from a --json file of an earlier run")
    p.add_argument("--no-experiment", dest="experiment", action="store_false",
                   help="skip the synchronous=NORMAL experiment (skipped by --quick)")
    p.add_argument("--rotation", action="store_true",
                   help="instead: what key rotation costs against a message (bench/"
                   "e2e_rotation.py; its own section of --write's file)")
    args = p.parse_args()
    if args.rotation:
        from bench import e2e_rotation

        e2e_rotation.main(args)
        return
    if args.quick:
        args.experiment = False
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.pingpong is None:
        args.pingpong = 50 if args.quick else 300
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        work = Path(tempfile.mkdtemp(prefix="shtalk-bench-e2e-"))
        started = time.monotonic()
        try:
            results = run(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        results["wall_s"] = round(time.monotonic() - started, 1)
        log(f"done in {results['wall_s']} s")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    section = build_report(results)
    print(section)
    if args.write:
        write_section(args.write, section)
        log(f"wrote the section of {args.write}")


if __name__ == "__main__":
    main()
