"""RedisBus: committed messages to the connections of every process, in mailbox order.

Each mailbox is a Redis channel (``{prefix}mb:{mailbox}``).  A process is subscribed to
the mailboxes its connected devices need (their inbox, and each room their user is in),
counted per user, and unsubscribed when no local device needs one any more.  A process
publishes what it committed and applies it here through the same sequencer
(`shtalk.server.cluster.chain`) as what comes from the others, because a device's
cursor relies on each mailbox's order: a local message may wait for a remote earlier one.

The store stays the truth.  What the bus dropped (Redis restarted, a slow subscriber cut
off, a process that died between commit and publish) is read back from it: a gap in a
mailbox's chain after ``gap_wait``, and every ``reconcile_interval``, after a reconnect
and on demand (`reconcile`) each subscribed mailbox's head is compared with the last
change applied.  Local delivery (connections, the sender's own device left out, one
encoding per distinct envelope) is `LocalBus`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shtalk.server.chat import pushes
from shtalk.server.chat.delivery import LocalBus
from shtalk.server.chat.rooms import Rooms
from shtalk.server.cluster import codec
from shtalk.server.cluster.chain import Chains, Item
from shtalk.server.cluster.publisher import BusPublisher, Publisher
from shtalk.server.cluster.subscriptions import (
    BusSubscriber,
    RedisAddress,
    Subscriptions,
    connect,
    require_hiredis,
)
from shtalk.server.iserver import IDeliveryBus, IStore
from shtalk.server.store.mailbox import inbox_owner, room_mailbox, room_of, user_mailbox
from shtalk.server.store.records import ChainLink, StoredMessage

log = Logger()

#: How long a login waits for Redis to confirm its subscriptions before it goes on
#: anyway (what it misses meanwhile is read back once they are confirmed).
ATTACH_TIMEOUT = 5.0


@implementer(IDeliveryBus)
class RedisBus(Service):
    def __init__(
        self,
        local: LocalBus,
        store: IStore,
        rooms: Rooms,
        clock: IReactorTime,
        reactor: IReactorTCP,
        redis_url: str,
        prefix: str,
        node: str,
        gap_wait: float,
        reconcile_interval: float,
        keepalive: float = 1.0,
    ) -> None:
        require_hiredis()
        self.local = local
        self.store = store
        self.rooms = rooms
        self.clock = clock
        self.reactor = reactor
        self.address = RedisAddress(redis_url)
        self.node = codec.check_node_name(node)
        self._own = codec.own_tag(self.node)
        self.channel_prefix = (prefix + "mb:").encode("ascii")
        self.chains = Chains(self, gap_wait)
        self.subscriptions = Subscriptions(clock, self._received, self._resubscribed, keepalive)
        self.publisher = Publisher(clock, self.channel_prefix + b"-", keepalive)
        store.add_batch_listener(self.publisher)
        self.reconcile_interval = reconcile_interval
        self._refs: dict[str, int] = {}  # mailbox -> local users that need it
        self._users: dict[int, int] = {}  # user id -> attached connections here
        self._held: dict[int, set[str]] = {}  # user id -> the mailboxes held for them
        self._starting: dict[str, Deferred[Any]] = {}
        self._timer: IDelayedCall | None = None
        self._loop: LoopingCall | None = None
        self._factories: list[Any] = []
        self.received = 0

    # service ----------------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.subscriptions.stopped = False
        self._factories = [
            connect(self.reactor, self.address, self.subscriptions, BusSubscriber),
            connect(self.reactor, self.address, self.publisher, BusPublisher),
        ]
        loop = LoopingCall(self._reconcile_logged)
        loop.clock = self.clock
        loop.start(self.reconcile_interval, now=False)
        self._loop = loop

    def stopService(self) -> Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        self.subscriptions.stop()
        self.publisher.stop()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        factories, self._factories = self._factories, []
        return gatherResults([f.disconnect() for f in factories], consumeErrors=True)

    def when_connected(self) -> Deferred[Any]:
        """Both Redis connections are up (for tests and start-up checks)."""
        return gatherResults(
            [self.subscriptions.when_connected(), self.publisher.when_connected()])

    def channel(self, mailbox: str) -> bytes:
        return self.channel_prefix + mailbox.encode("ascii")

    # IDeliveryBus -----------------------------------------------------------------------
    def publish(self, message: StoredMessage) -> None:
        mailbox = message.mailbox
        frame: codec.Frame | None = None
        if not message.envelopes and message.envelope is not None:
            name = self.local.users.name(message.sender_id)
            line = pushes.message(message, message.envelope, name)
            if len(line) <= codec.INLINE_MAX:
                frame = codec.Frame(
                    codec.MESSAGE, self.node, mailbox, message.seq, message.prev_seq,
                    message.sender_id, message.sender_device, line,
                )  # fmt: skip
        kind, body = (codec.MESSAGE, frame.body) if frame is not None else (codec.HEADER, b"")
        self.publisher.publish(self.channel(mailbox), codec.encode(
            kind, self.node, mailbox, message.seq, message.prev_seq, message.sender_id,
            message.sender_device, body,
        ))  # fmt: skip
        if mailbox in self.chains:
            self.chains.offer(
                mailbox,
                Item(message.seq, message.prev_seq, frame if frame is not None else message),
                self.clock.seconds(),
            )
            self._arm()

    def membership_changed(
        self, link: ChainLink | None, room_id: int, user_id: int, joined: bool
    ) -> None:
        """A membership change committed here (the rooms cache already has it): its
        place in the room's chain for every process, a notice on the user's inbox for
        those holding the user's devices, and this process's subscriptions."""
        if link is not None:
            self.publisher.publish(self.channel(link.mailbox), codec.encode(
                codec.LINK, self.node, link.mailbox, link.seq, link.prev_seq))
            if link.mailbox in self.chains:
                self.chains.offer(link.mailbox, Item(link.seq, link.prev_seq),
                                  self.clock.seconds())
                self._arm()
        inbox = user_mailbox(user_id)
        since = link.seq if link is not None else 0
        self.publisher.publish(self.channel(inbox), codec.encode(
            codec.NOTICE, self.node, inbox, since, 0, body=codec.notice_body(room_id, joined)))
        self._user_room(user_id, room_id, joined, since)

    def attach(self, user_id: int) -> Deferred[Any]:
        """A device of ``user_id`` logs in here: fires once its mailboxes are subscribed
        (Redis confirmed them) and their chains begin (head read after that)."""
        self._users[user_id] = self._users.get(user_id, 0) + 1
        wanted = {user_mailbox(user_id)} | {
            room_mailbox(r) for r in self.rooms.of_user.get(user_id, ())
        }
        held = self._held.setdefault(user_id, set())
        new = wanted - held
        held |= new
        return self._hold(new, wanted)

    def detach(self, user_id: int) -> None:
        n = self._users.get(user_id, 0) - 1
        if n > 0:
            self._users[user_id] = n
            return
        self._users.pop(user_id, None)
        self._release(self._held.pop(user_id, set()))

    def reconcile(self) -> Deferred[Any]:
        """Compare every started chain with the store's heads; read what was missed."""
        return self._reconcile()

    # subscriptions ----------------------------------------------------------------------
    def _hold(
        self, new: Iterable[str], wait_for: Iterable[str], since: int = 0
    ) -> Deferred[Any]:
        """Count the mailboxes in; subscribe those that are new here, and begin their
        chains at the head read once Redis confirmed them (or at ``since``, a join's
        seq: what was sent to the room after the join reaches a device already online).
        Fires once every mailbox of ``wait_for`` has begun."""
        fresh = []
        for mailbox in new:
            n = self._refs.get(mailbox, 0)
            self._refs[mailbox] = n + 1
            if n == 0:
                self.chains.add(mailbox, room_of(mailbox) is not None)
                fresh.append(mailbox)
        if fresh:
            d = self._within(self.subscriptions.add([self.channel(mb) for mb in fresh]))
            d.addErrback(self._unconfirmed)
            started = d.addCallback(lambda _: self._start(fresh, since))
            for mb in fresh:
                self._starting[mb] = started
            started.addBoth(self._started, fresh, started)
        waits = [self._starting[mb] for mb in wait_for if mb in self._starting]
        return gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    def _within(self, confirmed: Deferred[Any]) -> Deferred[Any]:
        """``confirmed``'s outcome, or a TimeoutError after `ATTACH_TIMEOUT`.  The
        subscriptions' own Deferred is never cancelled: it stays theirs, and fires (and
        is consumed here) whenever Redis confirms."""
        out: Deferred[Any] = Deferred()

        def expire() -> None:
            if not out.called:
                out.errback(TimeoutError("Redis did not confirm the subscriptions"))

        timer = self.clock.callLater(ATTACH_TIMEOUT, expire)

        def done(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if not out.called:
                out.callback(result)  # a Failure goes on as one

        confirmed.addBoth(done)
        return out

    @staticmethod
    def _unconfirmed(failure: Any) -> None:
        log.warn("Redis did not confirm the bus subscriptions in time; going on (what "
                 "they miss is read from the store once they are)")

    @inlineCallbacks
    def _start(self, mailboxes: list[str], since: int = 0) -> Any:
        try:
            heads = yield self.store.mailbox_heads(mailboxes)
            for mailbox in mailboxes:
                room = room_of(mailbox)
                if room is not None and mailbox in self.chains:
                    yield self.rooms.reload(room)
            now = self.clock.seconds()
            for mailbox in mailboxes:
                head = heads.get(mailbox, 0)
                self.chains.start(mailbox, min(since, head) if since else head, now)
                self.chains.behind(mailbox, head)
        except Exception:
            log.failure("starting the bus's mailbox chains failed; retrying")
            self.clock.callLater(self.reconcile_interval, self._retry_start, mailboxes, since)
        self._arm()

    def _started(self, result: Any, mailboxes: list[str], started: Deferred[Any]) -> Any:
        for mailbox in mailboxes:
            if self._starting.get(mailbox) is started:  # not a later subscription's
                del self._starting[mailbox]
        return result

    def _retry_start(self, mailboxes: list[str], since: int) -> None:
        left = [mb for mb in mailboxes if mb in self.chains and not self.chains.is_started(mb)]
        if left:
            self._start(left, since)

    def _release(self, mailboxes: Iterable[str]) -> None:
        gone = []
        for mailbox in mailboxes:
            n = self._refs.get(mailbox, 0) - 1
            if n > 0:
                self._refs[mailbox] = n
                continue
            self._refs.pop(mailbox, None)
            self.chains.remove(mailbox)
            gone.append(self.channel(mailbox))
            room = room_of(mailbox)
            if room is not None:
                self.rooms.forget(room)  # no longer kept current here
        if gone:
            self.subscriptions.drop(gone)

    def _user_room(self, user_id: int, room_id: int, joined: bool, since: int = 0) -> None:
        held = self._held.get(user_id)
        if held is None:
            return
        mailbox = room_mailbox(room_id)
        if joined and mailbox not in held:
            held.add(mailbox)
            self._hold([mailbox], [mailbox], since).addErrback(
                lambda f: log.failure("subscribing a joined room failed", f))
        elif not joined and mailbox in held:
            held.discard(mailbox)
            self._release([mailbox])

    def _resubscribed(self) -> None:
        log.info("the Redis bus is subscribed again; reading what it missed")
        self._reconcile_logged()

    # what arrives -----------------------------------------------------------------------
    def _received(self, channel: bytes, payload: bytes) -> None:
        self.received += 1
        if payload.startswith(self._own, 1):
            return  # committed here, and applied then (the header is <kind><node's tag>)
        try:
            frame = codec.decode(payload)
        except codec.BadFrame:
            log.warn("a malformed frame on the bus was ignored")
            return
        kind = frame.kind
        if kind == codec.MESSAGE:
            self.chains.offer(frame.mailbox, Item(frame.seq, frame.prev_seq, frame),
                              self.clock.seconds())
        elif kind == codec.LINK:
            self.chains.offer(frame.mailbox, Item(frame.seq, frame.prev_seq, reload=True),
                              self.clock.seconds())
        elif kind == codec.HEADER:
            if frame.mailbox in self.chains:
                self._read_one(frame)
            return
        elif kind == codec.NOTICE:
            self._notice(frame)
            return
        self._arm()

    def _read_one(self, frame: codec.Frame) -> None:
        """A message sent as its header: read it, then it joins its chain."""
        d = self.store.messages_between(frame.mailbox, frame.seq - 1, frame.seq)
        d.addCallback(self._named)

        def found(messages: list[StoredMessage]) -> None:
            value = messages[0] if messages else None  # gone already: nothing to deliver
            self.chains.offer(frame.mailbox, Item(frame.seq, frame.prev_seq, value),
                              self.clock.seconds())
            self._arm()

        d.addCallback(found).addErrback(
            lambda f: log.failure("reading a message the bus announced failed", f))

    def _named(self, messages: list[StoredMessage]) -> Deferred[list[StoredMessage]]:
        """Messages read from the store, once their senders' names are known here: the
        push names its sender, and the recipient's client checks that name against the
        envelope's (a sender who never was on this process is not in its cache)."""
        d: Deferred[Any] = self.local.users.learn_names({m.sender_id for m in messages})
        return d.addCallback(lambda _: messages)

    def _notice(self, frame: codec.Frame) -> None:
        user_id = inbox_owner(frame.mailbox)
        if user_id is None or user_id not in self._users:
            return
        try:
            room_id, joined = codec.parse_notice(frame.body)
        except codec.BadFrame:
            return
        d = self.rooms.reload(room_id)  # the user's rooms as this process sees them
        d.addCallback(lambda _: self._user_room(user_id, room_id, joined, frame.seq))
        d.addErrback(lambda f: log.failure("a membership notice could not be applied", f))

    # the sequencer's sink ---------------------------------------------------------------
    def apply(self, mailbox: str, item: Item) -> None:
        value = item.value
        if type(value) is codec.Frame:
            if value.node != self.node:
                self.store.delivered(mailbox, item.seq)
            self._deliver_line(mailbox, item.seq, value.body, value.sender_id,
                               value.sender_device)
        elif isinstance(value, StoredMessage):
            self.store.delivered(mailbox, item.seq)  # read back: maybe another's
            self.local.publish(value)

    def _deliver_line(
        self, mailbox: str, seq: int, line: bytes, sender_id: int, sender_device: str
    ) -> None:
        local = self.local
        devices = local.presence.online.get(sender_id)
        own = devices.get(sender_device, ()) if devices else ()
        n = 0
        for mind in local.connections(mailbox):
            if mind not in own:
                mind.deliver(seq, line)
                n += 1
        local.delivered += n

    def fill(self, mailbox: str, after: int, upto: int) -> None:
        d = self.store.messages_between(mailbox, after, upto)
        d.addCallback(self._named)

        def read(messages: list[StoredMessage]) -> None:
            items = [Item(m.seq, m.prev_seq, m) for m in messages]
            self.chains.filled(mailbox, upto, items, self.clock.seconds())
            self._arm()

        def failed(failure: Any) -> None:
            log.failure("reading a gap of a mailbox failed; retrying", failure)
            self.chains.fill_failed(mailbox, self.clock.seconds())
            self._arm()

        d.addCallbacks(read, failed)

    def reload(self, mailbox: str) -> None:
        room = room_of(mailbox)
        d: Deferred[Any] = self.rooms.reload(room) if room is not None else succeed(None)

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                log.warn("re-reading a room's members failed; going on with the cache")
            self.chains.reloaded(mailbox, self.clock.seconds())
            self._arm()

        d.addBoth(done)

    # timers -----------------------------------------------------------------------------
    def _arm(self) -> None:
        """Wake up when the first mailbox's wait for a missing change ends."""
        waiting = self.chains.waiting
        if not waiting or self._timer is not None:
            return
        due = next(iter(waiting.values()))
        self._timer = self.clock.callLater(max(0.0, due - self.clock.seconds()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.chains.tick(self.clock.seconds())
        self._arm()

    @inlineCallbacks
    def _reconcile(self) -> Any:
        started = self.chains.started()
        if not started:
            return
        heads = yield self.store.mailbox_heads(sorted(started))
        for mailbox, head in heads.items():
            self.chains.behind(mailbox, head)
        self._arm()

    def _reconcile_logged(self) -> Deferred[Any]:
        d = self._reconcile()
        d.addErrback(lambda f: log.failure("reconciling the bus with the store failed", f))
        return d
