"""Shared helpers for the crypto tests (no test cases here)."""

from __future__ import annotations

from shtalk.crypto import (
    DeviceIdentity,
    Envelope,
    PreKeyBundle,
    Recipient,
    Session,
    open_envelope,
    seal,
)

ALICE = ("alice", "laptop")
BOB = ("bob", "phone")


def identity(opks: int = 3, kem_opks: int = 1) -> DeviceIdentity:
    return DeviceIdentity.generate(one_time_prekeys=opks, kem_one_time_prekeys=kem_opks)


def fetched_bundle(owner: DeviceIdentity) -> PreKeyBundle:
    """What the directory hands one initiator: one of each one-time pre-key, as bytes."""
    full = owner.public_bundle()
    opk = full.one_time_prekeys[0].key_id if full.one_time_prekeys else None
    kpk = full.kem_one_time_prekeys[0].key_id if full.kem_one_time_prekeys else None
    return PreKeyBundle.from_bytes(full.select(opk, kpk).to_bytes())


class Pair:
    """Alice and Bob with an established session (Bob has decrypted Alice's first message)."""

    def __init__(self) -> None:
        self.alice, self.bob = identity(), identity()
        self.sa = Session.initiate(self.alice, fetched_bundle(self.bob))
        env = self.seal_from_alice(b"hello")
        self.sb, plaintext = open_envelope(self.bob, Envelope.from_bytes(env))
        assert plaintext == b"hello"

    def seal_from_alice(self, plaintext: bytes, timestamp: int = 1) -> bytes:
        return seal(
            self.alice, self.sa, plaintext, sender_user=ALICE[0], sender_device=ALICE[1],
            recipient=Recipient.user(*BOB), timestamp=timestamp,
        ).to_bytes()

    def seal_from_bob(self, plaintext: bytes, timestamp: int = 1) -> bytes:
        return seal(
            self.bob, self.sb, plaintext, sender_user=BOB[0], sender_device=BOB[1],
            recipient=Recipient.user(*ALICE), timestamp=timestamp,
        ).to_bytes()

    def open_at_bob(self, wire: bytes) -> bytes:
        self.sb, plaintext = open_envelope(self.bob, Envelope.from_bytes(wire), self.sb)
        return plaintext

    def open_at_alice(self, wire: bytes) -> bytes:
        self.sa, plaintext = open_envelope(self.alice, Envelope.from_bytes(wire), self.sa)
        return plaintext
