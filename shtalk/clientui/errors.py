"""Errors people will meet, in plain words: what happened and what to do."""

from __future__ import annotations

import math
import time
from typing import Any

from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.python.failure import Failure

from shtalk.wire.errors import ErrorCode as E

SERVER_CODES: dict[str, str] = {
    E.INVALID_CREDENTIALS: "Wrong username or password. Check both and try again "
                           "(the server does not say which one was wrong).",
    E.USERNAME_TAKEN: "That username is taken. Pick another one.",
    E.BAD_USERNAME: "That username is not allowed: 3-32 letters, digits, _ . - "
                    "(not starting or ending with . or -).",
    E.WEAK_PASSWORD: "The server refused the password as too weak: use at least 12 "
                     "characters, not a common password.",
    E.PASSWORD_TOO_LONG: "The password is too long (at most 72 bytes). Pick a shorter one.",
    E.BAD_EMAIL: "That is not an email address the server accepts.",
    E.NO_SUCH_USER: "There is no such user on this server. Check the spelling.",
    E.NO_SUCH_ROOM: "There is no such room. /rooms lists them; /create makes one.",
    E.NO_SUCH_DEVICE: "There is no such device. /devices lists them.",
    E.ROOM_EXISTS: "A room with that name exists already: /join it, or pick another name.",
    E.NOT_A_MEMBER: "You (or that person) are not a member of that room. /join it first.",
    E.ALREADY_MEMBER: "Already a member of that room.",
    E.INVITE_REQUIRED: "That room is invite-only: ask a member to /invite you.",
    E.FORBIDDEN: "Your role in that room does not allow this; ask the room's owner.",
    E.TOKEN_REVOKED: "This device's session was ended (logged out elsewhere or removed). "
                     "Log in again with /login.",
    E.TOO_MANY_CONNECTIONS: "Too many connections from your address; close some clients.",
    E.UNSUPPORTED_VERSION: "The server speaks another protocol version: update shtalk.",
    E.INTERNAL_ERROR: "The server failed to do that (its log says why). Try again later.",
    E.ENVELOPE_TOO_LARGE: "That message is too large for the server. Send less at once.",
}


def wait_text(retry_after: Any) -> str:
    """The server's ``retry_after`` (seconds; honest: trying again then works) in words."""
    try:
        seconds = max(1, math.ceil(float(retry_after)))
    except (TypeError, ValueError):
        return "in a little while"
    if seconds < 120:
        return f"in {seconds} s"
    at = time.strftime("%H:%M", time.localtime(time.time() + seconds))
    return f"in {math.ceil(seconds / 60)} minutes, at {at} ({seconds} s)"


def describe(error: BaseException | Failure | Any) -> str:
    """One or two sentences for a person; never a traceback."""
    # Imported here, not at the top: the screen's first frame does not wait for the
    # client stack (crypto, TLS); by the time there is an error to describe, it is loaded.
    from shtalk.client.errors import (
        AuthenticationFailed,
        CertificateChanged,
        CertificateInvalid,
        ClientError,
        ConnectionLost,
        IdentityNotAccepted,
        RequestTimeout,
        ServerError,
        UntrustedServer,
    )
    from shtalk.client.localstore import CorruptEntry, LocalStoreError, WrongPassphrase

    if isinstance(error, Failure):
        error = error.value
    if isinstance(error, CertificateChanged):
        return (f"DANGER: the certificate of {error.host}:{error.port} changed "
                f"(expected {error.expected[:23]}..., got {error.got[:23]}...). Someone may be "
                "intercepting the connection, or the server's operator replaced the "
                "certificate. Ask them; if they did, run: shtalk-urwid --forget-server "
                f"{error.host}:{error.port}")
    if isinstance(error, UntrustedServer):
        return "You did not trust the server's certificate, so shtalk did not connect."
    if isinstance(error, CertificateInvalid):
        return (f"The certificate of {error.host}:{error.port} is not valid for that name "
                "or not signed by a trusted authority. Check the address.")
    if isinstance(error, WrongPassphrase):
        return "That passphrase does not unlock this device's store. Try again."
    if isinstance(error, CorruptEntry):
        return "A record in the local store failed its integrity check (damaged or edited)."
    if isinstance(error, LocalStoreError):
        return f"The local store cannot be used: {error}"
    if isinstance(error, AuthenticationFailed):
        return "Login failed: wrong password, or you cancelled. Use /login to try again."
    if isinstance(error, IdentityNotAccepted):
        return (f"{error}. Check with them in person, then /trust them to accept the new "
                "key (or /verify to compare safety numbers).")
    if isinstance(error, RequestTimeout):
        return "The server did not answer in time. It may be overloaded; try again."
    if isinstance(error, ConnectionLost):
        return "Not connected to the server right now; shtalk keeps trying. Try again when " \
               "the status bar says online."
    if isinstance(error, ServerError):
        if error.code == E.RATE_LIMITED:
            retry = error.detail.get("retry_after") or error.reply.get("retry_after")
            return f"The server is rate-limiting you (too many requests). Try again " \
                   f"{wait_text(retry)}."
        text = SERVER_CODES.get(error.code)
        if text:
            return text
        return f"The server refused: {error.message or error.code}"
    if isinstance(error, ClientError):
        return str(error)
    if isinstance(error, DNSLookupError):
        return "The server's name could not be resolved. Check the address."
    if isinstance(error, (ConnectError, TimeoutError)):
        return ("The server cannot be reached (refused or timed out). Check the address and "
                "your network; shtalk keeps retrying.")
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
