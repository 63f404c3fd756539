"""The controller: key actions and typed lines -> client calls, client events -> model.

It owns no widgets.  It reaches the screen through `UIHost` (dialogs, help, bell, quit)
and the chat through `ChatBackend`; both are narrow so tests drive it with fakes.  What
each client event shows is `shtalk.clientui.incoming`'s; what each /command does is
`shtalk.clientui.handlers`'; this module routes to them and says how things went.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shtalk.client.events import Event
from shtalk.clientui import commands as cmds
from shtalk.clientui.config import NotificationsSection
from shtalk.clientui.errors import describe
from shtalk.clientui.handlers import CommandHandlers
from shtalk.clientui.incoming import EventHandler
from shtalk.clientui.model import STATUS, ChatModel, Line

if TYPE_CHECKING:  # the client stack (crypto, TLS) is imported after the first frame
    from shtalk.clientui.backend import ChatBackend

log = Logger()


class UIHost(Protocol):
    """What the controller may ask of the screen."""

    def ask(self, title: str, text: Any, label: str, *, mask: bool = False,
            default: str = "") -> Deferred[str | None]: ...
    def show_help(self) -> None: ...
    def show_text(self, title: str, lines: Sequence[Any]) -> None: ...
    def close_overlay(self) -> bool: ...
    def bell(self) -> None: ...
    def quit(self) -> None: ...
    def redraw(self) -> None: ...


class Controller:
    def __init__(self, model: ChatModel, backend: ChatBackend | None, ui: UIHost,
                 notifications: NotificationsSection | None = None,
                 clock: Callable[[], float] = time.time,
                 account_actions: dict[str, Callable[[], Any]] | None = None,
                 later: Callable[[float, Callable[[], Any]], Any] | None = None) -> None:
        self.model = model
        self.backend = backend
        self.ui = ui
        self.notifications = notifications or NotificationsSection()
        self.clock = clock
        self.model.status.bell = self.notifications.bell
        self.account_actions = account_actions or {}
        self.later = later or (lambda delay, f: f())
        #: a notice leaves the status bar after this long (it stays in its window), so
        #: the bar shows the conversation's state again; None: until Esc (tests)
        self.notice_seconds: float | None = 15.0 if later is not None else None
        self.pending: dict[str, str] = {}  # temporary line id -> conversation
        self._pending_ids = 0
        #: True when a ClientLog turns logged failures into status lines (shtalk-urwid)
        self.failures_logged = False
        self._looking_up: set[str] = set()
        self.events = EventHandler(model, self.notifications, self.notice, ui.bell, clock,
                                   self.later, self.look_up_presence)
        self.commands = CommandHandlers(self)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def notice(self, text: str, *, error: bool = False, conversation: str | None = None) -> None:
        self.model.notice(text, error=error, ts=self.now_ms(), conversation=conversation)
        if self.notice_seconds is not None:
            shown = self.model.status.notice

            def expire() -> None:
                if self.model.status.notice == shown:
                    self.model.set_status(notice="", notice_error=False)

            self.later(self.notice_seconds * (2 if error else 1), expire)

    def fail(self, error: Any, conversation: str | None = None) -> None:
        self.notice(describe(error), error=True, conversation=conversation or STATUS)

    def output(self, title: str, lines: Sequence[str]) -> None:
        """A command's output: a pop-up to read now (Esc closes it) and a copy in the
        status window, never in the open conversation."""
        for line in lines:
            self.notice(line, conversation=STATUS)
        self.model.set_status(notice=f"{title} (Esc closes the list; a copy is in the "
                                     "status window)", notice_error=False)
        self.ui.show_text(title, lines)

    def unsent(self) -> int:
        """Own messages still on their way to the server."""
        return sum(1 for c in self.model.conversations.values() for x in c.window.items
                   if x.mine and x.state == "sending")

    def spawn(self, coro: Coroutine[Any, Any, Any], conversation: str | None = None) -> None:
        """Run a command's work on the reactor; its failure becomes a notice, never a crash."""
        d = Deferred.fromCoroutine(coro)

        def failed(f: Any) -> None:
            from shtalk.client.connection import ConnectionLost, ServerError
            from shtalk.client.e2ee import ClientError

            if f.check(ServerError, ClientError, cmds.CommandError, ConnectionLost):
                log.info("command refused: {error}", error=f.getErrorMessage())
                self.fail(f, conversation)
                return
            log.failure("a command failed", f)
            if not self.failures_logged:  # else the log's observer says it, once
                self.fail(f, conversation)

        d.addErrback(failed)

    # ------------------------------------------------------------------ client events
    def handle_event(self, event: Event) -> None:
        self.events.handle(event)

    def look_up_presence(self, user: str) -> None:
        """A direct peer whose presence is not known yet: whether it is online now (its
        devices say, if the server lets us see it: it does once they wrote to us); the
        server's presence pushes keep it true from then on."""
        backend = self.backend
        if backend is None or user in self.model.presence or user in self._looking_up:
            return
        self._looking_up.add(user)

        async def run() -> None:
            try:
                devices = await backend.devices(user)
            finally:
                self._looking_up.discard(user)
            marks = [d["online"] for d in devices if "online" in d]
            if marks:  # no marks: not ours to see (yet)
                self.model.set_presence(user, "online" if any(marks) else "offline")

        d = Deferred.fromCoroutine(run())
        d.addErrback(lambda f: log.info("no presence for {user}: {e}", user=user,
                                        e=f.getErrorMessage()))

    # ------------------------------------------------------------------- key actions
    def action(self, name: str) -> None:
        m = self.model
        if name == "help":
            if not self.ui.close_overlay():
                self.ui.show_help()
        elif name == "quit":
            self.ui.quit()
        elif name == "cancel":
            if not self.ui.close_overlay():
                m.set_status(notice="", notice_error=False)
        elif name == "redraw":
            self.ui.redraw()
        elif name == "toggle_bell":
            self.set_bell(not m.status.bell)
        elif name == "next_conversation":
            m.step(+1)
        elif name == "previous_conversation":
            m.step(-1)
        elif name == "next_unread":
            if m.next_unread() is None:
                m.set_status(notice="no unread messages", notice_error=False)
        elif name == "close_conversation":
            m.close(m.current)

    def set_bell(self, on: bool) -> None:
        self.model.set_status(bell=on, notice=f"bell {'on' if on else 'off'}",
                              notice_error=False)

    # ------------------------------------------------------------------ typed lines
    def submit(self, text: str) -> None:
        try:
            parsed = cmds.parse(text)
        except cmds.CommandError as e:
            self.notice(str(e), error=True, conversation=STATUS)
            return
        if parsed is None:
            return
        if isinstance(parsed, cmds.Text):
            self.send(parsed.body)
            return
        handler = getattr(self.commands, "cmd_" + parsed.command.name.replace("-", "_"))
        try:
            handler(**{k.replace("-", "_"): v for k, v in parsed.args.items()})
        except cmds.CommandError as e:
            self.notice(str(e), error=True, conversation=STATUS)

    def need_backend(self) -> ChatBackend:
        if self.backend is None:
            raise cmds.CommandError("not logged in yet: /login or /register first")
        return self.backend

    def send(self, body: str, conversation: str | None = None) -> None:
        key = conversation or self.model.current
        if key == STATUS:
            self.notice("This is the status window: open a conversation first (/msg USER or "
                        "/join ROOM), or type /help.", error=True)
            return
        backend = self.backend
        if backend is None:
            self.notice("not logged in yet: /login or /register first", error=True)
            return
        conv = self.model.ensure(key)
        self._pending_ids += 1
        temp = f"pending:{self._pending_ids}"
        timer = conv.timer or backend.timer(key)
        expires = self.clock() + timer if timer else None
        conv.window.add(Line(temp, key, self.model.me, self.now_ms(), body, "sending",
                             expires, mine=True))

        async def run() -> None:
            try:
                msg_id = await backend.send(key, body)
            except Exception as e:
                conv.window.update(temp, state="failed")
                self.fail(e, key)
                return
            conv.window.update(temp, id=msg_id, state="sent")

        Deferred.fromCoroutine(run())

    # ------------------------------------------------------------------ completion
    def candidates(self, kind: str) -> Sequence[str]:
        b = self.backend
        if kind == cmds.USER:
            users = set(b.known_users()) if b else set()
            users.update(c.name for c in self.model.conversations.values() if c.kind == "user")
            users.update(self.model.presence)
            users.discard(self.model.me)
            return sorted(users)
        if kind == cmds.ROOM:
            rooms = set(b.joined_rooms()) if b else set()
            rooms.update(c.name for c in self.model.conversations.values() if c.kind == "room")
            return sorted(rooms)
        if kind == cmds.DEVICE:
            conv = self.model.current_conversation
            if b and conv.kind == "user":
                return [d for d, _ in b.contact_device_states(conv.name)]
            return []
        return []

    def trust(self, user: str) -> str:
        return self.backend.trust_state(user) if self.backend else ""

    def members(self, room: str) -> int | None:
        return self.backend.room_member_count(room) if self.backend else None
