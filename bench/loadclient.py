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

The connection itself (byte slicing on the hot path, JSON for control requests) and the
histogram are `bench.loadproto`'s.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from twisted.internet import defer, task
from twisted.internet.defer import Deferred, inlineCallbacks

from bench.common import bounded, child_main, sleep
from bench.cpu import CpuWindow
from bench.loadproto import (
    ACK_INTERVAL,
    Histogram,
    LoadClient,
    Run,
    check,
    connect,
    monotonic_ns,
    recorded,
)

PASSWORD = "bench-tangerine-quokka-43"


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
            yield client.request("hello", version=1).addCallback(check)
            reply = yield client.request(
                "register", username=name, password=PASSWORD, email=f"{name}@example.org"
            )
            check(reply, "username_taken")
            token = None
            if login:
                reply = yield client.request(
                    "login", username=name, password=PASSWORD, device={"id": "bench"}
                )
                token = check(reply)["access_token"]
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
            yield client.request("hello", version=1).addCallback(check)
            token = spec["tokens"][i]
            yield client.request("resume", access_token=token).addCallback(check)
            yield client.backlog_d
        return client

    jobs: list[Callable[[], Deferred[Any]]] = [partial(one, i) for i in range(n)]
    clients: list[LoadClient] = yield bounded(50, jobs)
    if not ceiling:
        yield clients[0].request("room_create", room=room).addCallback(check, "room_exists")
        joins = [
            c.request("room_join", room=room).addCallback(check, "already_member")
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
        # ``senders``: the indices of the connections that send (default: all).
        senders = [clients[i] for i in spec.get("senders", range(len(clients)))]
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
        cpu = yield recorded(run, spec)
        return {"cpu": cpu}

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
            yield client.request("hello", version=1).addCallback(check)
            reply = yield client.request(
                "login", username=name, password=PASSWORD, device={"id": "storm"}
            )
            check(reply)
            return time.monotonic() - t0
        finally:
            yield client.close()

    @inlineCallbacks
    def phases(run: Run) -> Any:
        baseline = traffic_summary(run, spec["n"], (yield recorded(run, spec)))
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
    sys.exit(0 if child_main(spec, SCENARIOS) else 1)


if __name__ == "__main__":
    cast(Any, main)()
