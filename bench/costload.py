"""The load of `bench.cost`: a fixed number of sends into one room, each batch of them
counted by the server's callgrind alone.

Run as ``python -m bench.costload`` with a JSON spec on stdin (`bench.common.run_child`);
prints ``RESULT {...}``.  The room is `bench.loadclient`'s (``n`` connections, the same
`bench.loadproto` connection, every delivery acknowledged in batches as the product's
client does).  Then, for each entry of ``windows`` (a number of sends per sender):

1. ``callgrind_control -z`` and ``-i on`` for the server's process (``server_pid``, run
   under ``valgrind --tool=callgrind --instr-atstart=no``), unless it is a warm-up;
2. the first ``senders`` connections each send that many messages, ``window`` in flight
   (closed loop: the next goes when one is answered);
3. wait until every send is answered, every delivery arrived, every ack is answered, then
   ``settle`` seconds for the server's work that follows them (the store's commits);
4. ``-i off`` and ``-d`` (dump): one callgrind file per window, in order.

A window counts instructions only while the server has exactly that work to do, so the
difference between two windows over the difference of their deliveries is the cost of a
delivery, whatever set-up, start-up and the waits between windows cost.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any, cast

from twisted.internet.defer import inlineCallbacks

from bench.common import child_main, sleep
from bench.loadclient import open_room
from bench.loadproto import ACK, LoadClient, Run


def callgrind(pid: int, *command: str) -> None:
    """Tell the valgrind'd server ``pid`` to do ``command`` (blocks the reactor: only
    between windows, while nothing is in flight)."""
    out = subprocess.run(["callgrind_control", *command, str(pid)], capture_output=True,
                         text=True, timeout=120)
    if out.returncode != 0 or "OK" not in out.stdout:
        raise RuntimeError(f"callgrind_control {' '.join(command)}: {out.stdout}{out.stderr}")


def acks_pending(run: Run, clients: list[LoadClient]) -> bool:
    if run.ceiling:
        return any(c._fifo for c in clients)
    return any(kind == ACK for c in clients for kind in c._kinds.values())


@inlineCallbacks
def one_window(spec: dict[str, Any], run: Run, clients: list[LoadClient],
               per_sender: int, deadline: float) -> Any:
    """Send ``per_sender`` messages from each sender; the deliveries and sends counted."""
    senders = clients[: int(spec["senders"])]
    window = int(spec["window"])
    delivered0, acked0 = run.total_delivered, run.total_sends_acked
    quota = {id(c): per_sender for c in senders}
    started = time.monotonic()

    def top_up() -> None:
        for c in senders:
            while quota[id(c)] and c.inflight < window:
                quota[id(c)] -= 1
                c.send_one()

    expected_sends = per_sender * len(senders)
    expected = expected_sends * (len(clients) - 1)
    # Closed loop by hand: loadproto's own refill (run.sending) would not stop at a count.
    while (run.total_sends_acked - acked0 < expected_sends
           or run.total_delivered - delivered0 < expected):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"window of {per_sender} sends per sender not done in time: "
                f"{run.total_sends_acked - acked0}/{expected_sends} sends answered, "
                f"{run.total_delivered - delivered0}/{expected} delivered")
        top_up()
        yield sleep(0.002)
    for c in clients:
        c.flush_acks()
    while acks_pending(run, clients) and time.monotonic() < deadline:
        yield sleep(0.01)
    yield sleep(float(spec["settle"]))
    return {
        "per_sender": per_sender,
        "sends": run.total_sends_acked - acked0,
        "delivered": run.total_delivered - delivered0,
        "seconds": round(time.monotonic() - started, 2),
        "errors": run.errors,
    }


@inlineCallbacks
def scenario_cost(spec: dict[str, Any]) -> Any:
    run = Run(ceiling=spec["mode"] == "ceiling")
    clients = yield open_room(spec, run, spec["room"])
    deadline = time.monotonic() + float(spec["time_limit"]) - 20
    pid = int(spec["server_pid"])
    out = []
    try:
        for i, per_sender in enumerate(spec["windows"]):
            measured = i >= int(spec.get("warmup_windows", 1))
            if measured:
                callgrind(pid, "-z")
                callgrind(pid, "-i", "on")
            r = yield one_window(spec, run, clients, int(per_sender), deadline)
            if measured:
                callgrind(pid, "-i", "off")
                callgrind(pid, "-d", f"window{i}")
            r["measured"] = measured
            out.append(r)
            if run.errors:
                raise RuntimeError(f"errors from the server: {run.first_error}")
    finally:
        for c in clients:
            c.close()
    return {"windows": out}


def main() -> None:
    spec = json.loads(sys.stdin.read())
    sys.exit(0 if child_main(spec, {"cost": scenario_cost}) else 1)


if __name__ == "__main__":
    cast(Any, main)()
