"""Connections per client address against a cap: one process's, or a cluster's.

``max_connections_per_address`` is only a bound if every process counts the same
connections: with N processes counting alone, one address could hold N times the cap.
`AddressCounts` is the single process's count; `RedisAddressCounts` keeps the counts in
Redis, each process its own:

* ``<prefix><kind>:node:<node>`` — a hash, address -> connections of that process,
  expiring ``ttl`` seconds after the process last touched it (`keepalive`);
* ``<prefix><kind>:nodes`` — the processes that have such a hash.

An address's count is the sum over the processes' hashes.  Admitting is one Lua script
(sum, refuse at the cap, else count), so two processes never both take the last place.
A dead process's connections are gone but its hash is not: `forget_node` (called by
whoever finds it dead) drops it at once, and without anyone calling it the hash expires
after ``ttl`` anyway, so a cluster restarted under new process names starts clean.

Redis down or slow: the process counts alone (its own cap still holds) and says so in the
log; an address can then hold up to the cap on each process.  Refusing every connection
instead would turn a Redis outage into a full outage.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shtalk.server.ishared import IAddressCounts
from shtalk.server.ops.redislink import RedisLink, Script

log = Logger()

ADMIT = Script("""
local total = 0
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local k = ARGV[5] .. n
  local v = redis.call('HGET', k, ARGV[2])
  if v then
    total = total + tonumber(v)
  elseif n ~= ARGV[3] and redis.call('EXISTS', k) == 0 then
    redis.call('SREM', KEYS[1], n)
  end
end
if total >= tonumber(ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[1], ARGV[3])
return 1
""")

RELEASE = Script("""
local mine = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if mine <= 0 then return 0 end
if mine == 1 then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
""")

FORGET = Script("""
local dropped = 0
for _, v in ipairs(redis.call('HVALS', KEYS[1])) do dropped = dropped + tonumber(v) end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
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

    ``kind`` names the count (``conns`` past the handshake, ``pending`` before it).
    """

    def __init__(
        self, link: RedisLink, node: str, cap: int, clock: IReactorTime, kind: str = "conns",
        ttl: float = 30.0,
    ) -> None:
        self.link = link
        self.node = node
        self.cap = cap
        self.clock = clock
        self.kind = kind
        self.ttl_ms = int(ttl * 1000)
        self.mine = AddressCounts(cap)  # this process's, also the fallback
        self.unavailable = 0  # admissions decided without Redis
        self._warned_at: float | None = None
        self._timer: IDelayedCall | None = None

    @property
    def local(self) -> dict[str, int]:
        return self.mine.local

    def _node(self, node: str) -> str:
        return self.link.key(self.kind, "node", node)

    def admit(self, address: str) -> Deferred[bool]:
        d = self.link.run(
            ADMIT, [self.link.key(self.kind, "nodes"), self._node(self.node)],
            [self.cap, address, self.node, self.ttl_ms, self._node("")],
        )

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
        d = self.link.run(RELEASE, [self._node(self.node)], [address, self.ttl_ms])
        d.addErrback(self._warn, "a closed connection is still counted for its address")

    def forget_node(self, name: str) -> Deferred[int]:
        """Drop the counts of process ``name`` (found dead); fires with how many
        connections that was."""
        d = self.link.run(FORGET, [self._node(name), self.link.key(self.kind, "nodes")], [name])
        return d.addCallback(int)

    # -- keeping this process's counts alive ------------------------------------------
    def keepalive(self) -> Deferred[None]:
        """Push this process's counts' expiry ``ttl`` on (never fails: logged)."""
        d = self.link.command("PEXPIRE", self._node(self.node), self.ttl_ms)
        return d.addCallbacks(lambda _: None, self._warn,
                              errbackArgs=("the connection counts may expire",))

    def start(self) -> None:
        """`keepalive` every third of ``ttl`` until `stop`."""
        self._timer = self.clock.callLater(self.ttl_ms / 3000, self._tick)

    def _tick(self) -> None:
        self.keepalive()
        self.start()

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _warn(self, failure: Failure, what: str) -> None:
        now = self.clock.seconds()
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY:
            return
        self._warned_at = now
        log.warn("connection counts: Redis did not answer ({reason}); {what}",
                 reason=(failure.getErrorMessage() or type(failure.value).__name__)[:200],
                 what=what, event="addresscounts.redis_unavailable")
