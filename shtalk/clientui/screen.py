"""`ScreenHost`: dialogs as Deferreds on the top `Screen` widget (the `UIHost` the
controller and the set-up flows use).  Only touched on the reactor thread.

A dialog opened over another (the quit confirmation over a set-up question, say) puts
the one below back when it closes, so nothing the person was answering is lost."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import urwid
from twisted.internet.defer import Deferred

from shtalk.clientui.dialogs import Pressed, Progress, Prompt, Question
from shtalk.clientui.keys import KeyMap
from shtalk.clientui.view import Screen
from shtalk.clientui.widgets import text_popup

DIALOG_SIZE: dict[str, Any] = {"width": ("relative", 90), "height": ("relative", 90)}
FULL_SIZE: dict[str, Any] = {"width": ("relative", 100), "height": ("relative", 100)}


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

    def _dialog(self, make: Callable[[Callable[[Any], None]], urwid.Widget],
                size: dict[str, Any]) -> Deferred[Any]:
        """Show ``make(done)`` on top; ``done(answer)`` closes it (showing again what was
        below, if it is still on top) and fires the Deferred with the answer."""
        d: Deferred[Any] = Deferred()
        below, below_size = self.screen.overlay, self.screen.overlay_size
        widget: list[urwid.Widget] = []

        def done(answer: Any) -> None:
            if widget and self.screen.overlay is widget[0]:
                self.screen.show(below, width=below_size[0], height=below_size[1])
            if not d.called:
                d.callback(answer)

        widget.append(make(done))
        self.screen.show(widget[0], **size)
        return d

    # -- UIHost ------------------------------------------------------------------------
    def ask(self, title: str, text: Any, label: str, *, mask: bool = False,
            default: str = "", error: str = "") -> Deferred[str | None]:
        d = self.ask_actions(title, text, label, mask=mask, default=default, error=error)
        return d.addCallback(lambda a: None if isinstance(a, Pressed) else a)

    def ask_actions(self, title: str, text: Any, label: str, *, mask: bool = False,
                    default: str = "", error: str = "", actions: Sequence[str] = (),
                    footer: str = "Enter: OK    Esc: back", full: bool = False
                    ) -> Deferred[str | Pressed | None]:
        """A prompt whose answer may also be `Pressed(action)` for a key of one of the
        key table's ``actions``; ``full`` uses the whole terminal (a CAPTCHA at 80x24)."""
        keys = {k: name for name in actions for k in self.keymap.keys_for(name)}
        return self._dialog(
            lambda done: Prompt(title, text, label, done, mask=mask, default=default,
                                error=error, actions=keys, footer=footer, compact=full),
            FULL_SIZE if full else DIALOG_SIZE)

    def choose(self, title: str, text: Any, choices: Sequence[tuple[str, str]], *,
               full: bool = False) -> Deferred[str | None]:
        return self._dialog(lambda done: Question(title, text, choices, done, compact=full),
                            FULL_SIZE if full else DIALOG_SIZE)

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
        """A pop-up of text lines (command output); Esc closes it, PgUp/PgDn scroll."""
        self.screen.show(text_popup(title, lines))
