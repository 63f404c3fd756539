"""Identities, bundles and PQXDH: validation, one-time pre-key consumption, replay."""

from __future__ import annotations

import contextlib
import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shtalk.crypto import (
    BadBundle,
    BadBundleKey,
    BadBundleSignature,
    BadBundleVersion,
    BadKey,
    BadSignature,
    CryptoError,
    DecryptError,
    DeviceIdentity,
    IdentityKey,
    MalformedBundle,
    PreKeyBundle,
    ReplayError,
    Session,
    UnknownPreKey,
    UnsupportedVersion,
    accept,
)
from shtalk.crypto import primitives as P
from shtalk.crypto.identity import KEM_LAST_RESORT, KemPreKey, OneTimePreKey, SignedPreKey
from shtalk.crypto.pqxdh import InitialMessage, initiate, respond
from shtalk.test.crypto.test_crypto_support import fetched_bundle, identity

_P = 2**255 - 19


class BundleValidation(SynchronousTestCase):
    def setUp(self) -> None:
        self.bob = identity(opks=2, kem_opks=2)
        self.bundle = self.bob.public_bundle()

    def _refused(self, bundle: PreKeyBundle, error: type[Exception]) -> None:
        exc = self.assertRaises(error, PreKeyBundle.from_bytes, bundle.to_bytes())
        self.assertIsInstance(exc, BadBundle)

    def test_round_trip(self) -> None:
        data = self.bundle.to_bytes()
        again = PreKeyBundle.from_bytes(data)
        self.assertEqual(again, self.bundle)
        self.assertEqual(again.to_bytes(), data)
        one = PreKeyBundle.from_bytes(self.bundle.select(None, None).to_bytes())
        self.assertEqual((one.one_time_prekeys, one.kem_one_time_prekeys), ((), ()))

    def test_bad_signatures(self) -> None:
        spk = self.bundle.signed_prekey
        bad_spk = dataclasses.replace(spk, key_id=spk.key_id + 1)  # signature no longer covers it
        self._refused(dataclasses.replace(self.bundle, signed_prekey=bad_spk), BadBundleSignature)
        kem = self.bundle.kem_last_resort
        bad_kem = dataclasses.replace(kem, signature=self.bundle.signed_prekey.signature)
        self._refused(dataclasses.replace(self.bundle, kem_last_resort=bad_kem), BadBundleSignature)
        other = identity(0, 0).identity_key
        self._refused(dataclasses.replace(self.bundle, identity=other), BadBundleSignature)
        ident = dataclasses.replace(self.bundle.identity, dh_signature=bytes(64))
        self._refused(dataclasses.replace(self.bundle, identity=ident), BadBundleSignature)
        self.assertTrue(issubclass(BadBundleSignature, BadSignature))

    def _spk_with(self, public: bytes) -> SignedPreKey:
        spk = SignedPreKey(7, public, b"")
        return SignedPreKey(7, public, self.bob.sign(spk.signed_data()))

    def test_bad_x25519_keys(self) -> None:
        for public in (
            bytes(32),  # all zero
            (1).to_bytes(32, "little"),  # low order
            (_P - 1).to_bytes(32, "little"),
            b"\xff" * 32,  # not canonical
            self.bundle.signed_prekey.public[:31],  # wrong length
            self.bundle.signed_prekey.public + b"\x00",
        ):
            bundle = dataclasses.replace(self.bundle, signed_prekey=self._spk_with(public))
            self._refused(bundle, BadBundleKey)
            opks = (OneTimePreKey(99, public),)
            self._refused(dataclasses.replace(self.bundle, one_time_prekeys=opks), BadBundleKey)
        self.assertTrue(issubclass(BadBundleKey, BadKey))

    def test_bad_identity_and_kem_keys(self) -> None:
        ident = dataclasses.replace(self.bundle.identity, signing_public=b"\x02" + b"\xff" * 32)
        self._refused(dataclasses.replace(self.bundle, identity=ident), BadBundleKey)
        kem = self.bundle.kem_last_resort
        short = KemPreKey(KEM_LAST_RESORT, kem.key_id, kem.public[:-1], b"")
        short = dataclasses.replace(short, signature=self.bob.sign(short.signed_data()))
        self._refused(dataclasses.replace(self.bundle, kem_last_resort=short), BadBundleKey)

    def test_unknown_versions(self) -> None:
        data = self.bundle.to_bytes()
        self.assertRaises(BadBundleVersion, PreKeyBundle.from_bytes, b"\x02" + data[1:])
        self.assertRaises(BadBundleVersion, PreKeyBundle.from_bytes, b"\x00" + data[1:])
        # the identity's own version byte sits after the u8 version and u16 length
        inner = bytearray(data)
        inner[3] = 9
        self.assertRaises(BadBundleVersion, PreKeyBundle.from_bytes, bytes(inner))
        self.assertTrue(issubclass(BadBundleVersion, UnsupportedVersion))

    def test_truncated_and_trailing(self) -> None:
        data = self.bundle.to_bytes()
        for cut in (0, 1, 5, 100, len(data) - 1):
            self.assertRaises(MalformedBundle, PreKeyBundle.from_bytes, data[:cut])
        self.assertRaises(MalformedBundle, PreKeyBundle.from_bytes, data + b"\x00")
        self.assertRaises(MalformedBundle, PreKeyBundle.from_bytes, "text")  # type: ignore[arg-type]

    def test_from_parts(self) -> None:
        full = self.bundle
        opk, kpk = full.one_time_prekeys[0], full.kem_one_time_prekeys[0]
        got = PreKeyBundle.from_parts(full.base().to_bytes(), opk.to_bytes(), kpk.to_bytes())
        self.assertEqual(got, full.select(opk.key_id, kpk.key_id))
        self.assertEqual(PreKeyBundle.from_parts(full.base().to_bytes()), full.base())
        bad = dataclasses.replace(kpk, key_id=kpk.key_id + 1000)
        self.assertRaises(
            BadBundleSignature, PreKeyBundle.from_parts, full.base().to_bytes(), None,
            bad.to_bytes(),
        )
        last = full.kem_last_resort.to_bytes()
        self.assertRaises(MalformedBundle, PreKeyBundle.from_parts, full.base().to_bytes(),
                          None, last)
        low = OneTimePreKey(5, bytes(32)).to_bytes()
        self.assertRaises(BadBundleKey, PreKeyBundle.from_parts, full.base().to_bytes(), low)

    @settings(max_examples=60, deadline=None)
    @given(st.data())
    def test_mutations_only_raise_bad_bundle(self, data: st.DataObject) -> None:
        blob = bytearray(self.bundle.select(None, None).to_bytes())
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != blob[pos]))
        if data.draw(st.booleans()):
            blob = blob[: data.draw(st.integers(0, len(blob)))]
        with contextlib.suppress(BadBundle):
            PreKeyBundle.from_bytes(bytes(blob))


class IdentityState(SynchronousTestCase):
    def test_serialisation_round_trip(self) -> None:
        ident = identity(opks=4, kem_opks=2)
        ident.rotate_prekeys(1_700_000_000)
        ident.published(1_700_000_100)
        ident.remember_initial(ident.signed_prekey[0], bytes(range(32)))
        blob = ident.to_bytes()
        again = DeviceIdentity.from_bytes(blob)
        self.assertEqual(again.to_bytes(), blob)
        self.assertEqual(again.identity_key, ident.identity_key)
        self.assertEqual(again.public_bundle(), ident.public_bundle())
        for cut in (0, 10, len(blob) - 1):
            self.assertRaises(CryptoError, DeviceIdentity.from_bytes, blob[:cut])
        self.assertRaises(UnsupportedVersion, DeviceIdentity.from_bytes, b"\x07" + blob[1:])
        self.assertEqual(
            (again.prekeys_created, again.previous_retired), (1_700_000_000, 1_700_000_100)
        )
        self.assertEqual(again.previous_kem_last_resort, ident.previous_kem_last_resort)
        self.assertEqual(again.seen_initials, ident.seen_initials)

    def test_version_1_state_still_loads(self) -> None:
        """A store written before rotation existed: same keys, times unknown (so due)."""
        ident = identity(opks=2, kem_opks=1)
        ident.remember_initial(ident.signed_prekey[0], bytes(32))
        again = DeviceIdentity.from_bytes(_version_1_bytes(ident))
        self.assertEqual(again.public_bundle(), ident.public_bundle())
        self.assertEqual(again.seen_initials, ident.seen_initials)
        self.assertEqual((again.prekeys_created, again.previous_retired), (0, 0))
        self.assertIsNone(again.previous_kem_last_resort)

    def test_generate_and_remove_one_time_prekeys(self) -> None:
        ident = identity(opks=2, kem_opks=1)
        new = ident.generate_one_time_prekeys(3)
        kem = ident.generate_kem_one_time_prekeys(2)
        self.assertEqual(len(ident.public_bundle().one_time_prekeys), 5)
        self.assertEqual(len(ident.public_bundle().kem_one_time_prekeys), 3)
        ident.remove_one_time_prekeys([new[0].key_id, kem[0].key_id])
        self.assertEqual(len(ident.public_bundle().one_time_prekeys), 4)
        self.assertEqual(len(ident.public_bundle().kem_one_time_prekeys), 2)
        ids = [k.key_id for k in ident.public_bundle().one_time_prekeys]
        self.assertEqual(len(set(ids)), len(ids))

    def test_identity_key_bytes(self) -> None:
        key = identity(0, 0).identity_key
        self.assertEqual(IdentityKey.from_bytes(key.to_bytes()), key)
        self.assertRaises(CryptoError, IdentityKey.from_bytes, key.to_bytes()[:-1])


class PQXDH(SynchronousTestCase):
    def test_both_sides_agree(self) -> None:
        alice, bob = identity(), identity()
        for bundle in (fetched_bundle(bob), bob.public_bundle().select(None, None)):
            keys, msg = initiate(alice, bundle)
            msg = InitialMessage.from_bytes(msg.to_bytes())
            theirs, _ = respond(bob, msg)
            self.assertEqual(keys, theirs)
            self.assertEqual(keys.ad, alice.identity_key.encode() + bob.identity_key.encode())

    def test_kem_choice(self) -> None:
        alice, bob = identity(), identity(opks=1, kem_opks=1)
        _, msg = initiate(alice, fetched_bundle(bob))
        self.assertIn(msg.kem_prekey_id, bob.kem_one_time_prekeys)
        _, msg = initiate(alice, bob.public_bundle().select(None, None))
        self.assertEqual(msg.kem_prekey_id, bob.kem_last_resort[0])
        self.assertIsNone(msg.one_time_prekey_id)

    def test_one_time_prekey_consumed_once(self) -> None:
        alice, carol, bob = identity(), identity(), identity(opks=1, kem_opks=1)
        bundle = fetched_bundle(bob)
        s1 = Session.initiate(alice, bundle)
        s2 = Session.initiate(carol, bundle)  # a second initiator names the same keys
        _, h1, c1 = s1.encrypt(b"first")
        _, h2, c2 = s2.encrypt(b"second")
        _, plaintext = accept(bob, h1, c1)
        self.assertEqual(plaintext, b"first")
        self.assertEqual(bob.one_time_prekeys, {})
        self.assertEqual(bob.kem_one_time_prekeys, {})
        before = bob.to_bytes()
        self.assertRaises(UnknownPreKey, accept, bob, h2, c2)
        self.assertRaises(ReplayError, accept, bob, h1, c1)
        self.assertEqual(bob.to_bytes(), before)

    def test_replay_without_one_time_prekey_refused(self) -> None:
        alice, bob = identity(), identity(opks=0, kem_opks=0)
        session = Session.initiate(alice, bob.public_bundle())
        _, header, ciphertext = session.encrypt(b"x")
        accept(bob, header, ciphertext)
        self.assertRaises(ReplayError, accept, bob, header, ciphertext)

    def test_failed_accept_changes_nothing(self) -> None:
        alice, bob = identity(), identity(opks=1, kem_opks=1)
        session = Session.initiate(alice, fetched_bundle(bob))
        _, header, ciphertext = session.encrypt(b"x")
        before = bob.to_bytes()
        bad = bytearray(ciphertext)
        bad[0] ^= 1
        self.assertRaises(DecryptError, accept, bob, header, bytes(bad))
        bad_header = bytearray(header)
        bad_header[-1] ^= 1
        self.assertRaises(CryptoError, accept, bob, bytes(bad_header), ciphertext)
        self.assertEqual(bob.to_bytes(), before)
        _, plaintext = accept(bob, header, ciphertext)
        self.assertEqual(plaintext, b"x")

    def test_wrong_responder_or_tampered_kem(self) -> None:
        alice, bob, eve = identity(), identity(), identity()
        session = Session.initiate(alice, fetched_bundle(bob))
        _, header, ciphertext = session.encrypt(b"x")
        self.assertRaises(CryptoError, accept, eve, header, ciphertext)
        keys, msg = initiate(alice, fetched_bundle(bob))
        ct = bytearray(msg.kem_ciphertext)
        ct[5] ^= 1  # ML-KEM's implicit rejection: a different secret, so a different SK
        tampered = dataclasses.replace(msg, kem_ciphertext=bytes(ct))
        self.assertNotEqual(respond(bob, tampered)[0].root_key, keys.root_key)

    def test_previous_prekeys_accepted_until_the_grace_period_ends(self) -> None:
        alice, bob = identity(), identity(opks=0, kem_opks=0)
        old = bob.public_bundle().base()  # last-resort keys only: both old ones are used
        early = Session.initiate(alice, old)
        bob.rotate_prekeys(now=1000)
        self.assertNotEqual(bob.public_bundle().signed_prekey, old.signed_prekey)
        self.assertNotEqual(bob.public_bundle().kem_last_resort, old.kem_last_resort)
        _, header, ciphertext = early.encrypt(b"in flight")
        self.assertEqual(accept(bob, header, ciphertext)[1], b"in flight")
        # The replay list outlives the rotation (no second copy during the grace period).
        self.assertRaises(ReplayError, accept, bob, header, ciphertext)
        # Not published yet: the old pair stays however long that takes.
        self.assertFalse(bob.expire_previous(10**9, grace=60))
        self.assertTrue(bob.published(2000))
        self.assertFalse(bob.published(3000))  # the grace period starts once
        self.assertFalse(bob.expire_previous(2059, grace=60))
        _, header, ciphertext = Session.initiate(alice, old).encrypt(b"still in time")
        self.assertEqual(accept(bob, header, ciphertext)[1], b"still in time")
        self.assertTrue(bob.expire_previous(2060, grace=60))
        self.assertIsNone(bob.previous_signed_prekey)
        self.assertIsNone(bob.previous_kem_last_resort)
        self.assertEqual([e[0] for e in bob.seen_initials], [])  # all named the old key
        before = bob.to_bytes()
        _, header, ciphertext = Session.initiate(alice, old).encrypt(b"too late")
        self.assertRaises(UnknownPreKey, accept, bob, header, ciphertext)
        self.assertEqual(bob.to_bytes(), before)
        # A KEM key that was rotated away is refused on its own, too.
        mixed = dataclasses.replace(bob.public_bundle().base(), kem_last_resort=old.kem_last_resort)
        _, header, ciphertext = Session.initiate(alice, mixed).encrypt(b"old KEM key")
        self.assertRaises(UnknownPreKey, accept, bob, header, ciphertext)
        self.assertEqual(bob.to_bytes(), before)
        _, header, ciphertext = Session.initiate(alice, bob.public_bundle()).encrypt(b"new")
        self.assertEqual(accept(bob, header, ciphertext)[1], b"new")

    def test_initial_message_decoding(self) -> None:
        alice, bob = identity(), identity()
        _, msg = initiate(alice, fetched_bundle(bob))
        data = msg.to_bytes()
        self.assertEqual(InitialMessage.from_bytes(data), msg)
        for cut in (0, 1, 50, len(data) - 1):
            self.assertRaises(CryptoError, InitialMessage.from_bytes, data[:cut])
        self.assertRaises(UnsupportedVersion, InitialMessage.from_bytes, b"\x05" + data[1:])
        low = dataclasses.replace(msg, ephemeral=bytes(32))
        self.assertRaises(BadKey, InitialMessage.from_bytes, low.to_bytes())
        self.assertEqual(len(P.x25519_public_bytes(P.x25519_generate())), 32)


def _version_1_bytes(ident: DeviceIdentity) -> bytes:
    """``DeviceIdentity.to_bytes`` as it was before version 2 (no previous last-resort
    key, no times, bare digests): what stores made by earlier clients hold."""
    from shtalk.crypto.encoding import Writer

    w = Writer().u8(1)
    w.fixed(P.signing_private_bytes(ident.signing_key), 32)
    w.fixed(P.x25519_private_bytes(ident.dh_key), 32)
    for spk in (ident.signed_prekey, ident.previous_signed_prekey):
        w.u8(spk is not None)
        if spk is not None:
            w.u32(spk[0]).fixed(spk[1], 32).fixed(spk[2], P.SIG_LEN)
    kid, seed, sig = ident.kem_last_resort
    w.u32(kid).fixed(seed, P.KEM_SEED_LEN).fixed(sig, P.SIG_LEN)
    w.u32(len(ident.one_time_prekeys))
    for kid, (priv, pub) in ident.one_time_prekeys.items():
        w.u32(kid).fixed(priv, 32).fixed(pub, 32)
    w.u32(len(ident.kem_one_time_prekeys))
    for kid, (seed, sig) in ident.kem_one_time_prekeys.items():
        w.u32(kid).fixed(seed, P.KEM_SEED_LEN).fixed(sig, P.SIG_LEN)
    w.u32(ident.next_id).u32(len(ident.seen_initials))
    for _, digest in ident.seen_initials:
        w.fixed(digest, 32)
    return w.getvalue()
