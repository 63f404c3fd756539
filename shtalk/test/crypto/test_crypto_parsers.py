"""Every parser and every decrypt path refuses junk with a CryptoError, never a bare
ValueError, KeyError, IndexError or struct.error."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shtalk.crypto import (
    CryptoError,
    DeviceIdentity,
    Envelope,
    IdentityKey,
    InitialMessage,
    MessageType,
    PreKeyBundle,
    RoomSession,
    SenderKeyDistribution,
    Session,
    accept,
)
from shtalk.crypto.ratchet import RatchetState
from shtalk.test.crypto.test_crypto_support import Pair, identity

_PAIR = Pair()
_PAIR.open_at_alice(_PAIR.seal_from_bob(b"ack"))
_ROOM = RoomSession("#r", "a", "d")
_ROOM.add_distribution("b", "d", RoomSession("#r", "b", "d").rotate().to_bytes())
_BOB = identity(1, 1)

SAMPLES: dict[str, tuple[bytes, Callable[[bytes], object]]] = {
    "session": (_PAIR.sb.to_bytes(), Session.from_bytes),
    "ratchet": (_PAIR.sb.ratchet.to_bytes(), RatchetState.from_bytes),
    "identity": (_BOB.to_bytes(), DeviceIdentity.from_bytes),
    "identity key": (_BOB.identity_key.to_bytes(), IdentityKey.from_bytes),
    "bundle": (_BOB.public_bundle().to_bytes(), PreKeyBundle.from_bytes),
    "room": (_ROOM.to_bytes(), RoomSession.from_bytes),
    "distribution": (RoomSession("#r", "c", "d").rotate().to_bytes(),
                     SenderKeyDistribution.from_bytes),
    "envelope": (_PAIR.seal_from_alice(b"x"), Envelope.from_bytes),
}
_INITIAL = Envelope.from_bytes(Pair().seal_from_alice(b"x"))


def _mutate(data: st.DataObject, blob: bytes) -> bytes:
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 3))):
        choice = data.draw(st.integers(0, 2))
        if choice == 0 and out:
            pos = data.draw(st.integers(0, len(out) - 1))
            out[pos] = data.draw(st.integers(0, 255))
        elif choice == 1:
            out = out[: data.draw(st.integers(0, len(out)))]
        else:
            out += data.draw(st.binary(min_size=1, max_size=8))
    return bytes(out)


class ParserRobustness(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(st.sampled_from(sorted(SAMPLES)), st.data())
    def test_mutated_state_and_wire_bytes(self, name: str, data: st.DataObject) -> None:
        blob, parse = SAMPLES[name]
        with contextlib.suppress(CryptoError):
            parse(_mutate(data, blob))

    @settings(max_examples=60, deadline=None)
    @given(st.binary(max_size=200), st.binary(max_size=200), st.sampled_from(list(MessageType)))
    def test_random_messages(self, header: bytes, ciphertext: bytes, kind: MessageType) -> None:
        before = _PAIR.sb.to_bytes()
        self.assertRaises(CryptoError, _PAIR.sb.decrypt, kind, header, ciphertext)
        self.assertRaises(CryptoError, accept, _BOB, header, ciphertext)
        self.assertRaises(CryptoError, _ROOM.decrypt, "b", "d", header, ciphertext)
        self.assertRaises(CryptoError, InitialMessage.from_bytes, header)
        self.assertEqual(_PAIR.sb.to_bytes(), before)

    @settings(max_examples=60, deadline=None)
    @given(st.data())
    def test_mutated_prekey_messages(self, data: st.DataObject) -> None:
        before = _BOB.to_bytes()
        header = _mutate(data, _INITIAL.header)
        with contextlib.suppress(CryptoError):
            accept(_BOB, header, _INITIAL.ciphertext)
        self.assertEqual(_BOB.to_bytes(), before)

    def test_wrong_python_types(self) -> None:
        for _, parse in SAMPLES.values():
            for junk in ("text", None, 5, [1, 2]):
                self.assertRaises(CryptoError, parse, junk)  # type: ignore[arg-type]
