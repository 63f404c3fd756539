"""The public keys a device publishes: identity key, pre-keys and the pre-key bundle.

Kept apart from the private :class:`~shtalk.crypto.identity.DeviceIdentity` because
these are what a peer or the directory handles: each part has its own versioned
encoding (so a directory can store and hand them out separately), and every parse
checks every key and signature before anything uses it.  See docs/PROTOCOL-E2EE.md
for the byte layouts.

* :class:`IdentityKey` -- what a peer pins (TOFU) and what safety numbers cover;
* :class:`SignedPreKey`, :class:`OneTimePreKey`, :class:`KemPreKey`;
* :class:`PreKeyBundle` -- identity + signed pre-key + last-resort KEM pre-key +
  any number of one-time X25519 and ML-KEM pre-keys.  :meth:`PreKeyBundle.from_bytes`
  raises a :class:`~shtalk.crypto.errors.BadBundle` subclass on the first problem.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

from cryptography.hazmat.primitives.asymmetric import ec, x25519

from . import primitives as P
from .encoding import Reader, Writer, read_whole
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
    "IdentityKey",
    "KemPreKey",
    "OneTimePreKey",
    "PreKeyBundle",
    "SignedPreKey",
]

VERSION = 1
KEM_LAST_RESORT = 1
KEM_ONE_TIME = 2
_MAX_KEY = 4096  # bytes in any one public key or signature field
_MAX_LIST = 1000  # one-time pre-keys per bundle

_LABEL_IDENTITY = b"shtalk/v1 identity-dh\x00"
_LABEL_SPK = b"shtalk/v1 signed-prekey\x00"
_LABEL_KEM = b"shtalk/v1 kem-prekey\x00"


@contextmanager
def _as_bundle_error() -> Iterator[None]:
    """A refused part refuses the bundle: the caller catches one family, and the
    subclass still says why (a bad signature, a bad key, a version, a parse)."""
    try:
        yield
    except BadSignature as exc:
        raise BadBundleSignature(str(exc)) from None
    except BadKey as exc:
        raise BadBundleKey(str(exc)) from None
    except UnsupportedVersion as exc:
        raise BadBundleVersion(str(exc)) from None
    except DecodeError as exc:
        raise MalformedBundle(str(exc)) from None


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
        return read_whole(data, "identity key", cls.read)


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
        with _as_bundle_error():
            return cls._parse(data)

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
        with _as_bundle_error():
            opks = (OneTimePreKey.from_bytes(one_time),) if one_time else ()
            kpks = (KemPreKey.from_bytes(kem_one_time, base.identity),) if kem_one_time else ()
            if any(k.kind != KEM_ONE_TIME for k in kpks):
                raise DecodeError("one-time ML-KEM pre-key has the wrong kind")
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
