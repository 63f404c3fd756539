"""Every push the server writes, one function per kind, each returning the encoded line.

Pushes are built here and nowhere else, so the wire shape of each lives in one place
(docs/PROTOCOL.md, "Pushes") and a line is encoded once however many connections it
goes to.  A message's ``to`` is kept with it as a target string, ``room:<name>`` or
``user:<name>``, made by `room_target` and `user_target`.
"""

from __future__ import annotations

import base64
from typing import Any

from shtalk.server.store.records import StoredMessage
from shtalk.wire.frames import push


def room_target(name: str) -> str:
    return f"room:{name}"


def user_target(name: str) -> str:
    return f"user:{name}"


def message(m: StoredMessage, envelope: bytes, sender_name: str) -> bytes:
    """A stored message with one of its envelopes (the common one or a device's)."""
    kind, _, name = m.target.partition(":")
    fields: dict[str, Any] = {
        "seq": m.seq,
        "ts": m.ts,
        "from": {"user": sender_name, "device": m.sender_device},
        "to": {kind: name},
        "client_id": m.client_id,
        "envelope": base64.b64encode(envelope).decode("ascii"),
    }
    if m.expires_at is not None:
        fields["expires_at"] = int(m.expires_at)
    return push("message", **fields)


def presence(user: str, online: bool) -> bytes:
    return push("presence", user=user, status="online" if online else "offline")


def member(room: str, user: str, event: str, **extra: str) -> bytes:
    """``event``: joined, left, kicked (``by``), role (``role``)."""
    return push("member", room=room, user=user, event=event, **extra)


def device(user: str, device_id: str, event: str) -> bytes:
    """``event``: keys (new or changed keys) or removed."""
    return push("device", user=user, device=device_id, event=event)


def invited(room: str, by: str) -> bytes:
    return push("invited", room=room, by=by)


def logged_out(reason: str) -> bytes:
    return push("logged_out", reason=reason)


def backlog_done(count: int) -> bytes:
    return push("backlog_done", count=count)
