"""Field validators and the schema of every request type.

Validation happens once, at the edge: handlers receive values of the right
type and range (binary fields already base64-decoded) and never re-check.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from shtalk.wire.errors import ErrorCode, ProtocolError

PROTOCOL_VERSION = 1
# The wire format's hard ceiling; the server's configured limit
# ([storage] max_envelope_bytes, 64 KiB by default) is checked on send.
MAX_ENVELOPE_BYTES = 1 << 20
DEFAULT_ENVELOPE_BYTES = 65536
MAX_DEVICE_ENVELOPES = 64
MAX_ACK_BATCH = 1024
MAX_ID_LENGTH = 64
MAX_EXPIRY_SECONDS = 30 * 24 * 3600
MAX_BUNDLE_BYTES = 16384
MAX_ONE_TIME_KEY_BYTES = 4096
MAX_ONE_TIME_KEYS_PER_PUBLISH = 100


@dataclass(frozen=True)
class Field:
    """A validator; ``check`` returns the value handlers will see."""

    optional: bool = field(default=False, kw_only=True)

    def check(self, value: Any, where: str) -> Any:
        raise NotImplementedError

    @staticmethod
    def bad(where: str, expected: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_FIELD, f"field '{where}' must be {expected}")


@dataclass(frozen=True)
class Str(Field):
    min_len: int = 1
    max_len: int = 256
    pattern: str | None = None
    pattern_help: str = ""

    def check(self, value: Any, where: str) -> str:
        if not isinstance(value, str):
            raise self.bad(where, "a string")
        if not (self.min_len <= len(value) <= self.max_len):
            raise self.bad(where, f"{self.min_len}-{self.max_len} characters long")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise self.bad(where, self.pattern_help or "in the documented form")
        return value


@dataclass(frozen=True)
class Int(Field):
    min: int = 0
    max: int = 2**53

    def check(self, value: Any, where: str) -> int:
        # bool is an int subclass in Python; on the wire it is not a number.
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.bad(where, "an integer")
        if not (self.min <= value <= self.max):
            raise self.bad(where, f"between {self.min} and {self.max}")
        return value


@dataclass(frozen=True)
class Bool(Field):
    def check(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.bad(where, "true or false")
        return value


@dataclass(frozen=True)
class B64(Field):
    """Standard base64 with padding; decoded size bounded."""

    max_bytes: int = MAX_ENVELOPE_BYTES
    min_bytes: int = 1
    code: ErrorCode = ErrorCode.BAD_FIELD

    def check(self, value: Any, where: str) -> bytes:
        if not isinstance(value, str):
            raise self.bad(where, "a base64 string")
        # Refuse before decoding: the encoded length bounds the work.
        if len(value) > (self.max_bytes + 2) // 3 * 4:
            raise ProtocolError(
                ErrorCode.ENVELOPE_TOO_LARGE
                if self.code is ErrorCode.ENVELOPE_TOO_LARGE
                else ErrorCode.BAD_FIELD,
                f"field '{where}' is larger than {self.max_bytes} bytes",
            )
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise self.bad(where, "standard base64") from None
        if len(raw) > self.max_bytes:
            raise ProtocolError(
                ErrorCode.ENVELOPE_TOO_LARGE
                if self.code is ErrorCode.ENVELOPE_TOO_LARGE
                else ErrorCode.BAD_FIELD,
                f"field '{where}' is larger than {self.max_bytes} bytes",
            )
        if len(raw) < self.min_bytes:
            raise self.bad(where, f"at least {self.min_bytes} bytes")
        return raw


@dataclass(frozen=True)
class Obj(Field):
    fields: Mapping[str, Field]

    def check(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.bad(where, "an object")
        return check_fields(self.fields, value, where + ".")


@dataclass(frozen=True)
class ListOf(Field):
    item: Field
    max_items: int = 256
    min_items: int = 0

    def check(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.bad(where, "a list")
        if not (self.min_items <= len(value) <= self.max_items):
            raise self.bad(where, f"a list of {self.min_items}-{self.max_items} items")
        item = self.item
        # Fast path (ack seq lists): every item an int (not a bool) within range.
        if (
            isinstance(item, Int)
            and value
            and all(type(v) is int for v in value)
            and item.min <= min(value)
            and max(value) <= item.max
        ):
            return list(value)
        return [item.check(v, f"{where}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class MapOf(Field):
    key: Str
    value: Field
    max_items: int = MAX_DEVICE_ENVELOPES

    def check(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.bad(where, "an object")
        if not (1 <= len(value) <= self.max_items):
            raise self.bad(where, f"an object with 1-{self.max_items} entries")
        out: dict[str, Any] = {}
        for k, v in value.items():
            self.key.check(k, f"{where} key")
            out[k] = self.value.check(v, f"{where}.{k}")
        return out


@dataclass(frozen=True)
class OneOf(Field):
    """An object with exactly one of the named keys (e.g. a user or a room)."""

    choices: Mapping[str, Field]

    def check(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict) or len(value) != 1:
            raise self.bad(where, "an object with exactly one of " + ", ".join(self.choices))
        ((k, v),) = value.items()
        if k not in self.choices:
            raise self.bad(where, "an object with exactly one of " + ", ".join(self.choices))
        return {k: self.choices[k].check(v, f"{where}.{k}")}


def opt(f: Field) -> Field:
    """Mark a field optional without repeating every constructor argument."""
    return replace(f, optional=True)


def check_fields(
    schema: Mapping[str, Field], obj: Mapping[str, Any], prefix: str = ""
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        if name not in obj or obj[name] is None:
            if not spec.optional:
                raise ProtocolError(ErrorCode.MISSING_FIELD, f"field '{prefix}{name}' is required")
            continue
        out[name] = spec.check(obj[name], prefix + name)
    return out


# Shapes reused across requests.  Names are only length-checked here; the
# server applies the full normalisation rules (shtalk.wire.names) so the
# error can name the rule.
USER = Str(1, 64)
ROOM = Str(1, 65)
DEVICE_ID = Str(1, 64, r"[A-Za-z0-9_\-]+", "letters, digits, '_' and '-'")
DEVICE = Obj(
    {
        "id": Str(1, 64, r"[A-Za-z0-9_\-]+", "letters, digits, '_' and '-'"),
        "label": opt(Str(0, 256)),
    }
)
TOKEN = Str(16, 4096)
CLIENT_ID = Str(1, MAX_ID_LENGTH, r"[A-Za-z0-9_\-.:]+", "letters, digits and '_-.:'")
DEVICE_KEY = Str(3, 130, r"[^/]+/[A-Za-z0-9_\-]+", "'user/device'")

CAPTCHA = Obj({"id": Str(1, 64), "answer": Str(0, 64)})
CODE = Str(1, 64)
PASSWORD = Str(1, 1024)

REQUESTS: dict[str, Mapping[str, Field]] = {
    "hello": {"version": Int(0, 2**31), "client": opt(Str(0, 128))},
    "ping": {},
    "register": {
        "username": USER,
        "password": Str(1, 1024),
        "email": Str(3, 254),
        "captcha": opt(CAPTCHA),
    },
    "login": {
        "username": USER,
        "password": Str(1, 1024),
        "device": DEVICE,
        "otp": opt(CODE),
        "captcha": opt(CAPTCHA),
    },
    # Account security (shtalk.server.accounts.security).
    "captcha": {
        "kind": opt(Str(3, 5, pattern="art|words", pattern_help='"art" or "words"')),
    },
    "verify_email": {"username": USER, "code": CODE, "captcha": opt(CAPTCHA)},
    "resend_verification": {"username": USER},
    "password_reset_request": {"username": USER, "captcha": opt(CAPTCHA)},
    "password_reset": {
        "username": USER,
        "code": CODE,
        "new_password": PASSWORD,
        "captcha": opt(CAPTCHA),
    },
    "password_change": {"password": PASSWORD, "new_password": PASSWORD, "captcha": opt(CAPTCHA)},
    "totp_enroll": {},
    "totp_confirm": {"code": CODE},
    "totp_disable": {"password": PASSWORD, "code": CODE, "captcha": opt(CAPTCHA)},
    "totp_recovery_codes": {"password": PASSWORD, "code": CODE, "captcha": opt(CAPTCHA)},
    "resume": {"access_token": TOKEN},
    "refresh": {"refresh_token": TOKEN},
    "logout": {},
    "devices": {"user": opt(USER)},
    "room_create": {"room": ROOM, "invite_only": opt(Bool())},
    "room_join": {"room": ROOM},
    "room_leave": {"room": ROOM},
    "room_invite": {"room": ROOM, "user": USER},
    "room_kick": {"room": ROOM, "user": USER},
    "room_role": {"room": ROOM, "user": USER, "role": Str(1, 16, r"admin|member")},
    "room_list": {},
    "room_members": {"room": ROOM},
    "send": {
        "to": OneOf({"user": USER, "room": ROOM}),
        "envelope": opt(B64(code=ErrorCode.ENVELOPE_TOO_LARGE)),
        "envelopes": opt(MapOf(DEVICE_KEY, B64(code=ErrorCode.ENVELOPE_TOO_LARGE))),
        "client_id": CLIENT_ID,
        "expires_in": opt(Int(1, MAX_EXPIRY_SECONDS)),
        "captcha": opt(CAPTCHA),  # only when the server asked (captcha_required)
    },
    "ack": {"seqs": ListOf(Int(1, 2**63 - 1), max_items=MAX_ACK_BATCH, min_items=1)},
    "device_remove": {"device": DEVICE_ID},
    "keys_publish": {
        "bundle": opt(B64(max_bytes=MAX_BUNDLE_BYTES)),
        "replace": opt(Bool()),
        "one_time": opt(
            ListOf(
                Obj(
                    {
                        "kind": Str(2, 2, r"ec|pq", "'ec' or 'pq'"),
                        "id": Int(0, 2**32 - 1),
                        "key": B64(max_bytes=MAX_ONE_TIME_KEY_BYTES),
                    }
                ),
                max_items=MAX_ONE_TIME_KEYS_PER_PUBLISH,
            )
        ),
    },
    "keys_count": {},
    # Operations (issue 7): a verifiable abuse report; see docs/PROTOCOL.md.
    "report": {
        "user": USER,
        "reason": Str(1, 500),
        "envelope": opt(B64(max_bytes=MAX_ENVELOPE_BYTES)),
        "plaintext": opt(Str(0, 4000)),
    },
    "keys_fetch": {"user": USER, "device": opt(DEVICE_ID)},
}

# Requests allowed before authentication; everything else needs a session.
PRE_AUTH = frozenset(
    {
        "hello",
        "ping",
        "register",
        "login",
        "resume",
        "refresh",
        "captcha",
        "verify_email",
        "resend_verification",
        "password_reset_request",
        "password_reset",
    }
)
