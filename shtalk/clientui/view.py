"""The main screen and its overlays (help, dialogs).

The view reads the `ChatModel` and reports what the person did through a narrow
interface (`ViewCallbacks`): an action name from the key table, a submitted line, a
completion request.  It never talks to the client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import urwid

from shtalk.clientui.commands import Completer
from shtalk.clientui.history import HistoryWalker, LineRenderer, MessagePane
from shtalk.clientui.keys import KeyMap
from shtalk.clientui.model import ChatModel
from shtalk.clientui.widgets import (
    SCROLL_KEYS,
    ConversationList,
    HelpView,
    InputLine,
    Popup,
    StatusBar,
    options_markup,
    status_markup,
)

INPUT_ACTIONS = frozenset({"newline", "history_previous", "history_next", "line_start",
                           "line_end", "clear_input"})
SCROLL_ACTIONS = frozenset({"scroll_up", "scroll_down", "scroll_top", "scroll_bottom"})


@dataclass
class ViewCallbacks:
    action: Callable[[str], None]  # a key-table action the view does not handle itself
    submit: Callable[[str], None]  # Enter on the input line
    candidates: Callable[[str], Sequence[str]]  # "user" | "room" | "device" -> names
    trust: Callable[[str], str]  # user -> "verified" | "unverified" | "changed" | ""
    members: Callable[[str], int | None]  # room -> member count if known


class ChatView(urwid.WidgetWrap[urwid.Widget]):
    def __init__(self, model: ChatModel, keymap: KeyMap, callbacks: ViewCallbacks,
                 renderer: LineRenderer | None = None, list_width: int = 20,
                 defer_call: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        self.model = model
        self.keymap = keymap
        self.cb = callbacks
        self.renderer = renderer or LineRenderer()
        self.defer_call = defer_call
        self.list_width = list_width
        self.header = urwid.Text("", wrap="ellipsis")
        self.conversations = ConversationList(model, callbacks.trust, self._clicked)
        self.pane = MessagePane(self._walker())
        self.status = StatusBar()
        self.input = InputLine()
        self.completer = Completer(callbacks.candidates)
        self.hint = urwid.Text("", wrap="ellipsis")
        self.columns = urwid.Columns([
            (list_width, self.conversations),
            (1, urwid.AttrMap(urwid.SolidFill("\u2502"), "conv")),
            self.pane,
        ])
        self.footer = urwid.Pile([self.status, urwid.AttrMap(self.input, "input")])
        self.frame = urwid.Frame(self.columns, header=urwid.AttrMap(self.header, "header"),
                                 footer=self.footer, focus_part="footer")
        self.footer.focus_position = 1
        super().__init__(self.frame)
        self._narrow = False
        model.listeners.append(self._model_changed)
        self.refresh()

    # -- model -> screen ---------------------------------------------------------------
    def _walker(self) -> HistoryWalker:
        return HistoryWalker(self.model.current_conversation.window, self.renderer,
                             self.defer_call)

    def _clicked(self, key: str) -> None:
        self.model.open(key)

    def _model_changed(self, what: str) -> None:
        if what == "current":
            self.pane.set_walker(self._walker())
            self.completer.reset()
        if what in ("list", "current"):
            self.conversations.refresh()
        self.refresh_status()

    def refresh(self) -> None:
        self.conversations.refresh()
        self.refresh_status()

    def refresh_status(self) -> None:
        conv = self.model.current_conversation
        trust = self.cb.trust(conv.name) if conv.kind == "user" else ""
        members = self.cb.members(conv.name) if conv.kind == "room" else None
        s = self.model.status
        where = f"{s.account}@{s.server}" if s.account else s.server
        self.header.set_text(f" shtalk \u00b7 {conv.title} \u00b7 {where}   F1 help")
        self.status.update(status_markup(self.model, trust, members))

    def set_hint(self, text: str) -> None:
        self.hint.set_text(("info", text))
        if text and len(self.footer.contents) == 2:
            self.footer.contents.insert(0, (self.hint, self.footer.options()))
            self.footer.focus_position = 2
        elif not text and len(self.footer.contents) == 3:
            del self.footer.contents[0]
            self.footer.focus_position = 1

    # -- size --------------------------------------------------------------------------
    def render(self, size: tuple[int, ...], focus: bool = False) -> urwid.Canvas:
        cols = size[0]
        narrow = cols < 60
        if narrow != self._narrow:
            # Below 60 columns the list gives its room to the messages (Alt-Up/Down still
            # switch; the header names the open conversation).
            self._narrow = narrow
            width = 0 if narrow else self.list_width
            contents: Any = self.columns.contents
            contents[0] = (self.conversations, self.columns.options("given", width))
            contents[1] = (contents[1][0], self.columns.options("given", 0 if narrow else 1))
        return super().render(size, focus)

    def pane_size(self, size: tuple[int, ...]) -> tuple[int, int]:
        cols, rows = size
        list_cols = 0 if cols < 60 else self.list_width + 1
        footer_rows = self.footer.rows((cols,), True)
        return max(1, cols - list_cols), max(1, rows - footer_rows - 1)

    # -- keys --------------------------------------------------------------------------
    def keypress(self, size: tuple[int, ...], key: str) -> str | None:
        action = self.keymap.action(key)
        if action != "complete":
            self.completer.reset()
            if self.hint.text:
                self.set_hint("")
        if action is None:
            result: str | None = super().keypress(size, key)
            return result
        if action in INPUT_ACTIONS:
            self.input.action((size[0],), action)
        elif action in SCROLL_ACTIONS:
            self.pane.scroll(self.pane_size(size), action)
        elif action == "complete":
            line, cursor, options = self.completer.complete(self.input.edit_text,
                                                             self.input.edit_pos)
            self.input.set_text_and_cursor(line, cursor)
            self.set_hint(options_markup(options) if len(options) > 1 else "")
        elif action == "send":
            text = self.input.take()
            self.cb.submit(text)
        else:
            self.cb.action(action)
        return None

    def mouse_event(self, size: tuple[int, ...], event: str, button: int, col: int, row: int,
                    focus: bool) -> bool:
        return bool(super().mouse_event(size, event, button, col, row, focus))


class Screen(urwid.WidgetPlaceholder[urwid.Widget]):
    """The top widget: a background (the chat, or a plain fill before it exists) with at
    most one overlay (help or a dialog) on top."""

    def __init__(self, background: urwid.Widget | None = None,
                 keymap: KeyMap | None = None) -> None:
        self.background = background or urwid.AttrMap(urwid.SolidFill(" "), "dialog")
        self.overlay: urwid.Widget | None = None
        self.keymap = keymap or KeyMap()
        self._overlay_size: tuple[Any, Any] = (("relative", 90), ("relative", 80))
        #: called whenever what is shown changes (the app redraws on its next tick)
        self.changed: Callable[[], None] = lambda: None
        super().__init__(self.background)

    def keypress(self, size: tuple[int, ...], key: str) -> str | None:
        overlay = self.overlay
        if isinstance(overlay, Popup):
            action = self.keymap.action(key)
            if key in ("esc", "q") or action in ("help", "cancel", "quit"):
                self.show(None)
                return key if action == "quit" else None
            if overlay.passthrough and key not in SCROLL_KEYS:
                self.show(None)  # typing goes on in the chat
        result: str | None = super().keypress(size, key)
        return result

    @property
    def overlay_size(self) -> tuple[Any, Any]:
        return self._overlay_size

    def set_background(self, widget: urwid.Widget) -> None:
        self.background = widget
        self._show()

    def show(self, widget: urwid.Widget | None, *, width: Any = ("relative", 90),
             height: Any = ("relative", 80)) -> None:
        self.overlay = widget
        self._overlay_size = (width, height)
        self._show()

    def _show(self) -> None:
        self.changed()
        if self.overlay is None:
            self.original_widget = self.background
        else:
            width, height = self._overlay_size
            self.original_widget = urwid.Overlay(
                self.overlay, self.background, align="center", width=width,
                valign="middle", height=height, min_width=20, min_height=5)

    def show_help(self, keymap: KeyMap) -> None:
        self.show(HelpView(keymap), width=("relative", 96), height=("relative", 96))

    @property
    def showing_help(self) -> bool:
        return isinstance(self.overlay, HelpView)
