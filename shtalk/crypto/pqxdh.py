"""PQXDH key agreement (Signal's PQXDH specification, revision 3), sans-IO.

Parameters: curve = X25519, hash = SHA-256, pqkem = ML-KEM-768,
info = ``"shtalk_PQXDH_CURVE25519_SHA-256_ML-KEM-768"``.  Alice (initiator) with
identity ``IK_A``, Bob (responder) with ``IK_B``, signed pre-key ``SPK_B``, optional
one-time pre-key ``OPK_B`` and ML-KEM pre-key ``PQPK_B`` (one-time if the bundle has
one, else the last-resort key)::

    DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)
    DH4 = DH(EK_A, OPK_B)   (only with a one-time pre-key)
    (CT, SS) = ML-KEM-768.Encaps(PQPK_B)
    SK = HKDF-SHA256(salt = 32 zero bytes, IKM = 0xFF*32 || DH1 || DH2 || DH3 [|| DH4] || SS,
                     info, 32 bytes)
    AD = Encode(IK_A) || Encode(IK_B)      Encode(IK) = 0x01 || P-256 key (33) || X25519 key (32)

``IK`` here is the X25519 identity DH key, signed by the device's P-256 signing key
(the specification uses XEdDSA on one key; we keep the two separate because
``cryptography`` has no XEdDSA).  Session keys for the Double Ratchet with
header encryption come from ``HKDF-SHA256(IKM = SK, info = "shtalk/v1 session",
96 bytes)`` = root key || Alice's first header key (HKa) || Bob's first next header
key (NHKb).  Bob's first ratchet key is his signed pre-key, as in Signal.

:func:`initiate` verifies the bundle's signatures (the spec's "Alice verifies");
:func:`respond` looks the named pre-keys up without changing the identity: the
caller (:func:`shtalk.crypto.session.accept`) removes the one-time pre-keys only
once the first message has decrypted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import x25519

from . import primitives as P
from .bundle import IdentityKey, KemPreKey, PreKeyBundle
from .encoding import Reader, Writer, read_whole
from .errors import ReplayError, UnknownPreKey
from .identity import DeviceIdentity

__all__ = ["INFO", "InitialMessage", "SharedKeys", "consume", "derive", "initiate", "respond"]

INFO = b"shtalk_PQXDH_CURVE25519_SHA-256_ML-KEM-768"
_INFO_SESSION = b"shtalk/v1 session"
_F = b"\xff" * 32
VERSION = 1
_NO_OPK = 0  # one-time pre-key ids start at 1


@dataclass(frozen=True)
class SharedKeys:
    """The outcome of PQXDH: Double Ratchet root key, header keys and the AD."""

    root_key: bytes
    hka: bytes
    nhkb: bytes
    ad: bytes


@dataclass(frozen=True)
class InitialMessage:
    """What Alice sends so that Bob can run PQXDH (inside the pre-key header)."""

    identity: IdentityKey
    ephemeral: bytes
    signed_prekey_id: int
    one_time_prekey_id: int | None
    kem_prekey_id: int
    kem_ciphertext: bytes

    def to_bytes(self) -> bytes:
        w = Writer().u8(VERSION).short(self.identity.to_bytes())
        w.fixed(self.ephemeral, P.X25519_LEN).u32(self.signed_prekey_id)
        w.u32(self.one_time_prekey_id or _NO_OPK).u32(self.kem_prekey_id)
        return w.fixed(self.kem_ciphertext, P.KEM_CT_LEN).getvalue()

    @classmethod
    def read(cls, r: Reader) -> InitialMessage:
        r.version(VERSION)
        identity = IdentityKey.from_bytes(r.short(256))
        ephemeral = r.fixed(P.X25519_LEN)
        P.check_x25519_public(ephemeral)
        spk_id, opk_id, kem_id = r.u32(), r.u32(), r.u32()
        return cls(identity, ephemeral, spk_id, opk_id or None, kem_id, r.fixed(P.KEM_CT_LEN))

    @classmethod
    def from_bytes(cls, data: bytes) -> InitialMessage:
        return read_whole(data, "PQXDH initial message", cls.read)

    def digest(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()


def derive(
    dh1: bytes, dh2: bytes, dh3: bytes, dh4: bytes | None, ss: bytes, ad: bytes
) -> SharedKeys:
    """The KDF step, shared by both sides (and by the recorded test vectors)."""
    sk = P.hkdf(_F + dh1 + dh2 + dh3 + (dh4 or b"") + ss, None, INFO, 32)
    out = P.hkdf(sk, None, _INFO_SESSION, 96)
    return SharedKeys(out[:32], out[32:64], out[64:], ad)


def initiate(
    identity: DeviceIdentity,
    bundle: PreKeyBundle,
    *,
    ephemeral: x25519.X25519PrivateKey | None = None,
    kem_result: tuple[bytes, bytes] | None = None,
) -> tuple[SharedKeys, InitialMessage]:
    """Alice's side.  ``ephemeral``/``kem_result`` (ciphertext, secret) are for vectors."""
    remote = bundle.identity
    remote.check()
    spk = bundle.signed_prekey
    P.check_x25519_public(spk.public)
    remote.verify(spk.signature, spk.signed_data())
    kem: KemPreKey = (bundle.kem_one_time_prekeys or (bundle.kem_last_resort,))[0]
    remote.verify(kem.signature, kem.signed_data())
    opk = bundle.one_time_prekeys[0] if bundle.one_time_prekeys else None
    ek = ephemeral or P.x25519_generate()
    if kem_result is None:
        kem_result = P.kem_encapsulate(P.kem_public_from_bytes(kem.public))
    ct, ss = kem_result
    dh1 = P.dh(identity.dh_key, spk.public)
    dh2 = P.dh(ek, remote.dh_public)
    dh3 = P.dh(ek, spk.public)
    dh4 = P.dh(ek, opk.public) if opk is not None else None
    ad = identity.identity_key.encode() + remote.encode()
    keys = derive(dh1, dh2, dh3, dh4, ss, ad)
    msg = InitialMessage(
        identity.identity_key,
        P.x25519_public_bytes(ek),
        spk.key_id,
        opk.key_id if opk is not None else None,
        kem.key_id,
        ct,
    )
    return keys, msg


def respond(
    identity: DeviceIdentity, msg: InitialMessage
) -> tuple[SharedKeys, x25519.X25519PrivateKey]:
    """Bob's side: the shared keys and his signed pre-key (his first ratchet key).

    Raises :class:`UnknownPreKey` for a pre-key id we do not hold (or consumed),
    :class:`ReplayError` for an initial message seen before.  Does not modify
    ``identity``.
    """
    if identity.has_seen(msg.digest()):
        raise ReplayError("initial message already accepted")
    spk = identity.signed_prekey_private(msg.signed_prekey_id)
    if spk is None:
        raise UnknownPreKey("unknown signed pre-key id (replaced and deleted, or never ours)")
    dh4_key = None
    if msg.one_time_prekey_id is not None:
        entry = identity.one_time_prekeys.get(msg.one_time_prekey_id)
        if entry is None:
            raise UnknownPreKey("unknown or already used one-time pre-key id")
        dh4_key = P.x25519_private_from_bytes(entry[0])
    seed = identity.kem_prekey_seed(msg.kem_prekey_id)
    if seed is None:
        raise UnknownPreKey("unknown, already used or deleted ML-KEM pre-key id")
    ss = P.kem_decapsulate(P.kem_private_from_seed(seed), msg.kem_ciphertext)
    dh1 = P.dh(spk, msg.identity.dh_public)
    dh2 = P.dh(identity.dh_key, msg.ephemeral)
    dh3 = P.dh(spk, msg.ephemeral)
    dh4 = P.dh(dh4_key, msg.ephemeral) if dh4_key is not None else None
    ad = msg.identity.encode() + identity.identity_key.encode()
    return derive(dh1, dh2, dh3, dh4, ss, ad), spk


def consume(identity: DeviceIdentity, msg: InitialMessage) -> None:
    """Delete the one-time pre-keys ``msg`` used and remember it against replays."""
    if msg.one_time_prekey_id is not None:
        identity.one_time_prekeys.pop(msg.one_time_prekey_id, None)
    if msg.kem_prekey_id in identity.kem_one_time_prekeys:
        identity.kem_one_time_prekeys.pop(msg.kem_prekey_id)
    identity.remember_initial(msg.signed_prekey_id, msg.digest())

