"""The chat service: accounts, rooms and routing, as seen by one device (ChatUser).

Handlers validate the request's meaning (names, membership, roles) and turn
store refusals into protocol errors; the wire shape was checked already by
shtalk.wire.  Every write is committed before the client hears ``ok``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shtalk.server.chat.avatar import ChatUser
from shtalk.server.chat.delivery import IDeliveryBus, LocalBus, Router
from shtalk.server.chat.naming import check_email, room_key, user_key
from shtalk.server.cred.checkers import IChatUser
from shtalk.server.cred.passwords import PasswordHasher
from shtalk.server.cred.tokens import TokenIssuer, new_family, new_refresh_token, refresh_hash
from shtalk.server.iserver import Conflict, IStore
from shtalk.server.store.records import Device, Room, User
from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.frames import push
from shtalk.wire.passwords import check_password_policy
from shtalk.wire.schema import DEFAULT_ENVELOPE_BYTES

log = Logger()


class ChatService(Service):
    """Owns the router and the caches; hands out one ChatUser per authenticated device."""

    name = "chat"

    def __init__(
        self,
        store: IStore,
        hasher: PasswordHasher,
        issuer: TokenIssuer,
        clock: IReactorTime,
        min_password_length: int = 12,
        retention: float = 30 * 24 * 3600,
        purge_interval: float = 60.0,
        max_envelope_bytes: int = DEFAULT_ENVELOPE_BYTES,
    ) -> None:
        self.max_envelope_bytes = max_envelope_bytes
        self.store = store
        self.hasher = hasher
        self.issuer = issuer
        self.clock = clock
        self.min_password_length = min_password_length
        self.retention = retention
        self.purge_interval = purge_interval
        self.names: dict[int, str] = {}
        self.router = Router(self.user_name)
        self.bus: IDeliveryBus = LocalBus(self.router)
        self.user_devices: dict[int, dict[str, Device]] = {}
        self.user_rooms: dict[int, set[int]] = {}
        self.rooms_by_key: dict[str, Room] = {}
        self.users_by_key: dict[str, User] = {}  # active accounts only
        self._purge: Any = None
        # Seam for email verification (account-security issue): new accounts
        # start in this status.  "active" until verification lands.
        self.new_account_status = "active"
        # Operations (issue 7, shtalk.server.ops.service): limiter, monitor, moderation.
        self.ops: Any = None
        # Monitoring -> account security seam: subjects that must solve a CAPTCHA at
        # their next key interaction (see require_captcha).
        self.captcha_required_accounts: set[int] = set()
        self.captcha_required_addresses: set[str] = set()

    def now(self) -> float:
        return self.clock.seconds()

    def require_captcha(self, account_id: int | None = None, address: str | None = None) -> None:
        """SEAM (monitoring -> account security, issue 6): the account and/or client
        address must solve a CAPTCHA at its next key interaction (login, register,
        password requests, and ``send`` for a session already logged in).  The
        monitor calls this when a flag's action is ``captcha``; the
        account-security code honours ``captcha_required_accounts`` /
        ``captcha_required_addresses`` and discards the entry once a CAPTCHA is solved."""
        if account_id is not None:
            self.captcha_required_accounts.add(account_id)
        if address is not None:
            self.captcha_required_addresses.add(address)

    def user_name(self, user_id: int) -> str:
        return self.names.get(user_id, f"#{user_id}")

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._schedule_purge()

    def stopService(self) -> None:
        if self._purge is not None and self._purge.active():
            self._purge.cancel()
        super().stopService()  # type: ignore[no-untyped-call]

    def _schedule_purge(self) -> None:
        def purge() -> None:
            d = self.store.purge_expired(self.now())
            d.addErrback(lambda f: log.failure("purging expired messages failed", f))
            d.addBoth(lambda _: self._schedule_purge())

        self._purge = self.clock.callLater(self.purge_interval, purge)

    # accounts -------------------------------------------------------------
    @inlineCallbacks
    def check_registration(self, username: str, password: str, email: str) -> Any:
        """What a registration is refused for before any CAPTCHA or bcrypt: the name's
        form, the password policy, the email's form, a name already taken (registering
        always showed that; docs/SECURITY.md, "Enumeration")."""
        display, key = user_key(username)
        check_password_policy(password, display, self.min_password_length)
        check_email(email)
        existing = yield self.store.user_by_key(key)
        if existing is not None:
            raise ProtocolError(ErrorCode.USERNAME_TAKEN, "that username is taken; pick another")

    @inlineCallbacks
    def register(self, username: str, password: str, email: str) -> Any:
        display, key = user_key(username)
        check_password_policy(password, display, self.min_password_length)
        email = check_email(email)
        pw_hash = yield self.hasher.hash(password)
        try:
            user = yield self.store.create_user(
                display, key, email, pw_hash, self.new_account_status
            )
        except Conflict:
            raise ProtocolError(
                ErrorCode.USERNAME_TAKEN, "that username is taken; pick another"
            ) from None
        log.info("account registered", user_id=user.id)
        return {"user": user.name, "status": user.status}

    @inlineCallbacks
    def start_session(self, user_id: int, device_id: str) -> Any:
        """After a password login: open a refresh-token family for the device."""
        family = new_family()
        refresh = new_refresh_token()
        now = self.now()
        yield self.store.create_session(
            family, user_id, device_id, refresh_hash(refresh), now + self.issuer.refresh_ttl
        )
        access = self.issuer.issue_access(user_id, device_id, family, now)
        return family, access, refresh

    @inlineCallbacks
    def refresh(self, token: str) -> Any:
        """Rotate: the old token dies; reuse of a dead one kills the whole family."""
        new = new_refresh_token()
        now = self.now()
        session = yield self.store.rotate_refresh(
            refresh_hash(token), refresh_hash(new), now + self.issuer.refresh_ttl, now
        )
        access = self.issuer.issue_access(session.user_id, session.device_id, session.family, now)
        return session, access, new

    @inlineCallbacks
    def avatar_for(self, user_id: int, device_id: str | None, family: str | None, mind: Any) -> Any:
        """The realm's work.  No device in the avatar id means a password login,
        which may introduce the device named by the mind."""
        user: User | None = yield self.store.user_by_id(user_id)
        if user is None:
            raise ProtocolError(ErrorCode.INVALID_CREDENTIALS, "no such account")
        self.names[user.id] = user.name
        if device_id is None:
            device_id = mind.device_id
            yield self.store.upsert_device(user.id, device_id, mind.device_label)
        devices = yield self.store.devices(user.id)
        self.user_devices[user.id] = {d.device_id: d for d in devices}
        if device_id not in self.user_devices[user.id]:
            raise ProtocolError(
                ErrorCode.NO_SUCH_DEVICE, "this device was removed; log in again with a password"
            )
        rooms = yield self.store.rooms_of(user.id)
        self.user_rooms[user.id] = {r.id for r in rooms}
        for room in rooms:
            yield self.load_room(room)
        if self.ops is not None:
            # The monitor knows whom this account talked to before its first send.
            yield self.ops.monitor.preload(user.id)
        avatar = ChatUser(self, user, device_id, family, mind)
        first = self.router.attach(user.id, device_id, mind)
        if first:
            yield self.announce_presence(user.id, "online")

        def logout() -> None:
            if self.router.detach(user.id, avatar.device_id, mind):
                self.announce_presence(user.id, "offline")

        return IChatUser, avatar, logout

    @inlineCallbacks
    def load_room(self, room: Room) -> Any:
        if room.id not in self.router.room_members:
            members = yield self.store.members(room.id)
            self.router.room_members[room.id] = {m.user_id: m.role for m in members}
            for m in members:
                self.names[m.user_id] = m.user_name
        self.router.room_names[room.id] = room.name
        return self.router.room_members[room.id]

    @inlineCallbacks
    def announce_presence(self, user_id: int, status: str) -> Any:
        interested = yield self.presence_audience(user_id)
        interested.discard(user_id)
        line = push("presence", user=self.user_name(user_id), status=status)
        self.router.send_to_users(interested, line)
        if status == "offline":
            self.user_rooms.pop(user_id, None)
            self.user_devices.pop(user_id, None)

    @inlineCallbacks
    def room(self, raw: str) -> Any:
        # Rooms never change name or kind, so a cache hit costs no thread hop
        # (which also keeps a device's sends in order without waiting).
        _, key = room_key(raw)
        room: Room | None = self.rooms_by_key.get(key)
        if room is None:
            room = yield self.store.room_by_key(key)
            if room is None:
                raise ProtocolError(ErrorCode.NO_SUCH_ROOM, "no such room; /rooms lists them")
            self.rooms_by_key[key] = room
        members = yield self.load_room(room)
        return room, members

    @inlineCallbacks
    def user(self, raw: str) -> Any:
        _, key = user_key(raw)
        user: User | None = self.users_by_key.get(key)
        if user is None:
            user = yield self.store.user_by_key(key)
            if user is None or user.status != "active":
                raise ProtocolError(ErrorCode.NO_SUCH_USER, "no such user")
            self.users_by_key[key] = user
        self.names[user.id] = user.name
        return user

    def forget_user(self, key: str) -> None:
        """Drop a cached account after its status changed (suspension, deletion)."""
        self.users_by_key.pop(key, None)

    def _online_with(self, user_id: int, others: Iterable[int]) -> set[int]:
        """``others`` and the members of ``user_id``'s rooms, those online."""
        found = set(others)
        for rid in self.user_rooms.get(user_id, ()):
            found.update(self.router.room_members.get(rid, {}))
        return {u for u in found if self.router.is_online(u)}

    @inlineCallbacks
    def interested_in(self, user_id: int) -> Any:
        """Users who share a room or a conversation with ``user_id`` and are online."""
        partners = yield self.store.dm_partners(user_id)
        return self._online_with(user_id, partners)

    # Presence: whether someone is online shows only to people who share a room with
    # them, or to whom they have written directly (being written to by a stranger
    # shows the stranger nothing).  Device lists stay open to everyone who may message
    # the user (E2EE needs them), without the online marks.
    @inlineCallbacks
    def presence_audience(self, user_id: int) -> Any:
        """Online users who may see ``user_id``'s presence."""
        readers = yield self.store.presence_readers(user_id)
        return self._online_with(user_id, readers)

    @inlineCallbacks
    def may_see_presence(self, viewer_id: int, subject_id: int) -> Any:
        if viewer_id == subject_id:
            return True
        members = self.router.room_members
        # The viewer is logged in, so its rooms and their members are cached.
        if any(subject_id in members.get(rid, {}) for rid in self.user_rooms.get(viewer_id, ())):
            return True
        written = yield self.store.has_written(subject_id, viewer_id)
        return bool(written)

    @inlineCallbacks
    def presence_snapshot(self, user_id: int) -> Any:
        """``presence`` pushes for a device that just logged in (after its backlog), by the
        same rule as the live ones: every user whose presence it may see (room members,
        and those who have written to it directly) who is online now, and of those who
        have written to it, the ones who are not (offline room members stay unknown, so
        a big room costs no line per absent member)."""
        writers = set((yield self.store.presence_subjects(user_id)))
        online = self._online_with(user_id, writers)
        wanted = (online | writers) - {user_id}
        missing = [u for u in wanted if u not in self.names]
        if missing:
            users = yield self.store.users_by_ids(missing)
            for uid, user in users.items():
                self.names[uid] = user.name
        return [
            push("presence", user=self.user_name(u), status="online" if u in online else "offline")
            for u in sorted(wanted, key=self.user_name)
            if u in self.names
        ]

    @inlineCallbacks
    def announce_keys(self, user_id: int, device_id: str, event: str) -> Any:
        """New or removed device keys are never silent: contacts are told to refetch."""
        users = yield self.interested_in(user_id)
        users.add(user_id)
        line = push("device", user=self.user_name(user_id), device=device_id, event=event)
        self.router.send_to_users(users, line)

    def member_event(self, room: Room, user_name: str, event: str, **extra: Any) -> None:
        line = push("member", room=room.name, user=user_name, event=event, **extra)
        self.router.send_to_users(self.router.room_members.get(room.id, {}), line)
