"""What the screen shows, without urwid: conversations, their message windows, the status.

A conversation's messages live in the encrypted local store; the model keeps only a
*window* of them in memory (`HistoryWindow`: at most ``cap`` lines), loading older pages
when the reader scrolls up and newer ones back when they scroll down again.  Live messages
are appended while the window reaches the newest message.  Views subscribe to changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, succeed

if TYPE_CHECKING:  # the store (and its crypto) is imported after the first frame
    from shtalk.client.localstore import HistoryMessage

STATUS = "status"  # the conversation holding client notices (no history in the store)

_info_ids = itertools.count(1)


@dataclass(slots=True)
class Line:
    """One line of a conversation: a message or a client notice (``sender`` empty)."""

    id: str
    conversation: str
    sender: str
    ts: int  # milliseconds
    body: str
    state: str  # sending | sent | failed | received | info | error
    expires_at: float | None = None
    verified: bool = False
    mine: bool = False
    mention: bool = False
    version: int = 0  # bumped on every change (the view caches widgets by id+version)

    @classmethod
    def from_history(cls, m: HistoryMessage, me: str) -> Line:
        mine = m.sender.casefold() == me.casefold()
        return cls(m.id, m.conversation, m.sender, m.ts, m.body, m.state, m.expires_at,
                   mine=mine, mention=not mine and mentions(m.body, me))

    @classmethod
    def notice(cls, conversation: str, body: str, ts: int, error: bool = False) -> Line:
        return cls(f"info:{next(_info_ids)}", conversation, "", ts, body,
                   "error" if error else "info")


def mentions(body: str, me: str) -> bool:
    if not me:
        return False
    low, name = body.casefold(), me.casefold()
    start = 0
    while True:
        i = low.find(name, start)
        if i < 0:
            return False
        before = low[i - 1] if i else " "
        after = low[i + len(name)] if i + len(name) < len(low) else " "
        if not (before.isalnum() or before in "_-.") and not (after.isalnum() or after in "_-"):
            return True
        start = i + 1


class Loader(Protocol):
    def __call__(self, conversation: str, limit: int,
                 before_ts: int | None) -> Deferred[list[HistoryMessage]]: ...


class HistoryWindow:
    """A bounded, scrollable window onto one conversation's history.

    Positions are stable integers: ``items[i]`` is at position ``base + i``; loading older
    lines lowers ``base``, dropping the oldest raises it, so a view's focus stays put.
    """

    def __init__(self, conversation: str, loader: Loader | None, me: str = "",
                 page: int = 100, cap: int = 500) -> None:
        self.conversation = conversation
        self.loader = loader
        self.me = me
        self.page = page
        self.cap = max(cap, 2 * page)
        self.items: list[Line] = []
        self.base = 0
        self.has_older = loader is not None
        # Dropped newer chunks: (before_ts that reloads the chunk, how many lines).
        self._newer: list[tuple[int | None, int]] = []
        self._end_bound: int | None = None  # window's newest edge (None: the newest message)
        self.loading = False
        self.loaded = loader is None
        self.listeners: list[Callable[[], None]] = []

    # -- queries ----------------------------------------------------------------------
    @property
    def has_newer(self) -> bool:
        return bool(self._newer)

    @property
    def first(self) -> int:
        return self.base

    @property
    def last(self) -> int:
        return self.base + len(self.items) - 1

    def at(self, position: int) -> Line | None:
        i = position - self.base
        if 0 <= i < len(self.items):
            return self.items[i]
        return None

    def position_of(self, line_id: str) -> int | None:
        for i in range(len(self.items) - 1, -1, -1):
            if self.items[i].id == line_id:
                return self.base + i
        return None

    def _changed(self) -> None:
        for f in list(self.listeners):
            f()

    # -- loading ----------------------------------------------------------------------
    def _fetch(self, limit: int, before_ts: int | None) -> Deferred[list[Line]]:
        if self.loader is None:
            return succeed([])
        d = self.loader(self.conversation, limit, before_ts)
        return d.addCallback(lambda rows: [Line.from_history(m, self.me) for m in rows])

    def load_latest(self) -> Deferred[None]:
        """(Re)load the newest page: on open, and on End after scrolling far back."""
        if self.loading:
            return succeed(None)
        self.loading = True

        def got(lines: list[Line]) -> None:
            self.loading = False
            self.loaded = True
            # Keep what the page cannot hold yet: notices, lines that arrived or were
            # sent while it was read (a pending send whose stored copy is in the page
            # is dropped: the copy gets the state updates).
            known = {x.id for x in lines}
            stored_mine = {x.body for x in lines[-50:] if x.mine}
            keep = [x for x in self.items[-200:] if x.id not in known
                    and (not lines or x.ts >= lines[0].ts)
                    and not (x.id.startswith("pending:") and x.body in stored_mine)]
            merged = lines + keep
            merged.sort(key=lambda x: x.ts)
            self.base += len(self.items)
            self.items = merged
            self._newer.clear()
            self._end_bound = None
            self.has_older = self.loader is not None and len(lines) >= self.page
            self._changed()

        return self._fetch(self.page, None).addCallback(got).addErrback(self._failed)

    def load_older(self) -> Deferred[None]:
        if self.loading or not self.has_older:
            return succeed(None)
        self.loading = True
        before = self.items[0].ts if self.items else None

        def got(lines: list[Line]) -> None:
            self.loading = False
            known = {x.id for x in self.items}
            lines = [x for x in lines if x.id not in known]
            self.has_older = len(lines) >= self.page
            self.items[:0] = lines
            self.base -= len(lines)
            self._trim_newest()
            self._changed()

        return self._fetch(self.page, before).addCallback(got).addErrback(self._failed)

    def load_newer(self) -> Deferred[None]:
        if self.loading or not self._newer:
            return succeed(None)
        self.loading = True
        bound, count = self._newer.pop()

        def got(lines: list[Line]) -> None:
            self.loading = False
            known = {x.id for x in self.items}
            edge = self._end_bound
            lines = [x for x in lines if x.id not in known and (edge is None or x.ts >= edge)]
            self.items.extend(lines)
            self._end_bound = bound
            self._trim_oldest()
            self._changed()

        return self._fetch(count, bound).addCallback(got).addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        self.loading = False
        self.items.append(Line.notice(self.conversation,
                                      f"could not read the history: {failure.getErrorMessage()}",
                                      self.items[-1].ts if self.items else 0, error=True))
        self._changed()

    def _trim_newest(self) -> None:
        extra = len(self.items) - self.cap
        if extra > 0:
            dropped = self.items[-extra:]
            del self.items[-extra:]
            self._newer.append((self._end_bound, extra))
            self._end_bound = dropped[0].ts

    def _trim_oldest(self) -> None:
        extra = len(self.items) - self.cap
        if extra > 0:
            del self.items[:extra]
            self.base += extra
            self.has_older = True

    # -- live updates -----------------------------------------------------------------
    def add(self, line: Line) -> bool:
        """A new line (live message, own message, notice); False if the window does not
        reach the newest message (it is in the store and shows when the reader gets there)."""
        if self._newer:
            return False
        if self.position_of(line.id) is not None:
            return False
        self.items.append(line)
        self._trim_oldest()
        self._changed()
        return True

    def update(self, line_id: str, **changes: Any) -> bool:
        pos = self.position_of(line_id)
        if pos is None:
            return False
        line = self.items[pos - self.base]
        for k, v in changes.items():
            setattr(line, k, v)
        line.version += 1
        self._changed()
        return True

    def expire(self, now: float) -> int:
        before = len(self.items)
        self.items = [x for x in self.items if x.expires_at is None or x.expires_at > now]
        gone = before - len(self.items)
        if gone:
            self._changed()
        return gone


@dataclass
class Conversation:
    key: str  # "user:NAME", "room:NAME" or STATUS
    window: HistoryWindow
    unread: int = 0
    mentions: int = 0
    timer: int = 0  # disappearing-message seconds, 0 = off
    joined: bool = True

    @property
    def kind(self) -> str:
        return self.key.partition(":")[0] if ":" in self.key else self.key

    @property
    def name(self) -> str:
        return self.key.partition(":")[2] if ":" in self.key else self.key

    @property
    def title(self) -> str:
        if self.kind == "room":
            return "#" + self.name
        if self.kind == "user":
            return "@" + self.name
        return "shtalk"


@dataclass
class Status:
    connection: str = "disconnected"
    connection_message: str = ""
    account: str = ""
    device: str = ""
    server: str = ""
    notice: str = ""
    notice_error: bool = False
    bell: bool = True


class ChatModel:
    """Conversations in list order (the status one first), the open one, the status line."""

    def __init__(self, loader: Loader | None = None, me: str = "", page: int = 100,
                 cap: int = 500) -> None:
        self.loader = loader
        self.me = me
        self.page = page
        self.cap = cap
        self.status = Status(account=me)
        self.conversations: dict[str, Conversation] = {}
        self.order: list[str] = []
        self.current = STATUS
        self.listeners: list[Callable[[str], None]] = []  # "list", "status", "current"
        #: user -> "online" / "offline", as far as the server told us (presence pushes
        #: and /who replies); a user we heard nothing about has no entry.
        self.presence: dict[str, str] = {}
        self.ensure(STATUS)

    def set_presence(self, user: str, status: str) -> None:
        if self.presence.get(user) != status:
            self.presence[user] = status
            self.notify("list")

    def notify(self, what: str) -> None:
        for f in list(self.listeners):
            f(what)

    def ensure(self, key: str, *, load: bool = True) -> Conversation:
        conv = self.conversations.get(key)
        if conv is None:
            loader = self.loader if key != STATUS else None
            conv = Conversation(key, HistoryWindow(key, loader, self.me, self.page, self.cap))
            conv.window.listeners.append(lambda: self.notify("window"))
            self.conversations[key] = conv
            self.order.append(key)
            self.notify("list")
        return conv

    def open(self, key: str) -> Conversation:
        conv = self.ensure(key)
        self.current = key
        conv.unread = conv.mentions = 0
        if not conv.window.loaded:
            conv.window.load_latest()
        self.notify("current")
        self.notify("list")
        return conv

    def close(self, key: str) -> None:
        if key == STATUS or key not in self.conversations:
            return
        i = self.order.index(key)
        self.order.remove(key)
        del self.conversations[key]
        if self.current == key:
            self.current = self.order[max(0, i - 1)]
            self.notify("current")
        self.notify("list")

    def step(self, delta: int) -> str:
        i = self.order.index(self.current)
        key = self.order[(i + delta) % len(self.order)]
        self.open(key)
        return key

    def next_unread(self) -> str | None:
        i = self.order.index(self.current)
        for k in self.order[i + 1:] + self.order[:i]:
            if self.conversations[k].unread:
                self.open(k)
                return k
        return None

    @property
    def current_conversation(self) -> Conversation:
        return self.conversations[self.current]

    def add_line(self, line: Line, *, count_unread: bool = True) -> Conversation:
        conv = self.ensure(line.conversation)
        conv.window.add(line)
        if count_unread and line.conversation != self.current and not line.mine and \
                line.state not in ("info", "error"):
            conv.unread += 1
            if line.mention:
                conv.mentions += 1
            self.notify("list")
        return conv

    def notice(self, text: str, *, error: bool = False, ts: int = 0,
               conversation: str | None = None) -> None:
        """A client notice: in the given (default: open) conversation and the status bar."""
        key = conversation or self.current
        self.add_line(Line.notice(key, text, ts, error), count_unread=False)
        self.status.notice = text.splitlines()[0] if text else ""
        self.status.notice_error = error
        self.notify("status")

    def set_status(self, **changes: Any) -> None:
        for k, v in changes.items():
            setattr(self.status, k, v)
        self.notify("status")


__all__ = ["STATUS", "ChatModel", "Conversation", "HistoryWindow", "Line", "Status"]
