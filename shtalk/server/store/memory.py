"""IStore in memory: the SQLite store's semantics with no file, no thread, no waiting.

Why: unit tests of the connection, the avatar and the handlers need a store that
behaves like the real one (sequence numbers, cursors and acks, expiry, one-time keys
claimed once, refresh-token rotation and reuse detection, conflicts, email codes,
TOTP steps) yet answers at once, so a test can run the reactor's work step by step
on a test clock without polling a database.  Every method answers with an
already-fired Deferred; time comes from the clock it is given::

    store = MemoryStore(clock=Clock())

The shared contract tests (``shtalk.test.server.store_contract``) run against this store and
the SQLite one alike.  Differences that no IStore caller can see: an acknowledged
message is deleted at once (SQLite sweeps every ``sweep_interval``), and a write that
names a missing account, device or room fails with `MissingRow` (SQLite: a foreign-key
IntegrityError).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from shtalk.server.eserver import Conflict, TokenReuse, TokenRevoked, TokenUnknown
from shtalk.server.iserver import IStore
from shtalk.server.store.mailbox import inbox_owner, room_mailbox, user_mailbox
from shtalk.server.store.memcodes import MemoryCodeStore
from shtalk.server.store.memtables import (
    MessageRow,
    MissingRow,
    OneTimeRow,
    SessionRow,
    Tables,
    TokenRow,
    answered,
)
from shtalk.server.store.records import (
    AppendResult,
    ChainLink,
    ClaimedBundle,
    Device,
    Member,
    NewMessage,
    OneTimeKey,
    Room,
    Session,
    StoredMessage,
    User,
)
from shtalk.server.store.sql.prekeys import KINDS, MAX_ONE_TIME_KEYS

__all__ = ["MemoryStore", "MissingRow"]


@implementer(IStore)
class MemoryStore:
    """IStore on dicts.  Open from the start; `close` makes it refuse (StoreClosed)."""

    path = ":memory:"

    def __init__(self, clock: IReactorTime, retention: float = 30 * 24 * 3600) -> None:
        self.retention = float(retention)
        self.tables = Tables(clock)
        self.codes = MemoryCodeStore(self.tables)

    # --- life cycle ---

    def open(self) -> Deferred[None]:
        self.tables.open = True
        return succeed(None)

    def close(self) -> Deferred[None]:
        self.tables.open = False
        return succeed(None)

    def overloaded(self) -> bool:
        return False

    def when_drained(self) -> Deferred[None]:
        return succeed(None)

    def delivered(self, mailbox: str, seq: int) -> None:
        """Every seq's mailbox is in the tables already."""

    def add_batch_listener(self, listener: object) -> None:
        """No batches: each answer fires in its caller's turn."""

    # --- accounts ---

    @answered
    def create_user(self, name: str, key: str, email: str, pw_hash: bytes, status: str) -> User:
        t = self.tables
        if key in t.user_keys:
            raise Conflict(f"user name {key!r} is taken")
        t.last_user += 1
        user = User(t.last_user, name, key, pw_hash, status, t.now())
        t.users[user.id] = user
        t.user_keys[key] = user.id
        t.emails[user.id] = email
        return user

    @answered
    def email_of(self, user_id: int) -> str | None:
        return self.tables.emails.get(user_id)

    @answered
    def user_by_key(self, key: str) -> User | None:
        t = self.tables
        return t.users.get(t.user_keys.get(key, 0))

    @answered
    def user_by_id(self, user_id: int) -> User | None:
        return self.tables.users.get(user_id)

    @answered
    def users_by_ids(self, user_ids: Iterable[int]) -> dict[int, User]:
        users = self.tables.users
        return {uid: users[uid] for uid in sorted(set(user_ids)) if uid in users}

    @answered
    def set_status(self, user_id: int, status: str) -> bool:
        t = self.tables
        user = t.users.get(user_id)
        if status != "active":
            t.revoke_sessions(user_id)
        if user is None or user.status == "deleted":
            return False
        t.users[user_id] = dataclasses.replace(user, status=status)
        return True

    @answered
    def delete_account(self, user_id: int, dummy_hash: bytes) -> bool:
        return self.tables.tombstone(user_id, dummy_hash)

    # --- devices and the prekey directory ---

    @answered
    def upsert_device(self, user_id: int, device_id: str, label: str) -> Device:
        t = self.tables
        old = t.devices.get((user_id, device_id))
        if old is not None:
            device = dataclasses.replace(old, label=label)
            t.devices[(user_id, device_id)] = device
            return device
        t.need_user(user_id)
        device = Device(user_id, device_id, label, t.now())
        t.devices[(user_id, device_id)] = device
        readers = [user_mailbox(user_id)] + [
            room_mailbox(rid) for rid, members in t.members.items() if user_id in members
        ]
        for mailbox in readers:
            t.cursors.setdefault(mailbox, {})[(user_id, device_id)] = t.last_seq
        return device

    @answered
    def devices(self, user_id: int) -> list[Device]:
        mine = [d for (uid, _), d in self.tables.devices.items() if uid == user_id]
        return sorted(mine, key=lambda d: (d.created, d.device_id))

    @answered
    def remove_device(self, user_id: int, device_id: str) -> bool:
        t = self.tables
        existed = t.drop_device(user_id, device_id)
        t.revoke_sessions(user_id, device_id)
        return existed

    @answered
    def publish_keys(
        self,
        user_id: int,
        device_id: str,
        bundle: bytes | None,
        one_time: Sequence[OneTimeKey],
        replace: bool = False,
    ) -> tuple[dict[str, int], bool]:
        t = self.tables
        dev = (user_id, device_id)
        keys = {} if replace else dict(t.one_time.get(dev, {}))
        have = self._counts(keys)
        new: list[OneTimeKey] = []
        for k in one_time:
            if have[k.kind] >= MAX_ONE_TIME_KEYS:
                continue
            have[k.kind] += 1
            new.append(k)
        if bundle is not None or new:
            t.need_device(user_id, device_id)
        changed = bundle is not None and t.bundles.get(dev) != bundle
        if bundle is not None:
            t.bundles[dev] = bundle
        for k in new:
            # A re-published id is ignored: a key handed out once is never reused.
            keys.setdefault((k.kind, k.key_id), OneTimeRow(k.key))
        if keys or dev in t.one_time:
            t.one_time[dev] = keys
        return self._counts(keys), changed or replace

    @staticmethod
    def _counts(keys: dict[tuple[str, int], OneTimeRow]) -> dict[str, int]:
        out = dict.fromkeys(KINDS, 0)
        for (kind, _), row in keys.items():
            if row.claimed is None:
                out[kind] += 1
        return out

    @answered
    def key_counts(self, user_id: int, device_id: str) -> dict[str, int]:
        return self._counts(self.tables.one_time.get((user_id, device_id), {}))

    @answered
    def claim_keys(self, user_id: int, device_id: str | None) -> list[ClaimedBundle]:
        t = self.tables
        now = t.now()
        found = sorted(
            (dev, bundle) for (uid, dev), bundle in t.bundles.items()
            if uid == user_id and device_id in (None, dev)
        )  # fmt: skip
        out = []
        for dev, bundle in found:
            keys = t.one_time.get((user_id, dev), {})
            claimed = []
            for kind in KINDS:
                free = [i for (k, i), r in keys.items() if k == kind and r.claimed is None]
                if not free:
                    continue
                row = keys[(kind, min(free))]
                claimed.append(OneTimeKey(kind, min(free), row.key))
                row.claimed, row.key = now, b""
            out.append(ClaimedBundle(dev, bundle, tuple(claimed)))
        return out

    @answered
    def device_bundle(self, user_id: int, device_id: str) -> bytes | None:
        return self.tables.bundles.get((user_id, device_id))

    # --- sessions ---

    @answered
    def create_session(
        self, family: str, user_id: int, device_id: str, refresh_hash: bytes, expires: float
    ) -> None:
        t = self.tables
        if family in t.sessions or refresh_hash in t.tokens:
            raise Conflict("session family or refresh token already exists")
        t.need_user(user_id)
        t.sessions[family] = SessionRow(user_id, device_id, expires)
        t.tokens[refresh_hash] = TokenRow(family, expires)

    @answered
    def rotate_refresh(
        self, old_hash: bytes, new_hash: bytes, new_expires: float, now: float
    ) -> Session:
        t = self.tables
        token = t.tokens.get(old_hash)
        s = None if token is None else t.sessions.get(token.family)
        if token is None or s is None:
            raise TokenUnknown("unknown refresh token")
        if s.revoked:
            raise TokenRevoked("the refresh token's session is revoked")
        if token.used:  # reuse, even if the replayed copy is by now expired
            s.revoked = True
            raise TokenReuse("refresh token reused: the session is revoked", token.family)
        if token.expires <= now or s.expires <= now:
            raise TokenUnknown("expired refresh token")
        if new_hash in t.tokens:
            raise Conflict("new refresh token already exists")
        token.used = True
        t.tokens[new_hash] = TokenRow(token.family, new_expires)
        s.expires = new_expires
        return Session(token.family, s.user_id, s.device_id, new_expires, False)

    @answered
    def session(self, family: str) -> Session | None:
        s = self.tables.sessions.get(family)
        return None if s is None else Session(family, s.user_id, s.device_id, s.expires,
                                              s.revoked)

    @answered
    def revoke_session(self, family: str) -> None:
        s = self.tables.sessions.get(family)
        if s is not None:
            s.revoked = True

    @answered
    def revoke_user_sessions(self, user_id: int) -> None:
        self.tables.revoke_sessions(user_id)

    # --- rooms ---

    @answered
    def create_room(self, name: str, key: str, owner_id: int, invite_only: bool) -> Room:
        t = self.tables
        if key in t.room_keys:
            raise Conflict(f"room name {key!r} is taken")
        t.need_user(owner_id)
        t.last_room += 1
        room = Room(t.last_room, name, key, owner_id, invite_only, t.now())
        t.rooms[room.id] = room
        t.room_keys[key] = room.id
        t.members[room.id] = {owner_id: ("owner", room.created)}
        t.add_cursors(owner_id, room_mailbox(room.id))
        return room

    @answered
    def room_by_key(self, key: str) -> Room | None:
        t = self.tables
        return t.rooms.get(t.room_keys.get(key, 0))

    @answered
    def rooms_visible_to(self, user_id: int) -> list[tuple[Room, int, bool]]:
        t = self.tables
        out = []
        for room in t.rooms.values():
            members = t.members.get(room.id, {})
            joined = user_id in members
            if not room.invite_only or joined or (room.id, user_id) in t.invites:
                out.append((room, len(members), joined))
        return sorted(out, key=lambda r: r[0].key)

    @answered
    def rooms_of(self, user_id: int) -> list[Room]:
        t = self.tables
        mine = [t.rooms[rid] for rid, members in t.members.items() if user_id in members]
        return sorted(mine, key=lambda r: r.key)

    @answered
    def members(self, room_id: int) -> list[Member]:
        t = self.tables
        found = [(t.users[uid], role) for uid, (role, _) in t.members.get(room_id, {}).items()]
        return [Member(u.id, u.name, role) for u, role in sorted(found, key=lambda f: f[0].key)]

    @answered
    def member_since(self, room_id: int, user_id: int) -> float | None:
        member = self.tables.members.get(room_id, {}).get(user_id)
        return None if member is None else member[1]

    @answered
    def add_member(self, room_id: int, user_id: int, role: str) -> ChainLink:
        t = self.tables
        t.need_room(room_id)
        t.need_user(user_id)
        link = t.next_link(room_mailbox(room_id))
        t.members[room_id].setdefault(user_id, (role, t.now()))
        t.add_cursors(user_id, room_mailbox(room_id))  # late joiners get no history
        return link

    @answered
    def remove_member(self, room_id: int, user_id: int) -> ChainLink:
        t = self.tables
        link = t.next_link(room_mailbox(room_id))
        t.members.get(room_id, {}).pop(user_id, None)
        t.invites.pop((room_id, user_id), None)
        mailbox = room_mailbox(room_id)
        readers = t.cursors.get(mailbox, {})
        mine = [k for k in readers if k[0] == user_id]
        if mine:
            lowest = min(readers[k] for k in mine)
            for k in mine:
                del readers[k]
            # Messages only they were still holding back can go now.
            t.sweep(mailbox, lowest, t.last_seq)
        return link

    @answered
    def set_role(self, room_id: int, user_id: int, role: str) -> None:
        members = self.tables.members.get(room_id, {})
        if user_id in members:
            members[user_id] = (role, members[user_id][1])

    @answered
    def add_invite(self, room_id: int, user_id: int, by_id: int) -> None:
        t = self.tables
        t.need_room(room_id)
        t.need_user(user_id)
        t.invites.setdefault((room_id, user_id), (by_id, t.now()))

    @answered
    def has_invite(self, room_id: int, user_id: int) -> bool:
        return (room_id, user_id) in self.tables.invites

    @answered
    def dm_partners(self, user_id: int) -> list[int]:
        return sorted(p for u, p in self.tables.partners if u == user_id)

    @answered
    def presence_readers(self, user_id: int) -> list[int]:
        return sorted(p for (u, p), wrote in self.tables.partners.items() if u == user_id and wrote)

    @answered
    def presence_subjects(self, user_id: int) -> list[int]:
        return sorted(u for (u, p), wrote in self.tables.partners.items() if p == user_id and wrote)

    @answered
    def has_written(self, writer_id: int, reader_id: int) -> bool:
        return self.tables.partners.get((writer_id, reader_id), False)

    # --- messages ---

    @answered
    def append(self, message: NewMessage) -> AppendResult:
        t = self.tables
        m = message
        key = (m.sender_id, m.sender_device, m.client_id)
        earlier = t.client_ids.get(key)
        if earlier is not None:
            return AppendResult(earlier[0], duplicate=True)
        devices = None if m.envelope is not None else frozenset(m.envelopes)
        rows = []
        for mailbox in m.mailboxes:
            link = t.next_link(mailbox)
            row = MessageRow(StoredMessage(
                link.seq, mailbox, m.sender_id, m.sender_device, m.client_id, m.ts,
                m.expires_at, m.target, m.envelope, dict(m.envelopes), link.prev_seq,
            ), devices)  # fmt: skip
            t.messages.setdefault(mailbox, {})[t.last_seq] = row
            t.seq_mailbox[t.last_seq] = mailbox
            rows.append(row)
        seqs = tuple(r.message.seq for r in rows)
        t.client_ids[key] = (seqs, t.now())
        if m.target.startswith("user:"):
            for p in {inbox_owner(mb) for mb in m.mailboxes} - {m.sender_id, None}:
                assert p is not None
                # The sender has written to the recipient; the recipient is a partner.
                t.partners[(m.sender_id, p)] = True
                t.partners.setdefault((p, m.sender_id), False)
        stored = tuple(r.stored() for r in rows)
        # Rows no other device reads (e.g. the sender's own inbox when it has one
        # device) are not kept; their seqs are still reported.
        for r in rows:
            t.sweep(r.message.mailbox, r.message.seq - 1, r.message.seq)
        return AppendResult(seqs, duplicate=False, messages=stored)

    @answered
    def mailbox_heads(self, mailboxes: Sequence[str]) -> dict[str, int]:
        heads = self.tables.heads
        return {mb: heads.get(mb, 0) for mb in mailboxes}

    @answered
    def messages_between(self, mailbox: str, after: int, upto: int) -> list[StoredMessage]:
        rows = self.tables.messages.get(mailbox, {})
        return [r.stored() for seq, r in sorted(rows.items()) if after < seq <= upto]

    @answered
    def pending(self, user_id: int, device_id: str) -> list[StoredMessage]:
        t = self.tables
        now = t.now()
        cutoff_ms = int((now - self.retention) * 1000)
        me = (user_id, device_id)
        out: list[MessageRow] = []
        for mailbox, readers in t.cursors.items():
            acked = readers.get(me)
            if acked is None:
                continue
            rows = t.messages.get(mailbox, {}).items()
            out.extend(r for seq, r in rows if seq > acked and r.for_reader(me, now, cutoff_ms))
        return [r.stored() for r in sorted(out, key=lambda r: r.message.seq)]

    @answered
    def ack(self, user_id: int, device_id: str, seqs: Sequence[int]) -> None:
        t = self.tables
        best: dict[str, int] = {}
        for seq in seqs:
            mailbox = t.seq_mailbox.get(int(seq))
            if mailbox is not None and best.get(mailbox, 0) < int(seq):
                best[mailbox] = int(seq)
        for mailbox, seq in best.items():
            readers = t.cursors.get(mailbox, {})
            old = readers.get((user_id, device_id))
            if old is None or seq <= old:
                continue  # not a mailbox this device reads, or nothing new
            readers[(user_id, device_id)] = seq
            t.sweep(mailbox, old, seq)

    @answered
    def purge_expired(self, now: float) -> int:
        return self.tables.purge(now, self.retention)

    @answered
    def queued(self) -> int:
        return sum(len(rows) for rows in self.tables.messages.values())

    @answered
    def stats(self) -> dict[str, int]:
        """Row counts named like the SQLite store's tables (for tests)."""
        return self.tables.stats()
