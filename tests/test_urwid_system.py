# mypy: disallow-untyped-calls=False
"""System test: two real ``shtalk-urwid`` processes in real terminals (tmux) against a real
``twistd``.  The test types with ``tmux send-keys`` and reads the screens with
``tmux capture-pane``, as a person would.

Both people register through the first-run screens (trust the fingerprint, create the
account, answer whatever the server asks for -- a CAPTCHA, an emailed code -- and choose
the local passphrase), open a direct conversation and exchange messages, chat in a room,
see the screen while the server is down and after it came back, and one quits, misses a
message and sees it listed after unlocking again.  New stores use the test-only cheap
Argon2id (``SHTALK_URWID_TEST_KDF=1``).  Skipped (with the reason) where tmux is missing;
``.ci/run`` installs it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from twisted.trial import unittest

from tests.harness import REPO_ROOT, ServerProcess, fresh_name

PASSWORD = "tangerine-quokka-43"
PASSPHRASE = "correct horse local"
TIMEOUT = 40.0


class Terminal:
    """One shtalk-urwid in a detached 80x24 tmux session on a private tmux server."""

    def __init__(self, name: str, socket: str, port: int, home: Path) -> None:
        self.name = name
        self.socket = socket
        self.port = port
        self.home = home
        self.err = home / "stderr.txt"

    def tmux(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                             text=True, timeout=30, check=False)
        return out.stdout

    def start(self) -> None:
        env = {
            "SHTALK_URWID_TEST_KDF": "1",
            "XDG_CONFIG_HOME": str(self.home / "config"),
            "XDG_DATA_HOME": str(self.home / "data"),
            "PYTHONPATH": str(REPO_ROOT),
            "TERM": "xterm-256color",
            "LANG": "C.UTF-8",
        }
        exports = " ".join(f"{k}={v!s}" for k, v in env.items())
        command = (f"env {exports} {sys.executable} -m shtalk.clientui.main "
                   f"127.0.0.1:{self.port} 2>>{self.err}; echo EXITED $?; sleep 600")
        self.tmux("kill-session", "-t", self.name)
        self.tmux("new-session", "-d", "-s", self.name, "-x", "80", "-y", "24", command)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.name)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", self.name, "-l", text)

    def key(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.name, *keys)

    def line(self, text: str) -> None:
        self.type(text)
        time.sleep(0.1)
        self.key("Enter")

    def wait_for(self, what: str | Callable[[str], bool], timeout: float = TIMEOUT) -> str:
        test = (lambda s: what in s) if isinstance(what, str) else what
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if test(screen):
                return screen
            time.sleep(0.15)
        err = self.err.read_text(errors="replace")[-3000:] if self.err.exists() else ""
        raise AssertionError(f"{self.name}: timed out waiting for {what!r}; the screen:\n"
                             f"{screen}\nstderr:\n{err}")


class UrwidSystemTest(unittest.TestCase):
    timeout = 400

    def setUp(self) -> None:
        if shutil.which("tmux") is None:
            raise unittest.SkipTest("tmux is not installed: these tests drive shtalk-urwid "
                                    "in real terminals (.ci/run installs it; or apt-get "
                                    "install tmux)")
        self.base = Path(tempfile.mkdtemp(prefix="shtalk-urwid-system-"))
        self.answers = self.base / "captcha-answers.txt"
        os.environ["SHTALK_TEST_CAPTCHA_ANSWERS"] = str(self.answers)
        self.addCleanup(os.environ.pop, "SHTALK_TEST_CAPTCHA_ANSWERS", None)
        (self.base / "server").mkdir()
        self.server = ServerProcess(base_dir=str(self.base / "server"))
        self.server.start()
        self.addCleanup(self.server.cleanup)
        self.socket = f"shtalk-test-{os.getpid()}-{fresh_name('t')}"
        self.addCleanup(subprocess.run, ["tmux", "-L", self.socket, "kill-server"],
                        capture_output=True, check=False)
        if not os.environ.get("SHTALK_KEEP"):
            self.addCleanup(shutil.rmtree, self.base, True)

    def terminal(self, name: str) -> Terminal:
        home = self.base / name
        home.mkdir(parents=True)
        t = Terminal(name, self.socket, self.server.port, home)
        t.start()
        return t

    # -- answering the set-up screens --------------------------------------------------
    def captcha_answer(self, screen: str) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.answers.exists():
                lines = self.answers.read_text().split()
                if len(lines) >= 2:
                    return lines[-1]
            time.sleep(0.1)
        raise AssertionError(f"no CAPTCHA answer recorded by the server; screen:\n{screen}")

    def email_code(self, email: str) -> str:
        outbox = self.server.data_dir / "outbox"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            mails = sorted(outbox.glob("*.eml"), key=lambda p: p.stat().st_mtime) \
                if outbox.exists() else []
            for mail in reversed(mails):
                text = mail.read_text(errors="replace")
                if email in text:
                    m = re.search(r"\b([A-Z0-9]{6,10}|\d{6,8})\b", text.split("\n\n", 1)[-1])
                    if m:
                        return m.group(1)
            time.sleep(0.2)
        raise AssertionError(f"no verification mail for {email} in {outbox}")

    def register(self, t: Terminal, username: str) -> None:
        """Walk the first-run screens, answering what each one asks."""
        email = f"{username}@example.org"
        deadline = time.monotonic() + 90
        answered: dict[str, int] = {}
        while time.monotonic() < deadline:
            s = t.screen()
            step = None
            if "Trust this server" in s:
                step, keys = "trust", ["y"]
            elif "Do you have an account" in s:
                step, keys = "welcome", ["r"]
            elif "Pick a username" in s:
                step, text = "username", username
            elif "Your email address" in s:
                step, text = "email", email
            elif "Choose a password" in s:
                step, text = "password", PASSWORD
            elif "The same password again" in s:
                step, text = "password2", PASSWORD
            elif "Are you a person" in s:
                step, text = "captcha" + str(answered.get("captcha", 0)), \
                    self.captcha_answer(s)
            elif "Confirm your email" in s:
                step, text = "email-code", self.email_code(email)
            elif "The same passphrase again" in s:
                step, text = "passphrase2", PASSPHRASE
            elif "Choose a local passphrase" in s:
                step, text = "passphrase", PASSPHRASE
            elif "Two-factor authentication" in s and "[y] yes" in s:
                step, keys = "2fa", ["n"]
            elif "logged in as" in s:
                return
            if step is None or answered.get(step, 0) > 3:
                time.sleep(0.2)
                continue
            answered[step] = answered.get(step, 0) + 1
            if step in ("trust", "welcome", "2fa"):
                t.key(*keys)
            else:
                t.line(text)
            time.sleep(0.4)
        raise AssertionError(f"{username}: registration did not finish; screen:\n{t.screen()}")

    def unlock(self, t: Terminal) -> None:
        t.wait_for("Type the local passphrase")
        t.line(PASSPHRASE)

    # -- the test ----------------------------------------------------------------------
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

        # A direct conversation, both ways.
        alice.line(f"/msg {bob_name} hello from alice")
        alice.wait_for("hello from alice \u2713")
        bob.wait_for(lambda s: any(f"@{alice_name}" in row and "(1)" in row
                                   for row in s.splitlines()))
        bob.key("M-a")  # Alt-A: next unread conversation
        bob.wait_for("hello from alice")
        bob.line("hi alice, bob here")
        alice.wait_for("hi alice, bob here")
        self.assertIn("e2ee", alice.screen())

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
        self.assertIn("2 members", screen)

        # The server goes away: the screen says so and the client keeps running ...
        self.server.stop()
        screen = alice.wait_for(lambda s: "reconnecting" in s or "offline" in s)
        alice.line("/help")  # still responsive
        alice.wait_for("shtalk-urwid help")
        alice.key("Escape")
        alice.wait_for(lambda s: "shtalk-urwid help" not in s)
        # ... and comes back: online again, messages flow.
        self.server.start()
        alice.wait_for(lambda s: " online " in s, timeout=60)
        bob.wait_for(lambda s: " online " in s, timeout=60)
        alice.line("after the restart")
        bob.wait_for("after the restart")

        # Alice quits; Bob writes; Alice unlocks and sees what arrived while away.
        alice.key("C-x")
        alice.wait_for("EXITED 0")
        bob.line(f"/msg {alice_name} while you were out")
        bob.wait_for("while you were out \u2713")
        alice.start()
        self.unlock(alice)
        alice.wait_for(lambda s: "Unlock" not in s and "online" in s)
        alice.key("C-n")  # the status window's notices ...
        # ... or, when the backlog arrived before the first screen was built and C-n
        # landed on the conversation itself, the message on screen.
        alice.wait_for(lambda s: "arrived while you were away" in s or "while you were out"
                       in s or any(f"@{bob_name}" in row and "(1)" in row
                                   for row in s.splitlines()))
        alice.key("M-a")
        alice.wait_for("while you were out")

    def test_wrong_passphrase_and_forget_server(self) -> None:
        name = fresh_name("c")
        carol = self.terminal("carol")
        self.register(carol, name)
        carol.key("C-x")
        carol.wait_for("EXITED 0")
        carol.start()
        carol.wait_for("Type the local passphrase")
        carol.line("not the passphrase")
        carol.wait_for("does not unlock")
        carol.line(PASSPHRASE)
        carol.wait_for(lambda s: "Unlock" not in s and "online" in s)
        carol.key("C-x")
        carol.wait_for("EXITED 0")
        result = subprocess.run(
            [sys.executable, "-m", "shtalk.clientui.main", "--forget-server",
             f"127.0.0.1:{self.server.port}", "--data-dir", str(carol.home / "data" /
                                                                 "shtalk-urwid")],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            timeout=60, check=False)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Forgot the certificate", result.stdout)
