"""Drive real ``shtalk-urwid`` processes in real terminals (tmux, 80x24), as a person would:
type with ``tmux send-keys``, read the screen with ``tmux capture-pane``.

Shared by tests/test_urwid_system.py and bench/urwid.py.  Every screen read is checked
for ``Traceback``: a traceback must never reach the terminal.  The client's stderr and
its log file (``shtalk-urwid.log`` in its data directory) are shown when a wait times out.

`Newcomer` walks the first-run screens of a new account, answering each one: trust the
fingerprint, create the account, the CAPTCHA (read from the server's test hook
``SHTALK_TEST_CAPTCHA_ANSWERS``), the emailed code (from the server's outbox), the local
passphrase, no two-factor set-up.  It waits for each screen to change instead of sleeping,
so its run time is the machine's, not typing pauses.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.harness import REPO_ROOT

PASSWORD = "tangerine-quokka-43"
PASSPHRASE = "correct horse local"
TIMEOUT = 40.0
POLL = 0.02


class TracebackOnScreen(AssertionError):
    pass


class Terminal:
    """One shtalk-urwid in a detached 80x24 tmux session on a private tmux server."""

    def __init__(self, name: str, socket: str, port: int, home: Path,
                 command: list[str] | None = None, cheap_kdf: bool = True) -> None:
        self.name = name
        self.cheap_kdf = cheap_kdf  # SHTALK_URWID_TEST_KDF=1 (tests), else the real Argon2id
        self.socket = socket
        self.port = port
        self.home = home
        self.err = home / "stderr.txt"
        self.command = command or [sys.executable, "-m", "shtalk.clientui.main"]
        self.started = 0.0

    @property
    def data_dir(self) -> Path:
        return self.home / "data" / "shtalk-urwid"

    @property
    def log(self) -> Path:
        return self.data_dir / "shtalk-urwid.log"

    def tmux(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                             text=True, timeout=30, check=False)
        return out.stdout

    def start(self) -> None:
        env = {
            "SHTALK_URWID_TEST_KDF": "1" if self.cheap_kdf else "0",
            "XDG_CONFIG_HOME": str(self.home / "config"),
            "XDG_DATA_HOME": str(self.home / "data"),
            "PYTHONPATH": str(REPO_ROOT),
            "TERM": "xterm-256color",
            "LANG": "C.UTF-8",
        }
        exports = " ".join(f"{k}={v!s}" for k, v in env.items())
        command = (f"env {exports} {' '.join(self.command)} 127.0.0.1:{self.port} "
                   f"2>>{self.err}; echo EXITED $?; sleep 600")
        self.tmux("kill-session", "-t", self.name)
        self.started = time.monotonic()
        self.tmux("new-session", "-d", "-s", self.name, "-x", "80", "-y", "24", command)

    def pids(self) -> list[int]:
        """The client's process (the pane's shell's children)."""
        pane = self.tmux("display", "-p", "-t", self.name, "#{pane_pid}").strip()
        if not pane.isdigit():
            return []
        out = subprocess.run(["pgrep", "-P", pane], capture_output=True, text=True,
                             check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def screen(self) -> str:
        text = self.tmux("capture-pane", "-p", "-t", self.name)
        if "Traceback" in text:
            raise TracebackOnScreen(f"{self.name}: a traceback on the screen:\n{text}")
        return text

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", self.name, "-l", text)

    def key(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.name, *keys)

    def line(self, text: str) -> None:
        self.type(text)
        self.key("Enter")

    def wait_for(self, what: str | Callable[[str], bool], timeout: float = TIMEOUT) -> str:
        """The screen once ``what`` is on it (a string may be wrapped over rows of a
        dialog or of the message pane) or ``what(screen)`` is true."""
        test = (lambda s: what in s or what in joined(s)) if isinstance(what, str) else what
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if test(screen):
                return screen
            time.sleep(POLL)
        raise AssertionError(f"{self.name}: timed out waiting for {what!r}; the screen:\n"
                             f"{screen}\n{self.diagnostics()}")

    def gone(self, what: str, timeout: float = TIMEOUT) -> str:
        return self.wait_for(lambda s: what not in s, timeout)

    def changed(self, before: str, timeout: float = TIMEOUT) -> str:
        return self.wait_for(lambda s: s != before, timeout)

    def diagnostics(self) -> str:
        err = self.err.read_text(errors="replace")[-2000:] if self.err.exists() else ""
        log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        return f"stderr:\n{err}\nlog:\n{log}"


class Newcomer:
    """Answers the first-run screens of a new account (see the module docstring)."""

    def __init__(self, answers: Path, outbox: Path) -> None:
        self.answers = answers
        self.outbox = outbox

    def captcha_answer(self, cid_hint: str = "") -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.answers.exists():
                lines = self.answers.read_text().splitlines()
                if lines:
                    return lines[-1].split(" ", 1)[1]
            time.sleep(POLL)
        raise AssertionError(f"no CAPTCHA answer recorded by the server in {self.answers}")

    def captchas_drawn(self) -> int:
        return len(self.answers.read_text().splitlines()) if self.answers.exists() else 0

    def email_code(self, email: str) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            mails = sorted(self.outbox.glob("*.eml"), key=lambda p: p.stat().st_mtime) \
                if self.outbox.exists() else []
            for mail in reversed(mails):
                text = mail.read_text(errors="replace")
                if f"To: {email}" in text:
                    m = re.search(r"^    (\S+)$", text, re.M)
                    if m:
                        return m.group(1)
            time.sleep(POLL)
        raise AssertionError(f"no verification mail for {email} in {self.outbox}")

    def register(self, t: Terminal, username: str, timeout: float = 90) -> None:
        """Walk the first-run screens, answering what each one asks, until the chat says
        "logged in as"."""
        email = f"{username}@example.org"
        answers: list[tuple[str, str | list[str]]] = [
            ("Trust this server", ["y"]),
            ("Do you have an account", ["r"]),
            ("Pick a username", username),
            ("Your email address", email),
            ("Choose a password", PASSWORD),
            ("The same password again", PASSWORD),
            ("Are you a person", ""),
            ("Confirm your email", ""),
            ("The same passphrase again", PASSPHRASE),
            ("Choose a local passphrase", PASSPHRASE),
        ]
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            s = t.screen()
            if "Two-factor authentication" in s and "[y] yes" in s:
                t.key("n")
                last = t.changed(s)
                continue
            if "logged in as" in s:
                return
            for marker, reply in answers:
                if marker in s and s != last:
                    if marker == "Are you a person":
                        reply = self.captcha_answer()
                    elif marker == "Confirm your email":
                        reply = self.email_code(email)
                    if isinstance(reply, list):
                        t.key(*reply)
                    else:
                        t.line(reply)
                    last = s
                    t.changed(s)
                    break
            else:
                time.sleep(POLL)
        raise AssertionError(f"{username}: registration did not finish; screen:\n{t.screen()}"
                             f"\n{t.diagnostics()}")


def unread(name: str, count: int = 1) -> Callable[[str], bool]:
    """A test for `Terminal.wait_for`: the conversation list shows ``name``'s direct
    conversation with ``count`` unread (a long name is shortened there, not the count)."""
    return lambda s: any(f"@{name[:8]}" in r.split("\u2502")[0] and f"({count})" in r
                         for r in s.splitlines())


def listed(name: str, presence: str) -> Callable[[str], bool]:
    """A test for `Terminal.wait_for`: ``name``'s direct conversation is in the list with
    the presence mark (● online, ○ offline)."""
    mark = {"online": "\u25cf", "offline": "\u25cb"}[presence]
    return lambda s: any(r.split("\u2502")[0].lstrip().startswith(f"{mark} @{name[:8]}")
                         for r in s.splitlines())


def joined(screen: str) -> str:
    """The text inside the frames of a screen (a dialog's, or the message pane's), its
    wrapped rows joined by single spaces."""
    parts = [row.split("\u2502") for row in screen.splitlines()]
    return " ".join(" ".join(p[1] for p in parts if len(p) >= 2).split())


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its waited-for children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return sum(int(x) for x in fields[11:15]) / ticks
