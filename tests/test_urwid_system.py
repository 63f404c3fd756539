# mypy: disallow-untyped-calls=False
"""System test: real ``shtalk-urwid`` processes in real terminals (tmux, 80x24) against a real
``twistd``.  The tests type with ``tmux send-keys`` and read the screens with
``tmux capture-pane``, as a person would (tests/terminal.py); no screen may ever show a
``Traceback``.

What a newcomer and everyday use meet, one test per theme: registering (checks before the
CAPTCHA, the CAPTCHA dialog, Esc going back, an honest wait when rate limited), chatting
(presence from the start, connection lost and back in the status window), a new device
(password and code before the passphrase, sentences for wrong and reused codes, device
notices, the QR code at 80x24, /devices), failures (one sentence, the traceback in the
log) and command output (a pop-up, never the open conversation).  New stores use the
test-only cheap Argon2id (``SHTALK_URWID_TEST_KDF=1``).  Skipped (with the reason) where
tmux is missing; ``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyotp
from twisted.trial import unittest

from tests.harness import REPO_ROOT, ServerProcess, fresh_name
from tests.terminal import PASSPHRASE, PASSWORD, Newcomer, Terminal, listed, unread

ACCOUNT_CHECKS: dict[str, dict[str, object]] = {
    "accounts": {"require_captcha": True, "require_email_verification": True}}


class UrwidCase(unittest.TestCase):
    timeout = 400
    server_config: dict[str, dict[str, object]] = {}

    def setUp(self) -> None:
        if shutil.which("tmux") is None:
            raise unittest.SkipTest("tmux is not installed: these tests drive shtalk-urwid "
                                    "in real terminals (.ci/run installs it; or apt-get "
                                    "install tmux)")
        self.base = Path(self.mktemp()).absolute()  # under _trial_temp, never /tmp
        self.base.mkdir(parents=True)
        self.answers = self.base / "captcha-answers.txt"
        self.clock_file = self.base / "clock-offset"
        for key, path in (("SHTALK_TEST_CAPTCHA_ANSWERS", self.answers),
                          ("SHTALK_TEST_CLOCK_FILE", self.clock_file)):
            os.environ[key] = str(path)
            self.addCleanup(os.environ.pop, key, None)
        (self.base / "server").mkdir()
        self.server = ServerProcess(self.server_config, base_dir=str(self.base / "server"))
        self.server.start()
        self.addCleanup(self.server.cleanup)
        self.socket = f"shtalk-test-{os.getpid()}-{fresh_name('t')}"
        self.addCleanup(subprocess.run, ["tmux", "-L", self.socket, "kill-server"],
                        capture_output=True, check=False)
        self.newcomer = Newcomer(self.answers, self.server.data_dir / "outbox")

    def terminal(self, name: str) -> Terminal:
        home = self.base / name
        home.mkdir(parents=True)
        t = Terminal(name, self.socket, self.server.port, home)
        t.start()
        return t

    def register(self, t: Terminal, username: str) -> None:
        self.newcomer.register(t, username)

    def two_people(self) -> tuple[str, Terminal, str, Terminal]:
        """Alice and Bob, registered, each in a terminal: (name, terminal) twice."""
        alice_name, bob_name = fresh_name("a"), fresh_name("b")
        alice, bob = self.terminal("alice"), self.terminal("bob")
        self.register(alice, alice_name)
        self.register(bob, bob_name)
        return alice_name, alice, bob_name, bob

    def unlock(self, t: Terminal) -> None:
        t.wait_for("Type the local passphrase")
        t.line(PASSPHRASE)

    def quit(self, t: Terminal) -> None:
        t.key("C-q")
        t.wait_for("EXITED 0")

    def status_window(self, t: Terminal) -> str:
        """Open the status window (the first entry of the list); its text with the
        wrapped lines joined (the message pane only)."""
        for _ in range(10):
            s = t.screen()
            if " shtalk \u00b7 shtalk \u00b7" in s.splitlines()[0]:
                return flat(s)
            t.key("C-p")
            t.changed(s, 5)
        raise AssertionError(f"the status window does not open:\n{t.screen()}")


def next_code(totp: pyotp.TOTP, used: str) -> str:
    """The first code of a later 30-second step than ``used`` (a step works once)."""
    deadline = time.time() + 35
    while totp.now() == used and time.time() < deadline:
        time.sleep(0.2)
    return str(totp.now())


def flat(screen: str) -> str:
    """The message pane of a screen (right of the list), wrapped lines joined by spaces."""
    rows = screen.splitlines()[1:-2]
    return " ".join(r.split("\u2502", 1)[-1].strip() for r in rows if r.strip())


class ChatTests(UrwidCase):
    def test_two_people_chat(self) -> None:
        alice_name, bob_name = fresh_name("a"), fresh_name("b")
        alice, bob = self.terminal("alice"), self.terminal("bob")

        # First run: the fingerprint is shown before anything else.
        first = alice.wait_for("SHA-256 fingerprint")
        self.assertRegex(first.replace("\n", ""), r"([0-9A-F]{2}:){4}")
        self.register(alice, alice_name)
        self.register(bob, bob_name)
        screen = alice.wait_for("online")
        self.assertIn(f"{alice_name}/", screen)

        # A direct conversation, both ways; the peer's presence shows at once.
        alice.line(f"/msg {bob_name} hello from alice")
        alice.wait_for("hello from alice \u2713")
        bob.wait_for(unread(alice_name))
        bob.key("M-a")  # Alt-A: next unread conversation
        bob.wait_for("hello from alice")
        bob.line("hi alice, bob here")
        alice.wait_for("hi alice, bob here")
        # Bob wrote to her: Alice may see his presence now, and does.
        alice.wait_for(listed(bob_name, "online"))
        alice.key("Escape")  # clears the status bar's notice: the conversation's state
        alice.wait_for("e2ee \u00b7 not verified (/verify) \u00b7 online")

        # A room.
        room = fresh_name("r")
        alice.line(f"/create {room}")
        alice.wait_for(f"you created #{room}")
        bob.line(f"/join {room}")
        bob.wait_for(f"you joined #{room}")
        alice.wait_for(f"{bob_name} joined")
        alice.line("welcome to the room")
        bob.wait_for("welcome to the room")
        bob.line("glad to be here")
        screen = alice.wait_for("glad to be here")
        self.assertIn(f"#{room}", screen)
        alice.key("Escape")
        alice.wait_for("2 members")

        # The server goes away: the screen says so and the client keeps running ...
        self.server.stop()
        alice.wait_for(lambda s: "reconnecting" in s or "offline" in s)
        alice.line("/help")  # still responsive
        alice.wait_for("shtalk-urwid help")
        alice.key("Escape")
        alice.gone("shtalk-urwid help")
        # ... and comes back: online again, messages flow.
        self.server.start()
        alice.wait_for(lambda s: " online " in s, timeout=60)
        bob.wait_for(lambda s: " online " in s, timeout=60)
        alice.line("after the restart")
        bob.wait_for("after the restart")
        # The status window logged it, each line with its time.
        log = self.status_window(alice)
        self.assertRegex(log, r"\d\d:\d\d -- connection lost")
        self.assertRegex(log, r"\d\d:\d\d -- reconnecting \(attempt 1\)")
        self.assertRegex(log, r"\d\d:\d\d -- back online after \d+s offline")

        # Bob quits and comes back: Alice's presence is on his list at once (no /who).
        self.quit(bob)
        bob.start()
        self.unlock(bob)
        bob.wait_for(listed(alice_name, "online"))
        # Alice quits; Bob writes; Alice unlocks and sees what arrived while away, and
        # Bob shown offline while she was gone.
        self.quit(alice)
        bob.wait_for(listed(alice_name, "offline"))
        bob.line(f"/msg {alice_name} while you were out")
        bob.wait_for("while you were out \u2713")
        alice.start()
        self.unlock(alice)
        alice.wait_for(lambda s: "Unlock" not in s and "online" in s)
        alice.wait_for(listed(bob_name, "online"))
        alice.key("C-n")  # the status window's notices ...
        # ... or, when the backlog arrived before the first screen was built and C-n
        # landed on the conversation itself, the message on screen.
        alice.wait_for(lambda s: "arrived while you were away" in s or "while you were out"
                       in s or unread(bob_name)(s))
        alice.key("M-a")
        alice.wait_for("while you were out")

    def test_wrong_passphrase_and_forget_server(self) -> None:
        name = fresh_name("c")
        carol = self.terminal("carol")
        self.register(carol, name)
        self.quit(carol)
        carol.start()
        carol.wait_for("Type the local passphrase")
        carol.key("Escape")  # the first screen: Esc stays, and says how to quit
        carol.wait_for("F10 or Ctrl-Q quits")
        carol.line("not the passphrase")
        carol.wait_for("does not unlock")
        carol.line(PASSPHRASE)
        carol.wait_for(lambda s: "Unlock" not in s and "online" in s)
        self.quit(carol)
        result = subprocess.run(
            [sys.executable, "-m", "shtalk.clientui.main", "--forget-server",
             f"127.0.0.1:{self.server.port}", "--data-dir", str(carol.data_dir)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            timeout=60, check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Forgot the certificate", result.stdout)


class NewcomerTests(UrwidCase):
    """A default server's account checks (CAPTCHA, email code), as a newcomer meets them."""

    server_config = ACCOUNT_CHECKS

    def test_checks_before_the_captcha_readable_captcha_and_esc(self) -> None:
        taken = fresh_name("t")
        self.register(self.terminal("first"), taken)
        drawn = self.newcomer.captchas_drawn()
        t = self.terminal("dana")
        t.wait_for("Trust this server")
        t.key("y")
        t.wait_for("Do you have an account")
        t.key("Escape")  # the first step: Esc stays and says how to quit
        t.wait_for("F10 or Ctrl-Q quits")
        t.key("r")
        t.wait_for("Pick a username")
        t.line("x")  # checked here, before anything is sent
        t.wait_for("That username cannot be used")
        t.key("BSpace")
        t.line(taken)
        t.wait_for("Your email address")
        t.key("Escape")  # back one step, the name kept
        s = t.wait_for("Pick a username")
        self.assertIn(f"Username: {taken}", s)
        t.key("Enter")
        t.line("dana@example.org")
        t.wait_for("Choose a password")
        t.line("short")
        t.wait_for("The password has 5 characters; use at least 12")
        t.line("password123456")
        t.wait_for("one of the most common passwords")
        t.line(PASSWORD)
        t.line("not the same")
        t.wait_for("The two passwords differ")
        t.line(PASSWORD)
        t.line(PASSWORD)
        # The server refuses the taken name before it draws a CAPTCHA.
        s = t.wait_for("That username is taken")
        self.assertIn("Pick a username", s)
        self.assertEqual(self.newcomer.captchas_drawn(), drawn)
        t.key("C-u")
        name = fresh_name("d")
        t.line(name)
        t.wait_for("Email: dana@example.org")  # kept from before
        t.key("Enter")
        t.wait_for("Choose a password")
        t.line(PASSWORD)
        t.wait_for("The same password again")
        t.line(PASSWORD)
        # The CAPTCHA: whole at 80x24, its alphabet named, case does not matter.
        s = t.wait_for("Answer:")
        rows = s.splitlines()
        self.assertLessEqual(len(rows), 24)
        self.assertTrue(rows[0].startswith("\u250c") and "Are you a person?" in rows[0])
        words = " ".join(s.replace("\u2502", " ").split())
        self.assertIn("A C D E F H J K M N P R T U V W X Y 3 4 7 9", words)
        self.assertIn("case does not matter", s)
        self.assertTrue(any(r.startswith("\u2514") for r in rows), s)
        self.assertIn("F5: new picture", s)
        picture = s
        t.key("F5")  # a new one, no registration attempt spent
        t.changed(picture)
        t.key("F6")  # the accessible one: a question in words
        s = t.wait_for("What is ")
        self.assertRegex(s, r"What is [a-z -]+ (plus|minus) [a-z -]+\?")
        t.key("Escape")  # back to the form, one step
        t.wait_for("The same password again")
        t.line(PASSWORD)
        t.wait_for("Are you a person")
        t.line("wrong")
        t.wait_for("That answer was wrong or has expired; here is a new one.")
        t.line(self.newcomer.captcha_answer())
        t.wait_for("Confirm your email")
        t.line(self.newcomer.email_code("dana@example.org"))
        # The password was checked (the login succeeded) before the passphrase question.
        t.wait_for("Choose a local passphrase")
        t.line(PASSPHRASE)
        t.line(PASSPHRASE)
        t.wait_for("Two-factor authentication")
        t.key("n")
        t.wait_for(f"logged in as {name}")


class RateLimitTests(UrwidCase):
    server_config: dict[str, dict[str, object]] = {
        "ratelimit": {"enabled": True, "register_address": "1/3600"}}

    def test_rate_limited_registration_says_when_and_then_works(self) -> None:
        self.register(self.terminal("erin"), fresh_name("e"))
        t = self.terminal("finn")
        name = fresh_name("f")
        t.wait_for("Trust this server")
        t.key("y")
        t.key("r")
        for text in (name, f"{name}@example.org", PASSWORD, PASSWORD):
            s = t.screen()
            t.line(text)
            t.changed(s)
        s = t.wait_for("Not just now")
        m = re.search(r"Try again in .*?\((\d+) s\)", " ".join(s.split()).replace("\u2502 ", ""))
        self.assertIsNotNone(m, s)
        assert m is not None
        wait = int(m.group(1))
        self.assertGreater(wait, 3000)  # one registration an hour from this address
        # Waiting it out (the server's clock, moved forward) and trying again works.
        self.clock_file.write_text(str(wait))
        t.key("Enter")
        t.wait_for(lambda s: "Choose a local passphrase" in s)


class NewDeviceTests(UrwidCase):
    def test_login_code_passphrase_order_notices_and_devices(self) -> None:
        alice_name, alice, bob_name, bob = self.two_people()
        alice.line(f"/msg {bob_name} hi bob")
        bob.wait_for(f"@{alice_name}")
        # Two-factor set-up: the QR code alone on the screen, whole at 80x24.
        alice.line("/2fa")
        s = alice.wait_for("Scan this with your authenticator app")
        rows = s.splitlines()
        qr = [r for r in rows if "\u2588" in r]
        self.assertGreater(len(qr), 15)
        self.assertTrue(rows[0].startswith("\u250c") and rows[-1].startswith("\u2514"), s)
        self.assertIn("[enter] type the code", s)
        alice.key("Enter")
        s = alice.wait_for("Code from the app")
        secret = re.search(r"\b([A-Z2-7]{32})\b", s)
        assert secret is not None, s
        totp = pyotp.TOTP(secret.group(1))
        used = totp.now()
        alice.line(used)
        alice.wait_for("recovery codes")
        alice.key("Enter")

        # A new device of Alice's: password, code, and only then the passphrase.
        phone = self.terminal("phone")
        phone.wait_for("Trust this server")
        phone.key("y")
        phone.key("l")
        phone.wait_for("Username:")
        phone.line(alice_name)
        phone.wait_for("Password:")
        phone.line("wrong-password-123")
        s = phone.wait_for("Wrong username or password")
        self.assertNotIn("passphrase", s.lower())
        phone.line(PASSWORD)
        s = phone.wait_for("Two-factor code")
        self.assertNotIn("passphrase", s.lower())
        phone.line(used)  # the code that turned two-factor on: used, never again
        phone.wait_for("That code was not accepted: wrong, expired or already used")
        used = next_code(totp, used)
        phone.line(used)
        phone.wait_for("Choose a local passphrase")
        phone.line(PASSPHRASE)
        phone.line(PASSPHRASE)
        phone.wait_for("logged in as")
        # Device notices: Alice's first device and her contact hear of the phone; the
        # phone itself announces none of her existing devices.
        device = re.search(r"logged in as \S+ on device (\S+)", phone.screen())
        assert device is not None
        new = device.group(1)
        self.assertIn(f"You have a new device: {new}", self.status_window(alice))
        self.assertIn(f"{alice_name} has a new device: {new}", self.status_window(bob))
        self.assertNotIn("new device", self.status_window(phone))
        # /devices: a pop-up with the trust state of her own devices too.
        phone.line("/devices")
        s = phone.wait_for(f"Devices of {alice_name}")
        self.assertIn(f"{new}", s)
        self.assertIn("this device", s)
        self.assertRegex(s.replace("\n\u2502", " "), r"not seen yet|trusted on first use")
        phone.key("Escape")
        phone.gone(f"Devices of {alice_name}")
        # /logout, then /login: a wrong password, a wrong code, a reused code: each says
        # what happened and what to do.
        phone.line("/logout")
        phone.wait_for("/login to log in again")
        phone.line("/login")
        phone.wait_for("Password:")
        phone.line("wrong-password-123")
        phone.wait_for("Wrong username or password")
        phone.wait_for("Type the password again, or Esc to stay logged out")
        phone.line(PASSWORD)
        phone.wait_for("Two-factor code")
        phone.line(used)
        phone.wait_for("That code was not accepted: wrong, expired or already used")
        phone.line("000000")
        phone.wait_for("That code was not accepted: wrong, expired or already used")
        phone.line(next_code(totp, used))
        phone.wait_for("logged in again")


class FailureAndOutputTests(UrwidCase):
    def test_failures_are_one_sentence_and_output_never_in_the_conversation(self) -> None:
        _, alice, bob_name, _ = self.two_people()
        room = fresh_name("r")
        alice.line(f"/create {room}")
        alice.wait_for(f"you created #{room}")
        alice.line(f"/msg {bob_name} searchable words here")
        alice.wait_for("searchable words here \u2713")
        conversation = alice.screen()
        # Command output: a pop-up, then the open conversation is as it was.
        for command, title in (("/rooms", "Rooms"), ("/who " + room, "Members of"),
                               ("/devices", "Devices of"), ("/search searchable", "Search")):
            alice.line(command)
            s = alice.wait_for(title)
            self.assertIn("Esc or any key closes this", s)
            alice.key("Escape")
            s = alice.gone("Esc or any key closes this")
            body = [r.split("\u2502", 1)[1] for r in s.splitlines()[1:-2] if "\u2502" in r]
            before = [r.split("\u2502", 1)[1] for r in conversation.splitlines()[1:-2]
                      if "\u2502" in r]
            self.assertEqual(body, before, f"{command} wrote into the conversation")
        # A failure in a background task: one sentence, the traceback in the log file.
        store = next(alice.data_dir.glob("*.sqlite3"))
        with sqlite3.connect(store, timeout=10) as db:
            db.execute("UPDATE history SET body = X'01'")
        alice.line("/search searchable")
        sentence = ("A command failed: A record in the local store failed its integrity "
                    "check (damaged or edited). The details are in")
        bar = alice.wait_for("A command failed").splitlines()[-2].rstrip()
        text = self.status_window(alice)
        self.assertIn(sentence, text)
        self.assertIn("shtalk-urwid.log", text)
        # The status bar shortened that long sentence at a word, with an ellipsis.
        self.assertTrue(bar.endswith("\u2026"), bar)
        shown = bar[:-1].split("online", 1)[1].strip()
        self.assertTrue(sentence.startswith(shown), bar)
        self.assertIn(sentence[len(shown)], " ", f"cut inside a word: {bar}")
        self.assertEqual(stat.S_IMODE(alice.log.stat().st_mode), 0o600)
        log = alice.log.read_text()
        self.assertIn("Traceback", log)
        self.assertIn("CorruptEntry", log)
        self.assertNotIn(PASSWORD, log)
        self.assertNotIn(PASSPHRASE, log)
        # Quitting: only F10, Ctrl-Q or /quit, asking first when a line is unsent.
        alice.key("C-c")
        alice.wait_for("Ctrl-C does not quit: F10 or Ctrl-Q does")
        alice.type("a draft")
        alice.key("F10")
        alice.wait_for("The line you typed is not sent. Quit anyway?")
        alice.key("n")
        alice.gone("Quit anyway?")
        self.assertNotIn("EXITED", alice.screen())
        alice.key("C-q")
        alice.wait_for("Quit anyway?")
        alice.key("y")
        alice.wait_for("EXITED 0")

