"""An in-memory `ChatBackend` for unit tests and the benchmark: no server, no store file.

Every call returns an already-fired Deferred (or a failed one for scripted errors) and is
recorded in ``calls``.
"""

from __future__ import annotations

import bisect
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from shtalk.client.localstore import HistoryMessage


class FakeBackend:
    def __init__(self, me: str = "alice", device: str = "laptop") -> None:
        self._me = me
        self._device = device
        self.store: dict[str, list[HistoryMessage]] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.errors: dict[str, Exception] = {}  # method name -> exception to fail with
        self.timers: dict[str, int] = {}
        self.trust: dict[str, str] = {}
        self.devices_of: dict[str, list[tuple[str, str]]] = {}
        self.rooms_joined: dict[str, set[str]] = {}
        self.users: set[str] = set()
        self.history_calls = 0
        self._n = 0

    @property
    def me(self) -> str:
        return self._me

    @property
    def device(self) -> str:
        return self._device

    # -- helpers for tests -------------------------------------------------------------
    def add_history(self, conversation: str, sender: str, body: str, ts: int,
                    state: str = "received", expires_at: float | None = None) -> HistoryMessage:
        self._n += 1
        m = HistoryMessage(f"{sender}/d/{self._n}", conversation, sender, "d", ts, body,
                           expires_at, state)
        rows = self.store.setdefault(conversation, [])
        if rows and rows[-1].ts > ts:
            bisect.insort(rows, m, key=lambda x: x.ts)
        else:
            rows.append(m)
        return m

    def _call(self, name: str, *args: Any) -> Deferred[Any] | None:
        self.calls.append((name, args))
        error = self.errors.get(name)
        if error is not None:
            return fail(error)
        return None

    # -- ChatBackend ---------------------------------------------------------------------
    def history(self, conversation: str, limit: int,
                before_ts: int | None) -> Deferred[list[HistoryMessage]]:
        self.history_calls += 1
        rows = self.store.get(conversation, [])
        end = len(rows) if before_ts is None else bisect.bisect_left(
            rows, before_ts, key=lambda x: x.ts)
        return succeed(rows[max(0, end - limit):end])

    def conversations(self) -> Deferred[list[tuple[str, int, int]]]:
        out = [(k, len(v), v[-1].ts if v else 0) for k, v in self.store.items()]
        out.sort(key=lambda x: -x[2])
        return succeed(out)

    def send(self, conversation: str, body: str) -> Deferred[str]:
        failed = self._call("send", conversation, body)
        if failed is not None:
            return failed
        m = self.add_history(conversation, self._me, body, 10**12 + self._n, "sent")
        return succeed(m.id)

    def set_timer(self, conversation: str, seconds: int) -> Deferred[None]:
        self.timers[conversation] = seconds
        return self._call("set_timer", conversation, seconds) or succeed(None)

    def timer(self, conversation: str) -> int:
        return self.timers.get(conversation, 0)

    def search(self, text: str) -> Deferred[list[HistoryMessage]]:
        self._call("search", text)
        hits = [m for rows in self.store.values() for m in rows
                if text.casefold() in m.body.casefold()]
        return succeed(sorted(hits, key=lambda m: m.ts)[-100:])

    def create_room(self, room: str, invite_only: bool) -> Deferred[dict[str, Any]]:
        failed = self._call("create_room", room, invite_only)
        if failed is not None:
            return failed
        self.rooms_joined[room] = {self._me}
        return succeed({"room": room, "invite_only": invite_only, "role": "owner"})

    def join_room(self, room: str) -> Deferred[dict[str, Any]]:
        failed = self._call("join_room", room)
        if failed is not None:
            return failed
        members = self.rooms_joined.setdefault(room, set())
        members.add(self._me)
        return succeed({"room": room, "members": [{"user": u} for u in sorted(members)]})

    def leave_room(self, room: str) -> Deferred[None]:
        self.rooms_joined.pop(room, None)
        return self._call("leave_room", room) or succeed(None)

    def invite(self, room: str, user: str) -> Deferred[None]:
        return self._call("invite", room, user) or succeed(None)

    def kick(self, room: str, user: str) -> Deferred[None]:
        return self._call("kick", room, user) or succeed(None)

    def members(self, room: str) -> Deferred[list[dict[str, Any]]]:
        failed = self._call("members", room)
        if failed is not None:
            return failed
        return succeed([{"user": u, "role": "member"}
                        for u in sorted(self.rooms_joined.get(room, ()))])

    def rooms(self) -> Deferred[list[dict[str, Any]]]:
        self._call("rooms")
        return succeed([{"room": r, "joined": True, "invite_only": False}
                        for r in sorted(self.rooms_joined)])

    def devices(self, user: str | None) -> Deferred[list[dict[str, Any]]]:
        self._call("devices", user)
        if user is None:
            return succeed([{"id": self._device, "label": "", "online": True}] + [
                {"id": d, "label": "", "online": False}
                for d, _ in self.devices_of.get(self._me, [])])
        return succeed([{"id": d, "label": "", "online": False}
                        for d, _ in self.devices_of.get(user, [])])

    def remove_device(self, device: str) -> Deferred[None]:
        return self._call("remove_device", device) or succeed(None)

    def accept_identity(self, user: str) -> Deferred[list[str]]:
        self._call("accept_identity", user)
        changed = [d for d, s in self.devices_of.get(user, []) if s == "changed"]
        self.devices_of[user] = [(d, "tofu" if s == "changed" else s)
                                 for d, s in self.devices_of.get(user, [])]
        self.trust[user] = "unverified"
        return succeed(changed)

    def mark_verified(self, user: str, device: str) -> Deferred[None]:
        self._call("mark_verified", user, device)
        self.devices_of[user] = [(d, "verified" if d == device else s)
                                 for d, s in self.devices_of.get(user, [])]
        self.trust[user] = "verified"
        return succeed(None)

    def safety_number(self, user: str, device: str) -> str:
        return "12345 67890 12345 67890 12345 67890 12345 67890 12345 67890 12345 67890"

    def trust_state(self, user: str) -> str:
        return self.trust.get(user, "")

    def contact_device_states(self, user: str) -> list[tuple[str, str]]:
        return list(self.devices_of.get(user, []))

    def known_users(self) -> list[str]:
        users = set(self.users)
        for members in self.rooms_joined.values():
            users.update(members)
        return sorted(users)

    def joined_rooms(self) -> list[str]:
        return sorted(self.rooms_joined)

    def room_member_count(self, room: str) -> int | None:
        members = self.rooms_joined.get(room)
        return len(members) if members is not None else None

    def change_passphrase(self, old: str, new: str) -> Deferred[None]:
        return self._call("change_passphrase", old, new) or succeed(None)

    def logout(self) -> Deferred[None]:
        return self._call("logout") or succeed(None)
