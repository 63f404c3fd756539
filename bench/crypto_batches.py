"""The batches bench/crypto times: our seal and open, the floor's primitives each alone,
python-doubleratchet's recommended configuration, PQXDH set-up, rooms and key rotation.

Each builder returns ``{name: (batch, n)}``; `interleaved` runs them all round after
round in one process, so every ratio compares figures taken under the same load.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from cryptography.hazmat.primitives.asymmetric import x25519

from shtalk.crypto import (
    DeviceIdentity,
    Envelope,
    MessageType,
    PreKeyBundle,
    Recipient,
    RoomSession,
    Session,
    accept,
    open_envelope,
    seal,
)
from shtalk.crypto import primitives as P
from shtalk.crypto.ratchet import kdf_rk

MSG = os.urandom(200)


Batch = Callable[[int], float]  # run n operations, return the seconds they took


def timed(fn: Callable[[], object]) -> Batch:
    """A batch of ``n`` calls of ``fn``."""

    def batch(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - start

    return batch


def interleaved(batches: dict[str, tuple[Batch, int]], rounds: int) -> dict[str, float]:
    """Best µs per operation of each batch; every round runs every batch once, so
    a change of load on the machine hits all of them alike."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, (batch, n) in batches.items():
            gc.collect()
            gc.disable()
            try:
                per_op = batch(n) / n * 1e6
            finally:
                gc.enable()
            best[name] = min(best.get(name, per_op), per_op)
    return best


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive a coroutine that never really waits (python-doubleratchet's crypto is sync)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("coroutine suspended")


# ---------------------------------------------------------------------- floor


def floor_batches(n: int) -> dict[str, tuple[Batch, int]]:
    sk = P.signing_generate()
    pub = P.load_signing_public(P.signing_public_bytes(sk))
    data = os.urandom(400)
    sig = P.sign(sk, data)
    key, nonce, ad = os.urandom(32), os.urandom(12), os.urandom(200)
    ct = P.aead_encrypt(key, nonce, MSG, ad)
    hk = P.Aead(os.urandom(32))
    hct = hk.encrypt(nonce, bytes(40), b"")
    priv = P.x25519_generate()
    other_key = x25519.X25519PublicKey.from_public_bytes(
        P.x25519_public_bytes(P.x25519_generate())
    )
    fns: dict[str, Callable[[], object]] = {
        "sign": lambda: P.sign(sk, data),
        "verify": lambda: P.verify(pub, sig, data),
        "hmac": lambda: P.hmac_sha256(key, b"\x01"),
        "hkdf": lambda: P.hkdf(key, None, b"info", 56),
        "aead_enc": lambda: P.aead_encrypt(key, nonce, MSG, ad),
        "aead_dec": lambda: P.aead_decrypt(key, nonce, ct, ad),
        "hdr_enc": lambda: hk.encrypt(nonce, bytes(40), b""),
        "hdr_dec": lambda: hk.decrypt(nonce, hct, b""),
        "x25519": lambda: priv.exchange(other_key),
        "x25519_gen": P.x25519_generate,
        "kdf_rk": lambda: kdf_rk(key, key),
    }
    return {name: (timed(fn), n) for name, fn in fns.items()}


def add_floors(t: dict[str, float]) -> None:
    one_way = (
        t["sign"] + t["verify"] + 4 * t["hmac"] + 2 * t["hkdf"] + t["aead_enc"] + t["aead_dec"]
        + t["hdr_enc"] + t["hdr_dec"]
    )
    t["floor_one_way"] = one_way
    t["floor_dh_step"] = 2 * t["x25519"] + t["x25519_gen"] + 2 * t["kdf_rk"]
    t["floor_alternating"] = one_way + t["floor_dh_step"]
    t["floor_unsigned"] = one_way - t["sign"] - t["verify"]


# ----------------------------------------------------------------------- ours


class Pair:
    def __init__(self) -> None:
        self.alice = DeviceIdentity.generate(one_time_prekeys=1, kem_one_time_prekeys=1)
        self.bob = DeviceIdentity.generate(one_time_prekeys=1, kem_one_time_prekeys=1)
        self.sa = Session.initiate(self.alice, self.bob.public_bundle())
        self.sb, _ = open_envelope(self.bob, Envelope.from_bytes(self.seal_a()))
        self.sa, _ = open_envelope(self.alice, Envelope.from_bytes(self.seal_b()), self.sa)
        self.flip = True

    def seal_a(self, data: bytes = MSG) -> bytes:
        return seal(
            self.alice, self.sa, data, sender_user="alice", sender_device="laptop",
            recipient=Recipient.user("bob", "phone"), timestamp=1,
        ).to_bytes()

    def seal_b(self) -> bytes:
        return seal(
            self.bob, self.sb, MSG, sender_user="bob", sender_device="phone",
            recipient=Recipient.user("alice", "laptop"), timestamp=1,
        ).to_bytes()

    def open_b(self, wire: bytes) -> bytes:
        self.sb, plaintext = open_envelope(self.bob, Envelope.from_bytes(wire), self.sb)
        return plaintext

    def open_a(self, wire: bytes) -> None:
        self.sa, _ = open_envelope(self.alice, Envelope.from_bytes(wire), self.sa)

    def alternate(self) -> None:
        if self.flip:
            self.open_b(self.seal_a())
        else:
            self.open_a(self.seal_b())
        self.flip = not self.flip


def ours_batches(n: int) -> dict[str, tuple[Batch, int]]:
    pair = Pair()

    def decrypt_batch(k: int) -> float:
        wires = [pair.seal_a() for _ in range(k)]
        start = time.perf_counter()
        for wire in wires:
            pair.open_b(wire)
        return time.perf_counter() - start

    def ratchet_only() -> None:
        pair.sb.decrypt(*pair.sa.encrypt(MSG))

    def encrypt_batch(k: int) -> float:
        start = time.perf_counter()
        wires = [pair.seal_a() for _ in range(k)]
        elapsed = time.perf_counter() - start
        for wire in wires:
            pair.open_b(wire)
        return elapsed

    return {
        "ours_interleaved": (timed(lambda: pair.open_b(pair.seal_a())), n),
        "ours_encrypt_sign": (encrypt_batch, n),
        "ours_verify_decrypt": (decrypt_batch, n),
        "ours_alternating": (timed(pair.alternate), n),
        "ours_ratchet_only": (timed(ratchet_only), n),
    }


def setup_batches(n: int) -> dict[str, tuple[Batch, int]]:
    alice = DeviceIdentity.generate(one_time_prekeys=1, kem_one_time_prekeys=1)
    bob = DeviceIdentity.generate(one_time_prekeys=0, kem_one_time_prekeys=0)
    bundle_bytes = bob.public_bundle().to_bytes()
    bundle = PreKeyBundle.from_bytes(bundle_bytes)

    def accept_batch(k: int) -> float:
        msgs = [Session.initiate(alice, bundle).encrypt(MSG) for _ in range(k)]
        elapsed = 0.0
        for _, header, ciphertext in msgs:
            start = time.perf_counter()
            accept(bob, header, ciphertext)
            elapsed += time.perf_counter() - start
            bob.seen_initials.clear()  # keep the replay list from growing into the figure
        return elapsed

    return {
        "setup_initiate": (timed(lambda: Session.initiate(alice, bundle)), n),
        "setup_parse_bundle": (timed(lambda: PreKeyBundle.from_bytes(bundle_bytes)), n),
        "setup_accept": (accept_batch, n),
    }


def room_batches(members: int, n: int) -> dict[str, tuple[Batch, int]]:
    ident = DeviceIdentity.generate(one_time_prekeys=0, kem_one_time_prekeys=0)
    sender = RoomSession("#bench", "alice", "laptop")
    reader = RoomSession("#bench", "bob", "phone")
    reader.add_distribution("alice", "laptop", sender.rotate().to_bytes())
    target = Recipient.room("#bench")

    def send_once() -> bytes:
        header, ciphertext = sender.encrypt(MSG)
        return Envelope.seal(
            ident, type=MessageType.ROOM, sender_user="alice", sender_device="laptop",
            recipient=target, header=header, ciphertext=ciphertext, timestamp=1,
        ).to_bytes()

    def receive_batch(k: int) -> float:
        wires = [send_once() for _ in range(k)]
        start = time.perf_counter()
        for wire in wires:
            env = Envelope.from_bytes(wire)
            env.verify(ident.identity_key)
            reader.decrypt(env.sender_user, env.sender_device, env.header, env.ciphertext)
        return time.perf_counter() - start

    pairs = [Pair() for _ in range(members - 1)]

    def pairwise() -> None:
        for p in pairs:
            p.open_b(p.seal_a())  # keep each receiver in step; only sending is timed below

    def pairwise_send(k: int) -> float:
        elapsed = 0.0
        for _ in range(k):
            start = time.perf_counter()
            wires = [p.seal_a() for p in pairs]
            elapsed += time.perf_counter() - start
            for p, wire in zip(pairs, wires, strict=True):
                p.open_b(wire)
        return elapsed

    del pairwise
    return {
        "room_sk_send": (timed(send_once), n),
        "room_sk_receive": (receive_batch, n),
        "room_pairwise_send": (pairwise_send, max(1, n // 10)),
    }


def rotation_batches(members: int, n: int) -> dict[str, tuple[Batch, int]]:
    from shtalk.client import payload as pl

    ident = DeviceIdentity.generate(one_time_prekeys=100, kem_one_time_prekeys=10)
    clock = [0]

    def prekeys() -> None:
        clock[0] += 1
        ident.rotate_prekeys(clock[0])
        ident.published(clock[0])
        ident.public_bundle().base().to_bytes()  # what keys_publish uploads
        ident.to_bytes()  # what the store saves (the client seals and commits it)
        ident.expire_previous(clock[0], 0)  # (a grace period later)
        ident.to_bytes()

    sender = RoomSession("#bench", "alice", "laptop")
    sender.rotate()
    pairs = [Pair() for _ in range(members - 1)]
    readers = [RoomSession("#bench", f"m{i}", "phone") for i in range(members - 1)]

    def sender_key(k: int, receivers: bool = True) -> float:
        """The new key handed out pairwise and installed (or only the sender's part)."""
        elapsed = 0.0
        for _ in range(k):
            start = time.perf_counter()
            dist = sender.rotate()
            data = pl.encode(pl.SenderKey("#bench", dist.to_bytes()))
            wires = [p.seal_a(data) for p in pairs]
            if not receivers:
                elapsed += time.perf_counter() - start
            for p, reader, wire in zip(pairs, readers, wires, strict=True):
                body = pl.decode(p.open_b(wire))
                assert isinstance(body, pl.SenderKey)
                reader.add_distribution("alice", "laptop", body.dist)
            if receivers:
                elapsed += time.perf_counter() - start
        return elapsed

    return {
        "rot_prekeys": (timed(prekeys), n),
        "rot_sender_key": (sender_key, max(1, n // 10)),
        "rot_sender_key_send": (lambda k: sender_key(k, receivers=False), max(1, n // 10)),
    }


# ----------------------------------------------------- python-doubleratchet


def doubleratchet_batches(n: int) -> dict[str, tuple[Batch, int]]:
    try:
        from doubleratchet import DoubleRatchet as DR
        from doubleratchet.recommended import (
            HashFunction,
            aead_aes_hmac,
            diffie_hellman_ratchet_curve25519,
            kdf_hkdf,
            kdf_separate_hmacs,
        )
    except ImportError:
        return {}

    class RootKDF(kdf_hkdf.KDF):  # type: ignore[misc]
        @staticmethod
        def _get_hash_function() -> HashFunction:
            return HashFunction.SHA_256

        @staticmethod
        def _get_info() -> bytes:
            return b"bench root"

    class ChainKDF(kdf_separate_hmacs.KDF):  # type: ignore[misc]
        @staticmethod
        def _get_hash_function() -> HashFunction:
            return HashFunction.SHA_256

    class Aead(aead_aes_hmac.AEAD):  # type: ignore[misc]
        @staticmethod
        def _get_hash_function() -> HashFunction:
            return HashFunction.SHA_256

        @staticmethod
        def _get_info() -> bytes:
            return b"bench message"

    class DoubleRatchet(DR):  # type: ignore[misc]
        @staticmethod
        def _build_associated_data(associated_data: bytes, header: Any) -> bytes:
            out: bytes = (
                associated_data + header.ratchet_pub
                + header.previous_sending_chain_length.to_bytes(4, "big")
                + header.sending_chain_length.to_bytes(4, "big")
            )
            return out

    config: dict[str, Any] = {
        "diffie_hellman_ratchet_class": diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet,
        "root_chain_kdf": RootKDF, "message_chain_kdf": ChainKDF,
        "message_chain_constant": b"\x01\x02", "dos_protection_threshold": 1000,
        "max_num_skipped_message_keys": 1000, "aead": Aead,
    }
    bob_priv = x25519.X25519PrivateKey.generate()
    ad, secret = os.urandom(64), os.urandom(32)
    alice, first = run(DoubleRatchet.encrypt_initial_message(
        shared_secret=secret, recipient_ratchet_pub=P.x25519_public_bytes(bob_priv),
        message=MSG, associated_data=ad, **config,
    ))
    bob, _ = run(DoubleRatchet.decrypt_initial_message(
        shared_secret=secret, own_ratchet_priv=P.x25519_private_bytes(bob_priv),
        message=first, associated_data=ad, **config,
    ))
    run(alice.decrypt_message(run(bob.encrypt_message(MSG, ad)), ad))

    def one() -> None:
        run(bob.decrypt_message(run(alice.encrypt_message(MSG, ad)), ad))

    def encrypt_batch(k: int) -> float:
        start = time.perf_counter()
        msgs = [run(alice.encrypt_message(MSG, ad)) for _ in range(k)]
        elapsed = time.perf_counter() - start
        for msg in msgs:
            run(bob.decrypt_message(msg, ad))
        return elapsed

    def decrypt_batch(k: int) -> float:
        msgs = [run(alice.encrypt_message(MSG, ad)) for _ in range(k)]
        start = time.perf_counter()
        for msg in msgs:
            run(bob.decrypt_message(msg, ad))
        return time.perf_counter() - start

    flip = [True]

    def alternate() -> None:
        a, b = (alice, bob) if flip[0] else (bob, alice)
        run(b.decrypt_message(run(a.encrypt_message(MSG, ad)), ad))
        flip[0] = not flip[0]

    return {
        "pdr_interleaved": (timed(one), n), "pdr_encrypt": (encrypt_batch, n),
        "pdr_decrypt": (decrypt_batch, n), "pdr_alternating": (timed(alternate), n),
    }
