"""Upkeep timers (shtalk.server.repeating) and the services that run on them."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from shtalk.server.chat.service import ChatService
from shtalk.server.repeating import Repeating
from shtalk.server.store.memory import MemoryStore


class RepeatingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runs: list[float] = []
        self.pending: Deferred[None] | None = None

    def record(self) -> Deferred[None] | None:
        self.runs.append(self.clock.seconds())
        return self.pending

    def test_first_then_every_interval(self) -> None:
        timer = Repeating(self.clock, 10.0, self.record, "upkeep failed", first=3.0)
        timer.start()
        self.clock.advance(2.9)
        self.assertEqual(self.runs, [])
        self.clock.pump([0.1, 10.0, 10.0])
        self.assertEqual(self.runs, [3.0, 13.0, 23.0])

    def test_first_defaults_to_the_interval(self) -> None:
        timer = Repeating(self.clock, 10.0, self.record, "upkeep failed")
        timer.start()
        self.clock.pump([9.0, 1.0])
        self.assertEqual(self.runs, [10.0])

    def test_next_run_waits_for_the_last_to_finish(self) -> None:
        self.pending = Deferred()
        timer = Repeating(self.clock, 10.0, self.record, "upkeep failed")
        timer.start()
        self.clock.pump([10.0, 10.0, 10.0])
        self.assertEqual(self.runs, [10.0])  # still running: no second run over it
        self.pending.callback(None)
        self.clock.pump([9.0, 1.0])
        self.assertEqual(self.runs, [10.0, 40.0])

    def test_a_failure_is_logged_and_the_timer_goes_on(self) -> None:
        def fail() -> None:
            self.runs.append(self.clock.seconds())
            raise RuntimeError("disk full")

        timer = Repeating(self.clock, 10.0, fail, "upkeep failed")
        timer.start()
        self.clock.pump([10.0, 10.0])
        self.assertEqual(self.runs, [10.0, 20.0])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_stop_cancels_and_nothing_comes_after(self) -> None:
        self.pending = Deferred()
        timer = Repeating(self.clock, 10.0, self.record, "upkeep failed")
        timer.start()
        self.clock.advance(10.0)
        timer.stop()
        self.pending.callback(None)  # the run under way ends after the stop
        self.clock.pump([10.0, 10.0])
        self.assertEqual(self.runs, [10.0])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ChatServiceTests(SynchronousTestCase):
    def test_purges_expired_messages_while_running(self) -> None:
        clock = Clock()
        store = MemoryStore(clock)
        purged: list[float] = []
        purge_expired = store.purge_expired

        def watched(now: float) -> Deferred[int]:
            purged.append(now)
            return purge_expired(now)

        store.purge_expired = watched  # type: ignore[method-assign]
        service = ChatService(store, clock, purge_interval=5.0)
        clock.advance(5.0)
        self.assertEqual(purged, [])  # nothing before startService
        service.startService()  # type: ignore[no-untyped-call]
        clock.pump([5.0, 5.0])
        self.assertEqual(purged, [10.0, 15.0])
        service.stopService()  # type: ignore[no-untyped-call]
        clock.advance(5.0)
        self.assertEqual(purged, [10.0, 15.0])
        self.assertEqual(clock.getDelayedCalls(), [])
