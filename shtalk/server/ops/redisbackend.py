"""Rate-limit buckets in Redis, shared by every server process that uses the same Redis.

Client: ``txredisapi`` (Twisted-native, non-blocking, on PyPI).  Why not a blocking
client (redis-py) in threads: a rate-limit check sits in front of every ``send``; a
thread hop per check adds a context switch and GIL hand-over to the hot path and ties
the number of checks in flight to the pool size, while txredisapi pipelines every check
over one TCP connection from the reactor thread.

One check is one ``EVALSHA`` of `TAKE_SCRIPT`: it refills and takes a token from every
bucket of the request (all or none) atomically inside Redis (or, with ``peek``, only
says how long until it could), using Redis's own clock
(``TIME``) so processes on hosts with skewed clocks still agree; each key expires once
its bucket would be full again, so idle buckets cost nothing.

Failure handling lives in `shtalk.server.ops.ratelimit.FallbackBuckets`: every call here is
bounded by ``timeout`` and fails (never hangs) when Redis is down or slow.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shtalk.server.ops.limit import Limit

log = Logger()

TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local wait = 0
local toks = {}
for i = 1, #KEYS do
  local cap = tonumber(ARGV[2 * i - 1])
  local rate = tonumber(ARGV[2 * i])
  local s = redis.call('HMGET', KEYS[i], 't', 'ts')
  local tok = cap
  if s[1] then
    tok = math.min(cap, tonumber(s[1]) + math.max(0, now - tonumber(s[2])) * rate)
  end
  toks[i] = tok
  if tok < 1 then wait = math.max(wait, (1 - tok) / rate) end
end
if ARGV[2 * #KEYS + 1] == 'peek' then return string.format('%.6f', wait) end
for i = 1, #KEYS do
  local cap = tonumber(ARGV[2 * i - 1])
  local rate = tonumber(ARGV[2 * i])
  local tok = toks[i]
  if wait == 0 then tok = tok - 1 end
  redis.call('HSET', KEYS[i], 't', string.format('%.6f', tok), 'ts', string.format('%.6f', now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(cap / rate * 1000) + 1000)
end
return string.format('%.6f', wait)
"""
TAKE_SHA = hashlib.sha1(TAKE_SCRIPT.encode()).hexdigest()  # noqa: S324 (Redis's script id)


class RedisUnavailable(Exception):
    """Redis did not answer (down, unreachable, too slow, or an error reply)."""


def parse_redis_url(url: str) -> tuple[str, int, int]:
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    return parts.hostname or "127.0.0.1", parts.port or 6379, db


def redis_credentials(url: str) -> dict[str, str]:
    """``username``/``password`` of ``redis://USER:PASSWORD@HOST:PORT/DB`` (AUTH at
    connect), for txredisapi's connection; empty when the URL has none."""
    parts = urlsplit(url)
    found: dict[str, str] = {}
    if parts.password:
        found["password"] = unquote(parts.password)
        if parts.username:
            found["username"] = unquote(parts.username)
    return found


class RedisBuckets:
    name = "redis"

    def __init__(
        self, url: str, prefix: str, clock: IReactorTime, timeout: float = 0.5
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.clock = clock
        self.timeout = timeout
        self.host, self.port, self.db = parse_redis_url(url)
        self._auth = redis_credentials(url)
        self._conn: Any = None
        self.calls = 0

    def _connection(self) -> Any:
        if self._conn is None:
            # Lazy: returns at once and connects (and reconnects) in the background.
            self._conn = txredisapi.lazyConnection(
                self.host, self.port, dbid=self.db, reconnect=True,
                connectTimeout=self.timeout, convertNumbers=False, **self._auth,
            )
        return self._conn

    def _bounded(self, d: Deferred[Any]) -> Deferred[Any]:
        d.addTimeout(self.timeout, self.clock)

        def failed(failure: Any) -> Any:
            raise RedisUnavailable(failure.getErrorMessage() or type(failure.value).__name__)

        return d.addErrback(failed)

    def take(
        self, keys: Sequence[str], limits: Sequence[Limit], peek: bool = False
    ) -> Deferred[float]:
        self.calls += 1
        args: list[str] = []
        for limit in limits:
            args.append(repr(limit.capacity))
            args.append(repr(limit.rate))
        args.append("peek" if peek else "take")
        full = [self.prefix + k for k in keys]
        d: Deferred[float] = self._take(full, args)
        return self._bounded(d)

    @inlineCallbacks
    def _take(self, keys: list[str], args: list[str]) -> Any:
        conn = self._connection()
        try:
            reply = yield conn.evalsha(TAKE_SHA, keys, args)
        except txredisapi.ScriptDoesNotExist:
            reply = yield conn.eval(TAKE_SCRIPT, keys, args)
        if isinstance(reply, bytes):
            reply = reply.decode()
        return float(reply)

    def ping(self) -> Deferred[Any]:
        try:
            d: Deferred[Any] = self._connection().ping()
        except Exception as e:  # txredisapi raises ConnectionError synchronously at times
            d = Deferred()
            d.errback(RedisUnavailable(str(e)))
            return d
        return self._bounded(d)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # shutting down; nothing to tell
                conn.disconnect()
