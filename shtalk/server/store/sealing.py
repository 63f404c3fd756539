"""Encryption at rest: queued envelopes and account email addresses.

Why: the database file, its WAL and its backups must never hold an envelope or an
email address in clear, and a row copied onto another row must not open there.

* Envelopes: the common envelope and the per-device ones of a message are packed
  into one compact binary record, then AES-256-GCM encrypted with the storage key, a
  random nonce per row, and the row's identity (mailbox, sender, client id, time,
  target) as associated data.
* Email addresses: sealed the same way under a key of their own (HKDF of the storage
  key), with the account's canonical name as associated data; look-ups go through
  ``email_hash``, an HMAC-SHA256 of the case-folded address under a third key.  A
  stolen database alone gives neither the addresses nor a way to test guesses.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shtalk.server.eserver import CorruptStore
from shtalk.server.store.records import NewMessage, StoredMessage

__all__ = [
    "EmailSeal",
    "EnvelopeDecryptError",
    "EnvelopeSeal",
    "associated_data",
    "decode_envelopes",
    "encode_envelopes",
]


class EnvelopeDecryptError(CorruptStore):
    """A stored envelope failed authentication: wrong storage key or a tampered row."""


# --- envelopes ---------------------------------------------------------------

_U32 = struct.Struct(">I")
_ENTRY = struct.Struct(">qHI")  # user id, device id length, envelope length
_IDS = struct.Struct(">qq")  # sender id, ts
_FORMAT = 1
_AD_PREFIX = b"shtalk-envelope-v1\x00"


def encode_envelopes(envelope: bytes | None, envelopes: dict[tuple[int, str], bytes]) -> bytes:
    """Compact binary form of the common envelope and the per-device map."""
    parts = [bytes((_FORMAT, 0 if envelope is None else 1))]
    if envelope is not None:
        parts += (_U32.pack(len(envelope)), envelope)
    parts.append(_U32.pack(len(envelopes)))
    for (user_id, device_id), env in envelopes.items():
        dev = device_id.encode()
        parts += (_ENTRY.pack(user_id, len(dev), len(env)), dev, env)
    return b"".join(parts)


def decode_envelopes(blob: bytes) -> tuple[bytes | None, dict[tuple[int, str], bytes]]:
    """Inverse of encode_envelopes; ValueError on anything malformed."""
    try:
        if len(blob) < 6 or blob[0] != _FORMAT:
            raise ValueError("unknown envelope format")
        pos = 2
        envelope = None
        if blob[1]:
            (n,) = _U32.unpack_from(blob, pos)
            pos += _U32.size
            envelope = blob[pos : pos + n]
            pos += n
        (count,) = _U32.unpack_from(blob, pos)
        pos += _U32.size
        envelopes: dict[tuple[int, str], bytes] = {}
        for _ in range(count):
            user_id, dlen, elen = _ENTRY.unpack_from(blob, pos)
            pos += _ENTRY.size
            device_id = blob[pos : pos + dlen].decode()
            pos += dlen
            envelopes[(user_id, device_id)] = blob[pos : pos + elen]
            pos += elen
    except (struct.error, UnicodeDecodeError) as e:
        raise ValueError("truncated envelope record") from e
    if pos != len(blob):
        raise ValueError("truncated envelope record")
    return envelope, envelopes


def associated_data(
    mailbox: str, sender_id: int, sender_device: str, client_id: str, ts: int, target: str
) -> bytes:
    """Bind a ciphertext to its row: moving it to another row fails to decrypt."""
    fields = (mailbox, sender_device, client_id, target)
    return (
        _AD_PREFIX
        + _IDS.pack(sender_id, ts)
        + b"".join(_U32.pack(len(b)) + b for b in (f.encode() for f in fields))
    )


class EnvelopeSeal:
    """Seals and opens the envelopes of message rows with the storage key.

    ``seal`` runs in the writer thread for every stored row, ``open`` in a reader for
    every row replayed: both are kept to the AEAD call and the associated data.
    """

    def __init__(self, storage_key: bytes, where: str) -> None:
        self._aead = AESGCM(storage_key)
        self._where = where  # names the database in errors

    def seal(self, mailbox: str, m: NewMessage, plain: bytes) -> tuple[bytes, bytes]:
        """(nonce, ciphertext) of ``plain`` (encode_envelopes of ``m``) for its row in
        ``mailbox``."""
        nonce = os.urandom(12)
        ad = associated_data(mailbox, m.sender_id, m.sender_device, m.client_id, m.ts, m.target)
        return nonce, self._aead.encrypt(nonce, plain, ad)

    def open(self, row: Any) -> StoredMessage:
        """A message row (seq, mailbox, sender_id, sender_device, client_id, ts,
        expires_at, target, nonce, body[, prev_seq]) opened; EnvelopeDecryptError if it
        does not."""
        seq, mailbox, sender_id, sender_device, client_id, ts, expires_at, target = row[:8]
        ad = associated_data(mailbox, sender_id, sender_device, client_id, ts, target)
        try:
            plain = self._aead.decrypt(bytes(row[8]), bytes(row[9]), ad)
            envelope, envelopes = decode_envelopes(plain)
        except (InvalidTag, ValueError):
            raise EnvelopeDecryptError(
                f"{self._where}: stored message {seq} does not decrypt"
                " (wrong storage key, or the row was altered)"
            ) from None
        return StoredMessage(
            int(seq), mailbox, int(sender_id), sender_device, client_id, int(ts),
            expires_at, target, envelope, envelopes, int(row[10]) if len(row) > 10 else 0,
        )  # fmt: skip


# --- email addresses ---------------------------------------------------------

_SEAL_LABEL = b"shtalk email seal v1"
_INDEX_LABEL = b"shtalk email index v1"
_VERSION = b"\x01"


def _derive(storage_key: bytes, label: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=label).derive(storage_key)


class EmailSeal:
    """Seals addresses for the users table and computes their look-up hash."""

    def __init__(self, storage_key: bytes) -> None:
        self._aead = AESGCM(_derive(storage_key, _SEAL_LABEL))
        self._index = _derive(storage_key, _INDEX_LABEL)

    @staticmethod
    def _ad(user_key: str) -> bytes:
        return _SEAL_LABEL + b"\x00" + user_key.encode("utf-8")

    def seal(self, user_key: str, email: str) -> bytes:
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, email.encode(), self._ad(user_key))

    def open(self, user_key: str, sealed: bytes) -> str | None:
        """The address, or None for a blob that is not one of ours for this account."""
        if len(sealed) < 29 or sealed[:1] != _VERSION:
            return None
        try:
            plain = self._aead.decrypt(sealed[1:13], sealed[13:], self._ad(user_key))
        except InvalidTag:
            return None
        return plain.decode("utf-8", "replace")

    def index(self, email: str) -> bytes:
        """The look-up key of an address (case-insensitive, like people treat them)."""
        return hmac.new(self._index, email.casefold().encode(), hashlib.sha256).digest()
