"""shtalk-urwid's onboarding and everyday edges, unit by unit (canvas rendering against
fakes): the set-up forms (Esc back, checks before sending, the password before the
passphrase), the CAPTCHA dialog, quitting, the status bar and its notices, the connection
log, command output, /devices, and the log file with its one sentence per failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial import unittest

from shtalk.client.connection import ServerError
from shtalk.client.events import ConnectionChanged, Presence
from shtalk.client.localstore import CorruptEntry
from shtalk.client.session import Credentials
from shtalk.clientui.config import ClientConfig
from shtalk.clientui.logfile import KEEP_FILES, ClientLog, failure_sentence
from shtalk.clientui.model import STATUS, Line
from shtalk.clientui.setup import Form, SetupFlow
from shtalk.clientui.steps import Steps
from shtalk.clientui.widgets import shorten_markup
from shtalk.test.clientui.test_clientui import Harness, text_of
from shtalk.testing import tempdir
from shtalk.wire.records import ClientRequest

ART = "\n".join(f"{i:02d}" + " #@%&$" * 11 for i in range(13))  # 13 rows, 68 columns


def refusal(code: str, **error: Any) -> ServerError:
    return ServerError(code, code, {"error": {"code": code, **error}})


class FakeSession:
    """What the set-up forms use of a ServerSession, with scripted replies."""

    def __init__(self, creds: Credentials, log: list[str]) -> None:
        self.credentials = creds
        self.log = log
        self.server_hello = {"min_password_length": 12}
        self.register_replies: list[Any] = []
        self.login_replies: list[Any] = []

    def request_unauthenticated(self, req: ClientRequest) -> Deferred[dict[str, Any]]:
        rtype = req.NAME
        self.log.append(rtype)
        return succeed({"captcha": {"id": "cap_new", "art": ART}} if rtype == "captcha" else {})

    def _next(self, what: str, replies: list[Any], extra: dict[str, Any]) -> Deferred[Any]:
        self.log.append(f"{what} {sorted(extra)}")
        reply = replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return succeed(reply)

    def register(self, username: str, password: str, email: str,
                 **extra: Any) -> Deferred[Any]:
        return self._next("register", self.register_replies, extra)

    def login(self, password: str, **extra: Any) -> Deferred[Any]:
        return self._next("login", self.login_replies, extra)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def logout(self) -> Deferred[None]:
        self.log.append("logout")
        return succeed(None)


class Flow(SetupFlow):
    """The real forms, over a fake session; the local store is recorded, not made."""

    def __init__(self, h: Harness) -> None:
        async def progress(title: str, text: str, work: Deferred[Any], *a: Any) -> Any:
            return await work

        app: Any = SimpleNamespace(ui=h.host, host="chat.example", port=6697,
                                   progress=progress)
        super().__init__(app)
        self.log: list[str] = []
        self.fake = FakeSession(Credentials("", "dev"), self.log)

    def session(self, creds: Credentials) -> Any:
        self.fake.credentials = creds
        return self.fake

    async def create_store(self, form: Form, state: str) -> Any:
        self.log.append("passphrase asked")
        first = await self.field(form, "passphrase", "Choose a local passphrase", "",
                                 "Passphrase:", mask=True)
        return f"store for {first}"


class SetupFormTests(unittest.TestCase):
    def test_register_form_checks_locally_goes_back_and_maps_refusals(self) -> None:
        h = Harness()
        flow = Flow(h)
        flow.fake.register_replies = [
            refusal("username_taken"),
            refusal("captcha_required", captcha={"id": "cap_1", "art": ART, "length": 5,
                                                 "alphabet": "ACDEFHJKMNPRTUVWXY3479"}),
            {"user": "Dana", "status": "active"},
        ]
        d = Deferred.fromCoroutine(flow.register(Form()))
        h.line("x")
        self.assertIn("That username cannot be used", h.text())
        h.press(*["backspace"], "enter")  # nothing typed: still refused, nothing sent
        h.type("taken")
        h.press("enter")
        self.assertIn("Your email address", h.text())
        h.press("esc")  # back one step, the name kept
        self.assertIn("Username: taken", h.text())
        h.press("enter")
        h.line("dana@example.org")
        h.line("short")
        self.assertIn("The password has 5 characters; use at least 12", h.text())
        h.line("tangerine-quokka-43")
        h.line("tangerine-quokka-43")
        # The server refused the name (before any CAPTCHA): back to the name field.
        self.assertIn("That username is taken", h.text())
        self.assertEqual(flow.log, ["ping", "register []"])
        h.press("ctrl u")
        h.line("dana")
        h.press("enter")  # the email, kept
        h.line("tangerine-quokka-43")
        h.line("tangerine-quokka-43")
        screen = h.text()
        self.assertIn("Are you a person?", screen)
        self.assertIn("A C D E F H J K M N P R T U V W X Y 3 4 7 9", " ".join(
            screen.replace("\u2502", " ").split()))
        h.line("K7TMW")
        self.successResultOf(d)
        self.assertEqual(flow.log[-1], "register ['captcha']")

    def test_password_and_code_before_the_passphrase(self) -> None:
        h = Harness()
        flow = Flow(h)
        flow.fake.login_replies = [
            refusal("invalid_credentials"), refusal("otp_required"),
            refusal("invalid_credentials"), {"user": "Alice"},
        ]
        creds = Credentials("", "dev")
        d = Deferred.fromCoroutine(flow.login(Form(), creds, "username", False))
        h.line("alice")
        h.line("wrong password")
        self.assertIn("Wrong username or password", h.text())
        self.assertIn("Esc goes back to the username", h.text())
        h.line("tangerine-quokka-43")
        self.assertIn("Two-factor code", h.text())
        h.line("123456")
        self.assertIn("That code was not accepted: wrong, expired or already used", h.text())
        self.assertNotIn("passphrase asked", flow.log)
        h.line("654321")
        self.assertIn("passphrase asked", flow.log)
        self.assertEqual(flow.log.index("passphrase asked"), len(flow.log) - 1)
        h.press("esc")  # back from the passphrase: the login just made is ended
        self.assertIn("logout", flow.log)
        self.assertIn("The password of alice", h.text())
        flow.fake.login_replies = [{"user": "Alice"}]
        h.line("tangerine-quokka-43")
        h.line("local passphrase")
        outcome = self.successResultOf(d)
        self.assertEqual(outcome.store, "store for local passphrase")
        self.assertEqual(creds.username, "Alice")  # the server's spelling


class CaptchaDialogTests(unittest.TestCase):
    def test_whole_at_80x24_new_picture_and_words(self) -> None:
        h = Harness()
        asked: list[tuple[str, dict[str, Any]]] = []
        challenges = iter([{"id": "cap_2", "art": ART.replace("#", "*")},
                           {"id": "cap_3", "kind": "words",
                            "question": "What is seven plus four?"}])

        def request(req: ClientRequest) -> Deferred[dict[str, Any]]:
            fields = req.to_json()
            rtype = fields.pop("type")
            asked.append((rtype, fields))
            return succeed({"captcha": next(challenges)})

        steps = Steps(h.host, request, "dana")
        d = Deferred.fromCoroutine(steps.captcha({"id": "cap_1", "art": ART, "length": 5,
                                                  "alphabet": "ACDEFHJKMNPRTUVWXY3479"}))
        screen = h.text()
        for row in ART.splitlines():
            self.assertIn(row, screen)  # every row, unwrapped
        self.assertIn("case does not matter", screen)
        self.assertIn("F5: new picture", screen)
        h.press("f5")
        self.assertEqual(asked[-1], ("captcha", {}))
        self.assertIn("01 *@%&$", h.text())
        h.press("f6")
        self.assertEqual(asked[-1], ("captcha", {"kind": "words"}))
        self.assertIn("What is seven plus four?", h.text())
        h.line("eleven")
        self.assertEqual(self.successResultOf(d), {"id": "cap_3", "answer": "eleven"})


class QuitTests(unittest.TestCase):
    def test_asks_when_unsent_and_never_on_ctrl_c(self) -> None:
        from shtalk.clientui.app import App

        app = App(Clock(), ClientConfig(), "chat.example", 6697, Path(tempdir(self)))
        quits: list[int] = []
        app.quit = lambda: quits.append(1)  # type: ignore[method-assign]
        size = (80, 24)
        app.request_quit()
        self.assertEqual(quits, [1])  # nothing unsent: at once
        for ch in "a draft":
            app.screen.keypress(size, ch)
        app._input("ctrl c")
        self.assertIn("Ctrl-C does not quit", text_of(app.screen, size))
        self.assertEqual(quits, [1])
        app._input("f10")
        self.assertIn("The line you typed is not sent. Quit anyway?", text_of(app.screen, size))
        app.screen.keypress(size, "n")
        self.assertEqual(quits, [1])
        app._input("ctrl q")
        app.screen.keypress(size, "y")
        self.assertEqual(quits, [1, 1])


class StatusBarTests(unittest.TestCase):
    def test_shortened_at_a_word_with_an_ellipsis(self) -> None:
        markup = [("status_good", " online "), " ", ("status", "a long notice about things")]
        self.assertEqual(shorten_markup(markup, 80), markup)
        short = shorten_markup(markup, 24)
        text = "".join(p[1] if isinstance(p, tuple) else p for p in short)
        self.assertEqual(text, " online  a long notice\u2026")
        self.assertEqual(short[0], ("status_good", " online "))
        self.assertEqual("".join(x if isinstance(x, str) else x[1] for x in
                                 shorten_markup(["abcdefghijklmnopqrstuvwxyz"], 10)),
                         "abcdefghi\u2026")  # one long word: cut inside it

    def test_notices_first_then_gone_after_a_while(self) -> None:
        h = Harness(messages=1)
        later: list[Any] = []
        h.controller.later = lambda delay, f: later.append((delay, f))
        h.controller.notice_seconds = 15.0
        h.controller.notice("a notice for you")
        self.assertIn("online" if h.model.status.connection == "authenticated" else "offline",
                      h.text().splitlines()[-2])
        self.assertIn("a notice for you", h.text().splitlines()[-2])
        self.assertEqual(later[-1][0], 15.0)
        later[-1][1]()
        self.assertNotIn("a notice for you", h.text().splitlines()[-2])
        self.assertIn("e2ee", h.text().splitlines()[-2])


class ConnectionLogTests(unittest.TestCase):
    def test_lost_reconnecting_back(self) -> None:
        h = Harness()
        c = h.controller
        for state, message in [("authenticated", "resumed as alice/laptop"),
                               ("reconnecting", "the connection was lost; reconnecting in 1 s"),
                               ("reconnecting", "server: timeout; reconnecting in 2 s"),
                               ("reconnecting", "refused; reconnecting in 4 s"),
                               ("authenticated", "resumed as alice/laptop")]:
            c.handle_event(ConnectionChanged(state, message))
            h.clock[0] += 7
        lines = [x.body for x in h.model.conversations[STATUS].window.items]
        self.assertEqual(lines, [
            "online: resumed as alice/laptop",
            "connection lost: the connection was lost",
            "reconnecting (attempt 1): the connection was lost; reconnecting in 1 s",
            "reconnecting (attempt 2): server: timeout; reconnecting in 2 s",
            "back online after 21s offline (resumed as alice/laptop)",
        ])
        c.handle_event(ConnectionChanged("disconnected", "stopped"))  # /logout: no loss
        self.assertEqual(len(h.model.conversations[STATUS].window.items), 5)


class OutputTests(unittest.TestCase):
    def test_command_output_is_a_pop_up_and_a_status_line(self) -> None:
        h = Harness(messages=2)
        h.fake.rooms_joined["lounge"] = {"alice"}
        h.fake.devices_of["alice"] = [("phone", "verified")]
        before = [x.body for x in h.model.current_conversation.window.items]
        h.line("/rooms")
        self.assertIn("#lounge (joined)", h.text())
        self.assertIn("Esc or any key closes this", h.text())
        h.type("hi")  # typing goes on: the pop-up closes, the keys reach the input line
        self.assertNotIn("Esc or any key closes this", h.text())
        self.assertIn("> hi", h.text())
        h.press("ctrl u")
        h.line("/devices")
        screen = " ".join(h.text().split())
        self.assertIn("laptop: this device", screen)
        self.assertIn("phone: verified", screen)
        h.press("esc")
        self.assertEqual([x.body for x in h.model.current_conversation.window.items], before)
        status = [x.body for x in h.model.conversations[STATUS].window.items]
        self.assertIn("#lounge (joined)", status)


class LogFileTests(unittest.TestCase):
    def test_file_is_private_and_rotated(self) -> None:
        directory = Path(self.mktemp())
        log = ClientLog(directory)
        observer = log.open(rotate_bytes=300)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        for i in range(60):
            observer({"log_format": "line {i} " + "x" * 40, "i": i, "log_level": LogLevel.info,
                      "log_namespace": "t", "log_time": 0.0})
        files = sorted(p.name for p in directory.iterdir())
        self.assertIn("shtalk-urwid.log", files)
        self.assertEqual(len(files), 1 + KEEP_FILES)
        for name in files:
            self.assertEqual(stat.S_IMODE(os.stat(directory / name).st_mode), 0o600, name)

    def test_one_sentence_per_failure_once(self) -> None:
        log = ClientLog(Path("/data"))
        shown: list[str] = []
        log.notify = shown.append
        try:
            raise CorruptEntry("history message: not a sealed value")
        except CorruptEntry:
            failure = Failure()
        event = {"log_format": "a command failed", "log_failure": failure,
                 "log_level": LogLevel.critical, "log_namespace": "x"}
        log.observe(event)
        log.observe(event)  # the same again: once is enough
        self.assertEqual(shown, [
            "A command failed: A record in the local store failed its integrity check "
            "(damaged or edited). The details are in /data/shtalk-urwid.log."])
        other = Failure(KeyError("nope"))
        self.assertEqual(
            failure_sentence({"log_format": "handling a push failed", "log_failure": other,
                              "log_namespace": "x"}, "/d/l.log"),
            "Handling a push failed: an internal error (KeyError). The details are in "
            "/d/l.log.")
        self.assertIsNone(failure_sentence({"log_format": "hello", "log_level": LogLevel.info},
                                           "x"))
        self.assertIsNone(failure_sentence({"log_format": "stray", "log_level": LogLevel.error,
                                            "log_namespace": "stderr"}, "x"))


class PassphraseCommandTests(unittest.TestCase):
    def test_esc_goes_back_and_a_wrong_current_one_is_asked_again(self) -> None:
        from twisted.internet.defer import fail

        from shtalk.client.localstore import WrongPassphrase
        from shtalk.clientui.app import App

        app = App(Clock(), ClientConfig(), "chat.example", 6697, Path(tempdir(self)))
        calls: list[tuple[str, str]] = []

        def change(old: str, new: str) -> Deferred[None]:
            calls.append((old, new))
            return succeed(None) if old == "right" else fail(WrongPassphrase("no"))

        app.store = SimpleNamespace(change_passphrase=change)  # type: ignore[assignment]
        size = (80, 24)

        def line(text: str) -> None:
            for ch in [*text, "enter"]:
                app.screen.keypress(size, ch)

        app.account.passphrase()
        line("wrong")
        line("new one")
        app.screen.keypress(size, "esc")  # back to the new passphrase
        self.assertIn("The new passphrase:", text_of(app.screen, size))
        line("new one")
        line("new one")
        self.assertEqual(calls, [("wrong", "new one")])
        self.assertIn("does not unlock", text_of(app.screen, size))  # asked again
        line("right")
        line("new one")
        line("new one")
        self.assertEqual(calls[-1], ("right", "new one"))
        self.assertIn("the local passphrase is changed",
                      [x.body for x in app.model.conversations[STATUS].window.items])


class ConversationListTests(unittest.TestCase):
    def test_a_long_name_is_shortened_not_the_unread_count(self) -> None:
        h = Harness(messages=1)
        h.model.add_line(Line("m1", "user:averyveryverylongname", "averyveryverylongname", 1,
                              "hi", "received"))
        h.controller.handle_event(Presence("averyveryverylongname", "online"))
        row = next(r for r in h.text().splitlines() if "@averyvery" in r)
        self.assertIn("\u2026 (1)", row.split("\u2502")[0])
