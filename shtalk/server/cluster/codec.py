"""What travels on a mailbox's channel: a length-prefixed header, then the push line or nothing.

``<kind:1> <len:1> <node> <seq:8> <prev_seq:8> <sender id:8> <len:1> <len:1> <mailbox>
<sender device> <body>`` (numbers big-endian, no separators; each ``len`` is the byte
length of the name after it).

Kinds: ``m`` a message whose body is its encoded push line (what every device of the
mailbox is sent); ``h`` a message sent as its header only (large, or addressed device by
device): the receiver reads it from the store; ``l`` a membership change of a room (a
link of the chain, no body); ``n`` a notice on a user's inbox channel that they joined
(body ``1 <room id>``) or left (``0 <room id>``) a room, outside the chain, so that the
processes holding that user's devices subscribe or unsubscribe the room.

Why this shape: the numbers come out of one ``struct`` call and the names and the body
are slices at offsets the header states, so a frame costs one parse on each receiver,
with no JSON and no search for separators; the push line is written to sockets as it
came.  The node name comes first so a process spots its own frames coming back with
one ``startswith`` (`own_tag`).  Every length is checked against the frame's size: a
short or inconsistent frame is a `BadFrame`, never a wrong slice.  Nothing secret is in
a header; envelopes only ever appear inside the push line, which is the same bytes the
devices receive.
"""

from __future__ import annotations

import struct
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


_NUMBERS = struct.Struct("!QQQBB")  # seq, prev_seq, sender id, mailbox and device lengths
_NUMBERS_SIZE = _NUMBERS.size


def encode(
    kind: bytes, node: bytes, mailbox: str, seq: int, prev_seq: int, sender_id: int = 0,
    sender_device: str = "-", body: bytes = b"",
) -> bytes:
    mb = mailbox.encode("ascii")
    device = sender_device.encode("ascii")
    return b"%s%s%s%s%s%s" % (
        kind, own_tag(node), _NUMBERS.pack(seq, prev_seq, sender_id, len(mb), len(device)),
        mb, device, body,
    )  # fmt: skip


def own_tag(node: bytes) -> bytes:
    """What follows the kind in every frame ``node`` publishes."""
    return bytes((len(node),)) + node


def decode(payload: bytes) -> Frame:
    try:
        start = 2 + payload[1]
        seq, prev, sender, mb_len, dev_len = _NUMBERS.unpack_from(payload, start)
        at = start + _NUMBERS_SIZE
        mid = at + mb_len
        end = mid + dev_len
        if len(payload) < end:
            raise ValueError
        return Frame(
            payload[:1], payload[2:start], payload[at:mid].decode("ascii"), seq, prev,
            sender, payload[mid:end].decode("ascii"), payload[end:],
        )  # fmt: skip
    except (IndexError, ValueError, struct.error):  # UnicodeDecodeError is a ValueError
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
    """A node name as it goes in headers: printable ASCII without spaces, at most 255
    bytes (its length is one byte)."""
    raw = name.encode("ascii", "replace")
    if not raw or len(raw) > 255 or any(c <= 32 or c >= 127 for c in raw):
        raise ValueError("node names are 1-255 printable ASCII characters without spaces")
    return raw
