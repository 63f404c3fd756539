"""Small widgets: the conversation list, the input line, the status bar, the help screen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import urwid

from shtalk.clientui.commands import COMMANDS, format_duration
from shtalk.clientui.keys import CATEGORIES, KEY_BINDINGS, KeyMap
from shtalk.clientui.model import ChatModel, Conversation

TRUST_MARK = {"verified": ("verified", "\u2713"), "unverified": ("unverified", "?"),
              "changed": ("changed", "!")}
# Presence before a direct conversation's name: filled online, hollow offline, nothing
# while unknown (the server tells changes, and /who the state of a room's members).
PRESENCE_MARK = {"online": ("online", "\u25cf "), "offline": ("offline", "\u25cb ")}


class ConversationRow(urwid.Text):
    """One entry of the list; a click opens it.  Too long a name is shortened, not the
    marks after it (trust, the unread count, the timer)."""

    def __init__(self, markup: Any, key: str, on_click: Callable[[str], None],
                 title: str = "") -> None:
        super().__init__(markup, wrap="clip")
        self.markup = markup
        self.title = title
        self.key = key
        self.on_click = on_click

    def render(self, size: tuple[()] | tuple[int] | tuple[int, int],
               focus: bool = False) -> urwid.TextCanvas:
        width = size[0] if size else 0
        parts = [p if isinstance(p, tuple) else (None, p) for p in self.markup]
        over = sum(len(t) for _, t in parts) - width
        if over > 0 and self.title:
            fitted: list[Any] = []
            for attr, t in parts:
                if t == self.title and len(t) > over + 1:
                    t = t[: len(t) - over - 1] + "\u2026"
                fitted.append((attr, t) if attr is not None else t)
            self.set_text(fitted)
        else:
            self.set_text(self.markup)
        return super().render(size[:1], focus)  # type: ignore[arg-type]

    def selectable(self) -> bool:
        return False

    def mouse_event(self, size: tuple[int, ...], event: str, button: int, col: int, row: int,
                    focus: bool) -> bool:
        if event == "mouse press" and button == 1:
            self.on_click(self.key)
            return True
        return False


def conversation_markup(conv: Conversation, current: bool, trust: str,
                        presence: str = "") -> list[Any]:
    base = "conv_focus" if current else (
        "conv_mention" if conv.mentions else "conv_unread" if conv.unread else "conv")
    out: list[Any] = []
    if conv.kind == "user" and presence in PRESENCE_MARK:
        attr, mark = PRESENCE_MARK[presence]
        out.append((attr if not current else base, mark))
    out.append((base, conv.title))
    if trust in TRUST_MARK and conv.kind == "user":
        attr, mark = TRUST_MARK[trust]
        out.append((attr if not current else base, mark))
    if conv.unread:
        out.append((base, f" ({conv.unread})"))
    if conv.timer:
        out.append(("timer" if not current else base, " \u23f1"))
    return out


class ConversationList(urwid.WidgetWrap[urwid.Widget]):
    def __init__(self, model: ChatModel, trust: Callable[[str], str],
                 on_click: Callable[[str], None]) -> None:
        self.model = model
        self.trust = trust
        self.on_click = on_click
        self.walker: Any = urwid.SimpleListWalker([])
        self.listbox = urwid.ListBox(self.walker)
        super().__init__(urwid.AttrMap(self.listbox, "conv"))
        self.refresh()

    def refresh(self) -> None:
        rows = []
        for key in self.model.order:
            conv = self.model.conversations[key]
            trust = self.trust(conv.name) if conv.kind == "user" else ""
            presence = self.model.presence.get(conv.name, "") if conv.kind == "user" else ""
            rows.append(ConversationRow(
                conversation_markup(conv, key == self.model.current, trust, presence), key,
                self.on_click, conv.title))
        self.walker[:] = rows
        if rows and self.model.current in self.model.order:
            self.listbox.set_focus(self.model.order.index(self.model.current))


class InputLine(urwid.Edit):
    """The input line: history (Up/Down), multi-line (Alt-Enter), completion (Tab)."""

    def __init__(self) -> None:
        super().__init__(("prompt", "> "), multiline=True)
        self.history: list[str] = []
        self.history_index: int | None = None
        self._draft = ""

    def set_text_and_cursor(self, text: str, cursor: int | None = None) -> None:
        self.set_edit_text(text)
        self.set_edit_pos(len(text) if cursor is None else cursor)

    def take(self) -> str:
        text: str = self.edit_text
        if text.strip():
            if not self.history or self.history[-1] != text:
                self.history.append(text)
            del self.history[:-500]
        self.history_index = None
        self.set_text_and_cursor("")
        return text

    def on_first_line(self) -> bool:
        return "\n" not in self.edit_text[: self.edit_pos]

    def on_last_line(self) -> bool:
        return "\n" not in self.edit_text[self.edit_pos:]

    def history_step(self, delta: int) -> bool:
        if not self.history:
            return False
        if self.history_index is None:
            if delta > 0:
                return False
            self._draft = self.edit_text
            self.history_index = len(self.history)
        i = self.history_index + delta
        if i < 0:
            return False
        if i >= len(self.history):
            self.history_index = None
            self.set_text_and_cursor(self._draft)
            return True
        self.history_index = i
        self.set_text_and_cursor(self.history[i])
        return True

    def action(self, size: tuple[int, ...], name: str) -> bool:
        """Input-line actions from the key table; True if handled here."""
        if name == "newline":
            self.insert_text("\n")
        elif name == "history_previous":
            if not self.on_first_line():
                super().keypress((size[0],), "up")
            else:
                self.history_step(-1)
        elif name == "history_next":
            if not self.on_last_line():
                super().keypress((size[0],), "down")
            else:
                self.history_step(+1)
        elif name == "line_start":
            start = self.edit_text.rfind("\n", 0, self.edit_pos) + 1
            self.set_edit_pos(start)
        elif name == "line_end":
            end = self.edit_text.find("\n", self.edit_pos)
            self.set_edit_pos(len(self.edit_text) if end < 0 else end)
        elif name == "clear_input":
            self.set_text_and_cursor("")
        else:
            return False
        return True


def shorten_markup(markup: list[Any], width: int) -> list[Any]:
    """``markup`` (strings and ``(attribute, string)`` pairs) cut to ``width`` columns at a
    word boundary, ending in an ellipsis, when it is too long."""
    parts = [p if isinstance(p, tuple) else (None, p) for p in markup]
    text = "".join(t for _, t in parts)
    if len(text) <= width:
        return markup
    room = max(0, width - 1)  # the ellipsis takes one column
    cut = text.rfind(" ", 0, room + 1)
    if cut < room // 2:
        cut = room  # no word boundary near the end: cut inside the word
    out: list[Any] = []
    used = 0
    for attr, t in parts:
        if used >= cut:
            break
        piece = t[: cut - used]
        used += len(t)
        out.append((attr, piece) if attr is not None else piece)
    if out:
        last = out[-1]
        out[-1] = (last[0], last[1].rstrip()) if isinstance(last, tuple) else last.rstrip()
    out.append("\u2026")
    return out


class StatusBar(urwid.WidgetWrap[urwid.Widget]):
    """One line; a long text ends at a word boundary with an ellipsis."""

    def __init__(self) -> None:
        self.text = urwid.Text("", wrap="clip")
        self.markup: list[Any] = []
        super().__init__(urwid.AttrMap(self.text, "status"))

    def update(self, markup: list[Any]) -> None:
        self.markup = markup
        self.text.set_text(markup or "")

    def render(self, size: tuple[int, ...], focus: bool = False) -> urwid.Canvas:
        self.text.set_text(shorten_markup(self.markup, size[0]) or "")
        return super().render(size, focus)


def help_widgets(keymap: KeyMap) -> list[Any]:
    """Every key (from the key table, as configured) and every command."""
    out: list[Any] = [
        urwid.Text(("dialog_title", " shtalk-urwid help "), align="center"),
        urwid.Text(("info", "Esc or F1 closes this screen; PgUp/PgDn scroll it.")),
        urwid.Divider(),
    ]
    for category in CATEGORIES:
        out.append(urwid.Text(("help_cat", f"Keys: {category}")))
        for b in KEY_BINDINGS:
            if b.category == category:
                out.append(urwid.Columns([
                    (22, urwid.Text(("help_key", keymap.describe(b.name)))),
                    urwid.Text(b.help)]))
        out.append(urwid.Divider())
    categories: list[str] = []
    for c in COMMANDS:
        if c.category not in categories:
            categories.append(c.category)
    for category in categories:
        out.append(urwid.Text(("help_cat", f"Commands: {category}")))
        for c in COMMANDS:
            if c.category == category:
                alias = f" (also {', '.join('/' + a for a in c.aliases)})" if c.aliases else ""
                out.append(urwid.Text([("help_key", c.usage()), alias]))
                out.append(urwid.Padding(urwid.Text(c.help), left=4))
        out.append(urwid.Divider())
    out.append(urwid.Text("Lines not starting with / are sent to the open conversation; "
                          "//text sends /text. Tab completes commands, user and room names."))
    return out


SCROLL_KEYS = frozenset({"up", "down", "page up", "page down", "home", "end"})


class Popup(urwid.WidgetWrap[urwid.Widget]):
    """Text to read (help, command output) over the chat; Esc closes it, the arrows and
    PgUp/PgDn scroll it.  With ``passthrough`` any other key closes it and goes on to the
    chat, so typing after a command's output just continues."""

    def __init__(self, widgets: list[Any], title: str = "", passthrough: bool = False) -> None:
        self.passthrough = passthrough
        self.listbox = urwid.ListBox(urwid.SimpleListWalker(widgets))
        box = urwid.LineBox(self.listbox, title=title, title_attr="dialog_title") if title \
            else urwid.LineBox(self.listbox)
        super().__init__(urwid.AttrMap(box, "dialog"))

    def keypress(self, size: tuple[int, ...], key: str) -> str | None:
        if key in ("up", "down"):
            key = "page up" if key == "up" else "page down"
        result: str | None = super().keypress(size, key)
        return result


class HelpView(Popup):
    def __init__(self, keymap: KeyMap) -> None:
        super().__init__(help_widgets(keymap))


def text_popup(title: str, lines: Sequence[Any]) -> Popup:
    return Popup([urwid.Padding(urwid.Text(x), left=1, right=1) for x in lines] + [
        urwid.Divider(), urwid.Padding(urwid.Text(
            ("info", "Esc or any key closes this (a copy is in the status window); "
                     "Up/Down/PgUp/PgDn scroll")), left=1, right=1)],
                 title, passthrough=True)


def status_markup(model: ChatModel, trust: str, members: int | None) -> list[Any]:
    s = model.status
    conn_attr = {"authenticated": "status_good", "disconnected": "status_bad"}.get(
        s.connection, "status_warn")
    conn_text = {"authenticated": "online", "connecting": "connecting",
                 "connected": "connected, logging in", "reconnecting": "reconnecting",
                 "disconnected": "offline"}.get(s.connection, s.connection)
    out: list[Any] = [(conn_attr, f" {conn_text} "), " "]
    conv = model.current_conversation
    if s.notice:
        # A notice comes first (Esc clears it and brings the rest back); only a changed
        # identity stays next to it.
        if conv.kind == "user" and trust == "changed":
            out.append(("status_bad", " IDENTITY CHANGED: /trust " + conv.name + " "))
            out.append(" ")
        out.append(("status_bad" if s.notice_error else "status", s.notice))
        return out
    if s.account:
        out.append(f"{s.account}/{s.device} ")
    if conv.kind == "user":
        label = {"verified": ("status_good", "e2ee \u00b7 verified"),
                 "changed": ("status_bad", " IDENTITY CHANGED: /trust " + conv.name + " "),
                 "unverified": ("status_warn", "e2ee \u00b7 not verified (/verify)")}.get(
            trust, ("status", "e2ee"))
        out.append(label)
        presence = model.presence.get(conv.name)
        if presence is not None:
            out.append(("status_good", f" \u00b7 {presence}") if presence == "online"
                       else f" \u00b7 {presence}")
    elif conv.kind == "room":
        out.append(("status_good", "e2ee (sender keys)"))
        if members is not None:
            out.append(f" \u00b7 {members} members")
    if conv.timer:
        out.append(("status_warn", f" \u00b7 \u23f1 {format_duration(conv.timer)}"))
    if not s.bell:
        out.append(" \u00b7 bell off")
    if s.connection != "authenticated" and s.connection_message:
        out.append(" \u2502 " + s.connection_message)
    return out


def options_markup(options: Sequence[str]) -> str:
    shown = "  ".join(options[:12])
    if len(options) > 12:
        shown += f"  (+{len(options) - 12})"
    return shown
