"""Benchmark of the E2EE core against its floor and against python-doubleratchet.

Run:  .venv/bin/python -m bench.crypto [--quick] [--write docs/PERFORMANCE.md]

Everything is measured in the same process and run, so the ratios compare like
with like on whatever machine runs it.  Each figure is the best of several
repeats of a batch (the minimum is the least disturbed by other load), with the
garbage collector paused during a batch, in microseconds per operation.

* "ours": a full 200-byte message through :func:`shtalk.crypto.seal` (Double
  Ratchet with header encryption + envelope encoding + ECDSA P-256 signature)
  and :func:`shtalk.crypto.open_envelope` (parse + verify + decrypt).
* "floor": the sum of the primitive operations each message must do, each timed
  alone on ``cryptography``: sign, verify, four HMAC-SHA256 (two chain steps),
  two HKDF message-key derivations, AES-256-GCM encrypt and decrypt of the body
  under a fresh key, encrypt and decrypt of the header under a kept key; when
  the direction alternates, also the receiver's DH ratchet step (two X25519,
  one key generation, two HKDF root-key derivations).
* rotation (shtalk.client.rotation): a signed pre-key rotation (new X25519 signed
  pre-key and ML-KEM-768 last-resort pre-key, two signatures, the bundle and the
  identity state encoded; later the previous pair dropped), and a room sender-key
  rotation (new chain and signing key, the distribution sealed pairwise for every other
  member, each of them opening it and installing the key), amortised over the messages
  between two rotations and set against the per-message cost measured in the same run.
* "python-doubleratchet": the PyPI package's recommended configuration
  (Curve25519, HKDF/SHA-256, separate HMACs, AES-CBC+HMAC), encrypt + decrypt
  of the same message; it does not sign and has no header encryption.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
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
SECTION = "## E2EE core (bench/crypto)"


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


# --------------------------------------------------------------------- report


def report(quick: bool) -> str:
    n, rounds = (100, 3) if quick else (300, 9)
    batches: dict[str, tuple[Batch, int]] = {}
    batches.update(floor_batches(n * 4))
    batches.update(ours_batches(n))
    batches.update(doubleratchet_batches(n))
    batches.update(setup_batches(max(5, n // 20)))
    batches.update(room_batches(50, max(10, n // 4)))
    batches.update(rotation_batches(50, max(10, n // 4)))
    t = interleaved(batches, rounds)
    add_floors(t)
    f = t
    o = {k[5:]: v for k, v in t.items() if k.startswith("ours_")}
    o["one_way"] = o["encrypt_sign"] + o["verify_decrypt"]
    d = {k[4:]: v for k, v in t.items() if k.startswith("pdr_")} or None
    if d:
        d["one_way"] = d["encrypt"] + d["decrypt"]
    s = {k[6:]: v for k, v in t.items() if k.startswith("setup_")}
    s["total"] = s["parse_bundle"] + s["initiate"] + s["accept"]
    r: dict[str, float] = {k[5:]: v for k, v in t.items() if k.startswith("room_")}
    r["members"] = 50
    r["sender_keys_send"], r["sender_keys_receive"] = r["sk_send"], r["sk_receive"]
    rot = {k[4:]: v for k, v in t.items() if k.startswith("rot_")}
    fmt = "{:.1f}".format
    lines = [
        SECTION,
        "",
        f"Measured by `.venv/bin/python -m bench.crypto` on {time.strftime('%Y-%m-%d')} "
        f"(Python {sys.version.split()[0]}, cryptography {_version('cryptography')}); "
        "best of several batches, µs per operation, 200-byte messages. "
        "Ratios are against baselines measured in the same run.",
        "",
        "| per message (send + receive) | ours | floor | ours / floor |"
        " python-doubleratchet | ours / python-doubleratchet |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, key, floor_key in (
        ("one direction (sender and receiver each timed alone)", "one_way", "floor_one_way"),
        ("one direction, both sides interleaved in one process", "interleaved",
         "floor_one_way"),
        ("alternating (DH step each message)", "alternating", "floor_alternating"),
    ):
        theirs = d[key] if d else float("nan")
        lines.append(
            f"| {label} | {fmt(o[key])} | {fmt(f[floor_key])} | {o[key] / f[floor_key]:.2f}x |"
            f" {fmt(theirs)} | {o[key] / theirs:.2f}x |"
        )
    lines += [
        "",
        "Ours includes the ECDSA P-256 signature, its verification, header encryption and the "
        "envelope encoding; python-doubleratchet does neither signing nor header encryption. "
        "The floor's parts are timed alone, like the first row's two sides (as on two devices); "
        "the second row runs both sides back to back in one process, as python-doubleratchet's "
        "own figure in that row does.",
        "",
        *targets(o, f, d),
        "",
        "| detail | µs |",
        "|---|---:|",
        f"| encrypt + sign (seal) | {fmt(o['encrypt_sign'])} |",
        f"| verify + decrypt (open) | {fmt(o['verify_decrypt'])} |",
        f"| python-doubleratchet encrypt / decrypt | {fmt(d['encrypt']) if d else '-'} / "
        f"{fmt(d['decrypt']) if d else '-'} |",
        f"| ratchet alone, one direction (no envelope, no signature) | {fmt(o['ratchet_only'])} |",
        f"| floor without signatures, one direction | {fmt(f['floor_unsigned'])} |",
        f"| ratchet alone / unsigned floor | {o['ratchet_only'] / f['floor_unsigned']:.2f}x |",
        f"| floor parts: sign {fmt(f['sign'])}, verify {fmt(f['verify'])}, HMAC {fmt(f['hmac'])},"
        f" HKDF {fmt(f['hkdf'])}, AES-GCM enc {fmt(f['aead_enc'])} / dec {fmt(f['aead_dec'])},"
        f" header enc {fmt(f['hdr_enc'])} / dec {fmt(f['hdr_dec'])}, X25519 {fmt(f['x25519'])},"
        f" X25519 keygen {fmt(f['x25519_gen'])}, KDF_RK {fmt(f['kdf_rk'])} | |",
        "",
        "| session set-up (PQXDH, X25519 + ML-KEM-768) | µs |",
        "|---|---:|",
        f"| parse + verify fetched bundle | {fmt(s['parse_bundle'])} |",
        f"| initiate (verify signatures, 4 DH, encapsulate, ratchet init) | {fmt(s['initiate'])} |",
        f"| accept (decapsulate, 4 DH, first decrypt) | {fmt(s['accept'])} |",
        f"| total | {fmt(s['total'])} |",
        "",
        f"| room message, {r['members']:.0f} members | µs | ratio |",
        "|---|---:|---:|",
        f"| Sender Keys: encrypt once + 2 signatures (sender key, envelope) "
        f"| {fmt(r['sender_keys_send'])} | 1 |",
        f"| pairwise: {r['members'] - 1:.0f} sealed envelopes | {fmt(r['pairwise_send'])} "
        f"| {r['pairwise_send'] / r['sender_keys_send']:.1f}x |",
        f"| Sender Keys: one member receives (2 verifications + decrypt) "
        f"| {fmt(r['sender_keys_receive'])} | |",
        "",
        *rotation_rows(rot, o, r),
    ]
    return "\n".join(lines)


def rotation_rows(rot: dict[str, float], o: dict[str, float], r: dict[str, float]) -> list[str]:
    """Key rotation (shtalk.client.rotation's defaults) amortised over the messages it
    covers, against the cost of one message measured in the same run."""
    from shtalk.client.rotation import RotationPolicy

    bound = RotationPolicy().room_key_messages
    week = 100  # messages a device sends and receives in a week (a light user)
    members = r["members"]
    room_msg = r["sender_keys_send"] + (members - 1) * r["sender_keys_receive"]
    fmt = "{:.1f}".format
    rows = [
        ("signed pre-keys, once a week (per message at 100 DMs a week)",
         rot["prekeys"], week, o["one_way"]),
        (f"room sender key every {bound} messages, {members:.0f} members: all devices",
         rot["sender_key"], bound, room_msg),
        (f"room sender key every {bound} messages: the sender's part",
         rot["sender_key_send"], bound, r["sender_keys_send"]),
    ]
    lines = [
        "| key rotation (defaults) | µs per rotation | messages per rotation "
        "| µs per message, amortised | one message, µs | amortised / message |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, cost, per, message in rows:
        lines.append(
            f"| {label} | {fmt(cost)} | {per} | {fmt(cost / per)} | {fmt(message)} "
            f"| {cost / per / message:.1%} |"
        )
    lines += [
        "",
        "A pre-key rotation is two key generations (X25519, ML-KEM-768), two signatures and "
        "the bundle and state encoded, once a week; a sender-key rotation hands the new key "
        f"to the {members - 1:.0f} other members over their pairwise sessions (one sealed "
        "envelope each, opened and installed by each). 'One message' is a DM in one "
        "direction (seal + open) and a room message with every member's receipt.",
        "",
    ]
    return lines


def targets(o: dict[str, float], f: dict[str, float], d: dict[str, float] | None) -> list[str]:
    """The issue's targets, evaluated on this run's figures."""
    worst = max(o["one_way"] / f["floor_one_way"], o["alternating"] / f["floor_alternating"])
    sig = f["sign"] + f["verify"]
    lines = [
        f"Targets: within 2x of the floor: {'met' if worst <= 2 else 'NOT met'} "
        f"(worst {worst:.2f}x)."
    ]
    if d:
        verdict = [
            f"{name} {'faster' if o[key] < d[key] else 'slower'} ({o[key] / d[key]:.2f}x)"
            for name, key in (("one direction", "one_way"), ("alternating", "alternating"))
        ]
        lines[0] += (
            " Against python-doubleratchet, signatures included: " + ", ".join(verdict) + "."
            f" Our ratchet alone (no envelope, no signature) takes "
            f"{o['ratchet_only']:.1f} µs, {d['one_way'] / o['ratchet_only']:.1f}x less than"
            f" python-doubleratchet's {d['one_way']:.1f} µs; ECDSA sign + verify alone take"
            f" {sig:.1f} µs, {sig / o['one_way']:.0%} of our one-direction cost."
        )
    return lines


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def write_section(path: Path, section: str, heading: str = SECTION) -> None:
    """Replace the section under ``heading`` (up to the next ``## `` heading) or append it."""
    text = path.read_text() if path.exists() else "# Performance\n"
    pattern = re.compile(re.escape(heading) + r"\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--write", type=Path, help="update this markdown file's E2EE section")
    args = parser.parse_args(argv)
    section = report(args.quick)
    print(section)
    if args.write:
        write_section(args.write, section)


if __name__ == "__main__":
    main()
