"""Every request a client may send: one frozen record per type (docs/PROTOCOL.md).

A class per request, a map from name to class and the set allowed before
authentication, in the manner of Synapse's replication commands
(``synapse/replication/tcp/commands.py``).  Each field's validator is the server's
check: `parse_line` runs the same ones (through `shtalk.wire.schema.REQUESTS`), so a
client building a request and a server reading it cannot disagree on its shape.
"""

from __future__ import annotations

from typing import Annotated

from shtalk.wire.errors import ErrorCode
from shtalk.wire.fields import B64, Bool, Int, ListOf, MapOf, Str, opt
from shtalk.wire.limits import (
    MAX_ACK_BATCH,
    MAX_BUNDLE_BYTES,
    MAX_ENVELOPE_BYTES,
    MAX_EXPIRY_SECONDS,
    MAX_ONE_TIME_KEYS_PER_PUBLISH,
    MAX_SEQ,
    PROTOCOL_VERSION,
)
from shtalk.wire.records import ClientRequest, nested, one_of, record
from shtalk.wire.shapes import (
    CAPTCHA,
    CLIENT_ID,
    CODE,
    DEVICE,
    DEVICE_ID,
    DEVICE_KEY,
    PASSWORD,
    ROOM,
    TOKEN,
    USER,
    CaptchaAnswer,
    DeviceInfo,
    OneTimeKey,
    Target,
)

Captcha_ = Annotated[CaptchaAnswer | None, opt(CAPTCHA)]
"""Any request that checks a secret takes a CAPTCHA answer once the server asks."""
Username = Annotated[str, USER]
Roomname = Annotated[str, ROOM]
Password = Annotated[str, PASSWORD]
Code = Annotated[str, CODE]
_ENVELOPE = B64(code=ErrorCode.ENVELOPE_TOO_LARGE)


# -- session -----------------------------------------------------------------------


@record
class Hello(ClientRequest):
    NAME = "hello"
    version: Annotated[int, Int(0, 2**31)] = PROTOCOL_VERSION
    client: Annotated[str | None, opt(Str(0, 128))] = None


@record
class Ping(ClientRequest):
    NAME = "ping"


@record
class Register(ClientRequest):
    NAME = "register"
    username: Username
    password: Password
    email: Annotated[str, Str(3, 254)]
    captcha: Captcha_ = None


@record
class Login(ClientRequest):
    NAME = "login"
    username: Username
    password: Password
    device: Annotated[DeviceInfo, DEVICE]
    otp: Annotated[str | None, opt(CODE)] = None
    captcha: Captcha_ = None


@record
class Resume(ClientRequest):
    NAME = "resume"
    access_token: Annotated[str, TOKEN]


@record
class Refresh(ClientRequest):
    NAME = "refresh"
    refresh_token: Annotated[str, TOKEN]


@record
class Logout(ClientRequest):
    NAME = "logout"


# -- account security (shtalk.server.accounts.security) ----------------------------


@record
class Captcha(ClientRequest):
    NAME = "captcha"
    kind: Annotated[str | None, opt(Str(3, 5, pattern="art|words",
                                        pattern_help='"art" or "words"'))] = None


@record
class VerifyEmail(ClientRequest):
    NAME = "verify_email"
    username: Username
    code: Code
    captcha: Captcha_ = None


@record
class ResendVerification(ClientRequest):
    NAME = "resend_verification"
    username: Username


@record
class PasswordResetRequest(ClientRequest):
    NAME = "password_reset_request"
    username: Username
    captcha: Captcha_ = None


@record
class PasswordReset(ClientRequest):
    NAME = "password_reset"
    username: Username
    code: Code
    new_password: Password
    captcha: Captcha_ = None


@record
class PasswordChange(ClientRequest):
    NAME = "password_change"
    password: Password
    new_password: Password
    captcha: Captcha_ = None


@record
class TotpEnroll(ClientRequest):
    NAME = "totp_enroll"


@record
class TotpConfirm(ClientRequest):
    NAME = "totp_confirm"
    code: Code


@record
class TotpDisable(ClientRequest):
    NAME = "totp_disable"
    password: Password
    code: Code
    captcha: Captcha_ = None


@record
class TotpRecoveryCodes(ClientRequest):
    NAME = "totp_recovery_codes"
    password: Password
    code: Code
    captcha: Captcha_ = None


# -- devices and rooms -------------------------------------------------------------


@record
class Devices(ClientRequest):
    NAME = "devices"
    user: Annotated[str | None, opt(USER)] = None


@record
class DeviceRemove(ClientRequest):
    NAME = "device_remove"
    device: Annotated[str, DEVICE_ID]


@record
class RoomCreate(ClientRequest):
    NAME = "room_create"
    room: Roomname
    invite_only: Annotated[bool | None, opt(Bool())] = None


@record
class RoomJoin(ClientRequest):
    NAME = "room_join"
    room: Roomname


@record
class RoomLeave(ClientRequest):
    NAME = "room_leave"
    room: Roomname


@record
class RoomInvite(ClientRequest):
    NAME = "room_invite"
    room: Roomname
    user: Username


@record
class RoomKick(ClientRequest):
    NAME = "room_kick"
    room: Roomname
    user: Username


@record
class RoomRole(ClientRequest):
    NAME = "room_role"
    room: Roomname
    user: Username
    role: Annotated[str, Str(1, 16, r"admin|member")]


@record
class RoomList(ClientRequest):
    NAME = "room_list"


@record
class RoomMembers(ClientRequest):
    NAME = "room_members"
    room: Roomname


# -- messages ----------------------------------------------------------------------


@record
class Send(ClientRequest):
    """``envelope`` goes to every recipient device without one of its own in
    ``envelopes`` (keyed ``"user/device"``); the server parses neither."""

    NAME = "send"
    to: Annotated[Target, one_of(Target)]
    envelope: Annotated[bytes | None, opt(_ENVELOPE)] = None
    envelopes: Annotated[dict[str, bytes] | None, opt(MapOf(DEVICE_KEY, _ENVELOPE))] = None
    client_id: Annotated[str, CLIENT_ID]
    expires_in: Annotated[int | None, opt(Int(1, MAX_EXPIRY_SECONDS))] = None
    captcha: Captcha_ = None  # only when the server asked (captcha_required)


@record
class Ack(ClientRequest):
    NAME = "ack"
    seqs: Annotated[tuple[int, ...], ListOf(Int(1, MAX_SEQ), max_items=MAX_ACK_BATCH,
                                            min_items=1)]


@record
class Report(ClientRequest):
    """A verifiable abuse report (docs/PROTOCOL.md, "report")."""

    NAME = "report"
    user: Username
    reason: Annotated[str, Str(1, 500)]
    envelope: Annotated[bytes | None, opt(B64(max_bytes=MAX_ENVELOPE_BYTES))] = None
    plaintext: Annotated[str | None, opt(Str(0, 4000))] = None


# -- the prekey directory ----------------------------------------------------------


@record
class KeysPublish(ClientRequest):
    NAME = "keys_publish"
    bundle: Annotated[bytes | None, opt(B64(max_bytes=MAX_BUNDLE_BYTES))] = None
    replace: Annotated[bool | None, opt(Bool())] = None
    one_time: Annotated[
        tuple[OneTimeKey, ...] | None,
        opt(ListOf(nested(OneTimeKey), max_items=MAX_ONE_TIME_KEYS_PER_PUBLISH)),
    ] = None


@record
class KeysCount(ClientRequest):
    NAME = "keys_count"


@record
class KeysFetch(ClientRequest):
    NAME = "keys_fetch"
    user: Username
    device: Annotated[str | None, opt(DEVICE_ID)] = None


CLIENT_REQUESTS: tuple[type[ClientRequest], ...] = (
    Hello, Ping, Register, Login, Captcha, VerifyEmail, ResendVerification,
    PasswordResetRequest, PasswordReset, PasswordChange, TotpEnroll, TotpConfirm,
    TotpDisable, TotpRecoveryCodes, Resume, Refresh, Logout, Devices, RoomCreate, RoomJoin,
    RoomLeave, RoomInvite, RoomKick, RoomRole, RoomList, RoomMembers, Send, Ack,
    DeviceRemove, KeysPublish, KeysCount, Report, KeysFetch,
)  # fmt: skip
"""Every request type, the session's first, then accounts, rooms, messages and keys."""

REQUEST_MAP: dict[str, type[ClientRequest]] = {c.NAME: c for c in CLIENT_REQUESTS}

PRE_AUTH = frozenset(c.NAME for c in (
    Hello, Ping, Register, Login, Resume, Refresh, Captcha, VerifyEmail,
    ResendVerification, PasswordResetRequest, PasswordReset,
))  # fmt: skip
"""Requests allowed before authentication; everything else needs a session."""

__all__ = [
    "CLIENT_REQUESTS", "PRE_AUTH", "REQUEST_MAP", "Ack", "Captcha", "CaptchaAnswer",
    "ClientRequest", "DeviceInfo", "DeviceRemove", "Devices", "Hello", "KeysCount",
    "KeysFetch", "KeysPublish", "Login", "Logout", "OneTimeKey", "PasswordChange",
    "PasswordReset", "PasswordResetRequest", "Ping", "Refresh", "Register", "Report",
    "ResendVerification", "Resume", "RoomCreate", "RoomInvite", "RoomJoin", "RoomKick",
    "RoomLeave", "RoomList", "RoomMembers", "RoomRole", "Send", "Target", "TotpConfirm",
    "TotpDisable", "TotpEnroll", "TotpRecoveryCodes", "VerifyEmail",
]  # fmt: skip
