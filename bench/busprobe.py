"""Inside a shtalk server process (bench.cluster, two-process set-up): the CPU the Redis
bus's own code takes, counted by the bus's entry points, written to a file at exit.

Measured: the reactor thread's CPU time (``time.thread_time``: user and system, so the
socket writes and reads count) in the bus's entry points: publishing a committed message
(encoding the frame, the PUBLISH write, the sequencer), reading the subscription
connection (hiredis, decoding frames, the sequencer), reading the publisher's replies and
the sequencer's timer; minus what one process does without a bus as well, found nested in
them: encoding the push line and writing it to this process's connections.  Divided by
the messages published, it is the bus's CPU per message as the bus itself sees it.  Each
measured call costs two ``thread_time`` calls (about 1 µs) more than it would.

Installed before twistd runs (``python -c "import bench.busprobe as p; p.install(PATH);
<twistd>"``); an entry point the bus does not have is skipped and named in the file.
"""

from __future__ import annotations

import atexit
import importlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: (module, class or None for a module's function, name, role): "outer" is the bus's own
#: work, "inner" what one process does without a bus as well (a local delivery, encoding
#: the push) found inside it and subtracted, "count" only counted
POINTS = (
    ("shtalk.server.cluster.bus", "RedisBus", "publish", "outer"),
    ("shtalk.server.cluster.bus", "RedisBus", "_tick", "outer"),
    ("shtalk.server.cluster.subscriptions", "BusSubscriber", "dataReceived", "outer"),
    ("shtalk.server.cluster.publisher", "BusPublisher", "dataReceived", "outer"),
    # A reactor turn's publishes are written once, here.
    ("shtalk.server.cluster.publisher", "Publisher", "flush", "outer"),
    ("shtalk.server.cluster.bus", "RedisBus", "_deliver_line", "inner"),
    ("shtalk.server.chat.delivery", "LocalBus", "publish", "inner"),
    # Encoding the push line: one process without a bus does it too.
    ("shtalk.server.chat.pushes", None, "message", "inner"),
    ("shtalk.server.cluster.bus", "RedisBus", "_received", "count"),
    # Reads from the store: a gap in a mailbox's chain past gap_wait, a message too large
    # to travel inline.
    ("shtalk.server.cluster.bus", "RedisBus", "fill", "count"),
    ("shtalk.server.cluster.bus", "RedisBus", "_read_one", "count"),
)


class Probe:
    def __init__(self) -> None:
        self.depth = 0
        self.inner_depth = 0
        self.reads = 0  # clock reads inside measured calls: the probe's own cost
        self.read_cost_s = _read_cost()
        self.cal_s = 0.0  # back-to-back reads sampled among the measured calls
        self.cal_n = 0
        self.outer_s = 0.0
        self.inner_s = 0.0
        self.counts: dict[str, int] = {}
        self.seconds: dict[str, float] = {}  # per entry point (an outer one with its inner)
        self.installed: list[str] = []
        self.missing: list[str] = []

    def wrap(self, name: str, fn: Callable[..., Any], role: str) -> Callable[..., Any]:
        clock = time.thread_time
        counts = self.counts
        counts[name] = 0
        seconds = self.seconds
        seconds[name] = 0.0

        if role == "outer":
            def outer(*args: Any, **kwargs: Any) -> Any:
                counts[name] += 1
                if self.depth:
                    return fn(*args, **kwargs)
                self.depth += 1
                self.reads += 1
                t = clock()
                try:
                    return fn(*args, **kwargs)
                finally:
                    spent = clock() - t
                    self.outer_s += spent
                    seconds[name] += spent
                    self.depth -= 1
                    if not counts[name] & 63:
                        # What a read costs here, among the server's own work (caches
                        # cold, the machine busy), not in a loop at start-up.
                        a = clock()
                        self.cal_s += clock() - a
                        self.cal_n += 1
            return outer
        if role == "inner":
            def inner(*args: Any, **kwargs: Any) -> Any:
                if not self.depth or self.inner_depth:
                    return fn(*args, **kwargs)
                counts[name] += 1
                self.inner_depth += 1
                self.reads += 1  # an inner call's two reads add about one to the outer
                t = clock()
                try:
                    return fn(*args, **kwargs)
                finally:
                    spent = clock() - t
                    self.inner_s += spent
                    seconds[name] += spent
                    self.inner_depth -= 1
            return inner

        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)
        return counted

    def read_cost(self) -> float:
        return self.cal_s / self.cal_n if self.cal_n else self.read_cost_s

    def report(self) -> dict[str, Any]:
        return {"bus_cpu_s": self.outer_s - self.inner_s, "outer_s": self.outer_s,
                "inner_s": self.inner_s, "counts": self.counts,
                "seconds": self.seconds,
                # about one clock read per measured call lands in what is counted
                "probe_cost_s": self.reads * self.read_cost(),
                "read_cost_s": self.read_cost(), "read_cost_loop_s": self.read_cost_s,
                "installed": self.installed, "missing": self.missing}


def _read_cost() -> float:
    """Seconds one ``thread_time`` call takes here (a system call on Linux)."""
    clock = time.thread_time
    t = time.perf_counter()
    for _ in range(20000):
        clock()
    return (time.perf_counter() - t) / 20000


def install(out_path: str) -> None:
    probe = Probe()
    for module_name, cls_name, method, role in POINTS:
        name = f"{cls_name or module_name.rsplit('.', 1)[1]}.{method}"
        try:
            module = importlib.import_module(module_name)
            owner = module if cls_name is None else getattr(module, cls_name)
            fn = owner.__dict__[method]
        except (ImportError, AttributeError, KeyError):
            probe.missing.append(name)
            continue
        setattr(owner, method, probe.wrap(name, fn, role))
        probe.installed.append(name)
    written = False

    def dump() -> None:
        nonlocal written
        if not written:
            written = True
            Path(out_path).write_text(json.dumps(probe.report()))

    atexit.register(dump)
    from twisted.internet import reactor

    reactor.addSystemEventTrigger("after", "shutdown", dump)  # type: ignore[attr-defined]
