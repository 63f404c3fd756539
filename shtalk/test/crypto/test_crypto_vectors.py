"""Recorded vectors of our own wire formats (``data/crypto_vectors.json``).

Fixed identities, a fixed PQXDH ephemeral key, a recorded ML-KEM ciphertext and
shared secret (encapsulation is randomised, so the pair is recorded and Bob's
decapsulation of the recorded ciphertext is checked), a fixed first ratchet key
-> fixed PQXDH keys, fixed first messages and fixed signed envelopes (ECDSA with
RFC 6979 nonces is deterministic).  A refactor that changes any byte on the wire
fails here.  Regenerate only for a deliberate format change, with a version bump:

    PYTHONPATH=. .venv/bin/python -m shtalk.test.crypto.test_crypto_vectors --regenerate
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from shtalk.crypto import (
    DeviceIdentity,
    Envelope,
    PreKeyBundle,
    Recipient,
    RoomSession,
    Session,
    accept,
    seal,
)
from shtalk.crypto import primitives as P
from shtalk.crypto.chain import SendingChain
from shtalk.crypto.pqxdh import initiate

VECTORS = Path(__file__).parent / "data" / "crypto_vectors.json"
PLAINTEXTS = [b"hello bob", b"", b"a second message before any reply"]


def _compute(v: dict[str, Any]) -> dict[str, Any]:
    """Everything derived from the recorded inputs (no randomness)."""
    alice = DeviceIdentity.from_bytes(bytes.fromhex(v["alice_identity"]))
    bundle = PreKeyBundle.from_bytes(bytes.fromhex(v["bob_bundle"]))
    ek = P.x25519_private_from_bytes(bytes.fromhex(v["alice_ephemeral_private"]))
    rk = P.x25519_private_from_bytes(bytes.fromhex(v["alice_ratchet_private"]))
    kem = (bytes.fromhex(v["kem_ciphertext"]), bytes.fromhex(v["kem_shared_secret"]))
    keys, initial = initiate(alice, bundle, ephemeral=ek, kem_result=kem)
    session = Session.initiate(alice, bundle, ephemeral=ek, kem_result=kem, ratchet_key=rk)
    out: dict[str, Any] = {
        "root_key": keys.root_key.hex(),
        "hka": keys.hka.hex(),
        "nhkb": keys.nhkb.hex(),
        "ad": keys.ad.hex(),
        "initial_message": initial.to_bytes().hex(),
        "messages": [],
    }
    for i, plaintext in enumerate(PLAINTEXTS):
        env = seal(
            alice, session, plaintext, sender_user="alice", sender_device="laptop",
            recipient=Recipient.user("bob", "phone"), timestamp=1_767_225_600_000 + i,
        )
        out["messages"].append(
            {
                "plaintext": plaintext.hex(),
                "type": int(env.type),
                "header": env.header.hex(),
                "ciphertext": env.ciphertext.hex(),
                "envelope": env.to_bytes().hex(),
                "message_id": env.message_id.hex(),
            }
        )
    # Sender Keys: a fixed chain key and signing key.
    room = RoomSession("#vectors", "alice", "laptop")
    room.rotate(7)  # then the fixed keys in place of the fresh ones
    room.signing_key = P.signing_private_from_bytes(bytes.fromhex(v["room_signing_private"]))
    room.own = SendingChain(
        P.signing_public_bytes(room.signing_key), bytes.fromhex(v["room_chain_key"])
    )
    out["room"] = {
        "distribution": room.distribution().to_bytes().hex(),
        "messages": [[h.hex(), c.hex()] for h, c in (room.encrypt(b"room 0"), room.encrypt(b""))],
    }
    return out


def generate() -> dict[str, Any]:
    alice = DeviceIdentity.generate(one_time_prekeys=2, kem_one_time_prekeys=1)
    bob = DeviceIdentity.generate(one_time_prekeys=2, kem_one_time_prekeys=1)
    full = bob.public_bundle()
    bundle = full.select(full.one_time_prekeys[0].key_id, full.kem_one_time_prekeys[0].key_id)
    ct, ss = P.kem_encapsulate(P.kem_public_from_bytes(bundle.kem_one_time_prekeys[0].public))
    v: dict[str, Any] = {
        "description": "shtalk E2EE recorded vectors, format version 1 (see docs/PROTOCOL-E2EE.md)",
        "alice_identity": alice.to_bytes().hex(),
        "bob_identity": bob.to_bytes().hex(),
        "bob_bundle": bundle.to_bytes().hex(),
        "alice_ephemeral_private": P.x25519_private_bytes(P.x25519_generate()).hex(),
        "alice_ratchet_private": P.x25519_private_bytes(P.x25519_generate()).hex(),
        "kem_ciphertext": ct.hex(),
        "kem_shared_secret": ss.hex(),
        "room_chain_key": P.random_bytes(32).hex(),
        "room_signing_private": P.signing_private_bytes(P.signing_generate()).hex(),
    }
    v["expected"] = _compute(v)
    return v


class RecordedVectors(SynchronousTestCase):
    def setUp(self) -> None:
        self.v: dict[str, Any] = json.loads(VECTORS.read_text())

    def test_outputs_unchanged(self) -> None:
        got = _compute(self.v)
        expected = self.v["expected"]
        for key in ("root_key", "hka", "nhkb", "ad", "initial_message"):
            self.assertEqual(got[key], expected[key], key)
        for ours, recorded in zip(got["messages"], expected["messages"], strict=True):
            self.assertEqual(ours, recorded)
        self.assertEqual(got["room"], expected["room"])

    def test_kem_pair_is_genuine(self) -> None:
        bob = DeviceIdentity.from_bytes(bytes.fromhex(self.v["bob_identity"]))
        (seed, _sig), = bob.kem_one_time_prekeys.values()
        ss = P.kem_decapsulate(
            P.kem_private_from_seed(seed), bytes.fromhex(self.v["kem_ciphertext"])
        )
        self.assertEqual(ss.hex(), self.v["kem_shared_secret"])

    def test_bob_decrypts_recorded_messages(self) -> None:
        bob = DeviceIdentity.from_bytes(bytes.fromhex(self.v["bob_identity"]))
        msgs = self.v["expected"]["messages"]
        session = None
        for msg in msgs:
            env = Envelope.from_bytes(bytes.fromhex(msg["envelope"]))
            self.assertEqual(env.message_id.hex(), msg["message_id"])
            header, ciphertext = bytes.fromhex(msg["header"]), bytes.fromhex(msg["ciphertext"])
            if session is None:
                session, plaintext = accept(bob, header, ciphertext)
            else:
                plaintext = session.decrypt(env.type, header, ciphertext)
            env.verify(session.remote_identity)
            self.assertEqual(plaintext.hex(), msg["plaintext"])

    def test_room_messages_decrypt(self) -> None:
        room = self.v["expected"]["room"]
        reader = RoomSession("#vectors", "bob", "phone")
        reader.add_distribution("alice", "laptop", bytes.fromhex(room["distribution"]))
        plain = [
            reader.decrypt("alice", "laptop", bytes.fromhex(h), bytes.fromhex(c))
            for h, c in room["messages"]
        ]
        self.assertEqual(plain, [b"room 0", b""])


if __name__ == "__main__":
    if "--regenerate" in sys.argv:
        VECTORS.write_text(json.dumps(generate(), indent=1) + "\n")
        print(f"wrote {VECTORS}")
