"""The per-message fast paths agree with their reference implementations, and the
header-key cipher cache never outlives the header keys the ratchet keeps."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _hmac
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shtalk.crypto import BadSignature, CryptoError, Envelope
from shtalk.crypto import primitives as P
from shtalk.crypto.ratchet import RatchetState
from shtalk.test.crypto.test_crypto_parsers import _mutate
from shtalk.test.crypto.test_crypto_support import Pair

_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _ref_hmac(key: bytes, data: bytes) -> bytes:
    mac = _hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


class HashFastPaths(SynchronousTestCase):
    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=150), st.binary(max_size=40), st.binary(max_size=40))
    def test_hmac_pair_matches_cryptography(self, key: bytes, a: bytes, b: bytes) -> None:
        self.assertEqual(P.hmac_sha256_pair(key, a, b), (_ref_hmac(key, a), _ref_hmac(key, b)))

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=100), st.binary(max_size=40), st.integers(1, 64))
    def test_short_hkdf_matches_cryptography(self, ikm: bytes, info: bytes, length: int) -> None:
        ref = HKDF(hashes.SHA256(), length, bytes(32), info).derive(ikm)
        self.assertEqual(P.hkdf(ikm, None, info, length), ref)


class SignatureFastPaths(SynchronousTestCase):
    def test_sign_is_low_s_and_matches_der(self) -> None:
        key = P.signing_generate()
        public = key.public_key()
        for _ in range(200):
            data = os.urandom(40)
            sig = P.sign(key, data)
            r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            der_r, der_s = decode_dss_signature(key.sign(data, P._ECDSA))
            self.assertEqual(r, der_r)
            self.assertEqual(s, min(der_s, _N - der_s))
            P.verify(public, sig, data)

    def test_verify_refuses_non_canonical(self) -> None:
        key = P.signing_generate()
        public = key.public_key()
        data = b"data"
        sig = P.sign(key, data)
        r, s = sig[:32], int.from_bytes(sig[32:], "big")
        for bad in (
            r + (_N - s).to_bytes(32, "big"),  # high S: valid ECDSA, refused
            bytes(32) + sig[32:],
            sig[:32] + bytes(32),
            _N.to_bytes(32, "big") + sig[32:],
            sig[:32] + (_N // 2 + 1).to_bytes(32, "big"),
            sig[:63],
        ):
            self.assertRaises(BadSignature, P.verify, public, bad, data)
        self.assertRaises(BadSignature, P.verify, public, bytearray(sig), data)
        P.verify(public, sig, data)


_PAIR = Pair()
_WIRE = _PAIR.seal_from_alice(b"x" * 30)


class EnvelopeFastParser(SynchronousTestCase):
    def _same(self, data: bytes) -> None:
        try:
            ref: Envelope | None = Envelope._parse(data)
        except CryptoError:
            ref = None
        fast = Envelope._parse_fast(data) if len(data) >= 66 else None
        if ref is None:
            self.assertIsNone(fast)
            self.assertRaises(CryptoError, Envelope.from_bytes, data)
            return
        assert fast is not None
        self.assertEqual(fast, ref)
        self.assertEqual(fast.body(), ref.body())
        self.assertEqual(fast.to_bytes(), data)
        self.assertEqual(Envelope.from_bytes(data), ref)

    @settings(max_examples=300, deadline=None)
    @given(st.data())
    def test_fast_parser_accepts_exactly_what_the_reader_accepts(self, data: st.DataObject) -> None:
        self._same(_mutate(data, _WIRE))

    def test_valid_envelope(self) -> None:
        self._same(_WIRE)


class HeaderKeyCache(SynchronousTestCase):
    """Forward secrecy: a cached header-key cipher never outlives the header key."""

    def _live(self, state: RatchetState) -> set[bytes]:
        keys = {state.hks, state.hkr, state.nhks, state.nhkr, *state.skipped}
        return {k for k in keys if k is not None}

    def _check(self, state: RatchetState) -> None:
        self.assertLessEqual(set(state._aeads), self._live(state))

    def test_cache_follows_skipped_chains_and_dh_steps(self) -> None:
        pair = Pair()
        pair.open_at_alice(pair.seal_from_bob(b"ack"))
        late = [pair.seal_from_alice(b"late %d" % i) for i in range(3)]
        pair.open_at_bob(pair.seal_from_alice(b"now"))  # skips three keys
        # a DH step in each direction: the skipped chain is no longer current
        pair.open_at_alice(pair.seal_from_bob(b"reply"))
        pair.open_at_bob(pair.seal_from_alice(b"again"))
        ratchet = pair.sb.ratchet
        self.assertEqual(len(ratchet.skipped), 1)
        (old_hk,) = ratchet.skipped
        for wire in late:
            self.assertIn(old_hk, self._live(ratchet))
            pair.open_at_bob(wire)
            self._check(ratchet)
        # the chain's last skipped key is consumed: the chain and its cipher are gone
        self.assertNotIn(old_hk, ratchet.skipped)
        self.assertNotIn(old_hk, ratchet._aeads)
        self._check(ratchet)
        for _ in range(3):
            pair.open_at_alice(pair.seal_from_bob(b"b"))
            pair.open_at_bob(pair.seal_from_alice(b"a"))
            self._check(pair.sa.ratchet)
            self._check(pair.sb.ratchet)

    def test_evicted_chain_drops_its_cipher(self) -> None:
        pair = Pair()
        pair.open_at_alice(pair.seal_from_bob(b"ack"))
        ratchet = pair.sb.ratchet
        ratchet.max_skipped = 2
        lost = [pair.seal_from_alice(b"lost") for _ in range(2)]
        pair.open_at_bob(pair.seal_from_alice(b"now"))
        pair.open_at_alice(pair.seal_from_bob(b"reply"))
        pair.open_at_bob(pair.seal_from_alice(b"again"))
        (old_hk,) = ratchet.skipped
        pair.open_at_bob(lost[0])  # brings its cipher back into the cache
        self.assertIn(old_hk, ratchet._aeads)
        # two more skipped keys in the current chain evict the old chain's last key
        ahead = [pair.seal_from_alice(b"x") for _ in range(3)]
        pair.open_at_bob(ahead[-1])
        self.assertNotIn(old_hk, ratchet.skipped)
        self.assertNotIn(old_hk, ratchet._aeads)
        self._check(ratchet)
        del lost
