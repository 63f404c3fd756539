"""The plaintext inside an E2EE envelope: a small versioned JSON object.

Parsing is strict so that a peer's malformed payload becomes a BadMessage,
never an exception inside the client.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

VERSION = 1
MAX_BODY = 32 * 1024


class PayloadError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Text:
    id: str
    conversation: str  # from the sender's view: "user:<recipient>" or "room:<name>"
    body: str
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class SenderKey:
    room: str
    dist: bytes


@dataclass(frozen=True, slots=True)
class Timer:
    conversation: str
    seconds: int


Payload = Text | SenderKey | Timer


def encode(p: Payload) -> bytes:
    obj: dict[str, Any]
    if isinstance(p, Text):
        obj = {"v": VERSION, "t": "text", "id": p.id, "conv": p.conversation, "body": p.body}
        if p.expires_at is not None:
            obj["expires_at"] = p.expires_at
    elif isinstance(p, SenderKey):
        obj = {"v": VERSION, "t": "skd", "room": p.room, "dist": base64.b64encode(p.dist).decode()}
    else:
        obj = {"v": VERSION, "t": "timer", "conv": p.conversation, "seconds": p.seconds}
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _str(obj: dict[str, Any], key: str, limit: int = 256) -> str:
    v = obj.get(key)
    if not isinstance(v, str) or len(v) > limit:
        raise PayloadError(f"payload field {key!r} is missing or malformed")
    return v


def decode(data: bytes) -> Payload:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise PayloadError("payload is not UTF-8 JSON") from None
    if not isinstance(obj, dict) or obj.get("v") != VERSION:
        raise PayloadError("unknown payload version")
    kind = obj.get("t")
    if kind == "text":
        exp = obj.get("expires_at")
        if exp is not None and (not isinstance(exp, int | float) or isinstance(exp, bool)):
            raise PayloadError("payload field 'expires_at' is malformed")
        return Text(
            _str(obj, "id", 200),
            _str(obj, "conv", 100),
            _str(obj, "body", MAX_BODY),
            float(exp) if exp is not None else None,
        )
    if kind == "skd":
        try:
            dist = base64.b64decode(_str(obj, "dist", 8192), validate=True)
        except binascii.Error:
            raise PayloadError("payload field 'dist' is not base64") from None
        return SenderKey(_str(obj, "room", 100), dist)
    if kind == "timer":
        seconds = obj.get("seconds")
        if not isinstance(seconds, int) or isinstance(seconds, bool) or not (
            0 <= seconds <= 30 * 24 * 3600
        ):
            raise PayloadError("payload field 'seconds' is malformed")
        return Timer(_str(obj, "conv", 100), seconds)
    raise PayloadError("unknown payload type")
