# mypy: disallow-untyped-calls=False
# (trial's TestCase is untyped; strict otherwise.)
"""``ok`` means durable: SIGKILL in the middle of a load loses nothing acknowledged.

A sender pipelines room messages (a window of requests in flight) as fast as the
acknowledgements come; after about half of them are acknowledged the server is killed
with SIGKILL (no shutdown code runs) and restarted on the same data directory.  The
recipient was offline the whole time, so everything it gets comes from the store, and
the count is exact: it must receive every message whose ``send`` was acknowledged,
nothing twice, nothing that was never sent, in order.  Messages in flight at the kill
may or may not have been stored.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure

from tests.harness import ServerTestCase, b64, unb64

TOTAL = 500
WINDOW = 20
KILL_AFTER_ACKS = 250


def payload(i: int) -> bytes:
    """A distinct envelope per message, so a mixed-up envelope is caught too."""
    return hashlib.sha256(b"durability %d" % i).digest() * 4


class DurabilityTests(ServerTestCase):
    timeout = 120

    @inlineCallbacks
    def test_sigkill_loses_nothing_acknowledged(self) -> Any:
        alice = yield self.session()
        bob = yield self.session()
        room = yield self.room(alice, bob)
        yield bob.client.disconnect()  # offline during the load: all of it is queued

        client = alice.client
        sent: list[str] = []
        acked: dict[str, int] = {}
        refused: list[dict[str, Any]] = []
        lost: list[str] = []
        state: dict[str, Any] = {"killed": False, "in_flight_at_kill": 0}

        def send_next() -> None:
            if state["killed"] or len(sent) >= TOTAL:
                return
            i = len(sent)
            cid = f"dur-{i:04d}"
            sent.append(cid)
            d: Deferred[dict[str, Any]] = client.request(
                "send", timeout=60, to={"room": room}, envelope=b64(payload(i)),
                client_id=cid)
            d.addCallbacks(replied, failed, callbackArgs=(cid,), errbackArgs=(cid,))

        def replied(reply: dict[str, Any], cid: str) -> None:
            if reply.get("ok") is True:
                acked[cid] = reply["seq"]
            else:
                refused.append(reply)
            if not state["killed"] and len(acked) >= KILL_AFTER_ACKS:
                state["killed"] = True
                state["in_flight_at_kill"] = len(sent) - len(acked) - len(refused)
                self.server.kill()
                return
            send_next()

        def failed(failure: Failure, cid: str) -> None:
            lost.append(cid)  # the connection died with this one in flight

        for _ in range(WINDOW):
            send_next()
        yield client.when_closed(timeout=90)
        self.assertTrue(state["killed"], f"never reached {KILL_AFTER_ACKS} acks: "
                                         f"{len(acked)} acked, refused: {refused[:3]}")
        self.assertEqual(refused, [], "sends were refused under load")
        self.assertGreater(state["in_flight_at_kill"], 0, "nothing was in flight at the kill")
        seqs = [acked[c] for c in sent if c in acked]
        self.assertEqual(len(set(seqs)), len(seqs), "two acknowledged sends share a seq")

        self.server.start()  # same data directory, same port

        back = yield self.session(bob.user, "dev1", register=False)
        got = [m["client_id"] for m in back.backlog]
        missing = [c for c in sent if c in acked and c not in got]
        self.assertEqual(missing, [], f"{len(missing)} acknowledged messages were lost "
                                      f"(of {len(acked)} acknowledged, {len(sent)} sent)")
        self.assertEqual(len(got), len(set(got)), "a message was delivered twice")
        self.assertEqual(set(got) - set(sent), set(), "messages nobody sent")
        self.assertEqual(back.backlog_done, {"type": "backlog_done", "count": len(got)})
        backlog_seqs = [m["seq"] for m in back.backlog]
        self.assertEqual(backlog_seqs, sorted(backlog_seqs), "backlog out of order")
        self.assertEqual(len(set(backlog_seqs)), len(backlog_seqs))
        for m in back.backlog:
            i = int(m["client_id"].split("-")[1])
            self.assertEqual(unb64(m["envelope"]), payload(i), m["client_id"])
            self.assertEqual(m["from"], {"user": alice.user, "device": "dev1"})
            self.assertEqual(m["to"], {"room": room})
            if m["client_id"] in acked:
                self.assertEqual(m["seq"], acked[m["client_id"]], m["client_id"])

        # The server works on: the sender's retry of an acknowledged send is a duplicate
        # with the original seq, and a new message gets a seq after every stored one.
        again = yield self.session(alice.user, "dev1", register=False)
        first = sent[0]
        retry = yield again.client.ok("send", to={"room": room}, envelope=b64(payload(0)),
                                      client_id=first)
        self.assertEqual((retry["seq"], retry["duplicate"]), (acked[first], True))
        new = yield again.client.send_room(room, b"after the crash", "dur-new")
        self.assertGreater(new["seq"], max(backlog_seqs))
        live = yield back.client.next_push("message")
        self.assertEqual((live["client_id"], live["seq"]), ("dur-new", new["seq"]))
        no_more = yield back.client.settle(0.3, "message")
        self.assertEqual(no_more, [], "the retried duplicate was delivered again")
