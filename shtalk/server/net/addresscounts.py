"""Connections per client address against a cap: one process's, or a cluster's.

``max_connections_per_address`` is only a bound if every process counts the same
connections: with N processes counting alone, one address could hold N times the cap.
`AddressCounts` is the single process's count; `RedisAddressCounts` keeps the count in
Redis, where every process adds and removes its own:

* ``<prefix><kind>:addr:<address>`` — connections of the address, all processes;
* ``<prefix><kind>:node:<node>`` — a hash, address -> connections, of one process.

Admitting is one Lua script (read the total, refuse at the cap, else count in both), so
two processes never both take the last place.  When a process dies its connections are
gone but its counts are not: `forget_node` (called by whoever finds it dead, and by a
process for its own name as it starts) takes its hash off the totals.

Redis down or slow: the process counts alone (its own cap still holds) and says so in the
log; an address can then hold up to the cap on each process.  Refusing every connection
instead would turn a Redis outage into a full outage.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shtalk.server.iserver import IAddressCounts
from shtalk.server.ops.redislink import RedisLink, Script

log = Logger()

ADMIT = Script("""
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
return 1
""")

RELEASE = Script("""
local mine = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if mine <= 0 then return 0 end
if mine == 1 then
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  redis.call('HINCRBY', KEYS[2], ARGV[1], -1)
end
if redis.call('DECR', KEYS[1]) <= 0 then redis.call('DEL', KEYS[1]) end
return 1
""")

# The totals' names are built from the hash's fields, so this script names keys it was
# not given: fine on one Redis (what a cluster of shtalk processes shares), not on a
# Redis Cluster.
FORGET = Script("""
local all = redis.call('HGETALL', KEYS[1])
local dropped = 0
for i = 1, #all, 2 do
  local k = ARGV[1] .. all[i]
  local n = tonumber(all[i + 1])
  if redis.call('DECRBY', k, n) <= 0 then redis.call('DEL', k) end
  dropped = dropped + n
end
redis.call('DEL', KEYS[1])
return dropped
""")

#: Seconds between two warnings that Redis did not answer.
WARN_EVERY = 60.0


@implementer(IAddressCounts)
class AddressCounts:
    """One process's connections per address."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.local: dict[str, int] = {}

    def admit(self, address: str) -> bool:
        n = self.local.get(address, 0)
        if n >= self.cap:
            return False
        self.local[address] = n + 1
        return True

    def release(self, address: str) -> None:
        n = self.local.get(address, 0) - 1
        if n > 0:
            self.local[address] = n
        else:
            self.local.pop(address, None)


@implementer(IAddressCounts)
class RedisAddressCounts:
    """Connections per address, counted by every process in Redis (see the module doc).

    ``kind`` names the count (``conns`` past the handshake; another name, another count).
    """

    def __init__(
        self, link: RedisLink, node: str, cap: int, clock: IReactorTime, kind: str = "conns"
    ) -> None:
        self.link = link
        self.node = node
        self.cap = cap
        self.clock = clock
        self.kind = kind
        self.mine = AddressCounts(cap)  # this process's, also the fallback
        self.unavailable = 0  # admissions decided without Redis
        self._warned_at: float | None = None

    @property
    def local(self) -> dict[str, int]:
        return self.mine.local

    def _total(self, address: str) -> str:
        return self.link.key(self.kind, "addr", address)

    def _node(self, node: str) -> str:
        return self.link.key(self.kind, "node", node)

    def admit(self, address: str) -> Deferred[bool]:
        d = self.link.run(ADMIT, [self._total(address), self._node(self.node)],
                          [self.cap, address])

        def decided(reply: Any) -> bool:
            if int(reply) != 1:
                return False
            self.mine.local[address] = self.mine.local.get(address, 0) + 1
            return True

        def alone(failure: Failure) -> bool:
            self.unavailable += 1
            self._warn(failure, "counting connections per address in this process only")
            return self.mine.admit(address)

        return d.addCallbacks(decided, alone)

    def release(self, address: str) -> None:
        self.mine.release(address)
        d = self.link.run(RELEASE, [self._total(address), self._node(self.node)], [address])
        d.addErrback(self._warn, "a closed connection is still counted for its address")

    def forget_node(self, name: str) -> Deferred[int]:
        """Take the counts of process ``name`` (dead, or this one restarting under the
        same name) off the totals; fires with how many connections that was."""
        d = self.link.run(FORGET, [self._node(name)], [self.link.key(self.kind, "addr", "")])
        return d.addCallback(int)

    def _warn(self, failure: Failure, what: str) -> None:
        now = self.clock.seconds()
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY:
            return
        self._warned_at = now
        log.warn("connection counts: Redis did not answer ({reason}); {what}",
                 reason=(failure.getErrorMessage() or type(failure.value).__name__)[:200],
                 what=what, event="addresscounts.redis_unavailable")
