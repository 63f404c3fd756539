"""LocalStore: the client's encrypted SQLite file (keys, sessions, history).

Why it looks like this (docs/CLIENT.md specifies the API, docs/SECURITY.md
"Client local store" the threat model):

* A stolen file (laptop, backup) must reveal neither keys nor messages nor who
  we talk to.  Sensitive columns are sealed with AES-256-GCM under a random
  32-byte *data key*; the data key is stored wrapped (AES-256-GCM) under a key
  derived from the passphrase with Argon2id.  A wrong passphrase fails the GCM
  tag of the wrapped key -> :class:`WrongPassphrase`, never a garbage key.
  Changing the passphrase re-wraps only the data key.
* Row keys and conversation names are metadata too: the clear columns hold
  HMAC-SHA256 values under a subkey of the data key; the plain names travel
  inside the sealed values.  Only ``ts`` and ``expires_at`` stay in clear
  (ordering, paging, expiry), and they are bound into the body's associated
  data, so editing them makes the row fail to decrypt.
* Associated data binds every sealed value to its table, column, kind and
  (hashed) key: a value copied to another row fails with :class:`CorruptEntry`.
* ``commit()`` is ONE SQLite transaction (WAL, synchronous=FULL): the ratchet
  state that consumed a message key and the message it decrypted are saved
  together, so a crash can neither replay a message nor lose one.
* No SQL, sealing or unsealing on the reactor thread: one connection on one
  thread of its own (``SQLiteThread``: every operation in call order, and a
  cheap hand-off, which matters twice per message); Argon2id runs in the
  reactor's thread pool.
"""

from __future__ import annotations

import hmac
import os
import sqlite3
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from shtalk.client import localschema, localseal
from shtalk.client.errors import CorruptEntry, LocalStoreError, StoreClosed, WrongPassphrase
from shtalk.client.localschema import STATES, HistoryMessage, Put
from shtalk.client.localseal import DEFAULT_KDF, KdfParams
from shtalk.sqlitethread import SQLiteThread

__all__ = [
    "DEFAULT_KDF",
    "STATES",
    "CorruptEntry",
    "HistoryMessage",
    "KdfParams",
    "LocalStore",
    "LocalStoreError",
    "StoreClosed",
    "WrongPassphrase",
]

T = TypeVar("T")
Conn = sqlite3.Connection

# --- validation (on the caller's thread, before anything is written) ----------


def _check_str(value: object, what: str, empty: bool = True) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if not empty and not value:
        raise ValueError(f"{what} must not be empty")
    value.encode("utf-8")  # lone surrogates cannot be stored: fail now, not mid-commit


def _check_state(state: object) -> None:
    if state not in STATES:
        raise ValueError(f"unknown message state {state!r}; one of {sorted(STATES)}")


def _check_message(m: object) -> None:
    if not isinstance(m, HistoryMessage):
        raise TypeError(f"messages must be HistoryMessage, not {type(m).__name__}")
    _check_str(m.id, "message id", empty=False)
    _check_str(m.conversation, "conversation", empty=False)
    for value, what in ((m.sender, "sender"), (m.sender_device, "sender_device"), (m.body, "body")):
        _check_str(value, what)
    if isinstance(m.ts, bool) or not isinstance(m.ts, int) or not -(1 << 63) <= m.ts < 1 << 63:
        raise TypeError("ts must be an int (milliseconds)")
    if m.expires_at is not None and (
        isinstance(m.expires_at, bool) or not isinstance(m.expires_at, int | float)
    ):
        raise TypeError("expires_at must be a number or None")
    _check_state(m.state)


def _check_puts(puts: Sequence[Put]) -> None:
    for put in puts:
        kind, key, value = put
        _check_str(kind, "kind", empty=False)
        _check_str(key, "key")
        if value is not None and not isinstance(value, bytes):
            raise TypeError(f"values must be bytes or None, not {type(value).__name__}")


# --- the store ---------------------------------------------------------------


class _Written:
    """The key/value entries the file holds, as this store last committed them.

    A sending chain is saved reserved ahead, so most messages sent leave their
    session's value exactly as the file already holds it: sealing and writing it again
    would cost a WAL page and a trip through SQLite per message for no change.  A put
    is left out only if its value is the one a *completed* commit wrote and no queued
    commit writes that entry (one that fails may have left either value): the file's
    content is then what the full commit would have made it."""

    __slots__ = ("pending", "values")

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], bytes] = {}
        self.pending: dict[tuple[str, str], int] = {}

    def needed(self, puts: list[Put]) -> list[Put]:
        """``puts`` less those that would rewrite an entry as it is (puts apply in
        order: once one entry is written by this commit, its later puts stay too)."""
        values = self.values  # (no entry while a queued commit writes it)
        out: list[Put] = []
        kept: set[tuple[str, str]] = set()
        for put in puts:
            k = (put[0], put[1])
            if put[2] is None or k in kept or values.get(k) != put[2]:
                kept.add(k)
                out.append(put)
        return out

    def started(self, puts: list[Put]) -> None:
        for kind, key, _ in puts:
            k = (kind, key)
            self.pending[k] = self.pending.get(k, 0) + 1
            self.values.pop(k, None)

    def finished(self, puts: list[Put], ok: bool) -> None:
        for kind, key, value in puts:
            k = (kind, key)
            left = self.pending[k] - 1
            if left:
                self.pending[k] = left
            else:
                del self.pending[k]
                if ok and value is not None:
                    self.values[k] = value


def _default_reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as default

        return default
    return reactor


def _derive(reactor: Any, passphrase: str, salt: bytes, params: KdfParams) -> Deferred[bytes]:
    """Argon2id in the reactor's thread pool (about 0.3 s at the defaults: never inline)."""
    tp = reactor.getThreadPool()
    return deferToThreadPool(reactor, tp, localseal.derive_kek, passphrase, salt, params)


def _with_conn(pool: SQLiteThread, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return pool.run(f, *args)


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)  # BEGIN/COMMIT are ours
    try:
        localschema.setup_connection(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _pool(reactor: Any, path: str) -> SQLiteThread:
    """ONE connection in ONE thread: no SQL on the reactor, operations in call order."""
    return SQLiteThread(reactor, partial(_connect, path), "shtalk-localstore")


class LocalStore:
    """The open store.  Make one with :meth:`create` or :meth:`open`, never directly."""

    def __init__(
        self,
        reactor: Any,
        path: str,
        pool: SQLiteThread,
        data_key: bytes,
        params: KdfParams,
        salt: bytes,
    ) -> None:
        self._reactor = reactor
        self.path = path
        self._pool: SQLiteThread | None = pool
        self._data_key = data_key
        self._keys = localseal.Keys(data_key)
        #: The file's current Argon2id parameters (kept by change_passphrase by default).
        self.kdf = params
        self._salt = salt
        self._closing: list[Deferred[None]] | None = None
        self._written = _Written()

    # --- life cycle ---

    @classmethod
    def create(
        cls, path: str, passphrase: str, reactor: Any = None, *, kdf: KdfParams = DEFAULT_KDF
    ) -> Deferred[LocalStore]:
        """A new store at ``path`` (which must not exist), with a fresh random data key."""
        reactor = _default_reactor(reactor)
        try:
            kdf.check()
            _check_str(passphrase, "passphrase", empty=False)
        except (LocalStoreError, TypeError, ValueError) as e:
            return fail(e)
        data_key, salt = os.urandom(32), os.urandom(localseal.SALT_BYTES)
        state: dict[str, SQLiteThread] = {}

        async def run() -> LocalStore:
            tp = reactor.getThreadPool()
            await deferToThreadPool(reactor, tp, localschema.create_files, path)
            try:
                kek = await _derive(reactor, passphrase, salt, kdf)
                header = {
                    "kdf": kdf.encode(),
                    "salt": salt,
                    "wrapped_key": localseal.wrap_key(kek, data_key, kdf, salt),
                }
                state["pool"] = pool = _pool(reactor, path)
                await _with_conn(pool, localschema.create_schema, header)
            except BaseException:
                if "pool" in state:
                    await state["pool"].stop()
                localschema.remove_files(path)
                raise
            return cls(reactor, path, pool, data_key, kdf, salt)

        return Deferred.fromCoroutine(run())

    @classmethod
    def open(cls, path: str, passphrase: str, reactor: Any = None) -> Deferred[LocalStore]:
        """Unlock an existing store; :class:`WrongPassphrase` if the passphrase is wrong."""
        reactor = _default_reactor(reactor)
        try:
            _check_str(passphrase, "passphrase")
        except (TypeError, ValueError) as e:
            return fail(e)

        async def run() -> LocalStore:
            tp = reactor.getThreadPool()
            await deferToThreadPool(reactor, tp, localschema.check_files, path)
            pool = _pool(reactor, path)
            try:
                header = await _with_conn(pool, localschema.read_header, path)
                params, salt, wrapped = localseal.parse_header(header, path)
                kek = await _derive(reactor, passphrase, salt, params)
                data_key = localseal.unwrap_key(kek, wrapped, params, salt)
            except BaseException:
                await pool.stop()
                raise
            return cls(reactor, path, pool, data_key, params, salt)

        return Deferred.fromCoroutine(run())

    def change_passphrase(
        self, old: str, new: str, *, kdf: KdfParams | None = None
    ) -> Deferred[None]:
        """Re-wrap the data key under ``new`` (one transaction); nothing else is re-sealed.

        ``old`` is checked (WrongPassphrase) even though the store is open: an
        unattended unlocked client must not let anyone lock its owner out.
        ``kdf`` None keeps the file's parameters.
        """
        params = self.kdf if kdf is None else kdf
        try:
            params.check()
            _check_str(old, "old passphrase")
            _check_str(new, "new passphrase", empty=False)
        except (LocalStoreError, TypeError, ValueError) as e:
            return fail(e)
        if self._pool is None or self._closing is not None:
            return fail(StoreClosed("the store is closed"))
        reactor = self._reactor
        old_params, old_salt = self.kdf, self._salt

        async def run() -> None:
            pool = self._require_pool()
            header = await _with_conn(pool, localschema.read_header, self.path)
            _, _, wrapped = localseal.parse_header(header, self.path)
            old_kek = await _derive(reactor, old, old_salt, old_params)
            if not hmac.compare_digest(
                localseal.unwrap_key(old_kek, wrapped, old_params, old_salt), self._data_key
            ):
                raise LocalStoreError("the file's data key changed under us")
            salt = os.urandom(localseal.SALT_BYTES)
            kek = await _derive(reactor, new, salt, params)
            new_header = {
                "kdf": params.encode(),
                "salt": salt,
                "wrapped_key": localseal.wrap_key(kek, self._data_key, params, salt),
            }
            await _with_conn(self._require_pool(), localschema.write_header, new_header)
            self.kdf, self._salt = params, salt

        return Deferred.fromCoroutine(run())

    def close(self) -> Deferred[None]:
        """Finish queued work, checkpoint (truncate the WAL), close.  Idempotent."""
        if self._pool is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        if self._closing is not None:  # a second close() waits for the first
            self._closing.append(waiter)
            return waiter
        self._closing = [waiter]
        pool = self._pool
        d = _with_conn(pool, localschema.checkpoint)
        # The connection is closed (its thread done) before anyone is told.
        d.addBoth(lambda result: pool.stop().addCallback(lambda _: result))

        def closed(result: object) -> None:
            self._pool = None
            self._data_key = b""
            self._written = _Written()
            waiters, self._closing = self._closing or [], None
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)

        d.addBoth(closed)
        return waiter

    def _require_pool(self) -> SQLiteThread:
        if self._pool is None or self._closing is not None:
            raise StoreClosed("the store is closed")
        return self._pool

    def _run(self, f: Callable[..., T], *args: object) -> Deferred[T]:
        try:
            pool = self._require_pool()
        except StoreClosed as e:
            return fail(e)
        return cast(Deferred[T], _with_conn(pool, f, *args))

    # --- sealed key/value state ---

    def get(self, kind: str, key: str) -> Deferred[bytes | None]:
        """The value stored under (kind, key), or None."""
        try:
            _check_str(kind, "kind", empty=False)
            _check_str(key, "key")
        except (TypeError, ValueError) as e:
            return fail(e)
        keys = self._keys

        def op(conn: Conn) -> bytes | None:
            hkey = keys.name_hash(b"kv", kind, key)
            row = conn.execute(
                "SELECT value FROM kv WHERE kind = ? AND hkey = ?", (kind, hkey)
            ).fetchone()
            return None if row is None else localschema.kv_value(keys, kind, hkey, bytes(row[0]))[1]

        return self._run(op)

    def items(self, kind: str) -> Deferred[list[tuple[str, bytes]]]:
        """Every (key, value) of ``kind``, sorted by key."""
        try:
            _check_str(kind, "kind", empty=False)
        except (TypeError, ValueError) as e:
            return fail(e)
        keys = self._keys

        def op(conn: Conn) -> list[tuple[str, bytes]]:
            rows = conn.execute("SELECT hkey, value FROM kv WHERE kind = ?", (kind,)).fetchall()
            return sorted(localschema.kv_value(keys, kind, bytes(h), bytes(v)) for h, v in rows)

        return self._run(op)

    def commit(
        self,
        puts: Sequence[Put] = (),
        messages: Sequence[HistoryMessage] = (),
        states: Sequence[tuple[str, str]] = (),
    ) -> Deferred[None]:
        """ONE transaction: puts (value None = delete), history inserts, state updates.

        Applied in that order; a message id already stored is kept as it was
        (redelivery is idempotent).  Any error -> nothing of this commit persists.
        """
        try:
            puts, messages, states = list(puts), list(messages), list(states)
            _check_puts(puts)
            for m in messages:
                _check_message(m)
            for message_id, state in states:
                _check_str(message_id, "message id", empty=False)
                _check_state(state)
        except (TypeError, ValueError) as e:
            return fail(e)
        written = self._written
        puts = written.needed(puts)
        d = self._run(localschema.commit, self._keys, puts, messages, states)
        if puts and not d.called:
            written.started(puts)

            def finished(result: T) -> T:
                written.finished(puts, not isinstance(result, Failure))
                return result

            d.addBoth(finished)
        return d

    # --- history ---

    def history(
        self, conversation: str, limit: int = 100, before_ts: int | None = None
    ) -> Deferred[list[HistoryMessage]]:
        """The ``limit`` newest messages with ts < ``before_ts``, oldest first (newest last).

        Expired messages show until :meth:`purge_expired` removes them.
        """
        try:
            _check_str(conversation, "conversation", empty=False)
            _check_limit(limit)
        except (TypeError, ValueError) as e:
            return fail(e)
        return self._run(localschema.history, self._keys, conversation, limit, before_ts)

    def search(
        self, text: str, conversation: str | None = None, limit: int = 100
    ) -> Deferred[list[HistoryMessage]]:
        """The ``limit`` newest messages whose body contains ``text`` (case-insensitive).

        Bodies are sealed, so this decrypts in the database thread: linear in
        the history searched.
        """
        try:
            _check_str(text, "text")
            if conversation is not None:
                _check_str(conversation, "conversation", empty=False)
            _check_limit(limit)
        except (TypeError, ValueError) as e:
            return fail(e)
        return self._run(localschema.search, self._keys, text, conversation, limit)

    def scrub(self) -> Deferred[None]:
        """Checkpoint and truncate the WAL, so page images of rows overwritten or deleted
        before (a deleted pre-key's older identity rows) leave the files; secure_delete
        already zeroed them in the database pages."""
        return self._run(localschema.checkpoint)

    def purge_expired(self, now: float) -> Deferred[int]:
        """Delete (secure_delete, then WAL truncated) messages whose expires_at <= now."""
        return self._run(localschema.purge, float(now))

    def conversations(self) -> Deferred[list[tuple[str, int, int]]]:
        """(conversation, message count, last ts) for each conversation, most recent first."""
        return self._run(localschema.conversations, self._keys)


def _check_limit(limit: object) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError("limit must be a non-negative int")
