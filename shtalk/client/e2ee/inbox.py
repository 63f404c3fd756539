"""Received messages, in batches: one store commit per batch, then the acks.

Pushes queue here; one drain at a time takes every queued push (up to MAX_BATCH) under
the lock, handles them in order in memory (each decrypt is transactional: a message
that fails changes nothing), then commits the effects of the whole batch in ONE store
transaction and only then acks them and reports them (commit before ack, per-message
order kept).  A burst or a backlog thus costs one commit (one fsync) instead of one per
message.  If the commit fails, nothing of the batch is acked and the in-memory state is
reloaded from the store, so the server's redelivery finds the keys it needs.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from shtalk.client import payload as pl
from shtalk.client.e2ee.common import (
    MAX_BATCH,
    MAX_PENDING_ROOM,
    PENDING_ROOM_TTL,
    Batch,
    Local,
    NotYet,
    Put,
    Unreadable,
)
from shtalk.client.e2ee.contacts import Directory
from shtalk.client.e2ee.pairwise import Pairwise
from shtalk.client.e2ee.rooms import RoomKeys
from shtalk.client.errors import ClientError
from shtalk.client.events import BadMessage, MessageReceived, TimerChanged
from shtalk.client.localstore import HistoryMessage
from shtalk.client.trust import VERIFIED
from shtalk.crypto import CryptoError, Envelope, MessageType, ReplayError
from shtalk.wire.pushes import MessagePush

log = Logger()


class Inbox:
    def __init__(self, local: Local, directory: Directory, pairwise: Pairwise,
                 room_keys: RoomKeys, reload: Callable[[], Awaitable[None]]) -> None:
        self.local = local
        self.directory = directory
        self.pairwise = pairwise
        self.room_keys = room_keys
        self.reload = reload
        #: room messages waiting for their sender key: (since, push, envelope, room)
        self.held: list[tuple[float, MessagePush, Envelope, str]] = []
        self._queue: list[tuple[MessagePush, Deferred[None]]] = []
        self._draining = False

    async def receive(self, push: MessagePush) -> None:
        """Handle one ``message`` push; fires once it is committed and acked (or refused)."""
        done: Deferred[None] = Deferred()
        self._queue.append((push, done))
        if not self._draining:
            self._draining = True
            d = Deferred.fromCoroutine(self._drain())
            d.addErrback(lambda f: log.failure("receiving failed", f))
        await done

    async def _drain(self) -> None:
        try:
            while self._queue:
                async with self.local.lock:
                    taken = self._queue[:MAX_BATCH]
                    del self._queue[:MAX_BATCH]
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
        batch = Batch()
        failed: dict[int, Failure] = {}
        for push, _ in taken:
            try:
                self._receive(push, batch)
            except Exception:
                # A bug (not a crypto refusal, which is a BadMessage): not acked; the
                # server delivers it again at the next login.
                failed[id(push)] = Failure()  # type: ignore[no-untyped-call]
                log.failure("handling a message push failed", failed[id(push)])
        if not await self._commit(batch):
            error = Failure(  # type: ignore[no-untyped-call]
                ClientError("the local store could not save received messages")
            )
            return {id(push): error for push, _ in taken}
        for action in batch.after:
            action()
        return failed

    async def _commit(self, batch: Batch) -> bool:
        """Show what the batch made readable, then commit it (the acks wait for that)."""
        local = self.local
        for show in batch.shown:
            show()
        batch.shown.clear()
        states: list[tuple[str, str]] = []
        try:
            puts = self._puts(batch)
            if not puts and not batch.messages:
                return True
            states = local.take_states()
            await local.store.commit(puts=puts, messages=batch.messages, states=states)
            local.durable.saved(batch.saves)
        except Exception:
            local.return_states(states)
            log.failure("committing received messages failed; reloading the saved state")
            try:
                await self.reload()
            except Exception:
                log.failure("reloading the saved state failed")
            return False
        return True

    def _puts(self, batch: Batch) -> list[Put]:
        """Serialise what the batch changed, once per object, as it is at commit time."""
        puts: list[Put] = []
        for room in batch.rooms:
            rs = self.room_keys.rooms.get(room)
            if rs is not None:
                puts += self.room_keys.puts(room, rs)
        for (kind, key), value in batch.puts.items():
            if kind == "roomchain" and key.partition("/")[0] in batch.rooms:
                continue  # already written whole above
            puts.append((kind, key, value() if callable(value) else value))
        return puts

    # -- one message --------------------------------------------------------------------

    def _bad(self, batch: Batch, push: MessagePush, reason: str) -> None:
        """Report and ack (after the batch's commit) a message we cannot use."""
        event = BadMessage(push.sender.user, push.sender.device, reason, push.seq)
        seq = push.seq

        def report() -> None:
            self.local.emit(event)
            self.local.ack(seq)

        batch.after.append(report)

    def _redelivered(self, batch: Batch, push: MessagePush) -> None:
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
        batch.after.append(lambda: self.local.ack(seq))

    def _receive(self, push: MessagePush, batch: Batch) -> None:
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
        else:
            room = None
        self._decrypt(push, env, room, batch)

    def _decrypt(self, push: MessagePush, env: Envelope, room: str | None, batch: Batch,
                 since: float | None = None) -> None:
        """A pairwise message (``room`` None) or a room message: decrypted and delivered,
        held for its sender key, acknowledged as a redelivery, or refused."""
        try:
            if room is None:
                sender, plaintext = self.pairwise.decrypt(env, batch)
            else:
                sender, plaintext = self.room_keys.decrypt(env, room, batch)
            body = pl.decode(plaintext)
        except NotYet as e:
            self._hold(push, env, e.room, since, batch)
            return
        except ReplayError:
            self._redelivered(batch, push)
            return
        except (Unreadable, pl.PayloadError) as e:
            self._bad(batch, push, str(e))
            return
        self._deliver(push, sender, env.sender_device, body, batch, room)

    def _hold(self, push: MessagePush, env: Envelope, room: str, since: float | None,
              batch: Batch) -> None:
        """Wait (unacknowledged) for the sender key that decrypts this room message."""
        self.held.append((self.local.clock() if since is None else since, push, env, room))
        while len(self.held) > MAX_PENDING_ROOM:
            _, old, _, _ = self.held.pop(0)
            self._bad(batch, old, "no sender key arrived for this room message")

    def _retry_held(self, batch: Batch) -> None:
        held, self.held = self.held, []
        now = self.local.clock()
        for since, push, env, room in held:
            if now - since > PENDING_ROOM_TTL:
                self._bad(batch, push, "no sender key arrived for this room message")
                continue
            self._decrypt(push, env, room, batch, since)

    async def expire_held(self) -> None:
        async with self.local.lock:
            batch = Batch()
            self._retry_held(batch)
            if await self._commit(batch):
                for action in batch.after:
                    action()
        await self.local.flush_states()

    def _deliver(self, push: MessagePush, user: str, device: str, body: pl.Payload,
                 batch: Batch, room: str | None) -> None:
        local = self.local
        seq = push.seq
        ack = local.ack
        if isinstance(body, pl.Text):
            if room is not None:
                conversation = f"room:{room}"
            elif user == local.me:
                conversation = body.conversation  # a copy of what we sent elsewhere
            else:
                conversation = f"user:{user}"
            expires_at = body.expires_at
            if expires_at is None and push.expires_at:
                expires_at = float(push.expires_at)
            msg_id = f"{user}/{device}/{body.id}"
            batch.messages.append(HistoryMessage(
                msg_id, conversation, user, device, push.ts, body.body, expires_at,
                "sent" if user == local.me else "received",
            ))
            contact = self.directory.contacts.get((user, device))
            event = MessageReceived(
                conversation, user, device, body.body, push.ts, msg_id, expires_at,
                contact is not None and contact.state == VERIFIED,
            )

            def show() -> None:
                if expires_at is None or expires_at > local.clock():
                    local.emit(event)

            # Shown once verified and decrypted; acknowledged once saved.  A failed save
            # means the server delivers it again (the view keeps one line per id).
            batch.shown.append(show)
            batch.after.append(lambda: ack(seq))
        elif isinstance(body, pl.SenderKey):
            try:
                self.room_keys.install(body.room, user, device, body.dist, batch)
            except Unreadable as e:
                self._bad(batch, push, str(e))
                return
            batch.after.append(lambda: ack(seq))
            # Room messages waiting for this key are handled in this same batch.
            self._retry_held(batch)
        else:
            if body.conversation.startswith("room:") or user == local.me:
                conversation = body.conversation
            else:
                conversation = f"user:{user}"
            local.timers[conversation] = body.seconds
            batch.put("timer", conversation, str(body.seconds).encode())
            event_t = TimerChanged(conversation, body.seconds, user)

            def timer_set() -> None:
                ack(seq)
                local.emit(event_t)

            batch.after.append(timer_set)
