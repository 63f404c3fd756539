"""The controller: client events -> model, key actions and typed lines -> client calls.

It owns no widgets.  It reaches the screen through `UIHost` (dialogs, help, bell, quit)
and the chat through `ChatBackend`; both are narrow so tests drive it with fakes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shtalk.client.events import (
    BacklogDone,
    BadMessage,
    ConnectionChanged,
    Event,
    IdentityChanged,
    Invited,
    MemberChanged,
    MessageReceived,
    MessagesExpired,
    MessageState,
    NewDevice,
    Presence,
    TimerChanged,
)
from shtalk.clientui import commands as cmds
from shtalk.clientui.config import NotificationsSection
from shtalk.clientui.errors import describe
from shtalk.clientui.model import STATUS, ChatModel, Line, mentions

if TYPE_CHECKING:  # the client stack (crypto, TLS) is imported after the first frame
    from shtalk.clientui.backend import ChatBackend

log = Logger()

TRUST_WORDS = {"tofu": "trusted on first use (not verified: /verify)",
               "verified": "verified \u2713", "changed": "IDENTITY CHANGED (/trust after checking)"}


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
        self.away_count = 0
        self.backlog_seen = False
        self.away_reported = False
        self.online_since: float | None = None  # None: not online now
        self.lost_at: float | None = None  # when the connection was lost (None: never)
        self.reconnects = 0
        #: True when a ClientLog turns logged failures into status lines (shtalk-urwid)
        self.failures_logged = False
        self._looking_up: set[str] = set()

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
        try:
            self._handle(event)
        except Exception:
            log.failure("handling a client event failed")

    def _handle(self, event: Event) -> None:
        m = self.model
        if isinstance(event, MessageReceived):
            if event.conversation.startswith("user:"):
                # Someone who wrote to us lets us see their presence (server rule).
                self.look_up_presence(event.conversation[5:])
            mine = event.sender.casefold() == m.me.casefold()
            line = Line(event.id, event.conversation, event.sender, event.ts, event.body,
                        "sent" if mine else "received", event.expires_at, event.verified,
                        mine=mine, mention=not mine and mentions(event.body, m.me))
            m.add_line(line)
            if not self.away_reported:
                self.away_count += 1
            if not mine and self.model.status.bell and (
                    (event.conversation.startswith("user:") and self.notifications.bell_on_direct)
                    or (line.mention and self.notifications.bell_on_mention)):
                self.ui.bell()
        elif isinstance(event, MessageState):
            for conv in m.conversations.values():
                if conv.window.update(event.id, state=event.state):
                    break
            if event.state == "failed":
                self.notice(f"a message was not sent: {event.error}", error=True,
                            conversation=event.conversation)
        elif isinstance(event, ConnectionChanged):
            m.set_status(connection=event.state, connection_message=event.message)
            self._connection_log(event)
        elif isinstance(event, BacklogDone):
            if not self.backlog_seen:
                self.backlog_seen = True
                # Decrypting the last queued messages may still be under way: report
                # a moment later.
                self.later(0.5, self.report_away)
        elif isinstance(event, IdentityChanged):
            text = (f"WARNING: {event.user}'s identity key changed on device {event.device}. "
                    "Messages to them are held back. Check with them (in person or by phone) "
                    f"that they reinstalled; then /trust {event.user}. If not, someone may be "
                    "impersonating them.")
            self.notice(text, error=True, conversation=f"user:{event.user}")
            self.ui.bell()
        elif isinstance(event, NewDevice):
            who = "You have" if event.user.casefold() == m.me.casefold() else f"{event.user} has"
            self.notice(f"{who} a new device: {event.device}. If that is unexpected, compare "
                        f"safety numbers: /verify {event.user} {event.device}",
                        conversation=STATUS)
        elif isinstance(event, BadMessage):
            self.notice(f"A message from {event.sender} ({event.device}) failed its "
                        f"signature or decryption check and was dropped ({event.reason}). "
                        "It may have been tampered with on the way; ask them to resend.",
                        error=True, conversation=STATUS)
        elif isinstance(event, MemberChanged):
            self._member(event)
        elif isinstance(event, Invited):
            by = f" by {event.by}" if event.by else ""
            self.notice(f"You were invited to #{event.room}{by}: /join {event.room}",
                        conversation=STATUS)
        elif isinstance(event, Presence):
            m.set_presence(event.user, event.status)
        elif isinstance(event, TimerChanged):
            conv = m.ensure(event.conversation)
            conv.timer = event.seconds
            what = f"set disappearing messages to {cmds.format_duration(event.seconds)}" \
                if event.seconds else "turned disappearing messages off"
            self.notice(f"{event.by} {what}", conversation=event.conversation)
            m.notify("list")
        elif isinstance(event, MessagesExpired):
            now = self.clock()
            for conv in m.conversations.values():
                conv.window.expire(now)

    def _connection_log(self, event: ConnectionChanged) -> None:
        """Connection lost, reconnecting, back online: one line each in the status window
        (each line carries its time); attempts 1, 2, 4, 8 ... so a long outage stays short."""
        now = self.clock()
        if event.state == "authenticated":
            if self.online_since is None:
                if self.lost_at is None:
                    self.notice(f"online: {event.message}", conversation=STATUS)
                else:
                    self.notice(f"back online after {cmds.format_duration(now - self.lost_at)}"
                                f" offline ({event.message})", conversation=STATUS)
                self.online_since, self.reconnects = now, 0
            return
        if event.state == "disconnected" and event.message in ("", "stopped"):
            self.online_since = self.lost_at = None  # stopped on purpose (/logout, quit)
            return
        if event.state in ("reconnecting", "disconnected") and self.online_since is not None:
            self.online_since, self.lost_at = None, now
            why = event.message.split(";")[0] or "the connection was lost"
            self.notice(f"connection lost: {why}", error=True, conversation=STATUS)
        if event.state == "reconnecting":
            self.reconnects += 1
            if self.reconnects & (self.reconnects - 1) == 0:
                self.notice(f"reconnecting (attempt {self.reconnects}): {event.message}",
                            conversation=STATUS)
            self.model.set_status(notice="", notice_error=False)
        elif event.state == "disconnected" and event.message not in ("", "stopped"):
            self.notice(f"disconnected: {event.message}", error=True, conversation=STATUS)

    def report_away(self) -> None:
        self.away_reported = True
        m = self.model
        n = self.away_count
        unread = [c.title for c in m.conversations.values() if c.unread]
        if n:
            text = f"{n} message{'s' if n != 1 else ''} arrived while you were away"
            if unread:
                text += f": {', '.join(unread)} (Alt-A jumps to the next)"
        else:
            text = "connected; nothing new while you were away"
        self.notice(text, conversation=STATUS)

    def _member(self, event: MemberChanged) -> None:
        key = f"room:{event.room}"
        me = event.user.casefold() == self.model.me.casefold()
        if me and event.event == "kicked":
            by = f" by {event.by}" if event.by else ""
            self.notice(f"You were removed from #{event.room}{by}. Its history stays here; "
                        f"/join {event.room} if you are allowed back.", error=True,
                        conversation=key)
            conv = self.model.conversations.get(key)
            if conv is not None:
                conv.joined = False
            return
        verb = {"joined": "joined", "left": "left", "kicked": "was removed",
                "role": "changed role"}.get(event.event, event.event)
        by = f" by {event.by}" if event.by and event.event == "kicked" else ""
        if key in self.model.conversations:
            self.notice(f"{event.user} {verb}{by}", conversation=key)

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
        handler = getattr(self, "cmd_" + parsed.command.name.replace("-", "_"))
        try:
            handler(**{k.replace("-", "_"): v for k, v in parsed.args.items()})
        except cmds.CommandError as e:
            self.notice(str(e), error=True, conversation=STATUS)

    def _need_backend(self) -> ChatBackend:
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

    # -- commands (one method per table entry; the test checks they all exist) ---------
    def cmd_help(self, command: str | None = None) -> None:
        if command:
            c = cmds.BY_NAME.get(command.lstrip("/").lower())
            if c is None:
                raise cmds.CommandError(f"no command /{command}")
            self.notice(f"{c.usage()}: {c.help}")
        else:
            self.ui.show_help()

    def cmd_quit(self) -> None:
        self.ui.quit()

    def cmd_bell(self, on: str | None = None) -> None:
        self.set_bell(not self.model.status.bell if on is None else on == "on")

    def cmd_close(self) -> None:
        self.model.close(self.model.current)

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

    def cmd_msg(self, user: str, text: str | None = None) -> None:
        self._need_backend()
        key = f"user:{user}"
        if key not in self.model.conversations:
            self.look_up_presence(user)
        self.model.open(key)
        if text:
            self.send(text, key)

    def cmd_search(self, text: str) -> None:
        backend = self._need_backend()

        async def run() -> None:
            rows = await backend.search(text)
            if not rows:
                self.output("Search", [f"nothing found for {text!r}"])
                return
            lines = [f"{len(rows)} message{'s' if len(rows) != 1 else ''} with {text!r}"
                     + (" (the newest 50):" if len(rows) > 50 else ":")]
            for r in rows[-50:]:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.ts / 1000))
                lines.append(f"{when} {r.conversation} {r.sender}: {r.body}")
            self.output("Search", lines)

        self.spawn(run())

    def cmd_timer(self, duration: str) -> None:
        backend = self._need_backend()
        seconds = cmds.parse_duration(duration)
        key = self.model.current
        if key == STATUS:
            raise cmds.CommandError("open a conversation first; the timer is per conversation")

        async def run() -> None:
            await backend.set_timer(key, seconds)
            conv = self.model.ensure(key)
            conv.timer = seconds
            self.notice("disappearing messages: " + (
                f"new messages here vanish after {cmds.format_duration(seconds)}"
                if seconds else "off"), conversation=key)
            self.model.notify("list")

        self.spawn(run(), key)

    def _room_arg(self, room: str | None) -> str:
        if room:
            return room.lstrip("#")
        conv = self.model.current_conversation
        if conv.kind != "room":
            raise cmds.CommandError("name the room, or run this in the room")
        return conv.name

    def cmd_join(self, room: str) -> None:
        backend = self._need_backend()
        name = room.lstrip("#")

        async def run() -> None:
            reply = await backend.join_room(name)
            key = f"room:{reply.get('room', name)}"
            self.model.open(key)
            self.model.conversations[key].joined = True
            self.notice(f"you joined #{reply.get('room', name)} "
                        f"({len(reply.get('members', []))} members)", conversation=key)

        self.spawn(run())

    def cmd_leave(self, room: str | None = None) -> None:
        backend = self._need_backend()
        name = self._room_arg(room)

        async def run() -> None:
            await backend.leave_room(name)
            key = f"room:{name}"
            if key in self.model.conversations:
                self.model.conversations[key].joined = False
                self.notice(f"you left #{name}", conversation=key)

        self.spawn(run())

    def cmd_create(self, room: str, invite_only: str | None = None) -> None:
        backend = self._need_backend()
        name = room.lstrip("#")

        async def run() -> None:
            reply = await backend.create_room(name, bool(invite_only))
            key = f"room:{reply.get('room', name)}"
            self.model.open(key)
            self.notice(f"you created #{reply.get('room', name)}"
                        + (" (invite-only)" if invite_only else ""), conversation=key)

        self.spawn(run())

    def cmd_invite(self, user: str, room: str | None = None) -> None:
        backend = self._need_backend()
        name = self._room_arg(room)

        async def run() -> None:
            await backend.invite(name, user)
            self.notice(f"invited {user} to #{name}")

        self.spawn(run())

    def cmd_kick(self, user: str, room: str | None = None) -> None:
        backend = self._need_backend()
        name = self._room_arg(room)

        async def run() -> None:
            await backend.kick(name, user)
            self.notice(f"removed {user} from #{name}")

        self.spawn(run())

    def cmd_who(self, room: str | None = None) -> None:
        backend = self._need_backend()
        name = self._room_arg(room)

        async def run() -> None:
            members = await backend.members(name)
            for x in members:
                if "online" in x:
                    self.model.set_presence(x["user"], "online" if x["online"] else "offline")
            names = ", ".join(
                f"{x['user']}" + (f" ({x['role']})" if x.get("role") not in (None, "member")
                                  else "") + (" ●" if x.get("online") else "")
                for x in members)
            self.output(f"Members of #{name}", [f"#{name}: {len(members)} members: {names}"])

        self.spawn(run())

    def cmd_rooms(self) -> None:
        backend = self._need_backend()

        async def run() -> None:
            rooms = await backend.rooms()
            if not rooms:
                self.output("Rooms", ["no rooms yet: /create NAME"])
                return
            self.output("Rooms", ["#" + r["room"] + (" (joined)" if r.get("joined") else "")
                                  + (" (invite-only)" if r.get("invite_only") else "")
                                  for r in rooms])

        self.spawn(run())

    def cmd_verify(self, user: str | None = None, device: str | None = None,
                   confirm: str | None = None) -> None:
        backend = self._need_backend()
        conv = self.model.current_conversation
        if user is None:
            if conv.kind != "user":
                raise cmds.CommandError("/verify USER [DEVICE], or run it in a direct "
                                        "conversation")
            user = conv.name
        devices = backend.contact_device_states(user)
        if not devices:
            raise cmds.CommandError(f"no known device of {user} yet: exchange a message first")
        if device is None:
            if len(devices) > 1:
                listing = ", ".join(f"{d} ({s})" for d, s in devices)
                raise cmds.CommandError(f"{user} has several devices ({listing}): "
                                        f"/verify {user} DEVICE")
            device = devices[0][0]
        number = backend.safety_number(user, device)
        if confirm == "yes":
            self.spawn(self._mark_verified(backend, user, device))
            return
        self.notice(f"Safety number with {user}/{device}:\n  {number}\nCompare it with "
                    f"{user} in person or by phone. If it matches: /verify {user} {device} yes")

    async def _mark_verified(self, backend: ChatBackend, user: str, device: str) -> None:
        await backend.mark_verified(user, device)
        self.notice(f"{user}/{device} is now marked verified \u2713")
        self.model.notify("list")

    def cmd_trust(self, user: str | None = None) -> None:
        backend = self._need_backend()
        conv = self.model.current_conversation
        if user is None:
            if conv.kind != "user":
                raise cmds.CommandError("/trust USER")
            user = conv.name
        name = user

        async def run() -> None:
            devices = await backend.accept_identity(name)
            if devices:
                self.notice(f"accepted {name}'s new identity key on {', '.join(devices)}; "
                            f"consider /verify {name}")
            else:
                self.notice(f"{name} has no changed identity to accept")
            self.model.notify("list")

        self.spawn(run())

    def cmd_devices(self, user: str | None = None) -> None:
        backend = self._need_backend()

        async def run() -> None:
            devices = await backend.devices(user)
            who = user or backend.me
            states = dict(backend.contact_device_states(who))
            lines = [f"devices of {who} (trust as this device sees them):"]
            for d in devices:
                this = who.casefold() == backend.me.casefold() and d["id"] == backend.device
                trust = "this device" if this else TRUST_WORDS.get(
                    states.get(d["id"], ""), "not seen yet (no message exchanged)")
                online = ", online" if d.get("online") else ""
                label = f" {d['label']}" if d.get("label") else ""
                lines.append(f"  {d['id']}{label}: {trust}{online}")
            self.output(f"Devices of {who}", lines)

        self.spawn(run())

    def cmd_device_remove(self, device: str) -> None:
        backend = self._need_backend()
        if device == backend.device:
            raise cmds.CommandError("that is this device: use /logout instead")

        async def run() -> None:
            await backend.remove_device(device)
            self.notice(f"device {device} removed from your account")

        self.spawn(run())

    def cmd_passphrase(self) -> None:
        self._account("passphrase")

    def cmd_2fa(self) -> None:
        self._account("2fa")

    def cmd_logout(self) -> None:
        self._account("logout")

    def cmd_login(self) -> None:
        self._account("login")

    def cmd_register(self) -> None:
        self._account("register")

    def _account(self, name: str) -> None:
        f = self.account_actions.get(name)
        if f is None:
            raise cmds.CommandError(f"/{name} is not available now")
        f()

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
