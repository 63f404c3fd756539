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
import sys
import time
from pathlib import Path

from bench.common import write_section
from bench.crypto_batches import (
    Batch,
    add_floors,
    doubleratchet_batches,
    floor_batches,
    interleaved,
    ours_batches,
    room_batches,
    rotation_batches,
    setup_batches,
)

SECTION = "## E2EE core (bench/crypto)"


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--write", type=Path, help="update this markdown file's E2EE section")
    args = parser.parse_args(argv)
    section = report(args.quick)
    print(section)
    if args.write:
        write_section(section, args.write)


if __name__ == "__main__":
    main()
