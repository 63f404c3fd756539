"""bcrypt hashing, always off the reactor thread (the policy: shtalk.wire.passwords).

bcrypt runs in a pool of its own sized to leave a core for the reactor: a
login storm then queues behind the pool instead of starving message delivery
(the reactor thread competes with at most ``threads`` hashing threads), and
the pool's threads run at a lower CPU priority (``[accounts] bcrypt_nice``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Callable

import bcrypt
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from shtalk.wire.passwords import BCRYPT_MAX_BYTES


class PasswordHasher:
    """bcrypt in a dedicated thread pool; construction starts nothing."""

    def __init__(
        self,
        reactor: IReactorFromThreads | IReactorThreads,
        cost: int = 12,
        threads: int | None = None,
        nice: int = 0,
    ) -> None:
        self.cost = cost
        self.nice = nice
        self._niced = threading.local()
        self._reactor = reactor
        n = threads if threads is not None else max(1, (os.cpu_count() or 2) - 1)
        self.pool = ThreadPool(minthreads=0, maxthreads=n, name="shtalk-bcrypt")
        self._dummy: bytes | None = None

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()

    def _run(self, f: Callable[..., object], *args: object) -> Deferred[object]:
        return deferToThreadPool(
            self._reactor, self.pool, self._in_thread, f, *args  # type: ignore[arg-type]
        )

    def _in_thread(self, f: Callable[..., object], *args: object) -> object:
        # bcrypt releases the GIL but not the CPU: a storm of logins would take
        # the core the reactor needs.  At a lower priority (Linux: per thread) the
        # chat keeps its latency and the logins take longer instead.
        if self.nice and not getattr(self._niced, "done", False):
            self._niced.done = True
            with contextlib.suppress(AttributeError, OSError):
                tid = threading.get_native_id()
                if os.getpriority(os.PRIO_PROCESS, tid) < self.nice:
                    os.setpriority(os.PRIO_PROCESS, tid, self.nice)
        return f(*args)

    def hash(self, password: str) -> Deferred[bytes]:
        pw = password.encode("utf-8")
        return self._run(bcrypt.hashpw, pw, bcrypt.gensalt(self.cost))  # type: ignore[return-value]

    def _check(self, password: bytes, hashed: bytes | None) -> bool:
        if hashed is None:
            # Unknown user: the same work against a dummy hash (ENUM-1).
            if self._dummy is None:
                self._dummy = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(self.cost))
            hashed = self._dummy
            bcrypt.checkpw(password[:BCRYPT_MAX_BYTES], hashed)
            return False
        if len(password) > BCRYPT_MAX_BYTES:
            # bcrypt >= 5 raises here; over-long input is an ordinary failure.
            # Still do the work so the reply time does not tell.
            bcrypt.checkpw(password[:BCRYPT_MAX_BYTES], hashed)
            return False
        return bcrypt.checkpw(password, hashed)

    def check(self, password: str, hashed: bytes | None) -> Deferred[bool]:
        """Fire True only for a match; unknown users (``hashed=None``) cost the same."""
        return self._run(self._check, password.encode("utf-8"), hashed)  # type: ignore[return-value]
