"""The shared-state contracts on the memory implementations (one process), and the
connection waiting for a count that answers later (a cluster's, in Redis).

The same contracts run on Redis in ``tests.test_cluster_state``."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from shtalk.server.accounts.gates import CaptchaDemands
from shtalk.server.accounts.throttle import AuthThrottle
from shtalk.server.config import ThrottleSection
from shtalk.server.ishared import IAddressCounts, IAuthThrottle, ICaptchaDemands
from shtalk.server.net.addresscounts import AddressCounts
from shtalk.server.net.admission import AdmittedTLSFactory, PendingHandshakes
from shtalk.test.server.shared_contract import CountsContract, DemandsContract, ThrottleContract
from shtalk.test.server.test_admission import OPTIONS, App, Link
from shtalk.testing import Peer, ServerParts, build_server


class MemoryThrottleTests(ThrottleContract, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def make_throttle(self, section: ThrottleSection | None = None, window: float = 3600.0) -> Any:
        t = AuthThrottle(self.clock, section, window)
        self.assertTrue(verifyObject(IAuthThrottle, t))
        return t


class MemoryDemandsTests(DemandsContract, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def make_demands(self, ttl: float) -> Any:
        d = CaptchaDemands(self.clock, ttl)
        self.assertTrue(verifyObject(ICaptchaDemands, d))
        return d

    def test_without_a_clock_demands_stay_until_solved(self) -> None:
        d = CaptchaDemands()
        d.require(account_id=1)
        self.successResultOf(d.current())
        self.assertEqual(set(d.accounts), {1})


class MemoryCountsTests(CountsContract, TestCase):
    def make_counts(self, cap: int) -> Any:
        c = AddressCounts(cap)
        self.assertTrue(verifyObject(IAddressCounts, c))
        return c


@implementer(IAddressCounts)
class LaterCounts:
    """Counts whose answers the test gives (as Redis would, later)."""

    def __init__(self) -> None:
        self.local: dict[str, int] = {}
        self.asked: list[Deferred[bool]] = []
        self.released: list[str] = []

    def admit(self, address: str) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.asked.append(d)
        return d

    def answer(self, *answers: bool) -> None:
        asked, self.asked = self.asked, []
        for d, answer in zip(asked, answers, strict=True):
            d.callback(answer)

    def release(self, address: str) -> None:
        self.released.append(address)


class AdmissionLaterTests(TestCase):
    """A connection whose per-address count answers later runs no request before it."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        async def go() -> None:
            self.parts: ServerParts = await build_server(self.mktemp())
            self.counts = LaterCounts()
            self.parts.factory.counts = self.counts

        return Deferred.fromCoroutine(go())

    def tearDown(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.parts.close())

    async def test_requests_wait_for_the_count(self) -> None:
        p = Peer(self.parts.factory, "198.51.100.20")
        rid = p.request("hello", version=1)
        p.request("ping")
        self.assertEqual(p.lines(), [])
        self.counts.asked[0].callback(True)
        self.assertTrue((await p.reply(rid))["ok"])
        self.assertTrue((await p.reply(rid + 1))["ok"])
        p.proto.connectionLost(None)
        self.assertEqual(self.counts.released, ["198.51.100.20"])

    async def test_refused_count_closes_before_any_request(self) -> None:
        p = Peer(self.parts.factory, "198.51.100.21")
        p.request("hello", version=1)
        self.counts.asked[0].callback(False)
        lines = p.lines()
        self.assertEqual([ln["error"]["code"] for ln in lines], ["too_many_connections"])
        self.assertTrue(p.transport.disconnecting)
        p.proto.connectionLost(None)
        self.assertEqual(self.counts.released, [])

    def test_gone_before_the_answer_gives_its_place_back(self) -> None:
        p = Peer(self.parts.factory, "198.51.100.22")
        p.proto.connectionLost(None)
        self.assertEqual(self.counts.released, [])
        self.counts.asked[0].callback(True)
        self.assertEqual(self.counts.released, ["198.51.100.22"])


class SharedPendingHandshakesTests(TestCase):
    """The per-address bound on sockets before the handshake, counted by every process."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.counts = LaterCounts()
        self.admission = PendingHandshakes(self.clock, max_per_address=5, shared=self.counts)
        self.factory = AdmittedTLSFactory(OPTIONS, Factory.forProtocol(App), self.admission,
                                          self.clock)

    def test_over_the_cluster_bound_the_oldest_here_gives_its_place(self) -> None:
        old, new = Link(self.factory, "192.0.2.7"), Link(self.factory, "192.0.2.7")
        self.counts.answer(True, False)
        self.assertTrue(old.aborted)
        self.assertFalse(new.aborted)
        old.lost()
        self.assertEqual(self.counts.released, [])  # its place went to the new one
        new.lost()
        self.assertEqual(self.counts.released, ["192.0.2.7"])

    def test_with_none_here_the_new_one_goes(self) -> None:
        alone = Link(self.factory, "192.0.2.8")
        self.counts.answer(False)
        self.assertTrue(alone.aborted)
        alone.lost()
        self.assertEqual(self.counts.released, [])

    def test_gone_before_the_answer_gives_its_place_back(self) -> None:
        gone = Link(self.factory, "192.0.2.9")
        gone.lost()
        self.counts.answer(True)
        self.assertEqual(self.counts.released, ["192.0.2.9"])
