"""`ScreenHost`: dialogs as Deferreds on the top `Screen` widget (the `UIHost` the
controller and the set-up flows use).  Only touched on the reactor thread."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import urwid
from twisted.internet.defer import Deferred

from shtalk.clientui.dialogs import Progress, Prompt, Question
from shtalk.clientui.keys import KeyMap
from shtalk.clientui.view import Screen


class ScreenHost:
    def __init__(self, screen: Screen, keymap: KeyMap, *,
                 bell: Callable[[], None] = lambda: None,
                 quit: Callable[[], None] = lambda: None,
                 redraw: Callable[[], None] = lambda: None) -> None:
        self.screen = screen
        self.keymap = keymap
        self._bell = bell
        self._quit = quit
        self._redraw = redraw
        self._waiting: Deferred[Any] | None = None

    # -- UIHost ------------------------------------------------------------------------
    def ask(self, title: str, text: Any, label: str, *, mask: bool = False,
            default: str = "", error: str = "") -> Deferred[str | None]:
        d: Deferred[str | None] = Deferred()

        def done(answer: str | None) -> None:
            self.screen.show(None)
            if not d.called:
                d.callback(answer)

        self.screen.show(Prompt(title, text, label, done, mask=mask, default=default,
                                error=error), height=("relative", 90))
        return d

    def choose(self, title: str, text: Any,
               choices: Sequence[tuple[str, str]]) -> Deferred[str | None]:
        d: Deferred[str | None] = Deferred()

        def done(answer: str | None) -> None:
            self.screen.show(None)
            if not d.called:
                d.callback(answer)

        self.screen.show(Question(title, text, choices, done), height=("relative", 90))
        return d

    def confirm(self, title: str, text: Any) -> Deferred[bool]:
        d = self.choose(title, text, [("y", "yes"), ("n", "no")])
        return d.addCallback(lambda a: a == "y")

    def progress(self, title: str, text: str, expected: float) -> Progress:
        p = Progress(title, text, expected)
        self.screen.show(p, height=10)
        return p

    def message(self, title: str, text: Any) -> Deferred[None]:
        return self.choose(title, text, [("enter", "continue")]).addCallback(lambda _: None)

    def show_help(self) -> None:
        self.screen.show_help(self.keymap)

    def close_overlay(self) -> bool:
        if self.screen.overlay is not None and not isinstance(
                self.screen.overlay, (Prompt, Question, Progress)):
            self.screen.show(None)
            return True
        return False

    def bell(self) -> None:
        self._bell()

    def quit(self) -> None:
        self._quit()

    def redraw(self) -> None:
        self._redraw()

    def show_text(self, title: str, lines: Sequence[Any]) -> None:
        body = urwid.ListBox(urwid.SimpleListWalker([urwid.Text(x) for x in lines]))
        self.screen.show(urwid.AttrMap(urwid.LineBox(body, title=title), "dialog"))
