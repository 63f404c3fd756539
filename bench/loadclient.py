"""The load generator: many TLS client connections on one Twisted reactor, in one process.

Run by `bench.fanout` as ``python -m bench.loadclient`` with a JSON spec on stdin; it prints
its result as one line ``RESULT {...json...}`` on stdout and exits.  Scenarios:

``setup``
    register accounts and log each in once with a password (device ``bench``); returns
    their access tokens, so the measured runs connect with ``resume`` (no bcrypt).
``fanout``
    N connections join one room; every connection is a sender.  ``rate = 0``: closed loop,
    each sender keeps ``window`` sends outstanding and sends the next as soon as one is
    acknowledged.  ``rate > 0``: open loop, ``rate`` sends per second in total spread
    round-robin over the senders, issued from a 1 ms timer whether or not earlier sends
    were acknowledged.  After a warm-up, deliveries are counted and their latency recorded
    for ``duration`` seconds.
``storm``
    a paced chat (as ``fanout`` with ``rate``) measured for ``duration`` seconds, then
    ``storm_users`` connect and log in with their passwords all at once while the chat
    goes on; the chat's latency during the storm (until the last login is answered) is
    recorded separately.

What is measured, and how:

* Latency is send -> receipt at each recipient.  The sender puts ``time.monotonic_ns()``
  (taken just before its ``write``) into the message's ``client_id``; a recipient takes
  ``monotonic_ns()`` when its protocol's ``dataReceived`` is called with the decrypted
  bytes.  Everything runs on this machine, so it is one clock.  Latencies go into a
  histogram of 10 us buckets (exact to 10 us; 2 s and above in one bucket).
* Delivered messages per second counts every ``message`` push (or, against the ceiling,
  every broadcast line) received by any connection during the window.
* Every received message is acknowledged: its seq is queued and the queue is sent as one
  ``ack`` request when it reaches 50 seqs or every 10 ms, whichever comes first.
* CPU: the load generator's own user+system time (``os.times``) and the server's
  (``/proc/PID/stat``, all threads) over the window, as a share of one core.

Hot-path parsing is byte slicing, not JSON: the push layout (``{"type":"message","seq":N,
...,"client_id":"...",...}``) is shtalk's fixed key order.  Control requests (hello,
resume, login, rooms) use ``json``.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

from twisted.internet import defer, endpoints, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from shtalk.client.client import ACK_BATCH as CLIENT_ACK_BATCH
from shtalk.client.client import ACK_DELAY as CLIENT_ACK_DELAY
from shtalk.server.tls import client_options_pinned

MSG_PREFIX = b'{"type":"message","seq":'
MSG_SEQ_AT = len(MSG_PREFIX)
SEND_PREFIX = b'{"type":"send"'
CID_KEY = b'"client_id":"'
CEILING_OK = b'{"ok":true}'
# Acknowledge like ShtalkClient does (the product's client is what the load models).
ACK_BATCH = CLIENT_ACK_BATCH
ACK_INTERVAL = CLIENT_ACK_DELAY
BUCKET_US = 10
BUCKETS = 200_000  # 10 us x 200,000 = 2 s; later ones land in the last bucket
PASSWORD = "bench-tangerine-quokka-43"

SEND = 1
ACK = 2

monotonic_ns = time.monotonic_ns


class Histogram:
    """Latency counts in 10 us buckets, and the worst latency of every 100 ms (timeline)."""

    def __init__(self) -> None:
        self.counts = [0] * (BUCKETS + 1)
        self.n = 0
        self.max_ns = 0
        self.t0 = monotonic_ns()
        self.timeline: dict[int, int] = {}

    def add(self, ns: int, now: int) -> None:
        b = ns // (BUCKET_US * 1000)
        self.counts[b if b < BUCKETS else BUCKETS] += 1
        self.n += 1
        if ns > self.max_ns:
            self.max_ns = ns
        slot = (now - self.t0) // 100_000_000
        if ns > self.timeline.get(slot, 0):
            self.timeline[slot] = ns

    def percentile(self, p: float) -> float | None:
        """The p-th percentile in milliseconds (upper edge of its bucket)."""
        if self.n == 0:
            return None
        rank = max(1, round(self.n * p / 100.0 + 0.4999))
        seen = 0
        for b, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min((b + 1) * BUCKET_US / 1000.0, self.max_ns / 1e6)
        return self.max_ns / 1e6

    def summary(self) -> dict[str, Any]:
        return {
            "samples": self.n,
            "p50_ms": self.percentile(50),
            "p90_ms": self.percentile(90),
            "p99_ms": self.percentile(99),
            "p999_ms": self.percentile(99.9),
            "max_ms": round(self.max_ns / 1e6, 3) if self.n else None,
            # worst latency (ms) in each 100 ms of the window, in order
            "timeline_max_ms": [
                round(self.timeline.get(i, 0) / 1e6, 1)
                for i in range(max(self.timeline, default=-1) + 1)
            ],
        }


@dataclass
class Run:
    """State shared by all connections of one scenario."""

    ceiling: bool
    hist: Histogram = field(default_factory=Histogram)
    recording: bool = False
    sending: bool = False
    closed_loop: bool = True
    delivered: int = 0  # in the window
    sends_acked: int = 0  # in the window
    sends_written: int = 0  # in the window
    total_delivered: int = 0
    total_sends_acked: int = 0
    total_sends_written: int = 0
    acks_written: int = 0  # ack requests, in the window
    errors: int = 0
    first_error: str = ""

    def error(self, what: str) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = what[:300]


class LoadClient(Protocol):
    """One connection: control requests over JSON, the hot path over byte slicing."""

    ack_batch = ACK_BATCH

    def __init__(self, run: Run, index: int, room: str) -> None:
        self.run = run
        self.index = index
        self._buf = b""
        self._next_id = 1
        self._kinds: dict[int, int] = {}  # shtalk: request id -> SEND/ACK
        self._fifo: deque[int] = deque()  # ceiling: replies come in order
        self._waiting: dict[int, Deferred[dict[str, Any]]] = {}
        self.acks: list[bytes] = []
        self.inflight = 0
        self.sent = 0
        self.to = json.dumps({"room": room}, separators=(",", ":")).encode()
        self.envelope = base64.b64encode(os.urandom(200))
        self.connected_d: Deferred[None] = Deferred()
        self.lost_d: Deferred[None] = Deferred()
        self.backlog_d: Deferred[None] = Deferred()
        self._fake_seq = 0
        self.live = run.ceiling  # shtalk: after backlog_done

    # connection ------------------------------------------------------------
    def connectionMade(self) -> None:
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:
            nodelay(True)
        self.connected_d.callback(None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        for d in self._waiting.values():
            d.errback(ConnectionError("connection lost"))
        self._waiting.clear()
        if not self.lost_d.called:
            self.lost_d.callback(None)

    def close(self) -> Deferred[None]:
        if self.transport is not None and not self.lost_d.called:
            self.transport.loseConnection()
        return self.lost_d

    # control requests ---------------------------------------------------------
    def request(self, rtype: str, **fields: Any) -> Deferred[dict[str, Any]]:
        rid = self._next_id
        self._next_id += 1
        d: Deferred[dict[str, Any]] = Deferred()
        self._waiting[rid] = d
        line = json.dumps({"id": rid, "type": rtype, **fields}, separators=(",", ":"))
        self.transport.write(line.encode() + b"\n")  # type: ignore[union-attr]
        return d

    # hot path -----------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        now = monotonic_ns()
        if self._buf:
            data = self._buf + data
        lines = data.split(b"\n")
        self._buf = lines.pop()
        run = self.run
        for line in lines:
            if line.startswith(MSG_PREFIX) or line.startswith(SEND_PREFIX):
                i = line.find(CID_KEY) + len(CID_KEY)
                j = line.find(b'"', i)
                sent_at = int(line[line.rfind(b".", i, j) + 1 : j])
                if self.live:  # not a replay of an earlier run's unacknowledged messages
                    run.total_delivered += 1
                if run.recording:
                    run.delivered += 1
                    run.hist.add(now - sent_at, now)
                if run.ceiling:
                    self._fake_seq += 1
                    self.acks.append(b"%d" % self._fake_seq)
                else:
                    self.acks.append(line[MSG_SEQ_AT : line.find(b",", MSG_SEQ_AT)])
                if len(self.acks) >= self.ack_batch:
                    self.flush_acks()
            elif run.ceiling and line == CEILING_OK:
                self._reply(self._fifo.popleft(), line)
            elif line.startswith(b'{"id":'):
                end = line.find(b",", 6)
                try:
                    rid = int(line[6:end])
                except ValueError:
                    run.error(line.decode("utf-8", "replace"))
                    continue
                kind = self._kinds.pop(rid, 0)
                if kind:
                    self._reply(kind, line)
                else:
                    d = self._waiting.pop(rid, None)
                    if d is None:
                        run.error("unexpected reply " + line.decode("utf-8", "replace"))
                    else:
                        d.callback(json.loads(line))
            elif line.startswith(b'{"type":"backlog_done"') and not self.backlog_d.called:
                self.live = True
                self.backlog_d.callback(None)
            # presence / member / invited pushes: not part of the measurement

    def _reply(self, kind: int, line: bytes) -> None:
        run = self.run
        if not run.ceiling and b'"ok":true' not in line[:40]:
            run.error(line.decode("utf-8", "replace"))
        if kind == SEND:
            self.inflight -= 1
            run.total_sends_acked += 1
            if run.recording:
                run.sends_acked += 1
            if run.sending and run.closed_loop:
                self.send_one()

    def send_one(self) -> None:
        rid = self._next_id
        self._next_id += 1
        self.sent += 1
        if self.run.ceiling:
            self._fifo.append(SEND)
        else:
            self._kinds[rid] = SEND
        self.inflight += 1
        line = b'{"type":"send","id":%d,"to":%s,"envelope":"%s","client_id":"%d.%d.%d"}\n' % (
            rid, self.to, self.envelope, self.index, self.sent, monotonic_ns()
        )
        self.transport.write(line)  # type: ignore[union-attr]
        run = self.run
        run.total_sends_written += 1
        if run.recording:
            run.sends_written += 1

    def flush_acks(self) -> None:
        if not self.acks or self.transport is None:
            return
        rid = self._next_id
        self._next_id += 1
        if self.run.ceiling:
            self._fifo.append(ACK)
        else:
            self._kinds[rid] = ACK
        seqs, self.acks = b",".join(self.acks), []
        if self.run.recording:
            self.run.acks_written += 1
        self.transport.write(b'{"type":"ack","id":%d,"seqs":[%s]}\n' % (rid, seqs))


# helpers -------------------------------------------------------------------------------


def cpu_seconds_of(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads), or of one thread."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float, float]:
    """Seconds of (busy, steal, all) CPU time of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]  # idle + iowait
    steal = ticks[7] if len(ticks) > 7 else 0
    total = sum(ticks[:8])
    return (total - idle - steal) / hz, steal / hz, total / hz


def other_processes_cpu(exclude: set[int]) -> dict[int, float]:
    """CPU seconds used so far by every process on the machine except `exclude`, by pid.

    The machine may be shared (other people's tests and benchmarks): the growth over the
    window says how much CPU went to processes that are not part of this benchmark.
    """
    return {
        int(entry): cpu_seconds_of(int(entry))
        for entry in os.listdir("/proc")
        if entry.isdigit() and int(entry) not in exclude
    }


def _grown(start: dict[int, float], end: dict[int, float]) -> float:
    """CPU used between two samples; processes that ended meanwhile count as 0 (unknown),
    processes that started meanwhile count in full."""
    return sum(t - start.get(pid, 0.0) for pid, t in end.items())


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CpuWindow:
    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.start = self._sample()

    def _sample(self) -> tuple[Any, ...]:
        pid = self.server_pid
        # The main thread's id is the process id: that is the reactor thread.
        return (time.monotonic(), own_cpu_seconds(), cpu_seconds_of(pid),
                cpu_seconds_of(pid, pid), *machine_cpu(),
                other_processes_cpu({pid, os.getpid(), os.getppid()}))

    def stop(self) -> dict[str, float]:
        end = self._sample()
        elapsed = end[0] - self.start[0]
        return {
            "elapsed_s": round(elapsed, 3),
            "loadgen_cpu": round((end[1] - self.start[1]) / elapsed, 3),
            "server_cpu": round((end[2] - self.start[2]) / elapsed, 3),
            "server_reactor_cpu": round((end[3] - self.start[3]) / elapsed, 3),
            # Whole machine, in cores (2.0 = both busy), and time stolen by the hypervisor.
            "machine_busy_cores": round((end[4] - self.start[4]) / elapsed, 3),
            "machine_steal_cores": round((end[5] - self.start[5]) / elapsed, 3),
            # Other processes (not this server, not the load generator), in cores.
            "other_processes_cores": round(_grown(self.start[7], end[7]) / elapsed, 3),
        }


def sleep(seconds: float) -> Deferred[None]:
    from twisted.internet import reactor

    return task.deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


def _check(reply: dict[str, Any], *allowed: str) -> dict[str, Any]:
    if reply.get("ok"):
        return reply
    code = reply.get("error", {}).get("code")
    if code in allowed:
        return reply
    raise RuntimeError(f"request refused: {reply}")


@inlineCallbacks
def connect(spec: dict[str, Any], run: Run, index: int, room: str = "") -> Any:
    from twisted.internet import reactor

    options = client_options_pinned(spec["fingerprint"], "127.0.0.1")
    endpoint = endpoints.SSL4ClientEndpoint(  # type: ignore[no-untyped-call]
        reactor, "127.0.0.1", spec["port"], options, timeout=30
    )
    client = LoadClient(run, index, room)
    client.ack_batch = int(spec.get("ack_batch", ACK_BATCH))
    yield endpoints.connectProtocol(endpoint, client)
    return client


@inlineCallbacks
def bounded(n: int, jobs: list[Callable[[], Deferred[Any]]]) -> Any:
    """Run jobs with at most n in flight; results in order."""
    sem = defer.DeferredSemaphore(n)
    results = yield defer.gatherResults(
        [sem.run(job) for job in jobs], consumeErrors=True
    )
    return results


# scenarios -----------------------------------------------------------------------------


@inlineCallbacks
def scenario_setup(spec: dict[str, Any]) -> Any:
    """Register (if needed) and log in each user once; return access tokens."""
    run = Run(ceiling=False)
    login = spec.get("login", True)

    @inlineCallbacks
    def one(i: int, name: str) -> Any:
        client = yield connect(spec, run, i)
        try:
            yield client.request("hello", version=1).addCallback(_check)
            reply = yield client.request(
                "register", username=name, password=PASSWORD, email=f"{name}@bench.invalid"
            )
            _check(reply, "username_taken")
            token = None
            if login:
                reply = yield client.request(
                    "login", username=name, password=PASSWORD, device={"id": "bench"}
                )
                token = _check(reply)["access_token"]
            return name, token
        finally:
            yield client.close()

    jobs: list[Callable[[], Deferred[Any]]] = [
        partial(one, i, n) for i, n in enumerate(spec["users"])
    ]
    started = time.monotonic()
    results = yield bounded(spec.get("concurrency", 4), jobs)
    return {
        "tokens": {name: token for name, token in results},
        "seconds": round(time.monotonic() - started, 2),
    }


@inlineCallbacks
def open_room(spec: dict[str, Any], run: Run, room: str) -> Any:
    """Connect (resume) every session and gather them in `room`; returns the clients."""
    ceiling = spec["mode"] == "ceiling"
    n = spec["n"]

    @inlineCallbacks
    def one(i: int) -> Any:
        client = yield connect(spec, run, i, room)
        if not ceiling:
            yield client.request("hello", version=1).addCallback(_check)
            token = spec["tokens"][i]
            yield client.request("resume", access_token=token).addCallback(_check)
            yield client.backlog_d
        return client

    jobs: list[Callable[[], Deferred[Any]]] = [partial(one, i) for i in range(n)]
    clients: list[LoadClient] = yield bounded(50, jobs)
    if not ceiling:
        yield clients[0].request("room_create", room=room).addCallback(_check, "room_exists")
        joins = [
            c.request("room_join", room=room).addCallback(_check, "already_member")
            for c in clients[1:]
        ]
        yield defer.gatherResults(joins, consumeErrors=True)
        # Let the member pushes of the joins drain before measuring.
        yield sleep(0.5)
    return clients


@inlineCallbacks
def drive(
    spec: dict[str, Any], run: Run, clients: list[LoadClient], phases: Any
) -> Any:
    """Start sending (closed or open loop); `phases(run)` runs while traffic flows."""
    from twisted.internet import reactor

    rate = float(spec.get("rate", 0))
    run.closed_loop = rate <= 0
    run.sending = True
    def flush_all() -> None:
        for c in clients:
            c.flush_acks()

    acker = task.LoopingCall(flush_all)
    acker.clock = reactor  # type: ignore[assignment]
    acker.start(float(spec.get("ack_interval", ACK_INTERVAL)), now=False)
    pacer: task.LoopingCall | None = None
    pace: dict[str, Any] = {"issued": 0, "max_lag_ms": 0.0, "late_ticks": 0, "ticks": 0}
    if run.closed_loop:
        for c in clients:
            for _ in range(int(spec.get("window", 1))):
                c.send_one()
    else:
        start = monotonic_ns()
        senders = clients
        per_ns = rate / 1e9

        def tick() -> None:
            if not run.sending:
                return
            now = monotonic_ns()
            # Send k (from 0) is due at k / rate.
            due = int((now - start) * per_ns) + 1 - pace["issued"]
            pace["ticks"] += 1
            if due <= 0:
                return
            # How late the oldest message due now is, against the ideal schedule.
            lag_ms = (now - start - pace["issued"] / per_ns) / 1e6
            if lag_ms > 2.0:
                pace["late_ticks"] += 1
            pace["max_lag_ms"] = max(pace["max_lag_ms"], lag_ms)
            issued: int = pace["issued"]
            for k in range(issued, issued + due):
                senders[k % len(senders)].send_one()
            pace["issued"] = issued + due

        pacer = task.LoopingCall(tick)
        pacer.clock = reactor  # type: ignore[assignment]
        pacer.start(0.001, now=True)
    try:
        result = yield phases(run)
    finally:
        run.sending = False
        if pacer is not None and pacer.running:
            pacer.stop()
        # Drain: outstanding sends and their deliveries, then the last acks.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(c.inflight for c in clients):
            yield sleep(0.05)
        yield sleep(0.2)
        for c in clients:
            c.flush_acks()
        yield sleep(0.2)
        acker.stop()
    if not run.closed_loop:
        result["pacing"] = {
            "target_rate": rate,
            "max_lag_ms": round(float(pace["max_lag_ms"]), 2),
            "late_ticks": pace["late_ticks"],
            "ticks": pace["ticks"],
        }
    return result


def traffic_summary(run: Run, n: int, cpu: dict[str, float]) -> dict[str, Any]:
    elapsed = cpu["elapsed_s"]
    expected = run.total_sends_acked * (n - 1)
    return {
        **cpu,
        "delivered": run.delivered,
        "delivered_per_s": round(run.delivered / elapsed, 1),
        "sends_acked_per_s": round(run.sends_acked / elapsed, 1),
        "sends_written_per_s": round(run.sends_written / elapsed, 1),
        "acks_per_s": round(run.acks_written / elapsed, 1),
        "latency": run.hist.summary(),
        "total_sends_acked": run.total_sends_acked,
        "total_delivered": run.total_delivered,
        "expected_deliveries": expected,
        "errors": run.errors,
        "first_error": run.first_error,
    }


@inlineCallbacks
def scenario_fanout(spec: dict[str, Any]) -> Any:
    run = Run(ceiling=spec["mode"] == "ceiling")
    clients = yield open_room(spec, run, spec["room"])

    @inlineCallbacks
    def phases(run: Run) -> Any:
        yield sleep(spec["warmup"])
        cpu = CpuWindow(spec["server_pid"])
        run.hist.t0 = monotonic_ns()
        run.recording = True
        yield sleep(spec["duration"])
        run.recording = False
        return {"cpu": cpu.stop()}

    out = yield drive(spec, run, clients, phases)
    cpu = out.pop("cpu")
    yield defer.gatherResults([c.close() for c in clients])
    return {**traffic_summary(run, spec["n"], cpu), **out}


@inlineCallbacks
def scenario_storm(spec: dict[str, Any]) -> Any:
    run = Run(ceiling=False)
    clients = yield open_room(spec, run, spec["room"])
    storm_run = Run(ceiling=False)
    storm: dict[str, Any] = {}

    spread = float(spec.get("storm_spread", 0.0))

    @inlineCallbacks
    def login_one(i: int, name: str) -> Any:
        if spread:  # a diagnostic: arrivals spread evenly instead of all at once
            yield sleep(spread * i / len(spec["storm_users"]))
        t0 = time.monotonic()
        client = yield connect(spec, storm_run, 10_000 + i)
        try:
            yield client.request("hello", version=1).addCallback(_check)
            reply = yield client.request(
                "login", username=name, password=PASSWORD, device={"id": "storm"}
            )
            _check(reply)
            return time.monotonic() - t0
        finally:
            yield client.close()

    @inlineCallbacks
    def phases(run: Run) -> Any:
        yield sleep(spec["warmup"])
        cpu = CpuWindow(spec["server_pid"])
        run.hist.t0 = monotonic_ns()
        run.recording = True
        yield sleep(spec["duration"])
        run.recording = False
        baseline = traffic_summary(run, spec["n"], cpu.stop())
        # The storm: every login starts now, the chat goes on.
        run.hist, run.delivered, run.sends_acked, run.sends_written = Histogram(), 0, 0, 0
        run.acks_written = 0
        cpu = CpuWindow(spec["server_pid"])
        run.hist.t0 = monotonic_ns()
        run.recording = True
        logins = [login_one(i, name) for i, name in enumerate(spec["storm_users"])]
        times = yield defer.gatherResults(logins, consumeErrors=True)
        run.recording = False
        during = traffic_summary(run, spec["n"], cpu.stop())
        times = sorted(times)
        storm.update(
            logins=len(times),
            login_first_s=round(times[0], 3),
            login_median_s=round(times[len(times) // 2], 3),
            login_last_s=round(times[-1], 3),
        )
        return {"baseline": baseline, "storm": during}

    out = yield drive(spec, run, clients, phases)
    yield defer.gatherResults([c.close() for c in clients])
    out["storm"].update(storm)
    out["errors"] = run.errors + storm_run.errors
    out["first_error"] = run.first_error or storm_run.first_error
    out["total_sends_acked"] = run.total_sends_acked
    out["total_delivered"] = run.total_delivered
    out["expected_deliveries"] = run.total_sends_acked * (spec["n"] - 1)
    return out


SCENARIOS: dict[str, Callable[[dict[str, Any]], Deferred[Any]]] = {
    "setup": scenario_setup,
    "fanout": scenario_fanout,
    "storm": scenario_storm,
}


def main() -> None:
    spec = json.loads(sys.stdin.read())
    from twisted.internet import reactor

    outcome: dict[str, Any] = {}

    def done(result: Any) -> None:
        outcome["result"] = result

    def failed(failure: Failure) -> None:
        failure.printTraceback(file=sys.stderr)
        outcome["error"] = failure.getErrorMessage()

    def start() -> None:
        d = SCENARIOS[spec["scenario"]](spec)
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]

    def overrun() -> None:
        failed(Failure(TimeoutError("time limit")))
        reactor.stop()  # type: ignore[attr-defined]

    # Bounded: whatever happens, the process ends.
    limit = reactor.callLater(float(spec.get("time_limit", 600)), overrun)  # type: ignore[attr-defined]
    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if limit.active():
        limit.cancel()
    sys.stdout.write("RESULT " + json.dumps(outcome) + "\n")
    sys.stdout.flush()
    sys.exit(0 if "result" in outcome else 1)


if __name__ == "__main__":
    cast(Any, main)()
