"""A device's private identity: its keys, its pre-keys, and their rotation.

A device owns (see docs/PROTOCOL-E2EE.md for the byte layouts):

* an ECDSA P-256 **signing key** (signs envelopes, pre-keys and its DH key);
* an X25519 **identity DH key**, signed by the signing key;
* a **signed pre-key** (X25519) with an id, and the previous one for a grace period;
* a batch of X25519 **one-time pre-keys** with ids (unsigned, as in Signal);
* a signed ML-KEM-768 **last-resort pre-key** (and the previous one, like the signed
  pre-key) and signed **one-time ML-KEM pre-keys**.

The signed pre-key and the last-resort ML-KEM pre-key are replaced together
(:meth:`DeviceIdentity.rotate_prekeys`); the previous pair stays usable until
:meth:`DeviceIdentity.expire_previous` drops it a grace period after the new pair was
published (:meth:`DeviceIdentity.published`).  Times are plain Unix seconds passed in by
the caller; the schedule itself is the client's (``shtalk.client.rotation``).

The public parts (:class:`IdentityKey`, the pre-keys and :class:`PreKeyBundle`) are
in :mod:`shtalk.crypto.bundle`; they are imported here too, for callers that name
them from this module.

Private part: :class:`DeviceIdentity`, serialised with :meth:`DeviceIdentity.to_bytes`.
It changes when one-time pre-keys are consumed (by :func:`shtalk.crypto.session.accept`),
generated or removed, or when pre-keys rotate: persist it after each of those.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from cryptography.hazmat.primitives.asymmetric import ec, x25519

from . import primitives as P
from .bundle import (
    KEM_LAST_RESORT,
    KEM_ONE_TIME,
    IdentityKey,
    KemPreKey,
    OneTimePreKey,
    PreKeyBundle,
    SignedPreKey,
)
from .encoding import Reader, Writer
from .errors import DecodeError

__all__ = [
    "KEM_LAST_RESORT",
    "KEM_ONE_TIME",
    "DeviceIdentity",
    "IdentityKey",
    "KemPreKey",
    "OneTimePreKey",
    "PreKeyBundle",
    "SignedPreKey",
]

VERSION = 1
#: DeviceIdentity.to_bytes: 2 adds the previous last-resort key, the pre-keys' times and
#: the signed pre-key id of each remembered initial message (1 is still read).
STATE_VERSION = 2
_MAX_SEEN = 1000  # remembered initial messages (replay of no-one-time-pre-key sessions)


PrivatePreKey = tuple[int, bytes, bytes]  # (id, X25519 private raw or ML-KEM seed, signature)


@dataclass
class DeviceIdentity:
    """The private key material of one device.  Mutable; serialise after changes."""

    signing_key: ec.EllipticCurvePrivateKey
    dh_key: x25519.X25519PrivateKey
    signed_prekey: PrivatePreKey  # (id, private raw, signature)
    previous_signed_prekey: PrivatePreKey | None
    kem_last_resort: PrivatePreKey  # (id, seed, signature)
    #: id -> (private raw, public raw)
    one_time_prekeys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    #: id -> (seed, signature)
    kem_one_time_prekeys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)
    next_id: int = 1
    #: (signed pre-key id, SHA-256 of the initial message) of accepted initial messages
    seen_initials: list[tuple[int, bytes]] = field(default_factory=list)
    previous_kem_last_resort: PrivatePreKey | None = None
    #: when the current signed and last-resort pre-keys were made (0: unknown, so due)
    prekeys_created: int = 0
    #: when the current pair was first published, i.e. since when initiators can no
    #: longer fetch the previous pair (0: not yet: the previous pair stays)
    previous_retired: int = 0

    # ------------------------------------------------------------ creation

    @classmethod
    def generate(
        cls, one_time_prekeys: int = 100, kem_one_time_prekeys: int = 10, now: int = 0
    ) -> DeviceIdentity:
        """A new device: identity keys, pre-keys and the requested one-time pre-keys
        (``now``: Unix seconds, when its signed pre-keys are born)."""
        signing = P.signing_generate()
        ident = cls(signing, P.x25519_generate(), (0, b"", b""), None, (0, b"", b""))
        ident.signed_prekey = ident._new_signed_prekey()
        ident.kem_last_resort = ident._new_kem(KEM_LAST_RESORT)
        ident.prekeys_created = now
        ident.generate_one_time_prekeys(one_time_prekeys)
        ident.generate_kem_one_time_prekeys(kem_one_time_prekeys)
        return ident

    def _take_id(self) -> int:
        key_id = self.next_id
        self.next_id = (self.next_id % 0xFFFFFFFF) + 1
        return key_id

    def _new_signed_prekey(self) -> PrivatePreKey:
        key = P.x25519_generate()
        spk = SignedPreKey(self._take_id(), P.x25519_public_bytes(key), b"")
        signature = P.sign(self.signing_key, spk.signed_data())
        return (spk.key_id, P.x25519_private_bytes(key), signature)

    def _new_kem(self, kind: int) -> PrivatePreKey:
        key = P.kem_generate()
        kpk = KemPreKey(kind, self._take_id(), P.kem_public_bytes(key), b"")
        return (kpk.key_id, P.kem_seed(key), P.sign(self.signing_key, kpk.signed_data()))

    def generate_one_time_prekeys(self, count: int) -> list[OneTimePreKey]:
        """Make ``count`` more X25519 one-time pre-keys; returns their public parts."""
        out = []
        for _ in range(count):
            key = P.x25519_generate()
            key_id, pub = self._take_id(), P.x25519_public_bytes(key)
            self.one_time_prekeys[key_id] = (P.x25519_private_bytes(key), pub)
            out.append(OneTimePreKey(key_id, pub))
        return out

    def generate_kem_one_time_prekeys(self, count: int) -> list[KemPreKey]:
        """Make ``count`` more signed one-time ML-KEM-768 pre-keys."""
        out = []
        for _ in range(count):
            key_id, seed, sig = self._new_kem(KEM_ONE_TIME)
            self.kem_one_time_prekeys[key_id] = (seed, sig)
            out.append(self._kem_public(KEM_ONE_TIME, key_id, seed, sig))
        return out

    def remove_one_time_prekeys(self, ids: Iterable[int]) -> None:
        for key_id in ids:
            self.one_time_prekeys.pop(key_id, None)
            self.kem_one_time_prekeys.pop(key_id, None)

    def rotate_prekeys(self, now: int) -> None:
        """Replace the signed pre-key and the last-resort ML-KEM pre-key (X3DH and PQXDH,
        "Publishing keys": at some interval); the replaced pair stays usable for initial
        messages in flight until :meth:`expire_previous` deletes it.  Publish the new bundle, then
        call :meth:`published`.  A pair still held as previous is dropped here: rotate
        only once :attr:`has_previous` is false (``shtalk.client.rotation`` does)."""
        self._forget_seen(self.previous_signed_prekey)
        self.previous_signed_prekey = self.signed_prekey
        self.previous_kem_last_resort = self.kem_last_resort
        self.signed_prekey = self._new_signed_prekey()
        self.kem_last_resort = self._new_kem(KEM_LAST_RESORT)
        self.prekeys_created = now
        self.previous_retired = 0

    @property
    def has_previous(self) -> bool:
        return self.previous_signed_prekey is not None or self.previous_kem_last_resort is not None

    def published(self, now: int) -> bool:
        """The current pair reached the directory at ``now``: the previous pair's grace
        period starts (once).  True if that changed the state."""
        if not self.has_previous or self.previous_retired:
            return False
        self.previous_retired = max(1, int(now))
        return True

    def expire_previous(self, now: float, grace: float) -> bool:
        """Delete the previous pair once ``grace`` seconds have passed since the current
        pair was published; initial messages naming it are refused from then on
        (:class:`UnknownPreKey`).  True if keys were deleted (persist, then scrub)."""
        if not self.has_previous or not self.previous_retired:
            return False
        if now < self.previous_retired + grace:
            return False
        self._forget_seen(self.previous_signed_prekey)
        self.previous_signed_prekey = None
        self.previous_kem_last_resort = None
        self.previous_retired = 0
        return True

    def _forget_seen(self, spk: PrivatePreKey | None) -> None:
        """Replays of initial messages for a deleted signed pre-key fail without the list."""
        if spk is not None:
            self.seen_initials = [e for e in self.seen_initials if e[0] != spk[0]]

    # --------------------------------------------------------- public parts

    @cached_property
    def identity_key(self) -> IdentityKey:
        return IdentityKey.from_private(self.signing_key, self.dh_key)

    def sign(self, data: bytes) -> bytes:
        return P.sign(self.signing_key, data)

    def public_signed_prekey(self) -> SignedPreKey:
        key_id, priv, sig = self.signed_prekey
        pub = P.x25519_public_bytes(P.x25519_private_from_bytes(priv))
        return SignedPreKey(key_id, pub, sig)

    @staticmethod
    def _kem_public(kind: int, key_id: int, seed: bytes, sig: bytes) -> KemPreKey:
        pub = P.kem_public_bytes(P.kem_private_from_seed(seed))
        return KemPreKey(kind, key_id, pub, sig)

    def public_kem_last_resort(self) -> KemPreKey:
        return self._kem_public(KEM_LAST_RESORT, *self.kem_last_resort)

    def public_bundle(self) -> PreKeyBundle:
        """Everything to upload: identity, pre-keys and all unused one-time pre-keys."""
        return PreKeyBundle(
            self.identity_key,
            self.public_signed_prekey(),
            self.public_kem_last_resort(),
            tuple(OneTimePreKey(i, pub) for i, (_, pub) in self.one_time_prekeys.items()),
            tuple(
                self._kem_public(KEM_ONE_TIME, i, seed, sig)
                for i, (seed, sig) in self.kem_one_time_prekeys.items()
            ),
        )

    # ----------------------------------------------- private-key look-ups

    def signed_prekey_private(self, key_id: int) -> x25519.X25519PrivateKey | None:
        for entry in (self.signed_prekey, self.previous_signed_prekey):
            if entry is not None and entry[0] == key_id:
                return P.x25519_private_from_bytes(entry[1])
        return None

    def kem_prekey_seed(self, key_id: int) -> bytes | None:
        """The seed of a one-time or (current or previous) last-resort ML-KEM pre-key."""
        if key_id in self.kem_one_time_prekeys:
            return self.kem_one_time_prekeys[key_id][0]
        for entry in (self.kem_last_resort, self.previous_kem_last_resort):
            if entry is not None and entry[0] == key_id:
                return entry[1]
        return None

    # ---------------------------------------------------------- persistence

    def to_bytes(self) -> bytes:
        """Private state (secret!): seal it before it touches a disk."""
        w = Writer().u8(STATE_VERSION)
        w.fixed(P.signing_private_bytes(self.signing_key), 32)
        w.fixed(P.x25519_private_bytes(self.dh_key), 32)
        for spk in (self.signed_prekey, self.previous_signed_prekey):
            w.u8(spk is not None)
            if spk is not None:
                w.u32(spk[0]).fixed(spk[1], 32).fixed(spk[2], P.SIG_LEN)
        kid, seed, sig = self.kem_last_resort
        w.u32(kid).fixed(seed, P.KEM_SEED_LEN).fixed(sig, P.SIG_LEN)
        prev = self.previous_kem_last_resort
        w.u8(prev is not None)
        if prev is not None:
            w.u32(prev[0]).fixed(prev[1], P.KEM_SEED_LEN).fixed(prev[2], P.SIG_LEN)
        w.u64(self.prekeys_created).u64(self.previous_retired)
        w.u32(len(self.one_time_prekeys))
        for kid, (priv, pub) in self.one_time_prekeys.items():
            w.u32(kid).fixed(priv, 32).fixed(pub, 32)
        w.u32(len(self.kem_one_time_prekeys))
        for kid, (seed, sig) in self.kem_one_time_prekeys.items():
            w.u32(kid).fixed(seed, P.KEM_SEED_LEN).fixed(sig, P.SIG_LEN)
        w.u32(self.next_id).u32(len(self.seen_initials))
        for spk_id, digest in self.seen_initials:
            w.u32(spk_id).fixed(digest, 32)
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceIdentity:
        """Parse a state of this version or of version 1 (no previous last-resort key,
        no times: the pre-keys count as due for rotation)."""
        r = Reader(data, "device identity")
        version = r.version(VERSION, STATE_VERSION)
        signing = P.signing_private_from_bytes(r.fixed(32))
        dh_key = P.x25519_private_from_bytes(r.fixed(32))
        spks: list[PrivatePreKey | None] = []
        for _ in range(2):
            spks.append((r.u32(), r.fixed(32), r.fixed(P.SIG_LEN)) if r.flag() else None)
        spk = spks[0]
        if spk is None:
            raise DecodeError("device identity: no signed pre-key")
        kem = (r.u32(), r.fixed(P.KEM_SEED_LEN), r.fixed(P.SIG_LEN))
        prev_kem = None
        if version == STATE_VERSION and r.flag():
            prev_kem = (r.u32(), r.fixed(P.KEM_SEED_LEN), r.fixed(P.SIG_LEN))
        created, retired = (r.u64(), r.u64()) if version == STATE_VERSION else (0, 0)
        opks = {}
        for _ in range(_count(r, 100_000)):
            kid = r.u32()
            opks[kid] = (r.fixed(32), r.fixed(32))
        kpks = {}
        for _ in range(_count(r, 100_000)):
            kid = r.u32()
            kpks[kid] = (r.fixed(P.KEM_SEED_LEN), r.fixed(P.SIG_LEN))
        next_id = r.u32()
        # Version 1 did not say which signed pre-key a remembered message used: the
        # current one (so it is kept until that key is gone).
        seen = [
            (r.u32() if version == STATE_VERSION else spk[0], r.fixed(32))
            for _ in range(_count(r, _MAX_SEEN))
        ]
        r.done()
        return cls(
            signing, dh_key, spk, spks[1], kem, opks, kpks, next_id, seen, prev_kem, created,
            retired,
        )

    def has_seen(self, digest: bytes) -> bool:
        return any(d == digest for _, d in self.seen_initials)

    def remember_initial(self, signed_prekey_id: int, digest: bytes) -> None:
        self.seen_initials.append((signed_prekey_id, digest))
        del self.seen_initials[:-_MAX_SEEN]


def _count(r: Reader, limit: int) -> int:
    count = r.u32()
    if count > limit or count > r.remaining:
        raise DecodeError("count out of range")
    return count
