"""Account security against the real ``twistd -n shtalk``: mail through a real SMTP relay
on loopback (STARTTLS + AUTH), the outbox default, CAPTCHA, TOTP with oathtool codes,
throttling, and the timing of unknown-user / wrong-password / wrong-code logins.

CAPTCHA answers come from the server's test hook (``SHTALK_TEST_CAPTCHA_ANSWERS``: the
server appends ``id answer`` lines to that file); a real client shows the art.
"""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks

from tests.accountkit import (
    SMTP_PASSWORD,
    SMTP_USER,
    Mailbox,
    RelayFactory,
    code_in,
    make_cert,
    totp_code,
)
from tests.harness import (
    PASSWORD,
    JsonLineClient,
    ServerProcess,
    ServerTestCase,
    connect,
    free_port,
    fresh_name,
    sleep,
)

WRONG = "definitely-not-it-42"


@inlineCallbacks
def refused(client: JsonLineClient, rtype: str, errcode: str, **fields: Any) -> Any:
    """Like ``client.fail`` for requests that have a field named ``code``."""
    r = yield client.request(rtype, **fields)
    assert r.get("ok") is False and r["error"]["code"] == errcode, (rtype, r)
    return r["error"]
_TMP = Path(tempfile.mkdtemp(prefix="shtalk-acct-"))
atexit.register(shutil.rmtree, _TMP, True)
_CERT_PEM, _TLS = make_cert(_TMP)
_SMTP_PORT = free_port()


class AccountCase(ServerTestCase):
    """A server with verification and CAPTCHA on, mailing through our relay."""

    server_config: ClassVar[dict[str, dict[str, object]]] = {
        "accounts": {
            "require_email_verification": True, "require_captcha": True,
            "email_code_ttl": 4, "captcha_ttl": 5, "resend_interval": 1,
        },
        "smtp": {
            "host": "127.0.0.1", "port": _SMTP_PORT, "ca_file": str(_CERT_PEM),
            "username": SMTP_USER.decode(), "password": SMTP_PASSWORD.decode(),
            "retries": 3, "retry_delay": 1, "sender": "shtalk@test.example",
        },
    }
    answers: ClassVar[Path]
    box: Mailbox

    def setUp(self) -> None:
        cls = type(self)
        if "answers" not in cls.__dict__:
            cls.answers = _TMP / f"captcha-{cls.__name__}.txt"
        os.environ["SHTALK_TEST_CAPTCHA_ANSWERS"] = str(cls.answers)
        try:
            super().setUp()
        finally:
            os.environ.pop("SHTALK_TEST_CAPTCHA_ANSWERS", None)
        self.box = Mailbox()
        port = reactor.listenTCP(  # type: ignore[attr-defined]
            _SMTP_PORT, RelayFactory(self.box, _TLS), interface="127.0.0.1")
        self.addCleanup(port.stopListening)

    def answer(self, challenge: dict[str, Any]) -> dict[str, str]:
        for line in self.answers.read_text().splitlines():
            cid, _, answer = line.partition(" ")
            if cid == challenge["id"]:
                return {"id": cid, "answer": answer.lower()}
        raise AssertionError("no answer recorded for that challenge")

    @inlineCallbacks
    def solved(self, client: JsonLineClient) -> Any:
        r = yield client.ok("captcha")
        return self.answer(r["captcha"])

    @inlineCallbacks
    def register(self, client: JsonLineClient, name: str) -> Any:
        err = yield client.fail("register", "captcha_required", username=name,
                                password=PASSWORD, email=f"{name}@example.org")
        self.assertIn("\n", err["captcha"]["art"])
        r = yield client.ok("register", username=name, password=PASSWORD,
                            email=f"{name}@example.org", captcha=self.answer(err["captcha"]))
        self.assertEqual(r["status"], "pending")
        return r

    @inlineCallbacks
    def mail_to(self, name: str, n: int = 1, timeout: float = 10.0) -> Any:
        waited = 0.0
        while len(self.box.to(f"{name}@example.org")) < n:
            if waited > timeout:
                self.fail(f"no mail for {name}; server log:\n{self.server.log_text(3000)}")
            yield sleep(0.05)
            waited += 0.05
        return self.box.to(f"{name}@example.org")[n - 1]

    @inlineCallbacks
    def verified(self, name: str) -> Any:
        c = yield self.connect_hello(name)
        yield self.register(c, name)
        mail = yield self.mail_to(name)
        yield c.ok("verify_email", username=name, code=code_in(mail))
        return c

    def login(self, c: JsonLineClient, name: str, password: str = PASSWORD,
              **extra: Any) -> Any:
        return c.request("login", username=name, password=password,
                         device={"id": "dev1"}, **extra)


class EmailTests(AccountCase):
    @inlineCallbacks
    def test_mail_over_starttls_code_works_once(self) -> Any:
        name = fresh_name("m")
        c = yield self.connect_hello()
        yield self.register(c, name)
        mail = yield self.mail_to(name)
        origin, _, msg, tls, authed = self.box.mails[-1]
        self.assertTrue(tls, "the mail must travel over STARTTLS")
        self.assertTrue(authed, "the relay's AUTH must be used")
        self.assertEqual(origin, b"shtalk@test.example")
        self.assertIn("verification", msg["Subject"])
        self.assertEqual(msg.get_content_type(), "text/plain")
        code = code_in(mail)
        err = yield self.login(c, name)
        self.assertEqual(err["error"]["code"], "email_not_verified")
        yield refused(c, "verify_email", "invalid_code", username=name, code="AAAA-BBBB")
        yield c.ok("verify_email", username=name, code=code)
        yield refused(c, "verify_email", "invalid_code", username=name, code=code)
        r = yield self.login(c, name)
        self.assertTrue(r["ok"], r)
        self.assertNotIn(code, self.server.log_text())

    @inlineCallbacks
    def test_expired_code_refused_resend_works(self) -> Any:
        name = fresh_name("x")
        c = yield self.connect_hello()
        yield self.register(c, name)
        mail = yield self.mail_to(name)
        yield sleep(4.2)  # email_code_ttl = 4 in this class
        yield refused(c, "verify_email", "invalid_code", username=name, code=code_in(mail))
        yield c.ok("resend_verification", username=name)
        fresh = yield self.mail_to(name, 2)
        yield c.ok("verify_email", username=name, code=code_in(fresh))

    @inlineCallbacks
    def test_password_reset_by_mail_revokes_sessions(self) -> Any:
        name = fresh_name("r")
        c = yield self.verified(name)
        first = yield self.login(c, name)
        q = yield self.connect_hello()
        yield q.ok("password_reset_request", username=name, captcha=(yield self.solved(q)))
        mail = yield self.mail_to(name, 2)
        new = "rhubarb-axolotl-58"
        yield q.ok("password_reset", username=name, code=code_in(mail), new_password=new)
        push = yield c.next_push("logged_out")
        self.assertIn("reset", push["reason"])
        yield q.fail("refresh", "token_revoked", refresh_token=first["refresh_token"])
        r = yield self.login(q, name, new)
        self.assertTrue(r["ok"], r)


class CaptchaTests(AccountCase):
    @inlineCallbacks
    def test_wrong_reused_other_connection_expired(self) -> Any:
        a = yield self.connect_hello()
        b = yield self.connect_hello()
        fields = {"password": PASSWORD, "email": "c@example.org"}
        r = yield a.ok("captcha")
        yield a.fail("register", "captcha_failed", username=fresh_name("c"),
                     captcha={"id": r["captcha"]["id"], "answer": "WRONG"}, **fields)
        sol = yield self.solved(a)
        yield b.fail("register", "captcha_failed", username=fresh_name("c"), captcha=sol,
                     **fields)
        sol = yield self.solved(a)
        yield a.ok("register", username=fresh_name("c"), captcha=sol, **fields)
        yield a.fail("register", "captcha_failed", username=fresh_name("c"), captcha=sol,
                     **fields)
        sol = yield self.solved(a)
        yield sleep(5.2)  # captcha_ttl = 5 in this class
        yield a.fail("register", "captcha_failed", username=fresh_name("c"), captcha=sol,
                     **fields)


class TotpTests(AccountCase):
    @inlineCallbacks
    def test_totp_with_independent_codes(self) -> Any:
        name = fresh_name("t")
        c = yield self.verified(name)
        r = yield self.login(c, name)
        self.assertTrue(r["ok"], r)
        e = yield c.ok("totp_enroll")
        secret = e["secret"]
        self.assertTrue(e["uri"].startswith("otpauth://totp/"))
        # Align with a step boundary far enough from its end for the whole test.
        while time.time() % 30 > 20:
            yield sleep(0.5)
        now = time.time()
        conf = yield c.ok("totp_confirm", code=totp_code(secret, now - 30))  # skew -1 step
        recovery = conf["recovery_codes"]
        q = yield self.connect_hello()
        r = yield self.login(q, name)
        self.assertEqual(r["error"]["code"], "otp_required")
        # A code two steps ahead: refused; one step ahead: accepted.
        r = yield self.login(q, name, otp=totp_code(secret, now + 60))
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        ahead = totp_code(secret, now + 30)
        r = yield self.login(q, name, otp=ahead)
        self.assertTrue(r["ok"], r)
        # Replays refused: the same code, and the current step's (older) code.
        q2 = yield self.connect_hello()
        r = yield self.login(q2, name, otp=ahead)
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        r = yield self.login(q2, name, otp=totp_code(secret, now))
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        # A recovery code works once.
        r = yield self.login(q2, name, otp=recovery[0])
        self.assertTrue(r["ok"], r)
        q3 = yield self.connect_hello()
        r = yield self.login(q3, name, otp=recovery[0])
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        # Disabling needs the password and a code.
        yield refused(q2, "totp_disable", "invalid_credentials", password=WRONG, code=recovery[1])
        yield q2.ok("totp_disable", password=PASSWORD, code=recovery[1])
        r = yield self.login(q3, name)
        self.assertTrue(r["ok"], r)


class ThrottleTests(AccountCase):
    server_config: ClassVar[dict[str, dict[str, object]]] = {
        **AccountCase.server_config,
        "throttle": {"free_failures": 2, "base_delay": 1, "max_delay": 1, "captcha_after": 4,
                     "address_free_failures": 1000, "address_captcha_after": 1000},
    }

    @inlineCallbacks
    def test_throttle_engages_then_lets_the_owner_in(self) -> Any:
        name = fresh_name("b")
        c = yield self.verified(name)
        for _ in range(2):
            r = yield self.login(c, name, WRONG)
            self.assertEqual(r["error"]["code"], "invalid_credentials")
        r = yield self.login(c, name)
        self.assertEqual(r["error"]["code"], "rate_limited")
        self.assertEqual(r["error"]["retry_after"], 1)
        yield sleep(1.1)
        r = yield self.login(c, name, WRONG)
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        yield sleep(1.1)
        r = yield self.login(c, name, WRONG)
        self.assertEqual(r["error"]["code"], "invalid_credentials")
        yield sleep(1.1)
        r = yield self.login(c, name)
        self.assertEqual(r["error"]["code"], "captcha_required")
        r = yield self.login(c, name, captcha=self.answer(r["error"]["captcha"]))
        self.assertTrue(r["ok"], r)


class TimingTests(AccountCase):
    server_config: ClassVar[dict[str, dict[str, object]]] = {
        **AccountCase.server_config,
        "throttle": {"free_failures": 1000, "address_free_failures": 1000,
                     "captcha_after": 1000, "address_captcha_after": 1000},
    }
    timeout = 120

    @inlineCallbacks
    def test_same_reply_same_time(self) -> Any:
        user, totp_user = fresh_name("w"), fresh_name("z")
        yield self.verified(user)
        c = yield self.verified(totp_user)
        yield self.login(c, totp_user)
        e = yield c.ok("totp_enroll")
        yield c.ok("totp_confirm", code=totp_code(e["secret"]))
        q = yield self.connect_hello()
        kinds = {
            "unknown user": (fresh_name("n"), PASSWORD, {}),
            "wrong password": (user, WRONG, {}),
            "wrong code": (totp_user, PASSWORD, {"otp": "000000"}),
        }
        times: dict[str, list[float]] = {k: [] for k in kinds}
        replies: dict[str, set[str]] = {k: set() for k in kinds}
        for _ in range(3):  # warm-up
            for name, pw, extra in kinds.values():
                yield self.login(q, name, pw, **extra)
        for _ in range(30):
            for kind, (name, pw, extra) in kinds.items():
                t0 = time.perf_counter()
                r = yield self.login(q, name, pw, **extra)
                times[kind].append(time.perf_counter() - t0)
                replies[kind].add(repr(r["error"]))
        medians = {k: statistics.median(v) for k, v in times.items()}
        report = ", ".join(f"{k}: {m * 1000:.1f} ms" for k, m in medians.items())
        print(f"\nlogin failure medians of 30 each (bcrypt cost 10): {report}")
        (_TMP / "timing.txt").write_text(report + "\n")
        self.assertEqual(len({next(iter(s)) for s in replies.values()}), 1, replies)
        for s in replies.values():
            self.assertEqual(len(s), 1)
        lo, hi = min(medians.values()), max(medians.values())
        self.assertLess(hi - lo, max(0.2 * hi, 0.010), report)


class ClientLibraryTests(AccountCase):
    """The headless client (ShtalkClient) through the whole account life cycle."""

    timeout = 60

    async def flow(self) -> None:
        from shtalk.client.connection import ServerError
        from tests.clientkit import Person

        name = fresh_name("l")
        email = f"{name}@example.org"
        alice = Person(self.server.port, name, "laptop")
        self.addCleanup(lambda: Deferred.fromCoroutine(alice.close()))
        client = await alice.open()
        try:
            await client.register(PASSWORD, email)
            self.fail("register without a CAPTCHA must be refused")
        except ServerError as e:
            self.assertEqual(e.code, "captcha_required")
            challenge = e.reply["error"]["captcha"]
        await client.register(PASSWORD, email, captcha=self.answer(challenge))
        mail = await self.mail_to(name)
        await client.verify_email(code_in(mail))
        await client.login(PASSWORD)
        enrol = await client.totp_enroll()
        codes = await client.totp_confirm(totp_code(enrol["secret"]))
        self.assertEqual(len(codes), 10)
        new = "quince-narwhal-3141"
        revoked = await client.change_password(PASSWORD, new)
        self.assertEqual(revoked, 1)
        await client.request_password_reset(captcha=self.answer(await client.captcha()))
        await self.mail_to(name, 2)
        # A second device: the session answers otp_required through ask_extra.
        phone = Person(self.server.port, name, "phone")
        self.addCleanup(lambda: Deferred.fromCoroutine(phone.close()))
        asked: list[str] = []

        def ask_extra(code: str, error: dict[str, Any]) -> dict[str, Any]:
            asked.append(code)
            return {"otp": codes[0]}

        phone.ask_extra = ask_extra
        other = await phone.open()
        await other.login(new)
        self.assertEqual(asked, ["otp_required"])
        await other.totp_disable(new, codes[1])

    def test_register_verify_totp_change_password(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.flow())


class OutboxTests(ServerTestCase):
    server_config: ClassVar[dict[str, dict[str, object]]] = {
        "accounts": {"require_email_verification": True, "require_captcha": False},
    }

    @inlineCallbacks
    def test_outbox_default(self) -> Any:
        self.assertIn("outbox", self.server.log_text())
        name = fresh_name("o")
        c = yield self.connect_hello()
        r = yield c.ok("register", username=name, password=PASSWORD,
                       email=f"{name}@example.org")
        self.assertEqual(r["status"], "pending")
        outbox = self.server.data_dir / "outbox"
        files: list[Path] = []
        for _ in range(200):
            files = sorted(outbox.glob("*.eml"))
            if files:
                break
            yield sleep(0.05)
        self.assertEqual(len(files), 1)
        self.assertEqual(files[0].stat().st_mode & 0o777, 0o600)
        from email import message_from_bytes

        msg = message_from_bytes(files[0].read_bytes())
        self.assertEqual(msg["To"], f"{name}@example.org")
        yield c.ok("verify_email", username=name, code=code_in(msg))
        r = yield c.ok("login", username=name, password=PASSWORD, device={"id": "d"})
        self.assertEqual(r["user"], name)


__all__ = ["ServerProcess", "connect"]
