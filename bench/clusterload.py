"""The cluster benchmark's load generator: bench.loadclient's fan-out with each connection
placed on one process of a cluster, latency also kept per group of recipients, and CPU
per group of processes (shtalk's, the database's backends, PostgreSQL's server-wide
processes, Redis).

Run by `bench.cluster` as ``python -m bench.clusterload`` with a JSON spec on stdin, like
`bench.loadclient` (whose connections, scenarios' set-up and traffic it reuses); besides
that scenario's keys the spec has:

``ports`` and ``placement``
    one port per process, and for each connection the index of the process it uses.
``senders``
    (open loop) the connections that send, round-robin; default all.
``groups``
    ``{name: [connection indices]}``: a latency histogram per group of recipients, e.g.
    ``local`` and ``remote`` to the senders' process.
``cpu``
    ``{name: {"pids": [...]} | {"reactors": [...]} | {"postgres": DATABASE} |
    {"postgres": null}}``: the groups of processes (``reactors``: their main threads only)
    whose CPU is reported (cores over the window) as ``groups_cpu``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks

from bench.common import child_main
from bench.cpu import GroupCpuWindow, postgres_pids
from bench.loadclient import drive, open_room, scenario_setup, traffic_summary
from bench.loadproto import Histogram, LoadClient, Run, recorded


def pid_group(what: dict[str, Any]) -> Callable[[], list[int]]:
    """The pids of one ``cpu`` group, looked up when called."""
    if "postgres" in what:
        return partial(postgres_pids, what["postgres"])
    return partial(list, what.get("pids") or what["reactors"])


def main_threads(groups: dict[str, dict[str, Any]]) -> frozenset[str]:
    """The ``cpu`` groups counted by their processes' main (reactor) threads only."""
    return frozenset(name for name, what in groups.items() if "reactors" in what)


def pid_groups(spec: dict[str, Any]) -> dict[str, Callable[[], list[int]]]:
    return {name: pid_group(what) for name, what in spec.get("cpu", {}).items()}


PG_COUNTERS = ("xact_commit", "xact_rollback", "tup_inserted", "tup_updated", "tup_deleted",
               "tup_fetched", "blks_hit")


def pg_counters(url: str) -> dict[str, float]:
    """The database's activity counters (pg_stat_database) and the time, read over a
    connection of our own (a few ms, just outside the measured window)."""
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT " + ", ".join(PG_COUNTERS) + " FROM pg_stat_database "  # noqa: S608
            "WHERE datname = current_database()").fetchone()
    assert row is not None
    return {"t": time.monotonic(), **{k: float(v) for k, v in zip(PG_COUNTERS, row,
                                                                     strict=True)}}


class Window:
    """`GroupCpuWindow`, and with a database URL the database's activity per second over
    the same window (PostgreSQL publishes a backend's counters within a second or so of
    its transactions: an approximation over a window of several seconds)."""

    def __init__(self, cpu: Callable[..., GroupCpuWindow], groups: Any, threads: Any,
                 url: str | None) -> None:
        self.url = url
        self.before = pg_counters(url) if url else None
        self.cpu = cpu(groups, threads)

    def stop(self) -> dict[str, Any]:
        out = self.cpu.stop()
        if self.url and self.before is not None:
            after = pg_counters(self.url)
            elapsed = after["t"] - self.before["t"]
            out["pg_per_s"] = {k: round((after[k] - self.before[k]) / elapsed, 1)
                               for k in PG_COUNTERS}
        return out


@inlineCallbacks
def scenario_placed(spec: dict[str, Any]) -> Any:
    """N connections (on the processes ``placement`` says) in one room: a closed loop
    (``rate`` 0, all send) or an open loop from ``senders``; bench.loadclient's figures,
    plus latency per recipient group and CPU per process group."""
    run = Run(ceiling=False)
    clients: list[LoadClient] = yield open_room(spec, run, spec["room"])
    hists = {name: Histogram() for name in spec.get("groups", {})}
    for name, members in spec.get("groups", {}).items():
        for i in members:
            clients[i].group = hists[name]
    groups = pid_groups(spec)

    def window(_pid: int) -> Window:
        return Window(GroupCpuWindow, groups, main_threads(spec.get("cpu", {})),
                      spec.get("pg_url"))

    @inlineCallbacks
    def phases(run: Run) -> Any:
        cpu = yield recorded(run, spec, window=window)
        return {"cpu": cpu}

    out = yield drive(spec, run, clients, phases)
    cpu = out.pop("cpu")
    yield defer.gatherResults([c.close() for c in clients])
    result = {**traffic_summary(run, spec["n"], cpu), **out}
    result["group_latency"] = {name: h.summary() for name, h in hists.items()}
    for lat in (result["latency"], *result["group_latency"].values()):
        lat.pop("timeline_max_ms", None)  # per-100 ms worst: not reported here
    return result


SCENARIOS: dict[str, Callable[[dict[str, Any]], Deferred[Any]]] = {
    "setup": scenario_setup,
    "placed": scenario_placed,
}


def main() -> None:
    spec = json.loads(sys.stdin.read())
    sys.exit(0 if child_main(spec, SCENARIOS) else 1)


if __name__ == "__main__":
    main()
