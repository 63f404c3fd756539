"""Known answers (RFC 5869, RFC 7748) and cross-checks against independent
implementations: PyCryptodome for AES-GCM, the pure-Python ``ecdsa`` package
for ECDSA P-256 (neither is used at run time)."""

from __future__ import annotations

import contextlib
import hashlib
import os

import ecdsa  # type: ignore[import-untyped]
from Crypto.Cipher import AES  # type: ignore[import-untyped]
from ecdsa.util import sigdecode_string, sigencode_string  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shtalk.crypto import primitives as P
from shtalk.crypto.encoding import Reader, Writer
from shtalk.crypto.errors import BadKey, BadSignature, DecodeError, DecryptError

_N = ecdsa.NIST256p.order
_P = 2**255 - 19


class HKDFKnownAnswers(SynchronousTestCase):
    """RFC 5869 appendix A.1-A.3 through our wrapper."""

    def test_a1(self) -> None:
        okm = P.hkdf(
            bytes.fromhex("0b" * 22),
            bytes.fromhex("000102030405060708090a0b0c"),
            bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
            42,
        )
        self.assertEqual(
            okm.hex(),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
            "34007208d5b887185865",
        )

    def test_a2(self) -> None:
        ikm, salt = bytes(range(0x00, 0x50)), bytes(range(0x60, 0xB0))
        okm = P.hkdf(ikm, salt, bytes(range(0xB0, 0x100)), 82)
        self.assertEqual(
            okm.hex(),
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
            "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
            "cc30c58179ec3e87c14c01d5c1f3434f1d87",
        )

    def test_a3_empty_salt_equals_zero_salt(self) -> None:
        expected = (
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
            "9d201395faa4b61a96c8"
        )
        self.assertEqual(P.hkdf(bytes.fromhex("0b" * 22), b"", b"", 42).hex(), expected)
        # ``salt=None`` is the 32 zero bytes RFC 5869 substitutes for an empty salt.
        self.assertEqual(P.hkdf(bytes.fromhex("0b" * 22), None, b"", 42).hex(), expected)

    def test_hmac_matches_stdlib(self) -> None:
        import hmac

        key, data = os.urandom(32), os.urandom(50)
        self.assertEqual(P.hmac_sha256(key, data), hmac.digest(key, data, "sha256"))


class X25519KnownAnswers(SynchronousTestCase):
    """RFC 7748 section 6.1 through our wrappers."""

    A = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
    A_PUB = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    B = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
    B_PUB = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
    K = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"

    def test_rfc7748_6_1(self) -> None:
        a = P.x25519_private_from_bytes(bytes.fromhex(self.A))
        b = P.x25519_private_from_bytes(bytes.fromhex(self.B))
        self.assertEqual(P.x25519_public_bytes(a).hex(), self.A_PUB)
        self.assertEqual(P.x25519_public_bytes(b).hex(), self.B_PUB)
        self.assertEqual(P.dh(a, bytes.fromhex(self.B_PUB)).hex(), self.K)
        self.assertEqual(P.dh(b, bytes.fromhex(self.A_PUB)).hex(), self.K)

    def test_low_order_and_bad_encodings_refused(self) -> None:
        low = [
            0,
            1,
            _P - 1,
            325606250916557431795983626356110631294008115727848805560023387167927233504,
            39382357235489614581723060781553021112529911719440698176882885853963445705823,
        ]
        bad = [u.to_bytes(32, "little") for u in low]
        bad += [(u + _P).to_bytes(32, "little") for u in (0, 1)]  # non-canonical
        bad += [b"\xff" * 32, bytes(31), bytes(33), b""]
        for data in bad:
            self.assertRaises(BadKey, P.x25519_public_from_bytes, data)
            self.assertRaises(BadKey, P.dh, P.x25519_generate(), data)


class AESGCMCrossCheck(SynchronousTestCase):
    """Our AES-256-GCM outputs equal PyCryptodome's, and its outputs decrypt here."""

    @settings(max_examples=30, deadline=None)
    @given(st.binary(max_size=300), st.binary(max_size=200))
    def test_against_pycryptodome(self, plaintext: bytes, ad: bytes) -> None:
        key, nonce = os.urandom(32), os.urandom(12)
        ours = P.aead_encrypt(key, nonce, plaintext, ad)
        theirs = AES.new(key, AES.MODE_GCM, nonce=nonce, mac_len=16)
        theirs.update(ad)
        ct, tag = theirs.encrypt_and_digest(plaintext)
        self.assertEqual(ours, ct + tag)
        self.assertEqual(P.aead_decrypt(key, nonce, ct + tag, ad), plaintext)
        self.assertEqual(P.Aead(key).encrypt(nonce, plaintext, ad), ours)

    def test_tamper_refused(self) -> None:
        key, nonce = os.urandom(32), os.urandom(12)
        ct = P.aead_encrypt(key, nonce, b"hello", b"ad")
        for i in range(len(ct) * 8):
            flipped = bytearray(ct)
            flipped[i // 8] ^= 1 << (i % 8)
            self.assertRaises(DecryptError, P.aead_decrypt, key, nonce, bytes(flipped), b"ad")
        self.assertRaises(DecryptError, P.aead_decrypt, key, nonce, ct, b"other ad")
        self.assertRaises(DecryptError, P.aead_decrypt, key, nonce, ct[:10], b"ad")
        self.assertRaises(DecryptError, P.Aead(key).decrypt, nonce, ct[:-1], b"ad")


class ECDSACrossCheck(SynchronousTestCase):
    """Signatures checked by the pure-Python ``ecdsa`` package, and the other way round."""

    def _pair(self) -> tuple[object, ecdsa.VerifyingKey]:
        key = P.signing_generate()
        vk = ecdsa.VerifyingKey.from_string(P.signing_public_bytes(key), curve=ecdsa.NIST256p)
        return key, vk

    @settings(max_examples=20, deadline=None)
    @given(st.binary(max_size=200))
    def test_ours_verify_with_ecdsa(self, data: bytes) -> None:
        key = P.signing_generate()
        vk = ecdsa.VerifyingKey.from_string(P.signing_public_bytes(key), curve=ecdsa.NIST256p)
        sig = P.sign(key, data)
        self.assertEqual(len(sig), 64)
        self.assertTrue(vk.verify(sig, data, hashfunc=hashlib.sha256, sigdecode=sigdecode_string))
        self.assertLessEqual(int.from_bytes(sig[32:], "big"), _N // 2)  # low-S

    def test_deterministic_matches_rfc6979(self) -> None:
        """cryptography's RFC 6979 nonce equals the ``ecdsa`` package's (after low-S)."""
        key = P.signing_generate()
        sk = ecdsa.SigningKey.from_string(P.signing_private_bytes(key), curve=ecdsa.NIST256p)
        for data in (b"", b"abc", os.urandom(100)):
            theirs = sk.sign_deterministic(
                data, hashfunc=hashlib.sha256, sigencode=sigencode_string
            )
            r, s = int.from_bytes(theirs[:32], "big"), int.from_bytes(theirs[32:], "big")
            s = min(s, _N - s)
            self.assertEqual(P.sign(key, data), r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def test_ecdsa_signatures_verify_here_and_high_s_is_refused(self) -> None:
        key = P.signing_generate()
        sk = ecdsa.SigningKey.from_string(P.signing_private_bytes(key), curve=ecdsa.NIST256p)
        pub = P.load_signing_public(P.signing_public_bytes(key))
        for _ in range(10):
            data = os.urandom(40)
            sig = sk.sign(data, hashfunc=hashlib.sha256, sigencode=sigencode_string)
            r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            low, high = min(s, _N - s), max(s, _N - s)
            P.verify(pub, r.to_bytes(32, "big") + low.to_bytes(32, "big"), data)
            # The malleated twin (r, n - s) is valid ECDSA but not canonical: refused.
            self.assertRaises(
                BadSignature, P.verify, pub, r.to_bytes(32, "big") + high.to_bytes(32, "big"), data
            )

    def test_bad_signatures(self) -> None:
        key = P.signing_generate()
        pub = P.load_signing_public(P.signing_public_bytes(key))
        sig = P.sign(key, b"data")
        self.assertRaises(BadSignature, P.verify, pub, sig, b"date")
        self.assertRaises(BadSignature, P.verify, pub, sig[:-1], b"data")
        self.assertRaises(BadSignature, P.verify, pub, bytes(64), b"data")
        self.assertRaises(BadSignature, P.verify, pub, b"\xff" * 64, b"data")

    def test_public_key_checks(self) -> None:
        self.assertRaises(BadKey, P.load_signing_public, b"\x02" + bytes(31))
        self.assertRaises(BadKey, P.load_signing_public, b"\x04" + bytes(32))
        self.assertRaises(BadKey, P.load_signing_public, b"\x02" + b"\xff" * 32)  # x >= p
        self.assertRaises(BadKey, P.signing_private_from_bytes, bytes(32))

    def test_private_round_trip(self) -> None:
        key = P.signing_generate()
        again = P.signing_private_from_bytes(P.signing_private_bytes(key))
        self.assertEqual(P.signing_public_bytes(key), P.signing_public_bytes(again))


class KEMTests(SynchronousTestCase):
    def test_round_trip_and_checks(self) -> None:
        key = P.kem_generate()
        again = P.kem_private_from_seed(P.kem_seed(key))
        pub = P.kem_public_from_bytes(P.kem_public_bytes(key))
        ct, ss = P.kem_encapsulate(pub)
        self.assertEqual((len(ct), len(ss)), (P.KEM_CT_LEN, 32))
        self.assertEqual(P.kem_decapsulate(again, ct), ss)
        self.assertRaises(BadKey, P.kem_public_from_bytes, P.kem_public_bytes(key)[:-1])
        self.assertRaises(DecryptError, P.kem_decapsulate, key, ct[:-1])
        self.assertRaises(BadKey, P.kem_private_from_seed, bytes(63))


class EncodingTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        data = Writer().u8(1).u16(2).u32(3).u64(4).short(b"ab").blob(b"cd").text("é").getvalue()
        r = Reader(data)
        self.assertEqual(
            (r.u8(), r.u16(), r.u32(), r.u64(), r.short(), r.blob(), r.text()),
            (1, 2, 3, 4, b"ab", b"cd", "é"),
        )
        r.done()

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=40))
    def test_garbage_raises_decode_error_only(self, data: bytes) -> None:
        r = Reader(data)
        with contextlib.suppress(DecodeError):
            r.u8()
            r.short(8)
            r.text(8)
            r.blob(16)
            r.u64()
            r.done()

    def test_not_bytes(self) -> None:
        self.assertRaises(DecodeError, Reader, "text")  # type: ignore[arg-type]
