"""The load generator's connection: control requests over JSON, the hot path over byte
slicing, and the latency histogram every benchmark of the message path reads.

Shared by the scenarios of `bench.loadclient` and the plaintext baseline of `bench.e2e`,
so both measure a raw client the same way.  Hot-path parsing is byte slicing, not JSON:
the push layout (``{"type":"message","seq":N,...,"client_id":"...",...}``) is shtalk's
fixed key order.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from bench.common import sleep
from bench.cpu import CpuWindow
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
        #: a second histogram for this recipient's deliveries (bench.cluster: local/remote)
        self.group: Histogram | None = None

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
                    if self.group is not None:
                        self.group.add(now - sent_at, now)
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


@inlineCallbacks
def recorded(run: Run, spec: dict[str, Any],
             window: Callable[[int], Any] = CpuWindow) -> Any:
    """After ``spec["warmup"]`` seconds, ``spec["duration"]`` seconds recorded into
    ``run``; the CPU of that window (``window(server pid).stop()``)."""
    yield sleep(spec["warmup"])
    cpu = window(spec["server_pid"])
    run.hist.t0 = monotonic_ns()
    run.recording = True
    yield sleep(spec["duration"])
    run.recording = False
    return cpu.stop()


def check(reply: dict[str, Any], *allowed: str) -> dict[str, Any]:
    if reply.get("ok"):
        return reply
    code = reply.get("error", {}).get("code")
    if code in allowed:
        return reply
    raise RuntimeError(f"request refused: {reply}")


def port_of(spec: dict[str, Any], index: int) -> int:
    """The port connection ``index`` uses: ``spec["port"]``, or with ``placement`` (one
    process index per connection) that process's of ``spec["ports"]``."""
    placement = spec.get("placement")
    if placement is None:
        return int(spec["port"])
    return int(spec["ports"][placement[index % len(placement)]])


@inlineCallbacks
def connect(spec: dict[str, Any], run: Run, index: int, room: str = "") -> Any:
    from twisted.internet import reactor

    options = client_options_pinned(spec["fingerprint"], "127.0.0.1")
    endpoint = endpoints.SSL4ClientEndpoint(  # type: ignore[no-untyped-call]
        reactor, "127.0.0.1", port_of(spec, index), options, timeout=30
    )
    client = LoadClient(run, index, room)
    client.ack_batch = int(spec.get("ack_batch", ACK_BATCH))
    yield endpoints.connectProtocol(endpoint, client)
    return client
