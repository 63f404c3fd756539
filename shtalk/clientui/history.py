"""The message pane: a ListWalker over a `HistoryWindow` that builds only visible widgets.

urwid's ListBox asks the walker for the focus and its neighbours until the screen is
full, so a conversation with 10,000 messages still builds about one screen of widgets.
Widgets are cached by (line id, version, timer text) in a small LRU so scrolling and
redraws reuse them.  Reaching the top row asks the window for an older page; the bottom
row (when the window was scrolled far back) for a newer one.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import urwid

from shtalk.clientui.commands import format_duration
from shtalk.clientui.model import HistoryWindow, Line

CACHE = 256
TOP, BOTTOM = "top", "bottom"


def _now() -> float:
    return time.time()


class LineRenderer:
    """Line -> markup (no urwid state): shared by the pane, the search results, tests."""

    def __init__(self, timestamp_format: str = "%H:%M", clock: Callable[[], float] = _now) -> None:
        self.timestamp_format = timestamp_format
        self.clock = clock

    def timer_text(self, line: Line) -> str:
        if line.expires_at is None:
            return ""
        return format_duration(line.expires_at - self.clock())

    def markup(self, line: Line) -> list[Any]:
        stamp = time.strftime(self.timestamp_format, time.localtime(line.ts / 1000)) \
            if line.ts else " " * len(time.strftime(self.timestamp_format))
        out: list[Any] = [("time", stamp + " ")]
        if line.state in ("info", "error"):
            out.append(("error" if line.state == "error" else "info", "-- " + line.body))
            return out
        out.append(("me" if line.mine else "sender", line.sender))
        if line.verified:
            out.append(("verified", "\u2713"))
        out.append(("body", ": "))
        out.append(("mention" if line.mention else "body", line.body))
        if line.mine:
            if line.state == "sending":
                out.append(("state_sending", "  (sending)"))
            elif line.state == "sent":
                out.append(("state_ok", " \u2713"))
            elif line.state == "failed":
                out.append(("state_failed", "  \u2717 not sent (press Up to retry)"))
        timer = self.timer_text(line)
        if timer:
            out.append(("timer", f"  \u23f1{timer}"))
        return out


class HistoryWalker(urwid.ListWalker[int | str, urwid.Text]):
    def __init__(self, window: HistoryWindow, renderer: LineRenderer,
                 defer_call: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self.window = window
        self.renderer = renderer
        self.defer_call = defer_call or (lambda f: f())
        self.focus: int | str | None = window.last if window.items else None
        self._last = window.last
        self._first = window.first
        self._cache: OrderedDict[tuple[str, int, str], urwid.Text] = OrderedDict()
        self.built = 0  # widgets made (for tests and the benchmark)
        self._listener = self._window_changed
        window.listeners.append(self._listener)

    def detach(self) -> None:
        if self._listener in self.window.listeners:
            self.window.listeners.remove(self._listener)

    # -- following the window ----------------------------------------------------------
    @property
    def at_bottom(self) -> bool:
        return self.focus is None or (isinstance(self.focus, int) and self.focus >= self._last)

    def _window_changed(self) -> None:
        w = self.window
        if not w.items:
            self.focus = None
        elif self.focus is None or self.focus == BOTTOM or (
                isinstance(self.focus, int) and self.focus >= self._last and not w.has_newer):
            self.focus = w.last
        elif self.focus == TOP:
            # An older page arrived while the header had the focus: focus its newest line,
            # where the header was, so the screen does not jump.
            self.focus = max(w.first, self._first - 1) if w.first < self._first else w.first
        elif isinstance(self.focus, int) and self.focus < w.first:
            self.focus = w.first
        elif isinstance(self.focus, int) and self.focus > w.last:
            self.focus = w.last
        self._last = w.last
        self._first = w.first
        self._modified()

    # -- widgets -----------------------------------------------------------------------
    def widget(self, line: Line) -> urwid.Text:
        key = (line.id, line.version, self.renderer.timer_text(line))
        w = self._cache.get(key)
        if w is None:
            w = urwid.Text(self.renderer.markup(line))
            self.built += 1
            self._cache[key] = w
            if len(self._cache) > CACHE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return w

    def _edge(self, which: str) -> urwid.Text:
        w = self.window
        if which == TOP:
            text = "\u2191 loading older messages\u2026" if w.loading else \
                "\u2191 older messages (scroll up to load)"
        else:
            text = "\u2193 newer messages (scroll down, or End for the newest)"
        return urwid.Text(("info", text), align="center")

    def _at(self, position: int | str | None) -> urwid.Text | None:
        if position is None:
            return None
        if position == TOP:
            return self._edge(TOP) if self.window.has_older else None
        if position == BOTTOM:
            return self._edge(BOTTOM) if self.window.has_newer else None
        assert isinstance(position, int)
        line = self.window.at(position)
        return self.widget(line) if line is not None else None

    # -- ListWalker API ----------------------------------------------------------------
    def get_focus(self) -> tuple[urwid.Text, int | str] | tuple[None, None]:
        w = self._at(self.focus)
        if w is None and self.window.items:
            self.focus = self.window.last
            w = self._at(self.focus)
        if w is None or self.focus is None:
            return None, None
        return w, self.focus

    def set_focus(self, position: int | str) -> None:
        self.focus = position
        if position == TOP:
            self.defer_call(self.window.load_older)
        elif position == BOTTOM:
            self.defer_call(self.window.load_newer)
        self._modified()

    def get_next(self, position: int | str) -> tuple[urwid.Text, int | str] | tuple[None, None]:
        w = self.window
        if position == TOP:
            nxt: int | str | None = w.first if w.items else None
        elif position == BOTTOM:
            nxt = None
        else:
            assert isinstance(position, int)
            nxt = position + 1 if position < w.last else BOTTOM
            if nxt == BOTTOM and w.has_newer:
                self.defer_call(w.load_newer)
        widget = self._at(nxt)
        if widget is None or nxt is None:
            return None, None
        return widget, nxt

    def get_prev(self, position: int | str) -> tuple[urwid.Text, int | str] | tuple[None, None]:
        w = self.window
        if position == BOTTOM:
            prv: int | str | None = w.last if w.items else None
        elif position == TOP:
            prv = None
        else:
            assert isinstance(position, int)
            prv = position - 1 if position > w.first else TOP
            if prv == TOP and w.has_older and not w.loading:
                # The top of the window is on screen: fetch the page before it.
                self.defer_call(w.load_older)
        widget = self._at(prv)
        if widget is None or prv is None:
            return None, None
        return widget, prv

    def go_top(self) -> None:
        self.focus = TOP if self.window.has_older else self.window.first
        if self.window.has_older:
            self.defer_call(self.window.load_older)
        self._modified()

    def go_bottom(self) -> None:
        if self.window.has_newer:
            self.defer_call(self.window.load_latest)
            self.focus = BOTTOM
        else:
            self.focus = self.window.last if self.window.items else None
        self._modified()


def _box(size: tuple[int, ...]) -> tuple[int, int]:
    return size[0], size[1]


class MessagePane(urwid.ListBox[int | str]):
    """The scrollback: PgUp/PgDn/Home/End come as actions; the mouse wheel scrolls."""

    def __init__(self, walker: HistoryWalker) -> None:
        super().__init__(walker)
        self.walker = walker

    def set_walker(self, walker: HistoryWalker) -> None:
        self.walker.detach()
        self.walker = walker
        self.body = walker

    def scroll(self, size: tuple[int, ...], action: str) -> None:
        if action == "scroll_up":
            self.keypress(_box(size), "page up")
        elif action == "scroll_down":
            self.keypress(_box(size), "page down")
        elif action == "scroll_top":
            self.walker.go_top()
            self.set_focus_valign("top")
        elif action == "scroll_bottom":
            self.walker.go_bottom()
            self.set_focus_valign("bottom")

    def mouse_event(self, size: tuple[int, ...], event: str, button: int, col: int, row: int,
                    focus: bool) -> bool:
        if event == "mouse press" and button in (4, 5):
            for _ in range(3):
                self.keypress(_box(size), "up" if button == 4 else "down")
            return True
        return bool(super().mouse_event(_box(size), event, button, col, row, focus))
