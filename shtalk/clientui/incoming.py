"""Client events -> the model and the status window.

Everything the client reports on its own (a message, a delivery state, the connection
going and coming back, a changed identity, a member leaving) lands here, apart from
what the person typed (`shtalk.clientui.handlers`): one place decides what each event
shows and which ones ring the bell.  It owns no widgets and no client.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

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
from shtalk.clientui.commands import format_duration
from shtalk.clientui.config import NotificationsSection
from shtalk.clientui.model import STATUS, ChatModel, Line, mentions

log = Logger()


class Notify(Protocol):
    def __call__(self, text: str, *, error: bool = False,
                 conversation: str | None = None) -> None: ...


class EventHandler:
    """Turns each client event into lines, marks and notices; keeps the little state that
    needs (who wrote while we were away, since when we are online or offline)."""

    def __init__(self, model: ChatModel, notifications: NotificationsSection,
                 notice: Notify, bell: Callable[[], None], clock: Callable[[], float],
                 later: Callable[[float, Callable[[], Any]], Any],
                 look_up_presence: Callable[[str], None]) -> None:
        self.model = model
        self.notifications = notifications
        self.notice = notice
        self.bell = bell
        self.clock = clock
        self.later = later
        self.look_up_presence = look_up_presence
        self.away_count = 0
        self.backlog_seen = False
        self.away_reported = False
        self.online_since: float | None = None  # None: not online now
        self.lost_at: float | None = None  # when the connection was lost (None: never)
        self.reconnects = 0

    def handle(self, event: Event) -> None:
        try:
            self._handle(event)
        except Exception:
            log.failure("handling a client event failed")

    def _handle(self, event: Event) -> None:
        m = self.model
        if isinstance(event, MessageReceived):
            self._message(event)
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
            self.bell()
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
            what = f"set disappearing messages to {format_duration(event.seconds)}" \
                if event.seconds else "turned disappearing messages off"
            self.notice(f"{event.by} {what}", conversation=event.conversation)
            m.notify("list")
        elif isinstance(event, MessagesExpired):
            now = self.clock()
            for conv in m.conversations.values():
                conv.window.expire(now)

    def _message(self, event: MessageReceived) -> None:
        m = self.model
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
        if not mine and m.status.bell and (
                (event.conversation.startswith("user:") and self.notifications.bell_on_direct)
                or (line.mention and self.notifications.bell_on_mention)):
            self.bell()

    def _connection_log(self, event: ConnectionChanged) -> None:
        """Connection lost, reconnecting, back online: one line each in the status window
        (each line carries its time); attempts 1, 2, 4, 8 ... so a long outage stays short."""
        now = self.clock()
        if event.state == "authenticated":
            if self.online_since is None:
                if self.lost_at is None:
                    self.notice(f"online: {event.message}", conversation=STATUS)
                else:
                    self.notice(f"back online after {format_duration(now - self.lost_at)}"
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
