"""CPU accounting from /proc for the benchmarks: one process, one thread, the whole
machine and every other process, so that a run disturbed by other work shows it.

A figure is only comparable with its baseline when both were charged CPU the same way;
every benchmark takes its CPU figures from here.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any


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


def grown(start: dict[int, float], end: dict[int, float]) -> float:
    """CPU used between two samples; processes that ended meanwhile count as 0 (unknown),
    processes that started meanwhile count in full."""
    return sum(t - start.get(pid, 0.0) for pid, t in end.items())


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class CpuWindow:
    """The CPU of this process, of a server (and its reactor thread), of the machine and
    of everything else on it, between construction and `stop`."""

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
            "other_processes_cores": round(grown(self.start[7], end[7]) / elapsed, 3),
        }


def wait_idle(pid: int, limit: float = 120.0) -> float:
    """Wait until a server uses under 5 % of a core over half a second: it has worked off
    what the last scenario left queued (an open loop that outruns it leaves work inside it
    after the load generator is gone; the next scenario must not start on top of it).
    Returns the seconds waited (reported: it is how long an overload takes to drain)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = cpu_seconds_of(pid)
        time.sleep(0.5)
        if cpu_seconds_of(pid) - before < 0.5 * 0.05:
            break
    return round(time.monotonic() - started, 1)


def least_disturbed(args: argparse.Namespace, attempt: Callable[[int], dict[str, Any]],
                    log: Callable[[str], None],
                    between: Callable[[], object] | None = None) -> dict[str, Any]:
    """``attempt(i)`` repeated (up to ``args.retries``) while other processes on the
    machine disturbed it (``args.max_other`` cores); the least disturbed attempt, with
    ``attempts`` set."""
    best: dict[str, Any] | None = None
    for i in range(1 + args.retries):
        r = attempt(i)
        r["attempts"] = i + 1
        if best is None or r["other_processes_cores"] < best["other_processes_cores"]:
            best = r
        if r["other_processes_cores"] <= args.max_other:
            break
        log(f"  disturbed: other processes used {r['other_processes_cores']:.2f} cores; again")
        if between is not None:
            between()
    assert best is not None
    return best


def _title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def postgres_pids(database: str | None) -> list[int]:
    """The PostgreSQL processes of one database (its backends, autovacuum on it), or with
    ``database=None`` the server-wide ones (postmaster, WAL writer, checkpointer, ...),
    which work for every database on the server, other people's included.

    Read from the process titles (``postgres: 15/main: USER DB HOST(PORT) STATE``), so no
    connection is needed and nothing is added to what is measured."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "postgres":
                    continue
        except OSError:
            continue
        words = _title(int(entry)).split()
        is_backend = any((w.endswith(")") and "(" in w) or w == "[local]" for w in words)
        if database is None:
            if not is_backend and "worker" not in words:
                found.append(int(entry))
        elif database in words:
            found.append(int(entry))
    return found


class GroupCpuWindow:
    """The CPU of named groups of processes (each group's pids are looked up at both ends:
    a database's backends come and go), of this process, of the machine and of every
    other process, between construction and `stop`.  A process that ended in the window
    counts 0, one that started in it counts in full (`grown`).  The groups named in
    ``main_threads`` count only each process's main thread (a server's reactor)."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]],
                 main_threads: frozenset[str] = frozenset()) -> None:
        self.groups = groups
        self.main_threads = main_threads
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, dict[str, dict[int, float]], tuple[float, ...],
                               dict[int, float]]:
        per_group = {name: {pid: cpu_seconds_of(pid, pid if name in self.main_threads else None)
                            for pid in pids()}
                     for name, pids in self.groups.items()}
        mine = {os.getpid(), os.getppid()}.union(*(set(g) for g in per_group.values()))
        return (time.monotonic(), own_cpu_seconds(), per_group, machine_cpu(),
                other_processes_cpu(mine))

    def stop(self) -> dict[str, Any]:
        end = self._sample()
        elapsed = end[0] - self.start[0]
        # A pid in a group at one end only is still not "other" at the other end.
        ours = set().union(*(set(g) for g in end[2].values()),
                           *(set(g) for g in self.start[2].values()))
        other = grown({p: t for p, t in self.start[4].items() if p not in ours},
                      {p: t for p, t in end[4].items() if p not in ours})
        return {
            "elapsed_s": round(elapsed, 3),
            "loadgen_cpu": round((end[1] - self.start[1]) / elapsed, 3),
            # In cores, per group of processes.
            "groups_cpu": {name: round(grown(self.start[2][name], end[2][name]) / elapsed, 4)
                           for name in self.groups},
            "machine_busy_cores": round((end[3][0] - self.start[3][0]) / elapsed, 3),
            "machine_steal_cores": round((end[3][1] - self.start[3][1]) / elapsed, 3),
            "other_processes_cores": round(other / elapsed, 3),
        }
