"""What the client tells its user (the UI, a test): plain immutable records."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MessageReceived:
    conversation: str  # "user:<name>" or "room:<name>"
    sender: str
    device: str
    body: str
    ts: int  # sender's timestamp, milliseconds
    id: str
    expires_at: float | None
    verified: bool  # the sender device's identity was marked verified


@dataclass(frozen=True, slots=True)
class MessageState:
    """A message we sent moved to "sent" (durable on the server) or "failed"."""

    id: str
    conversation: str
    state: str
    error: str = ""


@dataclass(frozen=True, slots=True)
class NewDevice:
    """A device we had not seen for a contact (or for ourselves) appeared: shown, never silent."""

    user: str
    device: str


@dataclass(frozen=True, slots=True)
class IdentityChanged:
    """A known device now presents another identity key: sending to ``user`` is blocked
    until the change is acknowledged with ``accept_identity``."""

    user: str
    device: str


@dataclass(frozen=True, slots=True)
class BadMessage:
    """An envelope that failed its signature check or decryption: dropped, never shown."""

    sender: str
    device: str
    reason: str
    seq: int


@dataclass(frozen=True, slots=True)
class MemberChanged:
    room: str
    user: str
    event: str  # joined | left | kicked | role
    by: str = ""


@dataclass(frozen=True, slots=True)
class Invited:
    room: str
    by: str


@dataclass(frozen=True, slots=True)
class Presence:
    user: str
    status: str


@dataclass(frozen=True, slots=True)
class TimerChanged:
    conversation: str
    seconds: int  # 0 = off
    by: str


@dataclass(frozen=True, slots=True)
class MessagesExpired:
    count: int


@dataclass(frozen=True, slots=True)
class ConnectionChanged:
    state: str
    message: str


@dataclass(frozen=True, slots=True)
class BacklogDone:
    count: int


Event = (
    MessageReceived
    | MessageState
    | NewDevice
    | IdentityChanged
    | BadMessage
    | MemberChanged
    | Invited
    | Presence
    | TimerChanged
    | MessagesExpired
    | ConnectionChanged
    | BacklogDone
)
