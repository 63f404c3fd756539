"""The sequencer: any arrival order, duplicates and drops -> every change once, in order."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from shtalk.server.cluster.chain import Chains, Item

GAP = 0.05


@dataclass
class Change:
    seq: int
    prev_seq: int
    link: bool  # a membership change (not in messages_between)


@dataclass
class Recorder:
    """The driver's side: answers are queued, the test decides when they come."""

    changes: list[Change]
    log: list[tuple[str, int]] = field(default_factory=list)  # ("m", seq) / ("reload", 0)
    asked: list[tuple[str, str, int, int]] = field(default_factory=list)
    chains: Chains | None = None

    def apply(self, mailbox: str, item: Item) -> None:
        if not item.value:
            self.log.append(("m", item.seq))

    def fill(self, mailbox: str, after: int, upto: int) -> None:
        self.asked.append(("fill", mailbox, after, upto))
        self.log.append(("read", upto))  # every change up to here is known now

    def reload(self, mailbox: str) -> None:
        self.asked.append(("reload", mailbox, 0, 0))
        self.log.append(("ask", 0))

    def applied(self) -> list[tuple[str, int]]:
        return [e for e in self.log if e[0] in ("m", "reload")]

    def answer(self, now: float) -> None:
        kind, mailbox, after, upto = self.asked.pop(0)
        assert self.chains is not None
        if kind == "reload":
            self.log.append(("reload", 0))
            self.chains.reloaded(mailbox, now)
            return
        found = [
            Item(c.seq, c.prev_seq) for c in self.changes if after < c.seq <= upto and not c.link
        ]
        self.chains.filled(mailbox, upto, found, now)


def make_changes(steps: list[tuple[int, bool]]) -> list[Change]:
    changes, seq = [], 0
    for gap, link in steps:
        prev, seq = seq, seq + gap
        changes.append(Change(seq, prev, link))
    return changes


def item(c: Change) -> Item:
    # value True marks a link for the recorder; links from elsewhere ask for a reload
    return Item(c.seq, c.prev_seq, value=c.link or None, reload=c.link)


class SequencerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.rec = Recorder([])
        self.chains = Chains(self.rec, GAP)
        self.rec.chains = self.chains

    def test_in_order_applies_at_once(self) -> None:
        self.chains.add("u:1", room=False)
        self.chains.start("u:1", 10, 0.0)
        self.chains.offer("u:1", Item(12, 10), 0.0)
        self.chains.offer("u:1", Item(15, 12), 0.0)
        self.assertEqual(self.rec.applied(), [("m", 12), ("m", 15)])
        self.assertEqual(self.chains.waiting, {})

    def test_out_of_order_waits_for_the_earlier_one(self) -> None:
        self.chains.add("u:1", room=False)
        self.chains.start("u:1", 0, 0.0)
        self.chains.offer("u:1", Item(2, 1), 0.0)
        self.assertEqual(self.rec.applied(), [])
        self.assertEqual(self.chains.waiting, {"u:1": GAP})
        self.chains.offer("u:1", Item(1, 0), 0.01)
        self.assertEqual(self.rec.applied(), [("m", 1), ("m", 2)])
        self.assertEqual(self.chains.waiting, {})
        self.assertEqual(self.rec.asked, [])

    def test_held_until_started_and_old_ones_dropped(self) -> None:
        self.chains.add("u:1", room=False)
        self.chains.offer("u:1", Item(5, 3), 0.0)
        self.chains.offer("u:1", Item(7, 5), 0.0)
        self.assertEqual(self.rec.applied(), [])
        self.chains.start("u:1", 5, 0.0)  # 5 was committed before the head was read
        self.assertEqual(self.rec.applied(), [("m", 7)])

    def test_gap_is_read_after_the_wait(self) -> None:
        self.rec.changes = make_changes([(1, False), (1, False), (1, False)])
        self.chains.add("u:1", room=False)
        self.chains.start("u:1", 0, 0.0)
        self.chains.offer("u:1", Item(3, 2), 0.0)
        self.chains.tick(GAP / 2)
        self.assertEqual(self.rec.asked, [])
        self.chains.tick(GAP)
        self.assertEqual(self.rec.asked, [("fill", "u:1", 0, 3)])
        self.rec.answer(GAP)
        self.assertEqual(self.rec.applied(), [("m", 1), ("m", 2), ("m", 3)])

    def test_room_link_reloads_before_later_messages(self) -> None:
        self.chains.add("r:1", room=True)
        self.chains.start("r:1", 0, 0.0)
        self.chains.offer("r:1", Item(1, 0, value=True, reload=True), 0.0)
        self.chains.offer("r:1", Item(2, 1), 0.0)
        self.assertEqual(self.rec.applied(), [])  # the message waits for the members
        self.rec.answer(0.0)
        self.assertEqual(self.rec.applied(), [("reload", 0), ("m", 2)])

    def test_dropped_link_found_by_the_fill_reloads(self) -> None:
        self.rec.changes = make_changes([(1, False), (1, True), (1, False)])
        self.chains.add("r:1", room=True)
        self.chains.start("r:1", 0, 0.0)
        self.chains.offer("r:1", Item(1, 0), 0.0)
        self.chains.offer("r:1", Item(3, 2), 0.0)  # the link (2) was dropped
        self.chains.tick(1.0)
        self.rec.answer(1.0)  # the fill: no message 2
        self.assertEqual(self.rec.applied(), [("m", 1)])
        self.rec.answer(1.0)  # the reload
        self.assertEqual(self.rec.applied(), [("m", 1), ("reload", 0), ("m", 3)])

    def test_reconciliation_reads_a_dropped_tail(self) -> None:
        self.rec.changes = make_changes([(1, False), (1, False)])
        self.chains.add("u:1", room=False)
        self.chains.start("u:1", 0, 0.0)
        self.chains.offer("u:1", Item(1, 0), 0.0)
        self.chains.behind("u:1", 2)  # nothing after 2 will ever show the gap
        self.rec.answer(0.0)
        self.assertEqual(self.rec.applied(), [("m", 1), ("m", 2)])

    def test_unsubscribed_mailbox_ignored(self) -> None:
        self.chains.offer("u:9", Item(1, 0), 0.0)
        self.assertEqual(self.rec.applied(), [])

    @settings(max_examples=300, deadline=None)
    @given(
        steps=st.lists(st.tuples(st.integers(1, 3), st.booleans()), min_size=1, max_size=25),
        room=st.booleans(),
        data=st.data(),
    )
    def test_any_arrival_order(self, steps: list[tuple[int, bool]], room: bool,
                               data: st.DataObject) -> None:
        """Arrivals shuffled, duplicated and dropped; fills and reloads answered at any
        time: each message after the start is applied once, in seq order, and the room's
        members are re-read after a membership change and before any later message."""
        changes = make_changes(steps if room else [(g, False) for g, _ in steps])
        start_at = data.draw(st.integers(0, len(changes)), label="start index")
        head = changes[start_at - 1].seq if start_at else 0
        arrivals = data.draw(
            st.lists(st.sampled_from(changes), max_size=3 * len(changes)), label="arrivals"
        )
        rec = Recorder(changes)
        chains = Chains(rec, GAP)
        rec.chains = chains
        mb = "r:1" if room else "u:1"
        chains.add(mb, room=room)
        now = 0.0
        started = False
        for c in arrivals:
            rec.log.append(("offer", c.seq))
            action = data.draw(st.sampled_from(["offer", "tick", "answer", "start"]))
            if action == "tick":
                now += GAP
                chains.tick(now)
            elif action == "answer" and rec.asked:
                rec.answer(now)
            elif action == "start" and not started:
                chains.start(mb, head, now)
                started = True
            chains.offer(mb, item(c), now)
        if not started:
            chains.start(mb, head, now)
        # Settle: answers and waits until quiet, then a reconciliation against the head.
        for _ in range(4 * len(changes) + 8):
            while rec.asked:
                rec.answer(now)
            now += GAP
            chains.tick(now)
            if not rec.asked:
                chains.behind(mb, changes[-1].seq)
        self.assertEqual(rec.asked, [])
        wanted = [c.seq for c in changes if c.seq > head and not c.link]
        got = [seq for kind, seq in rec.log if kind == "m"]
        self.assertEqual(got, wanted)
        # For each membership change: a reload asked once the change was known (offered,
        # or inside a store read) and answered before the first message after it.
        for link in (c for c in changes if c.link and c.seq > head):
            later = [i for i, (k, s) in enumerate(rec.log) if k == "m" and s > link.seq]
            if not later:
                continue
            known = min(i for i, (k, s) in enumerate(rec.log)
                        if (k == "offer" and s == link.seq) or (k == "read" and s >= link.seq))
            asks = [i for i, (k, _) in enumerate(rec.log) if k == "ask" and i > known]
            self.assertTrue(asks, f"no reload asked after the link {link.seq}")
            answered = [i for i, (k, _) in enumerate(rec.log) if k == "reload" and i > asks[0]]
            self.assertTrue(answered and answered[0] < later[0],
                            f"a message after the link {link.seq} went before the reload")
