"""Sending: encrypt, save, send, and the message's delivery state.

Never two messages under one message key after a crash: the ciphertext leaves only
once a saved state is past its message number.  Usually an earlier commit's reserve
already is (common.Saves), and this message's own commit (its history record, the
advanced sessions) runs while it travels; else the commit comes first.  "sent" is a
display state, not key material: it rides along with the next commit instead of
costing an fsync of its own.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

import shtalk.client.e2ee.common as common
from shtalk.client import payload as pl
from shtalk.client.authflow import amend
from shtalk.client.e2ee.common import CAPTCHA_CODES, MAX_SEND_STEPS, Local, Put, Saves
from shtalk.client.e2ee.pairwise import Pairwise
from shtalk.client.e2ee.rooms import RoomKeys
from shtalk.client.errors import ClientError, ServerError
from shtalk.client.events import MessageState, TimerChanged
from shtalk.client.localstore import HistoryMessage
from shtalk.collaborators import collaborators
from shtalk.crypto import Envelope, MessageType, Recipient
from shtalk.wire.requests import Send, Target

log = Logger()


@collaborators
class Outbox:
    local: Local
    pairwise: Pairwise
    room_keys: RoomKeys

    def _expiry(self, conversation: str) -> tuple[int | None, float | None]:
        seconds = self.local.timers.get(conversation, 0)
        if not seconds:
            return None, None
        return seconds, self.local.clock() + seconds

    async def _seal_room(self, name: str, text: bytes, puts: list[Put],
                         saves: Saves) -> bytes:
        """Our next room message: its envelope; our advanced chain in ``puts``."""
        local, room_keys = self.local, self.room_keys
        rs = await room_keys.session(name)
        if local.rotation.room_key_due(rs, local.clock()):
            # Post-compromise security as far as Sender Keys go: a copy of
            # our sender key reads at most this many of our messages.
            await room_keys.new_epoch(name, rs)
        saves.covered = rs.covered_by(local.durable.rooms.get(name))
        header, ciphertext = rs.encrypt(text)
        env = Envelope.seal(
            local.ident, type=MessageType.ROOM, sender_user=local.me,
            sender_device=local.device, recipient=Recipient.room(name), header=header,
            ciphertext=ciphertext, timestamp=local.now_ms(),
        )
        rs.reserve_sending()
        puts.append(("roomown", name, rs.own_to_bytes()))  # only what advanced
        saves.rooms[name] = rs.send_mark()
        return env.to_bytes()

    async def send_text(self, conversation: str, body: str) -> str:
        """Encrypt, store as "sending", send; returns the message id once queued."""
        local = self.local
        if len(body.encode("utf-8")) > pl.MAX_BODY:
            raise ClientError(f"messages are limited to {pl.MAX_BODY} bytes")
        kind, _, name = conversation.partition(":")
        client_id = common.new_client_id()
        expires_in, expires_at = self._expiry(conversation)
        text = pl.encode(pl.Text(client_id, conversation, body, expires_at))
        msg_id = f"{local.me}/{local.device}/{client_id}"
        saving: Deferred[None] | None = None
        async with local.lock:
            puts: list[Put] = []
            saves = Saves()
            if kind == "room":
                envelope = await self._seal_room(name, text, puts, saves)
                send = Send(to=Target(room=name), envelope=envelope, client_id=client_id,
                            expires_in=expires_in)
            elif kind == "user":
                envelopes = await self.pairwise.encrypt(name, text, puts, saves)
                if not any(k.partition("/")[0] == name for k in envelopes) and name != local.me:
                    raise ClientError(
                        f"{name} has no device that can receive encrypted messages yet"
                    )
                send = Send(to=Target(user=name), envelopes=envelopes, client_id=client_id,
                            expires_in=expires_in)
            else:
                raise ClientError("conversations are 'user:NAME' or 'room:NAME'")
            record = HistoryMessage(msg_id, conversation, local.me, local.device,
                                    local.now_ms(), body, expires_at, "sending")
            states = local.take_states()
            if saves.covered:
                saving = local.store.commit(puts=puts, messages=[record], states=states)
                saving.addCallback(lambda _: local.durable.saved(saves))
            else:
                try:
                    await local.store.commit(puts=puts, messages=[record], states=states)
                except Exception:
                    local.return_states(states)
                    raise
                local.durable.saved(saves)
            sent = local.request(send)
        try:
            await self._answer_steps(sent, send)
        except Exception as e:
            if saving is not None:
                await self._settle(saving, states)
            await local.store.commit(states=[*local.take_states(), (msg_id, "failed")])
            local.emit(MessageState(msg_id, conversation, "failed", str(e)))
            raise
        if saving is not None:
            error = await self._settle(saving, states)
            if error is not None:
                raise ClientError(
                    f"the message was sent, but this device could not save it: {error}"
                )
        local.states.append((msg_id, "sent"))
        local.emit(MessageState(msg_id, conversation, "sent"))
        return msg_id

    async def _answer_steps(self, sent: Deferred[dict[str, Any]], send: Send) -> None:
        """Await a send; if the server wants a CAPTCHA first, ask and send it again.

        The same envelopes and client id go again (the ratchet already moved; the server
        stored nothing), so an answered step can never deliver a message twice."""
        local = self.local
        for _ in range(MAX_SEND_STEPS):
            try:
                await sent
                return
            except ServerError as e:
                if e.code not in CAPTCHA_CODES or local.ask_extra is None:
                    raise
                more = await maybeDeferred(local.ask_extra, e.code, e.detail)
                sent = local.request(amend(send, more or {}))
        await sent

    async def _settle(self, saving: Deferred[None],
                      states: list[tuple[str, str]]) -> Exception | None:
        """Wait for a commit that ran alongside a send; its error, if any (the delivery
        states it carried go with the next commit)."""
        try:
            await saving
        except Exception as e:
            self.local.return_states(states)
            log.failure("saving a sent message failed")
            return e
        return None

    async def set_timer(self, conversation: str, seconds: int) -> None:
        """Disappearing messages for a conversation; announced to its other members."""
        local, pairwise = self.local, self.pairwise
        kind, _, name = conversation.partition(":")
        data = pl.encode(pl.Timer(conversation, seconds))
        async with local.lock:
            local.timers[conversation] = seconds
            puts: list[Put] = [("timer", conversation, str(seconds).encode())]
            if kind == "user":
                envelopes = await pairwise.encrypt(name, data, puts)
                await local.store.commit(puts=puts)
                sent = local.request(Send(to=Target(user=name), envelopes=envelopes,
                                          client_id=common.new_client_id()))
            else:
                for member in sorted(self.room_keys.members.get(name, set())):
                    mputs: list[Put] = []
                    envelopes = await pairwise.encrypt(member, data, mputs)
                    puts += mputs
                    if envelopes:
                        await local.store.commit(puts=mputs)
                        local.request(Send(to=Target(user=member), envelopes=envelopes,
                                           client_id=common.new_client_id()))
                await local.store.commit(puts=puts)
                sent = None
        if sent is not None:
            await sent
        local.emit(TimerChanged(conversation, seconds, local.me))
