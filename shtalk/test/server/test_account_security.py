"""Account security over the real protocol objects (StringTransport, real SQLite, bcrypt).

Email verification and reset codes (read from a MemoryMailer), CAPTCHA gates, TOTP with
replay protection and recovery codes, throttling, password change and reset.
"""

from __future__ import annotations

import time
from typing import Any

import pyotp
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from shtalk.server.accounts import totp
from shtalk.server.config import AccountsSection, ThrottleSection
from shtalk.testing import GOOD_PASSWORD, Peer, ServerParts, build_server

NEW_PASSWORD = "marmalade-pangolin-77"


class Base(TestCase):
    accounts = AccountsSection(require_email_verification=True, require_captcha=True)
    throttle = ThrottleSection()
    store: str | None = None  # "sqlite": the real store (default: the in-memory one)

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        async def go() -> None:
            self.parts: ServerParts = await build_server(
                self.mktemp(), accounts=self.accounts, throttle=self.throttle,
                store=self.store,
            )

        return Deferred.fromCoroutine(go())

    def tearDown(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.parts.close())

    async def call(self, peer: Peer, rtype: str, **fields: Any) -> dict[str, Any]:
        return await peer.reply(peer.request(rtype, **fields))

    async def peer(self, host: str = "192.0.2.10") -> Peer:
        p = Peer(self.parts.factory, host)
        r = await self.call(p, "hello", version=1)
        self.assertTrue(r["ok"], r)
        return p

    def solve(self, challenge: dict[str, Any]) -> dict[str, str]:
        answer = self.parts.security.gates.captchas.answer_for_tests(challenge["id"])
        return {"id": challenge["id"], "answer": answer.lower()}

    async def captcha(self, peer: Peer) -> dict[str, str]:
        r = await self.call(peer, "captcha")
        return self.solve(r["captcha"])

    async def register(self, peer: Peer, name: str) -> dict[str, Any]:
        return await self.call(
            peer, "register", username=name, password=GOOD_PASSWORD,
            email=f"{name}@example.org", captcha=await self.captcha(peer),
        )

    async def active_account(self, name: str) -> Peer:
        p = await self.peer()
        r = await self.register(p, name)
        self.assertTrue(r["ok"], r)
        await self.mail_sent()
        code = self.parts.mailer.last_code(f"{name}@example.org")
        r = await self.call(p, "verify_email", username=name, code=code)
        self.assertTrue(r["ok"], r)
        return p

    async def login(self, peer: Peer, name: str, password: str = GOOD_PASSWORD,
                    **extra: Any) -> dict[str, Any]:
        return await self.call(
            peer, "login", username=name, password=password, device={"id": "d1"}, **extra
        )

    async def mail_sent(self, n: int = 1) -> None:
        """The mails are sent after the reply, once the address is read from the store."""
        await self.parts.settle()
        self.assertGreaterEqual(len(self.parts.mailer.outbox), n, "no mail")


class EmailVerificationTests(Base):
    async def test_register_pending_then_verify_then_login(self) -> None:
        p = await self.peer()
        r = await self.register(p, "alice")
        self.assertTrue(r["ok"], r)
        self.assertEqual(r["status"], "pending")
        await self.mail_sent()
        to, subject, _ = self.parts.mailer.outbox[-1]
        self.assertEqual(to, "alice@example.org")
        self.assertIn("verification", subject)
        code = self.parts.mailer.last_code()
        self.assertEqual(len(totp.normalise_code(code)), 28)  # 140 bits
        r = await self.login(p, "alice")
        self.assertEqual(r["error"]["code"], "email_not_verified")
        # Wrong code, then the right one (lower case, no dashes), then reuse.
        r = await self.call(p, "verify_email", username="alice", code="0000-0000")
        self.assertEqual(r["error"]["code"], "invalid_code")
        r = await self.call(p, "verify_email", username="Alice",
                            code=code.replace("-", "").lower())
        self.assertTrue(r["ok"], r)
        self.assertEqual(r["status"], "active")
        r = await self.call(p, "verify_email", username="alice", code=code)
        self.assertEqual(r["error"]["code"], "invalid_code")
        r = await self.login(p, "alice")
        self.assertTrue(r["ok"], r)

    async def test_unknown_user_and_wrong_code_same_reply(self) -> None:
        p = await self.peer()
        await self.register(p, "bob")
        a = await self.call(p, "verify_email", username="bob", code="1234")
        b = await self.call(p, "verify_email", username="nobody", code="1234")
        self.assertEqual(a["error"], b["error"])

    async def test_expired_code_refused(self) -> None:
        p = await self.peer()
        await self.register(p, "carol")
        await self.mail_sent()
        code = self.parts.mailer.last_code()
        # The store's clock is the real one: move the code's expiry into the past.
        self.parts.clock.advance(0)
        self.parts.security.verification.clock = _Shifted(  # type: ignore[assignment]
            self.parts.clock, 601
        )
        r = await self.call(p, "verify_email", username="carol", code=code)
        self.assertEqual(r["error"]["code"], "invalid_code")

    async def test_attempts_limited(self) -> None:
        p = await self.peer()
        await self.register(p, "dave")
        await self.mail_sent()
        code = self.parts.mailer.last_code()
        for _ in range(self.accounts.email_code_attempts):
            r = await self.call(p, "verify_email", username="dave", code="WRONG")
            self.assertEqual(r["error"]["code"], "invalid_code")
        r = await self.call(p, "verify_email", username="dave", code=code)
        self.assertIn(r["error"]["code"], ("invalid_code", "rate_limited"))

    async def test_resend_rate_limited_and_same_reply(self) -> None:
        p = await self.peer()
        await self.register(p, "erin")
        await self.mail_sent()
        a = await self.call(p, "resend_verification", username="erin")
        b = await self.call(p, "resend_verification", username="nobody")
        self.assertEqual({k: v for k, v in a.items() if k != "id"},
                         {k: v for k, v in b.items() if k != "id"})
        await self.parts.settle()
        self.assertEqual(len(self.parts.mailer.outbox), 1)  # within resend_interval

    async def test_purge_pending(self) -> None:
        p = await self.peer()
        await self.register(p, "frank")
        self.parts.security.clock = _Shifted(self.parts.clock, 172801)  # type: ignore[assignment]
        n = await self.parts.security.purge_pending()
        self.assertEqual(n, 1)
        r = await self.register(p, "frank")  # the name is free again
        self.assertTrue(r["ok"], r)


class _Shifted:
    """A clock ``offset`` seconds ahead of another (the store keeps the real one)."""

    def __init__(self, clock: Any, offset: float) -> None:
        self.clock = clock
        self.offset = offset

    def seconds(self) -> float:
        return float(self.clock.seconds()) + self.offset

    def callLater(self, *a: Any, **kw: Any) -> Any:
        return self.clock.callLater(*a, **kw)


class CaptchaGateTests(Base):
    async def test_register_needs_captcha(self) -> None:
        p = await self.peer()
        r = await self.call(p, "register", username="gina", password=GOOD_PASSWORD,
                            email="g@example.org")
        self.assertEqual(r["error"]["code"], "captcha_required")
        challenge = r["error"]["captcha"]
        self.assertIn("\n", challenge["art"])
        r = await self.call(p, "register", username="gina", password=GOOD_PASSWORD,
                            email="g@example.org", captcha=self.solve(challenge))
        self.assertTrue(r["ok"], r)

    async def test_wrong_reused_other_connection_expired(self) -> None:
        p, q = await self.peer(), await self.peer("192.0.2.11")
        fields = {"password": GOOD_PASSWORD, "email": "h@example.org"}
        # wrong
        r = await self.call(p, "captcha")
        bad = {"id": r["captcha"]["id"], "answer": "nope"}
        r = await self.call(p, "register", username="hal", captcha=bad, **fields)
        self.assertEqual(r["error"]["code"], "captcha_failed")
        # right answer, but from another connection
        sol = await self.captcha(p)
        r = await self.call(q, "register", username="hal", captcha=sol, **fields)
        self.assertEqual(r["error"]["code"], "captcha_failed")
        # ... which consumed it: the owner cannot use it either
        r = await self.call(p, "register", username="hal", captcha=sol, **fields)
        self.assertEqual(r["error"]["code"], "captcha_failed")
        # reused
        sol = await self.captcha(p)
        r = await self.call(p, "register", username="hal", captcha=sol, **fields)
        self.assertTrue(r["ok"], r)
        r = await self.call(p, "register", username="hal2", captcha=sol, **fields)
        self.assertEqual(r["error"]["code"], "captcha_failed")
        # expired
        sol = await self.captcha(p)
        # (the book's clock only: the protocol's pre-auth deadline would close p)
        self.parts.security.gates.captchas.clock = _Shifted(  # type: ignore[assignment]
            self.parts.clock, self.accounts.captcha_ttl + 1
        )
        r = await self.call(p, "register", username="hal3", captcha=sol, **fields)
        self.assertEqual(r["error"]["code"], "captcha_failed")

    async def test_monitor_seam(self) -> None:
        await self.active_account("ivan")
        p = await self.peer("192.0.2.40")
        self.parts.server.demands.require(address="192.0.2.40")
        r = await self.login(p, "ivan")
        self.assertEqual(r["error"]["code"], "captcha_required")
        r = await self.login(p, "ivan", captcha=self.solve(r["error"]["captcha"]))
        self.assertTrue(r["ok"], r)
        # satisfied: the next login needs none
        q = await self.peer("192.0.2.40")
        r = await self.login(q, "ivan")
        self.assertTrue(r["ok"], r)
        # the throttle's own seam, by account name
        await self.parts.security.gates.throttle.require_captcha(account="ivan", seconds=60)
        q = await self.peer("192.0.2.41")
        r = await self.login(q, "ivan")
        self.assertEqual(r["error"]["code"], "captcha_required")


    async def test_monitor_seam_gates_sends_of_a_logged_in_account(self) -> None:
        """A flag raised while the spammer is logged in takes effect at their next send."""
        await self.active_account("judy")
        p = await self.peer("192.0.2.50")
        r = await self.login(p, "judy")
        self.assertTrue(r["ok"], r)
        send = {"to": {"user": "judy"}, "envelope": "aGk=", "client_id": "c-1"}
        r = await self.call(p, "send", **send)
        self.assertTrue(r["ok"], r)
        uid = self.parts.server.users.by_key["judy"].id
        self.parts.server.demands.require(account_id=uid)
        r = await self.call(p, "send", **dict(send, client_id="c-2"))
        self.assertEqual(r["error"]["code"], "captcha_required")
        challenge = r["error"]["captcha"]
        r = await self.call(p, "send", **dict(send, client_id="c-2"),
                            captcha={"id": challenge["id"], "answer": "wrong"})
        self.assertEqual(r["error"]["code"], "captcha_failed")
        r = await self.call(p, "send", **dict(send, client_id="c-2"),
                            captcha=self.solve(r["error"]["captcha"]))
        self.assertTrue(r["ok"], r)
        # Solved: the demand is gone.
        r = await self.call(p, "send", **dict(send, client_id="c-3"))
        self.assertTrue(r["ok"], r)


class TotpBase(Base):
    async def enrolled(self, name: str) -> tuple[Peer, str, list[str]]:
        p = await self.active_account(name)
        r = await self.login(p, name)
        self.assertTrue(r["ok"], r)
        r = await self.call(p, "totp_enroll")
        self.assertTrue(r["ok"], r)
        secret = r["secret"]
        self.assertEqual(len(secret), 32)  # 160 bits
        self.assertTrue(r["uri"].startswith("otpauth://totp/shtalk:" + name))
        # A code of the previous step (one step of skew) confirms it.
        prev = pyotp.TOTP(secret).at(time.time() - 30)
        r = await self.call(p, "totp_confirm", code=prev)
        self.assertTrue(r["ok"], r)
        codes = r["recovery_codes"]
        self.assertEqual(len(codes), 10)
        self.assertEqual(len(set(codes)), 10)
        return p, secret, codes


class TotpAtRestTests(TotpBase):
    store = "sqlite"  # what is in the database file

    async def test_secret_sealed_at_rest(self) -> None:
        _, secret, _ = await self.enrolled("lee")
        with open(self.parts.store.path, "rb") as f:
            raw = f.read()
        wal = self.parts.store.path + "-wal"
        with open(wal, "rb") as f:
            raw += f.read()
        self.assertNotIn(secret.encode(), raw)


class TotpTests(TotpBase):
    async def test_enrol_states(self) -> None:
        p = await self.active_account("jim")
        await self.login(p, "jim")
        r = await self.call(p, "totp_confirm", code="123456")
        self.assertEqual(r["error"]["code"], "totp_not_enabled")
        r = await self.call(p, "totp_enroll")
        secret = r["secret"]
        r = await self.call(p, "totp_enroll")  # replaces the unconfirmed secret
        self.assertNotEqual(r["secret"], secret)
        r = await self.call(p, "totp_confirm", code=pyotp.TOTP(r["secret"]).now())
        self.assertTrue(r["ok"], r)
        r = await self.call(p, "totp_enroll")
        self.assertEqual(r["error"]["code"], "totp_enabled")

    async def test_login_needs_code_replay_refused(self) -> None:
        _, secret, _ = await self.enrolled("jane")
        q = await self.peer("192.0.2.50")
        r = await self.login(q, "jane")
        self.assertEqual(r["error"]["code"], "otp_required")
        code = pyotp.TOTP(secret).now()
        r = await self.login(q, "jane", otp=code)
        self.assertTrue(r["ok"], r)
        q2 = await self.peer("192.0.2.51")
        r = await self.login(q2, "jane", otp=code)
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        # Two steps ahead: refused.
        r = await self.login(q2, "jane", otp=pyotp.TOTP(secret).at(time.time() + 60))
        self.assertEqual(r["error"]["code"], "invalid_credentials")

    async def test_recovery_code_once_and_disable(self) -> None:
        p, _, codes = await self.enrolled("kim")
        q = await self.peer("192.0.2.52")
        r = await self.login(q, "kim", otp=codes[0].lower())
        self.assertTrue(r["ok"], r)
        q2 = await self.peer("192.0.2.53")
        r = await self.login(q2, "kim", otp=codes[0])
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        # disable needs password + code
        r = await self.call(p, "totp_disable", password="wrong-password-123", code=codes[1])
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        r = await self.call(p, "totp_disable", password=GOOD_PASSWORD, code="000000")
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        r = await self.call(p, "totp_disable", password=GOOD_PASSWORD, code=codes[2])
        self.assertTrue(r["ok"], r)
        q3 = await self.peer("192.0.2.54")
        r = await self.login(q3, "kim")
        self.assertTrue(r["ok"], r)


class PasswordTests(Base):
    async def test_change_revokes_every_refresh_token(self) -> None:
        p = await self.active_account("mia")
        first = await self.login(p, "mia")
        other = await self.peer("192.0.2.60")
        second = await self.login(other, "mia")
        self.assertTrue(second["ok"], second)
        r = await self.call(p, "password_change", password="not-the-password-1",
                            new_password=NEW_PASSWORD)
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        r = await self.call(p, "password_change", password=GOOD_PASSWORD,
                            new_password=NEW_PASSWORD)
        self.assertTrue(r["ok"], r)
        self.assertEqual(r["sessions_revoked"], 2)
        self.assertEqual(other.pushes("logged_out")[-1]["type"], "logged_out")
        fresh = await self.peer("192.0.2.61")
        for old in (first, second):
            x = await self.call(fresh, "refresh", refresh_token=old["refresh_token"])
            self.assertFalse(x["ok"], x)
        x = await self.call(fresh, "refresh", refresh_token=r["refresh_token"])
        self.assertTrue(x["ok"], x)
        fresh2 = await self.peer("192.0.2.62")
        self.assertTrue((await self.login(fresh2, "mia", NEW_PASSWORD))["ok"])

    async def test_reset_by_email_code(self) -> None:
        p = await self.active_account("ned")
        first = await self.login(p, "ned")
        q = await self.peer("192.0.2.70")
        r = await self.call(q, "password_reset_request", username="ned")
        self.assertEqual(r["error"]["code"], "captcha_required")
        r = await self.call(q, "password_reset_request", username="ned",
                            captcha=self.solve(r["error"]["captcha"]))
        self.assertTrue(r["ok"], r)
        r2 = await self.call(q, "password_reset_request", username="nobody-here",
                             captcha=await self.captcha(q))
        self.assertEqual({k: v for k, v in r.items() if k != "id"},
                         {k: v for k, v in r2.items() if k != "id"})
        await self.mail_sent(2)
        code = self.parts.mailer.last_code("ned@example.org")
        r = await self.call(q, "password_reset", username="ned", code="WRONG",
                            new_password=NEW_PASSWORD)
        self.assertEqual(r["error"]["code"], "invalid_code")
        r = await self.call(q, "password_reset", username="ned", code=code,
                            new_password=NEW_PASSWORD)
        self.assertTrue(r["ok"], r)
        self.assertTrue(p.pushes("logged_out"))
        x = await self.call(q, "refresh", refresh_token=first["refresh_token"])
        self.assertFalse(x["ok"], x)
        r = await self.call(q, "password_reset", username="ned", code=code,
                            new_password=GOOD_PASSWORD)
        self.assertEqual(r["error"]["code"], "invalid_code")
        self.assertTrue((await self.login(q, "ned", NEW_PASSWORD))["ok"])


class ThrottleTests(Base):
    throttle = ThrottleSection(
        free_failures=2, base_delay=1, max_delay=2, captcha_after=4,
        address_free_failures=100, address_captcha_after=100,
    )

    async def test_delays_then_captcha_then_legitimate_login(self) -> None:
        await self.active_account("olga")
        p = await self.peer("192.0.2.80")
        for _ in range(2):
            r = await self.login(p, "olga", "wrong-password-123")
            self.assertEqual(r["error"]["code"], "invalid_credentials")
        r = await self.login(p, "olga", GOOD_PASSWORD)
        self.assertEqual(r["error"]["code"], "rate_limited")
        self.assertGreaterEqual(r["error"]["retry_after"], 1)
        # An unknown name is throttled the same way (no enumeration).
        for _ in range(2):
            await self.login(p, "nobody-at-all", "wrong-password-123")
        r2 = await self.login(p, "nobody-at-all", "wrong-password-123")
        self.assertEqual(r2["error"]["code"], "rate_limited")
        self.parts.clock.advance(1.1)
        r = await self.login(p, "olga", "wrong-password-123")
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        self.parts.clock.advance(2.1)
        r = await self.login(p, "olga", "wrong-password-123")
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        self.parts.clock.advance(2.1)
        r = await self.login(p, "olga", GOOD_PASSWORD)
        self.assertEqual(r["error"]["code"], "captcha_required")
        r = await self.login(p, "olga", GOOD_PASSWORD, captcha=self.solve(r["error"]["captcha"]))
        self.assertTrue(r["ok"], r)
        self.assertEqual(await self.parts.security.gates.throttle.failures(account="olga"), 0)


class ThrottleAndRateLimitTests(Base):
    """The failure throttle and the token buckets both apply to a login: the refusal
    names the later of the two waits, and a throttled attempt costs no token, so
    waiting ``retry_after`` out is enough."""

    throttle = ThrottleSection(
        free_failures=1, base_delay=8, max_delay=60, captcha_after=100,
        address_free_failures=100, address_captcha_after=100,
    )

    def limit(self, login_account: str) -> None:
        from shtalk.server.config import RateLimitSection
        from shtalk.server.ops.ratelimit import RateLimiter

        self.parts.limit(RateLimiter(
            RateLimitSection(login_account=login_account, login_address="off"),
            self.parts.clock,
        ))

    async def wait_and_login(self, p: Peer, name: str, r: dict[str, Any]) -> None:
        self.assertEqual(r["error"]["code"], "rate_limited", r)
        self.parts.clock.advance(r["error"]["retry_after"])
        # (A new connection from the same address: a long wait outlasts the login deadline.)
        p = await self.peer(p.transport.getPeer().host)
        r = await self.login(p, name)
        self.assertTrue(r["ok"], r)

    async def test_throttled_attempts_take_no_token(self) -> None:
        await self.active_account("paula")
        self.limit("3/60")  # one token back every 20 s
        p = await self.peer("192.0.2.81")
        r = await self.login(p, "paula", "wrong-password-123")
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        for _ in range(2):  # impatient retries while the throttle says 8 s
            r = await self.login(p, "paula")
            self.assertEqual(r["error"]["retry_after"], 8)
        await self.wait_and_login(p, "paula", r)

    async def test_retry_after_is_the_later_of_throttle_and_bucket(self) -> None:
        await self.active_account("quinn")
        self.limit("1/4")  # the bucket is back after 4 s, the throttle wants 8
        p = await self.peer("192.0.2.82")
        r = await self.login(p, "quinn", "wrong-password-123")
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        r = await self.login(p, "quinn")
        self.assertEqual(r["error"]["retry_after"], 8)
        await self.wait_and_login(p, "quinn", r)

    async def test_bucket_later_than_throttle(self) -> None:
        await self.active_account("rosa")
        self.limit("1/60")
        p = await self.peer("192.0.2.83")
        r = await self.login(p, "rosa", "wrong-password-123")
        r = await self.login(p, "rosa")
        self.assertEqual(r["error"]["retry_after"], 60)
        await self.wait_and_login(p, "rosa", r)
