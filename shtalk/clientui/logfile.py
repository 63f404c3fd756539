"""shtalk-urwid's log: every failure in full in a file, one plain sentence on screen.

Why: a traceback on the terminal corrupts the screen and tells a person nothing they can
act on.  So the client logs to ``<data dir>/shtalk-urwid.log`` (0600 in the 0700 data
directory, rotated at 1 MB, 5 old files kept), standard output and error are redirected
there while the screen runs, and every failure that is logged (``log.failure``, an error
event, an unhandled error in a Deferred) also becomes one sentence in the status window
that names the log file.  Secrets never reach the log: the client logs no passwords,
passphrases, codes, tokens or message bodies, and tracebacks carry no local variables.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogBeginner,
)
from twisted.python import threadable
from twisted.python.logfile import LogFile

LOG_NAME = "shtalk-urwid.log"
ROTATE_BYTES = 1_000_000
KEEP_FILES = 5
REPEAT_SECONDS = 30.0


def failure_sentence(event: dict[str, Any], path: Path | str) -> str | None:
    """One sentence for a person about a logged failure or error (None: not one)."""
    failure = event.get("log_failure")
    level = event.get("log_level")
    if failure is None and level not in (LogLevel.error, LogLevel.critical):
        return None
    if event.get("log_namespace") in ("stdout", "stderr"):
        return None  # stray output: in the file only
    what = (formatEvent(event) or "something").strip().rstrip(":.").strip()
    what = what[:1].upper() + what[1:]
    if failure is not None:
        from shtalk.clientui.errors import describe

        error = failure.value
        reason = describe(error).rstrip(".")
        name = type(error).__name__
        if reason.startswith(name):
            reason = f"an internal error ({name})"
        return f"{what}: {reason}. The details are in {path}."
    return f"{what}. The details are in {path}."


class ClientLog:
    """The log file and the sentence for each failure (``notify`` shows it)."""

    def __init__(self, data_dir: Path, reactor: Any = None) -> None:
        self.path = data_dir / LOG_NAME
        self.reactor = reactor
        self.notify: Callable[[str], None] | None = None
        self._last: dict[str, float] = {}
        self.file: LogFile | None = None

    def open(self, rotate_bytes: int = ROTATE_BYTES) -> FileLogObserver:
        """The file (0600 in a 0700 directory, rotated) and its observer."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.file = LogFile(  # type: ignore[no-untyped-call]
            self.path.name, str(self.path.parent), rotateLength=rotate_bytes,
            defaultMode=0o600, maxRotatedFiles=KEEP_FILES)
        return FileLogObserver(cast(IO[Any], self.file), formatEventAsClassicLogText)

    def start(self) -> None:
        """Log to the file from now on; stdout and stderr too (the screen is urwid's)."""
        globalLogBeginner.beginLoggingTo(
            [self.open(), cast(ILogObserver, self.observe)], redirectStandardIO=True)

    def observe(self, event: dict[str, Any]) -> None:
        notify = self.notify
        if notify is None:
            return
        sentence = failure_sentence(event, self.path)
        if sentence is None:
            return
        now = time.monotonic()
        if now - self._last.get(sentence, -REPEAT_SECONDS) < REPEAT_SECONDS:
            return  # the same failure again: once is enough on screen
        self._last[sentence] = now
        if self.reactor is not None and not threadable.isInIOThread():  # type: ignore[no-untyped-call]
            self.reactor.callFromThread(notify, sentence)
        else:
            notify(sentence)

