"""ChatUser: what one authenticated device may do (the avatar of twisted.cred).

Each method checks what a request means (names, membership, roles) against the caches,
writes through the store, updates the caches through their one writer (rooms, users)
once the store committed, and tells the people concerned through presence.  Refusals
are `shtalk.server.eserver.Refused` kinds; the connection turns them into wire errors.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from shtalk.server.chat import pushes
from shtalk.server.chat.audience import Audience
from shtalk.server.chat.naming import room_key, user_key
from shtalk.server.chat.presence import Presence
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.users import Users
from shtalk.server.eserver import (
    AlreadyMember,
    BadRequest,
    Conflict,
    EnvelopeTooLarge,
    Forbidden,
    InviteRequired,
    MissingEnvelope,
    NoSuchDevice,
    NotAMember,
    RoomExists,
)
from shtalk.server.iserver import IChatMind, IChatUser, IDeliveryBus, IStore
from shtalk.server.ops.monitor import Monitor
from shtalk.server.store.mailbox import inbox_owner, room_mailbox, user_mailbox
from shtalk.server.store.records import NewMessage, OneTimeKey, Room, User

MODERATORS = ("owner", "admin")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _Outgoing(NamedTuple):
    """A send as `ChatUser.send` was given it, on its way through the slow path."""

    to: Mapping[str, str]
    envelope: bytes | None
    envelopes: Mapping[str, bytes] | None
    client_id: str
    expires_in: int | None


@dataclass(frozen=True)
class ChatParts:
    """What every avatar works with (built once, in shtalk.server.compose)."""

    store: IStore
    users: Users
    rooms: Rooms
    presence: Presence
    audience: Audience
    bus: IDeliveryBus
    clock: IReactorTime
    max_envelope_bytes: int
    monitor: Monitor | None = None  # metadata signals of each send; None: not monitored


@implementer(IChatUser)
class ChatUser:
    def __init__(
        self, parts: ChatParts, user: User, device_id: str, family: str | None, mind: IChatMind
    ) -> None:
        self.parts = parts
        self.store = parts.store
        self.rooms = parts.rooms
        self.users = parts.users
        self.user = user
        self.device_id = device_id
        self.family = family  # None until a password login opens one
        self.mind = mind
        self._send_gate: Deferred[None] | None = None
        # Room names as this device writes them -> room keys (send's fast path).
        self._room_keys: dict[str, str] = {}

    def _tell_room(self, room: Room, line: bytes) -> None:
        self.parts.presence.send_to_users(self.rooms.members.get(room.id, {}), line)

    # rooms ------------------------------------------------------------------
    @inlineCallbacks
    def create_room(self, raw: str, invite_only: bool) -> Any:
        display, key = room_key(raw)
        try:
            room: Room = yield self.store.create_room(display, key, self.user.id, invite_only)
        except Conflict:
            raise RoomExists("a room with that name exists; join it or pick another") from None
        self.rooms.created(room, self.user.id)
        self.parts.bus.membership_changed(None, room.id, self.user.id, True)
        return {"room": room.name, "invite_only": room.invite_only, "role": "owner"}

    @inlineCallbacks
    def join(self, raw: str) -> Any:
        room, members = yield self.rooms.room(raw)
        if self.user.id in members:
            raise AlreadyMember("you are already in that room")
        if room.invite_only:
            invited = yield self.store.has_invite(room.id, self.user.id)
            if not invited:
                raise InviteRequired("that room is invite-only; ask a member to invite you")
        link = yield self.store.add_member(room.id, self.user.id, "member")
        self.rooms.joined(room, self.user.id)
        self.parts.bus.membership_changed(link, room.id, self.user.id, True)
        self._tell_room(room, pushes.member(room.name, self.user.name, "joined"))
        listed = yield self._members(members)
        return {"room": room.name, "invite_only": room.invite_only, "members": listed}

    @inlineCallbacks
    def _members(self, members: Mapping[int, str]) -> Any:
        members = dict(members)
        online = yield self.parts.presence.online_among(members)
        name = self.users.name
        return [
            {"user": name(uid), "role": role, "online": uid in online}
            for uid, role in sorted(members.items(), key=lambda kv: name(kv[0]))
        ]

    def _require_member(self, members: Mapping[int, str]) -> str:
        role = members.get(self.user.id)
        if role is None:
            raise NotAMember("you are not in that room; join it first")
        return role

    @inlineCallbacks
    def leave(self, raw: str) -> Any:
        room, members = yield self.rooms.room(raw)
        role = self._require_member(members)
        link = yield self.store.remove_member(room.id, self.user.id)
        self._tell_room(room, pushes.member(room.name, self.user.name, "left"))
        self.rooms.left(room, self.user.id)
        self.parts.bus.membership_changed(link, room.id, self.user.id, False)
        if role == "owner" and members:
            # The room keeps a moderator: the first admin, else the first member.
            heir = min(members, key=lambda uid: (members[uid] != "admin", uid))
            yield self.store.set_role(room.id, heir, "owner")
            self.rooms.role_set(room, heir, "owner")
            self._tell_room(room, pushes.member(room.name, self.users.name(heir), "role",
                                                role="owner"))
        return {"room": room.name}

    @inlineCallbacks
    def invite(self, raw_room: str, raw_user: str) -> Any:
        room, members = yield self.rooms.room(raw_room)
        role = self._require_member(members)
        if room.invite_only and role not in MODERATORS:
            raise Forbidden("only the owner and admins invite here")
        target: User = yield self.users.user(raw_user)
        if target.id in members:
            raise AlreadyMember(f"{target.name} is already in the room")
        yield self.store.add_invite(room.id, target.id, self.user.id)
        self.parts.presence.send_to_users([target.id], pushes.invited(room.name, self.user.name))
        return {"room": room.name, "user": target.name}

    @inlineCallbacks
    def kick(self, raw_room: str, raw_user: str) -> Any:
        room, members = yield self.rooms.room(raw_room)
        role = self._require_member(members)
        target: User = yield self.users.user(raw_user)
        target_role = members.get(target.id)
        if target_role is None:
            raise NotAMember(f"{target.name} is not in the room")
        if (
            role not in MODERATORS
            or target_role == "owner"
            or (role == "admin" and target_role == "admin")
        ):
            raise Forbidden("you may not kick that member")
        link = yield self.store.remove_member(room.id, target.id)
        # Tell everyone, the kicked user included, before they leave the cache.
        self._tell_room(room, pushes.member(room.name, target.name, "kicked", by=self.user.name))
        self.rooms.left(room, target.id)
        self.parts.bus.membership_changed(link, room.id, target.id, False)
        return {"room": room.name, "user": target.name}

    @inlineCallbacks
    def set_role(self, raw_room: str, raw_user: str, new_role: str) -> Any:
        room, members = yield self.rooms.room(raw_room)
        if self._require_member(members) != "owner":
            raise Forbidden("only the owner changes roles")
        target: User = yield self.users.user(raw_user)
        if members.get(target.id) in (None, "owner"):
            raise NotAMember(f"{target.name} is not a member")
        yield self.store.set_role(room.id, target.id, new_role)
        self.rooms.role_set(room, target.id, new_role)
        self._tell_room(room, pushes.member(room.name, target.name, "role", role=new_role))
        return {"room": room.name, "user": target.name, "role": new_role}

    @inlineCallbacks
    def list_rooms(self) -> Any:
        rows = yield self.store.rooms_visible_to(self.user.id)
        return {
            "rooms": [
                {"room": r.name, "invite_only": r.invite_only, "members": n, "joined": joined}
                for r, n, joined in rows
            ]
        }

    @inlineCallbacks
    def members(self, raw: str) -> Any:
        room, members = yield self.rooms.room(raw)
        self._require_member(members)
        listed = yield self._members(members)
        return {"room": room.name, "members": listed}

    @inlineCallbacks
    def devices(self, raw_user: str | None) -> Any:
        user = self.user if raw_user is None else (yield self.users.user(raw_user))
        devices = yield self.store.devices(user.id)
        shown = yield self.parts.audience.may_see_presence(self.user.id, user.id)
        online = yield self.parts.presence.devices_online_anywhere(user.id)
        return {
            "user": user.name,
            "devices": [
                {"id": d.device_id, "label": d.label,
                 **({"online": d.device_id in online} if shown else {})}
                for d in devices
            ],
        }

    # messages -----------------------------------------------------------------
    def send(
        self,
        to: Mapping[str, str],
        envelope: bytes | None,
        envelopes: Mapping[str, bytes] | None,
        client_id: str,
        expires_in: int | None,
    ) -> Deferred[Any]:
        # Fast path: a room send with one common envelope whose room and members are
        # cached, and no earlier send of this device still being prepared, is queued
        # for the store right here (still in arrival order), with one plain callback.
        room_raw = to.get("room")
        if self._send_gate is None and not envelopes and room_raw is not None:
            rooms = self.rooms
            key = self._room_keys.get(room_raw)
            room = rooms.by_key.get(key) if key is not None else None
            members = rooms.members.get(room.id) if room is not None else None
            if room is not None and members is not None:
                self._check_envelopes(envelope, None)
                self._require_member(members)
                message = self._message(
                    (room_mailbox(room.id),), pushes.room_target(room.name), client_id,
                    expires_in, envelope, {},
                )  # fmt: skip
                d: Deferred[Any] = self.store.append(message)
                return d.addCallback(self._stored, message)
        return self._send(_Outgoing(to, envelope, envelopes, client_id, expires_in))

    def _stored(self, result: Any, message: NewMessage) -> dict[str, Any]:
        """The send is committed: deliver it, then answer the sender."""
        if not result.duplicate:
            publish = self.parts.bus.publish
            for stored in result.messages:
                publish(stored)
            monitor = self.parts.monitor
            if monitor is not None:  # metadata of the send
                monitor.sent(
                    self.user.id, self.user.name, self.user.created,
                    [u for u in map(inbox_owner, message.mailboxes) if u is not None],
                    [len(e) for e in (message.envelope, *message.envelopes.values()) if e],
                )  # fmt: skip
        return {"seq": result.seqs[0], "ts": message.ts, "duplicate": result.duplicate}

    @inlineCallbacks
    def _send(self, out: _Outgoing) -> Any:
        # Sends of one device are stored in the order they arrived: each waits
        # until the previous one has been queued for commit (not committed, so
        # group commit still batches them).  Lookups usually hit the caches,
        # so this rarely waits at all.
        previous, gate = self._send_gate, Deferred[None]()
        self._send_gate = gate
        try:
            if previous is not None and not previous.called:
                yield previous
            appended = yield self._prepare_send(out)
        finally:
            gate.callback(None)
            if self._send_gate is gate:
                self._send_gate = None
        message, d = appended
        result = yield d
        return self._stored(result, message)

    @inlineCallbacks
    def _prepare_send(self, out: _Outgoing) -> Any:
        """Check and resolve a send; return the message and the store's Deferred."""
        to, envelope, envelopes, client_id, expires_in = out
        self._check_envelopes(envelope, envelopes)
        if "room" in to:
            room, members = yield self.rooms.room(to["room"])
            if len(self._room_keys) < 256:  # for the fast path in send()
                self._room_keys[to["room"]] = room.key
            self._require_member(members)
            mailboxes: tuple[str, ...] = (room_mailbox(room.id),)
            target = pushes.room_target(room.name)
            allowed = set(members)
        else:
            peer: User = yield self.users.user(to["user"])
            target = pushes.user_target(peer.name)
            own = self.users.devices_of(self.user.id) or {}
            mine = user_mailbox(self.user.id)
            if peer.id == self.user.id:
                mailboxes = (mine,)
            else:
                # The sender's other devices get a copy through the sender's inbox.
                theirs = user_mailbox(peer.id)
                mailboxes = (theirs, mine) if len(own) > 1 else (theirs,)
            allowed = {peer.id, self.user.id}
        per_device: dict[tuple[int, str], bytes] = {}
        if envelopes:
            per_device = yield self._resolve_devices(envelopes, allowed)
        message = self._message(mailboxes, target, client_id, expires_in, envelope, per_device)
        return message, self.store.append(message)

    def _check_envelopes(
        self, envelope: bytes | None, envelopes: Mapping[str, bytes] | None
    ) -> None:
        if envelope is None and not envelopes:
            raise MissingEnvelope("give 'envelope' or 'envelopes'")
        limit = self.parts.max_envelope_bytes
        if (envelope is not None and len(envelope) > limit) or any(
            len(e) > limit for e in (envelopes or {}).values()
        ):
            raise EnvelopeTooLarge(f"envelopes are limited to {limit} bytes here")

    def _message(
        self,
        mailboxes: tuple[str, ...],
        target: str,
        client_id: str,
        expires_in: int | None,
        envelope: bytes | None,
        per_device: dict[tuple[int, str], bytes],
    ) -> NewMessage:
        now = self.parts.clock.seconds()
        return NewMessage(
            mailboxes=mailboxes,
            sender_id=self.user.id,
            sender_device=self.device_id,
            client_id=client_id,
            ts=int(now * 1000),
            expires_at=now + expires_in if expires_in is not None else None,
            target=target,
            envelope=envelope,
            envelopes=per_device,
        )

    @inlineCallbacks
    def _resolve_devices(self, envelopes: Mapping[str, bytes], allowed: set[int]) -> Any:
        out: dict[tuple[int, str], bytes] = {}
        known: dict[str, tuple[int, set[str]]] = {}
        for k, env in envelopes.items():
            raw_user, _, device_id = k.partition("/")
            _, ukey = user_key(raw_user)
            if ukey not in known:
                user: User = yield self.users.user(raw_user)
                if user.id not in allowed:
                    raise BadRequest(f"envelopes: {user.name} is not a recipient")
                # Online users' devices are cached (kept in step by login and
                # device removal): a DM to someone online costs no database read.
                cached = self.users.devices_of(user.id)
                if cached is None:
                    devs = yield self.store.devices(user.id)
                    known[ukey] = (user.id, {d.device_id for d in devs})
                else:
                    known[ukey] = (user.id, set(cached))
            uid, device_ids = known[ukey]
            if device_id not in device_ids:
                raise NoSuchDevice(f"envelopes: '{k}' is not a device; refresh the device list")
            out[(uid, device_id)] = env
        return out

    # devices and keys ------------------------------------------------------------
    @inlineCallbacks
    def remove_device(self, device_id: str) -> Any:
        removed = yield self.store.remove_device(self.user.id, device_id)
        if not removed:
            raise NoSuchDevice("you have no device with that id")
        self.users.device_removed(self.user.id, device_id)
        self.parts.presence.revoke_device(
            self.user.id, device_id, "this device was removed from the account"
        )
        self.parts.audience.announce_keys(self.user.id, device_id, "removed")
        return {"device": device_id}

    @inlineCallbacks
    def publish_keys(
        self, bundle: bytes | None, one_time: Sequence[Mapping[str, Any]], replace: bool = False
    ) -> Any:
        keys = [OneTimeKey(k["kind"], k["id"], k["key"]) for k in one_time]
        counts, changed = yield self.store.publish_keys(
            self.user.id, self.device_id, bundle, keys, replace
        )
        if changed:  # a re-publish of the same bundle (every login) is not news
            self.parts.audience.announce_keys(self.user.id, self.device_id, "keys")
        return {"counts": counts}

    @inlineCallbacks
    def key_counts(self) -> Any:
        counts = yield self.store.key_counts(self.user.id, self.device_id)
        return {"counts": counts}

    @inlineCallbacks
    def fetch_keys(self, raw_user: str, device_id: str | None) -> Any:
        user: User = yield self.users.user(raw_user)
        claimed = yield self.store.claim_keys(user.id, device_id)
        if device_id is not None and not claimed:
            raise NoSuchDevice(f"{user.name} has no such device")
        return {
            "user": user.name,
            "devices": [
                {
                    "device": c.device_id,
                    "bundle": b64(c.bundle),
                    "one_time": {k.kind: {"id": k.key_id, "key": b64(k.key)} for k in c.one_time},
                }
                for c in claimed
            ],
        }

    def ack(self, seqs: Sequence[int]) -> Deferred[None]:
        d: Deferred[None] = self.store.ack(self.user.id, self.device_id, seqs)
        return d

    def pending(self) -> Any:
        return self.store.pending(self.user.id, self.device_id)

    def logout(self, family: str) -> Deferred[None]:
        d: Deferred[None] = self.store.revoke_session(family)
        return d
