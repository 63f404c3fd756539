"""ShtalkClient: the facade a UI or a test drives; events come out of ``on_event``.

It wires a ServerSession (connection, authentication, reconnects), a LocalStore
(the encrypted file) and the E2EE manager, and turns server pushes (the typed records
of `shtalk.wire.pushes`) into events.  Every request it makes is a record of
`shtalk.wire.requests`.  Messages are acknowledged to the server only after they are
stored locally.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shtalk.client.authflow import amend
from shtalk.client.e2ee import E2EE
from shtalk.client.errors import ClientError
from shtalk.client.events import (
    BacklogDone,
    ConnectionChanged,
    Event,
    Invited,
    MemberChanged,
    MessagesExpired,
    Presence,
)
from shtalk.client.knownhosts import KnownHosts
from shtalk.client.localstore import HistoryMessage, LocalStore
from shtalk.client.rotation import KeyTimer, RotationPolicy
from shtalk.client.session import Credentials, ServerSession
from shtalk.wire import pushes as ps
from shtalk.wire import requests as rq
from shtalk.wire.records import ClientRequest

log = Logger()

ACK_DELAY = 0.02
ACK_BATCH = 200
HOUSEKEEPING = 5.0


class ShtalkClient:
    def __init__(
        self,
        reactor: Any,
        store: LocalStore,
        host: str,
        port: int,
        known_hosts: KnownHosts,
        credentials: Credentials,
        *,
        confirm_fingerprint: Callable[[str], Deferred[bool]],
        ask_password: Callable[[], Deferred[str]],
        on_event: Callable[[Event], None],
        trust: str = "pin",
        ask_extra: Callable[[str, dict[str, Any]], Deferred[dict[str, Any]] | dict[str, Any]]
        | None = None,
        rotation: RotationPolicy | None = None,
    ) -> None:
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.store = store
        self.credentials = credentials
        self.on_event = on_event
        self.session = ServerSession(
            reactor,
            host,
            port,
            known_hosts,
            confirm_fingerprint=confirm_fingerprint,
            ask_password=ask_password,
            credentials=credentials,
            on_tokens=self._save_credentials,
            on_push=self._on_push,
            on_state=self._on_state,
            trust=trust,
            ask_extra=ask_extra,
        )
        self.e2ee = E2EE(
            store,
            self.session.request,
            self._emit,
            credentials.username,
            credentials.device_id,
            clock=self.clock.seconds,
            rotation=rotation,
        )
        self.e2ee.ack = self._queue_ack
        #: rotates the signed pre-keys and deletes old ones while the client runs
        self.key_timer = KeyTimer(self.clock, self.e2ee)
        self.e2ee.ask_extra = self._ask_extra
        self._acks: list[int] = []
        self._ack_call: Any = None
        self._closing = False
        self._housekeeping: Any = None
        self._ready = False
        self._loaded = False

    def _ask_extra(self, code: str, error: dict[str, Any]) -> Any:
        """The session's ``ask_extra`` (read at the time: an application may swap it)."""
        ask = self.session.ask_extra
        if ask is None:
            raise ClientError(f"the server asks for {code} and nothing here can answer it")
        return ask(code, error)

    # ------------------------------------------------------------------ life cycle
    @staticmethod
    async def saved_credentials(store: LocalStore) -> Credentials | None:
        raw = await store.get("meta", "credentials")
        if raw is None:
            return None
        obj = json.loads(raw)
        return Credentials(**obj)

    def save_credentials(self) -> Deferred[None]:
        """Persist the current credentials (tokens from a login made before the store)."""
        return self._save_credentials(self.credentials)

    def _save_credentials(self, creds: Credentials) -> Deferred[None]:
        data = json.dumps(
            {
                "username": creds.username,
                "device_id": creds.device_id,
                "device_label": creds.device_label,
                "access_token": creds.access_token,
                "refresh_token": creds.refresh_token,
            }
        ).encode()
        d: Deferred[None] = self.store.commit(puts=[("meta", "credentials", data)])
        return d

    async def _load(self) -> None:
        if not self._loaded:
            await self.e2ee.load()
            self._loaded = True

    async def register(self, password: str, email: str, **extra: Any) -> dict[str, Any]:
        """Create the account (then ``login``); ``extra``: what the server asked for
        (e.g. ``captcha``)."""
        reply: dict[str, Any] = await self.session.register(
            self.credentials.username, password, email, **extra
        )
        return reply

    async def login(self, password: str, **extra: Any) -> None:
        """Password login as this device; publishes its keys.  ``extra``: what the server
        asked for (e.g. ``otp``, ``captcha``)."""
        await self._load()
        reply = await self.session.login(password, **extra)
        # The server's spelling of our name is what peers see in envelopes.
        self.e2ee.me = self.credentials.username = reply.get("user", self.credentials.username)
        await self._after_auth()

    async def start(self) -> None:
        """Connect and authenticate with saved tokens (asking for the password last)."""
        await self._load()
        await self.session.start()
        await self._after_auth()

    async def _after_auth(self) -> None:
        await self.e2ee.baseline_own_devices()
        await self.e2ee.publish_keys()  # rotates the signed pre-keys when due
        self.key_timer.start()
        await self._sync_rooms()
        self._ready = True
        if self._housekeeping is None:
            self._housekeeping = self.clock.callLater(HOUSEKEEPING, self._housekeep)

    async def _sync_rooms(self) -> None:
        rooms = (await self.session.request(rq.RoomList()))["rooms"]
        for r in rooms:
            if not r["joined"]:
                continue
            name = r["room"]
            members = (await self.session.request(rq.RoomMembers(room=name)))["members"]
            self.e2ee.room_members[name] = {m["user"] for m in members}
            rs = self.e2ee.rooms.get(name)
            if rs is None or rs.epoch is None:
                await self.e2ee.joined_room(name, self.e2ee.room_members[name])

    async def close(self) -> None:
        self._closing = True  # messages decrypted from here on queue acks without a timer
        for call in (self._ack_call, self._housekeeping):
            if call is not None and call.active():
                call.cancel()
        self._housekeeping = None
        self.key_timer.stop()
        if self.key_timer.running is not None:
            await self.key_timer.running  # a rotation under way finishes its commits
        await self._flush_acks()
        await self.e2ee.flush_states()  # "sent" marks not saved yet
        await self._flush_acks()  # acks queued while the states were saved
        await self.session.stop()

    async def logout(self) -> None:
        await self.session.logout()

    # ------------------------------------------------------------ account security
    # Refusals arrive as ServerError; e.captcha / the error object's "captcha" holds a
    # challenge to show (ServerError.reply["error"]["captcha"]["art"]) and to answer with
    # captcha={"id": ..., "answer": ...} in the next call.
    async def captcha(self) -> dict[str, Any]:
        """A CAPTCHA challenge: ``{"id", "art", "length", "expires_in", "hint"}``."""
        reply = await self.session.request_unauthenticated(rq.Captcha())
        return dict(reply["captcha"])

    async def _pre_auth(self, request: ClientRequest, extra: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = await self.session.request_unauthenticated(
            amend(request, extra))
        return reply

    async def _authed(self, request: ClientRequest, extra: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = await self.session.request(amend(request, extra))
        return reply

    async def verify_email(self, code: str, **extra: Any) -> dict[str, Any]:
        """Activate the account with the mailed code (then ``login``)."""
        return await self._pre_auth(
            rq.VerifyEmail(username=self.credentials.username, code=code), extra)

    async def resend_verification(self) -> None:
        """Mail a new verification code (the server answers the same in every case)."""
        await self._pre_auth(rq.ResendVerification(username=self.credentials.username), {})

    async def request_password_reset(self, **extra: Any) -> None:
        """Mail a reset code to the account's address (needs ``captcha=`` on most servers)."""
        await self._pre_auth(rq.PasswordResetRequest(username=self.credentials.username), extra)

    async def reset_password(self, code: str, new_password: str, **extra: Any) -> None:
        """Set a new password with the mailed code; every session of the account ends."""
        await self._pre_auth(rq.PasswordReset(username=self.credentials.username, code=code,
                                              new_password=new_password), extra)

    async def change_password(self, password: str, new_password: str, **extra: Any) -> int:
        """Needs the current password; every other session ends, this device gets new
        tokens.  Returns how many sessions were revoked."""
        reply = await self._authed(
            rq.PasswordChange(password=password, new_password=new_password), extra)
        await self.session.adopt_tokens(reply)
        return int(reply.get("sessions_revoked", 0))

    async def totp_enroll(self) -> dict[str, Any]:
        """A new secret: ``{"secret", "uri", "digits", "period", "algorithm"}``; show the
        ``uri`` as a QR code, then `totp_confirm` with a first code."""
        return dict(await self.session.request(rq.TotpEnroll()))

    async def totp_confirm(self, code: str) -> list[str]:
        """Enable TOTP with a first code; returns the ten recovery codes (shown once)."""
        reply = await self.session.request(rq.TotpConfirm(code=code))
        return list(reply["recovery_codes"])

    async def totp_disable(self, password: str, code: str, **extra: Any) -> None:
        """Needs the password and a TOTP or recovery code."""
        await self._authed(rq.TotpDisable(password=password, code=code), extra)

    async def new_recovery_codes(self, password: str, code: str, **extra: Any) -> list[str]:
        reply = await self._authed(rq.TotpRecoveryCodes(password=password, code=code), extra)
        return list(reply["recovery_codes"])

    # ------------------------------------------------------------------- messages
    async def send(self, conversation: str, body: str) -> str:
        return await self.e2ee.send_text(conversation, body)

    async def set_timer(self, conversation: str, seconds: int) -> None:
        await self.e2ee.set_timer(conversation, seconds)

    async def history(
        self, conversation: str, limit: int = 100, before_ts: int | None = None
    ) -> list[HistoryMessage]:
        await self.e2ee.flush_states()  # the newest "sent" marks first
        rows: list[HistoryMessage] = await self.store.history(conversation, limit, before_ts)
        now = self.clock.seconds()
        return [m for m in rows if m.expires_at is None or m.expires_at > now]

    async def search(self, text: str, conversation: str | None = None) -> list[HistoryMessage]:
        await self.e2ee.flush_states()
        rows: list[HistoryMessage] = await self.store.search(text, conversation)
        return rows

    # ---------------------------------------------------------------------- rooms
    async def create_room(self, room: str, invite_only: bool = False) -> dict[str, Any]:
        reply = await self.session.request(rq.RoomCreate(room=room, invite_only=invite_only))
        await self.e2ee.joined_room(reply["room"], [self.credentials.username])
        return reply

    async def join_room(self, room: str) -> dict[str, Any]:
        reply = await self.session.request(rq.RoomJoin(room=room))
        await self.e2ee.joined_room(reply["room"], [m["user"] for m in reply["members"]])
        return reply

    async def leave_room(self, room: str) -> None:
        reply = await self.session.request(rq.RoomLeave(room=room))
        await self.e2ee.left_room(reply["room"])

    async def invite(self, room: str, user: str) -> None:
        await self.session.request(rq.RoomInvite(room=room, user=user))

    async def kick(self, room: str, user: str) -> None:
        await self.session.request(rq.RoomKick(room=room, user=user))

    async def members(self, room: str) -> list[dict[str, Any]]:
        reply = await self.session.request(rq.RoomMembers(room=room))
        return list(reply["members"])

    async def rooms(self) -> list[dict[str, Any]]:
        return list((await self.session.request(rq.RoomList()))["rooms"])

    async def devices(self, user: str | None = None) -> list[dict[str, Any]]:
        return list((await self.session.request(rq.Devices(user=user or None)))["devices"])

    async def remove_device(self, device: str) -> None:
        await self.session.request(rq.DeviceRemove(device=device))

    # ---------------------------------------------------------------------- trust
    async def accept_identity(self, user: str) -> list[str]:
        return await self.e2ee.accept_identity(user)

    async def mark_verified(self, user: str, device: str) -> None:
        await self.e2ee.mark_verified(user, device)

    def safety_number(self, user: str, device: str) -> str:
        return self.e2ee.safety_number(user, device)

    # ---------------------------------------------------------------------- pushes
    def _emit(self, event: Event) -> None:
        try:
            self.on_event(event)
        except Exception:
            log.failure("an event handler failed")

    def _on_state(self, state: str, message: str) -> None:
        self._emit(ConnectionChanged(state, message))

    def _on_push(self, push: ps.ServerPush) -> None:
        match push:
            case ps.MessagePush():
                self._spawn(self.e2ee.receive(push))
            case ps.BacklogDonePush():
                self._emit(BacklogDone(push.count))
            case ps.MemberPush():
                self._spawn(self._member(push))
            case ps.PresencePush():
                self._emit(Presence(push.user, push.status))
            case ps.InvitedPush():
                self._emit(Invited(push.room, push.by or ""))
            case ps.DevicePush():
                self._spawn(self.e2ee.device_event(push))

    async def _member(self, push: ps.MemberPush) -> None:
        room, user, event = push.room, push.user, push.event
        self._emit(MemberChanged(room, user, event, push.by or ""))
        if user.casefold() == self.credentials.username.casefold():
            if event in ("left", "kicked"):
                await self.e2ee.left_room(room)
            return
        await self.e2ee.membership_changed(room, user, event)

    def _spawn(self, coro: Any) -> None:
        d = Deferred.fromCoroutine(coro)
        d.addErrback(lambda f: log.failure("handling a push failed", f))

    # ------------------------------------------------------------------------ acks
    def _queue_ack(self, seq: int) -> None:
        self._acks.append(seq)
        if self._closing:
            return  # close() sends what is queued; no timer may outlive the client
        if len(self._acks) >= ACK_BATCH:
            self._spawn(self._flush_acks())
        elif self._ack_call is None or not self._ack_call.active():
            self._ack_call = self.clock.callLater(
                ACK_DELAY, lambda: self._spawn(self._flush_acks())
            )

    async def _flush_acks(self) -> None:
        seqs, self._acks = self._acks, []
        if seqs:
            try:
                await self.session.request(rq.Ack(seqs=tuple(seqs)))
            except Exception as e:
                # Unacknowledged messages come again at the next login; the store
                # ignores a message it already has.
                log.info("ack failed ({e}); the server will redeliver", e=e)

    async def _housekeep_async(self) -> None:
        n = await self.store.purge_expired(self.clock.seconds())
        if n:
            self._emit(MessagesExpired(n))
        await self.e2ee.expire_held()

    def _housekeep(self) -> None:
        d = Deferred.fromCoroutine(self._housekeep_async())
        d.addErrback(lambda f: log.failure("housekeeping failed", f))
        d.addBoth(lambda _: self._reschedule())

    def _reschedule(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping = self.clock.callLater(HOUSEKEEPING, self._housekeep)


__all__ = ["ClientError", "ShtalkClient"]
