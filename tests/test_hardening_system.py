# mypy: disallow-untyped-calls=False
"""The outside audit's findings against the real ``twistd -n shtalk`` over TLS: the
monitor's exact stranger threshold, tokens, who sees whose presence, reports that
cannot be turned into a weapon."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.harness import (
    ServerProcess,
    b64,
    expect_error,
    fresh_client_id,
    register_and_login,
)


class _Servers(unittest.TestCase):
    timeout = 90

    def server(self, config: dict[str, dict[str, object]]) -> ServerProcess:
        server = ServerProcess(config)
        self.addCleanup(server.cleanup)
        server.start()
        return server

    @inlineCallbacks
    def logged_in(self, server: ServerProcess, user: str | None = None,
                  device: str = "dev1", register: bool = True) -> Any:
        s = yield register_and_login(server, user, device, register=register)
        self.addCleanup(s.client.disconnect)
        return s


class StrangerThresholdTests(_Servers):
    @inlineCallbacks
    def test_new_account_messaging_strangers_meets_the_captcha_at_the_seventh_send(
        self,
    ) -> Any:
        """Defaults: more than 5 strangers in the window raise the flag (at the 6th), so
        the 7th message of a new account asks for a CAPTCHA, its first one counted."""
        server = self.server({"monitor": {"enabled": True, "registrations": 1000}})
        strangers = []
        for _ in range(7):
            s = yield self.logged_in(server)
            strangers.append(s.user)
        newbie = yield self.logged_in(server)
        for i, peer in enumerate(strangers[:6]):
            yield newbie.client.ok("send", to={"user": peer}, envelope=b64(b"hi %d" % i),
                                   client_id=fresh_client_id())
        reply = yield newbie.client.request("send", to={"user": strangers[6]},
                                            envelope=b64(b"hi 6"),
                                            client_id=fresh_client_id())
        error = expect_error({}, reply, "captcha_required")
        self.assertIn("art", error["captcha"])
        flags = server_flags(server)
        [flag] = [f for f in flags if f["label"] == newbie.user]
        self.assertEqual(flag["signal"], "new_account_strangers")
        self.assertIn("messaged 6 strangers", flag["reason"])


def server_flags(server: ServerProcess) -> list[dict[str, Any]]:
    from shtalk.admin import control

    flags: list[dict[str, Any]] = control.call(
        str(server.data_dir / "admin.sock"), {"cmd": "flags"})["flags"]
    return flags
