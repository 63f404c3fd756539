"""State several processes share, on the real Redis at 127.0.0.1:6379.

The contracts of ``shtalk.test.server.shared_contract`` run here on the Redis
implementations (the same tests as on memory); then what only a shared store does: two
instances with connections of their own ("two processes") share a failure throttle, a
CAPTCHA demand and a per-address count; the keys expire in Redis; a dead process's
counts are dropped; Redis away fails the throttle closed.

Each test has a random key prefix and deletes its keys.  Without Redis the tests skip
with the reason, and fail instead when ``SHTALK_REQUIRE_REDIS=1`` (CI sets it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface.verify import verifyObject

from shtalk.server.accounts.redisdemands import RedisCaptchaDemands
from shtalk.server.accounts.redisthrottle import UNAVAILABLE_WAIT, RedisThrottle
from shtalk.server.config import RateLimitSection, ThrottleSection
from shtalk.server.config.cluster import ClusterSection, cluster_ratelimit
from shtalk.server.ishared import IAddressCounts, IAuthThrottle, ICaptchaDemands
from shtalk.server.net.addresscounts import RedisAddressCounts
from shtalk.server.ops.limit import Limit
from shtalk.server.ops.ratelimit import RateLimiter
from shtalk.server.ops.redisbackend import RedisBuckets
from shtalk.server.ops.redislink import RedisLink
from shtalk.test.server.shared_contract import CountsContract, DemandsContract, ThrottleContract
from shtalk.testing import GOOD_PASSWORD, Peer, build_server
from tests.harness import free_port, sleep
from tests.test_operations_system import need_redis

URL = "redis://127.0.0.1:6379/0"


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class RedisCase(TestCase):
    """A random prefix per test; every link made here is closed and its keys deleted."""

    timeout = 60

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        need_redis(self)
        self.clock = Clock()
        self.prefix = f"shtalk-test-{secrets.token_hex(6)}:"
        self._links: list[RedisLink] = []
        self.redis = self.link()
        self.addCleanup(self._drop_keys)
        return Deferred.fromCoroutine(self._flushed())

    async def _flushed(self) -> None:
        await self.redis.command("PING")

    def link(self, url: str = URL, timeout: float = 2.0) -> RedisLink:
        """A connection of its own (another process's, as far as Redis can tell)."""
        link = RedisLink(url, self.prefix, _reactor(), timeout=timeout)
        self._links.append(link)
        return link

    async def keys(self) -> list[str]:
        found = await self.redis.command("KEYS", self.prefix + "*")
        return sorted(k.decode() if isinstance(k, bytes) else k for k in found)

    async def _drop(self) -> None:
        for key in await self.keys():
            await self.redis.command("DEL", key)
        for link in self._links:
            link.close()

    def _drop_keys(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._drop())


class RedisThrottleTests(ThrottleContract, RedisCase):
    def make_throttle(self, section: ThrottleSection | None = None, window: float = 3600.0) -> Any:
        t = RedisThrottle(self.link(), self.clock, section, window)
        self.assertTrue(verifyObject(IAuthThrottle, t))
        return t

    async def test_two_processes_share_the_failures(self) -> None:
        section = ThrottleSection(free_failures=2, base_delay=4, captcha_after=3)
        a, b = self.make_throttle(section), self.make_throttle(section)
        await a.failed("mallory", "198.51.100.1")
        await b.failed("mallory", "198.51.100.2")
        # Two failures spread over two processes are two failures on each.
        self.assertEqual((await a.check("mallory", "203.0.113.1")).retry_after, 4.0)
        self.assertEqual((await b.check("mallory", "203.0.113.2")).retry_after, 4.0)
        self.clock.advance(4)
        await a.failed("mallory", "198.51.100.3")
        self.assertTrue((await b.check("mallory", "203.0.113.3")).captcha)
        await b.succeeded("mallory")
        v = await a.check("mallory", "203.0.113.4")
        self.assertFalse(v.wait or v.captcha)
        self.assertEqual(await a.failures(address="198.51.100.1"), 1)
        await b.require_captcha(address="198.51.100.9", seconds=30)
        self.assertTrue((await a.check(None, "198.51.100.9")).captcha)

    async def test_keys_expire_in_redis(self) -> None:
        t = RedisThrottle(self.link(), _reactor(), ThrottleSection(), window=0.5)
        await t.failed("trent", "198.51.100.4")
        await t.require_captcha(account="trent", seconds=0.3)
        demands = RedisCaptchaDemands(self.link(), _reactor(), ttl=0.3)
        await demands.require(account_id=5)
        counts = RedisAddressCounts(self.link(), "n1", 5, _reactor())
        self.assertTrue(await counts.admit("198.51.100.4"))
        await demands.current()
        self.assertEqual(set(demands.accounts), {5})
        # 2 failure sets, the forced CAPTCHA, the demands; a process's counts, the processes
        self.assertEqual(len(await self.keys()), 6)
        for key in await self.keys():
            ttl = await self.redis.command("PTTL", key)
            if key.endswith(":conns:nodes"):
                self.assertEqual(ttl, -1)  # cleaned as its members' hashes go
            elif ":conns:" in key:
                self.assertTrue(25_000 < ttl <= 30_000, (key, ttl))  # kept alive
            else:
                self.assertTrue(0 < ttl <= 1500, (key, ttl))
        await sleep(1.7)
        self.assertEqual([k for k in await self.keys() if ":conns:" not in k], [])
        await demands.current()
        self.assertFalse(demands)
        self.assertEqual(await t.failures(account="trent"), 0)

    async def test_redis_away_fails_closed(self) -> None:
        link = RedisLink("redis://127.0.0.1:1/0", self.prefix, _reactor(), timeout=0.3)
        self._links.append(link)
        t = RedisThrottle(link, self.clock)
        v = await t.check("victor", "198.51.100.5")
        self.assertEqual((v.retry_after, v.captcha), (UNAVAILABLE_WAIT, False))
        self.assertEqual(t.unavailable, 1)
        await t.failed("victor", "198.51.100.5")  # logged, never raised
        await t.succeeded("victor")
        counts = RedisAddressCounts(link, "n1", 1, _reactor())
        self.assertTrue(await counts.admit("198.51.100.5"))  # alone: its own cap holds
        self.assertFalse(await counts.admit("198.51.100.5"))
        demands = RedisCaptchaDemands(link, self.clock)
        demands.require(address="198.51.100.5")
        await demands.current()  # never fails: keeps what it knows
        self.assertEqual(set(demands.addresses), {"198.51.100.5"})
    test_redis_away_fails_closed.timeout = 20  # type: ignore[attr-defined]


class RedisDemandsTests(DemandsContract, RedisCase):
    def make_demands(self, ttl: float) -> Any:
        d = RedisCaptchaDemands(self.link(), self.clock, ttl)
        self.assertTrue(verifyObject(ICaptchaDemands, d))
        return d

    async def test_a_demand_reaches_every_process(self) -> None:
        a, b = self.make_demands(600), self.make_demands(600)
        await a.require(account_id=42)
        await b.current()
        self.assertEqual(set(b.accounts), {42})
        await b.satisfied(account_id=42)  # solved on b: a no longer asks
        await a.current()
        self.assertFalse(a)

    async def test_the_refresh_brings_new_demands(self) -> None:
        a, b = self.make_demands(600), self.make_demands(600)
        b.refresh_every = 1.0
        b.start()
        self.addCleanup(b.stop)
        a.require(address="203.0.113.50")
        await a.current()
        self.assertFalse(b)
        self.clock.advance(1.0)  # b's timer: it reads the set
        for _ in range(100):
            if b:
                break
            await sleep(0.01)
        self.assertEqual(set(b.addresses), {"203.0.113.50"})

    async def test_a_change_during_a_read_is_kept(self) -> None:
        d = self.make_demands(600)
        reading = d.current()  # sent before the demand
        d.require(account_id=9)
        await reading
        self.assertEqual(set(d.accounts), {9})


class RedisCountsTests(CountsContract, RedisCase):
    def make_counts(self, cap: int) -> Any:
        c = RedisAddressCounts(self.link(), "node-a", cap, _reactor())
        self.assertTrue(verifyObject(IAddressCounts, c))
        return c

    async def test_two_processes_share_the_cap_and_a_dead_ones_counts_go(self) -> None:
        a = RedisAddressCounts(self.link(), "node-a", 3, _reactor())
        b = RedisAddressCounts(self.link(), "node-b", 3, _reactor())
        self.assertEqual([await a.admit("198.51.100.7") for _ in range(2)], [True, True])
        self.assertTrue(await b.admit("198.51.100.7"))
        self.assertFalse(await b.admit("198.51.100.7"))
        self.assertFalse(await a.admit("198.51.100.7"))
        a.release("198.51.100.7")
        self.assertTrue(await b.admit("198.51.100.7"))
        self.assertFalse(await a.admit("198.51.100.7"))
        # node-a dies holding one: a survivor forgets it, and its place is free again.
        self.assertEqual(await b.forget_node("node-a"), 1)
        self.assertEqual(await b.forget_node("node-a"), 0)
        self.assertTrue(await b.admit("198.51.100.7"))
        self.assertFalse(await b.admit("198.51.100.7"))
        self.assertEqual(b.local, {"198.51.100.7": 3})
        for _ in range(3):
            b.release("198.51.100.7")
        await b.link.command("PING")  # the releases are in
        self.assertEqual(await self.keys(), [self.prefix + "conns:nodes"])

    async def test_a_silent_process_counts_expire(self) -> None:
        dead = RedisAddressCounts(self.link(), "node-dead", 2, _reactor(), ttl=0.3)
        live = RedisAddressCounts(self.link(), "node-live", 2, _reactor(), ttl=0.6)
        self.assertEqual([await dead.admit("198.51.100.8") for _ in range(2)], [True, True])
        self.assertTrue(await live.admit("198.51.100.9"))
        live.clock = self.clock  # its keepalive on a clock the test turns
        live.start()
        self.addCleanup(live.stop)
        self.assertFalse(await live.admit("198.51.100.8"))
        for _ in range(8):  # node-dead stops; node-live keeps its counts alive (0.2 s)
            await sleep(0.1)
            self.clock.advance(0.1)
        self.assertTrue(await live.admit("198.51.100.8"))
        members = await self.redis.command("SMEMBERS", self.prefix + "conns:nodes")
        self.assertEqual(sorted(m.decode() if isinstance(m, bytes) else m for m in members),
                         ["node-live"])
        self.assertEqual(live.local, {"198.51.100.8": 1, "198.51.100.9": 1})
        self.assertEqual([await live.admit("198.51.100.9") for _ in range(2)], [True, False])


class RateLimitInClusterTests(RedisCase):
    async def test_buckets_live_under_the_cluster_prefix(self) -> None:
        cluster = ClusterSection(redis_url=URL, prefix=self.prefix)
        limits = cluster_ratelimit(cluster, RateLimitSection())
        self.assertEqual((limits.backend, limits.redis_prefix), ("redis", self.prefix + "rl:"))
        one = RedisBuckets(limits.redis_url, limits.redis_prefix, _reactor(), timeout=2.0)
        two = RedisBuckets(limits.redis_url, limits.redis_prefix, _reactor(), timeout=2.0)
        self.addCleanup(one.close)
        self.addCleanup(two.close)
        bucket = [Limit(2, 0.001)]
        self.assertEqual(await one.take(["a:1"], bucket), 0.0)
        self.assertEqual(await two.take(["a:1"], bucket), 0.0)
        self.assertGreater(await one.take(["a:1"], bucket), 100)  # shared: empty
        self.assertEqual(await self.keys(), [self.prefix + "rl:a:1"])
        own = RateLimitSection(backend="redis", redis_prefix="other:")
        self.assertIs(cluster_ratelimit(cluster, own), own)
        self.assertIs(cluster_ratelimit(ClusterSection(), RateLimitSection()).backend, "memory")


class GatesAcrossProcessesTests(RedisCase):
    """Two servers (as compose builds them) whose gates share the Redis throttle."""

    async def server(self, section: ThrottleSection, url: str = URL, limiter: Any = None) -> Any:
        parts = await build_server(self.mktemp(), throttle=section, limiter=limiter)
        self.addCleanup(lambda: Deferred.fromCoroutine(parts.close()))
        link = self.link(url, timeout=0.3)
        parts.security.gates.throttle = RedisThrottle(link, parts.clock, section)
        return parts

    async def login(self, peer: Peer, name: str, password: str) -> dict[str, Any]:
        rid = peer.request("login", username=name, password=password, device={"id": "d1"})
        return await peer.reply(rid)

    async def test_failed_logins_on_one_process_hold_back_the_other(self) -> None:
        section = ThrottleSection(free_failures=2, base_delay=30)
        a, b = await self.server(section), await self.server(section)
        p = Peer(a.factory, "198.51.100.30")
        await p.reply(p.request("hello", version=1))
        for _ in range(2):
            r = await self.login(p, "mallory", GOOD_PASSWORD + "x")
            self.assertEqual(r["error"]["code"], "invalid_credentials")
        q = Peer(b.factory, "203.0.113.30")  # another process, another address
        await q.reply(q.request("hello", version=1))
        r = await self.login(q, "Mallory", GOOD_PASSWORD + "x")
        self.assertEqual(r["error"]["code"], "rate_limited")
        self.assertGreater(r["error"]["retry_after"], 25)

    async def test_redis_away_refuses_attempts_on_secrets(self) -> None:
        for limiter in (None, lambda clock: RateLimiter(RateLimitSection(), clock)):
            parts = await self.server(ThrottleSection(), "redis://127.0.0.1:1/0", limiter)
            p = Peer(parts.factory, "198.51.100.31")
            await p.reply(p.request("hello", version=1))
            r = await self.login(p, "walter", GOOD_PASSWORD)
            self.assertEqual(r["error"]["code"], "rate_limited")
            self.assertEqual(r["error"]["retry_after"], UNAVAILABLE_WAIT)
            self.assertIn("cannot count failed attempts", r["error"]["message"])
            self.assertTrue((await p.reply(p.request("ping")))["ok"])  # the rest works


class PasswordTests(RedisCase):
    """A Redis that wants a password (``redis://:PASSWORD@HOST:PORT/DB``)."""

    def private_redis(self, password: str) -> int:
        binary = shutil.which("redis-server")
        if binary is None:
            if os.environ.get("SHTALK_REQUIRE_REDIS") == "1":
                self.fail("redis-server not installed, and SHTALK_REQUIRE_REDIS=1")
            raise SkipTest("redis-server not installed (a private one is started here)")
        port = free_port()
        redis = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--requirepass", password],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(redis.wait)
        self.addCleanup(redis.kill)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"-NOAUTH"):
                        return port
            except OSError:
                pass
            self.assertLess(time.monotonic(), deadline, "private redis-server did not start")
            time.sleep(0.05)

    async def test_the_password_in_the_url_is_used_and_never_shown(self) -> None:
        """(On a private redis-server, which also forgets its scripts here.)"""
        password = secrets.token_urlsafe(16)
        port = self.private_redis(password)
        good = self.link(f"redis://:{password}@127.0.0.1:{port}/0", timeout=2.0)
        self.assertNotIn(password, repr(good))
        counts = RedisAddressCounts(good, "n1", 1, _reactor())
        self.assertTrue(await counts.admit("198.51.100.40"))
        self.assertFalse(await counts.admit("198.51.100.40"))  # counted in Redis
        # Redis forgot the scripts (as after a restart): they are sent again.
        await good.command("SCRIPT", "FLUSH")
        self.assertTrue(await counts.admit("198.51.100.42"))
        self.assertFalse(await counts.admit("198.51.100.42"))
        self.assertEqual(counts.unavailable, 0)
        bad = self.link(f"redis://:wrong@127.0.0.1:{port}/0", timeout=0.5)
        v = await RedisThrottle(bad, self.clock).check("x", "198.51.100.41")
        self.assertTrue(v.unavailable)
        buckets = RedisBuckets(f"redis://:{password}@127.0.0.1:{port}/0", self.prefix,
                               _reactor(), timeout=2.0)
        self.addCleanup(buckets.close)
        self.assertEqual(await buckets.take(["k"], [Limit(1, 0.001)]), 0.0)
