"""The bus's publishing connection: a reactor turn's publishes in one write, no answers.

See `Publisher` for why, and what stands in for the answers.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import txredisapi  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from shtalk.server.cluster.keepalive import Keepalive
from shtalk.server.cluster.subscriptions import PING, NoDelay, WhenConnected, write_now

log = Logger()


class BusPublisher(NoDelay, txredisapi.RedisProtocol):  # type: ignore[misc]
    """PUBLISH without a Deferred per message, written straight to the socket (`write_now`)."""

    owner: Publisher

    def send(self, data: bytes) -> None:
        write_now(self.transport, data)

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        if not self._ready:
            super().dataReceived(data, unpause)
            return
        reader = self._reader
        reader.feed(data)
        res = reader.gets()
        while res is not False:
            self.owner.reply(res)
            res = reader.gets()

    def connectionLost(self, why: Any) -> None:
        self.owner.lost(self)
        super().connectionLost(why)


#: Publishes kept while the publishing connection is down, sent once it is back.
KEEP_WHILE_DOWN = 10_000

REPLY_OFF = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n"
#: The publisher's keepalive: answered +OK, +PONG; its replies are off again after it.
KEEPALIVE = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$2\r\nON\r\n" + PING + REPLY_OFF


def publish_command(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel), channel, len(payload), payload)


class Publisher:
    """The publishing connection.

    The publishes of one reactor turn go out in one write, at the end of the turn
    (`flush`, a ``callLater(0)``: before the reactor next waits), so a group commit's
    messages cost one system call between them (those made while a committed batch's
    answers run: right after the last, `batch_ends`, without the timer).  Redis's
    answers are switched off (``CLIENT REPLY OFF``): a PUBLISH's answer is only the
    receiver count, and reading it was a read (often a wake-up) per message.  What
    they would have said is found another way: one probe PUBLISH on ``probe_channel``
    per connection, answered, tells whether Redis lets this connection publish (a
    refusal is logged with Redis's reason); and every ``keepalive`` seconds replies
    are on for one PING, so a connection that stopped answering is aborted and
    txredisapi reconnects.

    While the connection is down, the last `KEEP_WHILE_DOWN` publishes are kept and
    sent once it is back (receivers drop what they already have), so they need not
    wait for a reconciliation; older ones are dropped (counted) and the receivers read
    them from the store."""

    def __init__(
        self, clock: IReactorTime, probe_channel: bytes = b"-", keepalive: float = 1.0
    ) -> None:
        self.clock = clock
        self.probe = publish_command(probe_channel, b"")
        self.keepalive = keepalive
        self.transport: Any = None
        self.proto: Any = None
        self.published = 0
        self.dropped = 0
        self.refused = 0  # error replies (the first per connection is logged)
        self.writes = 0
        self.counts = 0  # PUBLISH answers received
        self._out: list[bytes] = []
        self._flush: IDelayedCall | None = None
        self._batch = 0  # inside a store batch's answers: written at its end
        self._keepalive = Keepalive(clock, keepalive, self._ping, "bus publisher")
        self._logged = False
        self._kept: deque[bytes] = deque(maxlen=KEEP_WHILE_DOWN)
        self._when = WhenConnected()

    def when_connected(self) -> Deferred[None]:
        return self._when.wait(self.transport is not None)

    def connected(self, proto: Any) -> None:
        self._cancel()
        self.proto, self.transport = proto, proto.transport
        self._logged = False
        kept, self._kept = self._kept, deque(maxlen=KEEP_WHILE_DOWN)
        self._out = [self.probe, REPLY_OFF, *kept, *self._out]
        self.flush()
        self._keepalive.start(proto)
        self._when.fire()

    def lost(self, proto: Any) -> None:
        if proto is not self.proto:
            return
        self.proto = self.transport = None
        self._cancel()
        out, self._out = self._out, []
        for command in out:  # never written: sent on the next connection
            self._keep(command)

    def stop(self) -> None:
        """Write what this turn published, and stop the keepalive."""
        self.flush()
        self._cancel()

    def publish(self, channel: bytes, payload: bytes) -> None:
        self.published += 1
        command = publish_command(channel, payload)
        if self.transport is None:
            self._keep(command)
            return
        self._out.append(command)
        if self._flush is None and not self._batch:
            self._flush = self.clock.callLater(0, self.flush)

    # The store's batches (`shtalk.server.store.groupcommit.BatchListener`): what the
    # answers of one committed batch publish is written after the last, with no timer.
    def batch_begins(self) -> None:
        self._batch += 1

    def batch_ends(self) -> None:
        self._batch = max(0, self._batch - 1)
        if not self._batch:
            self.flush()

    def flush(self) -> None:
        """Everything published since the last flush, in one write."""
        if self._flush is not None:
            if self._flush.active():
                self._flush.cancel()
            self._flush = None
        out = self._out
        if not out or self.proto is None:
            return
        self._out = []
        self.writes += 1
        self.proto.send(out[0] if len(out) == 1 else b"".join(out))

    def reply(self, res: Any) -> None:
        """An answer: the probe's, the keepalive's, or a refusal."""
        if type(res) is int:
            self.counts += 1  # a PUBLISH's receiver count: the probe's, or replies are on
        elif isinstance(res, Exception):
            self.refused += 1
            if not self._logged:
                self._logged = True
                log.warn("Redis refused a command of the bus's publisher: {error}",
                         error=str(res)[:120])
        elif res == b"PONG":
            self._keepalive.answered()

    def _keep(self, command: bytes) -> None:
        if len(self._kept) == KEEP_WHILE_DOWN:
            self.dropped += 1
        self._kept.append(command)

    def _ping(self) -> None:
        self._out.append(KEEPALIVE)
        self.flush()

    def _cancel(self) -> None:
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        self._keepalive.stop()
