"""The E2EE manager: keys, pairwise sessions per device, Sender Keys per room, trust.

Every state change (a session advanced by a decrypt, a one-time pre-key used,
a sender key installed) is committed to the LocalStore in ONE transaction
together with the message it produced, before the server is sent an ``ack``:
a crash can neither replay a message key nor lose a message.  One lock
serialises all state changes, so a send and a receive never interleave on a
session; network waits for a send's ``ok`` happen outside it.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from shtalk.client import payload as pl
from shtalk.client.authflow import amend
from shtalk.client.errors import ClientError, IdentityNotAccepted, ServerError
from shtalk.client.events import (
    BadMessage,
    Event,
    IdentityChanged,
    MessageReceived,
    MessageState,
    NewDevice,
    TimerChanged,
)
from shtalk.client.localstore import HistoryMessage, LocalStore
from shtalk.client.rotation import RotationPolicy
from shtalk.client.trust import CHANGED, VERIFIED, ContactDevice
from shtalk.crypto import (
    CryptoError,
    DeviceIdentity,
    Envelope,
    IdentityKey,
    MessageType,
    PreKeyBundle,
    Recipient,
    ReplayError,
    RoomSession,
    Session,
    StateError,
    UnknownPreKey,
    open_envelope,
    prekey_identity,
    safety_number,
    seal,
)
from shtalk.wire.errors import ErrorCode
from shtalk.wire.pushes import DevicePush, MessagePush
from shtalk.wire.records import ClientRequest
from shtalk.wire.requests import (
    Devices,
    KeysCount,
    KeysFetch,
    KeysPublish,
    OneTimeKey,
    Send,
    Target,
)

__all__ = ["E2EE", "ClientError", "IdentityNotAccepted"]

log = Logger()

REPLENISH_BELOW = 20
REPLENISH_TO = 60
KEM_REPLENISH_BELOW = 5
KEM_REPLENISH_TO = 15
MAX_SESSIONS = 5  # sessions kept per contact device
PENDING_ROOM_TTL = 60.0  # seconds a room message may wait for its sender key
MAX_PENDING_ROOM = 500
MAX_BATCH = 200  # received messages handled per store commit
MAX_SEND_STEPS = 3  # CAPTCHA answers tried for one send
CAPTCHA_CODES = frozenset({ErrorCode.CAPTCHA_REQUIRED, ErrorCode.CAPTCHA_FAILED})

Put = tuple[str, str, bytes | None]


Requester = Callable[[ClientRequest], Deferred[dict[str, Any]]]
"""Sends a request over the session, fires with the reply (`ServerSession.request`)."""


def encode_sessions(sessions: list[Session]) -> bytes:
    """Several serialised sessions in one value: u32 length || bytes, repeated."""
    out = bytearray()
    for x in sessions:
        raw = x.to_bytes()
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def decode_sessions(data: bytes) -> list[Session]:
    out, i = [], 0
    while i < len(data):
        n = int.from_bytes(data[i : i + 4], "big")
        out.append(Session.from_bytes(data[i + 4 : i + 4 + n]))
        i += 4 + n
    return out


def chain_key(room: str, user: str, device: str, epoch: int) -> str:
    """The store key of one sender chain (names cannot contain "/": protocol/names.py)."""
    return f"{room}/{user}/{device}/{epoch}"


class _Saves:
    """The sending positions one commit saves (``send_mark`` per device session and per
    own room chain), and whether every chain a message used was covered before it."""

    __slots__ = ("covered", "marks", "rooms")

    def __init__(self) -> None:
        self.covered = True
        self.marks: dict[tuple[str, str], tuple[bytes, int] | None] = {}
        self.rooms: dict[str, tuple[bytes, int] | None] = {}


class _Batch:
    """What a batch of received messages changed, committed at once, then acked."""

    __slots__ = ("after", "messages", "puts", "rooms", "saves", "shown")

    def __init__(self) -> None:
        #: (kind, key) -> value, or a function giving the value as it is at commit time
        #: (an object changed by several messages is serialised once).
        self.puts: dict[tuple[str, str], bytes | Callable[[], bytes | None] | None] = {}
        self.messages: list[HistoryMessage] = []
        #: events of readable messages, in order, run before the commit
        self.shown: list[Callable[[], None]] = []
        #: acks and the other events, in message order, run after the commit
        self.after: list[Callable[[], None]] = []
        self.saves = _Saves()
        #: rooms whose whole state (own key and every chain) is written
        self.rooms: set[str] = set()

    def put(self, kind: str, key: str, value: bytes | Callable[[], bytes | None] | None) -> None:
        self.puts[(kind, key)] = value


def new_client_id() -> str:
    return secrets.token_urlsafe(12)


class E2EE:
    def __init__(
        self,
        store: LocalStore,
        request: Requester,
        emit: Callable[[Event], None],
        username: str,
        device_id: str,
        clock: Callable[[], float] = time.time,
        rotation: RotationPolicy | None = None,
    ) -> None:
        self.store = store
        self.request = request
        self.emit = emit
        self.me = username
        self.device = device_id
        self.clock = clock
        self.rotation = rotation or RotationPolicy()
        self.lock = DeferredLock()
        self.identity: DeviceIdentity | None = None
        # Per device, the current session first, then older ones still able to
        # decrypt (both sides may start a session at once; Signal keeps these too).
        self.sessions: dict[tuple[str, str], list[Session]] = {}
        self.contacts: dict[tuple[str, str], ContactDevice] = {}
        self.rooms: dict[str, RoomSession] = {}
        self.timers: dict[str, int] = {}
        self.room_members: dict[str, set[str]] = {}
        self.devices_of: dict[str, list[str]] = {}
        #: per user, the device ids that are no news: those there when we first listed
        #: the user's devices, and those announced since (NewDevice once per device)
        self.seen: dict[str, set[str]] = {}
        #: users whose devices were listed once (that first list was the baseline)
        self.listed: set[str] = set()
        self._pending_room: list[tuple[float, MessagePush, Envelope, str]] = []
        self._inbox: list[tuple[MessagePush, Deferred[None]]] = []
        #: delivery states ("sent") not saved yet: they go with the next commit
        self._states: list[tuple[str, str]] = []
        self._draining = False
        #: room -> keys of its "roomchain" rows in the store
        self._room_rows: dict[str, set[str]] = {}
        #: per device, the sending position of its current session that a completed
        #: commit saved: messages below it may leave before their own commit
        self._durable: dict[tuple[str, str], tuple[bytes, int] | None] = {}
        #: the same for our own sender chain per room
        self._room_durable: dict[str, tuple[bytes, int] | None] = {}
        self.ack: Callable[[int], None] = lambda seq: None
        #: answers a refusal that asks for more (a CAPTCHA the server's monitoring
        #: demands before a flagged account's next send): (code, error) -> extra fields
        self.ask_extra: Callable[[str, dict[str, Any]], Any] | None = None

    # ------------------------------------------------------------------ state
    async def load(self) -> None:
        """Load (or on first run create and save) this device's keys and state."""
        raw = await self.store.get("identity", "self")
        if raw is None:
            self.identity = DeviceIdentity.generate(now=int(self.clock()))
            await self.store.commit(puts=[("identity", "self", self.identity.to_bytes())])
        else:
            self.identity = DeviceIdentity.from_bytes(raw)
        for key, value in await self.store.items("session"):
            user, _, dev = key.partition("/")
            self.sessions[(user, dev)] = decode_sessions(value)
        for _, value in await self.store.items("contact"):
            c = ContactDevice.from_bytes(value)
            self.contacts[(c.user, c.device)] = c
        # Rooms: our own sending state ("roomown") and one row per sender chain
        # ("roomchain"), so a received message rewrites one small row.
        for key, value in await self.store.items("roomown"):
            self.rooms[key] = RoomSession.from_bytes(value)
            self._room_rows[key] = set()
        for key, value in await self.store.items("roomchain"):
            room = key.partition("/")[0]
            rs = self.rooms.get(room)
            if rs is None:
                rs = self.rooms[room] = RoomSession(room, self.me, self.device)
            rs.load_chain(value)
            self._room_rows.setdefault(room, set()).add(key)
        # Stores written before that kept the whole RoomSession in one "room" row.
        migrate: list[Put] = []
        for key, value in await self.store.items("room"):
            if key not in self.rooms:
                self.rooms[key] = RoomSession.from_bytes(value)
                migrate += self._room_puts(key, self.rooms[key])
            migrate.append(("room", key, None))
        if migrate:
            await self.store.commit(puts=migrate)
        for key, value in await self.store.items("timer"):
            self.timers[key] = int(value.decode())
        for key, value in await self.store.items("seen"):
            saved = json.loads(value)
            self.seen[key] = set(saved["devices"])
            if saved.get("listed"):
                self.listed.add(key)

    @property
    def ident(self) -> DeviceIdentity:
        assert self.identity is not None, "call load() first"
        return self.identity

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def publish_keys(self) -> dict[str, int]:
        """Publish the bundle and top up one-time pre-keys (run at every login); first
        delete a previous signed pre-key whose grace period is over and rotate the
        signed pre-keys when due (shtalk.client.rotation)."""
        async with self.lock:
            await self._expire_prekeys()
            if self.rotation.prekeys_due(self.ident, self.clock()):
                self.ident.rotate_prekeys(int(self.clock()))
                await self.store.commit(puts=[("identity", "self", self.ident.to_bytes())])
                log.info("new signed pre-key {id} (and last-resort ML-KEM pre-key)",
                         id=self.ident.signed_prekey[0])
            bundle = self.ident.public_bundle()
            counts = (await self.request(KeysCount()))["counts"]
            new_ec = new_pq = []
            if counts.get("ec", 0) < REPLENISH_BELOW:
                new_ec = self.ident.generate_one_time_prekeys(REPLENISH_TO - counts.get("ec", 0))
            if counts.get("pq", 0) < KEM_REPLENISH_BELOW:
                new_pq = self.ident.generate_kem_one_time_prekeys(
                    KEM_REPLENISH_TO - counts.get("pq", 0)
                )
            if new_ec or new_pq:
                await self.store.commit(puts=[("identity", "self", self.ident.to_bytes())])
            # The first publish of this device also uploads the keys made at creation.
            first = await self.store.get("meta", "published") is None
            ec = list(bundle.one_time_prekeys) if first else []
            pq = list(bundle.kem_one_time_prekeys) if first else []
            ec += [k for k in new_ec if k not in ec]
            pq += [k for k in new_pq if k not in pq]
            fresh = [OneTimeKey(kind="ec", id=k.key_id, key=k.to_bytes()) for k in ec]
            fresh += [OneTimeKey(kind="pq", id=k.key_id, key=k.to_bytes()) for k in pq]
            result: dict[str, int] = counts
            for i in range(0, max(1, len(fresh)), 100):
                reply = await self.request(KeysPublish(
                    bundle=bundle.base().to_bytes(),
                    one_time=tuple(fresh[i : i + 100]),
                    # A new identity on a device id the server knows (local state lost):
                    # the one-time keys it still holds belong to the old identity.
                    replace=first and i == 0,
                ))
                result = reply["counts"]
            puts: list[Put] = [("meta", "published", b"1")]
            # Initiators now fetch the new pair: the previous one's grace period starts.
            if self.ident.published(int(self.clock())):
                puts.append(("identity", "self", self.ident.to_bytes()))
            await self.store.commit(puts=puts)
            return result

    def next_key_event(self) -> float:
        """When ``maintain_keys`` has work (the clock's time; rotation.KeyTimer)."""
        return self.rotation.next_prekey_event(self.ident)

    async def maintain_keys(self) -> None:
        """Rotate and publish the signed pre-keys when due (also a publication that
        failed before), delete a previous pair whose grace period is over."""
        ident, now = self.ident, self.clock()
        unpublished = ident.has_previous and not ident.previous_retired
        if unpublished or self.rotation.prekeys_due(ident, now):
            await self.publish_keys()
            return
        async with self.lock:
            await self._expire_prekeys()

    async def _expire_prekeys(self) -> None:
        """Delete the previous signed pre-key pair once its grace period is over, from
        memory and from the store: the identity row is rewritten, secure_delete zeroes
        the old row's pages and the checkpoint drops the old page images from the WAL."""
        old = self.ident.previous_signed_prekey
        if not self.ident.expire_previous(self.clock(), self.rotation.prekey_grace):
            return
        await self.store.commit(puts=[("identity", "self", self.ident.to_bytes())])
        await self.store.scrub()
        log.info("deleted the previous signed pre-key {id}", id=old[0] if old else "?")

    # --------------------------------------------------------------- contacts
    async def device_ids(self, user: str, refresh: bool = False) -> list[str]:
        if refresh or user not in self.devices_of:
            reply = await self.request(Devices(user=user))
            self.devices_of[user] = [d["id"] for d in reply["devices"]]
            if user not in self.listed:
                # The first list of a contact's devices is the baseline, not news (our
                # own account's baseline is taken at this device's first login).
                self.listed.add(user)
                if user != self.me:
                    self.seen.setdefault(user, set()).update(self.devices_of[user])
        return self.devices_of[user]

    def forget_devices(self, user: str) -> None:
        self.devices_of.pop(user, None)

    def _knows(self, user: str) -> bool:
        """Whether a device of ``user`` we did not know of yet is news (our own account
        always is, once this device's first login recorded the baseline)."""
        return (user == self.me or bool(self.seen.get(user))
                or any(u == user for u, _ in self.contacts))

    def _is_new_device(self, user: str, device: str) -> bool:
        """True once per device that is news (see `seen`); records it as seen."""
        seen = self.seen.setdefault(user, set())
        if device in seen:
            return False
        news = self._knows(user) and (user, device) != (self.me, self.device)
        seen.add(device)
        return news

    def _seen_value(self, user: str) -> Callable[[], bytes]:
        return lambda: json.dumps({"devices": sorted(self.seen.get(user, ())),
                                   "listed": user in self.listed}).encode()

    async def baseline_own_devices(self) -> None:
        """At this device's first login the account's other devices are not news: record
        them (before publishing our keys, which tells every other device about us)."""
        if await self.store.get("meta", "published") is not None:
            return
        ids = await self.device_ids(self.me, refresh=True)
        self.seen[self.me] = set(ids) | {self.device}
        await self.store.commit(puts=[("seen", self.me, self._seen_value(self.me)())])

    async def device_event(self, push: DevicePush) -> None:
        """A ``device`` push: a contact (or we) got a new device, or one was removed.
        A device we never knew of is announced now, once, not at its first message."""
        user, device = push.user, push.device
        if user.casefold() == self.me.casefold():
            user = self.me
        self.forget_devices(user)
        if push.event == "removed" or (user, device) in self.contacts:
            return  # gone, or a known device's new keys (its identity is checked at use)
        async with self.lock:
            if not self._is_new_device(user, device):
                return
            await self.store.commit(puts=[("seen", user, self._seen_value(user)())])
        self.emit(NewDevice(user, device))

    def _pin(self, user: str, device: str, identity: IdentityKey) -> ContactDevice:
        """Record what ``device`` presents; emit NewDevice / IdentityChanged as due (the
        caller saves ``seen[user]`` with the contact)."""
        key = (user, device)
        old = self.contacts.get(key)
        if old is None:
            rec = ContactDevice.first(user, device, identity)
            if self._is_new_device(user, device):
                self.emit(NewDevice(user, device))
        else:
            rec = old.presents(identity)
            if rec.state == CHANGED and old.state != CHANGED:
                self.emit(IdentityChanged(user, device))
        self.contacts[key] = rec
        return rec

    async def _session_for(
        self, user: str, device: str, puts: list[tuple[str, str, bytes | None]]
    ) -> Session | None:
        """An established session with the device, starting one from its bundle if needed."""
        sessions = self.sessions.get((user, device))
        if sessions:
            return sessions[0]
        reply = await self.request(KeysFetch(user=user, device=device))
        if not reply["devices"]:
            return None
        entry = reply["devices"][0]
        one_time = entry.get("one_time") or {}
        try:
            bundle = PreKeyBundle.from_parts(
                base64.b64decode(entry["bundle"]),
                base64.b64decode(one_time["ec"]["key"]) if "ec" in one_time else None,
                base64.b64decode(one_time["pq"]["key"]) if "pq" in one_time else None,
            )
        except CryptoError as e:
            log.warn("refused a bad bundle for {user}/{device}: {e}", user=user, device=device, e=e)
            return None
        rec = self._pin(user, device, bundle.identity)
        puts.append(("contact", rec.key, rec.to_bytes()))
        puts.append(("seen", user, self._seen_value(user)()))
        if rec.state == CHANGED:
            raise IdentityNotAccepted(user, [device])
        session = Session.initiate(self.ident, bundle)
        self.sessions[(user, device)] = [session]
        return session

    # ------------------------------------------------------------------ sending
    async def _pairwise(
        self,
        user: str,
        data: bytes,
        puts: list[tuple[str, str, bytes | None]],
        saves: _Saves | None = None,
    ) -> dict[str, bytes]:
        """Encrypt ``data`` for every device of ``user`` and our own other devices."""
        targets = [
            (user, d) for d in await self.device_ids(user) if (user, d) != (self.me, self.device)
        ]
        if user != self.me:
            targets += [(self.me, d) for d in await self.device_ids(self.me) if d != self.device]
        blocked = [
            d
            for (u, d) in targets
            if u == user and (c := self.contacts.get((u, d))) and c.state == CHANGED
        ]
        if blocked:
            raise IdentityNotAccepted(user, blocked)
        envelopes: dict[str, bytes] = {}
        ts = self.now_ms()
        for u, d in targets:
            session = await self._session_for(u, d, puts)
            if session is None:
                continue
            if saves is not None and not session.ratchet.covered_by(self._durable.get((u, d))):
                saves.covered = False
            env = seal(
                self.ident,
                session,
                data,
                sender_user=self.me,
                sender_device=self.device,
                recipient=Recipient.user(u, d),
                timestamp=ts,
            )
            envelopes[f"{u}/{d}"] = env.to_bytes()
            puts.append(("session", f"{u}/{d}", self._save_sessions((u, d), saves)))
        return envelopes

    def _save_sessions(self, key: tuple[str, str], saves: _Saves | None) -> bytes | None:
        """The device's sessions as the store keeps them: the current one's sending chain
        reserved ahead (see ``RatchetState.reserve_sending``)."""
        sessions = self.sessions.get(key)
        if not sessions:
            return None
        ratchet = sessions[0].ratchet
        ratchet.reserve_sending()
        if saves is not None:
            saves.marks[key] = ratchet.send_mark()
        return encode_sessions(sessions)

    def _saved(self, _: None, saves: _Saves) -> None:
        """A commit holding ``saves`` completed: its sending positions are durable."""
        self._durable.update(saves.marks)
        self._room_durable.update(saves.rooms)

    def _expiry(self, conversation: str) -> tuple[int | None, float | None]:
        seconds = self.timers.get(conversation, 0)
        if not seconds:
            return None, None
        return seconds, self.clock() + seconds

    async def send_text(self, conversation: str, body: str) -> str:
        """Encrypt, store as "sending", send; returns the message id once queued."""
        if len(body.encode("utf-8")) > pl.MAX_BODY:
            raise ClientError(f"messages are limited to {pl.MAX_BODY} bytes")
        kind, _, name = conversation.partition(":")
        client_id = new_client_id()
        expires_in, expires_at = self._expiry(conversation)
        text = pl.encode(pl.Text(client_id, conversation, body, expires_at))
        msg_id = f"{self.me}/{self.device}/{client_id}"
        saving: Deferred[None] | None = None
        async with self.lock:
            puts: list[tuple[str, str, bytes | None]] = []
            saves: _Saves | None = None
            if kind == "room":
                rs = await self._room_session(name)
                if self.rotation.room_key_due(rs, self.clock()):
                    # Post-compromise security as far as Sender Keys go: a copy of
                    # our sender key reads at most this many of our messages.
                    await self._new_epoch(name, rs)
                saves = _Saves()
                saves.covered = rs.covered_by(self._room_durable.get(name))
                header, ciphertext = rs.encrypt(text)
                env = Envelope.seal(
                    self.ident,
                    type=MessageType.ROOM,
                    sender_user=self.me,
                    sender_device=self.device,
                    recipient=Recipient.room(name),
                    header=header,
                    ciphertext=ciphertext,
                    timestamp=self.now_ms(),
                )
                rs.reserve_sending()
                puts.append(("roomown", name, rs.own_to_bytes()))  # only what advanced
                saves.rooms[name] = rs.send_mark()
                send = Send(to=Target(room=name), envelope=env.to_bytes(),
                            client_id=client_id, expires_in=expires_in or None)
            elif kind == "user":
                saves = _Saves()
                envelopes = await self._pairwise(name, text, puts, saves)
                if not any(k.partition("/")[0] == name for k in envelopes) and name != self.me:
                    raise ClientError(
                        f"{name} has no device that can receive encrypted messages yet"
                    )
                send = Send(to=Target(user=name), envelopes=envelopes, client_id=client_id,
                            expires_in=expires_in or None)
            else:
                raise ClientError("conversations are 'user:NAME' or 'room:NAME'")
            record = HistoryMessage(
                msg_id,
                conversation,
                self.me,
                self.device,
                self.now_ms(),
                body,
                expires_at,
                "sending",
            )
            # Never two messages under one message key after a crash: the ciphertext
            # leaves only once a durable state is past its message number.  Usually an
            # earlier commit's reserve already is, and this commit (the record, the
            # advanced sessions) runs while the message travels; else it comes first.
            states = self._take_states()
            if saves is not None and saves.covered:
                saving = self.store.commit(puts=puts, messages=[record], states=states)
                saving.addCallback(self._saved, saves)
            else:
                try:
                    await self.store.commit(puts=puts, messages=[record], states=states)
                except Exception:
                    self._states[:0] = states
                    raise
                if saves is not None:
                    self._saved(None, saves)
            sent = self.request(send)
        try:
            await self._answer_steps(sent, send)
        except Exception as e:
            if saving is not None:
                await self._settle(saving, states)
            await self.store.commit(states=[*self._take_states(), (msg_id, "failed")])
            self.emit(MessageState(msg_id, conversation, "failed", str(e)))
            raise
        if saving is not None:
            error = await self._settle(saving, states)
            if error is not None:
                raise ClientError(
                    f"the message was sent, but this device could not save it: {error}"
                )
        # "sent" is a display state, not key material: it rides along with the next commit
        # (the next message sent or received, flush_states, housekeeping) instead of costing
        # an fsync of its own per message.
        self._states.append((msg_id, "sent"))
        self.emit(MessageState(msg_id, conversation, "sent"))
        return msg_id

    async def _answer_steps(self, sent: Deferred[dict[str, Any]], send: Send) -> None:
        """Await a send; if the server wants a CAPTCHA first, ask and send it again.

        The same envelopes and client id go again (the ratchet already moved; the server
        stored nothing), so an answered step can never deliver a message twice."""
        for _ in range(MAX_SEND_STEPS):
            try:
                await sent
                return
            except ServerError as e:
                if e.code not in CAPTCHA_CODES or self.ask_extra is None:
                    raise
                more = await maybeDeferred(self.ask_extra, e.code, e.detail)
                sent = self.request(amend(send, more or {}))
        await sent

    async def _settle(
        self, saving: Deferred[None], states: list[tuple[str, str]]
    ) -> Exception | None:
        """Wait for a commit that ran alongside a send; its error, if any (the delivery
        states it carried go with the next commit)."""
        try:
            await saving
        except Exception as e:
            self._states[:0] = states
            log.failure("saving a sent message failed")
            return e
        return None

    def _take_states(self) -> list[tuple[str, str]]:
        states, self._states = self._states, []
        return states

    async def flush_states(self) -> None:
        """Save the delivery states not saved yet (``history`` and ``close`` call this)."""
        states = self._take_states()
        if states:
            try:
                await self.store.commit(states=states)
            except Exception:
                self._states[:0] = states
                raise

    async def set_timer(self, conversation: str, seconds: int) -> None:
        """Disappearing messages for a conversation; announced to its other members."""
        kind, _, name = conversation.partition(":")
        data = pl.encode(pl.Timer(conversation, seconds))
        async with self.lock:
            self.timers[conversation] = seconds
            puts: list[tuple[str, str, bytes | None]] = [
                ("timer", conversation, str(seconds).encode())
            ]
            if kind == "user":
                envelopes = await self._pairwise(name, data, puts)
                await self.store.commit(puts=puts)
                sent = self.request(Send(to=Target(user=name), envelopes=envelopes,
                                         client_id=new_client_id()))
            else:
                for member in sorted(self.room_members.get(name, set())):
                    mputs: list[tuple[str, str, bytes | None]] = []
                    envelopes = await self._pairwise(member, data, mputs)
                    puts += mputs
                    if envelopes:
                        await self.store.commit(puts=mputs)
                        self.request(Send(to=Target(user=member), envelopes=envelopes,
                                          client_id=new_client_id()))
                await self.store.commit(puts=puts)
                sent = None
        if sent is not None:
            await sent
        self.emit(TimerChanged(conversation, seconds, self.me))

    # -------------------------------------------------------------------- rooms
    def _room_puts(self, room: str, rs: RoomSession) -> list[Put]:
        """The whole room: our own state, every sender chain, deletes for chains gone."""
        ids = {chain_key(room, u, d, e): (u, d, e) for u, d, e in rs.chain_ids()}
        puts: list[Put] = [("roomown", room, rs.own_to_bytes())]
        puts += [("roomchain", k, rs.chain_to_bytes(*i)) for k, i in ids.items()]
        gone = sorted(self._room_rows.get(room, set()) - ids.keys())
        puts += [("roomchain", k, None) for k in gone]
        self._room_rows[room] = set(ids)
        return puts

    def _room_delete(self, room: str) -> list[Put]:
        puts: list[Put] = [("roomown", room, None), ("room", room, None)]
        puts += [("roomchain", k, None) for k in sorted(self._room_rows.pop(room, set()))]
        return puts

    async def _room_session(self, room: str) -> RoomSession:
        rs = self.rooms.get(room)
        if rs is None or rs.epoch is None:
            rs = rs or RoomSession(room, self.me, self.device)
            await self._new_epoch(room, rs)
        return rs

    async def _new_epoch(self, room: str, rs: RoomSession) -> None:
        """A fresh sender key for our messages in ``room``, saved, then handed out."""
        rs.rotate(now=int(self.clock()))
        self.rooms[room] = rs
        await self.store.commit(puts=self._room_puts(room, rs))
        await self._distribute(room, rs)

    async def _distribute(self, room: str, rs: RoomSession) -> None:
        """Hand our current sender key to every member's devices over pairwise sessions."""
        data = pl.encode(pl.SenderKey(room, rs.distribution().to_bytes()))
        members = set(self.room_members.get(room, set())) | {self.me}
        for member in sorted(members):
            puts: list[tuple[str, str, bytes | None]] = []
            try:
                envelopes = await self._pairwise(member, data, puts)
            except IdentityNotAccepted as e:
                # Never hand a room key to a device whose identity changed unaccepted.
                log.warn("not sending {room}'s key to {user}: {e}", room=room, user=member, e=e)
                continue
            except ServerError as e:
                # A member whose device never published keys (no_such_device): skip that
                # member, not every member sorted after it.
                log.warn("not sending {room}'s key to {user}: {e}", room=room, user=member, e=e)
                envelopes = {}
            if puts:
                await self.store.commit(puts=puts)
            if envelopes:
                self.request(Send(to=Target(user=member), envelopes=envelopes,
                                  client_id=new_client_id()))

    async def joined_room(self, room: str, members: Iterable[str]) -> None:
        """We joined or created ``room``: start a fresh sender key and hand it out."""
        async with self.lock:
            self.room_members[room] = set(members) | {self.me}
            rs = self.rooms.get(room) or RoomSession(room, self.me, self.device)
            await self._new_epoch(room, rs)

    async def rotate_room_key(self, room: str) -> None:
        """A new sender key for our messages in ``room`` now, handed to every member
        (sends do this by themselves at the room bounds: shtalk.client.rotation)."""
        async with self.lock:
            rs = self.rooms.get(room)
            if rs is None or rs.epoch is None:
                raise ClientError(f"no sender key of ours in {room} yet: join it first")
            await self._new_epoch(room, rs)

    async def left_room(self, room: str) -> None:
        async with self.lock:
            self.room_members.pop(room, None)
            self.rooms.pop(room, None)
            self._room_durable.pop(room, None)
            await self.store.commit(puts=self._room_delete(room))

    async def membership_changed(self, room: str, user: str, event: str) -> None:
        """Any change of membership starts a new epoch of our sender key (removed
        members cannot read what follows; joiners cannot read what came before)."""
        async with self.lock:
            members = self.room_members.setdefault(room, {self.me})
            if event == "joined":
                members.add(user)
            elif event in ("left", "kicked"):
                members.discard(user)
            else:
                return
            rs = self.rooms.get(room)
            if rs is None:
                return
            if event in ("left", "kicked"):
                rs.remove_member(user)
            await self._new_epoch(room, rs)

    # ---------------------------------------------------------------- receiving
    #
    # Pushes queue in ``_inbox``; one drain at a time takes every queued push (up to
    # MAX_BATCH) under the lock, handles them in order in memory (each decrypt is
    # transactional: a message that fails changes nothing), then commits the effects of
    # the whole batch in ONE store transaction and only then acks them and reports them
    # (commit before ack, per-message order kept).  A burst or a backlog thus costs one
    # commit (one fsync) instead of one per message.  If the commit fails, nothing of the
    # batch is acked and the in-memory state is reloaded from the store, so the server's
    # redelivery finds the keys it needs.

    async def receive(self, push: MessagePush) -> None:
        """Handle one ``message`` push; fires once it is committed and acked (or refused)."""
        done: Deferred[None] = Deferred()
        self._inbox.append((push, done))
        if not self._draining:
            self._draining = True
            d = Deferred.fromCoroutine(self._drain())
            d.addErrback(lambda f: log.failure("receiving failed", f))
        await done

    async def _drain(self) -> None:
        try:
            while self._inbox:
                async with self.lock:
                    taken = self._inbox[:MAX_BATCH]
                    del self._inbox[:MAX_BATCH]
                    try:
                        failed = await self._run_batch(taken)
                    except Exception:
                        error = Failure()  # type: ignore[no-untyped-call]
                        log.failure("a batch of received messages failed", error)
                        failed = {id(push): error for push, _ in taken}
                for push, done in taken:
                    if id(push) in failed:
                        done.errback(failed[id(push)])
                    else:
                        done.callback(None)
        finally:
            self._draining = False

    async def _run_batch(
        self, taken: list[tuple[MessagePush, Deferred[None]]]
    ) -> dict[int, Failure]:
        """Handle ``taken`` under the lock with one commit; the pushes that failed."""
        batch = _Batch()
        failed: dict[int, Failure] = {}
        for push, _ in taken:
            try:
                self._receive(push, batch)
            except Exception:
                # A bug or a malformed push (not a crypto refusal, which is a BadMessage):
                # not acked; the server delivers it again at the next login.
                failed[id(push)] = Failure()  # type: ignore[no-untyped-call]
                log.failure("handling a message push failed", failed[id(push)])
        if not await self._commit_batch(batch):
            error = Failure(  # type: ignore[no-untyped-call]
                ClientError("the local store could not save received messages")
            )
            return {id(push): error for push, _ in taken}
        for action in batch.after:
            action()
        return failed

    async def _commit_batch(self, batch: _Batch) -> bool:
        """Show what the batch made readable, then commit it (the acks wait for that)."""
        for show in batch.shown:
            show()
        batch.shown.clear()
        states: list[tuple[str, str]] = []
        try:
            puts = self._batch_puts(batch)
            if not puts and not batch.messages:
                return True
            states = self._take_states()
            await self.store.commit(puts=puts, messages=batch.messages, states=states)
            self._saved(None, batch.saves)
        except Exception:
            self._states[:0] = states
            log.failure("committing received messages failed; reloading the saved state")
            try:
                await self._reload()
            except Exception:
                log.failure("reloading the saved state failed")
            return False
        return True

    def _batch_puts(self, batch: _Batch) -> list[tuple[str, str, bytes | None]]:
        """Serialise what the batch changed, once per object, as it is at commit time."""
        puts: list[tuple[str, str, bytes | None]] = []
        for room in batch.rooms:
            rs = self.rooms.get(room)
            if rs is not None:
                puts += self._room_puts(room, rs)
        for (kind, key), value in batch.puts.items():
            if kind == "roomchain" and key.partition("/")[0] in batch.rooms:
                continue  # already written whole above
            puts.append((kind, key, value() if callable(value) else value))
        return puts

    async def _reload(self) -> None:
        self._durable.clear()
        self._room_durable.clear()
        self.sessions.clear()
        self.contacts.clear()
        self.rooms.clear()
        self.timers.clear()
        self._room_rows.clear()
        await self.load()

    def _bad(self, batch: _Batch, push: MessagePush, reason: str) -> None:
        """Report and ack (after the batch's commit) a message we cannot use."""
        event = BadMessage(push.sender.user, push.sender.device, reason, push.seq)
        seq = push.seq

        def report() -> None:
            self.emit(event)
            self.ack(seq)

        batch.after.append(report)

    def _redelivered(self, batch: _Batch, push: MessagePush) -> None:
        """A message we already decrypted, signed by its pinned sender: ack it, quietly.

        The server delivers again whatever it was not acked for, e.g. after we were
        stopped between our commit and the ack.  Its key is spent, so it cannot be
        read twice; the copy we read is in the history.  (A key the ratchet dropped
        unread looks the same: that needs MAX_SKIP-scale loss, see docs/SECURITY.md.)
        """
        seq = push.seq
        log.info(
            "message {seq} from {user}/{device} was already received: acknowledged again",
            seq=seq, user=push.sender.user, device=push.sender.device,
        )  # fmt: skip
        batch.after.append(lambda: self.ack(seq))

    def _receive(self, push: MessagePush, batch: _Batch) -> None:
        user, device = push.sender.user, push.sender.device
        try:
            env = Envelope.from_bytes(base64.b64decode(push.envelope))
        except (CryptoError, ValueError):
            self._bad(batch, push, "the envelope is malformed")
            return
        if env.sender_user.casefold() != user.casefold() or env.sender_device != device:
            self._bad(batch, push, "the envelope names another sender than the server says")
            return
        if env.type is MessageType.ROOM:
            room = push.to.room
            if room is None:
                self._bad(batch, push, "a room message outside a room")
                return
            self._receive_room(push, env, room, batch)
        else:
            self._receive_pairwise(push, env, batch)

    def _receive_pairwise(self, push: MessagePush, env: Envelope, batch: _Batch) -> None:
        user, device = env.sender_user, env.sender_device
        if user.casefold() == self.me.casefold():
            user = self.me
        sessions = list(self.sessions.get((user, device), []))
        try:
            if env.type is MessageType.PREKEY:
                claimed = prekey_identity(env)
                current = next((x for x in sessions if x.matches(env.header)), None)
                session, plaintext = open_envelope(self.ident, env, current)
                # Pinned once it verified and decrypted: a refused message changes nothing.
                rec = self._pin(user, device, claimed)
                batch.put("contact", rec.key, self._contact_value((rec.user, rec.device)))
                batch.put("seen", user, self._seen_value(user))
                batch.put("identity", "self", self.ident.to_bytes)
            else:
                if not sessions:
                    self._bad(
                        batch, push, "no session with that device (its first message was lost)"
                    )
                    return
                session, plaintext = self._try_sessions(env, sessions)
        except ReplayError:
            self._redelivered(batch, push)
            return
        except UnknownPreKey:
            self._bad(
                batch, push,
                "the first message of a new session names a pre-key this device no longer "
                "has (replaced and deleted after its grace period, or a one-time key used "
                f"before); write to {user}: your message starts a session that works",
            )  # fmt: skip
            return
        except CryptoError as e:
            self._bad(batch, push, f"failed verification or decryption: {type(e).__name__}")
            return
        # The session that worked becomes the current one (both sides converge).
        ordered = [session] + [x for x in sessions if x is not session]
        self.sessions[(user, device)] = ordered[:MAX_SESSIONS]
        batch.put("session", f"{user}/{device}", self._sessions_value((user, device), batch))
        try:
            body = pl.decode(plaintext)
        except pl.PayloadError as e:
            self._bad(batch, push, str(e))
            return
        self._deliver(push, user, device, body, batch, room=None)

    def _sessions_value(self, key: tuple[str, str], batch: _Batch) -> Callable[[], bytes | None]:
        return lambda: self._save_sessions(key, batch.saves)

    def _contact_value(self, key: tuple[str, str]) -> Callable[[], bytes | None]:
        def value() -> bytes | None:
            c = self.contacts.get(key)
            return None if c is None else c.to_bytes()

        return value

    def _try_sessions(self, env: Envelope, sessions: list[Session]) -> tuple[Session, bytes]:
        """Decrypt with the first session that can (each attempt changes nothing on failure)."""
        error: CryptoError | None = None
        for candidate in sessions:
            try:
                return open_envelope(self.ident, env, candidate)
            except ReplayError as e:
                error = e  # the session it belongs to has seen it: say so, not "bad"
            except CryptoError as e:
                if not isinstance(error, ReplayError):
                    error = e
        assert error is not None
        raise error

    def _receive_room(
        self,
        push: MessagePush,
        env: Envelope,
        room: str,
        batch: _Batch,
        since: float | None = None,
    ) -> None:
        user, device = env.sender_user, env.sender_device
        if user.casefold() == self.me.casefold():
            user = self.me
        contact = self.contacts.get((user, device))
        rs = self.rooms.get(room)
        if contact is None or rs is None:
            self._hold(push, env, room, since, batch)
            return
        try:
            # Verify before decrypt: the envelope under the sender's pinned identity key,
            # then (inside decrypt, before any key is derived) the sender key's signature.
            env.verify(contact.identity_key())
            epoch = RoomSession.header_epoch(env.header)
            plaintext = rs.decrypt(user, device, env.header, env.ciphertext)
        except StateError:
            self._hold(push, env, room, since, batch)
            return
        except ReplayError:
            self._redelivered(batch, push)
            return
        except CryptoError as e:
            self._bad(batch, push, f"failed verification or decryption: {type(e).__name__}")
            return
        # Only the chain that advanced is written: one small row, not the whole room.
        batch.put(
            "roomchain",
            chain_key(room, user, device, epoch),
            self._chain_value(room, user, device, epoch),
        )
        try:
            body = pl.decode(plaintext)
        except pl.PayloadError as e:
            self._bad(batch, push, str(e))
            return
        self._deliver(push, user, device, body, batch, room=room)

    def _chain_value(
        self, room: str, user: str, device: str, epoch: int
    ) -> Callable[[], bytes | None]:
        def value() -> bytes | None:
            rs = self.rooms.get(room)
            if rs is None or epoch not in rs.chains.get((user, device), {}):
                self._room_rows.get(room, set()).discard(chain_key(room, user, device, epoch))
                return None
            self._room_rows.setdefault(room, set()).add(chain_key(room, user, device, epoch))
            return rs.chain_to_bytes(user, device, epoch)

        return value

    def _hold(
        self, push: MessagePush, env: Envelope, room: str, since: float | None, batch: _Batch
    ) -> None:
        """Wait (unacknowledged) for the sender key that decrypts this room message."""
        self._pending_room.append((self.clock() if since is None else since, push, env, room))
        while len(self._pending_room) > MAX_PENDING_ROOM:
            _, old, _, _ = self._pending_room.pop(0)
            self._bad(batch, old, "no sender key arrived for this room message")

    def _retry_held(self, batch: _Batch) -> None:
        held, self._pending_room = self._pending_room, []
        now = self.clock()
        for since, push, env, room in held:
            if now - since > PENDING_ROOM_TTL:
                self._bad(batch, push, "no sender key arrived for this room message")
                continue
            self._receive_room(push, env, room, batch, since)

    async def expire_held(self) -> None:
        async with self.lock:
            batch = _Batch()
            self._retry_held(batch)
            if await self._commit_batch(batch):
                for action in batch.after:
                    action()
        await self.flush_states()

    def _deliver(
        self,
        push: MessagePush,
        user: str,
        device: str,
        body: pl.Payload,
        batch: _Batch,
        room: str | None,
    ) -> None:
        seq = push.seq
        ack = self.ack
        if isinstance(body, pl.Text):
            if room is not None:
                conversation = f"room:{room}"
            elif user == self.me:
                conversation = body.conversation  # a copy of what we sent elsewhere
            else:
                conversation = f"user:{user}"
            expires_at = body.expires_at
            if expires_at is None and push.expires_at:
                expires_at = float(push.expires_at)
            msg_id = f"{user}/{device}/{body.id}"
            ts = push.ts
            batch.messages.append(
                HistoryMessage(
                    msg_id,
                    conversation,
                    user,
                    device,
                    ts,
                    body.body,
                    expires_at,
                    "sent" if user == self.me else "received",
                )
            )
            contact = self.contacts.get((user, device))
            event = MessageReceived(
                conversation,
                user,
                device,
                body.body,
                ts,
                msg_id,
                expires_at,
                contact is not None and contact.state == VERIFIED,
            )

            def show() -> None:
                if expires_at is None or expires_at > self.clock():
                    self.emit(event)

            # Shown once verified and decrypted; acknowledged once saved.  A failed save
            # means the server delivers it again (the view keeps one line per id).
            batch.shown.append(show)
            batch.after.append(lambda: ack(seq))
        elif isinstance(body, pl.SenderKey):
            rs = self.rooms.get(body.room) or RoomSession(body.room, self.me, self.device)
            try:
                rs.add_distribution(user, device, body.dist)
            except CryptoError as e:
                self._bad(batch, push, f"bad sender key: {e}")
                return
            self.rooms[body.room] = rs
            batch.rooms.add(body.room)
            batch.after.append(lambda: ack(seq))
            # Room messages waiting for this key are handled in this same batch.
            self._retry_held(batch)
        else:
            if body.conversation.startswith("room:") or user == self.me:
                conversation = body.conversation
            else:
                conversation = f"user:{user}"
            self.timers[conversation] = body.seconds
            batch.put("timer", conversation, str(body.seconds).encode())
            event_t = TimerChanged(conversation, body.seconds, user)

            def timer_set() -> None:
                ack(seq)
                self.emit(event_t)

            batch.after.append(timer_set)

    # -------------------------------------------------------------------- trust
    async def accept_identity(self, user: str) -> list[str]:
        """Acknowledge changed keys of ``user``: new sessions start with the new keys."""
        async with self.lock:
            changed = [c for (u, _), c in self.contacts.items() if u == user and c.state == CHANGED]
            puts: list[tuple[str, str, bytes | None]] = []
            for c in changed:
                rec = c.accepted()
                self.contacts[(c.user, c.device)] = rec
                puts.append(("contact", rec.key, rec.to_bytes()))
                # Sessions with the old key are dropped; one the new key started stays.
                keep = [
                    x
                    for x in self.sessions.get((c.user, c.device), [])
                    if x.remote_identity.to_bytes() == rec.identity
                ]
                if keep:
                    self.sessions[(c.user, c.device)] = keep
                    puts.append(("session", rec.key, encode_sessions(keep)))
                elif self.sessions.pop((c.user, c.device), None) is not None:
                    puts.append(("session", rec.key, None))
            await self.store.commit(puts=puts)
            self.forget_devices(user)
            return [c.device for c in changed]

    async def mark_verified(self, user: str, device: str) -> None:
        async with self.lock:
            c = self.contacts.get((user, device))
            if c is None:
                raise ClientError(f"no known device {device} of {user}")
            if c.state == CHANGED:
                raise ClientError(f"{user}'s key changed; accept it first, then verify")
            rec = c.verified()
            self.contacts[(user, device)] = rec
            await self.store.commit(puts=[("contact", rec.key, rec.to_bytes())])

    def safety_number(self, user: str, device: str) -> str:
        c = self.contacts.get((user, device))
        if c is None:
            raise ClientError(f"no known device {device} of {user}; exchange a message first")
        return safety_number(
            f"{self.me}/{self.device}",
            self.ident.identity_key,
            f"{user}/{device}",
            IdentityKey.from_bytes(c.pending or c.identity),
        )

    def contact_devices(self, user: str) -> list[ContactDevice]:
        return sorted(
            (c for (u, _), c in self.contacts.items() if u == user), key=lambda c: c.device
        )
