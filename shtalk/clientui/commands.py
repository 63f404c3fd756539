"""The /commands: one table (name, aliases, arguments, help, category), the parser and the
tab completion.  Pure functions: no urwid, no reactor, tested on their own.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Argument kinds: what tab completion offers for them.
USER = "user"
ROOM = "room"
DEVICE = "device"
TEXT = "text"
WORD = "word"
COMMAND = "command"
CHOICE = "choice"


@dataclass(frozen=True, slots=True)
class Arg:
    name: str
    kind: str = WORD
    optional: bool = False
    rest: bool = False  # takes the rest of the line, spaces included
    choices: tuple[str, ...] = ()

    def usage(self) -> str:
        text = self.name.upper() + ("..." if self.rest else "")
        if self.choices:
            text = "|".join(self.choices)
        return f"[{text}]" if self.optional else text


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: tuple[Arg, ...]
    help: str
    category: str
    aliases: tuple[str, ...] = ()

    def usage(self) -> str:
        return " ".join(["/" + self.name, *(a.usage() for a in self.args)])


ACCOUNT, CHAT, ROOMS, TRUST, CLIENT = "Account", "Chat", "Rooms", "Trust", "Client"

COMMANDS: tuple[Command, ...] = (
    Command("help", (Arg("command", COMMAND, optional=True),),
            "list every command and key (F1), or explain one command", CLIENT),
    Command("quit", (), "leave shtalk-urwid (your session stays; F10 or Ctrl-Q); asks first "
            "when something is not sent yet", CLIENT,
            ("exit",)),
    Command("bell", (Arg("on", CHOICE, optional=True, choices=("on", "off")),),
            "terminal bell on direct messages and mentions: on or off (F2 toggles)", CLIENT),
    Command("close", (), "close the open conversation (history stays)", CLIENT),
    Command("msg", (Arg("user", USER), Arg("text", TEXT, optional=True, rest=True)),
            "open a direct conversation with USER (and send TEXT)", CHAT, ("query", "dm")),
    Command("search", (Arg("text", TEXT, rest=True),),
            "search the history of every conversation on this device", CHAT),
    Command("timer", (Arg("duration", WORD),),
            "disappearing messages here: 30s, 10m, 1h, 7d or off", CHAT),
    Command("join", (Arg("room", ROOM),), "join a room (and open it)", ROOMS, ("j",)),
    Command("leave", (Arg("room", ROOM, optional=True),),
            "leave a room (default: the open one)", ROOMS, ("part",)),
    Command("create", (Arg("room", WORD), Arg("invite-only", CHOICE, optional=True,
                                              choices=("invite-only",))),
            "create a room (invite-only: members must be invited)", ROOMS),
    Command("invite", (Arg("user", USER), Arg("room", ROOM, optional=True)),
            "invite USER to a room (default: the open one)", ROOMS),
    Command("kick", (Arg("user", USER), Arg("room", ROOM, optional=True)),
            "remove USER from a room (owners and admins)", ROOMS),
    Command("who", (Arg("room", ROOM, optional=True),),
            "list the members of a room (default: the open one)", ROOMS, ("members",)),
    Command("rooms", (), "list the rooms on the server", ROOMS),
    Command("verify", (Arg("user", USER, optional=True), Arg("device", DEVICE, optional=True)),
            "show the safety number with USER's device; `/verify USER DEVICE yes` after "
            "comparing it in person marks it verified", TRUST),
    Command("trust", (Arg("user", USER, optional=True),),
            "accept USER's changed identity key (after checking with them)", TRUST),
    Command("devices", (Arg("user", USER, optional=True),),
            "list your devices (or USER's) and their trust state", ACCOUNT),
    Command("device-remove", (Arg("device", DEVICE),),
            "remove one of your devices from the account (it is logged out)", ACCOUNT),
    Command("passphrase", (), "change the local passphrase of this device's store", ACCOUNT),
    Command("2fa", (), "set up two-factor authentication (TOTP, with a QR code)", ACCOUNT,
            ("totp",)),
    Command("logout", (), "log this device out (the server forgets its session)", ACCOUNT),
    Command("login", (), "log in again after /logout (asks for the password)", ACCOUNT),
    Command("register", (), "create an account (on a device that has none yet)", ACCOUNT),
)

BY_NAME: dict[str, Command] = {}
for _c in COMMANDS:
    for _n in (_c.name, *_c.aliases):
        BY_NAME[_n] = _c


class CommandError(ValueError):
    """The line is not a valid command; the message says what is wrong and the usage."""


@dataclass(frozen=True, slots=True)
class Invocation:
    command: Command
    args: dict[str, str]  # by Arg.name; absent optional arguments are missing


@dataclass(frozen=True, slots=True)
class Text:
    body: str


def parse(line: str) -> Invocation | Text | None:
    """A typed line -> a command invocation, a message (``Text``) or nothing (blank).

    ``//text`` sends ``/text`` as a message.  Raises `CommandError` for a bad command.
    """
    if not line.strip():
        return None
    if not line.startswith("/"):
        return Text(line)
    if line.startswith("//"):
        return Text(line[1:])
    head, _, rest = line[1:].partition(" ")
    name = head.lower()
    command = BY_NAME.get(name)
    if command is None:
        near = difflib.get_close_matches(name, sorted(BY_NAME), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join('/' + n for n in near)}?)" if near else ""
        raise CommandError(f"no command /{name}{hint}; /help lists them")
    args: dict[str, str] = {}
    remaining = rest.strip()
    for arg in command.args:
        if not remaining:
            if not arg.optional:
                raise CommandError(f"/{command.name} needs {arg.name.upper()}: "
                                   f"{command.usage()}")
            break
        if arg.rest:
            args[arg.name] = remaining
            remaining = ""
            break
        word, _, remaining = remaining.partition(" ")
        remaining = remaining.strip()
        if arg.choices and word.lower() not in arg.choices:
            raise CommandError(f"/{command.name}: {arg.name} is one of "
                               f"{', '.join(arg.choices)}, not {word!r}")
        args[arg.name] = word
    if remaining:
        if command.name == "verify" and remaining.lower() == "yes":
            args["confirm"] = "yes"
        else:
            raise CommandError(f"/{command.name}: too many arguments ({remaining!r}); "
                               f"{command.usage()}")
    return Invocation(command, args)


def parse_duration(text: str) -> int:
    """``30s``, ``10m``, ``1h``, ``7d``, ``90`` (seconds), ``off``/``0`` -> seconds."""
    t = text.strip().lower()
    if t in ("off", "0", "none"):
        return 0
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    mult = 1
    if t and t[-1] in units:
        mult = units[t[-1]]
        t = t[:-1]
    if not t.isdigit():
        raise CommandError(f"a duration like 30s, 10m, 1h or 7d (or off), not {text!r}")
    seconds = int(t) * mult
    if seconds > 365 * 86400:
        raise CommandError("disappearing timers are at most a year")
    return seconds


def format_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


# ----------------------------------------------------------------------- completion

Candidates = Callable[[str], Sequence[str]]  # kind -> names (users, rooms, devices)


@dataclass(frozen=True, slots=True)
class Completion:
    start: int  # where the completed word starts in the line
    options: tuple[str, ...]  # sorted candidates for the word being typed


def completion_options(line: str, cursor: int, candidates: Candidates) -> Completion:
    """What could complete the word before ``cursor``."""
    before = line[:cursor]
    start = before.rfind(" ") + 1
    word = before[start:]
    if not before.startswith("/"):
        # In a message: complete user names (mentions).
        names = candidates(USER)
        return Completion(start, _matching(word.lstrip("@"), names, prefix="@" if
                                           word.startswith("@") else ""))
    words = before.split(" ")
    if len(words) == 1:
        names = sorted({"/" + n for n in BY_NAME})
        return Completion(0, tuple(n for n in names if n.startswith(word.lower())))
    command = BY_NAME.get(words[0][1:].lower())
    if command is None:
        return Completion(start, ())
    index = len(words) - 2
    if index >= len(command.args):
        return Completion(start, ())
    arg = command.args[index]
    if arg.choices:
        pool: Sequence[str] = arg.choices
    elif arg.kind == COMMAND:
        pool = sorted({c.name for c in COMMANDS})
    elif arg.kind in (USER, ROOM, DEVICE):
        pool = candidates(arg.kind)
    else:
        pool = ()
    return Completion(start, _matching(word, pool))


def _matching(word: str, pool: Sequence[str], prefix: str = "") -> tuple[str, ...]:
    w = word.casefold()
    return tuple(prefix + p for p in sorted(set(pool), key=str.casefold)
                 if p.casefold().startswith(w))


class Completer:
    """Tab, Tab, Tab: the first press completes (to the longest common prefix, or the only
    candidate plus a space), further presses cycle through the candidates."""

    def __init__(self, candidates: Candidates) -> None:
        self.candidates = candidates
        self._cycle: tuple[str, int, tuple[str, ...], int, str] | None = None

    def reset(self) -> None:
        self._cycle = None

    def complete(self, line: str, cursor: int) -> tuple[str, int, tuple[str, ...]]:
        """-> (new line, new cursor, the candidates shown)."""
        if self._cycle is not None:
            last_line, start, options, i, tail = self._cycle
            if last_line == line:
                i = (i + 1) % len(options)
                new = line[:start] + options[i] + " " + tail
                self._cycle = (new, start, options, i, tail)
                return new, start + len(options[i]) + 1, options
        self._cycle = None
        comp = completion_options(line, cursor, self.candidates)
        if not comp.options:
            return line, cursor, ()
        tail = line[cursor:].lstrip(" ")
        if len(comp.options) == 1:
            word = comp.options[0]
            if comp.start == 0 and not line.startswith("/") and word.startswith("@"):
                word += ":"
            new = line[:comp.start] + word + " " + tail
            return new, comp.start + len(word) + 1, comp.options
        common = _common_prefix(comp.options)
        typed = line[comp.start:cursor]
        if len(common) > len(typed):
            new = line[:comp.start] + common + line[cursor:]
            return new, comp.start + len(common), comp.options
        # Nothing more in common: start cycling with the first candidate.
        new = line[:comp.start] + comp.options[0] + " " + tail
        self._cycle = (new, comp.start, comp.options, 0, tail)
        return new, comp.start + len(comp.options[0]) + 1, comp.options


def _common_prefix(words: Sequence[str]) -> str:
    first, last = min(words, key=str.casefold), max(words, key=str.casefold)
    n = 0
    while n < min(len(first), len(last)) and first[n].casefold() == last[n].casefold():
        n += 1
    return first[:n]
