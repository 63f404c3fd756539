"""Device identities, pre-keys and the published pre-key bundle.

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

Public parts:

* :class:`IdentityKey` -- what a peer pins (TOFU) and what safety numbers cover;
* :class:`SignedPreKey`, :class:`OneTimePreKey`, :class:`KemPreKey` -- each has its
  own versioned encoding, so a directory can store and hand them out separately;
* :class:`PreKeyBundle` -- identity + signed pre-key + last-resort KEM pre-key +
  any number of one-time X25519 and ML-KEM pre-keys.  :meth:`PreKeyBundle.from_bytes`
  checks every signature and key and raises a :class:`~shtalk.crypto.errors.BadBundle`
  subclass on the first problem.

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
from .encoding import Reader, Writer
from .errors import (
    BadBundleKey,
    BadBundleSignature,
    BadBundleVersion,
    BadKey,
    BadSignature,
    DecodeError,
    MalformedBundle,
    UnsupportedVersion,
)

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
KEM_LAST_RESORT = 1
KEM_ONE_TIME = 2
_MAX_KEY = 4096  # bytes in any one public key or signature field
_MAX_LIST = 1000  # one-time pre-keys per bundle
_MAX_SEEN = 1000  # remembered initial messages (replay of no-one-time-pre-key sessions)

_LABEL_IDENTITY = b"shtalk/v1 identity-dh\x00"
_LABEL_SPK = b"shtalk/v1 signed-prekey\x00"
_LABEL_KEM = b"shtalk/v1 kem-prekey\x00"


@dataclass(frozen=True)
class IdentityKey:
    """A device's public identity: signing key, DH key, and the signature binding them."""

    signing_public: bytes
    dh_public: bytes
    dh_signature: bytes

    @classmethod
    def from_private(
        cls, signing: ec.EllipticCurvePrivateKey, dh_key: x25519.X25519PrivateKey
    ) -> IdentityKey:
        dh_public = P.x25519_public_bytes(dh_key)
        return cls(
            P.signing_public_bytes(signing), dh_public, P.sign(signing, _LABEL_IDENTITY + dh_public)
        )

    @cached_property
    def verifier(self) -> ec.EllipticCurvePublicKey:
        return P.load_signing_public(self.signing_public)

    def verify(self, signature: bytes, data: bytes) -> None:
        """Raise :class:`BadSignature` unless ``signature`` is ours over ``data``."""
        P.verify(self.verifier, signature, data)

    def check(self) -> None:
        """Validate both keys and the DH key's signature."""
        P.check_x25519_public(self.dh_public)
        self.verify(self.dh_signature, _LABEL_IDENTITY + self.dh_public)

    def encode(self) -> bytes:
        """``Encode(IK)`` for the PQXDH associated data: 0x01 || signing (33) || DH (32)."""
        return b"\x01" + self.signing_public + self.dh_public

    def to_bytes(self) -> bytes:
        w = Writer().u8(VERSION)
        w.short(self.signing_public).short(self.dh_public)
        return w.short(self.dh_signature).getvalue()

    @classmethod
    def read(cls, r: Reader) -> IdentityKey:
        r.version(VERSION)
        key = cls(r.short(_MAX_KEY), r.short(_MAX_KEY), r.short(_MAX_KEY))
        key.check()
        return key

    @classmethod
    def from_bytes(cls, data: bytes) -> IdentityKey:
        """Parse and check; raises a :class:`CryptoError` subclass."""
        r = Reader(data, "identity key")
        key = cls.read(r)
        r.done()
        return key


@dataclass(frozen=True)
class SignedPreKey:
    key_id: int
    public: bytes
    signature: bytes

    def signed_data(self) -> bytes:
        return _LABEL_SPK + self.key_id.to_bytes(4, "big") + self.public

    def to_bytes(self) -> bytes:
        w = Writer().u8(VERSION).u32(self.key_id).short(self.public)
        return w.short(self.signature).getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, identity: IdentityKey) -> SignedPreKey:
        r = Reader(data, "signed pre-key")
        r.version(VERSION)
        spk = cls(r.u32(), r.short(_MAX_KEY), r.short(_MAX_KEY))
        r.done()
        P.check_x25519_public(spk.public)
        identity.verify(spk.signature, spk.signed_data())
        return spk


@dataclass(frozen=True)
class OneTimePreKey:
    key_id: int
    public: bytes

    def to_bytes(self) -> bytes:
        return Writer().u8(VERSION).u32(self.key_id).short(self.public).getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> OneTimePreKey:
        r = Reader(data, "one-time pre-key")
        r.version(VERSION)
        opk = cls(r.u32(), r.short(_MAX_KEY))
        r.done()
        P.check_x25519_public(opk.public)
        return opk


@dataclass(frozen=True)
class KemPreKey:
    """A signed ML-KEM-768 pre-key; ``kind`` is last-resort (1) or one-time (2)."""

    kind: int
    key_id: int
    public: bytes
    signature: bytes

    def signed_data(self) -> bytes:
        return _LABEL_KEM + bytes((self.kind,)) + self.key_id.to_bytes(4, "big") + self.public

    def to_bytes(self) -> bytes:
        w = Writer().u8(VERSION).u8(self.kind).u32(self.key_id)
        w.short(self.public).short(self.signature)
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, identity: IdentityKey) -> KemPreKey:
        r = Reader(data, "ML-KEM pre-key")
        r.version(VERSION)
        kind = r.u8()
        if kind not in (KEM_LAST_RESORT, KEM_ONE_TIME):
            raise UnsupportedVersion("ML-KEM pre-key: unknown kind")
        kpk = cls(kind, r.u32(), r.short(_MAX_KEY), r.short(_MAX_KEY))
        r.done()
        P.kem_public_from_bytes(kpk.public)
        identity.verify(kpk.signature, kpk.signed_data())
        return kpk


@dataclass(frozen=True)
class PreKeyBundle:
    """What a device publishes, or the subset a directory hands to one initiator."""

    identity: IdentityKey
    signed_prekey: SignedPreKey
    kem_last_resort: KemPreKey
    one_time_prekeys: tuple[OneTimePreKey, ...] = ()
    kem_one_time_prekeys: tuple[KemPreKey, ...] = ()

    def to_bytes(self) -> bytes:
        w = Writer().u8(VERSION).short(self.identity.to_bytes())
        w.short(self.signed_prekey.to_bytes()).short(self.kem_last_resort.to_bytes())
        w.u16(len(self.one_time_prekeys))
        for opk in self.one_time_prekeys:
            w.short(opk.to_bytes())
        w.u16(len(self.kem_one_time_prekeys))
        for kpk in self.kem_one_time_prekeys:
            w.short(kpk.to_bytes())
        return w.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PreKeyBundle:
        """Parse and verify everything; raises a :class:`BadBundle` subclass."""
        try:
            return cls._parse(data)
        except BadSignature as exc:
            raise BadBundleSignature(str(exc)) from None
        except BadKey as exc:
            raise BadBundleKey(str(exc)) from None
        except UnsupportedVersion as exc:
            raise BadBundleVersion(str(exc)) from None
        except DecodeError as exc:
            raise MalformedBundle(str(exc)) from None

    @classmethod
    def _parse(cls, data: bytes) -> PreKeyBundle:
        r = Reader(data, "pre-key bundle")
        r.version(VERSION)
        identity = IdentityKey.from_bytes(r.short())
        spk = SignedPreKey.from_bytes(r.short(), identity)
        last = KemPreKey.from_bytes(r.short(), identity)
        if last.kind != KEM_LAST_RESORT:
            raise DecodeError("pre-key bundle: last-resort ML-KEM pre-key has the wrong kind")
        count = r.u16()
        if count > _MAX_LIST:
            raise DecodeError("pre-key bundle: too many one-time pre-keys")
        opks = tuple(OneTimePreKey.from_bytes(r.short()) for _ in range(count))
        count = r.u16()
        if count > _MAX_LIST:
            raise DecodeError("pre-key bundle: too many ML-KEM pre-keys")
        kpks = tuple(KemPreKey.from_bytes(r.short(), identity) for _ in range(count))
        r.done()
        if any(k.kind != KEM_ONE_TIME for k in kpks):
            raise DecodeError("pre-key bundle: one-time ML-KEM pre-key has the wrong kind")
        return cls(identity, spk, last, opks, kpks)

    @classmethod
    def from_parts(
        cls, bundle: bytes, one_time: bytes | None = None, kem_one_time: bytes | None = None
    ) -> PreKeyBundle:
        """Assemble what the directory's ``keys_fetch`` returns: the base bundle plus at
        most one :class:`OneTimePreKey` and one one-time :class:`KemPreKey` (their
        ``to_bytes()``).  Everything is verified; raises a :class:`BadBundle` subclass."""
        base = cls.from_bytes(bundle)
        try:
            opks = (OneTimePreKey.from_bytes(one_time),) if one_time else ()
            kpks = (KemPreKey.from_bytes(kem_one_time, base.identity),) if kem_one_time else ()
            if any(k.kind != KEM_ONE_TIME for k in kpks):
                raise DecodeError("one-time ML-KEM pre-key has the wrong kind")
        except BadSignature as exc:
            raise BadBundleSignature(str(exc)) from None
        except BadKey as exc:
            raise BadBundleKey(str(exc)) from None
        except UnsupportedVersion as exc:
            raise BadBundleVersion(str(exc)) from None
        except DecodeError as exc:
            raise MalformedBundle(str(exc)) from None
        return cls(base.identity, base.signed_prekey, base.kem_last_resort, opks, kpks)

    def base(self) -> PreKeyBundle:
        """The bundle without one-time pre-keys (the directory's ``bundle`` field)."""
        return self.select(None, None)

    def select(
        self, one_time_id: int | None = None, kem_one_time_id: int | None = None
    ) -> PreKeyBundle:
        """The bundle one initiator gets: at most one of each one-time pre-key."""
        opks = tuple(k for k in self.one_time_prekeys if k.key_id == one_time_id)
        kpks = tuple(k for k in self.kem_one_time_prekeys if k.key_id == kem_one_time_id)
        return PreKeyBundle(self.identity, self.signed_prekey, self.kem_last_resort, opks, kpks)


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
