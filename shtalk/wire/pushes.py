"""Every push a server may send unasked: one frozen record per type (docs/PROTOCOL.md,
"Pushes"), so client code meets typed events, never dicts read by key (as
zulip-terminal's ``api_types.py`` types the events of its server).

`parse_push` is lenient where a newer server may add to the protocol (an unknown push
type, a key a push does not have) and strict about the fields a push has: a malformed
one never reaches client code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from shtalk.wire.fields import Int, Str, opt
from shtalk.wire.limits import MAX_ENVELOPE_BYTES, MAX_SEQ
from shtalk.wire.records import Key, ServerPush, nested, one_of, record
from shtalk.wire.shapes import CLIENT_ID, DEVICE_ID, ROOM, USER, Sender, Target

__all__ = [
    "PUSH_MAP", "SERVER_PUSHES", "BacklogDonePush", "DevicePush", "InvitedPush",
    "LoggedOutPush", "MemberPush", "MessagePush", "PresencePush", "Sender", "ServerPush",
    "Target", "parse_push",
]  # fmt: skip

_WORD = Str(1, 32)
_B64_TEXT = Str(0, (MAX_ENVELOPE_BYTES + 2) // 3 * 4)


@record
class MessagePush(ServerPush):
    """A stored message for this device.  ``envelope`` stays base64 text: decoding it
    is the receiver's work, so a broken one is reported (and acknowledged) as a bad
    message like any envelope that fails its checks, rather than dropped unread."""

    NAME = "message"
    seq: Annotated[int, Int(1, MAX_SEQ)]
    ts: Annotated[int, Int(0)]
    sender: Annotated[Sender, nested(Sender), Key("from")]
    to: Annotated[Target, one_of(Target)]
    client_id: Annotated[str, CLIENT_ID]
    envelope: Annotated[str, _B64_TEXT]
    expires_at: Annotated[int | None, opt(Int(0))] = None


@record
class BacklogDonePush(ServerPush):
    """Every message queued while the device was away has been pushed."""

    NAME = "backlog_done"
    count: Annotated[int, Int(0)]


@record
class PresencePush(ServerPush):
    NAME = "presence"
    user: Annotated[str, USER]
    status: Annotated[str, _WORD]  # online | offline


@record
class MemberPush(ServerPush):
    NAME = "member"
    room: Annotated[str, ROOM]
    user: Annotated[str, USER]
    event: Annotated[str, _WORD]  # joined | left | kicked | role
    by: Annotated[str | None, opt(USER)] = None
    role: Annotated[str | None, opt(_WORD)] = None


@record
class InvitedPush(ServerPush):
    NAME = "invited"
    room: Annotated[str, ROOM]
    by: Annotated[str | None, opt(USER)] = None


@record
class DevicePush(ServerPush):
    """A contact (or this account) published keys for a device or removed one."""

    NAME = "device"
    user: Annotated[str, USER]
    device: Annotated[str, DEVICE_ID]
    event: Annotated[str, _WORD]  # keys | removed


@record
class LoggedOutPush(ServerPush):
    """The session ended elsewhere; the connection is unauthenticated again."""

    NAME = "logged_out"
    reason: Annotated[str | None, opt(Str(0, 1024))] = None


SERVER_PUSHES: tuple[type[ServerPush], ...] = (
    MessagePush, BacklogDonePush, PresencePush, MemberPush, InvitedPush, DevicePush,
    LoggedOutPush,
)  # fmt: skip

PUSH_MAP: dict[str, type[ServerPush]] = {c.NAME: c for c in SERVER_PUSHES}


def parse_push(obj: Mapping[str, Any]) -> ServerPush | None:
    """The typed push of a JSON object without an ``id``; None for a push type this
    client does not know.  A known push with a bad field raises `ProtocolError`."""
    name = obj.get("type")
    cls = PUSH_MAP.get(name) if isinstance(name, str) else None
    return None if cls is None else cls.from_json(obj)
