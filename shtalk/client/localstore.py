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
* No SQL, sealing or unsealing on the reactor thread: one adbapi connection in
  one thread (which also serialises every operation, in call order); Argon2id
  runs in the reactor's thread pool.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import struct
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure

from shtalk.client import localschema
from shtalk.client.localschema import LocalStoreError

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
Put = tuple[str, str, bytes | None]

#: Delivery states of a history message.
STATES = frozenset({"sending", "sent", "failed", "received"})


class WrongPassphrase(LocalStoreError):
    """The passphrase does not unwrap the data key (the GCM tag did not verify)."""


class CorruptEntry(LocalStoreError):
    """A sealed value failed authentication: moved to another row, edited, or damaged."""


class StoreClosed(LocalStoreError):
    """The store was closed; open it again."""


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters, stored in the file so ``open`` needs none.

    Defaults: 64 MiB, 3 passes, 4 lanes, about 0.3 s on the reference machine
    (docs/SECURITY.md).  Above OWASP's minimum (19 MiB, t=2, p=1) and RFC 9106's
    second recommended option (64 MiB, t=3, p=4): an unlock happens once per
    start, so a third of a second is affordable while each offline guess costs
    64 MiB of memory bandwidth.
    """

    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def check(self) -> None:
        """Refuse nonsense and (from a tampered file) denial-of-service sized values."""
        if not 1 <= self.lanes <= 64:
            raise LocalStoreError(f"argon2id lanes {self.lanes} out of range 1..64")
        if not 8 * self.lanes <= self.memory_kib <= 4 * 1024 * 1024:
            raise LocalStoreError(f"argon2id memory {self.memory_kib} KiB out of range")
        if not 1 <= self.iterations <= 64:
            raise LocalStoreError(f"argon2id iterations {self.iterations} out of range 1..64")

    def encode(self) -> bytes:
        return f"argon2id;m={self.memory_kib};t={self.iterations};p={self.lanes}".encode()

    @classmethod
    def decode(cls, blob: bytes) -> KdfParams:
        try:
            name, *fields = blob.decode("ascii").split(";")
            values = dict(f.split("=", 1) for f in fields)
            if name != "argon2id" or set(values) != {"m", "t", "p"}:
                raise ValueError(name)
            params = cls(int(values["m"]), int(values["t"]), int(values["p"]))
        except ValueError as e:
            raise LocalStoreError(f"unknown key derivation {blob!r}") from e
        params.check()
        return params


DEFAULT_KDF = KdfParams()


@dataclass(frozen=True)
class HistoryMessage:
    id: str  # client-wide unique: "<sender>/<device>/<client_id>"
    conversation: str  # "user:<name>" or "room:<name>"
    sender: str  # user name ("" = me)
    sender_device: str
    ts: int  # milliseconds
    body: str
    expires_at: float | None
    state: str  # "sending" | "sent" | "failed" | "received"


# --- keys and sealing --------------------------------------------------------

_U32 = struct.Struct(">I")
_TS = struct.Struct(">q")
_EXP = struct.Struct(">?d")
_SEALED_V1 = b"\x01"
_NONCE = 12
_SALT = 16
_WRAP_AD = b"shtalk-localstore-v1\x00data-key\x00"


def _lp(*parts: bytes) -> bytes:
    """Length-prefixed concatenation: no two different tuples give the same bytes."""
    return b"".join(_U32.pack(len(p)) + p for p in parts)


def _unlp(blob: bytes, count: int) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    for _ in range(count):
        if pos + 4 > len(blob):
            raise ValueError("truncated")
        (n,) = _U32.unpack_from(blob, pos)
        pos += 4
        if pos + n > len(blob):
            raise ValueError("truncated")
        out.append(blob[pos : pos + n])
        pos += n
    if pos != len(blob):
        raise ValueError("trailing bytes")
    return out


def _passphrase_bytes(passphrase: str) -> bytes:
    """NFKC (NIST SP 800-63B 5.1.1.2): the same passphrase typed on another keyboard works."""
    return unicodedata.normalize("NFKC", passphrase).encode("utf-8")


def derive_kek(passphrase: str, salt: bytes, params: KdfParams) -> bytes:
    """Argon2id of the passphrase: the key-encryption key.  Slow on purpose: call in a thread."""
    kdf = Argon2id(
        salt=salt,
        length=32,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_kib,
    )
    return kdf.derive(_passphrase_bytes(passphrase))


def _wrap_ad(params: KdfParams, salt: bytes) -> bytes:
    # The parameters and salt are authenticated too: editing them is "wrong passphrase".
    return _WRAP_AD + _lp(params.encode(), salt)


def wrap_key(kek: bytes, data_key: bytes, params: KdfParams, salt: bytes) -> bytes:
    nonce = os.urandom(_NONCE)
    return nonce + AESGCM(kek).encrypt(nonce, data_key, _wrap_ad(params, salt))


def unwrap_key(kek: bytes, wrapped: bytes, params: KdfParams, salt: bytes) -> bytes:
    try:
        key = AESGCM(kek).decrypt(wrapped[:_NONCE], wrapped[_NONCE:], _wrap_ad(params, salt))
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase for this store") from None
    if len(key) != 32:
        raise LocalStoreError("the wrapped data key has a wrong length")
    return key


class _Keys:
    """Subkeys of the data key: one seals (AES-256-GCM), one hashes names (HMAC-SHA256)."""

    def __init__(self, data_key: bytes) -> None:
        def sub(label: bytes) -> bytes:
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label)
            return hkdf.derive(data_key)

        self._aead = AESGCM(sub(b"shtalk-localstore-v1 seal"))
        self._index = sub(b"shtalk-localstore-v1 index")

    def name_hash(self, domain: bytes, *parts: str) -> bytes:
        """Keyed hash of a name: equal names match, but the file does not reveal them."""
        msg = _lp(domain, *(p.encode("utf-8") for p in parts))
        return hmac.new(self._index, msg, hashlib.sha256).digest()

    def seal(self, plain: bytes, ad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return _SEALED_V1 + nonce + self._aead.encrypt(nonce, plain, ad)

    def unseal(self, blob: bytes, ad: bytes, what: str) -> bytes:
        if blob[:1] != _SEALED_V1 or len(blob) < 1 + _NONCE + 16:
            raise CorruptEntry(f"{what}: not a sealed value")
        try:
            return self._aead.decrypt(blob[1 : 1 + _NONCE], blob[1 + _NONCE :], ad)
        except InvalidTag:
            raise CorruptEntry(
                f"{what}: fails authentication (moved to another row, edited, or damaged)"
            ) from None


def _kv_ad(kind: str, hkey: bytes) -> bytes:
    return _lp(b"shtalk-localstore-v1", b"kv", b"value", kind.encode(), hkey)


def _body_ad(hid: bytes, hconv: bytes, ts: int, expires_at: float | None) -> bytes:
    exp = _EXP.pack(expires_at is not None, 0.0 if expires_at is None else expires_at)
    return _lp(b"shtalk-localstore-v1", b"history", b"body", hid, hconv, _TS.pack(ts), exp)


def _state_ad(hid: bytes) -> bytes:
    return _lp(b"shtalk-localstore-v1", b"history", b"state", hid)


# --- operations (run in the database thread) ---------------------------------


def _transaction(conn: Conn, work: Callable[[], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work()
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return result


def _put(conn: Conn, keys: _Keys, kind: str, key: str, value: bytes | None) -> None:
    hkey = keys.name_hash(b"kv", kind, key)
    if value is None:
        conn.execute("DELETE FROM kv WHERE kind = ? AND hkey = ?", (kind, hkey))
        return
    sealed = keys.seal(_lp(key.encode("utf-8"), value), _kv_ad(kind, hkey))
    conn.execute(
        "INSERT OR REPLACE INTO kv (kind, hkey, value) VALUES (?, ?, ?)", (kind, hkey, sealed)
    )


def _kv_value(keys: _Keys, kind: str, hkey: bytes, sealed: bytes) -> tuple[str, bytes]:
    plain = keys.unseal(sealed, _kv_ad(kind, hkey), f"{kind} entry")
    try:
        raw_key, value = _unlp(plain, 2)
        key = raw_key.decode("utf-8")
    except ValueError as e:
        raise CorruptEntry(f"{kind} entry: malformed ({e})") from e
    if not hmac.compare_digest(keys.name_hash(b"kv", kind, key), hkey):
        raise CorruptEntry(f"{kind} entry: stored under another key")
    return key, value


def _insert_message(conn: Conn, keys: _Keys, m: HistoryMessage) -> None:
    """INSERT OR IGNORE: a redelivered message (same id) keeps the first copy."""
    hid = keys.name_hash(b"history-id", m.id)
    hconv = keys.name_hash(b"conversation", m.conversation)
    fields = (m.id, m.conversation, m.sender, m.sender_device, m.body)
    body = keys.seal(
        _lp(*(f.encode("utf-8") for f in fields)), _body_ad(hid, hconv, m.ts, m.expires_at)
    )
    state = keys.seal(m.state.encode(), _state_ad(hid))
    conn.execute(
        "INSERT OR IGNORE INTO history (hid, hconv, ts, expires_at, body, state)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (hid, hconv, m.ts, m.expires_at, body, state),
    )


def _set_state(conn: Conn, keys: _Keys, message_id: str, state: str) -> None:
    """Unknown ids are ignored: the message may have expired and been purged already."""
    hid = keys.name_hash(b"history-id", message_id)
    sealed = keys.seal(state.encode(), _state_ad(hid))
    conn.execute("UPDATE history SET state = ? WHERE hid = ?", (sealed, hid))


def _commit(
    conn: Conn,
    keys: _Keys,
    puts: Sequence[Put],
    messages: Sequence[HistoryMessage],
    states: Sequence[tuple[str, str]],
) -> None:
    def work() -> None:
        for kind, key, value in puts:
            _put(conn, keys, kind, key, value)
        for m in messages:
            _insert_message(conn, keys, m)
        for message_id, state in states:
            _set_state(conn, keys, message_id, state)

    _transaction(conn, work)


_COLUMNS = "hid, hconv, ts, expires_at, body, state"
_Row = tuple[bytes, bytes, int, float | None, bytes, bytes]


def _message(keys: _Keys, row: _Row) -> HistoryMessage:
    hid, hconv, ts, expires_at, body, state = row
    plain = keys.unseal(body, _body_ad(hid, hconv, ts, expires_at), "history message")
    raw_state = keys.unseal(state, _state_ad(hid), "history message state")
    try:
        mid, conv, sender, device, text = (b.decode("utf-8") for b in _unlp(plain, 5))
        st = raw_state.decode("ascii")
    except ValueError as e:
        raise CorruptEntry(f"history message: malformed ({e})") from e
    if not hmac.compare_digest(keys.name_hash(b"history-id", mid), hid):
        raise CorruptEntry("history message: stored under another id")
    return HistoryMessage(mid, conv, sender, device, ts, text, expires_at, st)


def _history(
    conn: Conn, keys: _Keys, conversation: str, limit: int, before_ts: int | None
) -> list[HistoryMessage]:
    hconv = keys.name_hash(b"conversation", conversation)
    bound = (1 << 63) - 1 if before_ts is None else before_ts
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM history WHERE hconv = ? AND ts < ?"  # noqa: S608 (constant)
        " ORDER BY ts DESC, seq DESC LIMIT ?",
        (hconv, bound, limit),
    ).fetchall()
    return [_message(keys, cast(_Row, r)) for r in reversed(rows)]


def _search(
    conn: Conn, keys: _Keys, text: str, conversation: str | None, limit: int
) -> list[HistoryMessage]:
    """Newest matches first while scanning, returned newest-last like history()."""
    needle = text.casefold()
    if conversation is None:
        cursor = conn.execute(
            f"SELECT {_COLUMNS} FROM history ORDER BY ts DESC, seq DESC"  # noqa: S608
        )
    else:
        hconv = keys.name_hash(b"conversation", conversation)
        cursor = conn.execute(
            f"SELECT {_COLUMNS} FROM history WHERE hconv = ?"  # noqa: S608
            " ORDER BY ts DESC, seq DESC",
            (hconv,),
        )
    found: list[HistoryMessage] = []
    for row in cursor:
        if len(found) >= limit:
            break
        m = _message(keys, cast(_Row, row))
        if needle in m.body.casefold():
            found.append(m)
    cursor.close()
    found.reverse()
    return found


def _purge(conn: Conn, now: float) -> int:
    def work() -> int:
        cur = conn.execute(
            "DELETE FROM history WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
        )
        return cur.rowcount

    count = _transaction(conn, work)
    if count:
        # secure_delete zeroed the rows in the database pages; the WAL still
        # holds their old page images until a checkpoint truncates it.
        localschema.checkpoint(conn)
    return count


def _conversations(conn: Conn, keys: _Keys) -> list[tuple[str, int, int]]:
    groups = conn.execute(
        "SELECT hconv, count(*), max(ts) FROM history GROUP BY hconv ORDER BY max(ts) DESC"
    ).fetchall()
    out: list[tuple[str, int, int]] = []
    for hconv, count, last in groups:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM history WHERE hconv = ? LIMIT 1",  # noqa: S608
            (hconv,),
        ).fetchone()
        out.append((_message(keys, cast(_Row, row)).conversation, int(count), int(last)))
    return out


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


def _default_reactor(reactor: Any) -> Any:
    if reactor is None:
        from twisted.internet import reactor as default

        return default
    return reactor


def _with_conn(pool: adbapi.ConnectionPool, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """``pool.runWithConnection`` with a type (adbapi is not annotated)."""
    return cast(Deferred[Any], pool.runWithConnection(f, *args))  # type: ignore[no-untyped-call]


def _pool(reactor: Any, path: str) -> adbapi.ConnectionPool:
    """ONE connection in ONE thread: no SQL on the reactor, operations in call order."""
    pool = adbapi.ConnectionPool(  # type: ignore[no-untyped-call]
        "sqlite3",
        path,
        isolation_level=None,  # BEGIN/COMMIT are ours
        check_same_thread=False,  # adbapi closes the connection from the reactor thread
        cp_min=1,
        cp_max=1,
        cp_openfun=localschema.setup_connection,
        cp_reactor=reactor,
        cp_noisy=False,
    )
    pool.start()  # type: ignore[no-untyped-call]
    return pool


class LocalStore:
    """The open store.  Make one with :meth:`create` or :meth:`open`, never directly."""

    def __init__(
        self,
        reactor: Any,
        path: str,
        pool: adbapi.ConnectionPool,
        data_key: bytes,
        params: KdfParams,
        salt: bytes,
    ) -> None:
        self._reactor = reactor
        self.path = path
        self._pool: adbapi.ConnectionPool | None = pool
        self._data_key = data_key
        self._keys = _Keys(data_key)
        #: The file's current Argon2id parameters (kept by change_passphrase by default).
        self.kdf = params
        self._salt = salt
        self._closing: list[Deferred[None]] | None = None

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
        data_key, salt = os.urandom(32), os.urandom(_SALT)
        state: dict[str, adbapi.ConnectionPool] = {}

        async def run() -> LocalStore:
            tp = reactor.getThreadPool()
            await deferToThreadPool(reactor, tp, localschema.create_files, path)
            try:
                kek = await deferToThreadPool(reactor, tp, derive_kek, passphrase, salt, kdf)
                header = {
                    "kdf": kdf.encode(),
                    "salt": salt,
                    "wrapped_key": wrap_key(kek, data_key, kdf, salt),
                }
                state["pool"] = pool = _pool(reactor, path)
                await _with_conn(pool, localschema.create_schema, header)
            except BaseException:
                if "pool" in state:
                    state["pool"].close()  # type: ignore[no-untyped-call]
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
                params, salt, wrapped = _parse_header(header, path)
                kek = await deferToThreadPool(reactor, tp, derive_kek, passphrase, salt, params)
                data_key = unwrap_key(kek, wrapped, params, salt)
            except BaseException:
                pool.close()  # type: ignore[no-untyped-call]
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
            tp = reactor.getThreadPool()
            pool = self._require_pool()
            header = await _with_conn(pool, localschema.read_header, self.path)
            _, _, wrapped = _parse_header(header, self.path)
            old_kek = await deferToThreadPool(reactor, tp, derive_kek, old, old_salt, old_params)
            if not hmac.compare_digest(
                unwrap_key(old_kek, wrapped, old_params, old_salt), self._data_key
            ):
                raise LocalStoreError("the file's data key changed under us")
            salt = os.urandom(_SALT)
            kek = await deferToThreadPool(reactor, tp, derive_kek, new, salt, params)
            new_header = {
                "kdf": params.encode(),
                "salt": salt,
                "wrapped_key": wrap_key(kek, self._data_key, params, salt),
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

        def closed(result: object) -> None:
            pool.close()  # type: ignore[no-untyped-call]
            self._pool = None
            self._data_key = b""
            waiters, self._closing = self._closing or [], None
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)

        d.addBoth(closed)
        return waiter

    def _require_pool(self) -> adbapi.ConnectionPool:
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
            return None if row is None else _kv_value(keys, kind, hkey, bytes(row[0]))[1]

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
            return sorted(_kv_value(keys, kind, bytes(h), bytes(v)) for h, v in rows)

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
        return self._run(_commit, self._keys, puts, messages, states)

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
        return self._run(_history, self._keys, conversation, limit, before_ts)

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
        return self._run(_search, self._keys, text, conversation, limit)

    def purge_expired(self, now: float) -> Deferred[int]:
        """Delete (secure_delete, then WAL truncated) messages whose expires_at <= now."""
        return self._run(_purge, float(now))

    def conversations(self) -> Deferred[list[tuple[str, int, int]]]:
        """(conversation, message count, last ts) for each conversation, most recent first."""
        return self._run(_conversations, self._keys)


def _check_limit(limit: object) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError("limit must be a non-negative int")


def _parse_header(header: dict[str, bytes], path: str) -> tuple[KdfParams, bytes, bytes]:
    try:
        params = KdfParams.decode(header["kdf"])
        salt, wrapped = header["salt"], header["wrapped_key"]
    except KeyError as e:
        raise LocalStoreError(f"{path}: the key header is incomplete ({e})") from None
    if len(salt) < _SALT or len(wrapped) != _NONCE + 32 + 16:
        raise LocalStoreError(f"{path}: the key header is malformed")
    return params, salt, wrapped
