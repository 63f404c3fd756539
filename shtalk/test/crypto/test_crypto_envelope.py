"""Signed envelopes: canonical bytes, verification before decryption, message ids."""

from __future__ import annotations

import hashlib

import ecdsa  # type: ignore[import-untyped]
from ecdsa.util import sigdecode_string  # type: ignore[import-untyped]
from twisted.trial.unittest import SynchronousTestCase

from shtalk.crypto import (
    BadSignature,
    CryptoError,
    DecodeError,
    Envelope,
    MessageType,
    Recipient,
    StateError,
    UnsupportedVersion,
    open_envelope,
    prekey_identity,
)
from shtalk.test.crypto.test_crypto_support import Pair, identity

_N = ecdsa.NIST256p.order


def _envelope(**changes: object) -> Envelope:
    signer = identity(0, 0)
    fields: dict[str, object] = {
        "type": MessageType.MESSAGE, "sender_user": "alice", "sender_device": "laptop",
        "recipient": Recipient.user("bob", "phone"), "header": b"h" * 68,
        "ciphertext": b"c" * 40, "timestamp": 1_700_000_000_000,
    }
    fields.update(changes)
    return Envelope.seal(signer, **fields)  # type: ignore[arg-type]


class EnvelopeTests(SynchronousTestCase):
    def test_round_trip_and_verify(self) -> None:
        signer = identity(0, 0)
        env = Envelope.seal(
            signer, type=MessageType.ROOM, sender_user="ålice", sender_device="d1",
            recipient=Recipient.room("#general"), header=b"", ciphertext=b"x" * 100,
            timestamp=2**64 - 1,
        )
        again = Envelope.from_bytes(env.to_bytes())
        self.assertEqual(again, env)
        self.assertEqual(again.to_bytes(), env.to_bytes())
        again.verify(signer.identity_key)
        self.assertRaises(BadSignature, again.verify, identity(0, 0).identity_key)

    def test_signature_cross_checked_with_ecdsa_package(self) -> None:
        signer = identity(0, 0)
        env = Envelope.seal(
            signer, type=MessageType.MESSAGE, sender_user="a", sender_device="b",
            recipient=Recipient.user("c"), header=b"h", ciphertext=b"c", timestamp=5,
        )
        vk = ecdsa.VerifyingKey.from_string(
            signer.identity_key.signing_public, curve=ecdsa.NIST256p
        )
        self.assertTrue(
            vk.verify(env.signature, env.signed_bytes(), hashfunc=hashlib.sha256,
                      sigdecode=sigdecode_string)
        )
        self.assertTrue(env.signed_bytes().startswith(b"shtalk/v1 envelope\x00"))

    def test_every_bit_flip_refused(self) -> None:
        signer = identity(0, 0)
        env = Envelope.seal(
            signer, type=MessageType.MESSAGE, sender_user="al", sender_device="d",
            recipient=Recipient.user("bo", "p"), header=b"hh", ciphertext=b"cc", timestamp=7,
        )
        wire = env.to_bytes()
        for bit in range(len(wire) * 8):
            flipped = bytearray(wire)
            flipped[bit // 8] ^= 1 << (bit % 8)
            try:
                Envelope.from_bytes(bytes(flipped)).verify(signer.identity_key)
            except CryptoError:
                continue
            self.fail(f"bit {bit} flipped and still accepted")

    def test_malleated_signature_refused_and_ids_ignore_signature(self) -> None:
        signer = identity(0, 0)
        env = Envelope.seal(
            signer, type=MessageType.MESSAGE, sender_user="a", sender_device="b",
            recipient=Recipient.user("c"), header=b"h", ciphertext=b"c", timestamp=5,
        )
        r, s = env.signature[:32], int.from_bytes(env.signature[32:], "big")
        twin = Envelope.from_bytes(env.body() + r + (_N - s).to_bytes(32, "big"))
        self.assertRaises(BadSignature, twin.verify, signer.identity_key)
        self.assertEqual(twin.message_id, env.message_id)
        self.assertEqual(env.message_id, hashlib.sha256(env.body()).digest())
        other = Envelope.seal(
            signer, type=MessageType.MESSAGE, sender_user="a", sender_device="b",
            recipient=Recipient.user("c"), header=b"h", ciphertext=b"c", timestamp=6,
        )
        self.assertNotEqual(other.message_id, env.message_id)

    def test_decoding_errors(self) -> None:
        wire = _envelope().to_bytes()
        for cut in (0, 1, 10, 64, len(wire) - 65):
            self.assertRaises(DecodeError, Envelope.from_bytes, wire[:cut])
        self.assertRaises(UnsupportedVersion, Envelope.from_bytes, b"\x02" + wire[1:])
        self.assertRaises(UnsupportedVersion, Envelope.from_bytes, wire[:1] + b"\x09" + wire[2:])
        self.assertRaises(DecodeError, Envelope.from_bytes, wire[:5] + b"\xff" + wire[6:])
        self.assertRaises(DecodeError, Envelope.from_bytes, b"\x00" * 200_000)
        self.assertRaises(DecodeError, Envelope.from_bytes, "str")  # type: ignore[arg-type]


class OpenEnvelope(SynchronousTestCase):
    def test_verify_before_decrypt(self) -> None:
        pair = Pair()
        wire = pair.seal_from_alice(b"x")
        env = Envelope.from_bytes(wire)
        forged = Envelope.seal(
            identity(0, 0), type=env.type, sender_user=env.sender_user,
            sender_device=env.sender_device, recipient=env.recipient, header=env.header,
            ciphertext=env.ciphertext, timestamp=env.timestamp,
        )
        before = pair.sb.to_bytes()
        self.assertRaises(BadSignature, open_envelope, pair.bob, forged, pair.sb)
        self.assertEqual(pair.sb.to_bytes(), before)
        self.assertEqual(pair.open_at_bob(wire), b"x")

    def test_prekey_identity_and_type_checks(self) -> None:
        pair = Pair()
        env = Envelope.from_bytes(pair.seal_from_alice(b"x"))
        self.assertIs(env.type, MessageType.PREKEY)
        self.assertEqual(prekey_identity(env), pair.alice.identity_key)
        pair.open_at_alice(pair.seal_from_bob(b"y"))
        env = Envelope.from_bytes(pair.seal_from_alice(b"z"))
        self.assertRaises(StateError, prekey_identity, env)
        self.assertRaises(StateError, open_envelope, pair.bob, env, None)
        room = _envelope(type=MessageType.ROOM)
        self.assertRaises(StateError, open_envelope, pair.bob, room, pair.sb)
