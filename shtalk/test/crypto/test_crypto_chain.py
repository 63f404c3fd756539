"""The sending chain both protocols share: steps, saving ahead, marks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shtalk.crypto import DecodeError, RoomSession
from shtalk.crypto import primitives as P
from shtalk.crypto.chain import LAST_INDEX, SendingChain, kdf_ck, skip_keys
from shtalk.crypto.encoding import Reader, Writer
from shtalk.crypto.ratchet import RatchetState
from shtalk.test.crypto.test_crypto_ratchet import _ratchets

CK = bytes(range(32))


def _walk(ck: bytes, steps: int) -> bytes:
    for _ in range(steps):
        ck, _mk = kdf_ck(ck)
    return ck


class Chain(SynchronousTestCase):
    def test_steps_are_the_kdf_chain(self) -> None:
        chain = SendingChain(b"id", CK)
        ck, keys = skip_keys(CK, 0, 3)
        self.assertEqual([chain.step() for _ in range(3)], keys)
        self.assertEqual((chain.index, chain.key), (3, ck))

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.one_of(st.just(-1), st.integers(0, 40)), max_size=60))
    def test_saved_is_never_behind_and_never_too_far(self, ops: list[int]) -> None:
        """-1 sends a message, n >= 0 reserves n.  A save never holds a number already
        used, holds the right key for its number, and runs at most the reserve ahead."""
        chain, longest = SendingChain(b"id", CK), 0
        for op in ops:
            if op < 0:
                chain.step()
            else:
                chain.reserve(op)
                longest = max(longest, op)
            at, ck = chain.saved()
            self.assertGreaterEqual(at, chain.index)
            self.assertLessEqual(at, chain.index + longest)
            self.assertEqual(ck, _walk(CK, at))

    def test_reserve_stops_at_the_last_index(self) -> None:
        chain = SendingChain(b"id", CK, LAST_INDEX - 3)
        chain.reserve(32)
        self.assertEqual(chain.saved()[0], LAST_INDEX)
        self.assertFalse(chain.exhausted)
        self.assertTrue(SendingChain(b"id", CK, LAST_INDEX).exhausted)

    def test_a_mark_covers_only_its_own_chain(self) -> None:
        chain = SendingChain(b"one", CK)
        chain.reserve(4)
        mark = chain.mark()
        self.assertEqual(mark, (b"one", 4))
        self.assertTrue(chain.covered_by(mark))
        other = SendingChain(b"two", CK)
        self.assertFalse(other.covered_by(mark))
        self.assertFalse(chain.covered_by(None))


class BothProtocols(SynchronousTestCase):
    def test_ratchet_and_sender_keys_send_on_the_one_chain(self) -> None:
        sa, _ = _ratchets()
        self.assertIsInstance(sa.ratchet.sending, SendingChain)
        room = RoomSession("#r", "a", "d")
        room.rotate()
        self.assertIsInstance(room.own, SendingChain)

    def test_a_sending_number_without_a_chain_is_refused(self) -> None:
        """A saved state names its sending number only with its sending chain."""
        state = RatchetState.init_responder(CK, b"ad", P.x25519_generate(), CK, CK)
        self.assertIsNone(state.sending)
        raw = state.to_bytes()
        self.assertEqual(RatchetState.from_bytes(raw).to_bytes(), raw)
        # ns follows the version, two keys and seven optional keys (flag + 32 bytes each)
        r = Reader(raw, "ratchet state")
        r.u8()
        r.fixed(64)
        for _ in range(7):
            if r.flag():
                r.fixed(32)
        at = len(raw) - r.remaining
        self.assertEqual(raw[at : at + 4], bytes(4))
        forged = raw[:at] + Writer().u32(5).getvalue() + raw[at + 4 :]
        self.assertRaises(DecodeError, RatchetState.from_bytes, forged)
