"""The E2EE side of bench/e2e's client processes: real ShtalkClients ("parties"), what
they received and how late, the ways they send (paced, closed loop), and the barriers
that keep several client processes in step.

Every E2EE scenario (bench/e2e_worker.py, bench/e2e_rotation.py) is built from these, so
each one sends, counts and times its messages the same way.  Runs on a reactor, in a
client process started by `bench.e2e`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred, gatherResults

from bench.common import bounded, logger, sleep
from bench.cpu import CpuWindow, cpu_seconds_of
from bench.loadproto import Histogram, monotonic_ns
from shtalk.wire.requests import RoomCreate, RoomJoin

BODY_BYTES = 200
PASSWORD = "bench-tangerine-quokka-43"

log = logger("e2e")


def _thread_cpu(tid: int) -> float:
    return cpu_seconds_of(os.getpid(), tid)


def _threads_by_name() -> dict[str, float]:
    """CPU seconds of this process's threads so far, user and system apart, summed by
    thread name (the local stores' threads share one): where the client's CPU goes."""
    pid = os.getpid()
    out: dict[str, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        # Python 3.11 names no OS thread: the local stores' threads show as "python".
        name = "reactor" if int(tid) == pid else "store+other" if name == "python" else name
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        hz = os.sysconf("SC_CLK_TCK")
        for kind, ticks in (("user", fields[11]), ("sys", fields[12])):
            out[f"{name} {kind}"] = out.get(f"{name} {kind}", 0.0) + int(ticks) / hz
    return out


class Window:
    """CPU of the server, of this process, of its reactor thread and of its other
    threads (by name) over a window."""

    def __init__(self, server_pid: int) -> None:
        self.cpu = CpuWindow(server_pid)
        self.tid = threading.get_native_id()
        self.reactor0 = _thread_cpu(self.tid)
        self.threads0 = _threads_by_name()

    def stop(self) -> dict[str, Any]:
        threads = _threads_by_name()
        out: dict[str, Any] = self.cpu.stop()
        out["client_reactor_cpu"] = round(
            (_thread_cpu(self.tid) - self.reactor0) / out["elapsed_s"], 3
        )
        out["client_cpu"] = out.pop("loadgen_cpu")
        out["client_threads_cpu"] = {
            name: round((t - self.threads0.get(name, 0.0)) / out["elapsed_s"], 4)
            for name, t in sorted(threads.items())
        }
        return out


def body(t0: int) -> str:
    """A message body that carries its send time (what `record_latency` reads)."""
    head = f"{t0}|"
    return head + "x" * (BODY_BYTES - len(head))


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
        await self.client.register(PASSWORD, f"{self.username}@example.org")
        await self.client.login(PASSWORD)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.store is not None:
            await self.store.close()


def parties(spec: dict[str, Any], names: list[str]) -> list[Party]:
    return [Party(spec, u, os.path.join(spec["home"], u)) for u in names]


def count_messages(members: list[Party]) -> list[int]:
    """From now on ``[0]`` of the result counts the messages the parties receive."""
    received = [0]

    def got(e: Any) -> None:
        received[0] += 1

    for p in members:
        p.on_message = got
    return received


def record_latency(members: list[Party]) -> dict[str, Any]:
    """Count what the parties receive and, while ``recording`` is true, each message's
    latency (send time in its body) into ``hist`` and ``delivered``."""
    state: dict[str, Any] = {"hist": Histogram(), "recording": False, "delivered": 0,
                             "received": 0}

    def got(e: Any) -> None:
        now = monotonic_ns()
        state["received"] += 1
        if state["recording"]:
            state["delivered"] += 1
            state["hist"].add(now - int(e.body.split("|", 1)[0]), now)

    for p in members:
        p.on_message = got
    return state


async def measured(spec: dict[str, Any], state: dict[str, Any], *, warmup: bool = True,
                   profile: str | None = None) -> dict[str, Any]:
    """After the warm-up, ``spec["duration"]`` seconds with ``state`` recording; the CPU
    of that window.  ``profile``: cProfile this process's reactor thread over the window
    into that file, and the local stores' jobs (their own threads) into ``profile.store``,
    in CPU time (the thread's, not the wall clock: waits for the network or the disk
    do not count)."""
    if warmup:
        await sleep(spec["warmup"])
    win = Window(spec["server_pid"])
    state["hist"].t0 = monotonic_ns()
    state["recording"] = True
    profiler = jobs = None
    if profile:
        import cProfile

        jobs = JobsProfiler()
        profiler = cProfile.Profile(time.thread_time)
        profiler.enable()
    await sleep(spec["duration"])
    if profiler is not None and jobs is not None and profile:
        profiler.disable()
        profiler.dump_stats(profile)
        jobs.stop(profile + ".store")
    state["recording"] = False
    return win.stop()


class JobsProfiler:
    """cProfile of every `SQLiteThread` job submitted until `stop` (cProfile sees one
    thread only: each job is profiled in its own thread, the profiles merged at the end)."""

    def __init__(self) -> None:
        import cProfile

        from shtalk.sqlitethread import SQLiteThread

        self.profiles: dict[int, cProfile.Profile] = {}
        self.cls = SQLiteThread
        self.submit = real = SQLiteThread.submit
        profiles = self.profiles

        def profiled(fn: Callable[..., Any]) -> Callable[..., Any]:
            def job(*args: Any) -> Any:
                p = profiles.get(threading.get_ident())
                if p is None:
                    p = profiles[threading.get_ident()] = cProfile.Profile(time.thread_time)
                p.enable()
                try:
                    return fn(*args)
                finally:
                    p.disable()
            return job

        def submit(db: Any, fn: Callable[..., Any], args: tuple[Any, ...],
                   done: Callable[[Any], None]) -> None:
            real(db, profiled(fn), args, done)

        SQLiteThread.submit = submit  # type: ignore[method-assign,assignment]

    def stop(self, path: str) -> None:
        import pstats

        self.cls.submit = self.submit  # type: ignore[method-assign]
        profiles = list(self.profiles.values())
        if profiles:
            stats = pstats.Stats(profiles[0])
            for p in profiles[1:]:
                stats.add(p)
            stats.dump_stats(path)


async def until(done: Callable[[], bool], limit: float, step: float = 0.05) -> bool:
    """Poll ``done`` for at most ``limit`` seconds (a benchmark waits for the network)."""
    deadline = time.monotonic() + limit
    while not done():
        if time.monotonic() > deadline:
            return False
        await sleep(step)
    return True


class Paced:
    """``rate`` sends per second in total, round-robin over ``senders``, from a 1 ms timer
    whether or not earlier sends completed (like bench.loadclient's open loop): the
    latency at a load both sides sustain."""

    def __init__(self, senders: list[Party], conv: str, rate: float) -> None:
        self.senders = senders
        self.conv = conv
        self.rate = rate
        self.issued = self.done = self.errors = 0
        self.start_ns = monotonic_ns()
        self._loop: Any = None

    def start(self) -> None:
        from twisted.internet import reactor, task

        self.start_ns = monotonic_ns()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor
        self._loop.start(0.001, now=True)

    def stop(self) -> None:
        self._loop.stop()

    @property
    def settled(self) -> bool:
        """Every issued send has completed or failed."""
        return self.done + self.errors >= self.issued

    def _tick(self) -> None:
        due = int((monotonic_ns() - self.start_ns) * self.rate / 1e9) + 1 - self.issued
        n = len(self.senders)
        for k in range(self.issued, self.issued + max(0, due)):
            d = Deferred.fromCoroutine(
                self.senders[k % n].client.send(self.conv, body(monotonic_ns())))
            d.addCallbacks(self._sent, self._failed)
        self.issued += max(0, due)

    def _sent(self, _: Any) -> None:
        self.done += 1

    def _failed(self, _: Any) -> None:
        self.errors += 1


class ClosedLoop:
    """Every sender keeps one send outstanding: the next as soon as ``send`` returns.
    ``tolerate``: a failed send is counted and retried after 100 ms (else it ends the
    run); ``state["recording"]`` says which sends fall in the measured window."""

    def __init__(self, senders: list[Party], conv: str, state: dict[str, Any], *,
                 tolerate: bool = True) -> None:
        self.senders = senders
        self.conv = conv
        self.state = state
        self.tolerate = tolerate
        self.on = False
        self.sent = self.recorded_sends = self.errors = 0
        self._loops: list[Deferred[None]] = []

    def start(self) -> None:
        self.on = True
        self._loops = [Deferred.fromCoroutine(self._sender(p)) for p in self.senders]

    async def stop(self) -> None:
        self.on = False
        await gatherResults(self._loops)

    async def _sender(self, p: Party) -> None:
        while self.on:
            try:
                await p.client.send(self.conv, body(monotonic_ns()))
            except Exception:
                if not self.tolerate:
                    raise
                self.errors += 1
                await sleep(0.1)
                continue
            self.sent += 1
            if self.state["recording"]:
                self.recorded_sends += 1


async def setup_room(spec: dict[str, Any]) -> tuple[list[Party], dict[str, Any]]:
    """``spec["users"]`` registered, logged in and in ``spec["room"]``, every member
    holding every other member's sender key (one first message from each has reached
    all others); returns the parties and the set-up times."""
    room = spec["room"]
    members = parties(spec, spec["users"])
    n = len(members)
    out: dict[str, Any] = {"n": n}
    t = time.monotonic()
    await bounded(8, [p.register for p in members])
    out["setup_register_s"] = round(time.monotonic() - t, 2)
    log(f"room: {n} clients registered and logged in ({out['setup_register_s']} s)")
    # Membership straight through the server (no rotation per join: nobody has a room
    # session yet), then one sender key per member, handed to the 49 others pairwise.
    t = time.monotonic()
    await members[0].client.session.request(RoomCreate(room=room))
    for p in members[1:]:
        await p.client.session.request(RoomJoin(room=room))
    await hand_out_sender_keys(members, room)
    # Everyone has every sender key when one message from each member reaches all others.
    expected = n * (n - 1)
    received = count_messages(members)
    await first_messages(members, room)
    if not await until(lambda: received[0] >= expected, spec["setup_limit"], 0.1):
        raise RuntimeError(
            f"room set-up: only {received[0]} of {expected} first messages arrived"
        )
    out["setup_room_s"] = round(time.monotonic() - t, 2)
    log(f"room: sender keys distributed, {expected} first messages delivered "
        f"({out['setup_room_s']} s)")
    return members, out


async def hand_out_sender_keys(local: list[Party], room: str, expect: int | None = None
                               ) -> None:
    """Each of ``local`` (all in ``room``) sends its sender key to every member."""
    members = [m["user"] for m in await local[0].client.members(room)]
    if expect is not None and len(members) != expect:
        raise RuntimeError(f"room has {len(members)} members, not {expect}")
    await sleep(0.5)

    def joiner(p: Party) -> Callable[[], Any]:
        return lambda: p.client.e2ee.joined_room(room, members)

    await bounded(len(local), [joiner(p) for p in local])


async def first_messages(senders: list[Party], room: str) -> None:
    """One message from each of ``senders`` to ``room``, all at once."""
    conv = f"room:{room}"
    await gatherResults([
        Deferred.fromCoroutine(p.client.send(conv, body(monotonic_ns()))) for p in senders
    ])


class Coordinator:
    """Barriers with the orchestrator: ``STEP name {json}`` out, ``GO {json}`` back in."""

    def __init__(self) -> None:
        from twisted.internet import reactor

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

    def step(self, name: str, data: dict[str, Any] | None = None) -> Deferred[dict[str, Any]]:
        self.waiter = Deferred()
        sys.stdout.write(f"STEP {name} {json.dumps(data or {})}\n")
        sys.stdout.flush()
        return self.waiter


def hist_state(h: Histogram) -> dict[str, Any]:
    """A histogram as JSON, to be merged with other processes' (`bench.e2e`)."""
    return {"n": h.n, "max_ns": h.max_ns,
            "counts": {str(b): c for b, c in enumerate(h.counts) if c}}
