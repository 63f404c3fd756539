"""Unit tests of the operations layer: buckets, limiter, fallback, sealed-log redaction and
chain, monitor signals, metrics rendering, admin log reader."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.trial import unittest

from shtalk.admin import logs as adminlogs
from shtalk.server.config import ConfigError, MonitorSection, RateLimitSection, ServerConfig
from shtalk.server.ops import seclog
from shtalk.server.ops.metrics import render
from shtalk.server.ops.monitor import Flag, Monitor
from shtalk.server.ops.ratelimit import (
    FallbackBuckets,
    Limit,
    MemoryBuckets,
    RateLimited,
    RateLimiter,
    address_key,
)
from shtalk.testing import tempdir
from shtalk.wire.errors import ErrorCode


class BucketTests(unittest.TestCase):
    def test_burst_then_refill(self) -> None:
        clock = Clock()
        b = MemoryBuckets(clock)
        lim = [Limit(3, 1.0)]
        self.assertEqual([b.take(["k"], lim) for _ in range(3)], [0.0, 0.0, 0.0])
        self.assertAlmostEqual(b.take(["k"], lim), 1.0)
        clock.advance(0.5)
        self.assertAlmostEqual(b.take(["k"], lim), 0.5)
        clock.advance(0.5)
        self.assertEqual(b.take(["k"], lim), 0.0)

    def test_all_or_nothing(self) -> None:
        clock = Clock()
        b = MemoryBuckets(clock)
        small, big = Limit(1, 0.1), Limit(10, 1.0)
        self.assertEqual(b.take(["a", "b"], [small, big]), 0.0)
        self.assertGreater(b.take(["a", "b"], [small, big]), 0)
        # The refused request took nothing from the big bucket: 9 tokens are left.
        self.assertEqual([b.take(["b"], [big]) for _ in range(9)], [0.0] * 9)
        self.assertGreater(b.take(["b"], [big]), 0)

    def test_sweep_forgets_full_buckets(self) -> None:
        clock = Clock()
        b = MemoryBuckets(clock)
        b.take(["k"], [Limit(2, 1.0)])
        clock.advance(5)
        self.assertEqual(b.sweep(), 1)
        self.assertEqual(b.buckets, {})

    def test_ipv6_by_prefix(self) -> None:
        self.assertEqual(address_key("2001:db8::1"), address_key("2001:db8::ffff:1"))
        self.assertEqual(address_key("::ffff:10.0.0.1"), "10.0.0.1")
        self.assertEqual(address_key("10.0.0.1"), "10.0.0.1")


class LimiterTests(unittest.TestCase):
    def limiter(self, **kw: Any) -> tuple[RateLimiter, Clock]:
        clock = Clock()
        return RateLimiter(RateLimitSection(**kw), clock), clock

    def test_refusal_carries_retry_after(self) -> None:
        lim, _ = self.limiter(send_account="2/10", send_address="off")
        lim.check("send", "1", "1.2.3.4")
        lim.check("send", "1", "1.2.3.4")
        with self.assertRaises(RateLimited) as e:
            lim.check("send", "1", "1.2.3.4")
        self.assertEqual(e.exception.code, ErrorCode.RATE_LIMITED)
        self.assertEqual(e.exception.extra, {"retry_after": 5})
        self.assertEqual(lim.hits["send"], 1)
        lim.check("send", "2", "1.2.3.4")  # another account is not affected

    def test_address_bucket(self) -> None:
        lim, _ = self.limiter(register_address="1/60")
        lim.check("register", None, "1.2.3.4")
        with self.assertRaises(RateLimited):
            lim.check("register", None, "1.2.3.4")
        lim.check("register", None, "5.6.7.8")

    def test_throttle_shrinks_and_expires(self) -> None:
        lim, clock = self.limiter(send_account="10/10", send_address="off")
        lim.throttle("7", 10, 60)
        lim.check("send", "7", None)
        with self.assertRaises(RateLimited):
            lim.check("send", "7", None)
        clock.advance(61)
        for _ in range(10):
            lim.check("send", "7", None)

    def test_disabled(self) -> None:
        lim, _ = self.limiter(enabled=False, send_account="1/60")
        for _ in range(5):
            self.assertIsNone(lim.check("send", "1", "a"))

    def test_bad_limits_are_config_errors(self) -> None:
        with self.assertRaises(ConfigError):
            ServerConfig.from_string("[ratelimit]\nsend_account = lots\n")
        with self.assertRaises(ConfigError):
            ServerConfig.from_string("[ratelimit]\nbackend = memcached\n")
        with self.assertRaises(ConfigError):
            ServerConfig.from_string("[metrics]\ninterface = 0.0.0.0\n")
        c = ServerConfig.from_string("[ratelimit]\nsend_account = off\n")
        self.assertIsNone(c.section(RateLimitSection).limit("send", "account"))


class FakeRedis:
    name = "redis"

    def __init__(self) -> None:
        self.up = True
        self.closed = False

    def take(self, keys: Any, limits: Any, peek: bool = False) -> Deferred[float]:
        return succeed(0.0) if self.up else fail(ConnectionError("refused"))

    def ping(self) -> Deferred[Any]:
        return succeed("PONG") if self.up else fail(ConnectionError("refused"))

    def close(self) -> None:
        self.closed = True


class FallbackTests(unittest.TestCase):
    def test_degrades_with_a_warning_and_comes_back(self) -> None:
        clock = Clock()
        redis = FakeRedis()
        fb = FallbackBuckets(redis, MemoryBuckets(clock), clock, retry=5)
        events: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        lim = [Limit(1, 0.01)]
        self.assertEqual(self.successResultOf(cast(Deferred[float], fb.take(["k"], lim))), 0.0)
        redis.up = False
        # Memory takes over with a fresh bucket ...
        self.assertEqual(self.successResultOf(cast(Deferred[float], fb.take(["k"], lim))), 0.0)
        self.assertTrue(fb.degraded)
        self.assertGreater(cast(float, fb.take(["k"], lim)), 0)  # ... which limits meanwhile
        self.assertTrue(any(e.get("event") == "ratelimit.degraded" for e in events))
        clock.advance(5)
        self.assertTrue(fb.degraded)  # probe failed, still down
        redis.up = True
        clock.advance(5)
        self.assertFalse(fb.degraded)
        fb.close()
        self.assertTrue(redis.closed)


class SealedLogTests(unittest.TestCase):
    def setUp(self) -> None:
        self.private_text, self.public_text = seclog.generate_keypair()
        self.private = seclog.load_private_key(self.private_text)
        self.dir = Path(tempdir(self))

    def observer(self, **kw: Any) -> seclog.SealedLogObserver:
        o = seclog.SealedLogObserver(
            self.dir / "s.log", seclog.load_public_key(self.public_text), b"k" * 32,
            kw.get("max_bytes", 1 << 20), kw.get("backup_count", 2), kw.get("level", "info"))
        self.addCleanup(o.close)
        return o

    def test_redaction(self) -> None:
        pseudo = seclog.Pseudonymizer(b"k" * 32)
        rec = seclog.redact({
            "log_format": "login {user} from {address} with {password} {token.x}",
            "log_level": LogLevel.warn, "log_namespace": "t", "user": "bob\x1b[2J\n",
            "address": "1.2.3.4", "password": "hunter2-secret", "token": "tok-secret",
            "email": "Bob@Example.org", "event": "auth.login",
        }, pseudo)
        text = json.dumps(rec)
        for secret in ("hunter2-secret", "tok-secret", "1.2.3.4", "Bob@Example.org", "\x1b"):
            self.assertNotIn(secret, text)
        self.assertEqual(rec["event"], "auth.login")
        self.assertEqual(rec["fields"]["email"], pseudo("bob@example.org"))
        self.assertEqual(sorted(rec["dropped"]), ["password", "token"])
        self.assertIn("<redacted>", rec["msg"])
        self.assertIn("bob\\x1b[2J\\x0a", rec["msg"])
        self.assertEqual(seclog.escape("a\u202eb"), "a\\u202eb")  # bidi override

    def test_failure_keeps_type_and_places_not_message(self) -> None:
        o = self.observer()
        log = Logger(observer=o)
        try:
            raise ValueError("password=hunter2")
        except ValueError:
            log.failure("boom")
        line = (self.dir / "s.log").read_text().splitlines()[0]
        rec = json.loads(seclog.unseal(line, self.private))
        self.assertEqual(rec["failure"]["type"], "ValueError")
        self.assertNotIn("hunter2", json.dumps(rec))

    def test_level_filter_chain_and_rotation(self) -> None:
        o = self.observer(max_bytes=4096, backup_count=2)
        log = Logger(observer=o)
        log.debug("not written")
        for i in range(12):
            log.info("event {count}", count=i, event="t.e")
        files = sorted(p.name for p in self.dir.iterdir())
        self.assertEqual(files, ["s.log", "s.log.1", "s.log.2"])
        out, err = io.StringIO(), io.StringIO()
        (self.dir / "op.key").write_text(self.private_text)
        code = adminlogs.read(str(self.dir / "op.key"), [str(self.dir / f) for f in files],
                              adminlogs.Filters(), False, True, out, err)
        self.assertEqual(code, 0, err.getvalue())
        seqs = [json.loads(x)["seq"] for x in out.getvalue().splitlines()]
        self.assertEqual(seqs, list(range(seqs[0], 12)))  # oldest first, no gap
        self.assertIn("rotated away", err.getvalue())


class MonitorTests(unittest.TestCase):
    def monitor(self, **kw: Any) -> tuple[Monitor, Clock, list[Any]]:
        clock = Clock()
        clock.advance(1_000_000)
        m = Monitor(MonitorSection(**kw), clock)
        acted: list[Any] = []
        def action(name: str) -> Callable[[Flag], None]:
            return lambda f: acted.append((name, f.signal))

        m.actions = {a: action(a) for a in ("captcha", "throttle", "suspend")}
        return m, clock, acted

    def test_send_rate_and_same_size(self) -> None:
        m, _, acted = self.monitor(send_rate=5, same_size=4, send_rate_action="throttle",
                                   same_size_action="suspend")
        for _ in range(6):
            m.sent(1, "spammer", 0.0, [], [100])
        self.assertEqual({f.signal for f in m.open_flags()}, {"send_rate", "same_size"})
        self.assertEqual(sorted(acted), [("suspend", "same_size"), ("throttle", "send_rate")])

    def test_new_account_messaging_strangers(self) -> None:
        m, clock, acted = self.monitor(new_account_strangers=2)
        m.registered(9, "1.2.3.4")
        for peer in (10, 11, 12):
            m.sent(9, "newbie", clock.seconds() - 60, [peer], [50])
        [flag] = m.open_flags()
        self.assertEqual(flag.signal, "new_account_strangers")
        self.assertEqual(acted, [("captcha", "new_account_strangers")])
        # Writing again to known peers is not a new stranger.
        m.sent(9, "newbie", clock.seconds() - 60, [10], [50])
        self.assertEqual(flag.count, 3)

    def test_first_send_after_login_is_judged(self) -> None:
        """The exact threshold: more than ``new_account_strangers`` strangers (5) raise
        the flag at the 6th, counting the account's very first message."""
        clock = Clock()
        clock.advance(1_000_000)
        m = Monitor(MonitorSection(new_account_strangers=5), clock,
                    partners=lambda uid: succeed([]))
        self.successResultOf(m.preload(9))  # what ChatService.avatar_for waits for
        counts = []
        for peer in range(10, 17):
            m.sent(9, "newbie", clock.seconds() - 60, [peer], [50])
            counts.append(len(m.open_flags()))
        self.assertEqual(counts, [0, 0, 0, 0, 0, 1, 1])
        [flag] = m.open_flags()
        self.assertEqual((flag.signal, flag.count), ("new_account_strangers", 7))

    def test_review_list_shows_the_subject_kind_in_full(self) -> None:
        from shtalk.admin.control import render_flags

        flags = [
            {"id": 1, "status": "open", "signal": "reports", "kind": "account",
             "label": "a" * 32, "action": "flag", "count": 3, "last": 0.0, "reason": "r"},
            {"id": 2, "status": "open", "signal": "registrations", "kind": "address",
             "label": "2001:db8:1234:5678::/64", "action": "captcha", "count": 6,
             "last": 0.0, "reason": "r"},
        ]
        text = "\n".join(render_flags(flags))
        self.assertIn("account:" + "a" * 32 + " ", text)
        self.assertIn("address:2001:db8:1234:5678::/64 ", text)
        self.assertNotIn("acco:", text)

    def test_registrations_per_address_and_window(self) -> None:
        m, clock, _ = self.monitor(registrations=2, window=60)
        m.registered(1, "a")
        m.registered(2, "a")
        clock.advance(61)
        m.registered(3, "a")
        self.assertEqual(m.open_flags(), [])
        m.registered(4, "a")
        m.registered(5, "a")
        self.assertEqual([f.subject for f in m.open_flags()], ["a"])

    def test_reports_weigh_verified_ones_and_count_reporters_once(self) -> None:
        m, _, acted = self.monitor(reports=3)
        self.assertIsNone(m.reported(5, "x", "r1", False, {}))
        self.assertIsNone(m.reported(5, "x", "r1", False, {}))  # same reporter again
        self.assertIsNone(m.reported(5, "x", "r2", False, {}))
        self.assertIsNotNone(m.reported(5, "x", "r3", False, {}))
        m2, _, _ = self.monitor(reports=3)
        self.assertIsNotNone(m2.reported(6, "y", "r1", True, {"envelope_id": "ab"}))
        # A verified reporter reporting again is still one reporter of weight 3.
        m2.reported(6, "y", "r1", True, {"envelope_id": "ab"})
        self.assertEqual(m2.open_flags()[0].count, 3)
        self.assertEqual(acted, [])

    def test_one_report_never_suspends_and_throwaways_count_once(self) -> None:
        m, _, acted = self.monitor()  # defaults: reports 3, quorum 3, action suspend
        flag = m.reported(5, "x", "r1", True, {}, True, "198.51.100.1")
        assert flag is not None
        self.assertEqual((flag.action, acted), ("flag", []))
        # One person's many accounts from one address: one qualifying reporter.
        for i in range(10):
            m.reported(5, "x", f"throwaway{i}", True, {}, True, "203.0.113.9")
        # Verified but not qualifying (too young, or never written to): not counted.
        for i in range(10):
            m.reported(5, "x", f"young{i}", True, {}, False, f"192.0.2.{i}")
        self.assertEqual((flag.action, acted), ("flag", []))
        self.assertIn("2 of 3 qualifying", flag.reason)
        m.reported(5, "x", "r3", True, {}, True, "198.51.100.3")
        self.assertEqual((flag.action, acted), ("suspend", [("suspend", "reports")]))
        m.reported(5, "x", "r4", True, {}, True, "198.51.100.4")
        self.assertEqual(acted, [("suspend", "reports")])  # runs once

    def test_quorum_below_two_is_refused(self) -> None:
        with self.assertRaises(ConfigError):
            ServerConfig.from_string("[monitor]\nreport_quorum = 1\n")

    def test_flags_persist_and_clear(self) -> None:
        path = Path(tempdir(self)) / "flags.json"
        clock = Clock()
        m = Monitor(MonitorSection(send_rate=1), clock, path)
        m.sent(1, "a", 0.0, [], [1])
        m.sent(1, "a", 0.0, [], [1])
        [flag] = m.open_flags()
        again = Monitor(MonitorSection(), clock, path)
        self.assertEqual([f.id for f in again.open_flags()], [flag.id])
        again.clear(flag.id)
        self.assertEqual(Monitor(MonitorSection(), clock, path).open_flags(), [])
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)


class MetricsTests(unittest.TestCase):
    def test_text_format(self) -> None:
        text = render([
            ("shtalk_x_total", "counter", "x", [({"action": 'a"b'}, 3.0)]),
            ("shtalk_y", "gauge", "y", [({}, 1.5)]),
        ]).decode()
        self.assertIn("# TYPE shtalk_x_total counter\n", text)
        self.assertIn('shtalk_x_total{action="a\\"b"} 3\n', text)
        self.assertIn("shtalk_y 1.5\n", text)
