"""Shapes several messages share: name fields, tokens, and the small nested records
(a conversation target, a device, a CAPTCHA answer, a one-time key, a sender).

Names are only length-checked here; the server applies the full normalisation rules
(`shtalk.wire.names`) so its error can name the rule.
"""

from __future__ import annotations

from typing import Annotated

from shtalk.wire.fields import B64, Int, Str, opt
from shtalk.wire.limits import MAX_ID_LENGTH, MAX_ONE_TIME_KEY_BYTES
from shtalk.wire.records import Record, nested, record

USER = Str(1, 64)
ROOM = Str(1, 65)
DEVICE_ID = Str(1, 64, r"[A-Za-z0-9_\-]+", "letters, digits, '_' and '-'")
TOKEN = Str(16, 4096)
CLIENT_ID = Str(1, MAX_ID_LENGTH, r"[A-Za-z0-9_\-.:]+", "letters, digits and '_-.:'")
DEVICE_KEY = Str(3, 130, r"[^/]+/[A-Za-z0-9_\-]+", "'user/device'")
CODE = Str(1, 64)
PASSWORD = Str(1, 1024)


@record
class Target(Record):
    """Where a message goes: exactly one of a user (a direct message) or a room."""

    user: Annotated[str | None, opt(USER)] = None
    room: Annotated[str | None, opt(ROOM)] = None


@record
class DeviceInfo(Record):
    """The device a login is for: a stable id chosen by the client, a label for people."""

    id: Annotated[str, DEVICE_ID]
    label: Annotated[str | None, opt(Str(0, 256))] = None


@record
class CaptchaAnswer(Record):
    """The answer to a challenge the server showed (``error.captcha``)."""

    id: Annotated[str, Str(1, 64)]
    answer: Annotated[str, Str(0, 64)]


@record
class OneTimeKey(Record):
    """A one-time pre-key (``ec``: X25519, ``pq``: ML-KEM-768), signed inside."""

    kind: Annotated[str, Str(2, 2, r"ec|pq", "'ec' or 'pq'")]
    id: Annotated[int, Int(0, 2**32 - 1)]
    key: Annotated[bytes, B64(max_bytes=MAX_ONE_TIME_KEY_BYTES)]


@record
class Sender(Record):
    """Who sent a message, as the server authenticated it."""

    user: Annotated[str, USER]
    device: Annotated[str, DEVICE_ID]


DEVICE = nested(DeviceInfo)
CAPTCHA = nested(CaptchaAnswer)
