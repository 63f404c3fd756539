"""Account moderation (suspend, unsuspend, delete) and verifiable abuse reports.

The store changes the account (one write each, ``IStore.set_status``/``delete_account``);
the live effects (cached account dropped, connections of the account logged out) run
on the reactor.  A suspended account keeps its data and cannot log in (the checkers
refuse any status but ``active``); a deleted one is a tombstone: its name stays
reserved (nobody can take it over and inherit its contacts' trust), while its email,
password hash, devices, keys, sessions, memberships and queued messages are gone.

Reports: ``report`` names a user and a reason and may attach an envelope that user
sent to the reporter.  The server parses the envelope with ``shtalk.crypto.envelope``
and checks its signature against the identity key in the sending device's published
bundle (``shtalk.crypto.identity``; the server never imports the ratchet).  An envelope
that does not verify, or was not sent by that user to the reporter, is refused, so a
report cannot claim a message its subject never sent.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shtalk.collaborators import collaborators
from shtalk.crypto.envelope import Envelope
from shtalk.crypto.errors import CryptoError
from shtalk.crypto.identity import PreKeyBundle
from shtalk.server.chat.naming import room_key, user_key
from shtalk.server.chat.presence import Presence
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.users import Users
from shtalk.server.cred.passwords import PasswordHasher
from shtalk.server.eserver import BadRequest
from shtalk.server.iserver import IStore
from shtalk.server.ops.monitor import Monitor
from shtalk.server.store.records import User
from shtalk.wire.errors import ProtocolError

log = Logger()


def _key_or_none(normalise: Callable[[str], tuple[str, str]], name: str) -> str | None:
    """The key of a name an envelope carries, or None when it is no valid name (so it
    matches no account and no room)."""
    try:
        return normalise(name)[1]
    except ProtocolError:
        return None


@collaborators
class Moderation:
    store: IStore
    hasher: PasswordHasher
    users: Users
    presence: Presence
    rooms: Rooms
    clock: IReactorTime

    def lookup(self, name_or_id: str) -> Any:
        """(id, name, status, created) of an account by name or ``#id``; None if unknown."""
        if name_or_id.startswith("#") and name_or_id[1:].isdigit():
            uid = int(name_or_id[1:])
            d = self.store.user_by_id(uid)
            return d.addCallback(
                lambda u: None if u is None else (u.id, u.name, u.status, u.created))
        try:
            key = user_key(name_or_id)[1]
        except ProtocolError:
            key = name_or_id.lower()
        return self.store.user_by_key(key).addCallback(
            lambda u: None if u is None else (u.id, u.name, u.status, u.created))

    def _logout_everywhere(self, user_id: int, name: str, why: str) -> None:
        self.users.forget(user_key(name)[1] if name else "")
        self.presence.revoke_user(user_id, why)

    @inlineCallbacks
    def set_status(self, user_id: int, status: str) -> Any:
        user = yield self.store.user_by_id(user_id)
        if user is None:
            return False
        changed = yield self.store.set_status(user_id, status)
        if changed and status != "active":
            self._logout_everywhere(user_id, user.name, f"this account was {status}")
        if changed:
            self.users.forget(user.key)
            log.warn("account {user_id} is now {status}", event="moderation.status",
                     user_id=user_id, status=status)
        return bool(changed)

    @inlineCallbacks
    def delete(self, user_id: int) -> Any:
        user = yield self.store.user_by_id(user_id)
        if user is None:
            return False
        dummy = yield self.hasher.hash(secrets.token_urlsafe(32))
        done = yield self.store.delete_account(user_id, dummy)
        if done:
            self._logout_everywhere(user_id, user.name, "this account was deleted")
            self.users.forget(user.key)
            self.rooms.account_deleted(user_id)
            log.warn("account {user_id} deleted", event="moderation.delete", user_id=user_id)
        return bool(done)

    def queued(self) -> Any:
        return self.store.queued()

    # --- reports --------------------------------------------------------------------
    @inlineCallbacks
    def report(
        self, reporter: User, monitor: Monitor, raw_user: str, reason: str,
        envelope: bytes | None, plaintext: str | None, address: str = "",
    ) -> Any:
        target: User = yield self.users.user(raw_user)
        if target.id == reporter.id:
            raise BadRequest("you cannot report yourself")
        verified = qualifies = False
        evidence: dict[str, Any] = {"reporter": reporter.name, "reason": reason[:500]}
        if envelope is not None:
            env = yield self._verify(reporter, target, envelope)
            verified = True
            # Toward automatic action only from an established account that the sender
            # was in conversation with (a room message's membership was checked).
            old_enough = reporter.created <= self.clock.seconds() - monitor.config.reporter_min_age
            if env.recipient.kind == "user":
                written = yield self.store.has_written(target.id, reporter.id)
            else:
                written = True
            qualifies = old_enough and bool(written)
            evidence.update(
                envelope_id=env.message_id.hex(), device=env.sender_device,
                sent_ms=env.timestamp, envelope=base64.b64encode(envelope).decode(),
            )
            if plaintext is not None:
                # The reporter's claim of what the verified envelope said.
                evidence["plaintext"] = plaintext[:4000]
        flag = monitor.reported(target.id, target.name, reporter.name, verified, evidence,
                                qualifies, address)
        if flag is not None:
            yield monitor.stored(flag)  # the reply names it by its id
        log.info("report against {user_id} (verified: {verified})", event="report",
                 user_id=target.id, reporter=reporter.id, verified=verified)
        return {"user": target.name, "verified": verified,
                "flag": None if flag is None else flag.id}

    @inlineCallbacks
    def _verify(self, reporter: User, target: User, raw: bytes) -> Any:
        try:
            env = Envelope.from_bytes(raw)
        except CryptoError:
            raise BadRequest("envelope: not a shtalk envelope") from None
        if _key_or_none(user_key, env.sender_user) != target.key:
            raise BadRequest("envelope: it was not sent by the reported user")
        rcpt = env.recipient
        if rcpt.kind == "user":
            if _key_or_none(user_key, rcpt.name) != reporter.key:
                raise BadRequest("envelope: it was not sent to you")
        else:
            # A room message counts only from someone who was in that room when it was
            # sent (by its signed timestamp), in a room that exists: a forwarded copy
            # in a stranger's hands proves nothing about its sender.
            room_k = _key_or_none(room_key, rcpt.name)
            room = (yield self.store.room_by_key(room_k)) if room_k is not None else None
            if room is None:
                raise BadRequest("envelope: it names a room that does not exist")
            since = yield self.store.member_since(room.id, reporter.id)
            if since is None or since > env.timestamp / 1000:
                raise BadRequest("envelope: you were not in that room when it was sent")
        bundle = yield self.store.device_bundle(target.id, env.sender_device)
        if bundle is None:
            raise BadRequest("envelope: the sending device published no identity key")
        try:
            identity = PreKeyBundle.from_bytes(bundle).identity
            env.verify(identity)
        except CryptoError:
            raise BadRequest(
                "envelope: its signature does not verify against the sender's identity key",
            ) from None
        return env
