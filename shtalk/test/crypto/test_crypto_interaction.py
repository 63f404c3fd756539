"""An interaction fuzzer in the spirit of libsignal's ``fuzz/fuzz_targets/interaction.rs``.

Random interleavings of send, deliver, drop, reorder (deliver any in-flight
message), duplicate and bit-flip, in both directions, through full signed
envelopes and, for bit flips, also straight into the ratchet (bypassing the
signature).  Invariants:

* with the default limits, every delivered message decrypts exactly once, to
  its plaintext; a duplicate is refused;
* with tight limits, a delivery either yields the right plaintext or is refused;
  nothing ever decrypts twice or to the wrong plaintext;
* every refused input (flip, duplicate, over the limit) leaves both the session
  and the identity byte-for-byte unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shtalk.crypto import CryptoError, Envelope, Session
from shtalk.test.crypto.test_crypto_support import Pair

SIDES = st.sampled_from(["a", "b"])
OPS = st.one_of(
    st.tuples(st.just("send"), SIDES),
    st.tuples(st.just("send"), SIDES),
    st.tuples(st.just("deliver"), SIDES, st.integers(0, 50)),
    st.tuples(st.just("deliver"), SIDES, st.integers(0, 50)),
    st.tuples(st.just("drop"), SIDES, st.integers(0, 50)),
    st.tuples(st.just("dup"), SIDES, st.integers(0, 50)),
    st.tuples(st.just("flip"), SIDES, st.integers(0, 50), st.integers(0, 2**20), st.booleans()),
)


class World:
    def __init__(self, max_skip: int | None = None, max_skipped: int | None = None) -> None:
        self.pair = Pair()
        if max_skip is not None and max_skipped is not None:
            for s in (self.pair.sa, self.pair.sb):
                s.ratchet.max_skip, s.ratchet.max_skipped = max_skip, max_skipped
        self.counter = 0
        self.in_flight: dict[str, list[tuple[bytes, bytes]]] = {"a": [], "b": []}
        self.delivered: dict[str, list[bytes]] = {"a": [], "b": []}
        self.bob_has_received = True  # Pair delivered Alice's first message

    def state(self, receiver: str) -> bytes:
        p = self.pair
        if receiver == "b":
            return p.sb.to_bytes() + p.bob.to_bytes()
        return p.sa.to_bytes() + p.alice.to_bytes()

    def send(self, side: str) -> None:
        self.counter += 1
        plaintext = b"%s-%d" % (side.encode(), self.counter)
        wire = self.pair.seal_from_alice(plaintext) if side == "a" else self.pair.seal_from_bob(
            plaintext
        )
        self.in_flight[side].append((wire, plaintext))

    def open(self, sender: str, wire: bytes) -> bytes:
        return self.pair.open_at_bob(wire) if sender == "a" else self.pair.open_at_alice(wire)

    def refused_without_change(self, test: SynchronousTestCase, sender: str, wire: bytes) -> None:
        receiver = "b" if sender == "a" else "a"
        before = self.state(receiver)
        test.assertRaises(CryptoError, self.open, sender, wire)
        test.assertEqual(self.state(receiver), before)

    def ratchet_flip_refused(
        self, test: SynchronousTestCase, sender: str, wire: bytes, bit: int
    ) -> None:
        env = Envelope.from_bytes(wire)
        session: Session = self.pair.sb if sender == "a" else self.pair.sa
        before = session.to_bytes()
        blob = bytearray(env.header + env.ciphertext)
        blob[(bit // 8) % len(blob)] ^= 1 << (bit % 8)
        header, ciphertext = bytes(blob[: len(env.header)]), bytes(blob[len(env.header) :])
        test.assertRaises(CryptoError, session.decrypt, env.type, header, ciphertext)
        test.assertEqual(session.to_bytes(), before)


def _run(test: SynchronousTestCase, ops: list[tuple[Any, ...]], strict: bool, world: World) -> None:
    seen: set[bytes] = set()
    for op in ops:
        kind, side = op[0], op[1]
        queue = world.in_flight[side]
        if kind == "send":
            world.send(side)
        elif kind == "deliver" and queue:
            wire, plaintext = queue.pop(op[2] % len(queue))
            if strict:
                test.assertEqual(world.open(side, wire), plaintext)
            else:
                receiver = "b" if side == "a" else "a"
                before = world.state(receiver)
                try:
                    got = world.open(side, wire)
                except CryptoError:
                    test.assertEqual(world.state(receiver), before)
                    continue
                test.assertEqual(got, plaintext)
            test.assertNotIn(plaintext, seen)
            seen.add(plaintext)
            world.delivered[side].append(wire)
        elif kind == "drop" and queue:
            queue.pop(op[2] % len(queue))
        elif kind == "dup" and world.delivered[side]:
            wire = world.delivered[side][op[2] % len(world.delivered[side])]
            world.refused_without_change(test, side, wire)
        elif kind == "flip" and queue:
            wire, _ = queue[op[2] % len(queue)]
            if op[4]:
                flipped = bytearray(wire)
                flipped[(op[3] // 8) % len(flipped)] ^= 1 << (op[3] % 8)
                world.refused_without_change(test, side, bytes(flipped))
            else:
                world.ratchet_flip_refused(test, side, wire, op[3])
    # Finally everything still in flight arrives (strict: all of it decrypts).
    for side in ("a", "b"):
        for wire, plaintext in world.in_flight[side]:
            if strict:
                test.assertEqual(world.open(side, wire), plaintext)
            else:
                with contextlib.suppress(CryptoError):
                    test.assertEqual(world.open(side, wire), plaintext)


class InteractionFuzzer(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(st.lists(OPS, min_size=10, max_size=60))
    def test_exactly_once_within_limits(self, ops: list[tuple[Any, ...]]) -> None:
        _run(self, ops, strict=True, world=World())

    @settings(max_examples=150, deadline=None)
    @given(st.lists(OPS, min_size=10, max_size=60))
    def test_tight_limits_never_wrong(self, ops: list[tuple[Any, ...]]) -> None:
        _run(self, ops, strict=False, world=World(max_skip=3, max_skipped=4))

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.tuples(SIDES, st.integers(0, 30)), max_size=25))
    def test_state_serialisation_mid_conversation(self, ops: list[tuple[str, int]]) -> None:
        """Serialising and reloading both sessions at any point changes nothing."""
        world = World()
        for side, k in ops:
            world.send(side)
            queue = world.in_flight[side]
            if k % 3 == 0:
                wire, plaintext = queue.pop(k % len(queue))
                self.assertEqual(world.open(side, wire), plaintext)
            world.pair.sa = Session.from_bytes(world.pair.sa.to_bytes())
            world.pair.sb = Session.from_bytes(world.pair.sb.to_bytes())
        for side in ("a", "b"):
            for wire, plaintext in world.in_flight[side]:
                self.assertEqual(world.open(side, wire), plaintext)
