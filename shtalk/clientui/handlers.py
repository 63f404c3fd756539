"""The /commands' handlers: one method per entry of the table in
`shtalk.clientui.commands` (a unit test checks that each has one).

Kept apart from the controller, which dispatches a parsed line here by name: a handler
checks its arguments, runs the backend call off the key press (`CommandHost.spawn`) and
reports what happened.  A bad argument raises `CommandError`, which the controller
shows as a notice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from shtalk.clientui import commands as cmds
from shtalk.clientui.model import STATUS, ChatModel

if TYPE_CHECKING:  # the client stack (crypto, TLS) is imported after the first frame
    from shtalk.clientui.backend import ChatBackend

TRUST_WORDS = {"tofu": "trusted on first use (not verified: /verify)",
               "verified": "verified \u2713", "changed": "IDENTITY CHANGED (/trust after checking)"}


class Screen(Protocol):
    """The part of the controller's `UIHost` that commands use."""

    def show_help(self) -> None: ...
    def quit(self) -> None: ...


class CommandHost(Protocol):
    """What a handler may ask of the controller."""

    model: ChatModel
    account_actions: dict[str, Callable[[], Any]]

    @property
    def ui(self) -> Screen: ...
    def need_backend(self) -> ChatBackend: ...
    def notice(self, text: str, *, error: bool = False,
               conversation: str | None = None) -> None: ...
    def output(self, title: str, lines: Sequence[str]) -> None: ...
    def spawn(self, coro: Coroutine[Any, Any, Any], conversation: str | None = None) -> None: ...
    def send(self, body: str, conversation: str | None = None) -> None: ...
    def set_bell(self, on: bool) -> None: ...
    def look_up_presence(self, user: str) -> None: ...


class CommandHandlers:
    def __init__(self, host: CommandHost) -> None:
        self.host = host
        self.model = host.model

    def cmd_help(self, command: str | None = None) -> None:
        if command:
            c = cmds.BY_NAME.get(command.lstrip("/").lower())
            if c is None:
                raise cmds.CommandError(f"no command /{command}")
            self.host.notice(f"{c.usage()}: {c.help}")
        else:
            self.host.ui.show_help()

    def cmd_quit(self) -> None:
        self.host.ui.quit()

    def cmd_bell(self, on: str | None = None) -> None:
        self.host.set_bell(not self.model.status.bell if on is None else on == "on")

    def cmd_close(self) -> None:
        self.model.close(self.model.current)

    def cmd_msg(self, user: str, text: str | None = None) -> None:
        self.host.need_backend()
        key = f"user:{user}"
        if key not in self.model.conversations:
            self.host.look_up_presence(user)
        self.model.open(key)
        if text:
            self.host.send(text, key)

    def cmd_search(self, text: str) -> None:
        backend = self.host.need_backend()

        async def run() -> None:
            rows = await backend.search(text)
            if not rows:
                self.host.output("Search", [f"nothing found for {text!r}"])
                return
            lines = [f"{len(rows)} message{'s' if len(rows) != 1 else ''} with {text!r}"
                     + (" (the newest 50):" if len(rows) > 50 else ":")]
            for r in rows[-50:]:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.ts / 1000))
                lines.append(f"{when} {r.conversation} {r.sender}: {r.body}")
            self.host.output("Search", lines)

        self.host.spawn(run())

    def cmd_timer(self, duration: str) -> None:
        backend = self.host.need_backend()
        seconds = cmds.parse_duration(duration)
        key = self.model.current
        if key == STATUS:
            raise cmds.CommandError("open a conversation first; the timer is per conversation")

        async def run() -> None:
            await backend.set_timer(key, seconds)
            conv = self.model.ensure(key)
            conv.timer = seconds
            self.host.notice("disappearing messages: " + (
                f"new messages here vanish after {cmds.format_duration(seconds)}"
                if seconds else "off"), conversation=key)
            self.model.notify("list")

        self.host.spawn(run(), key)

    def _room_arg(self, room: str | None) -> str:
        if room:
            return room.lstrip("#")
        conv = self.model.current_conversation
        if conv.kind != "room":
            raise cmds.CommandError("name the room, or run this in the room")
        return conv.name

    def cmd_join(self, room: str) -> None:
        backend = self.host.need_backend()
        name = room.lstrip("#")

        async def run() -> None:
            reply = await backend.join_room(name)
            key = f"room:{reply.get('room', name)}"
            self.model.open(key)
            self.model.conversations[key].joined = True
            self.host.notice(f"you joined #{reply.get('room', name)} "
                        f"({len(reply.get('members', []))} members)", conversation=key)

        self.host.spawn(run())

    def cmd_leave(self, room: str | None = None) -> None:
        backend = self.host.need_backend()
        name = self._room_arg(room)

        async def run() -> None:
            await backend.leave_room(name)
            key = f"room:{name}"
            if key in self.model.conversations:
                self.model.conversations[key].joined = False
                self.host.notice(f"you left #{name}", conversation=key)

        self.host.spawn(run())

    def cmd_create(self, room: str, invite_only: str | None = None) -> None:
        backend = self.host.need_backend()
        name = room.lstrip("#")

        async def run() -> None:
            reply = await backend.create_room(name, bool(invite_only))
            key = f"room:{reply.get('room', name)}"
            self.model.open(key)
            self.host.notice(f"you created #{reply.get('room', name)}"
                        + (" (invite-only)" if invite_only else ""), conversation=key)

        self.host.spawn(run())

    def cmd_invite(self, user: str, room: str | None = None) -> None:
        backend = self.host.need_backend()
        name = self._room_arg(room)

        async def run() -> None:
            await backend.invite(name, user)
            self.host.notice(f"invited {user} to #{name}")

        self.host.spawn(run())

    def cmd_kick(self, user: str, room: str | None = None) -> None:
        backend = self.host.need_backend()
        name = self._room_arg(room)

        async def run() -> None:
            await backend.kick(name, user)
            self.host.notice(f"removed {user} from #{name}")

        self.host.spawn(run())

    def cmd_who(self, room: str | None = None) -> None:
        backend = self.host.need_backend()
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
            self.host.output(f"Members of #{name}", [f"#{name}: {len(members)} members: {names}"])

        self.host.spawn(run())

    def cmd_rooms(self) -> None:
        backend = self.host.need_backend()

        async def run() -> None:
            rooms = await backend.rooms()
            if not rooms:
                self.host.output("Rooms", ["no rooms yet: /create NAME"])
                return
            self.host.output("Rooms", ["#" + r["room"] + (" (joined)" if r.get("joined") else "")
                                  + (" (invite-only)" if r.get("invite_only") else "")
                                  for r in rooms])

        self.host.spawn(run())

    def cmd_verify(self, user: str | None = None, device: str | None = None,
                   confirm: str | None = None) -> None:
        backend = self.host.need_backend()
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
            self.host.spawn(self._mark_verified(backend, user, device))
            return
        self.host.notice(f"Safety number with {user}/{device}:\n  {number}\nCompare it with "
                    f"{user} in person or by phone. If it matches: /verify {user} {device} yes")

    async def _mark_verified(self, backend: ChatBackend, user: str, device: str) -> None:
        await backend.mark_verified(user, device)
        self.host.notice(f"{user}/{device} is now marked verified \u2713")
        self.model.notify("list")

    def cmd_trust(self, user: str | None = None) -> None:
        backend = self.host.need_backend()
        conv = self.model.current_conversation
        if user is None:
            if conv.kind != "user":
                raise cmds.CommandError("/trust USER")
            user = conv.name
        name = user

        async def run() -> None:
            devices = await backend.accept_identity(name)
            if devices:
                self.host.notice(f"accepted {name}'s new identity key on {', '.join(devices)}; "
                            f"consider /verify {name}")
            else:
                self.host.notice(f"{name} has no changed identity to accept")
            self.model.notify("list")

        self.host.spawn(run())

    def cmd_devices(self, user: str | None = None) -> None:
        backend = self.host.need_backend()

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
            self.host.output(f"Devices of {who}", lines)

        self.host.spawn(run())

    def cmd_device_remove(self, device: str) -> None:
        backend = self.host.need_backend()
        if device == backend.device:
            raise cmds.CommandError("that is this device: use /logout instead")

        async def run() -> None:
            await backend.remove_device(device)
            self.host.notice(f"device {device} removed from your account")

        self.host.spawn(run())

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
        f = self.host.account_actions.get(name)
        if f is None:
            raise cmds.CommandError(f"/{name} is not available now")
        f()
