"""Sealed operator logs: records the server writes but cannot read back.

A Twisted log observer (`SealedLogObserver`) turns each event into a record that keeps
only allow-listed fields (`ALLOWED`), replaces client addresses and email addresses by
keyed hashes (`HASHED`; HMAC-SHA256 under ``log-pseudonym.key`` in the data directory,
so one address always gives the same pseudonym and can be followed through the log),
drops everything else (passwords, tokens, codes, envelopes, TOTP secrets and any field
nobody allow-listed: the record only names the dropped fields), and escapes control
and bidirectional-override characters (no log injection, ASVS 16.4.1).  Failures keep
their exception type and the code locations, never the exception's message.

Each record is sealed on its own with HPKE (RFC 9180; `cryptography`'s ``hpke`` with
the ML-KEM-768 + X25519 hybrid KEM, HKDF-SHA256, AES-256-GCM) to the operator's public
key, whose private half ``shtalk-admin logs keygen`` writes and the server never sees.
Inside the seal every record carries the process's boot id, a sequence number and a
hash of the previous sealed line, so ``shtalk-admin logs read`` reports a modified,
removed or reordered record instead of skipping it.

Files rotate with `logging.handlers.RotatingFileHandler` (``[logs] max_bytes`` and
``backup_count``) and are created 0600.  Sealing costs about 0.25 ms per record on the
reactor thread; the server logs per request only for authentication events and
refusals, never per message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import logging.handlers
import os
import secrets
import string
import time
import traceback
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from twisted.logger import ILogObserver, LogLevel
from zope.interface import implementer

RECORD_VERSION = 1
INFO = b"shtalk/v1 sealed log record"
PUBLIC_TAG = "shtalk-log-public-key-v1"
PRIVATE_TAG = "shtalk-log-private-key-v1"
SUITE = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)

# Fields kept as they are (identifiers and counters; never secrets).
ALLOWED = frozenset({
    "event", "user_id", "user", "device", "room_id", "action", "reason", "code", "count",
    "retry_after", "signal", "status", "rtype", "subject", "flag_id", "backend", "verified",
    "line", "result", "method", "sender", "reporter", "target", "factor", "seconds",
    "kind", "level_name", "path", "port", "what",
})
# Fields kept only as keyed hashes (client addresses, emails).
# An attempted username is hashed too: people type passwords into the username field.
HASHED = frozenset({"address", "peer", "host", "ip", "email", "client", "username"})

LEVELS = {"debug": 0, "info": 1, "warn": 2, "error": 3, "critical": 4}
_LEVEL_ORDER = {
    LogLevel.debug: 0, LogLevel.info: 1, LogLevel.warn: 2, LogLevel.error: 3,
    LogLevel.critical: 4,
}


# --- keys ---------------------------------------------------------------------------


def generate_keypair() -> tuple[str, str]:
    """(private key text, public key text) for ``shtalk-admin logs keygen``."""
    m = mlkem.MLKEM768PrivateKey.generate()
    x = x25519.X25519PrivateKey.generate()
    private = m.private_bytes_raw() + x.private_bytes_raw()
    public = m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()
    return (
        f"{PRIVATE_TAG} {base64.b64encode(private).decode()}\n",
        f"{PUBLIC_TAG} {base64.b64encode(public).decode()}\n",
    )


def _decode(text: str, tag: str, size: int, what: str) -> bytes:
    parts = text.split()
    if len(parts) != 2 or parts[0] != tag:
        raise ValueError(f"not a {what} (expected a line starting with {tag})")
    raw = base64.b64decode(parts[1], validate=True)
    if len(raw) != size:
        raise ValueError(f"{what}: wrong length {len(raw)}")
    return raw


def load_public_key(text: str) -> hpke.MLKEM768X25519PublicKey:
    raw = _decode(text, PUBLIC_TAG, 1184 + 32, "sealed-log public key")
    return hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(raw[:1184]),
        x25519.X25519PublicKey.from_public_bytes(raw[1184:]),
    )


def load_private_key(text: str) -> hpke.MLKEM768X25519PrivateKey:
    raw = _decode(text, PRIVATE_TAG, 64 + 32, "sealed-log private key")
    return hpke.MLKEM768X25519PrivateKey(
        mlkem.MLKEM768PrivateKey.from_seed_bytes(raw[:64]),
        x25519.X25519PrivateKey.from_private_bytes(raw[64:]),
    )


def seal(record: bytes, public: hpke.MLKEM768X25519PublicKey) -> str:
    return base64.b64encode(SUITE.encrypt(record, public, info=INFO)).decode("ascii")


def unseal(line: str, private: hpke.MLKEM768X25519PrivateKey) -> bytes:
    """Raises ValueError (bad base64) or cryptography's InvalidTag-like errors."""
    return SUITE.decrypt(base64.b64decode(line.strip(), validate=True), private, info=INFO)


def chain_hash(sealed_line: str) -> str:
    return hashlib.sha256(sealed_line.encode("ascii")).hexdigest()[:32]


# --- redaction ----------------------------------------------------------------------


def escape(text: str, limit: int = 2000) -> str:
    """Printable text only: control, format (bidi overrides) and separator characters
    other than the space are written as escapes, so a record is always one honest line."""
    out = []
    for ch in text[:limit]:
        cat = unicodedata.category(ch)
        if ch == "\\":
            out.append("\\\\")
        elif cat[0] == "C" or (cat[0] == "Z" and ch != " "):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    if len(text) > limit:
        out.append("...")
    return "".join(out)


class Pseudonymizer:
    def __init__(self, key: bytes) -> None:
        self.key = key

    def __call__(self, value: object) -> str:
        digest = hmac.new(self.key, str(value).strip().lower().encode(), hashlib.sha256)
        return "h:" + digest.hexdigest()[:16]


def _simple(value: object) -> object:
    if value is None or isinstance(value, bool | int | float):
        return value
    return escape(str(value), 200)


def render_message(fmt: str, event: dict[str, Any], pseudo: Pseudonymizer) -> str:
    """Format ``fmt`` with allow-listed fields only; others show as <redacted>."""
    out = []
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return escape(fmt)
    for literal, name, _spec, _conv in parsed:
        out.append(literal)
        if name is None:
            continue
        root = name.split(".", 1)[0].split("[", 1)[0]
        if root in ALLOWED and root == name and root in event:
            out.append(str(event[root])[:200])
        elif root in HASHED and root == name and root in event:
            out.append(pseudo(event[root]))
        else:
            out.append("<redacted>")
    return escape("".join(out))


def _failure_info(failure: Any) -> dict[str, Any]:
    frames = []
    try:
        for fr in traceback.extract_tb(failure.getTracebackObject())[-8:]:
            frames.append(f"{Path(fr.filename).name}:{fr.lineno}:{fr.name}")
    except Exception:  # noqa: S110 (a failure without a traceback)
        pass
    return {"type": escape(getattr(failure.type, "__name__", "?")), "where": frames}


def redact(event: dict[str, Any], pseudo: Pseudonymizer) -> dict[str, Any]:
    """The record for ``event``: allow-listed fields, hashed addresses, nothing else."""
    level = event.get("log_level")
    fields: dict[str, Any] = {}
    dropped: list[str] = []
    for key, value in event.items():
        if key.startswith("log_") or key in ("format", "message", "isError", "system", "time"):
            continue
        if key in ALLOWED:
            fields[key] = _simple(value)
        elif key in HASHED:
            fields[key] = pseudo(value)
        else:
            dropped.append(escape(key, 64))
    fmt = event.get("log_format")
    if fmt is None and event.get("message"):
        # Legacy twisted.python.log events: message tuples are free text; keep only
        # that something was said (it may hold anything).
        fmt = "(legacy log message)"
    record: dict[str, Any] = {
        "ts": round(float(event.get("log_time") or time.time()), 3),
        "level": getattr(level, "name", "info"),
        "ns": escape(str(event.get("log_namespace") or event.get("system") or "-"), 100),
        "msg": render_message(str(fmt or ""), event, pseudo),
    }
    if "event" in fields:
        record["event"] = fields.pop("event")
    if fields:
        record["fields"] = fields
    if dropped:
        record["dropped"] = sorted(dropped)
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = _failure_info(failure)
    return record


# --- the observer --------------------------------------------------------------------


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Creates every file 0600 whatever the umask (logs are metadata)."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding="ascii")


@dataclass
class ChainState:
    boot: str
    seq: int = 0
    prev: str = ""


@implementer(ILogObserver)
class SealedLogObserver:
    def __init__(
        self,
        path: Path,
        public: hpke.MLKEM768X25519PublicKey,
        pseudonym_key: bytes,
        max_bytes: int,
        backup_count: int,
        level: str = "info",
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self.public = public
        self.pseudo = Pseudonymizer(pseudonym_key)
        self.min_level = LEVELS[level]
        self.handler = _PrivateRotatingFileHandler(
            str(path), maxBytes=max_bytes, backupCount=backup_count, encoding="ascii"
        )
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.chain = ChainState(boot=secrets.token_hex(8))
        self.records = 0
        self.errors = 0
        self._busy = False

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        if _LEVEL_ORDER.get(level, 1) < self.min_level or self._busy:
            return
        self._busy = True  # a log call made while sealing must not recurse
        try:
            self.write(redact(event, self.pseudo))
        except Exception:
            self.errors += 1
        finally:
            self._busy = False

    def write(self, record: dict[str, Any]) -> None:
        chain = self.chain
        record = {"v": RECORD_VERSION, "boot": chain.boot, "seq": chain.seq,
                  "prev": chain.prev, **record}
        line = seal(json.dumps(record, separators=(",", ":"), ensure_ascii=True).encode(),
                    self.public)
        self.handler.emit(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))
        chain.seq += 1
        chain.prev = chain_hash(line)
        self.records += 1

    def close(self) -> None:
        self.handler.close()


def pseudonym_key(data_dir: Path) -> bytes:
    """The data directory's key for address/email pseudonyms (made once, 0600)."""
    path = data_dir / "log-pseudonym.key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key
