"""Every key binding of shtalk-urwid, in one table.

The help screen lists this table, the config's ``[keys]`` section overrides it (by name),
and a unit test walks it: each binding's keys, pressed on the main screen, reach the
action of that name.  Key names are urwid's (``"ctrl n"``, ``"meta enter"``, ``"page up"``,
``"f1"``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

GENERAL = "General"
NAVIGATION = "Conversations"
SCROLL = "Scrollback"
INPUT = "Input line"
DIALOGS = "Dialogs"
CATEGORIES = (GENERAL, NAVIGATION, SCROLL, INPUT, DIALOGS)


@dataclass(frozen=True, slots=True)
class KeyBinding:
    name: str
    keys: tuple[str, ...]
    help: str
    category: str


KEY_BINDINGS: tuple[KeyBinding, ...] = (
    KeyBinding("help", ("f1",), "show this help (also /help)", GENERAL),
    KeyBinding("quit", ("f10", "ctrl q"), "quit shtalk-urwid (also /quit); asks first when a "
               "message or a typed line is not sent yet", GENERAL),
    KeyBinding("cancel", ("esc",), "close the help or a pop-up; in a dialog, go back one step; "
               "clear the status message", GENERAL),
    KeyBinding("redraw", ("ctrl l",), "redraw the whole screen", GENERAL),
    KeyBinding("toggle_bell", ("f2",), "turn the terminal bell on or off (also /bell)",
               GENERAL),
    KeyBinding("next_conversation", ("ctrl n", "meta down"), "open the next conversation",
               NAVIGATION),
    KeyBinding("previous_conversation", ("ctrl p", "meta up"),
               "open the previous conversation", NAVIGATION),
    KeyBinding("next_unread", ("meta a",), "jump to the next conversation with unread messages",
               NAVIGATION),
    KeyBinding("close_conversation", ("meta w",), "close the open conversation (also /close)",
               NAVIGATION),
    KeyBinding("scroll_up", ("page up",), "scroll the messages up one page", SCROLL),
    KeyBinding("scroll_down", ("page down",), "scroll the messages down one page", SCROLL),
    KeyBinding("scroll_top", ("home",), "go to the oldest loaded message (older pages load "
               "as you reach them)", SCROLL),
    KeyBinding("scroll_bottom", ("end",), "go to the newest message", SCROLL),
    KeyBinding("send", ("enter",), "send the message or run the /command", INPUT),
    KeyBinding("newline", ("meta enter",), "insert a line break (multi-line message)", INPUT),
    KeyBinding("complete", ("tab",), "complete a command, user or room name (again: next "
               "candidate)", INPUT),
    KeyBinding("history_previous", ("up",), "previous line you typed (on the first line)",
               INPUT),
    KeyBinding("history_next", ("down",), "next line you typed (on the last line)", INPUT),
    KeyBinding("line_start", ("ctrl a",), "cursor to the start of the line", INPUT),
    KeyBinding("line_end", ("ctrl e",), "cursor to the end of the line", INPUT),
    KeyBinding("clear_input", ("ctrl u",), "clear the input line", INPUT),
    KeyBinding("captcha_new", ("f5",), "in the CAPTCHA dialog: draw a new one (it costs no "
               "registration attempt)", DIALOGS),
    KeyBinding("captcha_words", ("f6",), "in the CAPTCHA dialog: a question in words instead "
               "of the picture (for screen readers)", DIALOGS),
)

BY_NAME: dict[str, KeyBinding] = {b.name: b for b in KEY_BINDINGS}


class KeyConfigError(ValueError):
    """The [keys] section names an unknown action or gives two actions one key."""


def parse_keys(value: str) -> tuple[str, ...]:
    """``"ctrl n, meta down"`` -> ``("ctrl n", "meta down")`` (comma-separated)."""
    keys = tuple(" ".join(k.split()).lower() for k in value.split(","))
    return tuple(k for k in keys if k)


class KeyMap:
    """The table with the config's overrides applied; maps a pressed key to an action."""

    def __init__(self, overrides: Mapping[str, Iterable[str]] | None = None) -> None:
        self.keys: dict[str, tuple[str, ...]] = {b.name: b.keys for b in KEY_BINDINGS}
        for name, keys in (overrides or {}).items():
            if name not in BY_NAME:
                known = ", ".join(sorted(BY_NAME))
                raise KeyConfigError(f"[keys] {name}: no such action (known: {known})")
            self.keys[name] = tuple(keys)
        self._action: dict[str, str] = {}
        for name, keys in self.keys.items():
            for key in keys:
                other = self._action.get(key)
                if other is not None:
                    raise KeyConfigError(f"[keys] the key {key!r} is bound to both "
                                         f"{other} and {name}")
                self._action[key] = name

    def action(self, key: str) -> str | None:
        return self._action.get(key)

    def keys_for(self, name: str) -> tuple[str, ...]:
        return self.keys[name]

    def describe(self, name: str) -> str:
        return ", ".join(pretty_key(k) for k in self.keys[name]) or "(unbound)"


def pretty_key(key: str) -> str:
    """``"ctrl n"`` -> ``"Ctrl-N"``, ``"meta enter"`` -> ``"Alt-Enter"``."""
    names = {"page up": "PgUp", "page down": "PgDn", "esc": "Esc", "enter": "Enter",
             "tab": "Tab", "home": "Home", "end": "End", "up": "Up", "down": "Down"}
    if key in names:
        return names[key]
    parts = key.split()
    out = []
    for p in parts:
        if p == "ctrl":
            out.append("Ctrl")
        elif p == "meta":
            out.append("Alt")
        elif p == "shift":
            out.append("Shift")
        elif p.startswith("f") and p[1:].isdigit():
            out.append(p.upper())
        else:
            out.append(names.get(p, p.upper() if len(p) == 1 else p.capitalize()))
    return "-".join(out)
