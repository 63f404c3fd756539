"""One Redis connection for the state processes share: bounded calls, scripts by SHA.

The shared failure throttle, the CAPTCHA demands and the per-address connection counts
each keep a `RedisLink`: a lazy txredisapi connection (made, and remade, in the
background, on the reactor: no thread hop per call) whose every call fails with
`RedisUnavailable` after ``timeout`` instead of hanging, so each user of it can decide
what a missing answer means (fail closed for the throttle, keep the local view for the
demands).  Multi-step updates are Lua scripts (`Script`): Redis runs one at a time, so
each is atomic across processes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import txredisapi  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from shtalk.server.ops.redisbackend import RedisUnavailable, parse_redis_url, redis_credentials

__all__ = ["RedisLink", "RedisUnavailable", "Script"]

log = Logger()


@dataclass(frozen=True)
class Script:
    """A Lua script, sent once and then called by its SHA1 (Redis's script id)."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        sha = hashlib.sha1(self.source.encode()).hexdigest()  # noqa: S324 (Redis's script id)
        object.__setattr__(self, "sha", sha)


class RedisLink:
    """A lazy, reconnecting connection to the cluster's Redis; every key under ``prefix``."""

    def __init__(
        self, url: str, prefix: str, clock: IReactorTime, timeout: float = 0.5
    ) -> None:
        self.host, self.port, self.db = parse_redis_url(url)
        self._auth = redis_credentials(url)  # never in a repr or a log
        self.prefix = prefix
        self.clock = clock
        self.timeout = timeout
        self._conn: Any = None
        # Scripts Redis has seen from us: the first call of each is an EVAL, so that a
        # NOSCRIPT retry can never put it behind a command sent after it.
        self._loaded: set[str] = set()

    def __repr__(self) -> str:
        # The URL may hold a password: never in a repr.
        return f"<RedisLink {self.host}:{self.port}/{self.db} prefix={self.prefix!r}>"

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = txredisapi.lazyConnection(
                self.host, self.port, dbid=self.db, reconnect=True,
                connectTimeout=self.timeout, convertNumbers=False, **self._auth,
            )
            # A refusal at connect (a wrong password) ends txredisapi's retries and fails
            # this Deferred: say so once (every call then fails with RedisUnavailable).
            connected = getattr(self._conn, "_connected", None)
            if isinstance(connected, Deferred):
                connected.addErrback(self._refused)
        return self._conn

    def _refused(self, failure: Failure) -> None:
        log.error("Redis {where} refused this process ({reason}); fix [cluster] redis_url "
                  "and restart", where=f"{self.host}:{self.port}",
                  reason=(failure.getErrorMessage() or type(failure.value).__name__)[:200],
                  event="redis.refused")

    def _bounded(self, d: Deferred[Any]) -> Deferred[Any]:
        d.addTimeout(self.timeout, self.clock)

        def failed(failure: Any) -> Any:
            raise RedisUnavailable(failure.getErrorMessage() or type(failure.value).__name__)

        return d.addErrback(failed)

    def command(self, *args: Any) -> Deferred[Any]:
        """One Redis command (``"GET", key``), bounded by ``timeout``."""
        try:
            d: Deferred[Any] = self._connection().execute_command(*args)
        except Exception as e:  # txredisapi raises ConnectionError synchronously at times
            failed: Deferred[Any] = Deferred()
            failed.errback(RedisUnavailable(str(e)[:200]))
            return failed
        return self._bounded(d)

    def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Deferred[Any]:
        """``script`` over ``keys`` (full names) and ``args``, atomically, bounded."""
        keys, values = list(keys), [str(a) for a in args]
        try:
            conn = self._connection()
            if script.sha not in self._loaded:
                self._loaded.add(script.sha)
                d: Deferred[Any] = conn.eval(script.source, keys, values)
            else:
                d = conn.evalsha(script.sha, keys, values)
                d.addErrback(self._reload, conn, script, keys, values)
        except Exception as e:  # txredisapi raises ConnectionError synchronously at times
            d = Deferred()
            d.errback(RedisUnavailable(str(e)[:200]))
            return d
        return self._bounded(d)

    def _reload(
        self, failure: Failure, conn: Any, script: Script, keys: list[str], values: list[str]
    ) -> Any:
        """Redis restarted since the script was sent: send it again."""
        if not isinstance(failure.value, txredisapi.ScriptDoesNotExist):
            return failure
        self._loaded.clear()
        return conn.eval(script.source, keys, values)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # shutting down; nothing to tell
                conn.disconnect()
