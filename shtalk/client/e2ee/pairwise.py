"""Pairwise sessions (PQXDH + Double Ratchet) with every device we talk to.

Per device we keep the current session first, then older ones still able to decrypt
(both sides may start a session at once; Signal keeps these too).  A session is saved
with its sending chain reserved ahead (``RatchetState.reserve_sending``), so a message
may leave before its own commit once a saved state covers its key (common.Saves).
A decrypt that fails changes nothing: each attempt works on a copy.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

from twisted.logger import Logger

from shtalk.client.e2ee.common import MAX_SESSIONS, Batch, Local, Put, Saves, Unreadable
from shtalk.client.e2ee.contacts import Directory
from shtalk.client.errors import IdentityNotAccepted
from shtalk.client.trust import CHANGED
from shtalk.crypto import (
    CryptoError,
    Envelope,
    MessageType,
    PreKeyBundle,
    Recipient,
    ReplayError,
    Session,
    UnknownPreKey,
    open_envelope,
    prekey_identity,
    seal,
)
from shtalk.wire.requests import KeysFetch

log = Logger()


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


class Pairwise:
    def __init__(self, local: Local, directory: Directory) -> None:
        self.local = local
        self.directory = directory
        self.sessions: dict[tuple[str, str], list[Session]] = {}

    async def load(self) -> None:
        for key, value in await self.local.store.items("session"):
            user, _, dev = key.partition("/")
            self.sessions[(user, dev)] = decode_sessions(value)

    # -- sending ------------------------------------------------------------------------

    async def session_for(self, user: str, device: str, puts: list[Put]) -> Session | None:
        """An established session with the device, starting one from its bundle if needed."""
        sessions = self.sessions.get((user, device))
        if sessions:
            return sessions[0]
        reply = await self.local.request(KeysFetch(user=user, device=device))
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
        rec = self.directory.pin(user, device, bundle.identity)
        puts.append(("contact", rec.key, rec.to_bytes()))
        puts.append(("seen", user, self.directory.seen_value(user)()))
        if rec.state == CHANGED:
            raise IdentityNotAccepted(user, [device])
        session = Session.initiate(self.local.ident, bundle)
        self.sessions[(user, device)] = [session]
        return session

    async def encrypt(
        self, user: str, data: bytes, puts: list[Put], saves: Saves | None = None
    ) -> dict[str, bytes]:
        """Encrypt ``data`` for every device of ``user`` and our own other devices;
        the envelopes by ``"user/device"``, the advanced sessions in ``puts``."""
        local, directory = self.local, self.directory
        me, here = local.me, local.device
        targets = [(user, d) for d in await directory.device_ids(user) if (user, d) != (me, here)]
        if user != me:
            targets += [(me, d) for d in await directory.device_ids(me) if d != here]
        blocked = [
            d
            for (u, d) in targets
            if u == user and (c := directory.contacts.get((u, d))) and c.state == CHANGED
        ]
        if blocked:
            raise IdentityNotAccepted(user, blocked)
        envelopes: dict[str, bytes] = {}
        ts = local.now_ms()
        for u, d in targets:
            session = await self.session_for(u, d, puts)
            if session is None:
                continue
            if saves is not None and not session.ratchet.covered_by(
                    local.durable.sessions.get((u, d))):
                saves.covered = False
            env = seal(local.ident, session, data, sender_user=me, sender_device=here,
                       recipient=Recipient.user(u, d), timestamp=ts)
            envelopes[f"{u}/{d}"] = env.to_bytes()
            puts.append(("session", f"{u}/{d}", self.save_sessions((u, d), saves)))
        return envelopes

    def save_sessions(self, key: tuple[str, str], saves: Saves | None) -> bytes | None:
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

    # -- receiving ----------------------------------------------------------------------

    def decrypt(self, env: Envelope, batch: Batch) -> tuple[str, bytes]:
        """The sender's name (as we spell it) and the plaintext of a pairwise envelope;
        the changed state goes into ``batch``.  Raises `ReplayError` for a message
        already read, `Unreadable` for one that fails; neither changes anything."""
        local, directory = self.local, self.directory
        user, device = local.own(env.sender_user), env.sender_device
        sessions = list(self.sessions.get((user, device), []))
        try:
            if env.type is MessageType.PREKEY:
                claimed = prekey_identity(env)
                current = next((x for x in sessions if x.matches(env.header)), None)
                session, plaintext = open_envelope(local.ident, env, current)
                # Pinned once it verified and decrypted: a refused message changes nothing.
                rec = directory.pin(user, device, claimed)
                batch.put("contact", rec.key, directory.contact_value((rec.user, rec.device)))
                batch.put("seen", user, directory.seen_value(user))
                batch.put("identity", "self", local.ident.to_bytes)
            else:
                if not sessions:
                    raise Unreadable("no session with that device (its first message was lost)")
                session, plaintext = self._try_sessions(env, sessions)
        except UnknownPreKey:
            raise Unreadable(
                "the first message of a new session names a pre-key this device no longer "
                "has (replaced and deleted after its grace period, or a one-time key used "
                f"before); write to {user}: your message starts a session that works"
            ) from None
        except ReplayError:
            raise
        except CryptoError as e:
            raise Unreadable(f"failed verification or decryption: {type(e).__name__}") from None
        # The session that worked becomes the current one (both sides converge).
        ordered = [session] + [x for x in sessions if x is not session]
        self.sessions[(user, device)] = ordered[:MAX_SESSIONS]
        batch.put("session", f"{user}/{device}", self._sessions_value((user, device), batch))
        return user, plaintext

    def _sessions_value(self, key: tuple[str, str], batch: Batch) -> Callable[[], bytes | None]:
        return lambda: self.save_sessions(key, batch.saves)

    def _try_sessions(self, env: Envelope, sessions: list[Session]) -> tuple[Session, bytes]:
        """Decrypt with the first session that can (each attempt changes nothing on failure)."""
        error: CryptoError | None = None
        for candidate in sessions:
            try:
                return open_envelope(self.local.ident, env, candidate)
            except ReplayError as e:
                error = e  # the session it belongs to has seen it: say so, not "bad"
            except CryptoError as e:
                if not isinstance(error, ReplayError):
                    error = e
        assert error is not None
        raise error

    # -- trust --------------------------------------------------------------------------

    async def accept_identity(self, user: str) -> list[str]:
        """Acknowledge changed keys of ``user``: new sessions start with the new keys."""
        local, directory = self.local, self.directory
        async with local.lock:
            changed = [c for (u, _), c in directory.contacts.items()
                       if u == user and c.state == CHANGED]
            puts: list[Put] = []
            for c in changed:
                rec = c.accepted()
                directory.contacts[(c.user, c.device)] = rec
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
            await local.store.commit(puts=puts)
            directory.forget_devices(user)
            return [c.device for c in changed]
