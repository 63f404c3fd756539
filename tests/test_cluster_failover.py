# mypy: disallow-untyped-calls=False
"""A cluster losing a part under load: nothing acknowledged is lost, nothing is doubled.

Closed-loop senders spread over two processes send direct and room messages.  One process
is SIGKILLed mid-run: its clients reconnect to the survivor and re-send what had no reply
yet with the same ``client_id``.  Then every message whose ``ok`` a sender received must
reach every recipient device (live or in the backlog of the new login), never as two
stored copies (one seq per ``client_id``), and a user who was only on the dead process is
announced offline within 15 s.  Redis restarted mid-run: delivery catches up within 5 s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial import unittest

from tests.clusterkit import Cluster
from tests.harness import (
    HarnessError,
    RequestFailed,
    ServerProcess,
    b64,
    fresh_client_id,
    fresh_name,
    login_session,
    register_and_login,
    sleep,
)

USERS = 6


@dataclass
class Party:
    """One user with one device, and everything its connections received."""

    user: str
    node: int
    session: Any = None
    got: dict[str, set[int]] = field(default_factory=dict)  # client_id -> seqs seen

    def take(self, pushes: list[dict[str, Any]]) -> None:
        for p in pushes:
            if p.get("type") == "message":
                self.got.setdefault(p["client_id"], set()).add(int(p["seq"]))

    def drain(self) -> None:
        if self.session is not None:
            self.take(self.session.client.drain("message"))


@dataclass
class Load:
    cluster: Cluster
    room: str
    parties: list[Party]
    # client_id -> (seq, recipients, when the ok came)
    acked: dict[str, tuple[int, list[str], float]] = field(default_factory=dict)
    running: bool = True
    reconnects: int = 0

    def server(self, party: Party) -> ServerProcess:
        server = self.cluster.servers[party.node]
        if not server.running:
            party.node = 0
            server = self.cluster.servers[0]
        return server

    @inlineCallbacks
    def connect(self, party: Party, register: bool = False) -> Any:
        party.drain()
        if party.session is not None:
            yield party.session.client.abort()
        if register:
            party.session = yield register_and_login(self.server(party), party.user)
        else:
            party.session = yield login_session(self.server(party), party.user, "dev1")
            self.reconnects += 1
        party.take(party.session.backlog)

    @inlineCallbacks
    def send_loop(self, i: int) -> Any:
        me = self.parties[i]
        k = 0
        while self.running:
            k += 1
            peer = self.parties[(i + 1) % len(self.parties)]
            to: dict[str, str] = {"room": self.room} if k % 2 else {"user": peer.user}
            recipients = ([p.user for p in self.parties if p is not me] if k % 2
                          else [peer.user])
            cid = fresh_client_id()
            while True:
                try:
                    reply = yield me.session.client.ok(
                        "send", to=to, envelope=b64(f"{me.user}:{k}".encode()),
                        client_id=cid, timeout=3)
                    break
                except (HarnessError, RequestFailed, Exception):
                    # The process went away (or did not answer): the survivor takes
                    # the same client_id; if the first copy was committed, it answers
                    # with that one's seq.
                    yield sleep(0.1)
                    try:
                        yield self.connect(me)
                    except Exception:
                        yield sleep(0.2)
            self.acked[cid] = (int(reply["seq"]), recipients, time.monotonic())
            me.drain()

    def missing(self, before: float = float("inf")) -> list[str]:
        """Acknowledged (before ``before``) but not yet seen by some recipient."""
        by_user = {p.user: p for p in self.parties}
        out = []
        for cid, (_seq, recipients, when) in list(self.acked.items()):
            if when >= before:
                continue
            for user in recipients:
                if cid not in by_user[user].got:
                    out.append(f"{cid} -> {user}")
        return out

    def doubled(self) -> list[str]:
        return [f"{p.user}: {cid} stored as {sorted(seqs)}"
                for p in self.parties for cid, seqs in p.got.items() if len(seqs) > 1]


class FailoverTests(unittest.TestCase):
    timeout = 180

    @inlineCallbacks
    def start_load(self) -> Any:
        cluster = Cluster(2, test=self)
        self.addCleanup(cluster.cleanup)
        cluster.start()
        parties = [Party(fresh_name("f"), i % 2) for i in range(USERS)]
        load = Load(cluster, fresh_name("r"), parties)
        self.addCleanup(lambda: gatherResults(
            [p.session.client.abort() for p in parties if p.session is not None]))
        for p in parties:
            yield load.connect(p, register=True)
        yield parties[0].session.client.ok("room_create", room=load.room)
        for p in parties[1:]:
            yield p.session.client.ok("room_join", room=load.room)
        return load

    @inlineCallbacks
    def settle(self, load: Load, within: float) -> Any:
        """Wait until every acknowledged message reached every recipient (or fail)."""
        deadline = time.monotonic() + within
        while True:
            for p in load.parties:
                p.drain()
            missing = load.missing()
            if not missing or time.monotonic() > deadline:
                return missing
            yield sleep(0.1)

    @inlineCallbacks
    def test_a_process_killed_under_load(self) -> Any:
        load = yield self.start_load()
        cluster = load.cluster
        # A user only on node1 who will not come back, watched from node0.
        ghost = yield register_and_login(cluster.servers[1])
        watcher = yield register_and_login(cluster.servers[0])
        self.addCleanup(ghost.client.abort)
        self.addCleanup(watcher.client.abort)
        yield ghost.client.send_user(watcher.user, b"you may see me")
        yield sleep(0.5)
        watcher.client.drain()

        loops = gatherResults([load.send_loop(i) for i in range(USERS)])
        yield sleep(1.5)
        cluster.servers[1].kill()
        killed_at = time.monotonic()
        off = yield watcher.client.next_push("presence", timeout=15)
        self.assertEqual(off, {"type": "presence", "user": ghost.user, "status": "offline"})
        settled = time.monotonic() - killed_at
        self.assertLess(settled, 15)
        yield sleep(1.5)
        load.running = False
        yield loops
        missing = yield self.settle(load, 10)
        self.assertEqual(missing, [], f"acknowledged but never delivered:\n{cluster.logs()}")
        self.assertEqual(load.doubled(), [])
        self.assertGreater(len(load.acked), 50)
        self.assertGreater(load.reconnects, 0)
        print(f"\n  {len(load.acked)} sends acknowledged, {load.reconnects} reconnects, "
              f"presence settled {settled:.1f} s after the kill")

    @inlineCallbacks
    def test_redis_restarted_under_load(self) -> Any:
        load = yield self.start_load()
        loops = gatherResults([load.send_loop(i) for i in range(USERS)])
        yield sleep(1.0)
        load.cluster.redis.restart()  # returns once the new Redis answers PING
        back = time.monotonic()
        yield sleep(5.0)
        for p in load.parties:
            p.drain()
        late = load.missing(before=back)
        self.assertEqual(late, [], "sent before Redis came back, not delivered 5 s later:\n"
                         f"{load.cluster.logs()}")
        load.running = False
        yield loops
        missing = yield self.settle(load, 5)
        self.assertEqual(missing, [], f"not delivered within 5 s:\n{load.cluster.logs()}")
        self.assertEqual(load.doubled(), [])
        self.assertGreater(len(load.acked), 50)
