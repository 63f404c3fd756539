"""Authentication events, success or not, to the operator's log (ASVS 16.3.1).

One line per event with the address, the request type, the result code and who (the
account and device once logged in, else the username the request named); secrets
never.  A successful registration is also a signal for the monitoring.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from shtalk.server.ops.monitor import Monitor
from shtalk.wire.frames import Request

log = Logger()

AUDITED = frozenset({
    "register", "login", "resume", "refresh", "logout", "verify_email", "resend_verification",
    "password_reset_request", "password_reset", "password_change", "totp_enroll",
    "totp_confirm", "totp_disable", "totp_recovery_codes", "device_remove",
})


class Audit:
    def __init__(self, monitor: Monitor | None = None) -> None:
        self.monitor = monitor

    def record(
        self, request: Request, result: str, peer: str, peer_key: str, avatar: Any
    ) -> None:
        rtype = request.type
        if rtype not in AUDITED:
            return
        fields: dict[str, Any] = {"address": peer, "rtype": rtype, "result": result}
        if avatar is not None:
            fields["user_id"] = avatar.user.id
            fields["device"] = avatar.device_id
        elif isinstance(request.args.get("username"), str):
            fields["username"] = request.args["username"]
        level = log.info if result == "ok" else log.warn
        level("auth {rtype}: {result}", event="auth." + rtype, **fields)
        if rtype == "register" and result == "ok" and self.monitor is not None:
            self.monitor.registered(None, peer_key)
