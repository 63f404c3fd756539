"""Account-security building blocks in isolation: TOTP (RFC 6238 vectors, oathtool,
skew, replay), sealing, codes, the CAPTCHA book and renderer, the throttle, the mailers."""

from __future__ import annotations

import base64
import os
import random
import shutil
import subprocess
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pyotp
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from shtalk.server.accounts import totp
from shtalk.server.accounts.captcha import ALPHABET, FONT, CaptchaBook, render
from shtalk.server.accounts.mailer import Mailer, OutboxMailer, SmtpMailer, is_loopback
from shtalk.server.accounts.throttle import address_key
from shtalk.server.config import ConfigError, SmtpSection
from shtalk.testing import rfc6238

# RFC 6238 appendix B: (time, SHA1, SHA256, SHA512), 8 digits.
RFC6238_VECTORS = [
    (59, "94287082", "46119246", "90693936"),
    (1111111109, "07081804", "68084774", "25091201"),
    (1111111111, "14050471", "67062674", "99943326"),
    (1234567890, "89005924", "91819424", "93441116"),
    (2000000000, "69279037", "90698825", "38618901"),
    (20000000000, "65353130", "77737706", "47863826"),
]
SEEDS = {
    "sha1": b"12345678901234567890",
    "sha256": b"12345678901234567890123456789012",
    "sha512": b"1234567890" * 6 + b"1234",
}


def b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=")


class TotpTests(SynchronousTestCase):
    def test_reference_implementation_matches_rfc6238_appendix_b(self) -> None:
        for t, *expected in RFC6238_VECTORS:
            for digest, want in zip(("sha1", "sha256", "sha512"), expected, strict=True):
                self.assertEqual(rfc6238(b32(SEEDS[digest]), t, 8, 30, digest), want)

    def test_pyotp_matches_the_vectors(self) -> None:
        for t, want, _, _ in RFC6238_VECTORS:
            self.assertEqual(pyotp.TOTP(b32(SEEDS["sha1"]), digits=8).at(t), want)

    def test_oathtool_agrees(self) -> None:
        if shutil.which("oathtool") is None:
            raise self.skipTest("oathtool is not installed (apt-get install oathtool)")
        secret = totp.new_secret()
        for t in (59, 1111111109, 2000000000):
            out = subprocess.run(
                ["oathtool", "--totp", "-b", "-N", f"@{t}", secret],
                capture_output=True, text=True, check=True, timeout=10,
            ).stdout.strip()
            self.assertEqual(out, rfc6238(secret, t))
            self.assertEqual(out, pyotp.TOTP(secret).at(t))

    def test_secret_is_160_bits(self) -> None:
        s = totp.new_secret()
        self.assertEqual(len(base64.b32decode(s)), 20)
        self.assertNotEqual(s, totp.new_secret())

    def test_one_step_of_skew_two_refused(self) -> None:
        secret, now = totp.new_secret(), 1_700_000_015.0
        step = totp.step_of(now)
        for delta, ok in ((-60, False), (-30, True), (0, True), (30, True), (60, False)):
            code = rfc6238(secret, now + delta)
            got = totp.match_step(secret, code, now, 0)
            self.assertEqual(got is not None, ok, delta)
            if ok:
                self.assertEqual(got, step + delta // 30)

    def test_replay_refused_by_last_step(self) -> None:
        secret, now = totp.new_secret(), 1_700_000_015.0
        code = rfc6238(secret, now)
        step = totp.match_step(secret, code, now, 0)
        assert step is not None
        self.assertIsNone(totp.match_step(secret, code, now, step))
        # An older step's code after a newer one was accepted: refused too.
        self.assertIsNone(totp.match_step(secret, rfc6238(secret, now - 30), now, step))

    def test_box_seals_and_binds_to_the_account(self) -> None:
        box = totp.SecretBox(os.urandom(32))
        sealed = box.seal(7, "JBSWY3DPEHPK3PXP")
        self.assertNotIn(b"JBSWY3DPEHPK3PXP", sealed)
        self.assertEqual(box.open(7, sealed), "JBSWY3DPEHPK3PXP")
        self.assertIsNone(box.open(8, sealed))
        self.assertIsNone(totp.SecretBox(os.urandom(32)).open(7, sealed))
        self.assertIsNone(box.open(7, sealed[:-1] + bytes([sealed[-1] ^ 1])))

    def test_codes(self) -> None:
        code = totp.new_email_code()
        self.assertEqual(len(totp.normalise_code(code)), 28)
        self.assertEqual(totp.code_hash(code), totp.code_hash(code.lower().replace("-", " ")))
        self.assertEqual(totp.code_hash("O1L"), totp.code_hash("011"))
        codes = totp.new_recovery_codes()
        self.assertEqual(len(set(codes)), 10)
        self.assertTrue(all(len(totp.normalise_code(c)) == 16 for c in codes))
        self.assertTrue(totp.is_totp_code("123 456"))
        self.assertFalse(totp.is_totp_code(codes[0]))


class CaptchaTests(SynchronousTestCase):
    def test_font_covers_the_alphabet(self) -> None:
        self.assertEqual(set(FONT), set(ALPHABET))
        for glyph in FONT.values():
            self.assertEqual(len(glyph), 7)
            self.assertTrue(all(len(row) == 5 for row in glyph))
        for confusable in "0O1IL2Z5S8B6G":
            self.assertNotIn(confusable, ALPHABET)

    def test_render_is_distorted_text(self) -> None:
        art = render("ACDEF", random.Random(1))
        lines = art.split("\n")
        self.assertGreaterEqual(len(lines), 10)
        self.assertLessEqual(max(map(len, lines)), 80)  # fits a terminal
        self.assertNotIn("ACDEF", art)
        self.assertNotEqual(art, render("ACDEF", random.Random(2)))

    def test_single_use_case_insensitive_bound_expiring(self) -> None:
        clock = Clock()
        book = CaptchaBook(clock, ttl=60)
        c = book.issue("conn-a")
        answer = book.answer_for_tests(c["id"])
        self.assertFalse(book.check("conn-b", {"id": c["id"], "answer": answer}))
        c = book.issue("conn-a")
        answer = book.answer_for_tests(c["id"])
        self.assertTrue(book.check("conn-a", {"id": c["id"], "answer": answer.lower()}))
        self.assertFalse(book.check("conn-a", {"id": c["id"], "answer": answer}))
        c = book.issue("conn-a")
        answer = book.answer_for_tests(c["id"])
        self.assertFalse(book.check("conn-a", {"id": c["id"], "answer": "XXXXX"}))
        self.assertFalse(book.check("conn-a", {"id": c["id"], "answer": answer}))
        c = book.issue("conn-a")
        answer = book.answer_for_tests(c["id"])
        clock.advance(61)
        self.assertFalse(book.check("conn-a", {"id": c["id"], "answer": answer}))
        self.assertFalse(book.check("conn-a", None))

    def test_bounded_per_connection(self) -> None:
        book = CaptchaBook(Clock(), per_owner=3)
        ids = [book.issue("x")["id"] for _ in range(10)]
        self.assertEqual(len(book._live), 3)
        self.assertIn(ids[-1], book._live)


class AddressKeyTests(SynchronousTestCase):
    """The throttle's behaviour: shtalk.test.server.shared_contract (memory and Redis)."""

    def test_ipv6_counts_per_64(self) -> None:
        self.assertEqual(address_key("2001:db8::1"), address_key("2001:db8::ffff:1"))
        self.assertNotEqual(address_key("2001:db8::1"), address_key("2001:db8:0:1::1"))
        self.assertEqual(address_key("::ffff:192.0.2.1"), "192.0.2.1")



class _Flaky(Mailer):
    def __init__(self, clock: Clock, failures: int) -> None:
        super().__init__(clock, "s@example.org", retries=3, retry_delay=10)
        self.failures = failures
        self.attempts: list[float] = []

    def deliver_once(self, to: str, msg: EmailMessage) -> Deferred[Any]:
        self.attempts.append(self.clock.seconds())
        if len(self.attempts) <= self.failures:
            return fail(ConnectionRefusedError("relay down"))
        return succeed(None)


class MailerTests(TestCase):
    def test_retries_with_backoff(self) -> None:
        clock = Clock()
        m = _Flaky(clock, failures=2)
        d = m.send("a@example.org", "s", "body")
        clock.advance(10)
        clock.advance(20)
        self.assertEqual(m.attempts, [0, 10, 30])
        self.assertTrue(self.successResultOf(d))

    def test_gives_up_without_raising(self) -> None:
        clock = Clock()
        m = _Flaky(clock, failures=99)
        d = m.send("a@example.org", "s", "body")
        for delay in (10, 20, 40):
            clock.advance(delay)
        self.assertFalse(self.successResultOf(d))
        self.assertEqual(len(m.attempts), 4)
        self.flushLoggedErrors()

    async def test_outbox_writes_private_eml(self) -> None:
        directory = Path(self.mktemp())
        m = OutboxMailer(Clock(), directory, "shtalk@example.org")
        ok = await m.send("bob@example.org", "Your code", "    CODE-1234\n")
        self.assertTrue(ok)
        (eml,) = directory.glob("*.eml")
        self.assertEqual(eml.stat().st_mode & 0o777, 0o600)
        text = eml.read_text()
        self.assertIn("To: bob@example.org", text)
        self.assertIn("CODE-1234", text)
        self.assertIn("outbox", m.description)

    def test_plain_smtp_only_to_loopback(self) -> None:
        self.assertTrue(is_loopback("127.0.0.1") and is_loopback("::1"))
        self.assertFalse(is_loopback("mail.example.org"))
        with self.assertRaises(ConfigError):
            SmtpMailer(Clock(), None, SmtpSection(host="mail.example.org",
                                                  require_starttls=False))
        m = SmtpMailer(Clock(), None, SmtpSection(host="127.0.0.1", require_starttls=False))
        self.assertIn("STARTTLS if offered", m.description)
