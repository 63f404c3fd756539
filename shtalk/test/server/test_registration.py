"""Registration as a newcomer meets it (protocol objects, real SQLite and bcrypt): the cheap
checks before any CAPTCHA, one rate-limit token per attempt, honest ``retry_after``, the
CAPTCHA's alphabet and its accessible alternative, a connection kept open while a person
solves a CAPTCHA, and the presence of one's contacts right after the backlog."""

from __future__ import annotations

import re
from random import Random
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from shtalk.server.accounts.captcha import (
    ALPHABET,
    INK,
    CaptchaBook,
    number_words,
    parse_number,
    render,
)
from shtalk.server.config import AccountsSection, RateLimitSection
from shtalk.server.ops.ratelimit import RateLimiter
from shtalk.test.server.test_account_security import Base
from shtalk.testing import GOOD_PASSWORD, Peer, WallClock
from shtalk.wire.errors import ErrorCode
from shtalk.wire.passwords import DEFAULT_MIN_LENGTH, password_problem

FIELDS = {"password": GOOD_PASSWORD}


class LimitedBase(Base):
    """Account security on, and the real rate limiter with small registration buckets."""

    limits = RateLimitSection(register_address="2/3600", register_check_address="30/600")

    def setUp(self) -> Any:
        d = super().setUp()

        def limit(_: object) -> None:
            self.parts.limit(RateLimiter(self.limits, self.parts.clock))

        return d.addCallback(limit)

    async def ask(self, peer: Peer, name: str, captcha: Any = None, **over: Any) -> Any:
        fields: dict[str, Any] = {"username": name, "password": GOOD_PASSWORD,
                                  "email": f"{name}@example.org", **over}
        if captcha is not None:
            fields["captcha"] = captcha
        return await self.call(peer, "register", **fields)

    def tokens_taken(self) -> float:
        limiter = self.parts.factory.limits.limiter
        assert limiter is not None
        bucket = limiter.backend.buckets.get("register:ip:192.0.2.10")
        return 0.0 if bucket is None else 2.0 - bucket[0]


class CheapChecksFirstTests(LimitedBase):
    async def test_refusals_before_the_captcha_cost_nothing(self) -> None:
        p = await self.peer()
        r = await self.ask(p, "taken")
        self.assertEqual(r["error"]["code"], "captcha_required")
        r = await self.ask(p, "taken", self.solve(r["error"]["captcha"]))
        self.assertTrue(r["ok"], r)
        issued = self.parts.security.gates.captchas.issued
        cases = [
            ({"username": "Taken"}, "username_taken"),
            ({"username": "x"}, "bad_username"),
            ({"password": "short"}, "weak_password"),
            ({"password": "password123456"}, "weak_password"),
            ({"password": "é" * 40}, "password_too_long"),
            ({"email": "not-an-address"}, "bad_email"),
        ]
        for over, code in cases:
            r = await self.ask(p, **{"name": "fresh", **over})  # type: ignore[arg-type]
            self.assertEqual(r["error"]["code"], code, over)
            self.assertNotIn("captcha", r["error"])
        # No challenge drawn, and only the first registration's token taken.
        self.assertEqual(self.parts.security.gates.captchas.issued, issued)
        self.assertEqual(self.tokens_taken(), 1.0)


class AttemptTests(LimitedBase):
    async def test_captcha_shown_and_answered_is_one_attempt(self) -> None:
        p = await self.peer()
        r = await self.ask(p, "ann")
        self.assertEqual(r["error"]["code"], "captcha_required")
        # Typos are no abuse: four wrong answers cost nothing more ...
        for _ in range(4):
            r = await self.ask(p, "ann", {"id": r["error"]["captcha"]["id"], "answer": "nope"})
            self.assertEqual(r["error"]["code"], "captcha_failed")
        # ... nor does a new picture fetched on purpose (a verify token, not an attempt).
        fresh = await self.call(p, "captcha")
        r = await self.ask(p, "ann", self.solve(fresh["captcha"]))
        self.assertTrue(r["ok"], r)
        self.assertEqual(self.tokens_taken(), 1.0)

    async def test_five_misses_end_the_attempt(self) -> None:
        p = await self.peer()
        r = await self.ask(p, "bea")
        for _ in range(5):
            r = await self.ask(p, "bea", {"id": r["error"]["captcha"]["id"], "answer": "nope"})
            self.assertEqual(r["error"]["code"], "captcha_failed")
        self.assertEqual(self.tokens_taken(), 1.0)
        r = await self.ask(p, "bea", self.solve(r["error"]["captcha"]))
        self.assertTrue(r["ok"], r)
        self.assertEqual(self.tokens_taken(), 2.0)  # the answer after five misses: a new one

    async def test_retry_after_is_honest(self) -> None:
        for name in ("cat", "cid"):
            p = await self.peer()
            r = await self.ask(p, name)
            r = await self.ask(p, name, self.solve(r["error"]["captcha"]))
            self.assertTrue(r["ok"], r)
        p = await self.peer()
        r = await self.ask(p, "cyd")
        self.assertEqual(r["error"]["code"], "rate_limited")
        self.assertNotIn("captcha", r["error"])  # refused before any challenge is drawn
        wait = r["error"]["retry_after"]
        self.assertEqual(wait, 1800)  # 2 per hour: one token back in half an hour
        self.parts.clock.advance(wait - 2)
        p = await self.peer()  # (the first one timed out meanwhile)
        r = await self.ask(p, "cyd")
        self.assertEqual(r["error"]["code"], "rate_limited")
        self.assertEqual(r["error"]["retry_after"], 2)
        self.parts.clock.advance(2)
        r = await self.ask(p, "cyd")
        self.assertEqual(r["error"]["code"], "captcha_required")
        r = await self.ask(p, "cyd", self.solve(r["error"]["captcha"]))
        self.assertTrue(r["ok"], r)


class CaptchaKeepsConnectionTests(Base):
    async def test_a_shown_captcha_outlives_the_pre_auth_deadline(self) -> None:
        p = await self.peer()
        r = await self.call(p, "register", username="dee", email="dee@example.org", **FIELDS)
        self.assertEqual(r["error"]["code"], "captcha_required")
        self.parts.clock.advance(60)  # a person reading it (pre_auth_timeout is 30 s)
        self.assertFalse(p.transport.disconnecting)
        r = await self.call(p, "register", username="dee", email="dee@example.org",
                            captcha=self.solve(r["error"]["captcha"]), **FIELDS)
        self.assertTrue(r["ok"], r)
        # Without another challenge the connection still has to log in in time.
        self.parts.clock.advance(self.accounts.captcha_ttl + 6)
        self.assertTrue(p.transport.disconnecting)


class WordsCaptchaTests(Base):
    async def test_question_in_words(self) -> None:
        p = await self.peer()
        r = await self.call(p, "captcha", kind="words")
        q = r["captcha"]
        self.assertEqual(q["kind"], "words")
        self.assertRegex(q["question"], r"^What is [a-z -]+ (plus|minus) [a-z -]+\?$")
        self.assertNotIn("art", q)
        answer = self.parts.security.gates.captchas.answer_for_tests(q["id"])
        r = await self.call(p, "register", username="eve", email="e@example.org",
                            captcha={"id": q["id"], "answer": number_words(int(answer))},
                            **FIELDS)
        self.assertTrue(r["ok"], r)

    async def test_wrong_words_answer_gets_another_question(self) -> None:
        p = await self.peer()
        q = (await self.call(p, "captcha", kind="words"))["captcha"]
        r = await self.call(p, "register", username="fay", email="f@example.org",
                            captcha={"id": q["id"], "answer": "a thousand"}, **FIELDS)
        self.assertEqual(r["error"]["code"], "captcha_failed")
        self.assertEqual(r["error"]["captcha"]["kind"], "words")
        r = await self.call(p, "captcha", kind="sound")
        self.assertEqual(r["error"]["code"], "bad_field")


class WordsOffTests(Base):
    accounts = AccountsSection(require_captcha=True, captcha_words=False)

    async def test_operator_can_turn_it_off(self) -> None:
        p = await self.peer()
        r = await self.call(p, "captcha", kind="words")
        self.assertEqual(r["error"]["code"], "bad_field")
        self.assertIn("captcha_words", r["error"]["message"])


class CaptchaPartsTests(SynchronousTestCase):
    def test_art_is_readable(self) -> None:
        """No ink is a letter or a digit (it could be read as the answer); the art fits
        an 80-column terminal inside a dialog's frame; the hint names the alphabet."""
        self.assertFalse(any(c.isalnum() for c in INK))
        for seed in range(300):
            rng = Random(seed)
            art = render("".join(rng.choice(ALPHABET) for _ in range(5)), rng)
            self.assertLessEqual(max(len(line) for line in art.split("\n")), 74)
            self.assertFalse(set(art) & set("BGILOSZ0125683"), art)
        challenge = CaptchaBook(WallClock()).issue("owner")
        self.assertEqual(challenge["alphabet"], ALPHABET)
        self.assertIn("case does not matter", challenge["hint"])
        self.assertIn("A C D E F H J K M N P R T U V W X Y", challenge["hint"])

    def test_numbers_in_words(self) -> None:
        for n in range(200):
            self.assertEqual(parse_number(number_words(n)), n)
            self.assertEqual(parse_number(str(n)), n)
        self.assertEqual(parse_number("Seventy four"), 74)
        self.assertEqual(parse_number("one hundred and six"), 106)
        self.assertIsNone(parse_number("lots"))
        self.assertIsNone(parse_number(""))

    def test_password_problems_say_what_is_wrong(self) -> None:
        def problem(pw: str, user: str = "alice") -> tuple[ErrorCode, str] | None:
            found = password_problem(pw, user, DEFAULT_MIN_LENGTH)
            if found is not None:
                self.assertNotIn(pw, found[1])
            return found

        self.assertIsNone(problem(GOOD_PASSWORD))
        code, text = problem("short") or (None, "")
        self.assertEqual(code, ErrorCode.WEAK_PASSWORD)
        self.assertIn("has 5 characters; use at least 12", text)
        self.assertIn("most common", (problem("password123!") or ("", ""))[1])
        self.assertIn("repeats", (problem("abcabcabcabcabc") or ("", ""))[1])
        self.assertIn("username", (problem("alicealice1!", "alicealice") or ("", ""))[1])
        code, text = problem("\u00e9" * 40) or (None, "")
        self.assertEqual(code, ErrorCode.PASSWORD_TOO_LONG)
        self.assertTrue(re.search(r"is 80 bytes .* at most 72", text), text)


class PresenceSnapshotTests(Base):
    accounts = AccountsSection(require_email_verification=False, require_captcha=False)

    async def test_contacts_presence_follows_the_backlog(self) -> None:
        async def logged_in(name: str, register: bool = True) -> Peer:
            p = await self.peer()
            if register:
                self.assertTrue((await self.call(p, "register", username=name,
                                                 email=f"{name}@example.org", **FIELDS))["ok"])
            r = await self.login(p, name)
            self.assertTrue(r["ok"], r)
            return p

        gil, hal, ida, _joe = [await logged_in(n) for n in ("gil", "hal", "ida", "joe")]
        # Hal and Ida write to Gil (so Gil may see their presence); Gil writes to Joe
        # (which shows Gil's presence to Joe, not Joe's to Gil).
        for peer, name in ((hal, "hal"), (ida, "ida")):
            r = await self.call(peer, "send", to={"user": "gil"}, envelope="aGk=",
                                client_id=f"c-{name}")
            self.assertTrue(r["ok"], r)
        r = await self.call(gil, "send", to={"user": "joe"}, envelope="aGk=", client_id="c-g")
        self.assertTrue(r["ok"], r)
        ida.proto.connectionLost(None)
        gil.proto.connectionLost(None)
        again = await logged_in("gil", register=False)
        await again.pushed("presence")  # after the backlog, all in one go
        got = [x for x in again.received if "id" not in x and x.get("type") != "message"]
        done = next(i for i, x in enumerate(got) if x.get("type") == "backlog_done")
        self.assertEqual(got[done + 1:], [
            {"type": "presence", "user": "hal", "status": "online"},
            {"type": "presence", "user": "ida", "status": "offline"},
        ])
