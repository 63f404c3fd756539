"""Email addresses: one addr-spec, no control characters; sealed at rest with a keyed hash
for look-ups (rows from before are sealed when the store opens); outbox files removed
once the code they carry has expired."""

from __future__ import annotations

import os
import sqlite3
from email.message import EmailMessage
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from shtalk.server.accounts.mailer import OutboxMailer
from shtalk.server.chat.naming import check_email
from shtalk.server.config import AccountsSection
from shtalk.server.store import schema
from shtalk.server.store.sealing import EmailSeal
from shtalk.test.server.test_account_security import Base
from shtalk.test.server.test_store import KEY, StoreTestBase, async_test
from shtalk.testing import GOOD_PASSWORD
from shtalk.wire.errors import ErrorCode, ProtocolError


class CheckEmailTests(SynchronousTestCase):
    def test_one_plain_address(self) -> None:
        self.assertEqual(check_email("alice@example.org"), "alice@example.org")
        self.assertEqual(check_email("Bob@Example.ORG"), "Bob@example.org")
        self.assertEqual(check_email("u@b\u00fccher.de"), "u@xn--bcher-kva.de")

    def test_refused(self) -> None:
        for bad in (
            "a@x.org,b@y.org", "a@x.org;b@y.org", "a@x.org b@y.org", "A <a@x.org>",
            '"a,b"@x.org', "a@[192.0.2.1]", "a@localhost", "a@x.test", "\u00fc@x.org",
            "a\x1b@example.org", "a\x07@example.org", "a\x00@example.org",
            "alice@example.org\r\nBcc: victim@example.org", "a\u202e@example.org",
            "x" * 250 + "@example.org", "no-at-sign", "@nobody.org",
        ):
            with self.assertRaises(ProtocolError, msg=repr(bad)) as e:
                check_email(bad)
            self.assertEqual(e.exception.code, ErrorCode.BAD_EMAIL)
            self.assertNotIn(bad, e.exception.message)


class RegisterEmailTests(Base):
    accounts = AccountsSection(require_email_verification=False, require_captcha=False)

    async def test_lists_and_control_characters_are_refused_at_registration(self) -> None:
        p = await self.peer()
        for i, bad in enumerate(("a@x.org,b@y.org", "esc\x1b[2J@example.org",
                                 "bel\x07@example.org", "nul\x00@example.org")):
            r = await self.call(p, "register", username=f"mail{i}", password=GOOD_PASSWORD,
                                email=bad)
            self.assertEqual(r["error"]["code"], "bad_email", r)
        r = await self.call(p, "register", username="mailok", password=GOOD_PASSWORD,
                            email="Mail.OK@Example.org")
        self.assertTrue(r["ok"], r)
        user = await self.parts.store.user_by_key("mailok")
        assert user is not None
        self.assertEqual(await self.parts.store.email_of(user.id), "Mail.OK@example.org")


class EmailAtRestTests(StoreTestBase):
    def file_bytes(self) -> bytes:
        return b"".join(Path(self.path + s).read_bytes() for s in ("", "-wal", "-shm")
                        if os.path.exists(self.path + s))

    @async_test
    async def test_sealed_with_a_keyed_hash(self) -> None:
        store = await self.open_store()
        a = await store.create_user("Ann", "ann", "ann.secret@example.org", b"h", "active")
        b = await store.create_user("Ben", "ben", "ben@example.org", b"h", "active")
        self.assertEqual(await store.email_of(a.id), "ann.secret@example.org")
        self.assertNotIn(b"ann.secret", self.file_bytes())
        seal = EmailSeal(KEY)
        self.assertEqual(self.raw("SELECT email_hash FROM users WHERE id = ?", a.id),
                         [(seal.index("Ann.Secret@example.org"),)])
        self.assertNotEqual(EmailSeal(os.urandom(32)).index("ann.secret@example.org"),
                            seal.index("ann.secret@example.org"))
        # A sealed address moved to another row does not open there.
        await store.close()
        conn = sqlite3.connect(self.path)
        conn.execute("UPDATE users SET email = (SELECT email FROM users WHERE id = ?)"
                     " WHERE id = ?", (a.id, b.id))
        conn.commit()
        conn.close()
        store = await self.open_store()
        self.assertIsNone(await store.email_of(b.id))
        self.assertEqual(await store.email_of(a.id), "ann.secret@example.org")

    @async_test
    async def test_clear_rows_of_an_older_schema_are_sealed_at_open(self) -> None:
        current = schema.MIGRATIONS
        self.patch(schema, "MIGRATIONS", current[:3])
        store = await self.open_store()
        await store.close()
        conn = sqlite3.connect(self.path)
        conn.execute("INSERT INTO users (name, key, email, pw_hash, status, created)"
                     " VALUES ('Old', 'old', 'old.clear@example.org', x'00', 'active', 1)")
        conn.commit()
        conn.close()
        self.assertIn(b"old.clear@example.org", self.file_bytes())
        self.patch(schema, "MIGRATIONS", current)
        store = await self.open_store()
        user = await store.user_by_key("old")
        assert user is not None
        self.assertEqual(await store.email_of(user.id), "old.clear@example.org")
        await store.close()
        self.assertNotIn(b"old.clear@example.org", self.file_bytes())
        self.assertEqual(self.raw("SELECT typeof(email), email_hash FROM users"),
                         [("blob", EmailSeal(KEY).index("old.clear@example.org"))])


class OutboxTests(TestCase):
    async def test_files_go_once_their_code_expired(self) -> None:
        clock = Clock()
        clock.advance(1_800_000_000)
        outbox = Path(self.mktemp())
        mailer = OutboxMailer(clock, outbox, "shtalk@test.example", keep_for=600)
        sweeps: list[Deferred[int]] = []
        sweep = mailer.sweep

        def watched() -> Deferred[int]:
            sweeps.append(sweep())
            return sweeps[-1]

        self.patch(mailer, "sweep", watched)  # the write's timer calls it: the test waits on it
        msg = EmailMessage()
        msg["To"] = "a@example.org"
        msg.set_content("code")
        await mailer.deliver_once("a@example.org", msg)
        (outbox / "1700000000.000000-deadbeef.eml").write_bytes(b"left by an earlier run")
        self.assertEqual(len(list(outbox.iterdir())), 2)
        self.assertEqual(await mailer.sweep(), 1)  # the old run's file only
        clock.advance(599)
        self.assertEqual(len(list(outbox.iterdir())), 1)
        self.assertEqual(len(sweeps), 1)
        clock.advance(1)  # the timer set at the write runs the sweep
        self.assertEqual(len(sweeps), 2)
        self.assertEqual(await sweeps[-1], 1)
        self.assertEqual(list(outbox.iterdir()), [])
