"""Subscriptions: one SUBSCRIBE in flight, a channel counted only once Redis confirmed it,
a silent connection aborted; the codec's frames."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from shtalk.server.cluster import codec
from shtalk.server.cluster.publisher import KEEPALIVE, REPLY_OFF, Publisher, publish_command
from shtalk.server.cluster.subscriptions import PING, RedisAddress, Subscriptions


class FakeProto:
    """What Subscriptions uses of the subscriber protocol: its transport and encoder."""

    def __init__(self) -> None:
        self.transport = StringTransport()

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def _build_command(self, *args: Any) -> bytes:
        return b" ".join(a if isinstance(a, bytes) else str(a).encode() for a in args) + b";"

    def sent(self) -> list[bytes]:
        out = self.transport.value().split(b";")
        self.transport.clear()
        return [c for c in out if c]


class SubscriptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.messages: list[tuple[bytes, bytes]] = []
        self.resubscribed = 0
        self.subs = Subscriptions(self.clock, lambda c, p: self.messages.append((c, p)),
                                  self.resync, keepalive=1.0)
        self.proto = FakeProto()
        self.subs.connected(self.proto)

    def resync(self) -> None:
        self.resubscribed += 1

    def test_one_subscribe_in_flight_and_each_channel_confirmed(self) -> None:
        first = self.subs.add([b"a", b"b"])
        second = self.subs.add([b"c"])
        self.assertEqual(self.proto.sent(), [b"SUBSCRIBE a b"])  # c waits its turn
        # The first command's first confirmation fires neither login.
        self.subs.confirmed(b"subscribe", b"a")
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertEqual(self.proto.sent(), [])
        self.subs.confirmed(b"subscribe", b"b")
        self.successResultOf(first)
        self.assertNoResult(second)
        self.assertEqual(self.proto.sent(), [b"SUBSCRIBE c"])
        self.subs.confirmed(b"subscribe", b"c")
        self.successResultOf(second)

    def test_queued_channels_go_in_one_command(self) -> None:
        self.subs.add([b"a"])
        for ch in (b"b", b"c", b"d"):
            self.subs.add([ch])
        self.assertEqual(self.proto.sent(), [b"SUBSCRIBE a"])
        self.subs.confirmed(b"subscribe", b"a")
        self.assertEqual(self.proto.sent(), [b"SUBSCRIBE b c d"])

    def test_already_confirmed_is_at_once(self) -> None:
        self.subs.add([b"a"])
        self.subs.confirmed(b"subscribe", b"a")
        self.successResultOf(self.subs.add([b"a"]))

    def test_resubscribed_while_an_unsubscribe_is_in_flight(self) -> None:
        self.subs.add([b"a"])
        self.subs.confirmed(b"subscribe", b"a")
        self.proto.sent()
        self.subs.drop([b"a"])
        self.assertEqual(self.proto.sent(), [b"UNSUBSCRIBE a"])
        again = self.subs.add([b"a"])
        self.subs.confirmed(b"unsubscribe", b"a")
        self.assertNoResult(again)  # the unsubscribe's confirmation does not count
        self.assertEqual(self.proto.sent(), [b"SUBSCRIBE a"])
        self.subs.confirmed(b"subscribe", b"a")
        self.successResultOf(again)

    def test_reconnect_subscribes_everything_again_then_says_so(self) -> None:
        self.subs.add([b"a", b"b"])
        self.subs.confirmed(b"subscribe", b"a")
        self.subs.confirmed(b"subscribe", b"b")
        self.subs.lost(self.proto)
        waiting = self.subs.add([b"c"])
        proto = FakeProto()
        self.subs.connected(proto)
        self.assertEqual(proto.sent(), [b"SUBSCRIBE a b c"])
        self.assertEqual(self.resubscribed, 0)
        for ch in (b"a", b"b", b"c"):
            self.subs.confirmed(b"subscribe", ch)
        self.successResultOf(waiting)
        self.assertEqual(self.resubscribed, 1)

    def test_a_connection_that_stops_answering_is_aborted(self) -> None:
        self.proto.sent()
        self.clock.advance(1.0)
        self.assertEqual(self.proto.transport.value(), PING)
        self.subs.pong()
        self.clock.advance(1.0)
        self.assertFalse(self.proto.transport.disconnecting)
        self.clock.advance(1.0)  # the second ping was never answered
        self.assertTrue(self.proto.transport.disconnecting)


class PublisherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pub = Publisher(self.clock, b"p:-", keepalive=1.0)
        self.proto = FakeProto()

    def connect(self) -> None:
        self.pub.connected(self.proto)
        handshake = publish_command(b"p:-", b"") + REPLY_OFF
        self.assertEqual(self.proto.transport.value()[:len(handshake)], handshake)
        self.proto.transport.clear()

    def test_a_turns_publishes_go_out_in_one_write_at_its_end(self) -> None:
        self.connect()
        writes: list[bytes] = []
        self.proto.send = writes.append  # type: ignore[method-assign,assignment]
        self.pub.publish(b"ch", b"payload")
        self.pub.publish(b"ch", b"two")
        self.assertEqual(writes, [])
        self.clock.advance(0)
        self.assertEqual(writes, [b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$7\r\npayload\r\n"
                                  b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$3\r\ntwo\r\n"])

    def test_a_store_batchs_publishes_go_out_after_its_last_answer(self) -> None:
        """No timer for the end of the turn: the batch's end writes them."""
        self.connect()
        writes: list[bytes] = []
        self.proto.send = writes.append  # type: ignore[method-assign,assignment]
        self.pub.batch_begins()
        self.pub.publish(b"ch", b"one")
        self.pub.publish(b"ch", b"two")
        self.assertEqual(writes, [])
        self.assertIsNone(self.pub._flush, "a timer for the end of the turn")
        self.pub.batch_ends()
        self.assertEqual(writes, [publish_command(b"ch", b"one") + publish_command(b"ch", b"two")])
        self.pub.publish(b"ch", b"later")  # outside a batch: the end of the turn again
        self.clock.advance(0)
        self.assertEqual(writes[1:], [publish_command(b"ch", b"later")])

    def test_the_connection_probes_publishing_then_turns_answers_off(self) -> None:
        self.pub.publish(b"ch", b"early")  # while down: kept
        self.pub.connected(self.proto)
        self.assertEqual(self.proto.transport.value(),
                         publish_command(b"p:-", b"") + REPLY_OFF
                         + publish_command(b"ch", b"early"))

    def test_kept_while_down_and_sent_on_reconnect(self) -> None:
        self.pub.publish(b"ch", b"1")
        self.pub.publish(b"ch", b"2")
        self.connect_raw()
        self.assertEqual(self.proto.transport.value().count(b"PUBLISH"), 3)  # probe too
        self.assertTrue(self.proto.transport.value().endswith(b"$1\r\n2\r\n"))
        self.assertEqual(self.pub.dropped, 0)

    def connect_raw(self) -> None:
        self.pub.connected(self.proto)

    def test_published_but_not_written_when_the_connection_drops_goes_on_the_next(
        self,
    ) -> None:
        self.connect()
        self.pub.publish(b"ch", b"late")
        self.pub.lost(self.proto)
        self.clock.advance(0)
        self.proto = FakeProto()
        self.connect_raw()
        self.assertTrue(self.proto.transport.value().endswith(publish_command(b"ch", b"late")))

    def test_a_refusal_is_logged_once_and_counted(self) -> None:
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.connect()
        for _ in range(3):
            self.pub.reply(Exception("NOPERM this user has no permissions"))
        self.assertEqual(self.pub.refused, 3)
        said = [formatEvent(e) for e in events if "refused" in formatEvent(e)]
        self.assertEqual(len(said), 1)
        self.assertIn("NOPERM", said[0])

    def test_a_publisher_whose_pings_go_unanswered_is_aborted(self) -> None:
        self.connect()
        self.clock.advance(1.0)
        self.assertEqual(self.proto.transport.value(), KEEPALIVE)
        self.pub.reply(b"OK")
        self.pub.reply(b"PONG")
        self.clock.advance(1.0)
        self.assertFalse(self.proto.transport.disconnecting)
        self.clock.advance(1.0)  # the second ping was never answered
        self.assertTrue(self.proto.transport.disconnecting)

    def test_stop_writes_this_turns_publishes_and_leaves_no_timer(self) -> None:
        self.connect()
        self.pub.publish(b"ch", b"x")
        self.pub.stop()
        self.assertIn(publish_command(b"ch", b"x"), self.proto.transport.value())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CodecTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        line = b'{"type":"message"}\r\n'
        raw = codec.encode(codec.MESSAGE, b"n1", "r:5", 10, 7, 3, "dev-1", line)
        self.assertEqual(codec.decode(raw),
                         codec.Frame(codec.MESSAGE, b"n1", "r:5", 10, 7, 3, "dev-1", line))

    def test_garbage_is_refused(self) -> None:
        good = codec.encode(codec.MESSAGE, b"n1", "r:5", 10, 7, 3, "dev-1", b"line")
        cut = good.index(b"r:5") + 4  # inside the device name
        for raw in (b"", b"m", b"m\x02n1", good[:cut], b"m n1 r:5 10 7 3 d\nline",
                    good.replace(b"r:5", b"r:\xff")):
            self.assertRaises(codec.BadFrame, codec.decode, raw)

    def test_a_body_that_looks_like_a_header_is_only_a_body(self) -> None:
        body = codec.encode(codec.LINK, b"n2", "r:9", 99, 98)
        frame = codec.decode(codec.encode(codec.MESSAGE, b"n1", "r:5", 10, 7, 3, "d", body))
        self.assertEqual((frame.mailbox, frame.seq, frame.body), ("r:5", 10, body))

    def test_node_names(self) -> None:
        self.assertEqual(codec.check_node_name("host-1.42"), b"host-1.42")
        self.assertRaises(ValueError, codec.check_node_name, "two words")
        self.assertRaises(ValueError, codec.check_node_name, "n" * 256)

    def test_address_repr_hides_the_password(self) -> None:
        address = RedisAddress("redis://:s3cret@db.example:6380/2")
        self.assertEqual((address.host, address.port, address.db, address.password),
                         ("db.example", 6380, 2, "s3cret"))
        self.assertNotIn("s3cret", repr(address))
