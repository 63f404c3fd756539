"""What travels on a mailbox's channel: one header line, then the push line or nothing.

``<kind> <node> <mailbox> <seq> <prev_seq> <sender id> <sender device>\\n<body>``

Kinds: ``m`` a message whose body is its encoded push line (what every device of the
mailbox is sent); ``h`` a message sent as its header only (large, or addressed device by
device): the receiver reads it from the store; ``l`` a membership change of a room (a
link of the chain, no body); ``n`` a notice on a user's inbox channel that they joined
(body ``1 <room id>``) or left (``0 <room id>``) a room, outside the chain, so that the
processes holding that user's devices subscribe or unsubscribe the room.

Why this shape: the header is split once with ``bytes.split`` and the push line is
written to sockets as it came, so a message costs one parse on each receiver and no
JSON; every field but the body is a name or a number that holds no space (node names are
checked, device ids are ``[A-Za-z0-9_-]``).  Nothing secret is in a header; envelopes
only ever appear inside the push line, which is the same bytes the devices receive.
"""

from __future__ import annotations

from typing import NamedTuple

MESSAGE = b"m"
HEADER = b"h"
LINK = b"l"
NOTICE = b"n"

#: Push lines longer than this travel as a header; the receivers read the store.
INLINE_MAX = 4096


class Frame(NamedTuple):
    kind: bytes
    node: bytes
    mailbox: str
    seq: int
    prev_seq: int
    sender_id: int
    sender_device: str
    body: bytes


class BadFrame(ValueError):
    """Not something a process of this cluster published."""


def encode(
    kind: bytes, node: bytes, mailbox: str, seq: int, prev_seq: int, sender_id: int = 0,
    sender_device: str = "-", body: bytes = b"",
) -> bytes:
    return b"%s %s %s %d %d %d %s\n%s" % (
        kind, node, mailbox.encode("ascii"), seq, prev_seq, sender_id,
        sender_device.encode("ascii"), body,
    )  # fmt: skip


def decode(payload: bytes) -> Frame:
    head, _, body = payload.partition(b"\n")
    try:
        kind, node, mailbox, seq, prev, sender, device = head.split(b" ")
        return Frame(
            kind, node, mailbox.decode("ascii"), int(seq), int(prev), int(sender),
            device.decode("ascii"), body,
        )  # fmt: skip
    except (ValueError, UnicodeDecodeError):
        raise BadFrame("malformed bus frame") from None


def notice_body(room_id: int, joined: bool) -> bytes:
    return b"%d %d" % (1 if joined else 0, room_id)


def parse_notice(body: bytes) -> tuple[int, bool]:
    """(room id, joined) of a notice's body."""
    try:
        flag, room = body.split(b" ")
        return int(room), flag == b"1"
    except ValueError:
        raise BadFrame("malformed membership notice") from None


def check_node_name(name: str) -> bytes:
    """A node name as it goes in headers: printable ASCII without spaces."""
    raw = name.encode("ascii", "replace")
    if not raw or any(c <= 32 or c >= 127 for c in raw):
        raise ValueError("node names are printable ASCII without spaces")
    return raw
