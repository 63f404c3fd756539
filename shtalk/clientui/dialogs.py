"""Dialogs for the set-up and account steps: a question with a typed answer, a yes/no
question, a progress indicator.  Each takes a callback; `shtalk.clientui.screen` turns
them into Deferreds."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import urwid


@dataclass(frozen=True)
class Pressed:
    """A prompt's answer when one of its action keys was pressed instead of Enter."""

    action: str


def _body(text: Any) -> list[urwid.Widget]:
    if isinstance(text, urwid.Widget):
        return [text]
    if isinstance(text, (list, tuple)) and text and all(isinstance(t, urwid.Widget)
                                                         for t in text):
        return list(text)
    return [urwid.Text(text)]


class Dialog(urwid.WidgetWrap[urwid.Widget]):
    def __init__(self, title: str, widgets: Sequence[urwid.Widget]) -> None:
        self.title = title
        # A list box, not a filler: a tall body (a QR code, a CAPTCHA) on a small
        # terminal scrolls instead of hiding the answer field.
        items: list[Any] = list(widgets)
        self.body = urwid.ListBox(urwid.SimpleFocusListWalker(items))
        box = urwid.LineBox(urwid.Padding(self.body, left=1, right=1), title=title,
                            title_attr="dialog_title")
        super().__init__(urwid.AttrMap(box, "dialog"))


class Prompt(Dialog):
    """Explanation, then one field. Enter answers, Esc goes back (answer None); a key of
    ``actions`` (urwid key -> action name) answers `Pressed` (e.g. F5: a new CAPTCHA)."""

    def __init__(self, title: str, text: Any, label: str,
                 on_done: Callable[[str | Pressed | None], None], *, mask: bool = False,
                 default: str = "", error: str = "", actions: Mapping[str, str] | None = None,
                 footer: str = "Enter: OK    Esc: back", compact: bool = False) -> None:
        self.on_done = on_done
        self.actions = dict(actions or {})
        self.edit = urwid.Edit(("prompt", label + " "), default, mask="*" if mask else None)
        self.error = urwid.Text(("error", error))
        gap: list[urwid.Widget] = [] if compact else [urwid.Divider()]
        widgets = [*_body(text), *gap, self.error, self.edit, *gap,
                   urwid.Text(("info", footer))]
        if compact and not error:
            widgets.remove(self.error)  # (a tall CAPTCHA at 80x24 needs every row)
        super().__init__(title, widgets)
        self.body.focus_position = widgets.index(self.edit)

    def keypress(self, size: tuple[int, ...], key: str) -> str | None:
        if key == "enter":
            self.on_done(self.edit.edit_text)
            return None
        if key == "esc":
            self.on_done(None)
            return None
        if key in self.actions:
            self.on_done(Pressed(self.actions[key]))
            return None
        if key == "ctrl u":  # as on the input line: clear the field
            self.edit.set_edit_text("")
            return None
        result: str | None = super().keypress(size, key)
        return result


class Question(Dialog):
    """A choice answered by one key (e.g. y/n, or r/l for register/log in)."""

    def __init__(self, title: str, text: Any, choices: Sequence[tuple[str, str]],
                 on_done: Callable[[str | None], None], *, compact: bool = False) -> None:
        self.on_done = on_done
        self.choices = {k.lower(): k for k, _ in choices}
        hint = "    ".join(f"[{k}] {label}" for k, label in choices)
        rows: list[urwid.Widget]
        if compact:  # one row under the body (a QR code at 80x24 needs the others)
            rows = [urwid.Text([("prompt", hint), ("info", "    Esc: back")])]
        else:
            rows = [urwid.Divider(), urwid.Text(("prompt", hint)),
                    urwid.Text(("info", "Esc: back"))]
        super().__init__(title, [*_body(text), *rows])

    def selectable(self) -> bool:
        return True

    def keypress(self, size: tuple[int, ...], key: str) -> str | None:
        if key.lower() in self.choices:
            self.on_done(self.choices[key.lower()])
            return None
        if key == "esc":
            self.on_done(None)
            return None
        return None if len(key) == 1 else key


class Progress(Dialog):
    """Work in a thread (Argon2): a bar that advances on an estimate, and a spinner."""

    SPIN = "|/-\\"

    def __init__(self, title: str, text: str, expected: float) -> None:
        self.expected = max(expected, 0.05)
        self.bar = urwid.ProgressBar("progress_todo", "progress_done", 0, 100)
        self.label = urwid.Text("", align="center")
        self.ticks = 0
        super().__init__(title, [urwid.Text(text), urwid.Divider(), self.bar, self.label])

    def selectable(self) -> bool:
        return True

    def keypress(self, size: tuple[int, ...], key: str) -> str | None:
        return None

    def tick(self, elapsed: float) -> None:
        """Advance towards 95% by the estimate; never reaches 100% before done()."""
        self.ticks += 1
        fraction = min(0.95, elapsed / self.expected)
        self.bar.set_completion(int(fraction * 100))
        self.label.set_text(f"{self.SPIN[self.ticks % 4]} {elapsed:.1f} s")

    def done(self) -> None:
        self.bar.set_completion(100)
