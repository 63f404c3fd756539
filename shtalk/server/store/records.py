"""Plain records that cross the store boundary (no ORM, no live rows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str  # display form, as registered
    key: str  # case-folded canonical form, unique
    pw_hash: bytes
    status: str  # "active" | "pending" | "suspended"
    created: float


@dataclass(frozen=True, slots=True)
class Device:
    user_id: int
    device_id: str
    label: str
    created: float


@dataclass(frozen=True, slots=True)
class Session:
    """One login of one device: the refresh-token family."""

    family: str
    user_id: int
    device_id: str
    expires: float
    revoked: bool


@dataclass(frozen=True, slots=True)
class Room:
    id: int
    name: str
    key: str
    owner_id: int
    invite_only: bool
    created: float


@dataclass(frozen=True, slots=True)
class Member:
    user_id: int
    user_name: str
    role: str  # "owner" | "admin" | "member"


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to be stored once, whatever the number of recipients.

    ``mailbox`` is ``"r:<room id>"`` for a room or ``"u:<user id>"`` for a
    user's inbox.  A direct message to another user that must also reach the
    sender's other devices is stored in both inboxes (two rows at most).
    ``envelope`` is for every device of the mailbox; ``envelopes`` maps
    ``(user id, device id)`` to a device-specific envelope.  Both opaque.
    """

    mailboxes: tuple[str, ...]
    sender_id: int
    sender_device: str
    client_id: str
    ts: int  # milliseconds since the epoch
    expires_at: float | None  # seconds since the epoch
    target: str  # what the recipient is shown: "user:<name>" or "room:<name>"
    envelope: bytes | None
    envelopes: dict[tuple[int, str], bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    seq: int
    mailbox: str
    sender_id: int
    sender_device: str
    client_id: str
    ts: int
    expires_at: float | None
    target: str
    envelope: bytes | None
    envelopes: dict[tuple[int, str], bytes]
    # The seq of the mailbox's previous change (message or membership), 0 if none: the
    # chain a receiver on another process applies in order, and finds gaps in.
    prev_seq: int = 0

    def envelope_for(self, user_id: int, device_id: str) -> bytes | None:
        return self.envelopes.get((user_id, device_id), self.envelope)


@dataclass(frozen=True, slots=True)
class AppendResult:
    """``seqs`` has one sequence number per mailbox, in NewMessage order."""

    seqs: tuple[int, ...]
    duplicate: bool
    messages: tuple[StoredMessage, ...] = ()


@dataclass(frozen=True, slots=True)
class ChainLink:
    """A membership change's place in its room mailbox's chain of changes.

    A kick takes a seq in ``r:<room>`` like a message does, under the same per-mailbox
    lock, so every process applies it before any message committed after it."""

    mailbox: str
    seq: int
    prev_seq: int


@dataclass(frozen=True, slots=True)
class OneTimeKey:
    kind: str  # "ec" (X25519 one-time prekey) or "pq" (ML-KEM one-time prekey)
    key_id: int
    key: bytes  # opaque to the server; signed inside by the device's identity key


@dataclass(frozen=True, slots=True)
class ClaimedBundle:
    """A device's published bundle plus the one-time keys claimed for one fetcher."""

    device_id: str
    bundle: bytes
    one_time: tuple[OneTimeKey, ...]


@dataclass(frozen=True, slots=True)
class TotpRecord:
    """An account's TOTP enrolment: the sealed secret, and the last step accepted."""

    user_id: int
    sealed: bytes
    enabled: bool
    last_step: int


# Outcomes of checking an emailed code.
CODE_OK = "ok"
CODE_WRONG = "wrong"  # counted; the code lives on until its attempts run out
CODE_NONE = "none"  # no live code (never sent, used, expired or out of attempts)


@dataclass
class Flag:
    """A monitoring flag (``shtalk.server.ops.monitor``); kept by an ``IFlagStore``.

    Mutable: the monitor updates an open flag in place (count, last, evidence) and saves
    it again.  ``id`` 0: not stored yet (the store assigns one)."""

    id: int
    kind: str  # "account" or "address"
    subject: str  # user id, or the client address
    label: str  # the account's name, or the address
    signal: str
    reason: str
    action: str
    count: int
    first: float
    last: float
    status: str = "open"  # open, cleared
    evidence: list[dict[str, Any]] = field(default_factory=list)
