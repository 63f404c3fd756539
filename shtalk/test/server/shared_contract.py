"""What the state processes share must do, whichever backend keeps it (memory or Redis).

Mixins of test methods: `ThrottleContract` (the failure throttle), `DemandsContract` (the
monitoring's CAPTCHA demands) and `CountsContract` (connections per address).  Each runs
on the memory implementation (``shtalk.test.server.test_shared_state``) and on Redis
(``tests.test_cluster_state``); time is a `Clock` the test advances, the same for both
(Redis implementations are given it as their clock).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from shtalk.server.config import ThrottleSection


class ThrottleContract:
    """Needs ``self.clock`` (a Clock) and ``make_throttle(section, window)``."""

    clock: Clock
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any
    assertLessEqual: Any

    def make_throttle(self, section: ThrottleSection | None = None, window: float = 3600.0) -> Any:
        raise NotImplementedError

    async def test_growing_delays_then_captcha(self) -> None:
        t = self.make_throttle(ThrottleSection(free_failures=2, base_delay=2, max_delay=8,
                                               captcha_after=5))
        for _ in range(2):
            self.assertFalse((await t.check("bob", "198.51.100.1")).wait)
            await t.failed("bob", "198.51.100.1")
        waits = []
        for _ in range(4):
            v = await t.check("bob", "198.51.100.1")
            waits.append(v.retry_after)
            self.clock.advance(v.retry_after)
            await t.failed("bob", "198.51.100.1")
        self.assertEqual(waits, [2, 4, 8, 8])
        self.assertTrue((await t.check("bob", "203.0.113.9")).captcha)  # per account
        await t.succeeded("bob")
        v = await t.check("bob", "203.0.113.9")
        self.assertFalse(v.wait or v.captcha)

    async def test_success_keeps_the_address_failures(self) -> None:
        t = self.make_throttle(ThrottleSection(address_free_failures=3, base_delay=5))
        for i in range(4):
            await t.failed(f"user{i}", "198.51.100.3")
        await t.succeeded("user3")
        self.assertEqual(await t.failures(address="198.51.100.3"), 4)
        self.assertEqual(await t.failures(account="user3"), 0)
        self.assertEqual(await t.failures(account="user2"), 1)
        self.assertEqual((await t.check(None, "198.51.100.3")).retry_after, 10.0)

    async def test_window_forgets_no_permanent_lockout(self) -> None:
        t = self.make_throttle(ThrottleSection())
        for _ in range(50):
            await t.failed("carol", "198.51.100.2")
        self.assertTrue((await t.check("carol", "198.51.100.2")).captcha)
        self.clock.advance(3601)
        v = await t.check("carol", "198.51.100.2")
        self.assertFalse(v.wait or v.captcha)
        self.assertEqual(await t.failures(account="carol"), 0)

    async def test_at_most_100_failures_per_account_per_hour(self) -> None:
        t = self.make_throttle(ThrottleSection(
            free_failures=1000, address_free_failures=10**6, base_delay=1, max_delay=1,
            captcha_after=10**6, address_captcha_after=10**6, max_failures_per_hour=100))
        let_through = 0
        for i in range(400):  # one attempt every 9 s from 400 addresses over an hour
            address = f"10.0.{i // 250}.{i % 250}"
            if not (await t.check("dave", address)).wait:
                await t.failed("dave", address)
                let_through += 1
            self.clock.advance(9)
        self.assertEqual(let_through, 100)

    async def test_ipv6_counts_per_64(self) -> None:
        t = self.make_throttle(ThrottleSection(address_free_failures=1, base_delay=3))
        await t.failed(None, "2001:db8::1")
        self.assertEqual((await t.check(None, "2001:db8::ffff:2")).retry_after, 3.0)
        self.assertFalse((await t.check(None, "2001:db8:0:1::1")).wait)

    async def test_monitor_seam(self) -> None:
        t = self.make_throttle()
        await t.require_captcha(address="198.51.100.7", seconds=10)
        await t.require_captcha(account="erin", seconds=20)
        self.assertTrue((await t.check(None, "198.51.100.7")).captcha)
        self.assertFalse((await t.check(None, "198.51.100.8")).captcha)
        self.assertTrue((await t.check("erin", "198.51.100.8")).captcha)
        self.clock.advance(11)
        self.assertFalse((await t.check(None, "198.51.100.7")).captcha)
        self.assertTrue((await t.check("erin", "198.51.100.8")).captcha)
        self.clock.advance(10)
        self.assertFalse((await t.check("erin", "198.51.100.8")).captcha)


class DemandsContract:
    """Needs ``self.clock`` and ``make_demands(ttl)``."""

    clock: Clock
    assertEqual: Any
    assertTrue: Any
    assertFalse: Any

    def make_demands(self, ttl: float) -> Any:
        raise NotImplementedError

    async def test_require_then_satisfied(self) -> None:
        d = self.make_demands(100)
        await d.current()
        self.assertFalse(d)
        d.require(account_id=7)
        d.require(address="198.51.100.9")
        await d.current()
        self.assertTrue(d)
        self.assertEqual(set(d.accounts), {7})
        self.assertEqual(set(d.addresses), {"198.51.100.9"})
        d.satisfied(account_id=7)
        await d.current()
        self.assertEqual(set(d.accounts), set())
        self.assertEqual(set(d.addresses), {"198.51.100.9"})
        d.satisfied(address="198.51.100.9")
        await d.current()
        self.assertFalse(d)

    async def test_demands_lapse(self) -> None:
        d = self.make_demands(30)
        d.require(account_id=3)
        self.clock.advance(20)
        d.require(address="203.0.113.4")
        await d.current()
        self.assertEqual((set(d.accounts), set(d.addresses)), ({3}, {"203.0.113.4"}))
        self.assertEqual(d.accounts[3], d.now() + 10)
        self.clock.advance(11)
        await d.current()
        self.assertEqual((set(d.accounts), set(d.addresses)), (set(), {"203.0.113.4"}))
        self.clock.advance(20)
        await d.current()
        self.assertFalse(d)


class CountsContract:
    """Needs ``make_counts(cap)``."""

    assertEqual: Any

    def make_counts(self, cap: int) -> Any:
        raise NotImplementedError

    async def admit(self, counts: Any, address: str) -> bool:
        return bool(await maybeDeferred(counts.admit, address))

    async def test_cap_per_address(self) -> None:
        c = self.make_counts(2)
        got = [await self.admit(c, "198.51.100.5") for _ in range(3)]
        self.assertEqual(got, [True, True, False])
        self.assertEqual(await self.admit(c, "198.51.100.6"), True)
        self.assertEqual(c.local, {"198.51.100.5": 2, "198.51.100.6": 1})
        c.release("198.51.100.5")
        self.assertEqual(await self.admit(c, "198.51.100.5"), True)
        self.assertEqual(await self.admit(c, "198.51.100.5"), False)
        for _ in range(2):
            c.release("198.51.100.5")
        c.release("198.51.100.6")
        self.assertEqual(c.local, {})
        c.release("198.51.100.6")  # one release too many counts nothing
        got = [await self.admit(c, "198.51.100.6") for _ in range(3)]
        self.assertEqual(got, [True, True, False])
