"""Dialogs for the set-up and account steps: a question with a typed answer, a yes/no
question, a progress indicator.  Each takes a callback; `shtalk.clientui.screen` turns
them into Deferreds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import urwid


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
    """Explanation, then one field. Enter answers, Esc cancels (answer None)."""

    def __init__(self, title: str, text: Any, label: str, on_done: Callable[[str | None], None],
                 *, mask: bool = False, default: str = "", error: str = "") -> None:
        self.on_done = on_done
        self.edit = urwid.Edit(("prompt", label + " "), default, mask="*" if mask else None)
        self.error = urwid.Text(("error", error))
        widgets = [*_body(text), urwid.Divider(), self.error, self.edit, urwid.Divider(),
                   urwid.Text(("info", "Enter: OK    Esc: cancel"))]
        super().__init__(title, widgets)
        self.body.focus_position = widgets.index(self.edit)

    def keypress(self, size: tuple[int, ...], key: str) -> str | None:
        if key == "enter":
            self.on_done(self.edit.edit_text)
            return None
        if key == "esc":
            self.on_done(None)
            return None
        result: str | None = super().keypress(size, key)
        return result


class Question(Dialog):
    """A choice answered by one key (e.g. y/n, or r/l for register/log in)."""

    def __init__(self, title: str, text: Any, choices: Sequence[tuple[str, str]],
                 on_done: Callable[[str | None], None]) -> None:
        self.on_done = on_done
        self.choices = {k.lower(): k for k, _ in choices}
        hint = "    ".join(f"[{k}] {label}" for k, label in choices)
        super().__init__(title, [*_body(text), urwid.Divider(),
                                 urwid.Text(("prompt", hint)),
                                 urwid.Text(("info", "Esc: cancel"))])

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
