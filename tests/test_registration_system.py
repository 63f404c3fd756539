# mypy: disallow-untyped-calls=False
"""Registration limits against the real ``twistd`` over TLS, with the server's DEFAULT
``[ratelimit]`` and ``[monitor]`` settings (the harness turns both off for the tests of
other features), CAPTCHA and email verification on.

Ten minutes of a classroom cannot take ten real minutes: the server's clock is moved by
the test through its test hook (``SHTALK_TEST_CLOCK_FILE``, shtalk/server/testclock.py),
so the real token buckets, throttle and monitor run on shifted time.  CAPTCHA answers come
from ``SHTALK_TEST_CAPTCHA_ANSWERS``, email codes from the server's outbox.

* a classroom of 30 behind one address registers (CAPTCHA, email code) and logs in within
  ten minutes: every one of them succeeds, and no one is asked for a CAPTCHA at login;
* a script trying 1,000 registrations from one address in ten minutes gets about 47;
* ``retry_after`` is honest: not accepted sooner, accepted once it has passed.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from tests.harness import (
    PASSWORD,
    ConnectionClosed,
    JsonLineClient,
    ServerProcess,
    connect,
    fresh_name,
)

DEFAULTS_ON = {
    "accounts": {"require_captcha": True, "require_email_verification": True},
    "ratelimit": {"enabled": True},
    "monitor": {"enabled": True},
}


class RegistrationLimitsTests(unittest.TestCase):
    timeout = 300

    def setUp(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir(parents=True)
        self.answers = base / "captcha-answers.txt"
        self.clock_file = base / "clock-offset"
        self.offset = 0.0
        for key, path in (("SHTALK_TEST_CAPTCHA_ANSWERS", self.answers),
                          ("SHTALK_TEST_CLOCK_FILE", self.clock_file)):
            os.environ[key] = str(path)
            self.addCleanup(os.environ.pop, key, None)
        (base / "server").mkdir()
        self.server = ServerProcess(DEFAULTS_ON, base_dir=str(base / "server"))
        self.server.start()
        self.addCleanup(self.server.cleanup)
        self._answers: dict[str, str] = {}
        self._read = 0

    def advance(self, seconds: float) -> None:
        """Move the server's clock (what its buckets, throttle and monitor see)."""
        self.offset += seconds
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(repr(self.offset))
        os.replace(tmp, self.clock_file)

    def answer(self, challenge: dict[str, Any]) -> dict[str, str]:
        with open(self.answers, encoding="ascii") as f:
            f.seek(self._read)
            chunk = f.read()
            self._read += len(chunk)
        for line in chunk.splitlines():
            cid, _, text = line.partition(" ")
            self._answers[cid] = text
        return {"id": challenge["id"], "answer": self._answers[challenge["id"]].lower()}

    def email_code(self, email: str) -> str:
        outbox = self.server.data_dir / "outbox"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for mail in sorted(outbox.glob("*.eml")) if outbox.exists() else []:
                text = mail.read_text(errors="replace")
                if f"To: {email}" in text:
                    m = re.search(r"^    (\S+)$", text, re.M)
                    if m:
                        return m.group(1)
            time.sleep(0.05)
        raise AssertionError(f"no mail to {email}")

    @inlineCallbacks
    def connection(self) -> Any:
        client: JsonLineClient = yield connect(self.server)
        self.addCleanup(client.disconnect)
        yield client.hello()
        return client

    @inlineCallbacks
    def attempt(self, client: JsonLineClient, name: str) -> Any:
        """One registration attempt as a client does it: the request, the CAPTCHA it is
        answered with, the answer.  Returns the final reply."""
        fields: dict[str, Any] = {"username": name, "password": PASSWORD,
                                  "email": f"{name}@example.org"}
        r = yield client.request("register", **fields)
        if r.get("ok") is False and r["error"]["code"] == "captcha_required":
            r = yield client.request("register", captcha=self.answer(r["error"]["captcha"]),
                                     **fields)
        return r

    @inlineCallbacks
    def test_a_classroom_of_30_registers_in_ten_minutes(self) -> Any:
        for i in range(30):
            name = fresh_name("k")
            client = yield self.connection()
            r = yield self.attempt(client, name)
            self.assertTrue(r["ok"], f"student {i + 1}: {r}")
            self.assertEqual(r["status"], "pending")
            yield client.ok("verify_email", username=name,
                            code=self.email_code(f"{name}@example.org"))
            r = yield client.request("login", username=name, password=PASSWORD,
                                     device={"id": "lab"})
            self.assertTrue(r["ok"], f"student {i + 1} logging in: {r}")
            yield client.disconnect()
            self.advance(20)  # 30 students in 10 minutes

    @inlineCallbacks
    def test_a_script_registering_1000_does_not_get_far(self) -> Any:
        made = refused = closed = 0
        client = yield self.connection()
        for _ in range(1000):
            while True:
                if client.is_closed:  # closed after too many refusals: a script reconnects
                    client = yield self.connection()
                    closed += 1
                try:
                    r = yield self.attempt(client, fresh_name("s"))
                    break
                except ConnectionClosed:
                    continue
            if r.get("ok"):
                made += 1
            else:
                self.assertEqual(r["error"]["code"], "rate_limited", r)
                self.assertNotIn("captcha", r["error"])  # refused before any challenge
                refused += 1
            self.advance(0.6)  # 1,000 attempts in 10 minutes
        # 40 at once, then 40 an hour: about 47 in ten minutes.
        self.assertGreaterEqual(made, 30)
        self.assertLessEqual(made, 50)
        self.assertEqual(made + refused, 1000)
        self.assertGreater(closed, 0)  # and it was disconnected for insisting

    @inlineCallbacks
    def test_retry_after_is_honest(self) -> Any:
        client = yield self.connection()
        accepted = 0
        while accepted <= 60:
            r = yield self.attempt(client, fresh_name("h"))
            if not r.get("ok"):
                break
            accepted += 1
        self.assertEqual(accepted, 40)  # the burst of the default 40/3600
        self.assertEqual(r["error"]["code"], "rate_limited", r)
        wait = r["error"]["retry_after"]
        self.assertIn(f"retry in {wait} s", r["error"]["message"])
        self.assertLessEqual(wait, 90)  # one token of 40 an hour: 90 s at most
        client = yield self.connection()
        self.advance(wait - 2)
        r = yield self.attempt(client, fresh_name("h"))
        self.assertEqual(r["error"]["code"], "rate_limited", "accepted before retry_after")
        self.advance(2)
        r = yield self.attempt(client, fresh_name("h"))
        self.assertTrue(r["ok"], f"not accepted after waiting retry_after out: {r}")
