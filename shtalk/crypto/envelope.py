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
from dataclasses import dataclass, field
from enum import IntEnum

from . import primitives as P
from .encoding import Reader
from .errors import DecodeError, UnsupportedVersion
from .identity import DeviceIdentity, IdentityKey

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
        unsigned = cls(
            ENVELOPE_VERSION, MessageType(type), sender_user, sender_device, recipient,
            header, ciphertext, timestamp, b"",
        )
        body = unsigned.body()
        return cls(
            ENVELOPE_VERSION, MessageType(type), sender_user, sender_device, recipient,
            header, ciphertext, timestamp, signer.sign(_LABEL + body), body,
        )

    def body(self) -> bytes:
        """The encoded fields without the signature."""
        if self._body:
            return self._body
        if self.recipient.kind not in _KINDS:
            raise ValueError("recipient kind must be 'user' or 'room'")
        if len(self.header) > MAX_HEADER or len(self.ciphertext) > MAX_CIPHERTEXT:
            raise ValueError("envelope header or ciphertext too large")
        if not 0 <= self.timestamp < 2**64:
            raise ValueError("timestamp out of range")
        texts = [
            t.encode("utf-8")
            for t in (self.sender_user, self.sender_device, self.recipient.name,
                      self.recipient.device)
        ]
        if any(len(t) > MAX_NAME for t in texts):
            raise ValueError("name too long")
        su, sd, rn, rd = texts
        return b"".join((
            bytes((self.version, self.type)),
            len(su).to_bytes(2, "big"), su, len(sd).to_bytes(2, "big"), sd,
            bytes((_KINDS[self.recipient.kind],)),
            len(rn).to_bytes(2, "big"), rn, len(rd).to_bytes(2, "big"), rd,
            len(self.header).to_bytes(2, "big"), self.header,
            len(self.ciphertext).to_bytes(4, "big"), self.ciphertext,
            self.timestamp.to_bytes(8, "big"),
        ))

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
        if not isinstance(data, bytes) or len(data) < P.SIG_LEN + 2:
            raise DecodeError("envelope: truncated")
        if len(data) > MAX_HEADER + MAX_CIPHERTEXT + 4 * MAX_NAME + 64:
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
        sender.verify(self.signature, self.signed_bytes())
