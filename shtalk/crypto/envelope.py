"""The signed envelope: what a client base64s into the server's ``envelope`` field.

Layout (all integers big-endian; see docs/PROTOCOL-E2EE.md)::

    body = u8 version (1)
           u8 type                      1 pre-key message, 2 message, 3 room message
           u16 len | sender user        UTF-8
           u16 len | sender device      UTF-8
           u8 recipient kind            1 user, 2 room
           u16 len | recipient name     UTF-8
           u16 len | recipient device   UTF-8, empty = every device / the room
           u16 len | header             opaque to this layer
           u32 len | ciphertext         opaque to this layer
           u64 timestamp                milliseconds since the Unix epoch
    envelope = body || signature (64 bytes, ECDSA P-256/SHA-256, r || s, low-S)

The signature is over ``"shtalk/v1 envelope\\0" || body`` with the sender's identity
signing key.  Every field has exactly one encoding, so the signed bytes are canonical.
A receiver calls :meth:`Envelope.verify` with the sender's pinned
:class:`~shtalk.crypto.identity.IdentityKey` *before* it decrypts anything.

ECDSA signatures are malleable in general; ours are forced to low-S and verified
strictly, but the message id is nevertheless :attr:`Envelope.message_id`, a
SHA-256 over the body, never the signature bytes.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from . import primitives as P
from .bundle import IdentityKey
from .encoding import Reader
from .errors import DecodeError, UnsupportedVersion
from .identity import DeviceIdentity

__all__ = [
    "ENVELOPE_VERSION",
    "MAX_CIPHERTEXT",
    "MAX_HEADER",
    "Envelope",
    "MessageType",
    "Recipient",
]

ENVELOPE_VERSION = 1
MAX_HEADER = 8192
MAX_CIPHERTEXT = 65536
MAX_NAME = 256
_LABEL = b"shtalk/v1 envelope\x00"


class MessageType(IntEnum):
    PREKEY = 1  #: first messages of a pairwise session (carry the PQXDH initial data)
    MESSAGE = 2  #: a Double Ratchet message of an established pairwise session
    ROOM = 3  #: a Sender Keys room message


_TYPES = frozenset(int(t) for t in MessageType)


@dataclass(frozen=True)
class Recipient:
    """``kind`` is ``"user"`` (with an optional ``device``) or ``"room"``."""

    kind: str
    name: str
    device: str = ""

    @classmethod
    def user(cls, name: str, device: str = "") -> Recipient:
        return cls("user", name, device)

    @classmethod
    def room(cls, name: str) -> Recipient:
        return cls("room", name)


_KINDS = {"user": 1, "room": 2}
_KIND_NAMES = {v: k for k, v in _KINDS.items()}
_TYPE_OF = {int(t): t for t in MessageType}
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_MAX_ENVELOPE = MAX_HEADER + MAX_CIPHERTEXT + 4 * MAX_NAME + 64
_new = object.__new__


def _recipient(kind: str, name: str, device: str) -> Recipient:
    """``Recipient(kind, name, device)`` without the frozen dataclass's ``__init__``."""
    recipient = _new(Recipient)
    recipient.__dict__.update(kind=kind, name=name, device=device)
    return recipient


def _encode_body(
    version: int, type: int, sender_user: str, sender_device: str, recipient: Recipient,
    header: bytes, ciphertext: bytes, timestamp: int,
) -> bytes:
    kind = _KINDS.get(recipient.kind)
    if kind is None:
        raise ValueError("recipient kind must be 'user' or 'room'")
    if len(header) > MAX_HEADER or len(ciphertext) > MAX_CIPHERTEXT:
        raise ValueError("envelope header or ciphertext too large")
    if not 0 <= timestamp < 2**64:
        raise ValueError("timestamp out of range")
    su = sender_user.encode("utf-8")
    sd = sender_device.encode("utf-8")
    rn = recipient.name.encode("utf-8")
    rd = recipient.device.encode("utf-8")
    if len(su) > MAX_NAME or len(sd) > MAX_NAME or len(rn) > MAX_NAME or len(rd) > MAX_NAME:
        raise ValueError("name too long")
    pack16 = _U16.pack
    return b"".join((
        bytes((version, type)), pack16(len(su)), su, pack16(len(sd)), sd,
        bytes((kind,)), pack16(len(rn)), rn, pack16(len(rd)), rd,
        pack16(len(header)), header, _U32.pack(len(ciphertext)), ciphertext,
        _U64.pack(timestamp),
    ))


@dataclass(frozen=True)
class Envelope:
    version: int
    type: MessageType
    sender_user: str
    sender_device: str
    recipient: Recipient
    header: bytes
    ciphertext: bytes
    timestamp: int
    signature: bytes
    _body: bytes = field(default=b"", compare=False, repr=False)

    @classmethod
    def seal(
        cls,
        signer: DeviceIdentity,
        *,
        type: MessageType,
        sender_user: str,
        sender_device: str,
        recipient: Recipient,
        header: bytes,
        ciphertext: bytes,
        timestamp: int,
    ) -> Envelope:
        """Build and sign an envelope with ``signer``'s identity signing key."""
        type = _TYPE_OF.get(type) if type.__class__ is not MessageType else type  # type: ignore[assignment]
        if type is None:
            raise ValueError("unknown message type")
        body = _encode_body(
            ENVELOPE_VERSION, type, sender_user, sender_device, recipient, header, ciphertext,
            timestamp,
        )
        return cls._make(
            ENVELOPE_VERSION, type, sender_user, sender_device, recipient,
            header, ciphertext, timestamp, signer.sign(_LABEL + body), body,
        )

    @classmethod
    def _make(
        cls, version: int, type: MessageType, sender_user: str, sender_device: str,
        recipient: Recipient, header: bytes, ciphertext: bytes, timestamp: int,
        signature: bytes, body: bytes,
    ) -> Envelope:
        """The constructor without the frozen dataclass's per-field ``__setattr__``."""
        env = _new(cls)
        env.__dict__.update(
            version=version, type=type, sender_user=sender_user, sender_device=sender_device,
            recipient=recipient, header=header, ciphertext=ciphertext, timestamp=timestamp,
            signature=signature, _body=body,
        )
        return env

    def body(self) -> bytes:
        """The encoded fields without the signature."""
        if self._body:
            return self._body
        return _encode_body(
            self.version, self.type, self.sender_user, self.sender_device, self.recipient,
            self.header, self.ciphertext, self.timestamp,
        )

    def signed_bytes(self) -> bytes:
        return _LABEL + self.body()

    def to_bytes(self) -> bytes:
        return self.body() + self.signature

    @property
    def message_id(self) -> bytes:
        """SHA-256 of the body: stable, not malleable, independent of the signature."""
        return hashlib.sha256(self.body()).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        """Parse (does not verify: call :meth:`verify`)."""
        if type(data) is bytes and 2 + P.SIG_LEN <= len(data) <= _MAX_ENVELOPE:
            env = cls._parse_fast(data)
            if env is not None:
                return env
        return cls._parse(data)  # refuses with the precise error (or parses a bytes subclass)

    @classmethod
    def _parse_fast(cls, data: bytes) -> Envelope | None:
        """The common case: a well-formed envelope, or ``None`` for anything else.

        Accepts exactly what :meth:`_parse` accepts (the tests compare the two): every
        field must end inside the body, which the final position check guarantees since
        positions only grow, and every length limit is the same.
        """
        end = len(data) - P.SIG_LEN
        mtype = _TYPE_OF.get(data[1])
        if data[0] != ENVELOPE_VERSION or mtype is None:
            return None
        unpack16 = _U16.unpack_from
        try:
            (n,) = unpack16(data, 2)
            pos = 4 + n
            su = data[4:pos]
            (m,) = unpack16(data, pos)
            pos += 2
            sd = data[pos : pos + m]
            pos += m
            if n > MAX_NAME or m > MAX_NAME:
                return None
            kind = _KIND_NAMES.get(data[pos])
            (n,) = unpack16(data, pos + 1)
            pos += 3
            rn = data[pos : pos + n]
            pos += n
            (m,) = unpack16(data, pos)
            pos += 2
            rd = data[pos : pos + m]
            pos += m
            if kind is None or n > MAX_NAME or m > MAX_NAME:
                return None
            (n,) = unpack16(data, pos)
            pos += 2
            header = data[pos : pos + n]
            pos += n
            if n > MAX_HEADER:
                return None
            (n,) = _U32.unpack_from(data, pos)
            pos += 4
            ciphertext = data[pos : pos + n]
            pos += n
            if n > MAX_CIPHERTEXT or pos + 8 != end:
                return None
            (timestamp,) = _U64.unpack_from(data, pos)
            recipient = _recipient(kind, rn.decode("utf-8"), rd.decode("utf-8"))
            sender_user, sender_device = su.decode("utf-8"), sd.decode("utf-8")
        except (struct.error, IndexError, UnicodeDecodeError):
            return None
        return cls._make(
            ENVELOPE_VERSION, mtype, sender_user, sender_device, recipient, header, ciphertext,
            timestamp, data[end:], data[:end],
        )

    @classmethod
    def _parse(cls, data: bytes) -> Envelope:
        """The reference parser (:class:`Reader`), with its specific errors."""
        if not isinstance(data, bytes) or len(data) < P.SIG_LEN + 2:
            raise DecodeError("envelope: truncated")
        if len(data) > _MAX_ENVELOPE:
            raise DecodeError("envelope: too large")
        body, signature = data[: -P.SIG_LEN], data[-P.SIG_LEN :]
        r = Reader(body, "envelope")
        version = r.version(ENVELOPE_VERSION)
        kind = r.u8()
        if kind not in _TYPES:
            raise UnsupportedVersion("envelope: unknown message type")
        sender_user, sender_device = r.text(MAX_NAME), r.text(MAX_NAME)
        rkind = r.u8()
        if rkind not in _KIND_NAMES:
            raise DecodeError("envelope: unknown recipient kind")
        recipient = Recipient(_KIND_NAMES[rkind], r.text(MAX_NAME), r.text(MAX_NAME))
        header = r.short(MAX_HEADER)
        ciphertext = r.blob(MAX_CIPHERTEXT)
        timestamp = r.u64()
        r.done()
        return cls(
            version, MessageType(kind), sender_user, sender_device, recipient,
            header, ciphertext, timestamp, signature, body,
        )

    def verify(self, sender: IdentityKey) -> None:
        """Raise :class:`~shtalk.crypto.errors.BadSignature` unless ``sender`` signed it."""
        sender.verify(self.signature, _LABEL + self.body())
